//! The per-rank instruction lists of one training step of the pipeline: which forward and
//! backward chunks each pipeline rank runs in which order (1F1B, ZB1P or DualPipe, generated
//! from rules for any valid number of ranks and micro-batches), the sends and receives of
//! activations and gradients between neighbouring stages, and the ZeRO-1 collectives that end
//! the step. Gradient accumulation is implicit: every backward chunk adds its micro-batch's
//! weight gradient into the stage's accumulator, which the reduce-scatter then sums over the
//! replicas. What happens inside a chunk (the MoE all-to-alls of its layers) is the cost
//! model's business ([`super::cost`]).

use std::collections::VecDeque;
use std::fmt;

use dsc_lang::PipelineSchedule;
use serde::Serialize;

/// Which copy of the model a micro-batch flows through. `Down` enters at rank 0 (stage s on
/// rank s); `Up`, DualPipe's second copy, enters at the last rank (stage s on rank PP−1−s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Down,
    Up,
}

impl Direction {
    /// The rank that holds `stage` of this direction; also the stage of this direction that
    /// rank `stage` holds (the map is its own inverse).
    pub fn rank_of(self, stage: usize, ranks: usize) -> usize {
        match self {
            Direction::Down => stage,
            Direction::Up => ranks - 1 - stage,
        }
    }

    fn arrow(self) -> char {
        match self {
            Direction::Down => '↓',
            Direction::Up => '↑',
        }
    }
}

/// One micro-batch: its direction and its index among that direction's micro-batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Micro {
    pub direction: Direction,
    pub index: usize,
}

impl fmt::Display for Micro {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.direction.arrow(), self.index)
    }
}

/// A chunk of computation: one micro-batch through the stage a rank holds for its direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compute {
    Forward(Micro),
    /// The whole backward: input gradient and weight gradient.
    Backward(Micro),
    /// The input gradient only ("B" of ZeroBubble); its weight gradient comes later.
    BackwardInput(Micro),
    /// The weight gradient of an earlier `BackwardInput` ("W").
    BackwardWeight(Micro),
    /// DualPipe's overlapped pair: a forward and a whole backward of two micro-batches, run
    /// together so that each one's all-to-all hides behind the other's computation.
    ForwardBackward {
        forward: Micro,
        backward: Micro,
    },
}

impl Compute {
    /// The micro-batch whose forward this chunk runs.
    pub fn forward(&self) -> Option<Micro> {
        match *self {
            Compute::Forward(micro) | Compute::ForwardBackward { forward: micro, .. } => Some(micro),
            _ => None,
        }
    }

    /// The micro-batch whose input gradient this chunk computes.
    pub fn input_gradient(&self) -> Option<Micro> {
        match *self {
            Compute::Backward(micro)
            | Compute::BackwardInput(micro)
            | Compute::ForwardBackward { backward: micro, .. } => Some(micro),
            _ => None,
        }
    }

    /// The micro-batch whose weight gradient this chunk computes.
    pub fn weight_gradient(&self) -> Option<Micro> {
        match *self {
            Compute::Backward(micro)
            | Compute::BackwardWeight(micro)
            | Compute::ForwardBackward { backward: micro, .. } => Some(micro),
            _ => None,
        }
    }
}

/// What travels between neighbouring stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tensor {
    /// A stage's output, the next stage's input.
    Activation(Micro),
    /// The gradient of a stage's input, the previous stage's output gradient.
    Gradient(Micro),
}

impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tensor::Activation(micro) => write!(f, "activation {micro}"),
            Tensor::Gradient(micro) => write!(f, "gradient {micro}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Instruction {
    Compute(Compute),
    /// Hands a tensor to the link and goes on (the transfer overlaps what follows).
    Send {
        to: usize,
        tensor: Tensor,
    },
    /// Waits until the tensor has arrived.
    Recv {
        from: usize,
        tensor: Tensor,
    },
    /// ZeRO-1: sums the accumulated gradients over every copy of this rank's parameters (the
    /// data-parallel replicas; with DualPipe also the rank holding the other direction's copy)
    /// and keeps this GPU's shard. A collective of [`Schedule::replica_peers`].
    ReduceScatterGrads,
    /// AdamW on this GPU's shard of the optimizer state.
    OptimizerStep,
    /// ZeRO-1: gathers the updated parameter shards. A collective like `ReduceScatterGrads`.
    AllGatherParams,
}

impl fmt::Display for Instruction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Instruction::Compute(Compute::Forward(m)) => write!(f, "forward {m}"),
            Instruction::Compute(Compute::Backward(m)) => write!(f, "backward {m}"),
            Instruction::Compute(Compute::BackwardInput(m)) => write!(f, "backward-input {m}"),
            Instruction::Compute(Compute::BackwardWeight(m)) => write!(f, "backward-weight {m}"),
            Instruction::Compute(Compute::ForwardBackward { forward, backward }) => {
                write!(f, "forward {forward} + backward {backward}")
            }
            Instruction::Send { to, tensor } => write!(f, "send {tensor} to {to}"),
            Instruction::Recv { from, tensor } => write!(f, "recv {tensor} from {from}"),
            Instruction::ReduceScatterGrads => write!(f, "reduce-scatter grads"),
            Instruction::OptimizerStep => write!(f, "optimizer step"),
            Instruction::AllGatherParams => write!(f, "all-gather params"),
        }
    }
}

/// One training step: an instruction list per pipeline rank.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Schedule {
    pub kind: PipelineSchedule,
    /// Pipeline ranks (= stages per direction).
    pub ranks: usize,
    /// Micro-batches per step, all directions together.
    pub micro_batches: usize,
    pub programs: Vec<Vec<Instruction>>,
}

/// Why no schedule of a kind exists for a size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerateError(pub String);

impl fmt::Display for GenerateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GenerateError {}

impl Schedule {
    /// The schedule `kind` for `ranks` pipeline ranks and `micro_batches` per step.
    pub fn generate(kind: PipelineSchedule, ranks: usize, micro_batches: usize) -> Result<Schedule, GenerateError> {
        check_size(kind, ranks, micro_batches)?;
        let mut schedule = Schedule { kind, ranks, micro_batches, programs: Vec::with_capacity(ranks) };
        for rank in 0..ranks {
            let chunks = match kind {
                PipelineSchedule::OneFOneB => one_f_one_b(ranks, micro_batches, rank, false),
                PipelineSchedule::Zb1p => one_f_one_b(ranks, micro_batches, rank, true),
                PipelineSchedule::Dualpipe => dualpipe(ranks, micro_batches, rank),
            };
            let program = schedule.with_transfers(rank, &chunks);
            schedule.programs.push(program);
        }
        Ok(schedule)
    }

    /// The directions micro-batches flow in.
    pub fn directions(&self) -> &'static [Direction] {
        match self.kind {
            PipelineSchedule::Dualpipe => &[Direction::Down, Direction::Up],
            PipelineSchedule::OneFOneB | PipelineSchedule::Zb1p => &[Direction::Down],
        }
    }

    /// Micro-batches that flow in each direction.
    pub fn micro_batches_per_direction(&self) -> usize {
        self.micro_batches / self.directions().len()
    }

    /// The stages a rank holds, one per direction: (direction, stage).
    pub fn held(&self, rank: usize) -> impl Iterator<Item = (Direction, usize)> + '_ {
        self.directions().iter().map(move |&direction| (direction, direction.rank_of(rank, self.ranks)))
    }

    /// The pipeline ranks that hold copies of the same parameters as `rank` and so take part in
    /// its ZeRO collectives (the data-parallel replicas aside): itself, and with DualPipe the
    /// rank holding the same two stages for the other direction.
    pub fn replica_peers(&self, rank: usize) -> Vec<usize> {
        let mut peers: Vec<usize> = self.directions().iter().map(|d| d.rank_of(rank, self.ranks)).collect();
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    /// Compute chunks in order, with the transfers they need: a receive right before the chunk
    /// that consumes it, a send right after the chunk that produces it, then the ZeRO-1 end of
    /// the step.
    fn with_transfers(&self, rank: usize, chunks: &[Compute]) -> Vec<Instruction> {
        let last = self.ranks - 1;
        let mut program = Vec::new();
        for chunk in chunks {
            if let Some(micro) = chunk.forward() {
                let stage = micro.direction.rank_of(rank, self.ranks);
                if stage > 0 {
                    let from = micro.direction.rank_of(stage - 1, self.ranks);
                    program.push(Instruction::Recv { from, tensor: Tensor::Activation(micro) });
                }
            }
            if let Some(micro) = chunk.input_gradient() {
                let stage = micro.direction.rank_of(rank, self.ranks);
                if stage < last {
                    let from = micro.direction.rank_of(stage + 1, self.ranks);
                    program.push(Instruction::Recv { from, tensor: Tensor::Gradient(micro) });
                }
            }
            program.push(Instruction::Compute(*chunk));
            if let Some(micro) = chunk.forward() {
                let stage = micro.direction.rank_of(rank, self.ranks);
                if stage < last {
                    let to = micro.direction.rank_of(stage + 1, self.ranks);
                    program.push(Instruction::Send { to, tensor: Tensor::Activation(micro) });
                }
            }
            if let Some(micro) = chunk.input_gradient() {
                let stage = micro.direction.rank_of(rank, self.ranks);
                if stage > 0 {
                    let to = micro.direction.rank_of(stage - 1, self.ranks);
                    program.push(Instruction::Send { to, tensor: Tensor::Gradient(micro) });
                }
            }
        }
        program.extend([Instruction::ReduceScatterGrads, Instruction::OptimizerStep, Instruction::AllGatherParams]);
        program
    }
}

fn check_size(kind: PipelineSchedule, ranks: usize, micro_batches: usize) -> Result<(), GenerateError> {
    let fail = |message: String| Err(GenerateError(message));
    if ranks == 0 {
        return fail("a pipeline needs at least one rank".into());
    }
    if micro_batches == 0 {
        return fail("a step needs at least one micro-batch".into());
    }
    if kind == PipelineSchedule::Dualpipe {
        if !ranks.is_multiple_of(2) {
            return fail(format!("DualPipe needs an even number of pipeline ranks, found {ranks}"));
        }
        if !micro_batches.is_multiple_of(2) || micro_batches < 2 * ranks {
            return fail(format!(
                "DualPipe needs an even number of micro-batches, at least twice the {ranks} pipeline ranks \
                 ({} or more), found {micro_batches}",
                2 * ranks
            ));
        }
    }
    Ok(())
}

/// 1F1B, or with `split_backward` ZB1P (ZeroBubble's ZB-H1), as slots: in slot x rank i runs
/// forward x, then the backward of micro-batch x − (PP−1−i) (its warm-up keeps PP−i forwards
/// in flight), and with ZB1P the weight gradient of micro-batch x − (PP−1): the input gradient
/// goes up the pipeline at once, and the deferred weight gradients fill what would be bubbles
/// while the peak stays at PP micro-batches on rank 0.
fn one_f_one_b(ranks: usize, micro_batches: usize, rank: usize, split_backward: bool) -> Vec<Compute> {
    let micro = |x: usize, lag: usize| {
        x.checked_sub(lag)
            .filter(|&index| index < micro_batches)
            .map(|index| Micro { direction: Direction::Down, index })
    };
    let mut chunks = Vec::new();
    for x in 0..micro_batches + ranks - 1 {
        chunks.extend(micro(x, 0).map(Compute::Forward));
        if split_backward {
            chunks.extend(micro(x, ranks - 1 - rank).map(Compute::BackwardInput));
            chunks.extend(micro(x, ranks - 1).map(Compute::BackwardWeight));
        } else {
            chunks.extend(micro(x, ranks - 1 - rank).map(Compute::Backward));
        }
    }
    chunks
}

/// DualPipe (DeepSeek-V3 report, fig. 5). A rank in the first half holds stage i of the down
/// direction and stage PP−1−i of the up one; the second half mirrors it, so every rank is
/// described by its distance h from the nearer end and its "near" direction (the one in which
/// it is stage h) and "far" one (stage PP−1−h). Eight phases:
/// 1. 2(PP/2−h−1) near forwards (the far direction's first micro-batch is still on its way);
/// 2. h+1 pairs of near and far forwards;
/// 3. PP/2−h−1 times: far input-gradient, its weight gradient, far forward;
/// 4. the steady state, n−PP+h+1 times (n micro-batches per direction): overlapped near
///    forward + far backward, then far forward + near backward (the two middle ranks run their
///    first pair apart, which shortens the bubble);
/// 5. PP/2−h−1 times: far backward, then far forward + near backward;
/// 6. h+1 pairs of far and near backwards, the second half split ZeroBubble-style;
/// 7. PP/2−h−1 times: a deferred weight gradient, then a split near backward;
/// 8. the h+1 weight gradients still deferred.
fn dualpipe(ranks: usize, micro_batches: usize, rank: usize) -> Vec<Compute> {
    let half_ranks = ranks / 2;
    let per_direction = micro_batches / 2;
    let h = rank.min(ranks - 1 - rank);
    let middle = h == half_ranks - 1;
    let (near, far) =
        if rank < half_ranks { (Direction::Down, Direction::Up) } else { (Direction::Up, Direction::Down) };
    let mut rank_chunks = DualPipeRank::default();
    let r = &mut rank_chunks;
    for _ in 0..2 * (half_ranks - h - 1) {
        r.forward(near);
    }
    for _ in 0..h + 1 {
        r.forward(near);
        r.forward(far);
    }
    for _ in 0..half_ranks - h - 1 {
        r.backward(far, true);
        r.weight();
        r.forward(far);
    }
    for i in 0..per_direction + h + 1 - ranks {
        if i == 0 && middle {
            r.forward(near);
            r.backward(far, false);
        } else {
            r.forward_backward(near, far);
        }
        r.forward_backward(far, near);
    }
    for _ in 0..half_ranks - h - 1 {
        r.backward(far, false);
        r.forward_backward(far, near);
    }
    // Of these 2(h+1) backwards, the last h+1 are split.
    let steps = h + 1;
    let mut split = false;
    for i in 0..steps {
        split |= i == steps / 2 && !h.is_multiple_of(2);
        r.backward(far, split);
        split |= i == steps / 2 && h.is_multiple_of(2);
        r.backward(near, split);
    }
    for _ in 0..half_ranks - h - 1 {
        r.weight();
        r.backward(near, true);
    }
    for _ in 0..h + 1 {
        r.weight();
    }
    rank_chunks.chunks
}

/// The chunks of one DualPipe rank as they are generated: the next micro-batch to run forward
/// and backward in each direction, and the weight gradients deferred so far (oldest first).
#[derive(Default)]
struct DualPipeRank {
    chunks: Vec<Compute>,
    next_forward: [usize; 2],
    next_backward: [usize; 2],
    deferred: VecDeque<Micro>,
}

impl DualPipeRank {
    fn take(counters: &mut [usize; 2], direction: Direction) -> Micro {
        let counter = &mut counters[direction as usize];
        *counter += 1;
        Micro { direction, index: *counter - 1 }
    }

    fn forward(&mut self, direction: Direction) {
        let micro = Self::take(&mut self.next_forward, direction);
        self.chunks.push(Compute::Forward(micro));
    }

    fn backward(&mut self, direction: Direction, split: bool) {
        let micro = Self::take(&mut self.next_backward, direction);
        if split {
            self.deferred.push_back(micro);
            self.chunks.push(Compute::BackwardInput(micro));
        } else {
            self.chunks.push(Compute::Backward(micro));
        }
    }

    fn weight(&mut self) {
        let micro = self.deferred.pop_front().expect("DualPipe defers a weight gradient before it runs one");
        self.chunks.push(Compute::BackwardWeight(micro));
    }

    fn forward_backward(&mut self, forward: Direction, backward: Direction) {
        let forward = Self::take(&mut self.next_forward, forward);
        let backward = Self::take(&mut self.next_backward, backward);
        self.chunks.push(Compute::ForwardBackward { forward, backward });
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            PipelineSchedule::OneFOneB => "1F1B",
            PipelineSchedule::Zb1p => "ZB1P",
            PipelineSchedule::Dualpipe => "DualPipe",
        };
        writeln!(f, "{kind}: {} pipeline ranks, {} micro-batches per step", self.ranks, self.micro_batches)?;
        for (rank, program) in self.programs.iter().enumerate() {
            let held: Vec<String> =
                self.held(rank).map(|(direction, stage)| format!("stage {stage} {}", direction.arrow())).collect();
            writeln!(f, "rank {rank} ({}):", held.join(", "))?;
            for instruction in program {
                writeln!(f, "  {instruction}")?;
            }
        }
        Ok(())
    }
}
