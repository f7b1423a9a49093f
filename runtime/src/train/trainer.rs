//! One process training on a [`Backend`] (the CPU reference unless told otherwise): it runs the training graph's gradient function
//! for every micro-batch of a step (the whole data-parallel batch, rank after rank, each rank
//! reading its own shard of the data), averages the gradients, and runs the optimizer
//! function. Schedules (LR, batch ramp, MTP weight, bias speed) come from the spec; data from
//! the [`DataLoader`]. A step whose loss or gradients are not finite is skipped: the parameters,
//! moments and progress stay as they were, and the step reports `skipped`. The whole state
//! goes into a [`Checkpoint`] and comes back from one exactly.

use super::backend::{Backend, Cpu, DataParallel, Moments};
use super::ema::Ema;
use super::graph_stage::{MicroBatch, Runners};
use super::init::init_params;
use super::metrics::{expert_load, resident_memory, StepMetrics};
use super::parallel::{Here, Ranks};
use super::schedule::{batch_sequences, lr_at, scheduled, Progress};
use crate::checkpoint::{Checkpoint, SpecRecord, StateMeta};
use crate::cpu::{Real, Tensor, Value};
use crate::data::loader::{DataLoader, Position};
use dsc_compiler::graph::model::LOSS_OUTPUTS;
use dsc_compiler::graph::{Numerics, TrainingGraph};
use dsc_lang::{Schedule, Spec};
use std::time::Instant;

pub struct Trainer<T: Real> {
    spec: Spec,
    graph: TrainingGraph,
    /// Every parameter and buffer, in the graph's order.
    params: Vec<Value<T>>,
    /// Adam moments of the learned parameters, in order.
    moments: Moments<T>,
    progress: Progress,
    seed: u64,
    data: DataLoader,
    /// Training FLOPs per token (`dsc info`'s), for the achieved FLOP/s.
    flops_per_token: f64,
    /// The parameters' EMA, when the spec keeps one.
    ema: Option<Ema<T>>,
    /// The ranks that run the steps, when the parallel plan spreads them.
    ranks: Option<Ranks>,
    /// What runs the graph's functions on one rank.
    backend: Box<dyn Backend<T>>,
    /// The other processes' replicas, when this one is a data-parallel rank of several.
    replicas: Option<Box<dyn DataParallel>>,
    /// Where the training state is: whether the backend keeps it ([`Resident`]), and whether
    /// `params` and `moments` here are up to date.
    state: State,
}

/// What a step did: its mean losses, the tokens per expert of each MoE block, the gradient
/// norm (before clipping), and whether it was finite (else the optimizer was skipped).
struct Update {
    losses: [f64; LOSS_OUTPUTS],
    loads: Vec<Vec<f64>>,
    grad_norm: f64,
    finite: bool,
}

/// What a step runs on: its micro-batches, and the schedules' values at it (λ, the learning
/// rate, the routing-bias speed).
struct StepInputs {
    batches: Vec<MicroBatch>,
    mtp_weight: f64,
    lr: f64,
    bias_speed: f64,
}

/// Where a trainer's parameters and moments are.
#[derive(Clone, Copy, Debug, PartialEq)]
struct State {
    on_backend: bool,
    host_current: bool,
}

/// The largest model the trainer takes (parameters, gradients and moments live on the host).
pub const MAX_CPU_PARAMS: u64 = 2_000_000_000;

/// Why a spec cannot be trained here (or a checkpoint not resumed).
#[derive(Debug, PartialEq)]
pub struct Unsupported(pub String);

impl<T: Real> Trainer<T> {
    pub fn new(spec: &Spec, numerics: Numerics, seed: u64) -> Result<Self, Unsupported> {
        Self::with_graph(spec, TrainingGraph::build(spec, numerics), seed)
    }

    /// Trains with a given training graph, e.g. a compiled plan's fused one.
    pub fn with_graph(spec: &Spec, graph: TrainingGraph, seed: u64) -> Result<Self, Unsupported> {
        check_size(spec, &graph)?;
        let data = DataLoader::new(spec, seed, data_ranks(spec)).map_err(Unsupported)?;
        let params: Vec<Value<T>> =
            init_params(&graph.forward.params, spec.model.init_std, seed).into_iter().map(Value::real).collect();
        let moments = zero_moments(&graph);
        Ok(Self::assemble(spec, graph, data, (params, moments), Progress::default(), seed, None))
    }

    /// Continues training from a checkpoint of this spec and graph.
    pub fn resume(spec: &Spec, graph: TrainingGraph, checkpoint: &Checkpoint) -> Result<Self, Unsupported> {
        check_size(spec, &graph)?;
        let meta = &checkpoint.meta;
        let ranks = data_ranks(spec);
        let data = match &meta.data {
            Some(position) => {
                let position: Position = serde_json::from_value(position.clone())
                    .map_err(|e| Unsupported(format!("the checkpoint's data position is not valid ({e})")))?;
                DataLoader::resume(spec, meta.seed, ranks, position)
            }
            None => DataLoader::new(spec, meta.seed, ranks),
        }
        .map_err(Unsupported)?;
        let info = &graph.forward.params;
        if checkpoint.params.len() != info.len()
            || info.iter().zip(&checkpoint.params).any(|(p, v)| p.numel() != v.len())
        {
            return Err(Unsupported("the checkpoint's parameters do not fit the model".into()));
        }
        let params: Vec<Value<T>> = info.iter().zip(&checkpoint.params).map(|(p, v)| from_f32s(&p.shape, v)).collect();
        let moments = match &checkpoint.moments {
            Some(moments) => info
                .iter()
                .filter(|p| p.learned)
                .zip(moments)
                .map(|(p, [m, v])| (from_f32s(&p.shape, m), from_f32s(&p.shape, v)))
                .collect(),
            None => zero_moments(&graph),
        };
        let progress = Progress { step: meta.step, tokens: meta.tokens };
        Ok(Self::assemble(spec, graph, data, (params, moments), progress, meta.seed, checkpoint.ema.clone()))
    }

    /// A trainer on the CPU backend from its state (parameters and moments), progress and
    /// data position; the EMA starts from `ema` or the parameters.
    fn assemble(
        spec: &Spec,
        graph: TrainingGraph,
        data: DataLoader,
        (params, moments): (Vec<Value<T>>, Moments<T>),
        progress: Progress,
        seed: u64,
        ema: Option<Vec<Vec<f32>>>,
    ) -> Self {
        Trainer {
            spec: spec.clone(),
            ema: start_ema(spec, &params, ema),
            params,
            moments,
            progress,
            seed,
            data,
            flops_per_token: flops_per_token(spec),
            ranks: None,
            backend: Box::new(Cpu(graph.module().clone())),
            replicas: None,
            state: State { on_backend: false, host_current: true },
            graph,
        }
    }

    /// The whole training state, for a checkpoint; `numerics` and `spec` identify the run.
    pub fn checkpoint(&self, numerics: &str, spec: SpecRecord) -> Checkpoint {
        assert!(self.state.host_current, "the backend keeps the state: call `sync` first");
        Checkpoint {
            params: self.params.iter().map(f32s).collect(),
            moments: Some(self.moments.iter().map(|(m, v)| [f32s(m), f32s(v)]).collect()),
            ema: self.ema.as_ref().map(Ema::snapshot),
            meta: StateMeta {
                step: self.progress.step,
                tokens: self.progress.tokens,
                seed: self.seed,
                numerics: numerics.to_string(),
                data: serde_json::to_value(self.data.position()).ok(),
                spec,
            },
        }
    }

    pub fn graph(&self) -> &TrainingGraph {
        &self.graph
    }

    /// The parameters (after [`Trainer::sync`] when a backend keeps them).
    pub fn params(&self) -> &[Value<T>] {
        assert!(self.state.host_current, "the backend keeps the parameters: call `sync` first");
        &self.params
    }

    /// Adam's moments of the learned parameters (after [`Trainer::sync`] when a backend or
    /// the ranks keep them).
    pub fn moments(&self) -> &Moments<T> {
        assert!(self.state.host_current, "the moments are elsewhere: call `sync` first");
        &self.moments
    }

    /// Brings the parameters and moments back from a backend that keeps them (see
    /// [`super::Resident`]), or the moments from the ranks' ZeRO-1 shards (across processes, a
    /// collective every process must call); nothing to do otherwise.
    pub fn sync(&mut self) -> Result<(), StepError> {
        if self.state.host_current {
            return Ok(());
        }
        match &self.ranks {
            Some(ranks) => {
                let learned = self.graph.forward.params.iter().filter(|p| p.learned);
                let moments = ranks.moments()?.into_iter().zip(learned);
                self.moments = moments.map(|([m, v], p)| (from_f32s(&p.shape, &m), from_f32s(&p.shape, &v))).collect();
            }
            None => {
                let resident = self.backend.resident().expect("a backend keeping the state");
                (self.params, self.moments) = resident.state().map_err(StepError)?;
            }
        }
        self.state.host_current = true;
        Ok(())
    }

    /// Whether the optimizer state is sharded over ranks, or over data-parallel processes
    /// whose backends keep it (then [`Trainer::sync`] gathers it, across processes a
    /// collective).
    pub fn shards_state(&self) -> bool {
        self.ranks.is_some() || (self.replicas.is_some() && self.state.on_backend)
    }

    /// Whether `flag` is set in any process of a multi-process run (in this one otherwise): a
    /// collective every process calls at the same point, so that they agree, e.g. to stop.
    pub fn any_process(&mut self, flag: bool) -> Result<bool, StepError> {
        match (&self.ranks, &mut self.replicas) {
            (Some(ranks), _) => ranks.any(flag),
            (None, Some(replicas)) => {
                let mut sum = [f64::from(u8::from(flag))];
                replicas.sum(&mut sum).map_err(StepError)?;
                Ok(sum[0] > 0.0)
            }
            (None, None) => Ok(flag),
        }
    }

    /// Optimizer steps done and tokens seen.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// Runs the steps on the ranks of the spec's parallel plan (pipeline stages, expert and
    /// data parallelism), `here` (threads of this process, or this process as one of them),
    /// rather than micro-batch after micro-batch on this thread; describes the ranks.
    /// Their optimizers take the moments over (sharded: see [`Trainer::sync`]). `runners`
    /// (with where they run, in words) run the stages' functions, by default the CPU.
    pub fn on_ranks(
        &mut self,
        numerics: Numerics,
        here: Here,
        runners: Option<(Runners, String)>,
    ) -> Result<String, Unsupported> {
        assert!(self.state.host_current, "the backend keeps the state: call `sync` first");
        let forward = &self.graph.forward;
        let moments = self.moments.iter().map(|(m, v)| [f32s(m), f32s(v)]).collect();
        let params = (&forward.params[..], &forward.moe_biases[..]);
        let ranks = Ranks::new(&self.spec, numerics, params, &moments, here, runners)?;
        let description = ranks.to_string();
        self.ranks = Some(ranks);
        // The ranks hold the moments now, each its shard.
        self.moments = Vec::new();
        self.state.host_current = false;
        Ok(description)
    }

    /// Makes this trainer one data-parallel process of several (`replicas`): each step it
    /// computes its share of the micro-batches and sums the step's sums with the others. The
    /// spec's plan must be data parallelism alone, over as many processes.
    pub fn set_data_parallel(&mut self, replicas: Box<dyn DataParallel>) -> Result<(), Unsupported> {
        let par = &self.spec.parallel;
        if dsc_compiler::plan::has_stages(&self.spec) {
            return Err(Unsupported(
                "the ranks of a pipeline or of expert parallelism run their stages (`Trainer::on_ranks`), not the whole model's gradient".into(),
            ));
        }
        if par.data.size as usize != replicas.size() {
            return Err(Unsupported(format!(
                "the spec's plan has {} data-parallel replicas but the launcher started {} processes: set `parallel.data.size` to {}",
                par.data.size,
                replicas.size(),
                replicas.size()
            )));
        }
        self.replicas = Some(replicas);
        Ok(())
    }

    /// Where the backend's time went, if it was asked to measure that.
    pub fn backend_profile(&self) -> Option<String> {
        self.backend.profile()
    }

    /// Runs the graph's functions on `backend` from now on (it must run this trainer's graph;
    /// thread-ranks, when set, run on the CPU).
    pub fn set_backend(&mut self, backend: Box<dyn Backend<T>>) {
        assert!(self.state.host_current, "the old backend keeps the state: call `sync` first");
        self.backend = backend;
        self.state.on_backend = false;
    }

    /// Runs one optimizer step and reports it. On thread-ranks a step fails when a rank does
    /// (or the step's micro-batches do not fit the schedule).
    pub fn step(&mut self) -> Result<StepMetrics, StepError> {
        let started = Instant::now();
        let spec = &self.spec;
        let train = &spec.train;
        let granularity = spec.parallel.data.size * train.micro_batch;
        let sequences = batch_sequences(train, granularity, self.progress.tokens);
        let micro_batches = (sequences / train.micro_batch) as usize;
        let mtp_weight = spec.model.mtp.as_ref().map_or(0.0, |m| scheduled(&m.loss_weight, self.progress));
        let depth = spec.model.mtp.as_ref().map_or(0, |m| m.depth as usize);
        let per_rank = micro_batches.div_ceil(data_ranks(spec));
        let batches: Vec<MicroBatch> = (0..micro_batches)
            .map(|micro_batch| {
                let rank = micro_batch / per_rank;
                let batch = self.data.batch(rank, train.micro_batch as usize, train.seq_len as usize + depth);
                let shape = vec![batch.sequences, batch.seq_len + 1];
                let tokens = batch.tokens.iter().map(|&t| t as i32).collect();
                let loss_mask = batch.loss_mask.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
                (Tensor::new(shape.clone(), tokens), Tensor::new(shape, loss_mask))
            })
            .collect();
        let lr = lr_at(train, self.progress);
        let bias_speed = self.bias_speed();
        let step_tokens = sequences * train.seq_len;
        let inputs = StepInputs { batches, mtp_weight, lr, bias_speed };
        let Update { losses, loads, grad_norm, finite } = if self.ranks.is_some() {
            self.ranks_step(inputs)?
        } else if self.ema.is_none() && self.backend.resident().is_some() {
            self.resident_step(inputs)?
        } else {
            self.host_step(inputs)?
        };
        if finite {
            self.progress = Progress { step: self.progress.step + 1, tokens: self.progress.tokens + step_tokens };
        }
        let counts: Vec<Vec<u64>> = loads.iter().map(|l| l.iter().map(|&x| x.round() as u64).collect()).collect();
        let load = expert_load(&counts);
        let elapsed = started.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: self.progress.step,
            skipped: !finite,
            loss: losses[1],
            mtp_loss: losses[2],
            balance_loss: losses[3],
            lr,
            grad_norm,
            tokens: self.progress.tokens,
            tokens_per_s: step_tokens as f64 / elapsed.max(1e-9),
            flops_per_s: step_tokens as f64 * self.flops_per_token / elapsed.max(1e-9),
            mfu: None,
            memory_bytes: resident_memory(),
            expert_load_max: load.max,
            expert_load_mean: load.mean,
            mtp_weight,
            bias_speed,
        })
    }

    /// This process's share of a step's `batches` (all of them without data-parallel
    /// processes). Every process reads the whole step's data, so that the loader's position
    /// is the same everywhere.
    fn own_batches(&self, batches: Vec<MicroBatch>) -> Result<Vec<MicroBatch>, StepError> {
        let Some(replicas) = &self.replicas else { return Ok(batches) };
        let micro_batches = batches.len();
        if !micro_batches.is_multiple_of(replicas.size()) {
            return Err(StepError(format!(
                "{micro_batches} micro-batches do not share evenly over {} data-parallel processes",
                replicas.size()
            )));
        }
        let per_rank = micro_batches.div_ceil(data_ranks(&self.spec));
        let rank = replicas.rank();
        Ok(batches.into_iter().enumerate().filter(|(i, _)| i / per_rank == rank).map(|(_, b)| b).collect())
    }

    /// A step on host values: this process's gradient sums (added up with its data-parallel
    /// replicas'), then the optimizer when they are finite.
    fn host_step(
        &mut self,
        StepInputs { batches, mtp_weight, lr, bias_speed }: StepInputs,
    ) -> Result<Update, StepError> {
        let micro_batches = batches.len();
        let mine = self.own_batches(batches)?;
        let StepSums { losses, loads, grads } =
            one_rank_sums(&self.graph, &self.params, self.backend.as_mut(), mine, mtp_weight)?;
        let (losses, loads, grads) = match &mut self.replicas {
            Some(replicas) => sum_over((losses, loads, grads), |flat| replicas.sum(flat))?,
            None => (losses, loads, grads),
        };
        let losses = losses.map(|loss| loss / micro_batches as f64);
        let square_sum: f64 = grads.iter().flatten().map(|g| g.to_f64() * g.to_f64()).sum();
        let grad_norm = square_sum.sqrt() / micro_batches as f64;
        let finite = grad_norm.is_finite() && losses.iter().all(|l| l.is_finite());
        if finite {
            self.apply_optimizer(grads, &loads, [lr, bias_speed, grad_norm], micro_batches)?;
            if let Some(ema) = &self.ema {
                ema.update(self.params.clone());
            }
        }
        Ok(Update { losses, loads, grad_norm, finite })
    }

    /// A step on the ranks of the parallel plan, whose ZeRO-1 shards update the parameters;
    /// the routing biases move here.
    fn ranks_step(
        &mut self,
        StepInputs { batches, mtp_weight, lr, bias_speed }: StepInputs,
    ) -> Result<Update, StepError> {
        let micro_batches = batches.len();
        let ranks = self.ranks.as_ref().expect("on ranks");
        let (spec, progress) = (&self.spec, self.progress);
        let scalars = |grad_norm: f64| optimizer_scalars(spec, progress, [lr, bias_speed, grad_norm], micro_batches);
        let step = ranks.step(&self.params, batches, mtp_weight as f32, &scalars)?;
        let losses = step.losses.map(|loss| loss / micro_batches as f64);
        let grad_norm = step.end.square_sum.sqrt() / micro_batches as f64;
        if step.end.updated {
            let info = &self.graph.forward.params;
            for ((param, p), data) in self.params.iter_mut().zip(info).zip(step.params) {
                if p.learned {
                    *param = Value::real(Tensor::new(p.shape.clone(), data));
                }
            }
            ranks.move_biases(
                &mut self.params,
                &step.loads,
                optimizer_scalars(spec, progress, [lr, bias_speed, grad_norm], micro_batches),
            );
            if let Some(ema) = &self.ema {
                ema.update(self.params.clone());
            }
            // The moments gathered for a checkpoint are out of date.
            self.moments = Vec::new();
            self.state.host_current = false;
        }
        Ok(Update { losses, loads: step.loads, grad_norm, finite: step.end.updated })
    }

    /// A step on a backend keeping the state: the state handed over first if it is not there
    /// yet, then per micro-batch of this process its gradients summed there, summed over the
    /// processes there, then the update there; only the batches, losses, loads and scalars
    /// cross (summed over the processes on the host).
    fn resident_step(
        &mut self,
        StepInputs { batches, mtp_weight, lr, bias_speed }: StepInputs,
    ) -> Result<Update, StepError> {
        let micro_batches = batches.len();
        let mine = self.own_batches(batches)?;
        let info = &self.graph.forward.params;
        let biases = &self.graph.forward.moe_biases;
        let grads_at = LOSS_OUTPUTS + biases.len();
        let backend = self.backend.resident().expect("a backend keeping the state");
        if !self.state.on_backend {
            backend.load(&self.params, &self.moments).map_err(StepError)?;
            self.state.on_backend = true;
        }
        let (mut losses, mut loads) = ([0.0; LOSS_OUTPUTS], Vec::new());
        for (i, (tokens, loss_mask)) in mine.into_iter().enumerate() {
            let mask = loss_mask.data.iter().map(|&m| T::from_f64(f64::from(m))).collect();
            let rest = vec![
                Value::int(tokens),
                Value::real(Tensor::new(loss_mask.shape, mask)),
                Value::real(Tensor::scalar(T::from_f64(mtp_weight))),
            ];
            let out = backend.gradients(self.graph.grad, rest, grads_at, i == 0).map_err(StepError)?;
            for (total, value) in losses.iter_mut().zip(&out) {
                *total += value.scalar().to_f64();
            }
            let layer_loads = &out[LOSS_OUTPUTS..grads_at];
            add_loads(&mut loads, layer_loads.iter().map(|l| l.as_real().data.iter().map(|x| x.to_f64()).collect()));
        }
        let square_sum = vec![vec![backend.reduce_gradients().map_err(StepError)?]];
        let (losses, loads, square_sum) = match &mut self.replicas {
            Some(replicas) => sum_over::<f64>((losses, loads, square_sum), |flat| replicas.sum(flat))?,
            None => (losses, loads, square_sum),
        };
        let losses = losses.map(|loss| loss / micro_batches as f64);
        let grad_norm = square_sum[0][0].sqrt() / micro_batches as f64;
        let finite = grad_norm.is_finite() && losses.iter().all(|l| l.is_finite());
        if !finite {
            return Ok(Update { losses, loads, grad_norm, finite });
        }
        let bias_loads: Vec<(usize, Value<T>)> = biases
            .iter()
            .zip(&loads)
            .map(|(&b, load)| {
                (b, Value::real(Tensor::new(info[b].shape.clone(), load.iter().map(|&x| T::from_f64(x)).collect())))
            })
            .collect();
        let scalars = optimizer_scalars(&self.spec, self.progress, [lr, bias_speed, grad_norm], micro_batches);
        backend.update(&bias_loads, scalars).map_err(StepError)?;
        self.state.host_current = false;
        Ok(Update { losses, loads, grad_norm, finite })
    }

    /// The routing-bias speed now (all MoE ranges share the schedule of the first).
    fn bias_speed(&self) -> f64 {
        let first_moe: Option<&Schedule> = self.spec.model.ffn.iter().find_map(|r| match &r.ffn {
            dsc_lang::Ffn::Moe(m) => Some(&m.bias_speed),
            dsc_lang::Ffn::Dense { .. } => None,
        });
        first_moe.map_or(0.0, |s| scheduled(s, self.progress))
    }

    /// Runs the optimizer function on the gradients summed over `micro_batches` with the step's
    /// `lr`, routing-bias speed and gradient norm, and stores its results.
    fn apply_optimizer(
        &mut self,
        grads: Vec<Vec<T>>,
        loads: &[Vec<f64>],
        step: [f64; 3],
        micro_batches: usize,
    ) -> Result<(), StepError> {
        let info = &self.graph.forward.params;
        let mut args = Vec::new();
        let mut learned = Vec::new();
        for (i, (p, g)) in info.iter().zip(grads).enumerate() {
            if !p.learned {
                continue;
            }
            let (m, v) = &self.moments[learned.len()];
            args.extend([self.params[i].clone(), Value::real(Tensor::new(p.shape.clone(), g)), m.clone(), v.clone()]);
            learned.push(i);
        }
        for (&b, load) in self.graph.forward.moe_biases.iter().zip(loads) {
            args.push(self.params[b].clone());
            args.push(Value::real(Tensor::new(info[b].shape.clone(), load.iter().map(|&x| T::from_f64(x)).collect())));
        }
        args.extend(optimizer_scalars(&self.spec, self.progress, step, micro_batches));
        let mut out = self.backend.run(self.graph.optimizer, args).map_err(StepError)?.into_iter();
        for (slot, &i) in learned.iter().enumerate() {
            self.params[i] = out.next().expect("param'");
            let m = out.next().expect("m'");
            let v = out.next().expect("v'");
            self.moments[slot] = (m, v);
        }
        for &b in &self.graph.forward.moe_biases {
            self.params[b] = out.next().expect("bias'");
        }
        Ok(())
    }
}

/// A value's elements as f32 (how checkpoints and the ranks hold them).
fn f32s<T: Real>(value: &Value<T>) -> Vec<f32> {
    value.as_real().data.iter().map(|x| x.to_f64() as f32).collect()
}

/// A value of `shape` from f32 elements.
fn from_f32s<T: Real>(shape: &[usize], data: &[f32]) -> Value<T> {
    Value::real(Tensor::new(shape.to_vec(), data.iter().map(|&x| T::from_f64(f64::from(x))).collect()))
}

/// The optimizer function's scalar arguments after its tensors, for the step after
/// `progress`, from the step's LR, routing-bias speed and gradient norm, the gradients summed
/// over `micro_batches`: the LR, both bias corrections, the bias speed, the norm and the factor
/// from the sum to the mean.
pub(super) fn optimizer_scalars<T: Real>(
    spec: &Spec,
    progress: Progress,
    [lr, bias_speed, grad_norm]: [f64; 3],
    micro_batches: usize,
) -> Vec<Value<T>> {
    let grad_scale = 1.0 / micro_batches as f64;
    let t = (progress.step + 1) as i32;
    let opt = &spec.train.optimizer;
    [lr, 1.0 - opt.beta1.powi(t), 1.0 - opt.beta2.powi(t), bias_speed, grad_norm, grad_scale]
        .into_iter()
        .map(|x| Value::real(Tensor::scalar(T::from_f64(x))))
        .collect()
}

/// One rank's sums over the step's micro-batches: the gradient function of `graph` on each
/// in turn, on `backend`.
fn one_rank_sums<T: Real>(
    graph: &TrainingGraph,
    params: &[Value<T>],
    backend: &mut dyn Backend<T>,
    batches: Vec<MicroBatch>,
    mtp_weight: f64,
) -> Result<StepSums<T>, StepError> {
    let info = &graph.forward.params;
    let mut sums = StepSums {
        losses: [0.0; LOSS_OUTPUTS],
        loads: Vec::new(),
        grads: info.iter().map(|p| vec![T::ZERO; p.numel()]).collect(),
    };
    for (tokens, loss_mask) in batches {
        let mut args = params.to_vec();
        args.push(Value::int(tokens));
        let mask = loss_mask.data.iter().map(|&m| T::from_f64(f64::from(m))).collect();
        args.push(Value::real(Tensor::new(loss_mask.shape, mask)));
        args.push(Value::real(Tensor::scalar(T::from_f64(mtp_weight))));
        let out = backend.run(graph.grad, args).map_err(StepError)?;
        for (total, value) in sums.losses.iter_mut().zip(&out) {
            *total += value.scalar().to_f64();
        }
        let n_loads = graph.forward.moe_biases.len();
        let layer_loads = &out[LOSS_OUTPUTS..LOSS_OUTPUTS + n_loads];
        add_loads(&mut sums.loads, layer_loads.iter().map(|l| l.as_real().data.iter().map(|x| x.to_f64()).collect()));
        let param_grads = &out[LOSS_OUTPUTS + n_loads..LOSS_OUTPUTS + n_loads + info.len()];
        for (acc, g) in sums.grads.iter_mut().zip(param_grads) {
            acc.iter_mut().zip(&g.as_real().data).for_each(|(a, x)| *a += *x);
        }
    }
    Ok(sums)
}

/// A step's losses, loads and one vector per parameter (its gradient; from the ranks, its
/// value, written by its one holder and zero elsewhere).
pub(super) type Summed<T> = ([f64; LOSS_OUTPUTS], Vec<Vec<f64>>, Vec<Vec<T>>);

/// `summed` added up over processes by `sum` (in place, over f64 values), in one collective,
/// in f64 (each process's f32 values convert exactly).
pub(super) fn sum_over<T: Real>(
    (losses, loads, per_param): Summed<T>,
    sum: impl FnOnce(&mut [f64]) -> Result<(), String>,
) -> Result<Summed<T>, StepError> {
    let mut flat: Vec<f64> = losses.to_vec();
    flat.extend(loads.iter().flatten());
    flat.extend(per_param.iter().flatten().map(|x| x.to_f64()));
    sum(&mut flat).map_err(StepError)?;
    let mut rest = flat.into_iter();
    let losses = std::array::from_fn(|_| rest.next().expect("a loss"));
    let loads = loads.iter().map(|l| rest.by_ref().take(l.len()).collect()).collect();
    let per_param = per_param.iter().map(|p| rest.by_ref().take(p.len()).map(T::from_f64).collect()).collect();
    Ok((losses, loads, per_param))
}

/// What the micro-batches of a step add up to.
pub struct StepSums<T> {
    /// The loss, main loss, MTP loss and balance loss.
    pub losses: [f64; LOSS_OUTPUTS],
    /// Per MoE block (main layers, then MTP's), tokens per expert.
    pub loads: Vec<Vec<f64>>,
    /// Per parameter, its gradient.
    pub grads: Vec<Vec<T>>,
}

/// Adds `loads` (per MoE block, tokens per expert) to `sums`, block by block.
pub fn add_loads(sums: &mut Vec<Vec<f64>>, loads: impl Iterator<Item = Vec<f64>>) {
    for (block, load) in loads.enumerate() {
        if block == sums.len() {
            sums.push(vec![0.0; load.len()]);
        }
        sums[block].iter_mut().zip(load).for_each(|(sum, l)| *sum += l);
    }
}

/// A step that failed on its thread-ranks.
#[derive(Debug, PartialEq)]
pub struct StepError(pub String);

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StepError {}

/// The data-parallel ranks whose micro-batches one step runs.
fn data_ranks(spec: &Spec) -> usize {
    spec.parallel.data.size.max(1) as usize
}

/// Refuses models too large for the CPU backend.
fn check_size(spec: &Spec, graph: &TrainingGraph) -> Result<(), Unsupported> {
    // Parameters, gradients and two moments in T, plus activations: keep to what a
    // workstation holds; the CPU backend is the reference for small models.
    let count: u64 = graph.forward.params.iter().map(|p| p.numel() as u64).sum();
    if count > MAX_CPU_PARAMS {
        return Err(Unsupported(format!(
            "`{}` has {count} parameters; the CPU backend trains models of up to {MAX_CPU_PARAMS} (try models/deepseek-v3-tiny.dsc)",
            spec.model.name
        )));
    }
    Ok(())
}

fn zero_moments<T: Real>(graph: &TrainingGraph) -> Moments<T> {
    graph
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
        .collect()
}

fn flops_per_token(spec: &Spec) -> f64 {
    dsc_compiler::estimate::info(spec).flops_per_token as f64
}

/// The EMA worker of a spec that keeps one, from `saved` (a checkpoint's) or the parameters.
fn start_ema<T: Real>(spec: &Spec, params: &[Value<T>], saved: Option<Vec<Vec<f32>>>) -> Option<Ema<T>> {
    let decay = spec.precision.ema.as_ref()?.decay;
    let initial = saved.unwrap_or_else(|| {
        params.iter().map(|p| p.as_real().data.iter().map(|x| x.to_f64() as f32).collect()).collect()
    });
    Some(Ema::start(decay, initial))
}
