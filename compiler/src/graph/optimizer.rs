//! The optimizer step as a graph function: global gradient-norm clipping, AdamW with
//! decoupled weight decay and bias correction, per-group LR multipliers, moments rounded to
//! the policy's type, and the auxiliary-loss-free routing-bias update
//! `b += γ·sign(mean_load − load)`. The gradient norm is an argument, not computed here: the
//! caller sums the squares where the gradients are (on one rank, or over every rank's ZeRO-1
//! shard), so that the same function updates the whole model or one shard of it. The
//! gradients come summed over the step's micro-batches, with the factor to their mean folded
//! into the clipping factor (one pass over them fewer than scaling them first).

use super::ir::{DType, Function, FunctionBuilder, Module, Op, V};
use super::model::{Numerics, ParamInfo};
use dsc_lang::{Dtype, ParamGroup, Spec};

/// `adamw(p, g, m, v for each learned parameter…, bias, load for each MoE layer…, lr,
/// bias_correction1, bias_correction2, bias_speed, grad_norm, grad_scale) -> (p', m', v' for
/// each learned parameter…, bias' for each MoE layer…)`, m and v (in and out) of the policy's
/// moment type. The bias corrections are 1 − βᵗ; the gradient is `grad_scale · g` (g summed
/// over the micro-batches, `grad_scale` one over their count), whose norm `grad_norm`
/// clipping scales to at most the spec's `grad_clip`.
pub fn build(module: &Module, spec: &Spec, params: &[ParamInfo], moe_biases: &[usize], numerics: Numerics) -> Function {
    let opt = &spec.train.optimizer;
    let mut b = FunctionBuilder::new(module, "adamw");
    let learned: Vec<&ParamInfo> = params.iter().filter(|p| p.learned).collect();
    // Moments the policy keeps in bf16 come and go as bf16 (stored packed between steps:
    // `fuse::kernels::packed_bf16`); the update itself computes in f32.
    let moment_type =
        (numerics == Numerics::Policy && spec.precision.adam_moments == Dtype::Bf16).then_some(DType::Bf16);
    let state: Vec<[V; 4]> = learned
        .iter()
        .map(|p| {
            let arg = |b: &mut FunctionBuilder, what: &str, dtype| {
                b.arg(format!("{what}:{}", p.name), p.shape.clone(), dtype)
            };
            let moment = moment_type.unwrap_or(DType::F32);
            [
                arg(&mut b, "param", DType::F32),
                arg(&mut b, "grad", DType::F32),
                arg(&mut b, "m", moment),
                arg(&mut b, "v", moment),
            ]
        })
        .collect();
    let biases: Vec<(V, V)> = moe_biases
        .iter()
        .map(|&i| {
            let shape = params[i].shape.clone();
            let bias = b.arg(format!("bias:{}", params[i].name), shape.clone(), DType::F32);
            let load = b.arg(format!("load:{}", params[i].name), shape, DType::F32);
            (bias, load)
        })
        .collect();
    let lr = b.arg("lr", vec![], DType::F32);
    let bc1 = b.arg("bias_correction1", vec![], DType::F32);
    let bc2 = b.arg("bias_correction2", vec![], DType::F32);
    let bias_speed = b.arg("bias_speed", vec![], DType::F32);
    let norm = b.arg("grad_norm", vec![], DType::F32);
    let grad_scale = b.arg("grad_scale", vec![], DType::F32);
    // The clipping factor clip / max(norm, clip), times the factor to the mean.
    let clip = b.constant(spec.train.grad_clip);
    let limit = b.binary(Op::Maximum, norm, clip);
    let clipping = b.div(clip, limit);
    let factor = b.mul(clipping, grad_scale);
    let mut outputs = Vec::new();
    for (p, [w, g, m, v]) in learned.iter().zip(&state) {
        let g = b.mul(*g, factor);
        // Widened here, beside their use, so that each parameter's update stays one kernel.
        let [m, v] = [*m, *v].map(|x| if moment_type.is_some() { b.cast(x, DType::F32) } else { x });
        let m_new = ema(&mut b, m, g, opt.beta1);
        let g2 = b.unary(Op::Square, g);
        let v_new = ema(&mut b, v, g2, opt.beta2);
        let m_new = moment_type.map_or(m_new, |t| b.cast(m_new, t));
        let v_new = moment_type.map_or(v_new, |t| b.cast(v_new, t));
        let m_hat = b.div(m_new, bc1);
        let v_hat = b.div(v_new, bc2);
        let root = b.unary(Op::Sqrt, v_hat);
        let eps = b.constant(opt.eps);
        let denom = b.add(root, eps);
        let mut update = b.div(m_hat, denom);
        if decays(spec, p) {
            let wd = b.scale(*w, opt.weight_decay);
            update = b.add(update, wd);
        }
        let multiplier = lr_multiplier(spec, p.group);
        let step_lr = b.scale(lr, multiplier);
        let step = b.mul(update, step_lr);
        let w_new = b.sub(*w, step);
        outputs.push((format!("param:{}", p.name), w_new));
        outputs.push((format!("m:{}", p.name), m_new));
        outputs.push((format!("v:{}", p.name), v_new));
    }
    for (&i, (bias, load)) in moe_biases.iter().zip(&biases) {
        let mean = b.mean(*load, 0, true);
        let diff = b.sub(mean, *load);
        let sign = b.unary(Op::Sign, diff);
        let delta = b.mul(sign, bias_speed);
        outputs.push((format!("bias:{}", params[i].name), b.add(*bias, delta)));
    }
    for (name, v) in outputs {
        b.output(name, v);
    }
    b.finish()
}

/// β·state + (1 − β)·x
fn ema(b: &mut FunctionBuilder, state: V, x: V, beta: f64) -> V {
    let kept = b.scale(state, beta);
    let added = b.scale(x, 1.0 - beta);
    b.add(kept, added)
}

/// Whether weight decay applies: not to the groups listed in `no_decay` (norm scales count as
/// `norms` wherever they sit).
pub fn decays(spec: &Spec, p: &ParamInfo) -> bool {
    let no_decay = &spec.train.optimizer.no_decay;
    !(no_decay.contains(&p.group) || (p.norm && no_decay.contains(&ParamGroup::Norms)))
}

pub fn lr_multiplier(spec: &Spec, group: ParamGroup) -> f64 {
    spec.train.lr_scale.iter().find(|(g, _)| *g == group).map_or(1.0, |(_, s)| *s)
}
