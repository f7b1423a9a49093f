//! One process training on the CPU backend: it runs the training graph's gradient function
//! for every micro-batch of a step (the whole data-parallel batch, rank after rank),
//! averages the gradients, and runs the optimizer function. Schedules (LR, batch ramp, MTP
//! weight, bias speed) come from the spec; data from the built-in synthetic corpus.

use super::init::init_params;
use super::metrics::{expert_load, StepMetrics};
use super::schedule::{batch_sequences, lr_at, scheduled, Progress};
use crate::cpu::{run, Real, Tensor, Value};
use crate::data::synthetic::SyntheticCorpus;
use dsc_compiler::graph::model::LOSS_OUTPUTS;
use dsc_compiler::graph::{Numerics, TrainingGraph};
use dsc_lang::{Schedule, Source, Spec};
use std::time::Instant;

pub struct CpuTrainer<T: Real> {
    spec: Spec,
    graph: TrainingGraph,
    /// Every parameter and buffer, in the graph's order.
    params: Vec<Value<T>>,
    /// Adam moments of the learned parameters, in order.
    moments: Vec<(Value<T>, Value<T>)>,
    progress: Progress,
    corpus: SyntheticCorpus,
}

/// The largest model the CPU trainer takes.
pub const MAX_CPU_PARAMS: u64 = 2_000_000_000;

/// Why a spec cannot be trained here.
#[derive(Debug, PartialEq)]
pub struct Unsupported(pub String);

impl<T: Real> CpuTrainer<T> {
    pub fn new(spec: &Spec, numerics: Numerics, seed: u64) -> Result<Self, Unsupported> {
        Self::with_graph(spec, TrainingGraph::build(spec, numerics), seed)
    }

    /// Trains with a given training graph, e.g. a compiled plan's fused one.
    pub fn with_graph(spec: &Spec, graph: TrainingGraph, seed: u64) -> Result<Self, Unsupported> {
        if spec.train.data.sources.iter().any(|s| !matches!(s, Source::Synthetic { .. })) {
            return Err(Unsupported(
                "this version trains on the built-in synthetic corpus only: set `train.data.sources = [synthetic {}]`"
                    .into(),
            ));
        }
        // Parameters, gradients and two moments in T, plus activations: keep to what a
        // workstation holds; the CPU backend is the reference for small models.
        let count: u64 = graph.forward.params.iter().map(|p| p.numel() as u64).sum();
        if count > MAX_CPU_PARAMS {
            return Err(Unsupported(format!(
                "`{}` has {count} parameters; the CPU backend trains models of up to {MAX_CPU_PARAMS} (try models/deepseek-v3-tiny.dsc)",
                spec.model.name
            )));
        }
        let params: Vec<Value<T>> =
            init_params(&graph.forward.params, spec.model.init_std, seed).into_iter().map(Value::real).collect();
        let moments = graph
            .forward
            .params
            .iter()
            .filter(|p| p.learned)
            .map(|p| {
                (
                    Value::real(Tensor::filled(p.shape.clone(), T::ZERO)),
                    Value::real(Tensor::filled(p.shape.clone(), T::ZERO)),
                )
            })
            .collect();
        let corpus = SyntheticCorpus::new(spec.model.vocab as usize, seed);
        Ok(CpuTrainer { spec: spec.clone(), graph, params, moments, progress: Progress::default(), corpus })
    }

    pub fn graph(&self) -> &TrainingGraph {
        &self.graph
    }

    pub fn params(&self) -> &[Value<T>] {
        &self.params
    }

    /// Runs one optimizer step and reports it.
    pub fn step(&mut self) -> StepMetrics {
        let started = Instant::now();
        let spec = &self.spec;
        let train = &spec.train;
        let granularity = spec.parallel.data.size * train.micro_batch;
        let sequences = batch_sequences(train, granularity, self.progress.tokens);
        let micro_batches = (sequences / train.micro_batch) as usize;
        let mtp_weight = spec.model.mtp.as_ref().map_or(0.0, |m| scheduled(&m.loss_weight, self.progress));
        let depth = spec.model.mtp.as_ref().map_or(0, |m| m.depth as usize);
        let module = self.graph.module();
        let n_params = self.params.len();
        let mut grads: Vec<Option<Vec<T>>> = vec![None; n_params];
        let mut losses = [0.0f64; LOSS_OUTPUTS];
        let mut loads: Vec<Vec<f64>> = Vec::new();
        for _ in 0..micro_batches {
            let batch = self.corpus.batch(train.micro_batch as usize, train.seq_len as usize + depth);
            let tokens =
                Tensor::new(vec![batch.sequences, batch.seq_len + 1], batch.tokens.iter().map(|&t| t as i32).collect());
            let mut args = self.params.clone();
            args.push(Value::int(tokens));
            args.push(Value::real(Tensor::scalar(T::from_f64(mtp_weight))));
            let out = run(module, self.graph.grad, args);
            for (total, value) in losses.iter_mut().zip(&out) {
                *total += value.scalar().to_f64() / micro_batches as f64;
            }
            let n_loads = self.graph.forward.moe_biases.len();
            let layer_loads = &out[LOSS_OUTPUTS..LOSS_OUTPUTS + n_loads];
            loads.resize(n_loads, Vec::new());
            for (sum, load) in loads.iter_mut().zip(layer_loads) {
                let load = &load.as_real().data;
                sum.resize(load.len(), 0.0);
                for (s, l) in sum.iter_mut().zip(load) {
                    *s += l.to_f64();
                }
            }
            let param_grads = &out[LOSS_OUTPUTS + n_loads..LOSS_OUTPUTS + n_loads + n_params];
            for (acc, g) in grads.iter_mut().zip(param_grads) {
                let g = &g.as_real().data;
                match acc {
                    Some(acc) => acc.iter_mut().zip(g).for_each(|(a, x)| *a += *x),
                    None => *acc = Some(g.clone()),
                }
            }
        }
        let lr = lr_at(train, self.progress);
        let bias_speed = self.bias_speed();
        let step_tokens = sequences * train.seq_len;
        let grad_norm = self.apply_optimizer(grads, &loads, micro_batches, lr, bias_speed);
        self.progress = Progress { step: self.progress.step + 1, tokens: self.progress.tokens + step_tokens };
        let counts: Vec<Vec<u64>> = loads.iter().map(|l| l.iter().map(|&x| x.round() as u64).collect()).collect();
        let load = expert_load(&counts);
        let elapsed = started.elapsed().as_secs_f64();
        StepMetrics {
            step: self.progress.step,
            loss: losses[1],
            mtp_loss: losses[2],
            balance_loss: losses[3],
            lr,
            grad_norm,
            tokens: step_tokens,
            tokens_per_s: step_tokens as f64 / elapsed.max(1e-9),
            expert_load_max: load.max,
            expert_load_mean: load.mean,
            mtp_weight,
            bias_speed,
        }
    }

    /// The routing-bias speed now (all MoE ranges share the schedule of the first).
    fn bias_speed(&self) -> f64 {
        let first_moe: Option<&Schedule> = self.spec.model.ffn.iter().find_map(|r| match &r.ffn {
            dsc_lang::Ffn::Moe(m) => Some(&m.bias_speed),
            dsc_lang::Ffn::Dense { .. } => None,
        });
        first_moe.map_or(0.0, |s| scheduled(s, self.progress))
    }

    /// Averages the summed gradients, runs the optimizer function and stores its results;
    /// returns the gradient norm before clipping.
    fn apply_optimizer(
        &mut self,
        grads: Vec<Option<Vec<T>>>,
        loads: &[Vec<f64>],
        micro_batches: usize,
        lr: f64,
        bias_speed: f64,
    ) -> f64 {
        let info = &self.graph.forward.params;
        let scale = T::from_f64(1.0 / micro_batches as f64);
        let t = (self.progress.step + 1) as i32;
        let opt = &self.spec.train.optimizer;
        let mut args = Vec::new();
        let mut learned = Vec::new();
        for (i, (p, g)) in info.iter().zip(grads).enumerate() {
            if !p.learned {
                continue;
            }
            let g: Vec<T> = g.expect("a gradient per parameter").into_iter().map(|x| x * scale).collect();
            let (m, v) = &self.moments[learned.len()];
            args.extend([self.params[i].clone(), Value::real(Tensor::new(p.shape.clone(), g)), m.clone(), v.clone()]);
            learned.push(i);
        }
        for (&b, load) in self.graph.forward.moe_biases.iter().zip(loads) {
            args.push(self.params[b].clone());
            args.push(Value::real(Tensor::new(info[b].shape.clone(), load.iter().map(|&x| T::from_f64(x)).collect())));
        }
        for x in [lr, 1.0 - opt.beta1.powi(t), 1.0 - opt.beta2.powi(t), bias_speed] {
            args.push(Value::real(Tensor::scalar(T::from_f64(x))));
        }
        let mut out = run(self.graph.module(), self.graph.optimizer, args).into_iter();
        for (slot, &i) in learned.iter().enumerate() {
            self.params[i] = out.next().expect("param'");
            let m = out.next().expect("m'");
            let v = out.next().expect("v'");
            self.moments[slot] = (m, v);
        }
        for &b in &self.graph.forward.moe_biases {
            self.params[b] = out.next().expect("bias'");
        }
        out.next().expect("grad_norm").scalar().to_f64()
    }
}
