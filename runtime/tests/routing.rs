//! DeepSeekMoE routing checked by hand: group-limited top-k, the selection bias changing the
//! choice but not the weights, normalisation and the routed scale; and the sequence-wise
//! balance loss against its formula computed directly.

use dsc_compiler::graph::ir::{DType, FunctionBuilder, Module};
use dsc_compiler::graph::model::{balance_loss, gate_weights, route};
use dsc_lang::{Gating, Moe, Schedule};
use dsc_runtime::cpu::{run, Tensor, Value};

fn moe(experts: u64, top_k: u64, groups: u64, keep_groups: u64, alpha: f64) -> Moe {
    Moe {
        shared_experts: 1,
        routed_experts: experts,
        top_k,
        intermediate: 4,
        gating: Gating::Sigmoid,
        groups,
        keep_groups,
        routed_scale: 2.5,
        bias_speed: Schedule::constant(0.001),
        balance_alpha: alpha,
    }
}

/// Routes one token's scores with a bias; returns (chosen experts, gate weights).
fn route_one(m: &Moe, scores: &[f64], bias: &[f64]) -> (Vec<i32>, Vec<f64>) {
    let e = scores.len();
    let mut module = Module::default();
    let f = {
        let mut b = FunctionBuilder::new(&module, "route");
        let s = b.arg("scores", vec![1, e], DType::F64);
        let bias = b.arg("bias", vec![e], DType::F64);
        let chosen = route(&mut b, m, s, bias, 1);
        let gates = gate_weights(&mut b, m, s, chosen);
        b.output("chosen", chosen);
        b.output("gates", gates);
        b.finish()
    };
    let f = module.add(f);
    let out = run(
        &module,
        f,
        vec![Value::real(Tensor::new(vec![1, e], scores.to_vec())), Value::real(Tensor::new(vec![e], bias.to_vec()))],
    );
    (out[0].as_int().data.clone(), out[1].as_real().data.clone())
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
}

#[test]
fn group_limited_top_k_keeps_the_best_groups() {
    // 8 experts in 4 groups of 2. Group scores (sum of the two best): g0 = 0.9 + 0.1 = 1.0,
    // g1 = 0.5, g2 = 0.8 + 0.7 = 1.5, g3 = 0.0 + 0.85 = 0.85. Keeping 2 groups leaves g2 and g0,
    // so expert 7 (0.85), second best overall, is out: the top-2 are experts 0 and 4.
    let scores = [0.9, 0.1, 0.2, 0.3, 0.8, 0.7, 0.0, 0.85];
    let (chosen, gates) = route_one(&moe(8, 2, 4, 2, 0.0), &scores, &[0.0; 8]);
    assert_eq!(chosen, vec![0, 4]);
    // Normalised over the chosen, times 2.5.
    assert!(close(&gates, &[0.9 / 1.7 * 2.5, 0.8 / 1.7 * 2.5]), "{gates:?}");
    // Without group limiting (one group) expert 7 wins the second place.
    let (chosen, _) = route_one(&moe(8, 2, 1, 1, 0.0), &scores, &[0.0; 8]);
    assert_eq!(chosen, vec![0, 7]);
}

#[test]
fn the_bias_changes_the_choice_but_not_the_weights() {
    // Bias +0.3 on expert 5 makes its biased score 1.0 > 0.9: chosen first. The weights still
    // use the unbiased scores 0.7 and 0.9.
    let scores = [0.9, 0.1, 0.2, 0.3, 0.8, 0.7, 0.0, 0.85];
    let mut bias = [0.0; 8];
    bias[5] = 0.3;
    let (chosen, gates) = route_one(&moe(8, 2, 4, 2, 0.0), &scores, &bias);
    assert_eq!(chosen, vec![5, 0]);
    assert!(close(&gates, &[0.7 / 1.6 * 2.5, 0.9 / 1.6 * 2.5]), "{gates:?}");
}

#[test]
fn balance_loss_matches_its_formula() {
    // 2 sequences of 3 tokens, 4 experts, top-2, α = 0.5; choices given.
    let (batch, seq, e, k, alpha) = (2usize, 3usize, 4usize, 2usize, 0.5);
    let m = moe(e as u64, k as u64, 1, 1, alpha);
    let scores: Vec<f64> = (0..batch * seq * e).map(|i| 0.1 + ((i * 7919) % 13) as f64 / 13.0).collect();
    let chosen: Vec<i32> = vec![0, 1, 1, 2, 0, 3, 2, 3, 2, 0, 2, 1];
    let mut module = Module::default();
    let f = {
        let mut b = FunctionBuilder::new(&module, "balance");
        let s = b.arg("scores", vec![batch * seq, e], DType::F64);
        let c = b.arg("chosen", vec![batch * seq, k], DType::I32);
        let (loss, load) = balance_loss(&mut b, &m, batch, seq, s, c);
        b.output("loss", loss);
        b.output("load", load);
        b.finish()
    };
    let f = module.add(f);
    let out = run(
        &module,
        f,
        vec![
            Value::real(Tensor::new(vec![batch * seq, e], scores.clone())),
            Value::int(Tensor::new(vec![batch * seq, k], chosen.clone())),
        ],
    );
    // L = mean over sequences of α Σᵢ fᵢ Pᵢ, fᵢ = E/(K·T) · #{t: i chosen}, Pᵢ = mean_t s'ᵢₜ.
    let mut expected = 0.0;
    let mut load = vec![0.0; e];
    for sb in 0..batch {
        let tokens = sb * seq..(sb + 1) * seq;
        let mut f = vec![0.0; e];
        let mut p = vec![0.0; e];
        for t in tokens {
            for j in 0..k {
                let i = chosen[t * k + j] as usize;
                f[i] += e as f64 / (k * seq) as f64;
                load[i] += 1.0;
            }
            let total: f64 = scores[t * e..(t + 1) * e].iter().sum();
            for i in 0..e {
                p[i] += scores[t * e + i] / total / seq as f64;
            }
        }
        expected += alpha * (0..e).map(|i| f[i] * p[i]).sum::<f64>() / batch as f64;
    }
    assert!((out[0].scalar() - expected).abs() < 1e-12, "{} vs {expected}", out[0].scalar());
    assert_eq!(out[1].as_real().data, load);
}
