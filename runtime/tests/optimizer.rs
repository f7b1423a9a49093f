//! The optimizer graph against a hand computation: clipping by the global norm it is given,
//! AdamW with bias correction and decoupled weight decay (not for norms), BF16 moments under
//! the policy, and the routing-bias update b += γ·sign(mean load − load).

use dsc_compiler::graph::ir::Module;
use dsc_compiler::graph::{optimizer, Numerics, ParamInfo};
use dsc_lang::ParamGroup;
use dsc_runtime::cpu::numerics::round_bf16;
use dsc_runtime::cpu::{run, Tensor, Value};

/// The state before the step: a [2, 2] matrix, its moments and gradient, a [2] norm scale and
/// its gradient.
const W: [f64; 4] = [1.0, -2.0, 0.5, 0.25];
const M: [f64; 4] = [0.01, 0.02, -0.03, 0.0];
const V: [f64; 4] = [1e-4, 2e-4, 3e-4, 0.0];
const G: [f64; 4] = [0.3, -0.4, 0.5, 0.1];
const NORM: [f64; 2] = [1.0, 0.9];
const NORM_G: [f64; 2] = [0.2, -0.1];

fn spec() -> dsc_lang::Spec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
    dsc_lang::load(&path, &[]).checked_spec().expect("tiny spec").clone()
}

fn param(name: &str, shape: Vec<usize>, group: ParamGroup, learned: bool, norm: bool) -> ParamInfo {
    ParamInfo { name: name.into(), shape, group, learned, norm }
}

fn tensor(shape: &[usize], data: &[f64]) -> Value<f64> {
    Value::real(Tensor::new(shape.to_vec(), data.to_vec()))
}

/// Runs one update of a [2, 2] matrix, a [2] norm scale and a [4] routing bias at step `t`,
/// their gradient `magnitude` times `G` and `NORM_G` given as its sum over `micro_batches`
/// equal micro-batches, the whole model's gradient norm `grad_norm`.
fn step(numerics: Numerics, magnitude: f64, micro_batches: f64, t: i32, grad_norm: f64) -> (Vec<Vec<f64>>, [f64; 5]) {
    let spec = spec();
    let params = vec![
        param("w", vec![2, 2], ParamGroup::Attention, true, false),
        param("norm", vec![2], ParamGroup::Norms, true, true),
        param("bias", vec![4], ParamGroup::Router, false, false),
    ];
    let mut module = Module::default();
    let f = optimizer::build(&module, &spec, &params, &[2], numerics);
    let f = module.add(f);
    let o = &spec.train.optimizer;
    let g: Vec<f64> = G.iter().map(|x| x * magnitude * micro_batches).collect();
    let gn: Vec<f64> = NORM_G.iter().map(|x| x * magnitude * micro_batches).collect();
    let args = vec![
        tensor(&[2, 2], &W),
        tensor(&[2, 2], &g),
        tensor(&[2, 2], &M),
        tensor(&[2, 2], &V),
        tensor(&[2], &NORM),
        tensor(&[2], &gn),
        tensor(&[2], &[0.0, 0.0]),
        tensor(&[2], &[0.0, 0.0]),
        tensor(&[4], &[0.0, 0.1, -0.1, 0.0]),
        tensor(&[4], &[10.0, 2.0, 6.0, 6.0]),
        tensor(&[], &[1e-3]),
        tensor(&[], &[1.0 - o.beta1.powi(t)]),
        tensor(&[], &[1.0 - o.beta2.powi(t)]),
        tensor(&[], &[0.01]),
        tensor(&[], &[grad_norm]),
        tensor(&[], &[1.0 / micro_batches]),
    ];
    let out = run(&module, f, args);
    let data: Vec<Vec<f64>> = out.iter().map(|v| v.as_real().data.clone()).collect();
    (data, [o.beta1, o.beta2, o.eps, o.weight_decay, spec.train.grad_clip])
}

/// AdamW by hand for one tensor: returns (p', m', v').
#[allow(clippy::too_many_arguments)]
fn adamw(
    p: &[f64],
    g: &[f64],
    m: &[f64],
    v: &[f64],
    factor: f64,
    t: i32,
    decay: bool,
    h: [f64; 5],
    round: fn(f64) -> f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let [b1, b2, eps, wd, _] = h;
    let lr = 1e-3;
    let mut out = (vec![], vec![], vec![]);
    for i in 0..p.len() {
        let g = g[i] * factor;
        let m = round(b1 * m[i] + (1.0 - b1) * g);
        let v = round(b2 * v[i] + (1.0 - b2) * g * g);
        let update =
            (m / (1.0 - b1.powi(t))) / ((v / (1.0 - b2.powi(t))).sqrt() + eps) + if decay { wd * p[i] } else { 0.0 };
        out.0.push(p[i] - lr * update);
        out.1.push(m);
        out.2.push(v);
    }
    out
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "{what}: {a:?} vs {b:?}");
    }
}

#[test]
fn adamw_step_matches_a_hand_computation() {
    // The norm of these gradients (0.77 before scaling), and norms of a larger model whose
    // other gradients live elsewhere (another rank's shard): below and above the clip of 1;
    // the gradients summed over one micro-batch or several (the update reads their mean).
    let cases = [(1.0, 1.0, 1, None), (10.0, 4.0, 3, None), (1.0, 3.0, 2, Some(0.9)), (1.0, 1.0, 2, Some(4.0))];
    for (magnitude, micro_batches, t, norm) in cases {
        let g = G.map(|x| x * magnitude);
        let gn = NORM_G.map(|x| x * magnitude);
        let norm = norm.unwrap_or_else(|| (g.iter().chain(&gn).map(|x| x * x).sum::<f64>()).sqrt());
        let (out, h) = step(Numerics::Exact, magnitude, micro_batches, t, norm);
        // Clipping to norm 1 only when the norm is larger.
        let factor = h[4] / norm.max(h[4]);
        let keep = |x: f64| x;
        let (p, m, v) = adamw(&W, &g, &M, &V, factor, t, true, h, keep);
        assert_close(&out[0], &p, "w");
        assert_close(&out[1], &m, "m");
        assert_close(&out[2], &v, "v");
        // Norm scales are exempt from weight decay (`no_decay = [norms]`).
        let (p, _, _) = adamw(&NORM, &gn, &[0.0; 2], &[0.0; 2], factor, t, false, h, keep);
        assert_close(&out[3], &p, "norm");
        // Mean load 6: experts above it are pushed down, below it up, at it unchanged.
        assert_close(&out[6], &[-0.01, 0.11, -0.1, 0.0], "bias");
    }
}

#[test]
fn the_policy_keeps_adam_moments_in_bf16() {
    let norm = (G.iter().chain(&NORM_G).map(|x| x * x).sum::<f64>()).sqrt();
    let (out, h) = step(Numerics::Policy, 1.0, 2.0, 1, norm);
    let factor = h[4] / norm.max(h[4]);
    let (p, m, v) = adamw(&W, &G, &M, &V, factor, 1, true, h, round_bf16);
    assert_close(&out[1], &m, "m in bf16");
    assert_close(&out[2], &v, "v in bf16");
    assert_close(&out[0], &p, "w from bf16 moments");
    assert!(out[1].iter().all(|&x| round_bf16(x) == x));
}
