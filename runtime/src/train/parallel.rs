//! The spec's parallel plan on the CPU backend's ranks: PP × DP ranks, each holding its
//! pipeline stages (and under expert parallelism its share of the routed experts), run the
//! step's pipeline schedule on the step's micro-batches, data-parallel replica r taking the
//! r-th equal share of them, as the one-rank trainer reads them. The ranks are threads of this
//! process ([`Here::Threads`]), or processes started by a launcher, one rank each, talking
//! over TCP ([`Here::Process`]): every process reads the whole step's data (so that the
//! loaders stay in step) and runs its own rank. ZeRO-1's collectives sum the gradients over
//! the ranks holding copies; the ranks hand the sums back to the trainer (across processes,
//! by one sum over all of them, in rank order, so that every process gets the same bits),
//! whose optimizer and metrics are the one-rank trainer's: every process runs the whole
//! update, as the thread-ranks' trainer does.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dsc_compiler::graph::model::LOSS_OUTPUTS;
use dsc_compiler::graph::{Numerics, ParamInfo, StageTraining};
use dsc_compiler::parallel::check::check;
use dsc_compiler::parallel::schedule::{Direction, Micro, Schedule};
use dsc_compiler::parallel::split;
use dsc_lang::{PipelineSchedule, Spec};

use super::graph_stage::{share_of, GraphStage, MicroBatch};
use super::pipeline::{run_step, HeldStages, Place, Replicas, Sharing, StageCompute, StageReport};
use super::trainer::{add_loads, sum_over, StepError, StepSums, Unsupported};
use crate::comm::{Comm, ExpertGroup, Sockets, ThreadComm};
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
    /// Per stage, the index of each of its parameters in the whole model's list.
    indices: Vec<Vec<usize>>,
    /// Per stage, the length of each expert load it reports.
    loads: Vec<Vec<usize>>,
    /// The whole model's parameters.
    params: Vec<ParamInfo>,
    replicas: Replicas,
    here: Here,
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
/// rank's member index in its expert-parallel group, and its parameters by sharing (set to the
/// summed gradients); and what all its stages reported.
type RankResult = (Vec<(usize, usize, [Vec<f32>; 2])>, Vec<(usize, StageReport)>);

impl Ranks {
    /// The ranks of `spec`'s plan for the model whose parameters are `params`, their stages
    /// computing with `numerics`, running `here`.
    pub fn new(spec: &Spec, numerics: Numerics, params: &[ParamInfo], here: Here) -> Result<Self, Unsupported> {
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
        Ok(Ranks { kind: par.pipeline.schedule, stages, indices, loads, params: params.to_vec(), replicas, here })
    }

    /// How many ranks run a step.
    pub fn count(&self) -> usize {
        self.stages.len() * self.replicas.count
    }

    /// Runs one step's `batches` (in the one-rank trainer's order) from the whole model's
    /// `params`: the summed losses, loads and gradients.
    pub fn step<T: Real>(
        &self,
        params: &[Value<T>],
        batches: Vec<MicroBatch>,
        mtp_weight: f32,
    ) -> Result<StepSums<T>, StepError> {
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
        let results = match &self.here {
            Here::Threads => {
                let comm: Arc<dyn Comm> = Arc::new(ThreadComm::new(PEER_TIMEOUT));
                let places = (0..replicas.count)
                    .flat_map(|replica| (0..stages).map(move |pipeline_rank| Place { pipeline_rank, replica }));
                std::thread::scope(|scope| {
                    let handles: Vec<_> = places
                        .map(|place| {
                            let (schedule, comm, whole, batches) = (&schedule, Arc::clone(&comm), &whole, share(place));
                            scope.spawn(move || self.run_rank(schedule, comm, place, whole, batches, mtp_weight))
                        })
                        .collect();
                    handles.into_iter().map(|handle| handle.join().expect("a rank's thread does not panic")).collect()
                })
            }
            Here::Process(sockets) => {
                let rank = sockets.rank();
                let place = Place { pipeline_rank: rank % stages, replica: rank / stages };
                let comm: Arc<dyn Comm> = Arc::clone(sockets) as Arc<dyn Comm>;
                vec![self.run_rank(&schedule, comm, place, &whole, share(place), mtp_weight)]
            }
        };
        let sums = self.sums(results)?;
        match &self.here {
            Here::Threads => Ok(sums),
            Here::Process(sockets) => sum_over(sums, |flat| sockets.sum(flat).map_err(|e| e.0)),
        }
    }

    /// The step's sums from what the ranks handed back.
    fn sums<T: Real>(&self, results: Vec<Result<RankResult, String>>) -> Result<StepSums<T>, StepError> {
        let mut sums = StepSums {
            losses: [0.0; LOSS_OUTPUTS],
            loads: Vec::new(),
            grads: self.params.iter().map(|p| vec![T::ZERO; p.numel()]).collect(),
        };
        let mut loads_by_stage: Vec<Vec<Vec<f64>>> =
            self.loads.iter().map(|lens| lens.iter().map(|&len| vec![0.0; len]).collect()).collect();
        for result in results {
            let (held, reports) = result.map_err(StepError)?;
            for (stage, member, flat) in held {
                self.add_gradients(&mut sums.grads, stage, member, flat);
            }
            for (stage, report) in reports {
                let parts = [report.loss, report.main_loss, report.mtp_loss, report.balance_loss];
                sums.losses.iter_mut().zip(parts).for_each(|(sum, part)| *sum += part);
                add_loads(&mut loads_by_stage[stage], report.loads.into_iter());
            }
        }
        add_loads(&mut sums.loads, loads_by_stage.into_iter().flatten());
        Ok(sums)
    }

    /// Writes one rank's summed gradients of a stage's parameters into the whole model's:
    /// the replicated ones from the first member of an expert-parallel group, each member's
    /// share of the routed experts.
    fn add_gradients<T: Real>(&self, grads: &mut [Vec<T>], stage: usize, member: usize, flat: [Vec<f32>; 2]) {
        let mut flat = flat.map(Vec::into_iter);
        for (p, &index) in self.stages[stage].graph.params.iter().zip(&self.indices[stage]) {
            let sharing = usize::from(p.is_routed_expert());
            let values = flat[sharing].by_ref().take(p.numel()).map(|x| T::from_f64(f64::from(x)));
            if p.is_routed_expert() {
                grads[index][member * p.numel()..][..p.numel()].iter_mut().zip(values).for_each(|(g, x)| *g = x);
            } else if member == 0 {
                grads[index].iter_mut().zip(values).for_each(|(g, x)| *g = x);
            }
        }
    }

    /// One rank's step: its stages run the schedule; ZeRO-1's update sets their parameters to
    /// the summed gradient, which the rank hands back (from one replica per expert share).
    fn run_rank(
        &self,
        schedule: &Schedule,
        comm: Arc<dyn Comm>,
        place: Place,
        whole: &[Tensor<f32>],
        batches: Vec<MicroBatch>,
        mtp_weight: f32,
    ) -> Result<RankResult, String> {
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
            let stage: Box<dyn StageCompute> =
                Box::new(GraphStage::new(training, params, Box::new(data), mtp_weight, Box::new(exchange)));
            (direction, stage)
        });
        let mut held = HeldStages { stages: stages.collect() };
        let to_gradient = |_: Sharing, params: &mut [f32], gradient: &[f32]| params.copy_from_slice(gradient);
        run_step(schedule, comm.as_ref(), place, replicas, &mut held, to_gradient).map_err(|e| e.0)?;
        let mut gradients = Vec::new();
        let mut reports = Vec::new();
        for (direction, stage) in &mut held.stages {
            let index = direction.rank_of(place.pipeline_rank, schedule.ranks);
            reports.push((index, stage.take_report()));
            if *direction == Direction::Down && place.replica < replicas.expert_ranks {
                gradients.push((index, member, Sharing::ALL.map(|sharing| stage.params(sharing))));
            }
        }
        Ok((gradients, reports))
    }
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
        write!(
            f,
            ": {} pipeline stages ({schedule}) × {} data-parallel replicas, the routed experts split over {}",
            self.stages.len(),
            self.replicas.count,
            self.replicas.expert_ranks
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Trainer;
    use dsc_lang::Batch;
    use std::path::Path;

    /// The tiny model with 4 layers (3 MoE) on PP 2 × 4 replicas, the routed experts split
    /// over 2: 8 thread-ranks; 4 micro-batches of 2 sequences of 8 tokens per replica.
    fn tiny_on_eight_ranks(kind: PipelineSchedule) -> Spec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
        let mut spec = dsc_lang::load(&path, &[]).checked_spec().cloned().expect("the tiny model checks");
        spec.model.layers = 4;
        spec.model.ffn.last_mut().expect("an MoE range").layers.end = 4;
        spec.train.seq_len = 8;
        spec.train.micro_batch = 2;
        spec.train.batch = Batch::Constant { sequences: 32 };
        let par = &mut spec.parallel;
        (par.nodes, par.gpus_per_node) = (1, 8);
        par.pipeline.schedule = kind;
        par.pipeline.stages = 2;
        par.data.size = 4;
        par.expert.size = 2;
        spec
    }

    #[test]
    fn the_trainer_on_eight_thread_ranks_reports_what_one_rank_does() {
        for kind in [PipelineSchedule::OneFOneB, PipelineSchedule::Zb1p, PipelineSchedule::Dualpipe] {
            let spec = tiny_on_eight_ranks(kind);
            let mut one = Trainer::<f32>::new(&spec, Numerics::Exact, 3).expect("trains");
            let mut eight = Trainer::<f32>::new(&spec, Numerics::Exact, 3).expect("trains");
            let ranks = eight.on_ranks(Numerics::Exact, Here::Threads).expect("runs on threads");
            assert!(ranks.starts_with("8 thread-ranks"), "{ranks}");
            for step in 0..2 {
                let (a, b) = (one.step().expect("one rank"), eight.step().expect("eight ranks"));
                let close = |x: f64, y: f64| (x - y).abs() <= 1e-4 * x.abs().max(1e-6);
                for (what, x, y) in [
                    ("loss", a.loss, b.loss),
                    ("mtp_loss", a.mtp_loss, b.mtp_loss),
                    ("balance_loss", a.balance_loss, b.balance_loss),
                    ("grad_norm", a.grad_norm, b.grad_norm),
                ] {
                    assert!(close(x, y), "{kind:?} step {step} {what}: one rank {x}, eight {y}");
                }
                // Loads are counts: exactly equal.
                assert_eq!((a.expert_load_max, a.expert_load_mean), (b.expert_load_max, b.expert_load_mean));
                assert_eq!((a.step, a.tokens), (b.step, b.tokens));
                assert!(a.expert_load_max > 0.0, "the MoE layers report their loads");
            }
            for (info, (x, y)) in one.graph().forward.params.iter().zip(one.params().iter().zip(eight.params())) {
                let (x, y) = (&x.as_real().data, &y.as_real().data);
                let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
                let diff = x.iter().zip(y).map(|(u, v)| (u - v) * (u - v)).sum::<f32>().sqrt();
                assert!(diff <= 1e-4 * norm + 1e-6, "{kind:?}: {} off by {diff} of {norm}", info.name);
            }
        }
    }

    #[test]
    fn a_batch_too_small_for_the_schedule_fails_the_step_with_a_reason() {
        let mut spec = tiny_on_eight_ranks(PipelineSchedule::Dualpipe);
        // 2 micro-batches per replica; DualPipe over 2 stages needs 4.
        spec.train.batch = Batch::Constant { sequences: 16 };
        let mut trainer = Trainer::<f32>::new(&spec, Numerics::Exact, 3).expect("trains");
        trainer.on_ranks(Numerics::Exact, Here::Threads).expect("runs on threads");
        let error = trainer.step().expect_err("DualPipe cannot run 2 micro-batches");
        assert!(error.0.contains("DualPipe needs"), "{error}");
    }
}
