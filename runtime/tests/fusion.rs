//! Every fusion rule proven on the CPU backend: a function with the rule's pattern, built by
//! the model builder's own helpers, is fused; the rule must fire, and the fused function must
//! compute what the original computes, within f32 rounding, on random shapes and values.
//! Then the whole tiny model: training from a compiled plan gives the same losses as the
//! unfused graph.

use dsc_compiler::fuse::cost::{node_seconds, Profile};
use dsc_compiler::fuse::lang::Fx;
use dsc_compiler::fuse::{fuse_function, fuse_function_for, fuse_function_with, fuse_module_for, Limits};
use dsc_compiler::graph::autodiff;
use dsc_compiler::graph::ir::{
    ConstantKind, DType, Fp8Linear, Function, FunctionBuilder, GemmPrecision, Module, Op, V,
};
use dsc_compiler::graph::model::{cross_entropy, gate_weights, rms_norm, rope, route, softmax, swiglu_gate};
use dsc_lang::{Gating, Moe, Schedule};
use dsc_runtime::cpu::{run, Tensor, Value};
use dsc_runtime::rng::Rng;
use proptest::prelude::*;

/// A linear layer's GEMMs in each precision (FP8 in 4-wide tiles and blocks).
const PRECISIONS: [GemmPrecision; 3] =
    [GemmPrecision::F32, GemmPrecision::Bf16, GemmPrecision::Fp8(Fp8Linear { tile: 4, block: 4, promote: 4 })];

/// Builds `f(args)`, fuses it, and checks that `fused_op` appears and that both versions
/// agree on random inputs of the given shapes.
fn prove(
    name: &str,
    shapes: &[Vec<usize>],
    seed: u64,
    fused_op: &str,
    build: impl Fn(&mut FunctionBuilder, &[V]) -> V,
) -> Result<(), TestCaseError> {
    prove_on(&Profile::default(), Module::default(), name, shapes, seed, fused_op, build)
}

/// A device on which memory traffic is all that counts (no launch overhead): extraction then
/// takes every fusion that saves bytes, however small the test shapes.
fn memory_bound() -> Profile {
    Profile { launch: 0.0, bandwidth: 1e9, ..Profile::default() }
}

/// As `prove`, with extraction costs from `profile`, in `module` (which may hold constants).
fn prove_on(
    profile: &Profile,
    mut module: Module,
    name: &str,
    shapes: &[Vec<usize>],
    seed: u64,
    fused_op: &str,
    build: impl Fn(&mut FunctionBuilder, &[V]) -> V,
) -> Result<(), TestCaseError> {
    let f = function(&module, name, shapes, build);
    let f = module.add(f);
    prove_function(module, f, seed, fused_op, profile)
}

/// As `prove`, for the VJP of `f(args)` (arguments: the inputs, then the output's cotangent).
fn prove_vjp(
    name: &str,
    shapes: &[Vec<usize>],
    seed: u64,
    fused_op: &str,
    build: impl Fn(&mut FunctionBuilder, &[V]) -> V,
) -> Result<(), TestCaseError> {
    let mut module = Module::default();
    let f = function(&module, name, shapes, build);
    let f = module.add(f);
    let vjp = autodiff::vjp(&mut module, f);
    prove_function(module, vjp, seed, fused_op, &Profile::default())
}

fn function(
    module: &Module,
    name: &str,
    shapes: &[Vec<usize>],
    build: impl Fn(&mut FunctionBuilder, &[V]) -> V,
) -> Function {
    let mut b = FunctionBuilder::new(module, name);
    let args: Vec<V> = shapes.iter().enumerate().map(|(i, s)| b.arg(format!("x{i}"), s.clone(), DType::F32)).collect();
    let y = build(&mut b, &args);
    b.output("y", y);
    b.finish()
}

/// Fuses function `f` of `module`, checks that `fused_op` appears (unless empty) and that every
/// output agrees with the original's on random inputs.
fn prove_function(
    mut module: Module,
    f: usize,
    seed: u64,
    fused_op: &str,
    profile: &Profile,
) -> Result<(), TestCaseError> {
    let original = module.functions[f].clone();
    let name = original.name.clone();
    let (fused, report) = fuse_function_for(&module, &original, Limits::default(), profile);
    prop_assert!(report.stop_reason == "saturated", "{name}: {}", report.stop_reason);
    if !fused_op.is_empty() {
        prop_assert!(
            fused.nodes.iter().any(|n| n.op.name() == fused_op),
            "{name}: the rule did not fire:\n{:?}",
            fused.nodes
        );
    }
    let fused = module.add(fused);
    compare(&module, f, fused, seed)
}

/// Functions `original` and `fused` of `module` agree on every output for random inputs.
fn compare(module: &Module, original: usize, fused: usize, seed: u64) -> Result<(), TestCaseError> {
    let name = &module.functions[original].name;
    let mut rng = Rng::new(seed);
    let args: Vec<Value<f32>> = module.functions[original]
        .args
        .iter()
        .map(|(_, s, _)| {
            Value::real(Tensor::new(s.clone(), (0..s.iter().product()).map(|_| 2.0 * rng.gaussian() as f32).collect()))
        })
        .collect();
    let before = run(module, original, args.clone());
    let after = run(module, fused, args);
    for (before, after) in before.iter().zip(&after) {
        let (before, after) = (before.as_real(), after.as_real());
        prop_assert_eq!(&before.shape, &after.shape);
        let scale = before.data.iter().fold(1.0f32, |m, x| m.max(x.abs()));
        for (x, y) in before.data.iter().zip(&after.data) {
            prop_assert!((x - y).abs() <= 1e-5 * (scale + x.abs()), "{name}: {x} before, {y} after");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn rmsnorm_rule(rows in 1usize..5, cols in 1usize..70, seed in any::<u64>()) {
        prove("rmsnorm", &[vec![rows, cols], vec![cols]], seed, "rmsnorm", |b, a| rms_norm(b, a[0], a[1], 1e-6))?;
    }

    #[test]
    fn softmax_rule(batch in 1usize..3, rows in 1usize..5, cols in 1usize..40, seed in any::<u64>()) {
        prove("softmax", &[vec![batch, rows, cols]], seed, "softmax", |b, a| softmax(b, a[0]))?;
    }

    #[test]
    fn swiglu_rule(rows in 1usize..5, cols in 1usize..70, seed in any::<u64>()) {
        prove("swiglu", &[vec![rows, cols], vec![rows, cols]], seed, "swiglu", |b, a| swiglu_gate(b, a[0], a[1]))?;
    }

    #[test]
    fn add_rmsnorm_rule(rows in 1usize..5, cols in 1usize..70, seed in any::<u64>()) {
        // Both results read: the residual sum and its norm.
        prove("add-rmsnorm", &[vec![2, rows, cols], vec![2, rows, cols], vec![cols]], seed, "add_rmsnorm", |b, a| {
            let sum = b.add(a[0], a[1]);
            let normed = rms_norm(b, sum, a[2], 1e-6);
            b.mul(sum, normed)
        })?;
    }

    #[test]
    fn rmsnorm_grad_rules(rows in 1usize..5, cols in 2usize..70, seed in any::<u64>()) {
        let shapes = [vec![2, rows, cols], vec![cols]];
        prove_vjp("rmsnorm-grad", &shapes, seed, "rmsnorm_grad", |b, a| rms_norm(b, a[0], a[1], 1e-6))?;
        // x read again after the norm: its adjoint accumulates the norm's terms.
        prove_vjp("rmsnorm-grad-accumulated", &shapes, seed, "rmsnorm_grad", |b, a| {
            let normed = rms_norm(b, a[0], a[1], 1e-6);
            b.add(a[0], normed)
        })?;
    }

    #[test]
    fn softmax_grad_rule(batch in 1usize..3, rows in 1usize..5, cols in 2usize..40, seed in any::<u64>()) {
        prove_vjp("softmax-grad", &[vec![batch, rows, cols]], seed, "softmax_grad", |b, a| softmax(b, a[0]))?;
    }

    #[test]
    fn cross_entropy_rules(rows in 1usize..6, cols in 2usize..70, seed in any::<u64>()) {
        // Labels from a second input's best column (random and in range); the VJP's row
        // cotangent is an argument of its own.
        let shapes = [vec![rows, cols], vec![rows, cols]];
        let loss = |b: &mut FunctionBuilder, a: &[V]| {
            let labels = b.top_k(a[1], 1);
            cross_entropy(b, a[0], labels)
        };
        prove("cross-entropy", &shapes, seed, "cross_entropy", loss)?;
        prove_vjp("cross-entropy-grad", &shapes, seed, "cross_entropy_grad", loss)?;
    }

    #[test]
    fn swiglu_grad_rule(rows in 1usize..5, cols in 1usize..70, seed in any::<u64>()) {
        let shapes = [vec![rows, cols], vec![rows, cols]];
        prove_vjp("swiglu-grad", &shapes, seed, "swiglu_grad", |b, a| swiglu_gate(b, a[0], a[1]))?;
    }

    #[test]
    fn concat_gemms_rule(rows in 1usize..6, k in 1usize..40, blocks in 1usize..4, n2 in 1usize..20, seed in any::<u64>()) {
        // Two linear layers of one input, in f32, BF16 and FP8 (4-wide tiles and blocks; the
        // first weight a whole number of blocks along N, as the rule requires).
        let n1 = 4 * blocks;
        let shapes = [vec![2, rows, k], vec![n1, k], vec![n2, k]];
        for precision in PRECISIONS {
            prove("concat-gemms", &shapes, seed, "concat_matmul", |b, a| {
                let y1 = b.linear(a[0], a[1], precision);
                let y2 = b.linear(a[0], a[2], precision);
                let y2 = b.slice(y2, 2, 0, 1);
                let y2 = b.broadcast_to(y2, vec![2, rows, n1]);
                b.mul(y1, y2)
            })?;
        }
    }

    #[test]
    fn fp8_quantize_rules(rows in 4usize..8, tiles in 1usize..4, n in 1usize..20, seed in any::<u64>()) {
        // A norm and a SwiGLU feeding FP8 linear layers (4-wide tiles): the GEMMs become
        // quantise + scaled GEMM, the quantisation joins its producer, bit for bit. (It pays when
        // the activations outweigh the weight, whose quantisation is a kernel of its own: more
        // tokens than a third of the outputs.)
        let fp8 = GemmPrecision::Fp8(Fp8Linear { tile: 4, block: 4, promote: 4 });
        let d = 4 * tiles;
        let profile = memory_bound();
        prove_on(&profile, Module::default(), "rmsnorm-quantize", &[vec![2, rows, d], vec![d], vec![n, d]], seed, "rmsnorm_quantize", |b, a| {
            let normed = rms_norm(b, a[0], a[1], 1e-6);
            b.linear(normed, a[2], fp8)
        })?;
        let shapes = [vec![2, rows, d], vec![2, rows, d], vec![n, d]];
        prove_on(&profile, Module::default(), "swiglu-quantize", &shapes, seed, "swiglu_quantize", |b, a| {
            let gated = swiglu_gate(b, a[0], a[1]);
            b.linear(gated, a[2], fp8)
        })?;
        // The MoE dispatch (each token to its top-2 of 3 experts) feeding the experts' GEMM.
        let (tokens, experts) = (2 * rows, 3);
        let shapes = [vec![tokens, d], vec![experts, n, d], vec![tokens, experts]];
        prove_on(&profile, Module::default(), "permute-quantize", &shapes, seed, "permute_quantize", |b, a| {
            let chosen = b.top_k(a[2], 2);
            let order = b.push(Op::SortByExpert { experts }, vec![chosen], vec![2 * tokens], DType::I32);
            let offsets = b.push(Op::ExpertOffsets { experts }, vec![chosen], vec![experts + 1], DType::I32);
            let xs = b.push(Op::Permute { k: 2 }, vec![a[0], order], vec![2 * tokens, d], DType::F32);
            let (xs, w, fp8) = b.gemm_operands(xs, a[1], fp8);
            b.push(Op::GroupedMatMul { tb: true, fp8 }, vec![xs, w, offsets], vec![2 * tokens, n], DType::F32)
        })?;
    }

    #[test]
    fn concat_rows_gemms_rule(tokens in 1usize..12, m1 in 1usize..9, m2 in 1usize..9, n in 1usize..9, seed in any::<u64>()) {
        // Two Wgrads of one input, g1ᵀ·x and g2ᵀ·x (1×4 groups along the tokens), and two
        // products with one weight.
        let wgrad = Fp8Linear { tile: 4, block: 4, promote: 4 }.wgrad();
        for fp8 in [None, Some(wgrad)] {
            prove("concat-rows-gemms", &[vec![tokens, m1], vec![tokens, m2], vec![tokens, n]], seed, "concat_rows_matmul", |b, a| {
                let y1 = b.matmul(a[0], a[2], true, false, fp8);
                let y2 = b.matmul(a[1], a[2], true, false, fp8);
                b.concat(vec![y1, y2], 0)
            })?;
        }
        prove("concat-rows-gemms", &[vec![m1, tokens], vec![m2, tokens], vec![n, tokens]], seed, "concat_rows_matmul", |b, a| {
            let y1 = b.matmul(a[0], a[2], false, true, None);
            let y2 = b.matmul(a[1], a[2], false, true, None);
            b.concat(vec![y1, y2], 0)
        })?;
    }

    #[test]
    fn concat_k_gemms_rules(rows in 1usize..6, k1 in 1usize..20, k2 in 1usize..20, n in 1usize..12, seed in any::<u64>()) {
        // The Dgrad of two linear layers of one input: g1·W1 + g2·W2, reshaped and not, in f32
        // and in FP8.
        let shapes = [vec![2, rows, k1], vec![2, rows, k2], vec![k1, n], vec![k2, n]];
        for fp8 in [None, Some(Fp8Linear { tile: 4, block: 4, promote: 4 }.dgrad())] {
            prove("concat-k-gemms-reshaped", &shapes, seed, "concat_k_matmul", |b, a| {
                let flat = |b: &mut FunctionBuilder, x: V, k: usize| b.reshape(x, vec![2 * rows, k]);
                let (g1, g2) = (flat(b, a[0], k1), flat(b, a[1], k2));
                let y1 = b.matmul(g1, a[2], false, false, fp8);
                let y2 = b.matmul(g2, a[3], false, false, fp8);
                let (y1, y2) = (b.reshape(y1, vec![2, rows, n]), b.reshape(y2, vec![2, rows, n]));
                b.add(y1, y2)
            })?;
            let matrices = [vec![rows, k1], vec![rows, k2], vec![k1, n], vec![k2, n]];
            prove("concat-k-gemms", &matrices, seed, "concat_k_matmul", |b, a| {
                let y1 = b.matmul(a[0], a[2], false, false, fp8);
                let y2 = b.matmul(a[1], a[3], false, false, fp8);
                b.add(y1, y2)
            })?;
        }
    }

    #[test]
    fn concat_grouped_gemms_rule(rows in 1usize..12, experts in 1usize..4, k in 1usize..20, blocks in 1usize..3, n2 in 1usize..9, seed in any::<u64>()) {
        // The experts' gate and up projections of the same rows (each row's expert its top
        // logit), in f32 and in FP8.
        let n1 = 4 * blocks;
        let shapes = [vec![rows, k], vec![experts, n1, k], vec![experts, n2, k], vec![rows, experts]];
        for fp8 in [None, Some(Fp8Linear { tile: 4, block: 4, promote: 4 }.fprop())] {
            prove("concat-grouped-gemms", &shapes, seed, "concat_grouped_matmul", |b, a| {
                let chosen = b.top_k(a[3], 1);
                let offsets = b.push(Op::ExpertOffsets { experts }, vec![chosen], vec![experts + 1], DType::I32);
                let op = Op::GroupedMatMul { tb: true, fp8 };
                let y1 = b.push(op.clone(), vec![a[0], a[1], offsets], vec![rows, n1], DType::F32);
                let y2 = b.push(op, vec![a[0], a[2], offsets], vec![rows, n2], DType::F32);
                b.concat(vec![y1, y2], 1)
            })?;
        }
    }

    #[test]
    fn fp8_gemm_explicit_rule(tokens in 1usize..12, k in 1usize..12, n in 1usize..12, seed in any::<u64>()) {
        // A linear layer's three FP8 GEMMs (Fprop x·Wᵀ, Dgrad g·W, Wgrad gᵀ·x with 1×4 groups
        // along the tokens, quantised transposed), extracted as quantise + scaled GEMM even
        // where the roofline would not take them.
        let recipe = Fp8Linear { tile: 4, block: 4, promote: 4 };
        let mut module = Module::default();
        let f = function(&module, "fp8-gemm-explicit", &[vec![tokens, k], vec![n, k], vec![tokens, n]], |b, a| {
            let y = b.matmul(a[0], a[1], false, true, Some(recipe.fprop()));
            let dx = b.matmul(a[2], a[1], false, false, Some(recipe.dgrad()));
            let dw = b.matmul(a[2], a[0], true, false, Some(recipe.wgrad()));
            let y = b.reshape(y, vec![tokens * n]);
            let dx = b.reshape(dx, vec![tokens * k]);
            let dw = b.reshape(dw, vec![n * k]);
            b.concat(vec![y, dx, dw], 0)
        });
        let explicit_wins = |egraph: &_, class, node: &Fx| match node {
            Fx::Quantize(_) | Fx::ScaledMatMul(_) => 0.0,
            _ => node_seconds(egraph, class, node, &Profile::default()),
        };
        let (fused, _) = fuse_function_with(&module, &f, Limits::default(), explicit_wins);
        let transposed = fused.nodes.iter().filter(|n| matches!(n.op, Op::Quantize { transpose: true, .. })).count();
        prop_assert!(transposed >= 2, "Wgrad's gᵀ and Fprop's Wᵀ quantised transposed: {:?}", fused.nodes);
        let (original, fused) = (module.add(f), module.add(fused));
        compare(&module, original, fused, seed)?;
    }

    #[test]
    fn gemm_residual_add_rules(rows in 1usize..6, k in 1usize..20, blocks in 1usize..4, seed in any::<u64>()) {
        let n = 4 * blocks;
        for precision in PRECISIONS {
            // h + linear(x) over [2, rows, n] (the product reshaped), and c + x·Wᵀ over matrices.
            prove("gemm-residual-add-reshaped", &[vec![2, rows, n], vec![2, rows, k], vec![n, k]], seed, "matmul_add", |b, a| {
                let y = b.linear(a[1], a[2], precision);
                b.add(a[0], y)
            })?;
            prove("gemm-residual-add", &[vec![rows, n], vec![rows, k], vec![n, k]], seed, "matmul_add", |b, a| {
                let (x, w, fp8) = b.gemm_operands(a[1], a[2], precision);
                let y = b.matmul(x, w, false, true, fp8);
                b.add(a[0], y)
            })?;
        }
    }

    #[test]
    fn softmax_scale_mask_rule(heads in 1usize..4, rows in 1usize..6, cols in 1usize..30, seed in any::<u64>()) {
        prove("softmax-scale-mask", &[vec![2, heads, rows, cols], vec![rows, cols]], seed, "masked_softmax", |b, a| {
            let scaled = b.scale(a[0], 0.3);
            let masked = b.add(scaled, a[1]);
            softmax(b, masked)
        })?;
    }

    #[test]
    fn rope_concat_rules(seq in 1usize..5, heads in 1usize..4, pairs in 1usize..5, nope in 1usize..6, seed in any::<u64>()) {
        // A query's heads [2, seq, heads, nope + rope] and a key whose one RoPE part is
        // broadcast to every head, as the model builder makes them.
        let rope_dims = 2 * pairs;
        let mut module = Module::default();
        let frequencies: Vec<f64> = (0..pairs).map(|i| 10000f64.powf(-(2.0 * i as f64) / rope_dims as f64)).collect();
        let table = |sin| ConstantKind::Rope { frequencies: frequencies.clone(), scale: 1.0, sin };
        let cos = module.add_constant("rope_cos", vec![seq, rope_dims], table(false));
        let sin = module.add_constant("rope_sin", vec![seq, rope_dims], table(true));
        let shapes = [vec![2, seq, heads, nope], vec![2, seq, heads, rope_dims], vec![2, seq, 1, rope_dims]];
        prove_on(&Profile::default(), module, "rope-concat", &shapes, seed, "rope_concat", |b, a| {
            let q_pe = rope(b, a[1], cos, sin);
            let q = b.concat(vec![a[0], q_pe], 3);
            let k_pe = rope(b, a[2], cos, sin);
            let k_pe = b.broadcast_to(k_pe, vec![2, seq, heads, rope_dims]);
            let k = b.concat(vec![a[0], k_pe], 3);
            b.mul(q, k)
        })?;
    }

    #[test]
    fn route_rule(tokens in 1usize..9, groups in 2usize..5, per_group in 2usize..4, keep in 1usize..4, k in 1usize..6, seed in any::<u64>()) {
        // Group-limited routing and the gate weights, as the model builder emits them.
        let keep = keep.min(groups - 1);
        let k = k.min(keep * per_group);
        let experts = groups * per_group;
        let moe = Moe {
            shared_experts: 1,
            routed_experts: experts as u64,
            top_k: k as u64,
            intermediate: 4,
            gating: Gating::Sigmoid,
            groups: groups as u64,
            keep_groups: keep as u64,
            routed_scale: 2.5,
            bias_speed: Schedule::constant(0.001),
            balance_alpha: 1e-4,
        };
        prove("route", &[vec![tokens, experts], vec![experts]], seed, "route", |b, a| {
            let scores = b.unary(Op::Sigmoid, a[0]);
            let chosen = route(b, &moe, scores, a[1], tokens);
            gate_weights(b, &moe, scores, chosen)
        })?;
    }

    #[test]
    fn transpose_into_gemm_rules(m in 1usize..6, k in 1usize..9, n in 1usize..6, seed in any::<u64>()) {
        for fp8 in [None, Some(Fp8Linear { tile: 4, block: 4, promote: 4 }.fprop())] {
            prove("transpose-into-gemm", &[vec![2, k, m], vec![2, k, n]], seed, "", |b, a| {
                let at = b.transpose(a[0], vec![0, 2, 1]);
                let bt = b.transpose(a[1], vec![0, 2, 1]);
                b.matmul(at, bt, false, true, fp8)
            })?;
        }
    }

    #[test]
    fn stop_stop_and_transpose_transpose_rules(rows in 1usize..5, cols in 1usize..9, seed in any::<u64>()) {
        prove("stop-stop", &[vec![rows, cols]], seed, "", |b, a| {
            let s = b.stop_gradient(a[0]);
            let s = b.stop_gradient(s);
            b.unary(Op::Exp, s)
        })?;
        prove("transpose-transpose", &[vec![2, rows, cols]], seed, "", |b, a| {
            let t = b.transpose(a[0], vec![0, 2, 1]);
            let t = b.transpose(t, vec![0, 2, 1]);
            b.unary(Op::Exp, t)
        })?;
    }
}

#[test]
fn the_redundant_ops_are_gone_after_fusion() {
    let module = Module::default();
    let mut b = FunctionBuilder::new(&module, "redundant");
    let x = b.arg("x", vec![2, 3, 4], DType::F32);
    let t = b.transpose(x, vec![0, 2, 1]);
    let t = b.transpose(t, vec![0, 2, 1]);
    let s = b.stop_gradient(t);
    let s = b.stop_gradient(s);
    b.output("y", s);
    let r = b.reshape(x, vec![6, 4]);
    let r = b.reshape(r, vec![4, 6]);
    b.output("reshaped", r);
    let same = b.reshape(x, vec![2, 3, 4]);
    b.output("same", same);
    let xt = b.transpose(x, vec![0, 2, 1]);
    let gram = b.matmul(xt, x, false, false, None);
    b.output("gram", gram);
    let order = b.arg("order", vec![6], DType::I32);
    let positions = b.push(Op::InvertOrder, vec![order], vec![6], DType::I32);
    let back = b.push(Op::InvertOrder, vec![positions], vec![6], DType::I32);
    b.output("positions", positions);
    b.output("order", back);
    let (fused, _) = fuse_function(&module, &b.finish(), Limits::default());
    let count = |op: &str| fused.nodes.iter().filter(|n| n.op.name() == op).count();
    assert!(fused.nodes.iter().any(|n| n.op == Op::MatMul { ta: true, tb: false, fp8: None }), "{:?}", fused.nodes);
    assert_eq!((count("transpose"), count("stop_gradient"), count("reshape")), (0, 1, 1), "{:?}", fused.nodes);
    assert_eq!(count("invert_order"), 1, "{:?}", fused.nodes);
    assert!(matches!(fused.node(fused.outputs[5]).op, Op::Arg(_)), "the order comes back as it was");
}

/// The fused CPU kernels keep the primitives' rounding order, so a compiled plan trains
/// bit-identically to the unfused graph, FP8 policy included (FP8 rounding of gradients and
/// AdamW's normalised updates would amplify any other order within a few steps). So does the
/// graph fused for a memory-bound device, where FP8 quantisation is explicit and joins its
/// producers (over fewer steps: a different rounding shows within three).
#[test]
fn a_compiled_plan_trains_like_the_unfused_graph() {
    use dsc_compiler::graph::{Numerics, TrainingGraph};
    use dsc_runtime::train::Trainer;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
    let spec = dsc_lang::load(&path, &[]).checked_spec().expect("tiny").clone();
    let plan = dsc_compiler::plan::compile(&spec, Limits::default());
    // The plan runs the tiny model's attention expanded (its head dims are not the fused
    // kernels'); so do the graphs it is held to.
    let expanded = || {
        let mut graph = TrainingGraph::build(&spec, Numerics::Policy);
        graph.forward.module = dsc_compiler::plan::expand_attention(graph.module());
        graph
    };
    let mut explicit_fp8 = expanded();
    explicit_fp8.forward.module = fuse_module_for(explicit_fp8.module(), Limits::default(), &memory_bound()).0;
    let fused_ops = |m: &Module| -> Vec<&'static str> {
        m.functions.iter().flat_map(|f| &f.nodes).filter(|n| n.op.is_fused()).map(|n| n.op.name()).collect()
    };
    let (plan_ops, explicit_ops) = (fused_ops(&plan.module), fused_ops(explicit_fp8.module()));
    let expected = [
        "rmsnorm",
        "route",
        "rope_concat",
        "masked_softmax",
        "swiglu",
        "rmsnorm_grad",
        "swiglu_grad",
        "concat_k_matmul",
        "concat_rows_matmul",
        "concat_grouped_matmul",
        "matmul_add",
        // The library's FP8 GEMMs read their operands quantised (`fuse::library`).
        "quantize",
        "scaled_matmul",
        "concat_scaled_matmul",
        "concat_k_scaled_matmul",
        // The experts' FP8 Wgrad reads its operands quantised per expert along tokens.
        "quantize_by_expert",
        "scaled_grouped_wgrad",
    ];
    for op in expected {
        assert!(plan_ops.contains(&op), "no {op} in the plan");
    }
    for op in
        ["quantize", "scaled_matmul", "rmsnorm_quantize", "swiglu_quantize", "concat_scaled_matmul", "permute_quantize"]
    {
        assert!(explicit_ops.contains(&op), "no {op} in the graph fused for a memory-bound device");
    }
    let mut unfused = Trainer::<f32>::with_graph(&spec, expanded(), 0).expect("trainable");
    let mut fused = Trainer::<f32>::with_graph(&spec, plan.training_graph(), 0).expect("trainable");
    let mut explicit = Trainer::<f32>::with_graph(&spec, explicit_fp8, 0).expect("trainable");
    for step in 1..=20 {
        let reference = unfused.step().expect("one rank").loss;
        assert_eq!(fused.step().expect("one rank").loss, reference, "step {step}: the plan");
        if step <= 5 {
            assert_eq!(explicit.step().expect("one rank").loss, reference, "step {step}: explicit FP8");
        }
    }
}
