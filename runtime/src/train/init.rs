//! Parameter initialisation: every learnable matrix from N(0, std²) (the spec's `init`),
//! norm scales at one, the routing biases at zero. Each parameter draws from its own stream
//! of the seed, so adding a parameter does not change the others.

use crate::cpu::{Real, Tensor};
use crate::rng::Rng;
use dsc_compiler::graph::ParamInfo;

pub fn init_params<T: Real>(params: &[ParamInfo], std: f64, seed: u64) -> Vec<Tensor<T>> {
    params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let n = p.numel();
            let data = if p.norm {
                vec![T::ONE; n]
            } else if !p.learned {
                vec![T::ZERO; n]
            } else {
                let mut rng = Rng::derive(seed, i as u64);
                (0..n).map(|_| T::from_f64(std * rng.gaussian())).collect()
            };
            Tensor::new(p.shape.clone(), data)
        })
        .collect()
}
