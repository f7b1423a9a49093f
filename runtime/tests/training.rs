//! Training the tiny model on the CPU: the same seed gives bitwise the same losses; 200 steps
//! take the loss far below ln(vocab); and the FP8 policy stays close to exact f32 training
//! on the same seed (the figures are printed: `cargo test --test training -- --nocapture`).

use dsc_compiler::graph::Numerics;
use dsc_runtime::train::Trainer;

fn tiny() -> dsc_lang::Spec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
    dsc_lang::load(&path, &[]).checked_spec().expect("tiny spec").clone()
}

fn losses(numerics: Numerics, seed: u64, steps: usize) -> Vec<f64> {
    let mut trainer = Trainer::<f32>::new(&tiny(), numerics, seed).expect("trainable");
    (0..steps).map(|_| trainer.step().expect("one rank").loss).collect()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn the_same_seed_gives_bitwise_the_same_losses() {
    let a = losses(Numerics::Policy, 7, 3);
    let b = losses(Numerics::Policy, 7, 3);
    assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    assert_ne!(a, losses(Numerics::Policy, 8, 3));
}

#[test]
fn two_hundred_steps_learn_and_fp8_tracks_f32() {
    let spec = tiny();
    let ln_vocab = (spec.model.vocab as f64).ln();
    let (exact, fp8) = std::thread::scope(|s| {
        let exact = s.spawn(|| losses(Numerics::Exact, 0, 200));
        let fp8 = s.spawn(|| losses(Numerics::Policy, 0, 200));
        (exact.join().expect("exact run"), fp8.join().expect("fp8 run"))
    });
    let (exact_end, fp8_end) = (mean(&exact[190..]), mean(&fp8[190..]));
    let gap = (fp8_end - exact_end).abs() / exact_end;
    eprintln!(
        "tiny, 200 steps: ln(vocab) {ln_vocab:.4}; f32 loss {:.4} → {:.4} (step 200: {:.4}); FP8 policy → {:.4} (step 200: {:.4}); relative gap over steps 191–200 {:.3}%",
        exact[0],
        exact_end,
        exact[199],
        fp8_end,
        fp8[199],
        100.0 * gap
    );
    assert!((exact[0] - ln_vocab).abs() < 0.1, "an untrained model is near-uniform");
    assert!(exact_end < 0.5 * ln_vocab, "f32 training reached only {exact_end}");
    assert!(fp8_end < 0.5 * ln_vocab, "FP8 training reached only {fp8_end}");
    assert!(gap < 0.01, "FP8 and f32 differ by {:.3}%", 100.0 * gap);
}

#[test]
fn a_missing_data_folder_is_refused_with_a_clear_message() {
    let mut spec = tiny();
    spec.train.data.sources = vec![dsc_lang::Source::Files { path: "data/x".into(), weight: 1.0 }];
    let err = Trainer::<f32>::new(&spec, Numerics::Policy, 0).err().expect("refused");
    assert!(err.0.contains("data/x") && err.0.contains("dsc data prepare"), "{}", err.0);
}

#[test]
fn a_step_with_non_finite_gradients_changes_nothing() {
    let mut spec = tiny();
    spec.train.seq_len = 16;
    spec.train.lr = vec![dsc_lang::LrPhase { shape: dsc_lang::LrShape::Constant, end: None, to: 1e30 }];
    let mut trainer = Trainer::<f32>::new(&spec, Numerics::Policy, 0).expect("trainable");
    let first = trainer.step().expect("one rank");
    assert!(!first.skipped, "the first step has finite gradients");
    let before = (trainer.params().to_vec(), trainer.progress());
    let second = trainer.step().expect("one rank");
    assert!(second.skipped, "weights of ~1e30 overflow: {second:?}");
    assert_eq!((trainer.params().to_vec(), trainer.progress()), before, "a skipped step changed the state");
    assert_eq!(second.step, first.step);
}

#[test]
fn the_ema_follows_the_parameters_and_comes_back_from_a_checkpoint() {
    let mut spec = tiny();
    spec.train.seq_len = 16;
    spec.precision.ema = Some(dsc_lang::Ema { decay: 0.75 });
    let mut trainer = Trainer::<f32>::new(&spec, Numerics::Policy, 0).expect("trainable");
    let f32s = |t: &Trainer<f32>| -> Vec<Vec<f32>> { t.params().iter().map(|p| p.as_real().data.clone()).collect() };
    let mut expected = f32s(&trainer);
    for _ in 0..3 {
        trainer.step().expect("one rank");
        for (e, p) in expected.iter_mut().zip(f32s(&trainer)) {
            for (x, y) in e.iter_mut().zip(p) {
                *x = (0.75 * f64::from(*x) + 0.25 * f64::from(y)) as f32;
            }
        }
    }
    let record = dsc_runtime::checkpoint::SpecRecord {
        file: "tiny".into(),
        source: String::new(),
        overrides: vec![],
        resolved: spec.clone(),
    };
    let saved = trainer.checkpoint("policy", record);
    assert_eq!(saved.ema.as_ref(), Some(&expected));
    let graph = dsc_compiler::graph::TrainingGraph::build(&spec, Numerics::Policy);
    let resumed = Trainer::<f32>::resume(&spec, graph, &saved).expect("resume");
    let again = resumed.checkpoint("policy", saved.meta.spec.clone());
    assert_eq!(again.ema, saved.ema, "the EMA comes back from the checkpoint");
}

/// Data-parallel replicas as threads of this test, summing through shared memory: what NCCL
/// does for processes (`cuda::nccl`), so that the trainer's side of it is checked in CI.
struct SharedSum {
    rank: usize,
    size: usize,
    state: std::sync::Arc<(std::sync::Mutex<Vec<f64>>, std::sync::Barrier)>,
}

impl dsc_runtime::train::DataParallel for SharedSum {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn sum(&mut self, data: &mut [f64]) -> Result<(), String> {
        let (total, barrier) = &*self.state;
        {
            let mut total = total.lock().expect("sum");
            total.resize(data.len(), 0.0);
            total.iter_mut().zip(data.iter()).for_each(|(t, x)| *t += x);
        }
        barrier.wait();
        data.copy_from_slice(&total.lock().expect("sum"));
        if barrier.wait().is_leader() {
            total.lock().expect("sum").clear();
        }
        barrier.wait();
        Ok(())
    }
}

/// Two data-parallel processes (each computing half of a step's micro-batches, then summing)
/// train like one process computing the whole step, within f32 reassociation; the plan must
/// be data parallelism over as many processes.
#[test]
fn data_parallel_processes_train_like_one() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
    let overrides = ["parallel.gpus_per_node=2".to_string(), "parallel.data={ size = 2 }".to_string()];
    let spec = dsc_lang::load(&path, &overrides).checked_spec().expect("DP 2").clone();
    let mut whole = Trainer::<f32>::new(&spec, Numerics::Policy, 3).expect("trainable");
    let reference: Vec<f64> = (0..4).map(|_| whole.step().expect("one process").loss).collect();
    let state = std::sync::Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Barrier::new(2)));
    let replicas: Vec<Vec<f64>> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..2)
            .map(|rank| {
                let (spec, state) = (spec.clone(), state.clone());
                s.spawn(move || {
                    let mut trainer = Trainer::<f32>::new(&spec, Numerics::Policy, 3).expect("trainable");
                    trainer.set_data_parallel(Box::new(SharedSum { rank, size: 2, state })).expect("DP 2 plan");
                    (0..4).map(|_| trainer.step().expect("replica").loss).collect()
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().expect("replica thread")).collect()
    });
    for losses in &replicas {
        for (step, (got, want)) in losses.iter().zip(&reference).enumerate() {
            assert!((got - want).abs() <= 1e-5 * want.abs(), "step {step}: {got} vs one process {want}");
        }
    }
    assert_eq!(replicas[0], replicas[1], "the replicas agree exactly");
    let mut one = Trainer::<f32>::new(&tiny(), Numerics::Policy, 3).expect("trainable");
    let state = std::sync::Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Barrier::new(2)));
    let refused = one.set_data_parallel(Box::new(SharedSum { rank: 0, size: 2, state })).expect_err("plan of 1");
    assert!(refused.0.contains("set `parallel.data.size` to 2"), "{}", refused.0);
}
