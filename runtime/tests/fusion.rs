//! Every fusion rule proven on the CPU backend: a function with the rule's pattern, built by
//! the model builder's own helpers, is fused; the rule must fire, and the fused function must
//! compute what the original computes, within f32 rounding, on random shapes and values.
//! Then the whole tiny model: training from a compiled plan gives the same losses as the
//! unfused graph.

use dsc_compiler::fuse::{fuse_function, Limits};
use dsc_compiler::graph::ir::{DType, FunctionBuilder, Module, Op, V};
use dsc_compiler::graph::model::{rms_norm, softmax, swiglu_gate};
use dsc_runtime::cpu::{run, Tensor, Value};
use dsc_runtime::rng::Rng;
use proptest::prelude::*;

/// Builds `f(args)`, fuses it, and checks that `fused_op` appears and that both versions
/// agree on random inputs of the given shapes.
fn prove(
    name: &str,
    shapes: &[Vec<usize>],
    seed: u64,
    fused_op: &str,
    build: impl Fn(&mut FunctionBuilder, &[V]) -> V,
) -> Result<(), TestCaseError> {
    let mut module = Module::default();
    let f = {
        let mut b = FunctionBuilder::new(&module, name);
        let args: Vec<V> =
            shapes.iter().enumerate().map(|(i, s)| b.arg(format!("x{i}"), s.clone(), DType::F32)).collect();
        let y = build(&mut b, &args);
        b.output("y", y);
        b.finish()
    };
    let (fused, report) = fuse_function(&module, &f, Limits::default());
    prop_assert!(report.stop_reason == "saturated", "{name}: {}", report.stop_reason);
    if !fused_op.is_empty() {
        prop_assert!(
            fused.nodes.iter().any(|n| n.op.name() == fused_op),
            "{name}: the rule did not fire:\n{:?}",
            fused.nodes
        );
    }
    let original = module.add(f);
    let fused = module.add(fused);
    let mut rng = Rng::new(seed);
    let args: Vec<Value<f32>> = shapes
        .iter()
        .map(|s| {
            Value::real(Tensor::new(s.clone(), (0..s.iter().product()).map(|_| 2.0 * rng.gaussian() as f32).collect()))
        })
        .collect();
    let before = run(&module, original, args.clone())[0].as_real().clone();
    let after = run(&module, fused, args)[0].as_real().clone();
    prop_assert_eq!(&before.shape, &after.shape);
    for (x, y) in before.data.iter().zip(&after.data) {
        prop_assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{name}: {x} before, {y} after");
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
    let (fused, _) = fuse_function(&module, &b.finish(), Limits::default());
    assert!(fused.nodes.iter().all(|n| !matches!(n.op, Op::Transpose(_))), "{:?}", fused.nodes);
    assert_eq!(fused.nodes.iter().filter(|n| matches!(n.op, Op::StopGradient)).count(), 1);
}

#[test]
fn a_compiled_plan_trains_like_the_unfused_graph() {
    use dsc_compiler::graph::Numerics;
    use dsc_runtime::train::CpuTrainer;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
    let spec = dsc_lang::load(&path, &[]).checked_spec().expect("tiny").clone();
    let plan = dsc_compiler::plan::compile(&spec, Limits::default());
    assert!(plan.functions.iter().any(|f| f.fusion.fused.iter().any(|(op, _)| op == "rmsnorm")));
    let mut fused = CpuTrainer::<f32>::with_graph(&spec, plan.training_graph(), 0).expect("trainable");
    let mut unfused = CpuTrainer::<f32>::new(&spec, Numerics::Policy, 0).expect("trainable");
    let mut worst = 0.0f64;
    for step in 1..=20 {
        let (a, b) = (fused.step().loss, unfused.step().loss);
        let rel = (a - b).abs() / b.abs();
        worst = worst.max(rel);
        assert!(rel < 1e-5, "step {step}: fused {a}, unfused {b}");
    }
    eprintln!("tiny, 20 steps from the compiled plan: worst relative loss difference to the unfused graph {worst:.2e}");
}
