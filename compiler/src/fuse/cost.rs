//! The roofline cost model: a kernel takes max(FLOPs / peak, bytes / bandwidth) plus a
//! launch overhead. The device figures live in a [`Profile`] (H100 by default, as measured on
//! the device machine: ~800 TFLOP/s BF16, ~1600 FP8, ~3.0 TB/s).

use super::lang::Fx;
use super::FusionAnalysis;
use egg::{CostFunction, EGraph, Id, Language};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Dense BF16 tensor-core FLOP/s.
    pub bf16_flops: f64,
    /// Dense FP8 tensor-core FLOP/s.
    pub fp8_flops: f64,
    /// Non-tensor FLOP/s (elementwise work on the CUDA cores).
    pub vector_flops: f64,
    /// Device memory bandwidth, bytes/s (read + write).
    pub bandwidth: f64,
    /// Cost of one kernel launch, seconds.
    pub launch: f64,
}

impl Default for Profile {
    fn default() -> Self {
        Profile { bf16_flops: 800e12, fp8_flops: 1600e12, vector_flops: 60e12, bandwidth: 3.0e12, launch: 4e-6 }
    }
}

impl Profile {
    /// The roofline time of a kernel.
    pub fn seconds(&self, flops: f64, peak: f64, bytes: f64) -> f64 {
        self.launch + (flops / peak).max(bytes / self.bandwidth)
    }
}

/// Extraction cost: the roofline time of each node as its own kernel, plus its children's
/// (a fused node replaces several launches and the memory traffic between them).
pub struct RooflineCost<'a> {
    pub egraph: &'a EGraph<Fx, FusionAnalysis>,
    pub profile: Profile,
}

impl RooflineCost<'_> {
    fn bytes(&self, id: Id) -> f64 {
        let data = &self.egraph[id].data;
        data.shape.as_ref().map_or(0.0, |s| s.iter().product::<usize>() as f64 * 4.0)
    }

    fn own(&self, enode: &Fx) -> f64 {
        match enode {
            // Constants and views are not kernels; opaque ops are not a choice.
            Fx::Const(_) | Fx::Opaque(..) | Fx::Stop(_) => 0.0,
            _ => {
                let inputs: f64 = enode.children().iter().map(|&c| self.bytes(c)).sum();
                let output = enode.children().iter().map(|&c| self.bytes(c)).fold(0.0, f64::max);
                let flops = output / 4.0;
                self.profile.seconds(flops, self.profile.vector_flops, inputs + output)
            }
        }
    }
}

impl CostFunction<Fx> for RooflineCost<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &Fx, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        let own = self.own(enode);
        enode.fold(own, |sum, id| sum + costs(id))
    }
}
