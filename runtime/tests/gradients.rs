//! Finite-difference checks, in f64, of the VJP of every differentiable primitive (through
//! the real autodiff and the CPU interpreter), of calls, and of the whole tiny model's loss
//! with respect to a sample of every kind of parameter; and a BF16 product's backward (BF16 GEMMs
//! on the rounded cotangent) against its definition.

use dsc_compiler::graph::autodiff;
use dsc_compiler::graph::ir::{DType, FunctionBuilder, GemmPrecision, Module, Op, V};
use dsc_runtime::cpu::numerics::round_bf16;
use dsc_runtime::cpu::{run, Tensor, Value};

/// Deterministic values in (-1, 1) (a 64-bit LCG).
fn values(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// An argument of a checked function.
enum Arg {
    /// A real tensor of this shape; `positive` draws values in (0.5, 1.5).
    Real(Vec<usize>, bool),
    /// A fixed index tensor.
    Int(Vec<usize>, Vec<i32>),
}

/// Builds `loss = Σ w ⊙ op(args)` with fixed random weights w, differentiates it, and compares
/// every real argument's gradient with central differences.
fn check(name: &str, args: Vec<Arg>, op: impl Fn(&mut FunctionBuilder, &[V]) -> V) {
    let mut module = Module::default();
    let f = {
        let mut b = FunctionBuilder::new(&module, name);
        let vs: Vec<V> = args
            .iter()
            .enumerate()
            .map(|(i, a)| match a {
                Arg::Real(shape, _) => b.arg(format!("x{i}"), shape.clone(), DType::F64),
                Arg::Int(shape, _) => b.arg(format!("i{i}"), shape.clone(), DType::I32),
            })
            .collect();
        let y = op(&mut b, &vs);
        let shape = b.shape(y).clone();
        let w = b.arg("w", shape, DType::F64);
        let weighted = b.mul(y, w);
        let loss = b.sum_all(weighted);
        b.output("loss", loss);
        b.finish()
    };
    let f = module.add(f);
    let grad = autodiff::grad(&mut module, f);
    let out_shape = module.functions[f].args.last().expect("w").1.clone();
    let w = values(99, out_shape.iter().product());
    let mut inputs: Vec<Vec<f64>> = args
        .iter()
        .enumerate()
        .map(|(i, a)| match a {
            Arg::Real(shape, positive) => {
                let v = values(i as u64 + 1, shape.iter().product());
                if *positive {
                    v.iter().map(|x| 1.0 + 0.5 * x).collect()
                } else {
                    v
                }
            }
            Arg::Int(..) => vec![],
        })
        .collect();
    let pack = |inputs: &[Vec<f64>]| -> Vec<Value<f64>> {
        let mut packed: Vec<Value<f64>> = args
            .iter()
            .zip(inputs)
            .map(|(a, data)| match a {
                Arg::Real(shape, _) => Value::real(Tensor::new(shape.clone(), data.clone())),
                Arg::Int(shape, ids) => Value::int(Tensor::new(shape.clone(), ids.clone())),
            })
            .collect();
        packed.push(Value::real(Tensor::new(out_shape.clone(), w.clone())));
        packed
    };
    let loss = |inputs: &[Vec<f64>]| run(&module, f, pack(inputs))[0].scalar();
    let outputs = run(&module, grad, pack(&inputs));
    // Outputs: loss, then d_x for each real argument in order, then d_w.
    let mut grads = outputs[1..].iter();
    for (i, a) in args.iter().enumerate() {
        let Arg::Real(..) = a else { continue };
        let analytic = grads.next().expect("a gradient per real argument").as_real().data.clone();
        let h = 1e-6;
        let mut numeric = vec![0.0; analytic.len()];
        for (j, n) in numeric.iter_mut().enumerate() {
            let keep = inputs[i][j];
            inputs[i][j] = keep + h;
            let up = loss(&inputs);
            inputs[i][j] = keep - h;
            let down = loss(&inputs);
            inputs[i][j] = keep;
            *n = (up - down) / (2.0 * h);
        }
        let err = relative_error(&analytic, &numeric);
        assert!(
            err < 1e-6,
            "{name}: gradient of argument {i} off by {err:e}\nanalytic {analytic:?}\nnumeric  {numeric:?}"
        );
    }
}

fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-12);
    diff / norm
}

fn real(shape: &[usize]) -> Arg {
    Arg::Real(shape.to_vec(), false)
}

fn positive(shape: &[usize]) -> Arg {
    Arg::Real(shape.to_vec(), true)
}

#[test]
fn elementwise_primitives() {
    for (name, op) in
        [("neg", Op::Neg), ("exp", Op::Exp), ("sigmoid", Op::Sigmoid), ("silu", Op::Silu), ("square", Op::Square)]
    {
        check(name, vec![real(&[3, 4])], |b, a| b.unary(op.clone(), a[0]));
    }
    for (name, op) in [("log", Op::Log), ("rsqrt", Op::Rsqrt), ("sqrt", Op::Sqrt)] {
        check(name, vec![positive(&[3, 4])], |b, a| b.unary(op.clone(), a[0]));
    }
}

#[test]
fn broadcasting_binary_primitives() {
    for (name, op) in [("add", Op::Add), ("sub", Op::Sub), ("mul", Op::Mul)] {
        check(name, vec![real(&[2, 3, 4]), real(&[3, 1])], |b, a| b.binary(op.clone(), a[0], a[1]));
        check(name, vec![real(&[4]), real(&[2, 4])], |b, a| b.binary(op.clone(), a[0], a[1]));
    }
    check("div", vec![real(&[2, 3]), positive(&[2, 1])], |b, a| b.div(a[0], a[1]));
    check("div by scalar", vec![real(&[2, 3]), positive(&[])], |b, a| b.div(a[0], a[1]));
}

#[test]
fn reductions_and_layout_primitives() {
    check("sum", vec![real(&[2, 3, 4])], |b, a| b.sum(a[0], 1, false));
    check("sum keep", vec![real(&[2, 3, 4])], |b, a| b.sum(a[0], 2, true));
    check("sum_to", vec![real(&[2, 3, 4])], |b, a| b.sum_to(a[0], vec![3, 1]));
    check("broadcast_to", vec![real(&[3, 1])], |b, a| b.broadcast_to(a[0], vec![2, 3, 4]));
    check("reshape", vec![real(&[2, 6])], |b, a| b.reshape(a[0], vec![3, 4]));
    check("transpose", vec![real(&[2, 3, 4])], |b, a| b.transpose(a[0], vec![2, 0, 1]));
    check("slice", vec![real(&[2, 5, 3])], |b, a| b.slice(a[0], 1, 1, 4));
    check("concat", vec![real(&[2, 2, 3]), real(&[2, 1, 3])], |b, a| b.concat(vec![a[0], a[1]], 1));
    check("pad_slice", vec![real(&[2, 3])], |b, a| {
        let s = b.slice(a[0], 1, 1, 3);
        b.push(Op::PadSlice { axis: 1, start: 0, len: 4 }, vec![s], vec![2, 4], DType::F64)
    });
    // The row maximum passes no gradient; in a softmax its effect cancels exactly.
    check("softmax with a stopped max", vec![real(&[2, 5])], |b, a| {
        let m = b.max(a[0], 1, true);
        let m = b.stop_gradient(m);
        let shifted = b.sub(a[0], m);
        let e = b.unary(Op::Exp, shifted);
        let z = b.sum(e, 1, true);
        b.div(e, z)
    });
}

#[test]
fn matrix_products() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = if ta { real(&[4, 3]) } else { real(&[3, 4]) };
        let bm = if tb { real(&[5, 4]) } else { real(&[4, 5]) };
        check(&format!("matmul ta={ta} tb={tb}"), vec![a, bm], move |b, x| b.matmul(x[0], x[1], ta, tb, None));
    }
    check("batched matmul", vec![real(&[2, 3, 4]), real(&[2, 5, 4])], |b, x| b.matmul(x[0], x[1], false, true, None));
}

#[test]
fn causal_attention() {
    // Queries and keys of 4, values of 3; the log-sum-exp passes no gradient.
    let (qk, v) = (real(&[2, 5, 3, 4]), real(&[2, 5, 3, 3]));
    check("attention", vec![qk, real(&[2, 5, 3, 4]), v], |b, a| b.attention(a[0], a[1], a[2], 0.7, false).0);
}

#[test]
fn indexing_primitives() {
    check("gather", vec![real(&[5, 3]), Arg::Int(vec![2, 2], vec![4, 0, 4, 2])], |b, a| b.gather(a[0], a[1]));
    check("take_along", vec![real(&[3, 4]), Arg::Int(vec![3, 2], vec![0, 3, 2, 2, 1, 0])], |b, a| {
        b.take_along(a[0], a[1])
    });
}

#[test]
fn moe_dispatch_primitives() {
    // 4 tokens, k = 2, 3 experts; idx = the experts each token picks.
    let idx = vec![0, 2, 1, 0, 2, 1, 0, 1];
    let experts_args = || {
        vec![real(&[4, 3]), real(&[3, 5, 3]), real(&[3, 3, 5]), positive(&[4, 2]), Arg::Int(vec![4, 2], idx.clone())]
    };
    check("permute → grouped matmuls → unpermute", experts_args(), |b, a| {
        let order = b.push(Op::SortByExpert { experts: 3 }, vec![a[4]], vec![8], DType::I32);
        let offsets = b.push(Op::ExpertOffsets { experts: 3 }, vec![a[4]], vec![4], DType::I32);
        let xs = b.push(Op::Permute { k: 2 }, vec![a[0], order], vec![8, 3], DType::F64);
        let h = b.push(Op::GroupedMatMul { tb: true, fp8: None }, vec![xs, a[1], offsets], vec![8, 5], DType::F64);
        let h = b.unary(Op::Silu, h);
        let ys = b.push(Op::GroupedMatMul { tb: true, fp8: None }, vec![h, a[2], offsets], vec![8, 3], DType::F64);
        b.push(Op::Unpermute { k: 2 }, vec![ys, order, a[3]], vec![4, 3], DType::F64)
    });
}

#[test]
fn calls_are_differentiated_through_their_forward_and_backward_halves() {
    let mut module = Module::default();
    let inner = {
        let mut b = FunctionBuilder::new(&module, "inner");
        let x = b.arg("x", vec![2, 3], DType::F64);
        let w = b.arg("w", vec![3, 3], DType::F64);
        let y = b.matmul(x, w, false, false, None);
        let y = b.unary(Op::Sigmoid, y);
        let s = b.sum_all(y);
        b.output("y", y);
        b.output("s", s);
        b.finish()
    };
    let inner = module.add(inner);
    let outer = {
        let mut b = FunctionBuilder::new(&module, "outer");
        let x = b.arg("x", vec![2, 3], DType::F64);
        let w = b.arg("w", vec![3, 3], DType::F64);
        let first = b.call(inner, vec![x, w]);
        let second = b.call(inner, vec![first[0], w]);
        let sq = b.unary(Op::Square, second[0]);
        let total = b.sum_all(sq);
        let loss = b.add(total, first[1]);
        b.output("loss", loss);
        b.finish()
    };
    let outer = module.add(outer);
    let grad = autodiff::grad(&mut module, outer);
    let x = values(1, 6);
    let w = values(2, 9);
    let pack = |x: &[f64], w: &[f64]| {
        vec![Value::real(Tensor::new(vec![2, 3], x.to_vec())), Value::real(Tensor::new(vec![3, 3], w.to_vec()))]
    };
    let out = run(&module, grad, pack(&x, &w));
    let dw = out[2].as_real().data.clone();
    let h = 1e-6;
    let numeric: Vec<f64> = (0..9)
        .map(|j| {
            let (mut up, mut down) = (w.clone(), w.clone());
            up[j] += h;
            down[j] -= h;
            (run(&module, outer, pack(&x, &up))[0].scalar() - run(&module, outer, pack(&x, &down))[0].scalar())
                / (2.0 * h)
        })
        .collect();
    assert!(relative_error(&dw, &numeric) < 1e-6, "{dw:?} vs {numeric:?}");
    // The layer function is differentiated once, however often it is called: its forward half
    // returns its product for the backward half, which recomputes the sigmoid from it and
    // runs the two products of the reverse pass only.
    assert_eq!(module.functions.iter().filter(|f| f.name == "inner.bwd").count(), 1);
    let function = |name: &str| module.functions.iter().find(|f| f.name == name).expect(name);
    let (forward, backward) = (function("inner.fwd"), function("inner.bwd"));
    assert_eq!(forward.output_names, ["y", "s", "saved0"]);
    assert_eq!(backward.args.iter().map(|a| a.0.as_str()).collect::<Vec<_>>(), ["x", "w", "saved0", "d_y", "d_s"]);
    let count = |op: &str| backward.nodes.iter().filter(|n| n.op.name() == op).count();
    assert_eq!((count("matmul"), count("sigmoid")), (2, 1));
}

/// The name of a parameter's kind: its name without layer numbers.
fn kind(name: &str) -> String {
    name.split('.').filter(|part| part.parse::<usize>().is_err()).collect::<Vec<_>>().join(".")
}

#[test]
fn whole_tiny_model_gradient_matches_finite_differences() {
    use dsc_compiler::graph::{model, Numerics};
    use dsc_runtime::data::synthetic::SyntheticCorpus;
    use dsc_runtime::train::init::init_params;
    use std::collections::BTreeMap;

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
    // A larger α so that the balance loss's gradient is not lost in the tolerance.
    let loaded = dsc_lang::load(
        &path,
        &["model.ffn.1.balance_alpha=0.1".into(), "train.micro_batch=2".into(), "train.seq_len=16".into()],
    );
    let spec = loaded.checked_spec().expect("tiny spec with overrides checks").clone();
    let mut forward = model::build(&spec, Numerics::Exact);
    let grad = autodiff::grad(&mut forward.module, forward.model);
    let module = &forward.module;
    let params: Vec<Vec<f64>> = init_params::<f64>(&forward.params, 0.1, 3).into_iter().map(|t| t.data).collect();
    let depth = spec.model.mtp.as_ref().map_or(0, |m| m.depth as usize);
    let batch = SyntheticCorpus::new(spec.model.vocab as usize, 5).batch(2, 16 + depth);
    let tokens: Vec<i32> = batch.tokens.iter().map(|&t| t as i32).collect();
    // Some labels do not count (as prompts in SFT), so that the mask's path is checked too.
    let loss_mask: Vec<f64> = (0..tokens.len()).map(|i| if i % 5 == 2 { 0.0 } else { 1.0 }).collect();
    let pack = |params: &[Vec<f64>]| -> Vec<Value<f64>> {
        let mut args: Vec<Value<f64>> = forward
            .params
            .iter()
            .zip(params)
            .map(|(p, d)| Value::real(Tensor::new(p.shape.clone(), d.clone())))
            .collect();
        args.push(Value::int(Tensor::new(vec![2, 16 + depth + 1], tokens.clone())));
        args.push(Value::real(Tensor::new(vec![2, 16 + depth + 1], loss_mask.clone())));
        args.push(Value::real(Tensor::scalar(0.3)));
        args
    };
    let out = run(module, grad, pack(&params));
    // The parameters' gradients come before those of the loss mask and the MTP weight.
    let first_grad = out.len() - forward.params.len() - 2;
    // Sample three entries of every learned parameter; compare per kind of parameter.
    let mut per_kind: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let mut perturbed = params.clone();
    for (i, p) in forward.params.iter().enumerate() {
        if !p.learned {
            continue;
        }
        let analytic = &out[first_grad + i].as_real().data;
        let n = p.numel();
        for j in [0, n / 2, n - 1] {
            let h = 1e-6;
            perturbed[i][j] = params[i][j] + h;
            let up = run(module, forward.model, pack(&perturbed))[0].scalar();
            perturbed[i][j] = params[i][j] - h;
            let down = run(module, forward.model, pack(&perturbed))[0].scalar();
            perturbed[i][j] = params[i][j];
            let entry = per_kind.entry(kind(&p.name)).or_default();
            entry.0.push(analytic[j]);
            entry.1.push((up - down) / (2.0 * h));
        }
    }
    assert!(per_kind.len() >= 20, "only {} kinds of parameters", per_kind.len());
    for (name, (analytic, numeric)) in &per_kind {
        let err = relative_error(analytic, numeric);
        assert!(err < 1e-5, "{name}: relative error {err:e}\nanalytic {analytic:?}\nnumeric  {numeric:?}");
    }
}

#[test]
fn a_bf16_product_has_a_bf16_backward() {
    // loss = Σ dy ⊙ (x·Wᵀ) as a BF16 linear layer: its Dgrad and Wgrad multiply BF16 values
    // (the cotangent dy rounded too) and return full-precision gradients.
    let (rows, k, n) = (3, 5, 4);
    let mut module = Module::default();
    let f = {
        let mut b = FunctionBuilder::new(&module, "bf16_linear");
        let x = b.arg("x", vec![rows, k], DType::F64);
        let w = b.arg("w", vec![n, k], DType::F64);
        let dy = b.arg("dy", vec![rows, n], DType::F64);
        let y = b.linear(x, w, GemmPrecision::Bf16);
        let weighted = b.mul(y, dy);
        let loss = b.sum_all(weighted);
        b.output("loss", loss);
        b.finish()
    };
    let f = module.add(f);
    let grad = autodiff::grad(&mut module, f);
    let g = &module.functions[grad];
    let products: Vec<_> = g.nodes.iter().filter(|n| matches!(n.op, Op::MatMul { .. })).collect();
    assert_eq!(products.len(), 3, "the forward, Dgrad and Wgrad");
    for p in &products {
        assert!(p.args.iter().all(|&a| g.node(a).dtype == DType::Bf16), "a BF16 product: {p:?}");
        assert_eq!(p.dtype, DType::F32, "its result is full precision");
    }
    let (x, w, dy) = (values(1, rows * k), values(2, n * k), values(3, rows * n));
    let args = [(vec![rows, k], &x), (vec![n, k], &w), (vec![rows, n], &dy)];
    let outputs = run(&module, grad, args.map(|(s, v)| Value::real(Tensor::new(s, v.clone()))).to_vec());
    let bf16 = |v: &[f64]| v.iter().map(|&e| round_bf16(e)).collect::<Vec<_>>();
    let (x, w, dy) = (bf16(&x), bf16(&w), bf16(&dy));
    let dx: Vec<f64> = (0..rows * k).map(|i| (0..n).map(|j| dy[i / k * n + j] * w[j * k + i % k]).sum()).collect();
    let dw: Vec<f64> = (0..n * k).map(|i| (0..rows).map(|r| dy[r * n + i / k] * x[r * k + i % k]).sum()).collect();
    assert!(relative_error(&outputs[1].as_real().data, &dx) < 1e-12, "d_x");
    assert!(relative_error(&outputs[2].as_real().data, &dw) < 1e-12, "d_w");
}
