//! On the GPU (skipped with the reason when there is none). First, every generated kernel of the tiny
//! plan's gradient functions, launched through the CUDA backend on buffers placed by the
//! memory planner, and every library GEMM the backend runs (those outside FP8, on cuBLAS),
//! matches the CPU backend on the very values the CPU computed in one training micro-batch
//! (real token ids, routing and MoE orders included). Then the forward and gradient
//! functions run whole on the GPU against the CPU reference (an f32 plan too, see its test),
//! a plan's pipeline stages on thread-ranks against the CPU, and a bench-shaped plan's attention
//! and training step (`a_bench_*`).
//! The plan comes
//! from `DSC_TEST_PLAN` (default `target/plan-tiny`: `dsc compile
//! models/deepseek-v3-tiny.dsc -o target/plan-tiny`).
#![cfg(feature = "cuda")]

use dsc_compiler::fuse::kernels::Code;
use dsc_compiler::graph::ir::{DType, Op, V};
use dsc_compiler::graph::model::LOSS_OUTPUTS;
use dsc_compiler::graph::Numerics;
use dsc_compiler::plan::Plan;
use dsc_lang::spec::{Ffn, LrPhase, LrShape, Schedule};
use dsc_runtime::checkpoint::{Checkpoint, SpecRecord};
use dsc_runtime::comm::rendezvous::World;
use dsc_runtime::cpu::{run, run_observed, Tensor, Value};
use dsc_runtime::cuda::exec::{self, Executor};
use dsc_runtime::cuda::nccl::Nccl;
use dsc_runtime::cuda::places::Places;
use dsc_runtime::cuda::{gemm, stage, Gpu, Kernels};
use dsc_runtime::rng::Rng;
use dsc_runtime::train::backend::Moments;
use dsc_runtime::train::graph_stage::plan_stages;
use dsc_runtime::train::init::init_params;
use dsc_runtime::train::metrics::StepMetrics;
use dsc_runtime::train::parallel::Here;
use dsc_runtime::train::{Backend, Resident, Trainer};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

/// ‖got − want‖ / ‖want‖ over the finite elements of `want`; infinite when `got` differs
/// where `want` is not finite (±∞ must match, NaN stay NaN) or is not finite elsewhere.
fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    let same = |g: f64, w: f64| (g.is_nan() && w.is_nan()) || g == w;
    if got.iter().zip(want).any(|(&g, &w)| if w.is_finite() { !g.is_finite() } else { !same(g, w) }) {
        return f64::INFINITY;
    }
    let finite = || got.iter().zip(want).filter(|(_, w)| w.is_finite());
    let diff: f64 = finite().map(|(g, w)| (g - w) * (g - w)).sum();
    let norm: f64 = finite().map(|(_, w)| w * w).sum();
    (diff / norm.max(1e-60)).sqrt()
}

/// The GPU, the plan's directory (from `variable`, else `target/DEFAULT`) and the plan;
/// `None` (the reason printed) without either.
fn setup(variable: &str, default: &str) -> Option<(Gpu, PathBuf, Plan)> {
    let gpu = match Gpu::open() {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("skipped: {e}");
            return None;
        }
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    let dir = std::env::var_os(variable).map_or(root.join(default), PathBuf::from);
    match Plan::read(&dir) {
        Ok(plan) if dir.join("kernels").is_dir() => {
            eprintln!("GPU: {}", gpu.name().expect("name"));
            Some((gpu, dir, plan))
        }
        _ => {
            eprintln!("skipped: no compiled plan with PTX at {} (see this file's doc)", dir.display());
            None
        }
    }
}

/// The gradient function's arguments for one micro-batch: parameters initialised from
/// `seed`, random tokens, every position counted, MTP weight 0.3.
fn micro_batch(plan: &Plan, seed: u64) -> Vec<Value<f32>> {
    let train = &plan.spec.train;
    let mut args: Vec<Value<f32>> =
        init_params(&plan.params, plan.spec.model.init_std, seed).into_iter().map(Value::real).collect();
    let (sequences, width) = (train.micro_batch as usize, train.seq_len as usize + 2);
    let mut rng = Rng::new(seed + 4);
    let vocab = plan.spec.model.vocab;
    args.push(Value::int(Tensor::new(
        vec![sequences, width],
        (0..sequences * width).map(|_| (rng.next_u64() % vocab) as i32).collect(),
    )));
    args.push(Value::real(Tensor::new(vec![sequences, width], vec![1.0; sequences * width])));
    args.push(Value::real(Tensor::scalar(0.3)));
    args
}

#[test]
fn generated_kernels_match_the_cpu_on_the_gpu() {
    let Some((gpu, dir, plan)) = setup("DSC_TEST_PLAN", "plan-tiny") else { return };
    // One micro-batch on the CPU, every value of every function's first call recorded.
    let graph = plan.training_graph();
    let args = micro_batch(&plan, 7);
    let mut seen: HashMap<(usize, usize), Value<f32>> = HashMap::new();
    run_observed(graph.module(), graph.grad, args, &mut |f, node, value| {
        seen.entry((f, node)).or_insert_with(|| value.clone());
    });

    let mut kernels = Kernels::new(&dir);
    let (exact, tf32) = (gpu.blas(false).expect("cuBLAS"), gpu.blas(true).expect("cuBLAS"));
    let (mut checked, mut gemms, mut left, mut failures) = (0, 0, 0, Vec::new());
    let mut worst_tf32: f64 = 0.0;
    for (f, (function, pf)) in plan.module.functions.iter().zip(&plan.functions).enumerate() {
        if !seen.contains_key(&(f, 0)) {
            continue; // not called by the gradient (the optimizer)
        }
        let layout = dsc_runtime::memory::plan(&pf.buffers);
        let bytes: HashMap<u32, usize> = pf.buffers.iter().map(|b| (b.value, b.bytes as usize)).collect();
        let packed = pf.packed_set();
        let mut arena = gpu.stream.alloc_zeros::<u8>(layout.peak as usize).expect("arena");
        for kernel in &pf.kernels {
            // The values a kernel reads and writes (a fused op's tuple as its parts).
            let written: Vec<u32> = kernel
                .outputs
                .iter()
                .flat_map(|&o| match function.nodes[o as usize].dtype {
                    DType::Tuple => (0..2).filter_map(|i| function.part(V(o), i)).map(|p| p.0).collect(),
                    _ => vec![o],
                })
                .collect();
            if matches!(kernel.code, Code::Library) && !gemm::runs(function, kernel, &packed) {
                left += 1;
                continue;
            }
            let args: Vec<u32> = match &kernel.code {
                Code::Generated { args, .. } => args.clone(),
                _ => kernel.inputs.iter().chain(&written).copied().collect(),
            };
            let range = |v: u32| {
                let at = layout.offsets[&v] as usize;
                at..at + bytes[&v]
            };
            // A cuBLAS GEMM runs twice: in exact f32, then on TF32 tensor cores (as policy
            // plans run them), its operands rounded to 10 mantissa bits: within 4 × 2⁻¹¹.
            let modes: &[(Option<&gemm::Blas>, bool)] = match kernel.code {
                Code::Generated { .. } => &[(None, false)],
                _ => &[(Some(&exact), false), (Some(&tf32), true)],
            };
            let places = Places::arena(&gpu, &arena, &layout);
            for &(blas, on_tf32) in modes {
                for &v in &args {
                    let host: Vec<u8> = match &seen[&(f, v as usize)] {
                        _ if !kernel.inputs.contains(&v) => vec![0xFF; bytes[&v]], // poisoned: NaN
                        value @ (Value::Real(_) | Value::Int(_)) => {
                            exec::encode(value, packed.contains(&v)).expect("a real or an index")
                        }
                        _ => panic!("input %{v} of {} is neither real nor an index", kernel.name),
                    };
                    gpu.stream.memcpy_htod(&host, &mut arena.slice_mut(range(v))).expect("upload");
                }
                match blas {
                    None => kernels.launch(&gpu, function, kernel, &places, |v| bytes[&v]).expect("launch"),
                    Some(blas) => {
                        gemm::run(
                            &gpu,
                            blas,
                            function,
                            &packed,
                            kernel,
                            &places,
                            &mut Default::default(),
                            &Default::default(),
                        )
                        .expect("cuBLAS GEMM");
                        gemms += 1;
                    }
                }
                for &v in args.iter().filter(|v| !kernel.inputs.contains(v)) {
                    let got = gpu.stream.clone_dtoh(&arena.slice(range(v))).expect("download");
                    let words =
                        |g: &[u8]| -> Vec<[u8; 4]> { g.chunks(4).map(|c| c.try_into().expect("4 bytes")).collect() };
                    let (error, bound) = match &seen[&(f, v as usize)] {
                        Value::Real(t) => {
                            let node = &function.nodes[v as usize];
                            let got = exec::decode(node, &node.shape, &got, packed.contains(&v));
                            let got: Vec<f64> = got.as_real().data.iter().map(|&x| f64::from(x)).collect();
                            let want: Vec<f64> = t.data.iter().map(|&x| f64::from(x)).collect();
                            let error = relative_error(&got, &want);
                            if on_tf32 {
                                worst_tf32 = worst_tf32.max(error);
                                (error, 2e-3)
                            } else {
                                (error, if kernel.ops.iter().any(|o| o == "cast") { 1e-2 } else { 1e-5 })
                            }
                        }
                        Value::Int(t) => {
                            let got: Vec<i32> = words(&got).into_iter().map(i32::from_le_bytes).collect();
                            (got.iter().zip(&t.data).filter(|(a, b)| a != b).count() as f64, 0.0)
                        }
                        Value::Quantized(q) => {
                            let node = &function.nodes[v as usize];
                            let Value::Quantized(decoded) = exec::decode(node, &node.shape, &got, false) else {
                                panic!("output %{v} of {} is FP8", kernel.name)
                            };
                            (relative_error(&decoded.dequantize(), &q.dequantize()), 1e-3)
                        }
                        _ => panic!("output %{v} of {} is a tuple", kernel.name),
                    };
                    checked += 1;
                    if error > bound {
                        failures.push(format!(
                            "{} {:?} output %{v}: error {error:.2e} > {bound:.0e}",
                            kernel.name, kernel.ops
                        ));
                    }
                }
            }
        }
        eprintln!("{}: arena {} bytes for {} of buffers", function.name, layout.peak, layout.total);
    }
    eprintln!(
        "{checked} kernel outputs checked ({gemms} cuBLAS GEMM runs, exact and TF32, the worst TF32 error \
         {worst_tf32:.2e}; {left} FP8/grouped GEMMs not on the GPU yet)"
    );
    assert!(checked > 100 && gemms > 10, "only {checked} outputs, {gemms} GEMMs checked");
    assert!(worst_tf32 > 1e-6, "the TF32 mode's products are exact f32 ones ({worst_tf32:.1e}): no tensor cores");
    assert!(failures.is_empty(), "{} wrong:\n{}", failures.len(), failures.join("\n"));
}

/// One seed's run of the forward and gradient functions, whole, on the GPU and the CPU.
struct Run {
    seed: u64,
    /// Whether every expert load agrees: at initialisation a token's routing scores lie close
    /// together (sigmoids of small logits), so one token's expert choice can differ between
    /// the GPU's and the CPU's f32 arithmetic, which moves every gradient by about 1/√tokens.
    routed_equally: bool,
    /// Per function: its name, and each output's relative error against the CPU.
    errors: Vec<(String, Vec<f64>)>,
    /// How many kernels ran on the host instead of the GPU.
    on_host: usize,
}

/// Runs the forward and gradient functions of `plan` whole on the GPU (`cuda::exec`: calls,
/// arenas, generated kernels, cuBLAS in exact f32 (its TF32 mode is checked product by
/// product above), the FP8 and grouped GEMMs on the host) and on the CPU reference (the same
/// fused module), for each seed's micro-batch.
fn whole_functions(gpu: Gpu, dir: &std::path::Path, plan: &Plan, seeds: std::ops::RangeInclusive<u64>) -> Vec<Run> {
    let mut exec = Executor::new(plan.clone(), dir, gpu, true).and_then(Executor::exact).expect("the plan loads");
    for a in exec.arenas() {
        eprintln!("arena {:<12} {:>9} bytes of {:>9}", a.function, a.peak_bytes, a.total_bytes);
    }
    let model = plan.module.function("model").expect("the forward function");
    let loads = LOSS_OUTPUTS..LOSS_OUTPUTS + plan.moe_biases.len();
    let reals = |v: &Value<f32>| -> Vec<f64> {
        match v {
            Value::Real(t) => t.data.iter().map(|&x| f64::from(x)).collect(),
            other => panic!("an output is {other:?}"),
        }
    };
    seeds
        .map(|seed| {
            let args = micro_batch(plan, seed);
            let (mut routed_equally, mut errors, mut on_host) = (true, Vec::new(), 0);
            for f in [model, plan.grad] {
                let name = &plan.module.functions[f].name;
                let started = std::time::Instant::now();
                let want = run(&plan.module, f, args.clone());
                let cpu = started.elapsed().as_secs_f64();
                let before = exec.counts();
                let started = std::time::Instant::now();
                let got = exec.run(f, &args).unwrap_or_else(|e| panic!("{name} on the GPU: {e}"));
                let gpu = started.elapsed().as_secs_f64();
                let counts = exec.counts();
                on_host += counts.host - before.host;
                assert_eq!(got.len(), want.len(), "{name}: outputs");
                routed_equally &= loads.clone().all(|i| got[i] == want[i]);
                let error: Vec<f64> = got.iter().zip(&want).map(|(g, w)| relative_error(&reals(g), &reals(w))).collect();
                let worst = error.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("outputs");
                eprintln!(
                    "seed {seed} {name}: {} generated, {} cuBLAS, {} fused attention, {} on the host; CPU {:.0} ms, GPU (synchronised per kernel) {:.0} ms; loss GPU {:.7} CPU {:.7}; worst output {} {:.2e}",
                    counts.generated - before.generated,
                    counts.library - before.library,
                    counts.attention - before.attention,
                    counts.host - before.host,
                    cpu * 1e3,
                    gpu * 1e3,
                    reals(&got[0])[0],
                    reals(&want[0])[0],
                    worst.0,
                    worst.1
                );
                errors.push((name.clone(), error));
            }
            if !routed_equally {
                eprintln!("seed {seed}: a token routed differently");
            }
            Run { seed, routed_equally, errors, on_host }
        })
        .collect()
}

/// The tiny plan compiled with every GEMM, saved activation, dispatch and combine in f32
/// (`DSC_TEST_PLAN_F32`, default `target/plan-tiny-f32`: `dsc compile
/// models/deepseek-v3-tiny.dsc -o target/plan-tiny-f32 --set precision.gemm=f32 --set
/// precision.saved_activations=f32 --set precision.dispatch=f32 --set precision.combine=f32
/// --set precision.adam_moments=f32`), run whole on the GPU: where the routing agrees, every
/// output (losses, expert loads, gradients) matches the CPU within DESIGN.md's f32 bound, 1e-5,
/// and at least two of four seeds route equally; every kernel runs on the GPU (the grouped
/// GEMMs as a product per expert). (On the CPU, perturbing this plan's
/// parameters by 1e-7 moves its outputs by about 1e-6: the comparison is well-conditioned.)
#[test]
fn whole_f32_functions_match_the_cpu_on_the_gpu() {
    let Some((gpu, dir, plan)) = setup("DSC_TEST_PLAN_F32", "plan-tiny-f32") else { return };
    let runs = whole_functions(gpu, &dir, &plan, 1..=4);
    let mut failures = Vec::new();
    for run in runs.iter().filter(|r| r.routed_equally) {
        for (name, errors) in &run.errors {
            for (i, e) in errors.iter().enumerate().filter(|(_, e)| **e > 1e-5) {
                failures.push(format!("seed {}: {name} output {i}: error {e:.2e} > 1e-5", run.seed));
            }
        }
    }
    assert!(failures.is_empty(), "{} wrong:\n{}", failures.len(), failures.join("\n"));
    let compared = runs.iter().filter(|r| r.routed_equally).count();
    assert!(compared >= 2, "only {compared} of {} seeds routed equally on the GPU and the CPU", runs.len());
    assert!(runs.iter().all(|r| r.on_host == 0), "kernels of the f32 plan ran on the host");
}

/// The FP8 tiny plan run whole on the GPU: every output is finite, and where the routing
/// agrees (at least one of three seeds) the losses match the CPU reference's within 1e-5.
/// Its gradients are reported, not bounded: at initialisation this FP8 plan is chaotic at the
/// scale of f32 rounding (on the CPU alone, perturbing the parameters by 1e-7 moves its
/// gradients by up to 13%, since FP8 rounding turns tiny input differences into whole E4M3
/// steps), so no GPU can meet 1e-3 on them; the f32 plan above checks the executor's
/// gradients and `generated_kernels_match_the_cpu_on_the_gpu` the FP8 kernels one by one.
#[test]
fn whole_fp8_functions_match_the_cpu_loss_on_the_gpu() {
    let Some((gpu, dir, plan)) = setup("DSC_TEST_PLAN", "plan-tiny") else { return };
    let runs = whole_functions(gpu, &dir, &plan, 1..=3);
    let mut failures = Vec::new();
    for run in &runs {
        for (name, errors) in &run.errors {
            for (i, e) in errors.iter().enumerate() {
                if !e.is_finite() || (run.routed_equally && i < LOSS_OUTPUTS && *e > 1e-5) {
                    failures.push(format!("seed {}: {name} output {i}: error {e:.2e}", run.seed));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} wrong:\n{}", failures.len(), failures.join("\n"));
    assert!(runs.iter().any(|r| r.routed_equally), "no seed routed equally on the GPU and the CPU");
}

/// Two training steps of the f32 tiny plan (two micro-batches each, then AdamW) with the
/// trainer on the GPU (its state kept there), again on the GPU as the one process of a
/// data-parallel world over NCCL (the gradient sums reduce-scattered and the updated
/// parameters all-gathered through NCCL, the moments gathered for the read-back), and on the
/// CPU from the same seed: losses, gradient norms, every updated parameter and every moment
/// agree within 1e-5 (the step's first micro-batch routes equally at this seed on the H100; a
/// routing difference would show as a loss difference here too).
#[test]
fn training_steps_on_the_gpu_match_the_cpu() {
    let Some((gpu, dir, plan)) = setup("DSC_TEST_PLAN_F32", "plan-tiny-f32") else { return };
    let trainer = || Trainer::<f32>::with_graph(&plan.spec, plan.training_graph(), 3).expect("trainable");
    let (mut alone, mut joined, mut on_cpu) = (trainer(), trainer(), trainer());
    alone.set_backend(Box::new(Executor::new(plan.clone(), &dir, gpu, false).expect("the plan loads")));
    let gpu = Gpu::open().expect("the GPU, for a second executor");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a port").local_addr().expect("its address").port();
    let world = World { rank: 0, size: 1, local_rank: 0, master: format!("127.0.0.1:{port}") };
    let nccl = Rc::new(Nccl::new(&gpu, &world, Duration::from_secs(60)).expect("NCCL's communicator of one"));
    let mut executor = Executor::new(plan.clone(), &dir, gpu, false).expect("the plan loads");
    executor.join(Rc::clone(&nccl));
    joined.set_backend(Box::new(executor));
    joined.set_data_parallel(Box::new(nccl)).expect("a data-parallel world of one");
    let reals = |v: &Value<f32>| -> Vec<f64> { v.as_real().data.iter().map(|&x| f64::from(x)).collect() };
    for step in 1..=2 {
        let c = on_cpu.step().expect("a CPU step");
        for (how, on_gpu) in [("alone", &mut alone), ("over NCCL", &mut joined)] {
            let started = std::time::Instant::now();
            let g = on_gpu.step().expect("a GPU step");
            let gpu_s = started.elapsed().as_secs_f64();
            eprintln!(
                "step {step} {how}: loss GPU {:.7} CPU {:.7}, grad norm GPU {:.7} CPU {:.7}; GPU step {:.0} ms",
                g.loss,
                c.loss,
                g.grad_norm,
                c.grad_norm,
                gpu_s * 1e3
            );
            assert!(!g.skipped && !c.skipped, "step {step} skipped");
            for (what, a, b) in [("loss", g.loss, c.loss), ("grad norm", g.grad_norm, c.grad_norm)] {
                assert!((a - b).abs() <= 1e-5 * b.abs(), "step {step} {how}: {what} GPU {a} CPU {b}");
            }
            on_gpu.sync().expect("the state read back from the GPU");
            for (i, (a, b)) in on_gpu.params().iter().zip(on_cpu.params()).enumerate() {
                let error = relative_error(&reals(a), &reals(b));
                assert!(error <= 1e-5, "step {step} {how}: parameter {} differs by {error:.2e}", plan.params[i].name);
            }
            let learned = plan.params.iter().filter(|p| p.learned);
            for (((m, v), (cm, cv)), p) in on_gpu.moments().iter().zip(on_cpu.moments()).zip(learned) {
                for (which, a, b) in [("m", m, cm), ("v", v, cv)] {
                    let error = relative_error(&reals(a), &reals(b));
                    assert!(error <= 1e-5, "step {step} {how}: {which} of {} differs by {error:.2e}", p.name);
                }
            }
        }
    }
}

/// An executor the test holds while a trainer runs it (to read its counts after).
struct Held(Rc<RefCell<Executor>>);

impl Backend<f32> for Held {
    fn run(&mut self, f: usize, args: Vec<Value<f32>>) -> Result<Vec<Value<f32>>, String> {
        Backend::run(&mut *self.0.borrow_mut(), f, args)
    }

    fn resident(&mut self) -> Option<&mut dyn Resident<f32>> {
        Some(self)
    }
}

impl Resident<f32> for Held {
    fn load(&mut self, params: &[Value<f32>], moments: &[(Value<f32>, Value<f32>)]) -> Result<(), String> {
        self.0.borrow_mut().load(params, moments)
    }

    fn gradients(
        &mut self,
        f: usize,
        rest: Vec<Value<f32>>,
        grads: usize,
        first: bool,
    ) -> Result<Vec<Value<f32>>, String> {
        self.0.borrow_mut().gradients(f, rest, grads, first)
    }

    fn reduce_gradients(&mut self) -> Result<f64, String> {
        self.0.borrow_mut().reduce_gradients()
    }

    fn update(&mut self, biases: &[(usize, Value<f32>)], scalars: Vec<Value<f32>>) -> Result<(), String> {
        self.0.borrow_mut().update(biases, scalars)
    }

    fn state(&mut self) -> Result<(Vec<Value<f32>>, Moments<f32>), String> {
        self.0.borrow_mut().state()
    }
}

/// A cut-down bench plan (`DSC_TEST_PLAN_BENCH_SMALL`, default `target/plan-bench-small`: 2
/// layers of 128 tokens, two micro-batches a step; see `tests/device/build.sh`) trained three
/// steps at a constant learning rate of 3e-4 with the step's calls in CUDA graphs (captured at
/// the second step, replayed at the third), and twice launched kernel by kernel, from one
/// seed: the graphs of the gradient function (first micro-batch and the other) and of the
/// optimizer are replayed, and every step's loss and gradient norm agree with the first eager
/// run as closely as the two eager runs agree at any step (4× their largest difference over the
/// steps, at least 1e-6 relative: kernels that add with atomics may sum in another order, the
/// last bits grow step by step, and one pair of runs at one step samples their spread poorly),
/// the parameters after the third step as closely as the eager runs' (4×, per tensor). The
/// routing biases are held still (γ = 0): their sign updates would turn those last bits into
/// whole steps of γ (the tiny plans' steps check them against the CPU).
#[test]
fn the_step_replayed_from_cuda_graphs_trains_as_launched_kernels() {
    let Some((gpu, dir, plan)) = setup("DSC_TEST_PLAN_BENCH_SMALL", "plan-bench-small") else { return };
    let mut spec = plan.spec.clone();
    spec.train.lr = vec![LrPhase { shape: LrShape::Constant, end: None, to: 3e-4 }];
    for range in &mut spec.model.ffn {
        if let Ffn::Moe(moe) = &mut range.ffn {
            moe.bias_speed = Schedule::constant(0.0);
        }
    }
    let train = |executor: Executor| {
        let executor = Rc::new(RefCell::new(executor));
        let mut trainer = Trainer::<f32>::with_graph(&spec, plan.training_graph(), 7).expect("trainable");
        trainer.set_backend(Box::new(Held(Rc::clone(&executor))));
        let steps: Vec<StepMetrics> = (0..3).map(|_| trainer.step().expect("a GPU step")).collect();
        trainer.sync().expect("the state read back from the GPU");
        let counts = executor.borrow().counts();
        (steps, trainer.params().to_vec(), counts)
    };
    let executor = |gpu| Executor::new(plan.clone(), &dir, gpu, false).expect("the plan loads");
    let graphed = train(executor(gpu));
    let eager = train(executor(Gpu::open().expect("the GPU")).eager());
    let again = train(executor(Gpu::open().expect("the GPU")).eager());
    eprintln!("kernels launched and calls replayed with graphs: {:?}; eagerly: {:?}", graphed.2, eager.2);
    assert_eq!(graphed.2.graphs, 3, "the step's three graphs were not replayed once each: {:?}", graphed.2);
    assert_eq!(eager.2.graphs, 0, "an eager executor replayed graphs");
    let relative = |a: f64, b: f64| (a - b).abs() / b.abs();
    let spread = |of: fn(&StepMetrics) -> f64| {
        let largest = eager.0.iter().zip(&again.0).map(|(e, a)| relative(of(a), of(e))).fold(0.0, f64::max);
        1e-6f64.max(4.0 * largest)
    };
    let (loss_bound, norm_bound) = (spread(|m| m.loss), spread(|m| m.grad_norm));
    for (step, ((g, e), a)) in graphed.0.iter().zip(&eager.0).zip(&again.0).enumerate() {
        eprintln!(
            "step {}: loss graphs {:.9} eager {:.9} again {:.9}; grad norm graphs {:.9} eager {:.9} again {:.9}",
            step + 1,
            g.loss,
            e.loss,
            a.loss,
            g.grad_norm,
            e.grad_norm,
            a.grad_norm
        );
        assert!(!g.skipped && !e.skipped && !a.skipped, "step {} skipped", step + 1);
        for (what, g, e, bound) in
            [("loss", g.loss, e.loss, loss_bound), ("grad norm", g.grad_norm, e.grad_norm, norm_bound)]
        {
            assert!(
                relative(g, e) <= bound,
                "step {}: {what} with graphs {g}, eager {e} (bound {bound:.1e})",
                step + 1
            );
        }
    }
    let reals = |v: &Value<f32>| -> Vec<f64> { v.as_real().data.iter().map(|&x| f64::from(x)).collect() };
    let mut failures = Vec::new();
    for (i, ((g, e), a)) in graphed.1.iter().zip(&eager.1).zip(&again.1).enumerate() {
        let (e, error) = (reals(e), relative_error(&reals(g), &reals(e)));
        let bound = 1e-6f64.max(4.0 * relative_error(&reals(a), &e));
        if error > bound {
            failures.push(format!("{}: {error:.2e} (bound {bound:.2e})", plan.params[i].name));
        }
    }
    assert!(failures.is_empty(), "parameters after three steps differ:\n{}", failures.join("\n"));
}

/// A plan of pipeline stages with expert and data parallelism (`DSC_TEST_PLAN_STAGES`,
/// default `target/plan-tiny-stages`, f32: see `tests/device/build.sh`), its 4 ranks as
/// threads with their stages on the GPU, trains two steps as the same ranks interpreting the
/// plan's stage functions on the CPU: losses, gradient norms and then the parameters within
/// 1e-5 (the all-to-alls run on the host between the GPU's kernels).
#[test]
fn pipeline_stages_on_the_gpu_train_as_on_the_cpu() {
    let Some((_, dir, plan)) = setup("DSC_TEST_PLAN_STAGES", "plan-tiny-stages") else { return };
    let trainer = || Trainer::<f32>::with_graph(&plan.spec, plan.training_graph(), 3).expect("trainable");
    let (mut on_gpu, mut on_cpu) = (trainer(), trainer());
    let runners = stage::runners(plan.clone(), &dir, stage::Gpus::One(0)).expect("the plan holds stages");
    let ranks = on_gpu.on_ranks(Numerics::Policy, Here::Threads, Some((runners, "the GPU".into()))).expect("ranks");
    on_cpu.on_ranks(Numerics::Policy, Here::Threads, Some((plan_stages(&plan), "the CPU".into()))).expect("ranks");
    eprintln!("{ranks}");
    let reals = |v: &Value<f32>| -> Vec<f64> { v.as_real().data.iter().map(|&x| f64::from(x)).collect() };
    for step in 1..=2 {
        let started = std::time::Instant::now();
        let g = on_gpu.step().expect("a step with the stages on the GPU");
        let gpu_s = started.elapsed().as_secs_f64();
        let c = on_cpu.step().expect("a step on the CPU");
        eprintln!(
            "step {step} on ranks: loss GPU {:.7} CPU {:.7}, grad norm GPU {:.7} CPU {:.7}; GPU step {:.0} ms",
            g.loss,
            c.loss,
            g.grad_norm,
            c.grad_norm,
            gpu_s * 1e3
        );
        for (what, a, b) in [("loss", g.loss, c.loss), ("grad norm", g.grad_norm, c.grad_norm)] {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "step {step}: {what} GPU {a} CPU {b}");
        }
        assert_eq!((g.expert_load_max, g.expert_load_mean), (c.expert_load_max, c.expert_load_mean), "step {step}");
    }
    on_gpu.sync().expect("the moments gathered from the ranks");
    on_cpu.sync().expect("the moments gathered from the ranks");
    for (i, (a, b)) in on_gpu.params().iter().zip(on_cpu.params()).enumerate() {
        let error = relative_error(&reals(a), &reals(b));
        assert!(error <= 1e-5, "parameter {} differs by {error:.2e} after two steps", plan.params[i].name);
    }
}

/// One training step of a bench-shaped FP8 plan (`DSC_TEST_PLAN_BENCH_STEP`, default
/// `target/plan-bench-step`: `dsc compile models/deepseek-v3-bench.dsc --set model.layers=2
/// --set 'model.ffn.1.layers=1..2' --set train.seq_len=128 --set train.batch=1 --set
/// train.micro_batch=1 --set 'train.data.sources=[synthetic { weight = 1 }]' -o
/// target/plan-bench-step`: the bench model's widths, attention and experts in one dense and
/// one MoE layer (415M parameters) on 128 tokens, so that the CPU reference's step takes
/// minutes and 11 GB rather than the whole model's 24+ GB) with the trainer on the GPU as
/// `dsc train` runs it (FP8 GEMMs on cuBLASLt, the rest on TF32 tensor cores), and on the CPU
/// from the same seed.
///
/// At initialisation this FP8 step is chaotic at the scale of rounding (see the tiny FP8 test
/// above): on the CPU alone, parameters perturbed by 1e-6 of themselves move the loss by
/// 2.5e-4 and the gradient norm by 2.6e-3, by 1e-4 of themselves 5.0e-4 and 1.4e-3 (measured
/// at this seed), and cuBLASLt's FP8 products differ from the exact ones by about 1.3e-4
/// (`gpu_scaled`); the GPU's step moved them by 4.7e-4 and 3.8e-3. So the test runs
/// the CPU twice more from parameters perturbed by 1e-6 in two random directions, and holds
/// the GPU's loss and gradient norm to the larger of DESIGN.md's FP8 bound (1e-3) and 4 times
/// the farther the CPU's own moved; a wrong kernel moves them by far more. (One direction
/// alone is a noisy yardstick: across runs it moved the gradient norm by 1.6e-3 to 2.8e-2,
/// and once held the GPU to 6.4e-2 when it differed by 7.9e-2, 0.56%.) The updated parameters are held to the
/// same rule: the step's learning rate is 0, so only the routing biases move, each by ±γ on
/// the sign of its expert's load against the mean, so one token routed differently flips the
/// biases of the experts whose loads sit at the mean (the GPU's differed from the CPU's by
/// 0.44, relative, in one layer); the perturbed CPU steps show how many flip from rounding
/// alone. The three CPU steps run at once (each on every core where its work pays for threads).
#[test]
fn a_bench_training_step_on_the_gpu_matches_the_cpu() {
    let Some((gpu, dir, plan)) = setup("DSC_TEST_PLAN_BENCH_STEP", "plan-bench-step") else { return };
    let trainer = || Trainer::<f32>::with_graph(&plan.spec, plan.training_graph(), 5).expect("trainable");
    let (mut on_gpu, mut on_cpu) = (trainer(), trainer());
    let perturbations = [11, 12].map(|seed| perturbed(&on_cpu, &plan, 1e-6, seed));
    on_gpu.set_backend(Box::new(Executor::new(plan.clone(), &dir, gpu, false).expect("the plan loads")));
    let started = std::time::Instant::now();
    let g = on_gpu.step().expect("a GPU step");
    let gpu_s = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let (c, moved) = std::thread::scope(|scope| {
        let perturbed_steps: Vec<_> = perturbations
            .iter()
            .map(|start| {
                scope.spawn(|| {
                    let mut trainer =
                        Trainer::<f32>::resume(&plan.spec, plan.training_graph(), start).expect("resumed");
                    (trainer.step().expect("a perturbed CPU step"), trainer.params().to_vec())
                })
            })
            .collect();
        let c = on_cpu.step().expect("a CPU step");
        (c, perturbed_steps.into_iter().map(|s| s.join().expect("a perturbed CPU step")).collect::<Vec<_>>())
    });
    let cpu_s = started.elapsed().as_secs_f64();
    let perturbed_metrics =
        |f: fn(&StepMetrics) -> f64| moved.iter().map(|(m, _)| format!("{:.7}", f(m))).collect::<Vec<_>>();
    eprintln!(
        "loss GPU {:.7} CPU {:.7} perturbed CPU {:?}, grad norm GPU {:.7} CPU {:.7} perturbed CPU {:?}; \
         step GPU {:.1} s, the three CPU steps {:.1} s",
        g.loss,
        c.loss,
        perturbed_metrics(|m| m.loss),
        g.grad_norm,
        c.grad_norm,
        perturbed_metrics(|m| m.grad_norm),
        gpu_s,
        cpu_s
    );
    assert!(!g.skipped && !c.skipped, "skipped");
    for (what, a, b, of) in [
        ("loss", g.loss, c.loss, (|m| m.loss) as fn(&StepMetrics) -> f64),
        ("grad norm", g.grad_norm, c.grad_norm, |m: &StepMetrics| m.grad_norm),
    ] {
        let farthest = moved.iter().map(|(m, _)| (of(m) - b).abs()).fold(0.0, f64::max);
        let bound = (1e-3 * b.abs()).max(4.0 * farthest);
        assert!((a - b).abs() <= bound, "{what}: GPU {a} CPU {b} (bound {bound:.2e})");
    }
    let reals = |v: &Value<f32>| -> Vec<f64> { v.as_real().data.iter().map(|&x| f64::from(x)).collect() };
    on_gpu.sync().expect("the state read back from the GPU");
    let mut failures = Vec::new();
    let mut closest = (0.0f64, String::new());
    for (i, (a, b)) in on_gpu.params().iter().zip(on_cpu.params()).enumerate() {
        let (error, b) = (relative_error(&reals(a), &reals(b)), reals(b));
        let farthest = moved.iter().map(|(_, params)| relative_error(&reals(&params[i]), &b)).fold(0.0, f64::max);
        let bound = 1e-3f64.max(4.0 * farthest);
        let name = &plan.params[i].name;
        if error / bound >= closest.0 {
            closest = (error / bound, format!("{name} at {error:.2e} (bound {bound:.2e})"));
        }
        if error > bound {
            failures.push(format!("{name}: {error:.2e} (bound {bound:.2e})"));
        }
    }
    eprintln!("the updated parameter closest to its bound: {}", closest.1);
    assert!(failures.is_empty(), "updated parameters differ:\n{}", failures.join("\n"));
}

/// `trainer`'s state with every parameter x moved to x·(1 + size·u), u uniform in [-1, 1)
/// from the generator seeded with `seed`, and fresh moments.
fn perturbed(trainer: &Trainer<f32>, plan: &Plan, size: f64, seed: u64) -> Checkpoint {
    let record =
        SpecRecord { file: "perturbed".into(), source: String::new(), overrides: vec![], resolved: plan.spec.clone() };
    let mut state = trainer.checkpoint("policy", record);
    let mut rng = Rng::new(seed);
    for x in state.params.iter_mut().flatten() {
        *x = (f64::from(*x) * (1.0 + size * (2.0 * rng.uniform() - 1.0))) as f32;
    }
    Checkpoint { moments: None, ema: None, ..state }
}

/// The bench-shaped plan's attention and its backward (`DSC_TEST_PLAN_BENCH_STEP`, see
/// `a_bench_training_step_on_the_gpu_matches_the_cpu`; MLA's head dims 192/128, 16 heads, 128
/// positions: two blocks of rows, the diagonal and one below it) on the fused kernels
/// (`cuda::attention`), in the function's arena, on random operands: o, the log-sum-exp, dq, dk
/// and dv match the CPU reference in float64 (BF16 operands) within DESIGN.md's BF16 bound,
/// 1e-2 (the kernels also round the probabilities and dO to BF16), and a second launch gives
/// the same bits.
#[test]
fn a_bench_plans_attention_on_the_fused_kernels_matches_the_cpu() {
    use dsc_runtime::cpu::kernels::attention::{attention, attention_grad};
    use dsc_runtime::cuda::attention::FusedAttention;
    let Some((gpu, dir, plan)) = setup("DSC_TEST_PLAN_BENCH_STEP", "plan-bench-step") else { return };
    let mut fused = FusedAttention::load(&gpu, &plan, &dir).expect("loads").expect("the plan carries the kernels");
    let mut rng = Rng::new(21);
    let mut random = |shape: &[usize]| -> Tensor<f64> {
        let data = (0..shape.iter().product()).map(|_| 4.0 * rng.uniform() - 2.0).collect();
        Tensor::new(shape.to_vec(), data)
    };
    let mut checked = Vec::new();
    for (function, pf) in plan.module.functions.iter().zip(&plan.functions) {
        let layout = dsc_runtime::memory::plan(&pf.buffers);
        let packed = pf.packed_set();
        for kernel in &pf.kernels {
            let node = &function.nodes[kernel.nodes[0] as usize];
            let (Op::Attention { scale, .. } | Op::AttentionGrad { scale, .. }) = node.op else { continue };
            // Each form once, where the plan stores every part (a forward not differentiated
            // leaves its log-sum-exp unread).
            let count = if matches!(node.op, Op::Attention { .. }) { 2 } else { 3 };
            let parts: Option<Vec<u32>> =
                (0..count).map(|i| function.part(V(kernel.nodes[0]), i).map(|g| g.0)).collect();
            let Some(parts) = parts else { continue };
            if checked.contains(&node.op.name()) {
                continue;
            }
            assert!(fused.runs(function, kernel, &packed), "{} runs on the fused kernels", kernel.name);
            let arena = gpu.stream.alloc_zeros::<u8>(layout.peak as usize).expect("arena");
            let places = Places::arena(&gpu, &arena, &layout);
            let base = |v: dsc_compiler::graph::ir::V| dsc_compiler::fuse::kernels::base(function, v).0;
            // As the plan stores the value: f32, or packed bf16 (queries and keys, rounded).
            let upload = |v: u32, t: &Tensor<f64>| {
                let bytes: Vec<u8> = if packed.contains(&v) {
                    t.data.iter().flat_map(|&x| dsc_runtime::cpu::numerics::bf16_bits(x as f32).to_le_bytes()).collect()
                } else {
                    t.data.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect()
                };
                dsc_runtime::cuda::places::write(&gpu, &bytes, places.at(v)).expect("upload");
            };
            let download = |v: u32, n: usize| -> Vec<f64> {
                let bytes = dsc_runtime::cuda::places::read(&gpu, places.at(v), 4 * n).expect("download");
                bytes.chunks(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes")))).collect()
            };
            // The operands as f32 values, and the reference on those (which rounds them to BF16).
            let f32s =
                |t: Tensor<f64>| Tensor::new(t.shape.clone(), t.data.iter().map(|&x| f64::from(x as f32)).collect());
            let shape = |i: usize| function.node(node.args[i]).shape.clone();
            let (q, k, v) = (f32s(random(&shape(0))), f32s(random(&shape(1))), f32s(random(&shape(2))));
            let (o, lse) = attention(&q, &k, &v, scale, true);
            for (i, t) in [&q, &k, &v].into_iter().enumerate() {
                upload(base(node.args[i]), t);
            }
            let want: Vec<Tensor<f64>> = match node.op {
                Op::Attention { .. } => vec![o, lse],
                _ => {
                    let (o, lse, d_o) = (f32s(o), f32s(lse), f32s(random(&shape(5))));
                    for (i, t) in [(3, &o), (4, &lse), (5, &d_o)] {
                        upload(base(node.args[i]), t);
                    }
                    attention_grad(&q, &k, &v, &o, &lse, &d_o, scale, true).to_vec()
                }
            };
            fused.run(&gpu, function, kernel, &places).expect("the fused attention");
            let mut first = Vec::new();
            for (i, (&v, want)) in parts.iter().zip(&want).enumerate() {
                let got = download(v, want.data.len());
                let error = relative_error(&got, &want.data);
                eprintln!("{} part {i}: relative error {error:.2e}", node.op.name());
                assert!(error <= 1e-2, "{} part {i}: relative error {error:.2e}", node.op.name());
                // Poisoned for the second launch.
                let nan: Vec<u8> = want.data.iter().flat_map(|_| f32::NAN.to_le_bytes()).collect();
                dsc_runtime::cuda::places::write(&gpu, &nan, places.at(v)).expect("poison");
                first.push(got);
            }
            // The kernels have no atomics: a second launch gives the same bits (a difference is
            // a race or an unwritten output).
            fused.run(&gpu, function, kernel, &places).expect("the fused attention again");
            for (i, (&v, first)) in parts.iter().zip(&first).enumerate() {
                let again = download(v, first.len());
                let same = again.iter().zip(first).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{} part {i}: a second launch gave other values", node.op.name());
            }
            checked.push(node.op.name());
        }
    }
    assert_eq!(checked.len(), 2, "the plan's attention and its backward: {checked:?}");
}
