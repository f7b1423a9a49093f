//! Runs a compiled pipeline [`Schedule`] on thread-ranks. Each rank (a pipeline rank of one
//! data-parallel replica) walks its instruction list: compute chunks call the [`StageCompute`]
//! of the stage it holds for the micro-batch's direction, sends and receives move activations
//! and gradients through a [`Comm`] (threads of one process, or processes), and the step ends
//! with ZeRO-1 over every copy of the rank's parameters: reduce-scatter of the accumulated
//! gradients, the optimizer on this rank's shard (clipping by the whole model's gradient norm,
//! which one small collective over every rank gives), all-gather of the parameters into every
//! copy. Most parameters have a copy on every replica (and, with DualPipe, on the rank holding
//! the other direction's stage); the routed experts, split over the consecutive replicas of an
//! expert-parallel group, only on the replicas holding the same experts ([`Sharing`]). What a
//! stage computes, the MoE all-to-alls within its expert-parallel group included, stays behind
//! the trait, so the same executor runs any stage implementation.

use dsc_compiler::parallel::schedule::{Compute, Direction, Instruction, Micro, Schedule, Tensor};

use std::collections::HashMap;

use crate::comm::{self, Comm, CommError};

/// Which ranks hold copies of a parameter, sum its gradient and share its update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// Every replica, and with DualPipe the rank holding the other direction's copy.
    Replicated,
    /// The routed experts: the replicas holding the same experts (one per expert-parallel
    /// group), and their DualPipe copies.
    Experts,
}

impl Sharing {
    pub const ALL: [Sharing; 2] = [Sharing::Replicated, Sharing::Experts];

    fn name(self) -> &'static str {
        match self {
            Sharing::Replicated => "replicated",
            Sharing::Experts => "experts",
        }
    }
}

/// One stage of the model for one direction, on one rank (made on the rank's thread).
pub trait StageCompute {
    /// The forward of `micro`: `input` is the previous stage's output (`None` on the first
    /// stage, which reads the micro-batch itself); returns what the next stage gets.
    fn forward(&mut self, micro: Micro, input: Option<Vec<f32>>) -> Result<Vec<f32>, CommError>;
    /// The input gradient of `micro`: `output_gradient` comes from the next stage (`None` on the
    /// last stage, where the loss starts the backward); returns the previous stage's.
    fn backward_input(&mut self, micro: Micro, output_gradient: Option<Vec<f32>>) -> Result<Vec<f32>, CommError>;
    /// Adds the weight gradient of `micro` to the stage's accumulated gradient.
    fn backward_weight(&mut self, micro: Micro);
    /// The parameters of one sharing, flat.
    fn params(&self, sharing: Sharing) -> Vec<f32>;
    fn set_params(&mut self, sharing: Sharing, params: &[f32]);
    /// The gradient of one sharing's parameters accumulated over the step's micro-batches,
    /// flat; their accumulator restarts.
    fn take_gradient(&mut self, sharing: Sharing) -> Vec<f32>;
    /// The loss terms the stage's forwards computed since the last report.
    fn loss(&self) -> f64;
    /// What the stage's forwards computed since the last call, summed over micro-batches (the
    /// model's loss per micro-batch is the sum of its stages' terms).
    fn take_report(&mut self) -> StageReport;
}

/// What a stage's forwards report, summed over micro-batches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageReport {
    /// The model's loss terms: the last stage's loss, every stage's balance loss.
    pub loss: f64,
    /// The last stage's main and MTP losses, and the balance loss.
    pub main_loss: f64,
    pub mtp_loss: f64,
    pub balance_loss: f64,
    /// Per MoE block of the stage, in model order: tokens per expert.
    pub loads: Vec<Vec<f64>>,
}

/// How many replicas of the pipeline run, and how many consecutive ones form an
/// expert-parallel group (each holding its share of the routed experts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replicas {
    pub count: usize,
    pub expert_ranks: usize,
}

/// Where a rank is: its pipeline rank and data-parallel replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub pipeline_rank: usize,
    pub replica: usize,
}

impl Place {
    /// The rank's id among all thread-ranks: replica-major.
    pub fn id(&self, schedule: &Schedule) -> usize {
        self.replica * schedule.ranks + self.pipeline_rank
    }

    /// The ranks of this one's expert-parallel group (itself included), in the order of the
    /// experts they hold; its position there is its replica modulo the group's size.
    pub fn expert_group(&self, schedule: &Schedule, replicas: Replicas) -> Vec<usize> {
        let first = self.replica - self.replica % replicas.expert_ranks;
        (first..first + replicas.expert_ranks)
            .map(|replica| Place { pipeline_rank: self.pipeline_rank, replica }.id(schedule))
            .collect()
    }
}

/// A rank's stages, one per direction the schedule has.
pub struct HeldStages {
    pub stages: Vec<(Direction, Box<dyn StageCompute>)>,
}

impl HeldStages {
    fn of(&mut self, direction: Direction) -> &mut dyn StageCompute {
        let (_, stage) = self
            .stages
            .iter_mut()
            .find(|(held, _)| *held == direction)
            .expect("a rank holds a stage for every direction of its schedule");
        stage.as_mut()
    }

    /// The stages in order of their stage index: the order the copies of the same parameters
    /// have on every rank that holds them.
    fn by_stage(&mut self, schedule: &Schedule, rank: usize) -> Vec<&mut dyn StageCompute> {
        let mut stages: Vec<_> = self.stages.iter_mut().collect();
        stages.sort_by_key(|(direction, _)| direction.rank_of(rank, schedule.ranks));
        stages.into_iter().map(|(_, stage)| stage.as_mut() as &mut dyn StageCompute).collect()
    }
}

/// How a step ended on every rank: the sum of the squares of the whole model's summed
/// gradient, and whether the optimizer ran (it does not when that sum or a loss is not finite).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepEnd {
    pub square_sum: f64,
    pub updated: bool,
}

/// Runs one step of `schedule` (a checked one: [`dsc_compiler::parallel::check`]) as the rank
/// at `place`; all `replicas` run the same schedule. `update` applies the optimizer to this
/// rank's shard of one sharing's parameters, given the shard of their summed gradient and the
/// square sum of the whole model's ([`StepEnd`]).
pub fn run_step(
    schedule: &Schedule,
    comm: &dyn Comm,
    place: Place,
    replicas: Replicas,
    held: &mut HeldStages,
    mut update: impl FnMut(Sharing, &mut [f32], &[f32], f64),
) -> Result<StepEnd, CommError> {
    let rank = place.pipeline_rank;
    let me = place.id(schedule);
    let peer = |pipeline_rank: usize| Place { pipeline_rank, replica: place.replica }.id(schedule);
    let groups = Sharing::ALL.map(|sharing| group(schedule, place, replicas, sharing));
    let mut tensors = Tensors { schedule, rank, received: HashMap::new(), computed: HashMap::new() };
    let mut shards: [Vec<f32>; 2] = Default::default();
    let mut end = StepEnd { square_sum: 0.0, updated: false };
    for instruction in &schedule.programs[rank] {
        match *instruction {
            Instruction::Compute(chunk) => tensors.compute(held, &chunk)?,
            Instruction::Send { to, tensor } => {
                let data = tensors.computed.remove(&tensor).expect("a checked schedule computes before it sends");
                comm.send(me, peer(to), &tensor.to_string(), data)?;
            }
            Instruction::Recv { from, tensor } => {
                let data = comm.recv(peer(from), me, &tensor.to_string())?;
                tensors.received.insert(tensor, data);
            }
            Instruction::ReduceScatterGrads => {
                for ((sharing, group), shard) in Sharing::ALL.into_iter().zip(&groups).zip(&mut shards) {
                    let stages = held.by_stage(schedule, rank).into_iter();
                    let gradient: Vec<f32> = stages.flat_map(|stage| stage.take_gradient(sharing)).collect();
                    *shard = comm.reduce_scatter(group, me, &format!("{} gradients", sharing.name()), gradient)?;
                }
            }
            Instruction::OptimizerStep => {
                // Every element of the model's gradient is in one rank's shard: the squares of
                // all shards add up to the whole gradient's. The losses come along, so that
                // every rank agrees whether the step is finite.
                let square_sum = shards.iter().flatten().map(|&g| f64::from(g) * f64::from(g)).sum();
                let loss = held.stages.iter().map(|(_, stage)| stage.loss()).sum();
                let world: Vec<usize> = (0..replicas.count * schedule.ranks).collect();
                let [square_sum, loss] = comm.sum_exact(&world, me, "gradient norm", &[square_sum, loss])?[..] else {
                    unreachable!("a sum of two values is two values")
                };
                end = StepEnd { square_sum, updated: square_sum.is_finite() && loss.is_finite() };
                for ((sharing, group), shard) in Sharing::ALL.into_iter().zip(&groups).zip(&mut shards) {
                    let stages = held.by_stage(schedule, rank).into_iter();
                    let params: Vec<f32> = stages.flat_map(|stage| stage.params(sharing)).collect();
                    let position = group.iter().position(|&member| member == me).expect("a rank is in its groups");
                    let mut mine = params[comm::shard(params.len(), group.len(), position)].to_vec();
                    if end.updated {
                        update(sharing, &mut mine, shard, square_sum);
                    }
                    *shard = mine;
                }
            }
            Instruction::AllGatherParams => {
                for ((sharing, group), shard) in Sharing::ALL.into_iter().zip(&groups).zip(&mut shards) {
                    let name = format!("{} parameters", sharing.name());
                    let params = comm.all_gather_shards(group, me, &name, std::mem::take(shard))?;
                    let mut offset = 0;
                    for stage in held.by_stage(schedule, rank) {
                        let len = stage.params(sharing).len();
                        stage.set_params(sharing, &params[offset..offset + len]);
                        offset += len;
                    }
                }
            }
        }
    }
    Ok(end)
}

/// The tensors a rank holds between instructions: received and not yet consumed, computed and
/// not yet sent.
struct Tensors<'a> {
    schedule: &'a Schedule,
    rank: usize,
    received: HashMap<Tensor, Vec<f32>>,
    computed: HashMap<Tensor, Vec<f32>>,
}

impl Tensors<'_> {
    fn compute(&mut self, held: &mut HeldStages, chunk: &Compute) -> Result<(), CommError> {
        let last = self.schedule.ranks - 1;
        let (rank, ranks) = (self.rank, self.schedule.ranks);
        let stage_of = |micro: Micro| micro.direction.rank_of(rank, ranks);
        if let Some(micro) = chunk.forward() {
            let stage = stage_of(micro);
            let input = (stage > 0).then(|| self.take(Tensor::Activation(micro)));
            let output = held.of(micro.direction).forward(micro, input)?;
            if stage < last {
                self.computed.insert(Tensor::Activation(micro), output);
            }
        }
        if let Some(micro) = chunk.input_gradient() {
            let stage = stage_of(micro);
            let output_gradient = (stage < last).then(|| self.take(Tensor::Gradient(micro)));
            let input_gradient = held.of(micro.direction).backward_input(micro, output_gradient)?;
            if stage > 0 {
                self.computed.insert(Tensor::Gradient(micro), input_gradient);
            }
        }
        if let Some(micro) = chunk.weight_gradient() {
            held.of(micro.direction).backward_weight(micro);
        }
        Ok(())
    }

    fn take(&mut self, tensor: Tensor) -> Vec<f32> {
        self.received.remove(&tensor).expect("a checked schedule receives before it computes")
    }
}

/// The thread-ranks holding copies of `place`'s parameters of `sharing`, sorted.
pub(super) fn group(schedule: &Schedule, place: Place, replicas: Replicas, sharing: Sharing) -> Vec<usize> {
    let expert_rank = place.replica % replicas.expert_ranks;
    let holders = (0..replicas.count)
        .filter(|replica| sharing == Sharing::Replicated || replica % replicas.expert_ranks == expert_rank);
    let mut group: Vec<usize> = holders
        .flat_map(|replica| {
            schedule
                .replica_peers(place.pipeline_rank)
                .into_iter()
                .map(move |pipeline_rank| Place { pipeline_rank, replica }.id(schedule))
        })
        .collect();
    group.sort_unstable();
    group
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::ThreadComm;
    use dsc_compiler::parallel::check::check;
    use dsc_lang::PipelineSchedule;
    use std::time::Duration;

    const WIDTH: usize = 3;
    const LR: f32 = 0.1;

    /// A stage of a toy model, `y = tanh(W x)` on vectors of `WIDTH`; the last stage's loss is
    /// ½‖y‖². The first stage reads micro-batch g's input from `input(g)`.
    struct TanhLayer {
        w: Vec<f32>,
        first: bool,
        last: bool,
        /// The global index of a micro-batch (replica and direction included).
        global: Box<dyn Fn(Micro) -> usize + Send>,
        saved: HashMap<Micro, (Vec<f32>, Vec<f32>)>,
        /// Input and pre-activation gradient of input gradients whose weight gradient is due.
        due: HashMap<Micro, (Vec<f32>, Vec<f32>)>,
        gradient: Vec<f32>,
        loss: f64,
    }

    fn initial_weights(stage: usize) -> Vec<f32> {
        (0..WIDTH * WIDTH).map(|i| ((stage * 31 + i * 7) as f32).sin() * 0.8).collect()
    }

    fn input(global: usize) -> Vec<f32> {
        (0..WIDTH).map(|j| ((global * 13 + j * 5) as f32).cos()).collect()
    }

    fn layer_forward(w: &[f32], x: &[f32]) -> Vec<f32> {
        (0..WIDTH).map(|i| (0..WIDTH).map(|j| w[i * WIDTH + j] * x[j]).sum::<f32>().tanh()).collect()
    }

    /// The pre-activation gradient and the input gradient.
    fn layer_backward(w: &[f32], y: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let dz: Vec<f32> = y.iter().zip(dy).map(|(y, dy)| dy * (1.0 - y * y)).collect();
        let dx = (0..WIDTH).map(|j| (0..WIDTH).map(|i| w[i * WIDTH + j] * dz[i]).sum()).collect();
        (dz, dx)
    }

    fn add_weight_gradient(gradient: &mut [f32], x: &[f32], dz: &[f32]) {
        for i in 0..WIDTH {
            for j in 0..WIDTH {
                gradient[i * WIDTH + j] += dz[i] * x[j];
            }
        }
    }

    impl StageCompute for TanhLayer {
        fn forward(&mut self, micro: Micro, input_activation: Option<Vec<f32>>) -> Result<Vec<f32>, CommError> {
            assert_eq!(input_activation.is_none(), self.first);
            let x = input_activation.unwrap_or_else(|| input((self.global)(micro)));
            let y = layer_forward(&self.w, &x);
            if self.last {
                self.loss += y.iter().map(|y| 0.5 * f64::from(y * y)).sum::<f64>();
            }
            self.saved.insert(micro, (x, y.clone()));
            Ok(y)
        }
        fn backward_input(&mut self, micro: Micro, output_gradient: Option<Vec<f32>>) -> Result<Vec<f32>, CommError> {
            assert_eq!(output_gradient.is_none(), self.last);
            let (x, y) = self.saved.remove(&micro).expect("forward first");
            // d(½‖y‖²)/dy = y.
            let dy = output_gradient.unwrap_or_else(|| y.clone());
            let (dz, dx) = layer_backward(&self.w, &y, &dy);
            self.due.insert(micro, (x, dz));
            Ok(dx)
        }
        fn backward_weight(&mut self, micro: Micro) {
            let (x, dz) = self.due.remove(&micro).expect("input gradient first");
            add_weight_gradient(&mut self.gradient, &x, &dz);
        }
        // The toy has no experts: all its weights are replicated.
        fn params(&self, sharing: Sharing) -> Vec<f32> {
            if sharing == Sharing::Replicated {
                self.w.clone()
            } else {
                Vec::new()
            }
        }
        fn set_params(&mut self, sharing: Sharing, params: &[f32]) {
            if sharing == Sharing::Replicated {
                self.w = params.to_vec();
            }
        }
        fn take_gradient(&mut self, sharing: Sharing) -> Vec<f32> {
            if sharing == Sharing::Replicated {
                std::mem::replace(&mut self.gradient, vec![0.0; WIDTH * WIDTH])
            } else {
                Vec::new()
            }
        }
        fn loss(&self) -> f64 {
            self.loss
        }
        fn take_report(&mut self) -> StageReport {
            StageReport { loss: std::mem::take(&mut self.loss), ..StageReport::default() }
        }
    }

    /// The loss summed over all `micro_batches` of every replica, the sum of the squares of its
    /// gradient and the stages' weights after one SGD step on it, run on one rank: every
    /// micro-batch through every stage, forward then backward.
    fn single_rank(stages: usize, micro_batches: usize) -> (f64, f64, Vec<Vec<f32>>) {
        let weights: Vec<Vec<f32>> = (0..stages).map(initial_weights).collect();
        let mut gradients = vec![vec![0.0f32; WIDTH * WIDTH]; stages];
        let mut loss = 0.0;
        for global in 0..micro_batches {
            let mut activations = vec![input(global)];
            for w in &weights {
                let y = layer_forward(w, activations.last().expect("an input"));
                activations.push(y);
            }
            let mut dy = activations[stages].clone();
            loss += dy.iter().map(|y| 0.5 * f64::from(y * y)).sum::<f64>();
            for stage in (0..stages).rev() {
                let (dz, dx) = layer_backward(&weights[stage], &activations[stage + 1], &dy);
                add_weight_gradient(&mut gradients[stage], &activations[stage], &dz);
                dy = dx;
            }
        }
        let square_sum = gradients.iter().flatten().map(|&g| f64::from(g) * f64::from(g)).sum();
        let updated = weights.iter().zip(&gradients).map(|(w, g)| w.iter().zip(g).map(|(w, g)| w - LR * g).collect());
        (loss, square_sum, updated.collect())
    }

    /// A thread's stage after a step: (pipeline rank, replica, stage index, weights).
    type StageWeights = (usize, usize, usize, Vec<f32>);

    /// Runs one step of `kind` on `ranks` × `replicas` threads; returns the loss the stages
    /// computed, how the step ended on each thread, and each thread's stages' weights
    /// afterwards, by (pipeline rank, replica, stage index).
    fn threaded(
        kind: PipelineSchedule,
        ranks: usize,
        micro_batches: usize,
        replicas: usize,
    ) -> (f64, Vec<StepEnd>, Vec<StageWeights>) {
        let schedule = Schedule::generate(kind, ranks, micro_batches).expect("a valid size");
        check(&schedule).expect("checks");
        let comm = ThreadComm::new(Duration::from_secs(10));
        let per_direction = schedule.micro_batches_per_direction();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..replicas)
                .flat_map(|replica| (0..ranks).map(move |pipeline_rank| Place { pipeline_rank, replica }))
                .map(|place| {
                    let (schedule, comm) = (&schedule, &comm);
                    scope.spawn(move || {
                        let stages = schedule
                            .held(place.pipeline_rank)
                            .map(|(direction, stage)| {
                                let global = move |micro: Micro| {
                                    let offset = if micro.direction == Direction::Up { per_direction } else { 0 };
                                    place.replica * micro_batches + offset + micro.index
                                };
                                let layer = TanhLayer {
                                    w: initial_weights(stage),
                                    first: stage == 0,
                                    last: stage == ranks - 1,
                                    global: Box::new(global),
                                    saved: HashMap::new(),
                                    due: HashMap::new(),
                                    gradient: vec![0.0; WIDTH * WIDTH],
                                    loss: 0.0,
                                };
                                (direction, Box::new(layer) as Box<dyn StageCompute>)
                            })
                            .collect();
                        let mut held = HeldStages { stages };
                        let sgd = |_: Sharing, params: &mut [f32], gradient: &[f32], _: f64| {
                            params.iter_mut().zip(gradient).for_each(|(p, g)| *p -= LR * g);
                        };
                        let replicas = Replicas { count: replicas, expert_ranks: 1 };
                        let end = run_step(schedule, comm, place, replicas, &mut held, sgd).expect("no rank times out");
                        let ranks = schedule.ranks;
                        let stages = held
                            .stages
                            .iter_mut()
                            .map(|(direction, stage)| {
                                let stage_index = direction.rank_of(place.pipeline_rank, ranks);
                                let weights = stage.params(Sharing::Replicated);
                                (stage.take_report().loss, (place.pipeline_rank, place.replica, stage_index, weights))
                            })
                            .collect::<Vec<_>>();
                        (end, stages)
                    })
                })
                .collect();
            let (ends, stages): (Vec<_>, Vec<_>) =
                handles.into_iter().map(|handle| handle.join().expect("the rank ran")).unzip();
            let stages: Vec<_> = stages.into_iter().flatten().collect();
            let loss = stages.iter().map(|(loss, _)| loss).sum();
            (loss, ends, stages.into_iter().map(|(_, weights)| weights).collect())
        })
    }

    #[test]
    fn every_schedule_trains_like_one_rank() {
        for kind in [PipelineSchedule::OneFOneB, PipelineSchedule::Zb1p, PipelineSchedule::Dualpipe] {
            for (ranks, micro_batches, replicas) in [(2, 4, 1), (2, 4, 2), (4, 8, 2), (4, 12, 1)] {
                let (expected_loss, square_sum, expected) = single_rank(ranks, micro_batches * replicas);
                let (loss, ends, weights) = threaded(kind, ranks, micro_batches, replicas);
                assert!((loss - expected_loss).abs() < 1e-5 * expected_loss, "{kind:?}: {loss} vs {expected_loss}");
                // Every rank has the whole gradient's square sum, the same bits.
                assert!(ends.iter().all(|end| *end == ends[0] && end.updated), "{ends:?}");
                let error = (ends[0].square_sum - square_sum).abs();
                assert!(error < 1e-5 * square_sum, "{kind:?}: square sum {} vs {square_sum}", ends[0].square_sum);
                let copies = if kind == PipelineSchedule::Dualpipe { 2 } else { 1 };
                assert_eq!(weights.len(), ranks * replicas * copies);
                for (rank, replica, stage, w) in weights {
                    let error = w.iter().zip(&expected[stage]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                    assert!(error < 1e-5, "{kind:?} PP {ranks} × DP {replicas}: rank {rank} replica {replica} stage {stage} off by {error}");
                }
            }
        }
    }

    #[test]
    fn a_rank_that_never_comes_fails_the_others_in_time() {
        let schedule = Schedule::generate(PipelineSchedule::OneFOneB, 2, 2).expect("a valid size");
        let comm = ThreadComm::new(Duration::from_millis(100));
        // Rank 0 never runs; rank 1 waits for its first activation.
        let layer = TanhLayer {
            w: initial_weights(1),
            first: false,
            last: true,
            global: Box::new(|micro| micro.index),
            saved: HashMap::new(),
            due: HashMap::new(),
            gradient: vec![0.0; WIDTH * WIDTH],
            loss: 0.0,
        };
        let mut held = HeldStages { stages: vec![(Direction::Down, Box::new(layer))] };
        let place = Place { pipeline_rank: 1, replica: 0 };
        let alone = Replicas { count: 1, expert_ranks: 1 };
        let error = run_step(&schedule, &comm, place, alone, &mut held, |_, _, _, _| {}).expect_err("times out");
        assert!(error.0.starts_with("rank 1 waited for activation ↓0 from rank 0 for 100ms"), "{error}");
    }
}
