//! The spec's parallel plan on the CPU backend's ranks: PP × DP ranks, each holding its
//! pipeline stages (and under expert parallelism its share of the routed experts), run the
//! step's pipeline schedule on the step's micro-batches, data-parallel replica r taking the
//! r-th equal share of them, as the one-rank trainer reads them. The ranks are threads of this
//! process ([`Here::Threads`]), or processes started by a launcher, one rank each, talking
//! over TCP ([`Here::Process`]): every process reads the whole step's data (so that the
//! loaders stay in step) and runs its own rank. ZeRO-1: the reduce-scatter sums the gradients
//! over the ranks holding copies, each rank updates its shard with the optimizer state of
//! that shard alone ([`ShardOptimizer`], which the ranks keep from step to step), and the
//! all-gather hands the updated shards to every copy. The ranks hand the updated parameters,
//! losses and loads back to the trainer (across processes, by one exact sum over all of them),
//! which moves the routing biases and reports the step. For a checkpoint the moments are
//! gathered into the whole model's order ([`Ranks::moments`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsc_compiler::graph::model::LOSS_OUTPUTS;
use dsc_compiler::graph::zero::Run;
use dsc_compiler::graph::{Numerics, ParamInfo, StageTraining};
use dsc_compiler::parallel::check::check;
use dsc_compiler::parallel::schedule::{Direction, Micro, Schedule};
use dsc_compiler::parallel::split;
use dsc_lang::{PipelineSchedule, Spec};

use super::graph_stage::{share_of, stage_graphs, GraphStage, MicroBatch, Runners};
use super::pipeline::{group, run_step, HeldStages, Place, Replicas, Sharing, StageCompute, StageReport, StepEnd};
use super::trainer::{add_loads, sum_over, StepError, Unsupported};
use super::zero::{BiasUpdate, ShardOptimizer, WholeMoments};
use crate::comm::{self, Comm, ExpertGroup, Sockets, ThreadComm};
use crate::cpu::{Real, Tensor, Value};

/// How long a rank waits for a peer before the step fails: far longer than a CPU chunk of a
/// model the CPU trains takes.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(600);

/// The most thread-ranks a plan may ask of one process.
const MAX_THREAD_RANKS: usize = 256;

/// Where the plan's ranks run.
pub enum Here {
    /// Every rank as a thread of this process.
    Threads,
    /// This process is one rank; the others are processes reached through these sockets
    /// (their world is the plan's ranks, numbered replica-major).
    Process(Arc<Sockets>),
}

/// The ranks of a spec's parallel plan and the stages they run.
pub struct Ranks {
    kind: PipelineSchedule,
    stages: Vec<Arc<StageTraining>>,
    /// What runs the stages' functions.
    runners: Runners,
    /// Where they run, in words.
    runs_on: String,
    /// Per stage, the index of each of its parameters in the whole model's list.
    indices: Vec<Vec<usize>>,
    /// Per stage, the length of each expert load it reports.
    loads: Vec<Vec<usize>>,
    /// The whole model's parameters.
    params: Vec<ParamInfo>,
    replicas: Replicas,
    here: Here,
    /// The optimizer of each rank run here, in the order of their ids.
    optimizers: Vec<Mutex<ShardOptimizer>>,
    biases: BiasUpdate,
}

/// The optimizer's scalar arguments for the step, given the whole model's gradient norm.
pub type StepScalars<'a> = &'a (dyn Fn(f64) -> Vec<Value<f32>> + Sync);

/// What a step on the ranks did: the losses and loads summed over its micro-batches, how it
/// ended, and the whole model's parameters after it (the routing biases as they were: the
/// trainer moves them).
pub struct RanksStep<T> {
    pub losses: [f64; LOSS_OUTPUTS],
    pub loads: Vec<Vec<f64>>,
    pub end: StepEnd,
    pub params: Vec<Vec<T>>,
}

/// Whether the spec's plan spreads a step over more than one rank.
pub fn is_parallel(spec: &Spec) -> bool {
    let par = &spec.parallel;
    par.pipeline.stages > 1 || par.data.size > 1 || par.expert.size > 1
}

/// Whether a launcher's `processes` are the spec's plan's ranks, one each.
pub fn check_world(spec: &Spec, processes: usize) -> Result<(), Unsupported> {
    let (stages, replicas) = (split(spec).len(), spec.parallel.data.size as usize);
    let count = stages * replicas;
    if processes == count {
        return Ok(());
    }
    Err(Unsupported(format!(
        "the spec's plan has {count} rank(s) ({stages} pipeline stage(s) × {replicas} data-parallel replica(s)) but the launcher started {processes} processes: start {count} (e.g. `torchrun --nproc-per-node {count}`), or change `parallel`"
    )))
}

/// What one rank hands back: per stage it holds for the down direction, the stage index, the
/// rank's member index in its expert-parallel group, and its parameters by sharing (after the
/// update); what all its stages reported; how the step ended.
type RankResult = (Vec<(usize, usize, [Vec<f32>; 2])>, Vec<(usize, StageReport)>, StepEnd);

impl Ranks {
    /// The ranks of `spec`'s plan for the model whose parameters are `params` (and the
    /// routing biases among them `biases`), their stages computing with `numerics`, running
    /// `here`; their optimizers start from `moments`. `runners` (with where they run, in
    /// words) run the stages' functions; by default the CPU interprets the stages' graphs.
    pub fn new(
        spec: &Spec,
        numerics: Numerics,
        (params, biases): (&[ParamInfo], &[usize]),
        moments: &WholeMoments,
        here: Here,
        runners: Option<(Runners, String)>,
    ) -> Result<Self, Unsupported> {
        let par = &spec.parallel;
        let split = split(spec);
        let replicas = Replicas { count: par.data.size as usize, expert_ranks: par.expert.size as usize };
        let count = split.len() * replicas.count;
        match &here {
            Here::Threads if count > MAX_THREAD_RANKS => {
                return Err(Unsupported(format!(
                    "the plan has {count} ranks; the CPU backend runs up to {MAX_THREAD_RANKS} as threads of one process (start them as processes with a launcher)"
                )))
            }
            Here::Process(sockets) => check_world(spec, sockets.size())?,
            Here::Threads => {}
        }
        let stages: Vec<Arc<StageTraining>> = split
            .iter()
            .map(|stage| Arc::new(StageTraining::build(spec, numerics, &stage.parts, replicas.expert_ranks)))
            .collect();
        let by_name: HashMap<&str, usize> = params.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
        let indices =
            stages.iter().map(|stage| stage.graph.params.iter().map(|p| by_name[p.name.as_str()]).collect()).collect();
        let loads = stages
            .iter()
            .map(|stage| {
                let forward = &stage.graph.module.functions[stage.graph.forward];
                let reported = if stage.graph.last { 4 } else { 2 };
                forward.outputs[reported..].iter().map(|&o| forward.node(o).shape.iter().product()).collect()
            })
            .collect();
        let (runners, runs_on) = runners.unwrap_or_else(|| (stage_graphs(&stages), "the CPU".to_string()));
        let kind = par.pipeline.schedule;
        // Which stages a rank holds and which ranks share its copies depend on the schedule's
        // kind and pipeline ranks alone: any valid micro-batch count shows them.
        let schedule =
            Schedule::generate(kind, stages.len(), 2 * stages.len()).map_err(|e| Unsupported(e.to_string()))?;
        let mut ranks = Ranks {
            kind,
            stages,
            runners,
            runs_on,
            indices,
            loads,
            params: params.to_vec(),
            replicas,
            here,
            optimizers: Vec::new(),
            biases: BiasUpdate::new(spec, numerics, params, biases),
        };
        let ids = match &ranks.here {
            Here::Threads => 0..count,
            Here::Process(sockets) => sockets.rank()..sockets.rank() + 1,
        };
        ranks.optimizers = ids
            .map(|id| {
                let place = Place { pipeline_rank: id % schedule.ranks, replica: id / schedule.ranks };
                let runs = ranks.runs(&schedule, place);
                let shards = Sharing::ALL.map(|sharing| {
                    let members = group(&schedule, place, replicas, sharing);
                    let position = members.iter().position(|&member| member == id).expect("a rank is in its groups");
                    let len = runs[sharing as usize].iter().map(|run| run.len).sum();
                    comm::shard(len, members.len(), position)
                });
                Mutex::new(ShardOptimizer::new(spec, numerics, params, &runs, shards, moments))
            })
            .collect();
        Ok(ranks)
    }

    /// Per sharing, the runs of whole-model parameters that the rank at `place` holds copies
    /// of, in the order ZeRO-1 flattens them (its stages by index, each stage's parameters in
    /// order; of a routed expert stack, the rank's share).
    fn runs(&self, schedule: &Schedule, place: Place) -> [Vec<Run>; 2] {
        let member = place.replica % self.replicas.expert_ranks;
        let mut held: Vec<usize> = schedule.held(place.pipeline_rank).map(|(_, stage)| stage).collect();
        held.sort_unstable();
        Sharing::ALL.map(|sharing| {
            let stage_runs =
                held.iter().flat_map(|&stage| self.stages[stage].graph.params.iter().zip(&self.indices[stage]));
            let mut at = 0;
            stage_runs
                .filter(|(p, _)| p.is_routed_expert() == (sharing == Sharing::Experts))
                .map(|(p, &param)| {
                    let start = if p.is_routed_expert() { member * p.numel() } else { 0 };
                    at += p.numel();
                    Run { param, start, len: p.numel(), at: at - p.numel() }
                })
                .collect()
        })
    }

    /// How many ranks run a step.
    pub fn count(&self) -> usize {
        self.stages.len() * self.replicas.count
    }

    /// Runs one step's `batches` (in the one-rank trainer's order) from the whole model's
    /// `params`, the optimizer taking `scalars`.
    pub fn step<T: Real>(
        &self,
        params: &[Value<T>],
        batches: Vec<MicroBatch>,
        mtp_weight: f32,
        scalars: StepScalars,
    ) -> Result<RanksStep<T>, StepError> {
        let replicas = self.replicas;
        if !batches.len().is_multiple_of(replicas.count) {
            return Err(StepError(format!(
                "{} micro-batches do not split evenly over {} data-parallel replicas",
                batches.len(),
                replicas.count
            )));
        }
        let per_replica = batches.len() / replicas.count;
        let schedule = Schedule::generate(self.kind, self.stages.len(), per_replica)
            .map_err(|e| StepError(format!("a step of {per_replica} micro-batches per replica: {e}")))?;
        check(&schedule).map_err(|e| StepError(format!("the generated schedule does not check: {e}")))?;
        let whole: Vec<Tensor<f32>> = params
            .iter()
            .map(|p| {
                let t = p.as_real();
                Tensor::new(t.shape.clone(), t.data.iter().map(|x| x.to_f64() as f32).collect())
            })
            .collect();
        // Every pipeline rank of replica r reads the r-th share of the micro-batches.
        let share = |place: Place| batches[place.replica * per_replica..][..per_replica].to_vec();
        let stages = self.stages.len();
        let step = Step { schedule: &schedule, whole: &whole, mtp_weight, micro_batches: batches.len(), scalars };
        let results = match &self.here {
            Here::Threads => {
                let comm: Arc<dyn Comm> = Arc::new(ThreadComm::new(PEER_TIMEOUT));
                std::thread::scope(|scope| {
                    let handles: Vec<_> = self
                        .optimizers
                        .iter()
                        .enumerate()
                        .map(|(id, optimizer)| {
                            let place = Place { pipeline_rank: id % stages, replica: id / stages };
                            let (step, comm, batches) = (&step, Arc::clone(&comm), share(place));
                            scope.spawn(move || self.run_rank(step, comm, place, batches, optimizer))
                        })
                        .collect();
                    handles.into_iter().map(|handle| handle.join().expect("a rank's thread does not panic")).collect()
                })
            }
            Here::Process(sockets) => {
                let rank = sockets.rank();
                let place = Place { pipeline_rank: rank % stages, replica: rank / stages };
                let comm: Arc<dyn Comm> = Arc::clone(sockets) as Arc<dyn Comm>;
                vec![self.run_rank(&step, comm, place, share(place), &self.optimizers[0])]
            }
        };
        let step = self.gathered(results)?;
        match &self.here {
            Here::Threads => Ok(step),
            Here::Process(sockets) => {
                // Each process has its ranks' parameters (zero elsewhere), losses and loads: their
                // sum over the processes is the whole step's.
                let RanksStep { losses, loads, end, params } = step;
                let (losses, loads, params) =
                    sum_over((losses, loads, params), |flat| sum_processes(sockets, "step", flat))?;
                Ok(RanksStep { losses, loads, end, params })
            }
        }
    }

    /// AdamW's moments of the whole model, gathered from the ranks' shards (across processes,
    /// a collective every process must call).
    pub fn moments(&self) -> Result<WholeMoments, StepError> {
        let mut whole: WholeMoments =
            self.params.iter().filter(|p| p.learned).map(|p| [vec![0.0; p.numel()], vec![0.0; p.numel()]]).collect();
        for optimizer in &self.optimizers {
            optimizer.lock().expect("no rank panicked").gather_into(&self.params, &mut whole);
        }
        if let Here::Process(sockets) = &self.here {
            let mut flat: Vec<f64> = whole.iter().flatten().flatten().map(|&x| f64::from(x)).collect();
            sum_processes(sockets, "moments", &mut flat).map_err(StepError)?;
            whole.iter_mut().flatten().flatten().zip(flat).for_each(|(x, sum)| *x = sum as f32);
        }
        Ok(whole)
    }

    /// Whether `flag` is set on any process (this one's across threads): a collective every
    /// process must call, so that they agree, e.g. to stop at the same step.
    pub fn any(&self, flag: bool) -> Result<bool, StepError> {
        match &self.here {
            Here::Threads => Ok(flag),
            Here::Process(sockets) => {
                let mut sum = [f64::from(u8::from(flag))];
                sum_processes(sockets, "flag", &mut sum).map_err(StepError)?;
                Ok(sum[0] > 0.0)
            }
        }
    }

    /// Moves the routing biases among `params` from the step's `loads`.
    pub fn move_biases<T: Real>(&self, params: &mut [Value<T>], loads: &[Vec<f64>], scalars: Vec<Value<T>>) {
        self.biases.apply(params, loads, scalars);
    }

    /// The step's sums and parameters from what the ranks handed back.
    fn gathered<T: Real>(&self, results: Vec<Result<RankResult, String>>) -> Result<RanksStep<T>, StepError> {
        let mut step = RanksStep {
            losses: [0.0; LOSS_OUTPUTS],
            loads: Vec::new(),
            end: StepEnd { square_sum: 0.0, updated: false },
            params: self.params.iter().map(|p| vec![T::ZERO; p.numel()]).collect(),
        };
        let mut loads_by_stage: Vec<Vec<Vec<f64>>> =
            self.loads.iter().map(|lens| lens.iter().map(|&len| vec![0.0; len]).collect()).collect();
        for result in results {
            let (held, reports, end) = result.map_err(StepError)?;
            step.end = end;
            for (stage, member, flat) in held {
                self.write_params(&mut step.params, stage, member, flat);
            }
            for (stage, report) in reports {
                let parts = [report.loss, report.main_loss, report.mtp_loss, report.balance_loss];
                step.losses.iter_mut().zip(parts).for_each(|(sum, part)| *sum += part);
                add_loads(&mut loads_by_stage[stage], report.loads.into_iter());
            }
        }
        add_loads(&mut step.loads, loads_by_stage.into_iter().flatten());
        Ok(step)
    }

    /// Writes one rank's parameters of a stage into the whole model's: the replicated ones
    /// from the first member of an expert-parallel group, each member's share of the routed
    /// experts.
    fn write_params<T: Real>(&self, whole: &mut [Vec<T>], stage: usize, member: usize, flat: [Vec<f32>; 2]) {
        let mut flat = flat.map(Vec::into_iter);
        for (p, &index) in self.stages[stage].graph.params.iter().zip(&self.indices[stage]) {
            let sharing = usize::from(p.is_routed_expert());
            let values = flat[sharing].by_ref().take(p.numel()).map(|x| T::from_f64(f64::from(x)));
            if p.is_routed_expert() {
                whole[index][member * p.numel()..][..p.numel()].iter_mut().zip(values).for_each(|(w, x)| *w = x);
            } else if member == 0 {
                whole[index].iter_mut().zip(values).for_each(|(w, x)| *w = x);
            }
        }
    }

    /// One rank's step: its stages run the schedule, its optimizer updating its shards; the
    /// rank hands back its parameters (from one replica per expert share).
    fn run_rank(
        &self,
        step: &Step,
        comm: Arc<dyn Comm>,
        place: Place,
        batches: Vec<MicroBatch>,
        optimizer: &Mutex<ShardOptimizer>,
    ) -> Result<RankResult, String> {
        let Step { schedule, whole, mtp_weight, micro_batches, scalars } = *step;
        let replicas = self.replicas;
        let member = place.replica % replicas.expert_ranks;
        let per_direction = schedule.micro_batches_per_direction();
        let batches = Arc::new(batches);
        let stages = schedule.held(place.pipeline_rank).map(|(direction, stage)| {
            let training = Arc::clone(&self.stages[stage]);
            let params = training
                .graph
                .params
                .iter()
                .zip(&self.indices[stage])
                .map(|(p, &index)| share_of(&whole[index], p, member))
                .collect();
            let batches = Arc::clone(&batches);
            let data = move |micro: Micro| {
                let offset = if micro.direction == Direction::Up { per_direction } else { 0 };
                batches[offset + micro.index].clone()
            };
            let group = place.expert_group(schedule, replicas);
            let exchange =
                ExpertGroup::new(Arc::clone(&comm), group, place.id(schedule), format!("stage {stage} experts"));
            let runner = (self.runners)(place.id(schedule), stage, Box::new(exchange))?;
            let stage: Box<dyn StageCompute> =
                Box::new(GraphStage::new(&training, runner, params, Box::new(data), mtp_weight));
            Ok((direction, stage))
        });
        let mut held = HeldStages { stages: stages.collect::<Result<_, String>>()? };
        let mut optimizer = optimizer.lock().expect("no rank panicked");
        let scale = 1.0 / micro_batches as f64;
        let update = |sharing: Sharing, params: &mut [f32], gradient: &[f32], square_sum: f64| {
            let scalars = scalars(square_sum.sqrt() * scale);
            optimizer.update(sharing, params, gradient, &scalars);
        };
        let end = run_step(schedule, comm.as_ref(), place, replicas, &mut held, update).map_err(|e| e.0)?;
        let mut updated = Vec::new();
        let mut reports = Vec::new();
        for (direction, stage) in &mut held.stages {
            let index = direction.rank_of(place.pipeline_rank, schedule.ranks);
            reports.push((index, stage.take_report()));
            if *direction == Direction::Down && place.replica < replicas.expert_ranks {
                updated.push((index, member, Sharing::ALL.map(|sharing| stage.params(sharing))));
            }
        }
        Ok((updated, reports, end))
    }
}

/// Sums `data` over every process of a launched run, in place (exactly, in rank order).
fn sum_processes(sockets: &Sockets, name: &str, data: &mut [f64]) -> Result<(), String> {
    let world: Vec<usize> = (0..sockets.size()).collect();
    let sum = sockets.sum_exact(&world, sockets.rank(), name, data).map_err(|e| e.0)?;
    data.copy_from_slice(&sum);
    Ok(())
}

/// What every rank of a step shares: the schedule, the whole model's parameters before it,
/// λ, the micro-batch count and the optimizer's scalars.
#[derive(Clone, Copy)]
struct Step<'a> {
    schedule: &'a Schedule,
    whole: &'a [Tensor<f32>],
    mtp_weight: f32,
    micro_batches: usize,
    scalars: StepScalars<'a>,
}

impl fmt::Display for Ranks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let schedule = match self.kind {
            PipelineSchedule::OneFOneB => "1F1B",
            PipelineSchedule::Zb1p => "ZB1P",
            PipelineSchedule::Dualpipe => "DualPipe",
        };
        match &self.here {
            Here::Threads => write!(f, "{} thread-ranks", self.count())?,
            Here::Process(sockets) => write!(f, "rank {} of {} processes over TCP", sockets.rank(), self.count())?,
        }
        write!(f, " on {}", self.runs_on)?;
        write!(
            f,
            ": {} pipeline stages ({schedule}) × {} data-parallel replicas, the routed experts split over {}",
            self.stages.len(),
            self.replicas.count,
            self.replicas.expert_ranks
        )?;
        let held = self.optimizers.iter().map(|o| o.lock().map_or(0, |o| o.held()));
        let learned: usize = self.params.iter().filter(|p| p.learned).map(ParamInfo::numel).sum();
        let largest = held.max().unwrap_or(0);
        write!(f, "; ZeRO-1: a rank's optimizer state covers at most {largest} of the model's {learned} learned values")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::graph_stage::plan_stages;
    use crate::train::Trainer;
    use dsc_lang::Batch;
    use std::path::Path;

    /// The tiny model with 4 layers (3 MoE) on PP 2 × 4 replicas, the routed experts split
    /// over 2: 8 thread-ranks; 4 micro-batches of 2 sequences of 8 tokens per replica.
    fn tiny_on_eight_ranks(kind: PipelineSchedule) -> Spec {
        tiny_on_ranks(kind, 4, 2)
    }

    /// The tiny model with 4 layers (3 MoE) on PP 2 × `replicas`, the routed experts split over
    /// `expert_ranks`; 4 micro-batches of 2 sequences of 8 tokens per replica.
    fn tiny_on_ranks(kind: PipelineSchedule, replicas: u64, expert_ranks: u64) -> Spec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
        let mut spec = dsc_lang::load(&path, &[]).checked_spec().cloned().expect("the tiny model checks");
        spec.model.layers = 4;
        spec.model.ffn.last_mut().expect("an MoE range").layers.end = 4;
        spec.train.seq_len = 8;
        spec.train.micro_batch = 2;
        spec.train.batch = Batch::Constant { sequences: 8 * replicas };
        let par = &mut spec.parallel;
        (par.nodes, par.gpus_per_node) = (1, 2 * replicas);
        par.pipeline.schedule = kind;
        par.pipeline.stages = 2;
        par.data.size = replicas;
        par.expert.size = expert_ranks;
        spec
    }

    #[test]
    fn the_trainer_on_thread_ranks_reports_what_one_rank_does() {
        // The last plan's 3 replicas split no copy evenly: the shards differ in length.
        let plans = [PipelineSchedule::OneFOneB, PipelineSchedule::Zb1p, PipelineSchedule::Dualpipe]
            .map(|kind| (kind, 4, 2))
            .into_iter()
            .chain([(PipelineSchedule::OneFOneB, 3, 1)]);
        for (kind, replicas, expert_ranks) in plans {
            let spec = tiny_on_ranks(kind, replicas, expert_ranks);
            let mut one = Trainer::<f32>::new(&spec, Numerics::Exact, 3).expect("trains");
            let mut ranked = Trainer::<f32>::new(&spec, Numerics::Exact, 3).expect("trains");
            let ranks = ranked.on_ranks(Numerics::Exact, Here::Threads, None).expect("runs on threads");
            assert!(ranks.starts_with(&format!("{} thread-ranks", 2 * replicas)), "{ranks}");
            for step in 0..2 {
                let (a, b) = (one.step().expect("one rank"), ranked.step().expect("the ranks"));
                let close = |x: f64, y: f64| (x - y).abs() <= 1e-4 * x.abs().max(1e-6);
                for (what, x, y) in [
                    ("loss", a.loss, b.loss),
                    ("mtp_loss", a.mtp_loss, b.mtp_loss),
                    ("balance_loss", a.balance_loss, b.balance_loss),
                    ("grad_norm", a.grad_norm, b.grad_norm),
                ] {
                    assert!(close(x, y), "{kind:?} step {step} {what}: one rank {x}, the ranks {y}");
                }
                // Loads are counts: exactly equal.
                assert_eq!((a.expert_load_max, a.expert_load_mean), (b.expert_load_max, b.expert_load_mean));
                assert_eq!((a.step, a.tokens), (b.step, b.tokens));
                assert!(a.expert_load_max > 0.0, "the MoE layers report their loads");
                // Clipping acts, by the whole model's norm (not a shard's).
                assert!(a.grad_norm > spec.train.grad_clip, "{kind:?} step {step}: norm {}", a.grad_norm);
            }
            // The parameters, and the moments gathered from the ranks' shards.
            ranked.sync().expect("gathers the moments");
            let info = one.graph().forward.params.clone();
            let learned = info.iter().filter(|p| p.learned);
            let named =
                info.iter().map(|p| (&p.name, "")).chain(learned.flat_map(|p| [(&p.name, " m"), (&p.name, " v")]));
            let state = |t: &Trainer<f32>| {
                let moments = t.moments().iter().flat_map(|(m, v)| [m.clone(), v.clone()]);
                t.params().iter().cloned().chain(moments).collect::<Vec<_>>()
            };
            for ((name, what), (x, y)) in named.zip(state(&one).iter().zip(&state(&ranked))) {
                let (x, y) = (&x.as_real().data, &y.as_real().data);
                let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
                let diff = x.iter().zip(y).map(|(u, v)| (u - v) * (u - v)).sum::<f32>().sqrt();
                assert!(diff <= 1e-4 * norm + 1e-9, "{kind:?}: {name}{what} off by {diff} of {norm}");
            }
        }
    }

    /// A compiled plan's stage functions (fused, as the GPU ranks run them: `cuda::stage`),
    /// interpreted on the ranks, train as the stage graphs do, under every schedule with
    /// expert and data parallelism: the plan holds the right stages, each its parameters in
    /// the graph's order, its calls and tables moved along with it.
    #[test]
    fn a_plans_stage_functions_train_as_the_stage_graphs_do() {
        for kind in [PipelineSchedule::OneFOneB, PipelineSchedule::Dualpipe] {
            let spec = tiny_on_ranks(kind, 2, 2);
            let plan = dsc_compiler::plan::compile(&spec, dsc_compiler::fuse::Limits::default());
            for (stage, held) in split(&spec).iter().zip(&plan.stages) {
                let training = StageTraining::build(&spec, Numerics::Policy, &stage.parts, 2);
                assert_eq!(held.params, training.graph.params, "{kind:?} stage {}", stage.index);
                let name = &plan.module.functions[held.forward].name;
                assert_eq!(name, &format!("stage{}.stage", stage.index), "{kind:?}");
            }
            let trainer = || Trainer::<f32>::with_graph(&spec, plan.training_graph(), 3).expect("trains");
            let (mut graphs, mut functions) = (trainer(), trainer());
            graphs.on_ranks(Numerics::Policy, Here::Threads, None).expect("runs on threads");
            let runners = Some((plan_stages(&plan), "the plan's functions".to_string()));
            let ranks = functions.on_ranks(Numerics::Policy, Here::Threads, runners).expect("runs on threads");
            assert!(ranks.starts_with("4 thread-ranks on the plan's functions"), "{ranks}");
            for step in 0..2 {
                let (a, b) = (graphs.step().expect("the graphs"), functions.step().expect("the functions"));
                for (what, x, y) in [("loss", a.loss, b.loss), ("grad_norm", a.grad_norm, b.grad_norm)] {
                    assert!((x - y).abs() <= 1e-5 * x.abs(), "{kind:?} step {step} {what}: graphs {x}, plan {y}");
                }
                assert_eq!((a.expert_load_max, a.expert_load_mean), (b.expert_load_max, b.expert_load_mean));
            }
        }
    }

    #[test]
    fn each_rank_keeps_the_optimizer_state_of_its_shard_alone() {
        for kind in [PipelineSchedule::OneFOneB, PipelineSchedule::Dualpipe] {
            let spec = tiny_on_eight_ranks(kind);
            let graph = dsc_compiler::graph::TrainingGraph::build(&spec, Numerics::Exact);
            let (params, biases) = (&graph.forward.params, &graph.forward.moe_biases);
            let learned: Vec<usize> = params.iter().filter(|p| p.learned).map(|p| p.numel()).collect();
            let moments = learned.iter().map(|&n| [vec![0.0; n], vec![0.0; n]]).collect();
            let ranks =
                Ranks::new(&spec, Numerics::Exact, (params, biases), &moments, Here::Threads, None).expect("ranks");
            let held: Vec<usize> = ranks.optimizers.iter().map(|o| o.lock().expect("not poisoned").held()).collect();
            // Together one copy of the model's; each about 1/4 of its stage's (4 replicas; with
            // DualPipe 8 copies of each stage pair).
            let total: usize = learned.iter().sum();
            assert_eq!(held.iter().sum::<usize>(), total, "{kind:?}: {held:?}");
            assert!(held.iter().all(|&h| h > 0 && h < total / 4), "{kind:?}: {held:?} of {total}");
            // The compiler's memory estimate counts the same shards (`dsc info`, `dsc simulate`),
            // less the routing biases, which have no optimizer state here, and rounding.
            let estimate = dsc_compiler::estimate::memory::per_rank(&spec, &split(&spec));
            let precision = &spec.precision;
            let per_value = precision.master_weights.bytes() + 2 * precision.adam_moments.bytes();
            let biases: usize = graph.forward.moe_biases.iter().map(|&b| params[b].numel()).sum();
            for (id, &h) in held.iter().enumerate() {
                let estimated = (estimate[id % estimate.len()].optimizer / per_value) as usize;
                assert!(
                    estimated >= h && estimated <= h + biases + 8,
                    "{kind:?} rank {id}: estimated {estimated}, held {h}"
                );
            }
        }
    }

    #[test]
    fn a_batch_too_small_for_the_schedule_fails_the_step_with_a_reason() {
        let mut spec = tiny_on_eight_ranks(PipelineSchedule::Dualpipe);
        // 2 micro-batches per replica; DualPipe over 2 stages needs 4.
        spec.train.batch = Batch::Constant { sequences: 16 };
        let mut trainer = Trainer::<f32>::new(&spec, Numerics::Exact, 3).expect("trains");
        trainer.on_ranks(Numerics::Exact, Here::Threads, None).expect("runs on threads");
        let error = trainer.step().expect_err("DualPipe cannot run 2 micro-batches");
        assert!(error.0.contains("DualPipe needs"), "{error}");
    }
}
