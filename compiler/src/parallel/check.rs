//! The schedule checker: a [`Schedule`] is accepted only if every send has its receive (and
//! the reverse), tensors go between neighbouring stages of their direction, each rank's data
//! dependencies hold in its own order (a forward after its input arrived, a backward after its
//! forward and its output gradient, a weight gradient after its input gradient, the step's end
//! after every micro-batch's gradients), every micro-batch is run exactly once on every stage,
//! and the ranks cannot deadlock when every receive blocks until its tensor has arrived and
//! sends are buffered (posted asynchronously, as DualPipe's and Megatron's isend are: a rank
//! never waits for its own sends; with rendezvous sends the lists would need their receives
//! posted ahead of use). It also computes each rank's peak of
//! activations in flight (a micro-batch's activations live from its forward to its weight
//! gradient).

use std::collections::{HashMap, HashSet};
use std::fmt;

use super::execute::{self, UnitTimes};
use super::schedule::{Compute, Direction, Instruction, Micro, Schedule, Tensor};

/// Why a schedule was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckError(pub String);

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CheckError {}

/// Checks `schedule`; on success returns each rank's peak count of micro-batches in flight.
pub fn check(schedule: &Schedule) -> Result<Vec<usize>, CheckError> {
    if schedule.programs.len() != schedule.ranks {
        return Err(CheckError(format!(
            "{} instruction lists for {} pipeline ranks",
            schedule.programs.len(),
            schedule.ranks
        )));
    }
    matched_transfers(schedule)?;
    for rank in 0..schedule.ranks {
        RankState::new(schedule, rank).walk()?;
    }
    no_deadlock(schedule)?;
    Ok(activation_peaks(schedule, |_, _| 1).into_iter().map(|peak| peak as usize).collect())
}

/// Each rank's peak activation memory, `bytes(direction, stage)` being what one micro-batch
/// keeps on a stage: a forward adds it, the chunk computing the weight gradient frees it.
pub fn activation_peaks(schedule: &Schedule, bytes: impl Fn(Direction, usize) -> u64) -> Vec<u64> {
    let size = |rank: usize, micro: Micro| bytes(micro.direction, micro.direction.rank_of(rank, schedule.ranks));
    (0..schedule.ranks)
        .map(|rank| {
            let (mut live, mut peak) = (0u64, 0u64);
            for instruction in &schedule.programs[rank] {
                let Instruction::Compute(chunk) = instruction else { continue };
                if let Some(micro) = chunk.forward() {
                    live += size(rank, micro);
                    peak = peak.max(live);
                }
                if let Some(micro) = chunk.weight_gradient() {
                    live = live.saturating_sub(size(rank, micro));
                }
            }
            peak
        })
        .collect()
}

fn at(rank: usize, index: usize, instruction: &Instruction) -> String {
    format!("rank {rank}, instruction {index} (`{instruction}`)")
}

/// Every send has exactly one receive on its destination, and every receive one send.
fn matched_transfers(schedule: &Schedule) -> Result<(), CheckError> {
    // (from, to, tensor) → (sends, receives), with the first place of each.
    let mut transfers: HashMap<(usize, usize, Tensor), [Vec<String>; 2]> = HashMap::new();
    for (rank, program) in schedule.programs.iter().enumerate() {
        for (index, instruction) in program.iter().enumerate() {
            let (key, side) = match *instruction {
                Instruction::Send { to, tensor } => ((rank, to, tensor), 0),
                Instruction::Recv { from, tensor } => ((from, rank, tensor), 1),
                _ => continue,
            };
            if key.0 >= schedule.ranks || key.1 >= schedule.ranks {
                return Err(CheckError(format!(
                    "{}: there are only {} pipeline ranks",
                    at(rank, index, instruction),
                    schedule.ranks
                )));
            }
            transfers.entry(key).or_default()[side].push(at(rank, index, instruction));
        }
    }
    let mut problems: Vec<String> = transfers
        .into_iter()
        .filter_map(|((from, to, tensor), [sends, recvs])| match (sends.len(), recvs.len()) {
            (1, 1) => None,
            (_, 0) => Some(format!("{}: rank {to} never receives the {tensor} that rank {from} sends", sends[0])),
            (0, _) => Some(format!("{}: rank {from} never sends the {tensor} that rank {to} waits for", recvs[0])),
            (s, r) => Some(format!("{tensor} goes from rank {from} to rank {to} {s} times, received {r} times")),
        })
        .collect();
    problems.sort();
    match problems.first() {
        None => Ok(()),
        Some(first) if problems.len() == 1 => Err(CheckError(first.clone())),
        Some(first) => Err(CheckError(format!("{first} (and {} more unmatched transfers)", problems.len() - 1))),
    }
}

/// What one rank has done so far, walking its list in order.
struct RankState<'a> {
    schedule: &'a Schedule,
    rank: usize,
    received: HashSet<Tensor>,
    sent: HashSet<Tensor>,
    forwarded: HashSet<Micro>,
    input_gradients: HashSet<Micro>,
    /// Input gradients computed alone, whose weight gradient is still due.
    weights_due: HashSet<Micro>,
    weight_gradients: HashSet<Micro>,
    step_end: Vec<Instruction>,
}

impl<'a> RankState<'a> {
    fn new(schedule: &'a Schedule, rank: usize) -> Self {
        RankState {
            schedule,
            rank,
            received: HashSet::new(),
            sent: HashSet::new(),
            forwarded: HashSet::new(),
            input_gradients: HashSet::new(),
            weights_due: HashSet::new(),
            weight_gradients: HashSet::new(),
            step_end: Vec::new(),
        }
    }

    fn stage(&self, micro: Micro) -> usize {
        micro.direction.rank_of(self.rank, self.schedule.ranks)
    }

    /// The rank before (forward order) this rank's stage of `micro`'s direction, if any.
    fn previous(&self, micro: Micro) -> Option<usize> {
        let stage = self.stage(micro);
        (stage > 0).then(|| micro.direction.rank_of(stage - 1, self.schedule.ranks))
    }

    fn following(&self, micro: Micro) -> Option<usize> {
        let stage = self.stage(micro);
        (stage + 1 < self.schedule.ranks).then(|| micro.direction.rank_of(stage + 1, self.schedule.ranks))
    }

    fn walk(mut self) -> Result<(), CheckError> {
        let schedule = self.schedule;
        for (index, instruction) in schedule.programs[self.rank].iter().enumerate() {
            self.step(instruction)
                .map_err(|why| CheckError(format!("{}: {why}", at(self.rank, index, instruction))))?;
        }
        self.finished()
    }

    fn step(&mut self, instruction: &Instruction) -> Result<(), String> {
        if !self.step_end.is_empty()
            && !matches!(instruction, Instruction::OptimizerStep | Instruction::AllGatherParams)
        {
            return Err("comes after the step's reduce-scatter".into());
        }
        match *instruction {
            Instruction::Compute(chunk) => self.compute(&chunk),
            Instruction::Send { to, tensor } => {
                let (micro, done, neighbour) = match tensor {
                    Tensor::Activation(micro) => (micro, self.forwarded.contains(&micro), self.following(micro)),
                    Tensor::Gradient(micro) => (micro, self.input_gradients.contains(&micro), self.previous(micro)),
                };
                self.known(micro)?;
                if neighbour != Some(to) {
                    return Err(format!("rank {to} does not hold the neighbouring stage of {micro}"));
                }
                if !done {
                    return Err(format!("sends a {tensor} not computed yet"));
                }
                if !self.sent.insert(tensor) {
                    return Err(format!("sends {tensor} twice"));
                }
                Ok(())
            }
            Instruction::Recv { from, tensor } => {
                let (micro, neighbour) = match tensor {
                    Tensor::Activation(micro) => (micro, self.previous(micro)),
                    Tensor::Gradient(micro) => (micro, self.following(micro)),
                };
                self.known(micro)?;
                if neighbour != Some(from) {
                    return Err(format!("rank {from} does not hold the neighbouring stage of {micro}"));
                }
                if !self.received.insert(tensor) {
                    return Err(format!("receives {tensor} twice"));
                }
                Ok(())
            }
            Instruction::ReduceScatterGrads => {
                if let Some(micro) = self.all_micro().find(|micro| !self.weight_gradients.contains(micro)) {
                    return Err(format!("the weight gradient of {micro} is not accumulated yet"));
                }
                self.step_end.push(*instruction);
                Ok(())
            }
            Instruction::OptimizerStep | Instruction::AllGatherParams => {
                let expected = match instruction {
                    Instruction::OptimizerStep => [Instruction::ReduceScatterGrads].as_slice(),
                    _ => &[Instruction::ReduceScatterGrads, Instruction::OptimizerStep],
                };
                if self.step_end != expected {
                    return Err("out of order: the step ends with reduce-scatter, optimizer step, all-gather".into());
                }
                self.step_end.push(*instruction);
                Ok(())
            }
        }
    }

    fn compute(&mut self, chunk: &Compute) -> Result<(), String> {
        if let Some(micro) = chunk.forward() {
            self.known(micro)?;
            if self.previous(micro).is_some() && !self.received.contains(&Tensor::Activation(micro)) {
                return Err(format!("the input activation of {micro} has not been received"));
            }
            if !self.forwarded.insert(micro) {
                return Err(format!("runs the forward of {micro} twice"));
            }
        }
        if let Some(micro) = chunk.input_gradient() {
            self.known(micro)?;
            if !self.forwarded.contains(&micro) {
                return Err(format!("the backward of {micro} comes before its forward"));
            }
            if self.following(micro).is_some() && !self.received.contains(&Tensor::Gradient(micro)) {
                return Err(format!("the output gradient of {micro} has not been received"));
            }
            if !self.input_gradients.insert(micro) {
                return Err(format!("runs the backward of {micro} twice"));
            }
            if let Compute::BackwardInput(_) = chunk {
                self.weights_due.insert(micro);
            }
        }
        if let Some(micro) = chunk.weight_gradient() {
            if let Compute::BackwardWeight(_) = chunk {
                if !self.weights_due.remove(&micro) {
                    return Err(format!("no input gradient of {micro} waits for its weight gradient"));
                }
            }
            if !self.weight_gradients.insert(micro) {
                return Err(format!("accumulates the weight gradient of {micro} twice"));
            }
        }
        Ok(())
    }

    /// `micro` flows in a direction this schedule has and is one of its micro-batches.
    fn known(&self, micro: Micro) -> Result<(), String> {
        let per_direction = self.schedule.micro_batches_per_direction();
        if !self.schedule.directions().contains(&micro.direction) || micro.index >= per_direction {
            return Err(format!("{micro} is not a micro-batch of this step"));
        }
        Ok(())
    }

    fn all_micro(&self) -> impl Iterator<Item = Micro> + '_ {
        let per_direction = self.schedule.micro_batches_per_direction();
        self.schedule
            .directions()
            .iter()
            .flat_map(move |&direction| (0..per_direction).map(move |index| Micro { direction, index }))
    }

    fn finished(&self) -> Result<(), CheckError> {
        let rank = self.rank;
        if let Some(micro) = self.all_micro().find(|micro| !self.weight_gradients.contains(micro)) {
            return Err(CheckError(format!("rank {rank} never finishes the backward of {micro}")));
        }
        let complete = [Instruction::ReduceScatterGrads, Instruction::OptimizerStep, Instruction::AllGatherParams];
        if self.step_end != complete {
            return Err(CheckError(format!(
                "rank {rank} does not end its step with reduce-scatter, optimizer step, all-gather"
            )));
        }
        Ok(())
    }
}

/// Runs the schedule with blocking receives; if ranks get stuck, names the cycle of waits.
fn no_deadlock(schedule: &Schedule) -> Result<(), CheckError> {
    let Err(stuck) = execute::run(schedule, &UnitTimes) else { return Ok(()) };
    let blocked_at: HashMap<usize, usize> = stuck.blocked.iter().copied().collect();
    // Whom a blocked rank waits for: the sender of its receive, or a peer not yet at the
    // collective it has reached.
    let waits_for = |rank: usize| -> Option<usize> {
        match schedule.programs[rank][blocked_at[&rank]] {
            Instruction::Recv { from, .. } => Some(from),
            _ => schedule.replica_peers(rank).into_iter().find(|&peer| peer != rank && blocked_at.contains_key(&peer)),
        }
    };
    let describe = |rank: usize| at(rank, blocked_at[&rank], &schedule.programs[rank][blocked_at[&rank]]);
    let (first, _) = stuck.blocked[0];
    let mut chain = vec![first];
    while let Some(next) = waits_for(*chain.last().expect("the chain starts with a rank")) {
        if let Some(start) = chain.iter().position(|&rank| rank == next) {
            let cycle: Vec<String> = chain[start..].iter().map(|&rank| describe(rank)).collect();
            return Err(CheckError(format!(
                "deadlock: each rank waits for the next, in a cycle: {} → back to rank {next}",
                cycle.join(" → ")
            )));
        }
        if !blocked_at.contains_key(&next) {
            break;
        }
        chain.push(next);
    }
    let waiting: Vec<String> = stuck.blocked.iter().map(|&(rank, _)| describe(rank)).collect();
    Err(CheckError(format!("deadlock: {} wait forever", waiting.join("; "))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsc_lang::PipelineSchedule;
    use proptest::prelude::*;

    fn generated(kind: PipelineSchedule, ranks: usize, micro_batches: usize) -> Schedule {
        Schedule::generate(kind, ranks, micro_batches).expect("a valid size")
    }

    fn position(schedule: &Schedule, rank: usize, wanted: impl Fn(&Instruction) -> bool) -> usize {
        schedule.programs[rank].iter().position(wanted).expect("the instruction is there")
    }

    fn rejected(schedule: &Schedule) -> String {
        check(schedule).expect_err("a broken schedule is rejected").0
    }

    #[test]
    fn a_missing_receive_is_named() {
        let mut schedule = generated(PipelineSchedule::OneFOneB, 4, 8);
        let recv = position(
            &schedule,
            2,
            |i| matches!(i, Instruction::Recv { tensor: Tensor::Activation(m), .. } if m.index == 3),
        );
        schedule.programs[2].remove(recv);
        let send = position(
            &schedule,
            1,
            |i| matches!(i, Instruction::Send { tensor: Tensor::Activation(m), .. } if m.index == 3),
        );
        assert_eq!(
            rejected(&schedule),
            format!("rank 1, instruction {send} (`send activation ↓3 to 2`): rank 2 never receives the activation ↓3 that rank 1 sends")
        );
    }

    #[test]
    fn a_cycle_of_waits_is_a_deadlock() {
        // Rank 0 holds back its activation until it has the gradient that needs it.
        let mut schedule = generated(PipelineSchedule::OneFOneB, 2, 1);
        let send = position(&schedule, 0, |i| matches!(i, Instruction::Send { .. }));
        let moved = schedule.programs[0].remove(send);
        let recv = position(&schedule, 0, |i| matches!(i, Instruction::Recv { .. }));
        schedule.programs[0].insert(recv + 1, moved);
        assert_eq!(
            rejected(&schedule),
            "deadlock: each rank waits for the next, in a cycle: \
             rank 0, instruction 1 (`recv gradient ↓0 from 1`) → \
             rank 1, instruction 0 (`recv activation ↓0 from 0`) → back to rank 0"
        );
    }

    #[test]
    fn dependencies_out_of_order_are_rejected() {
        // A backward before its forward.
        let mut schedule = generated(PipelineSchedule::Zb1p, 2, 2);
        let forward = position(&schedule, 1, |i| matches!(i, Instruction::Compute(Compute::Forward(_))));
        let backward = position(&schedule, 1, |i| matches!(i, Instruction::Compute(Compute::BackwardInput(_))));
        schedule.programs[1].swap(forward, backward);
        assert!(rejected(&schedule).contains("the backward of ↓0 comes before its forward"), "{}", rejected(&schedule));
        // A weight gradient whose input gradient was never split off.
        let mut schedule = generated(PipelineSchedule::Zb1p, 2, 2);
        let weight = position(&schedule, 0, |i| matches!(i, Instruction::Compute(Compute::BackwardWeight(_))));
        schedule.programs[0].remove(weight);
        assert_eq!(
            rejected(&schedule),
            "rank 0, instruction 9 (`reduce-scatter grads`): the weight gradient of ↓0 is not accumulated yet"
        );
        // A send to a rank that does not hold the next stage.
        let mut schedule = generated(PipelineSchedule::OneFOneB, 3, 1);
        let send = position(&schedule, 0, |i| matches!(i, Instruction::Send { .. }));
        let recv = position(&schedule, 1, |i| matches!(i, Instruction::Recv { tensor: Tensor::Activation(_), .. }));
        schedule.programs[0][send] =
            Instruction::Send { to: 2, tensor: Tensor::Activation(Micro { direction: Direction::Down, index: 0 }) };
        schedule.programs[2].insert(
            0,
            Instruction::Recv { from: 0, tensor: Tensor::Activation(Micro { direction: Direction::Down, index: 0 }) },
        );
        schedule.programs[1].remove(recv);
        assert!(
            rejected(&schedule).contains("rank 2 does not hold the neighbouring stage of ↓0"),
            "{}",
            rejected(&schedule)
        );
    }

    #[test]
    fn impossible_sizes_are_errors() {
        let error =
            |kind, ranks, micro_batches| Schedule::generate(kind, ranks, micro_batches).expect_err("impossible").0;
        assert_eq!(
            error(PipelineSchedule::Dualpipe, 3, 12),
            "DualPipe needs an even number of pipeline ranks, found 3"
        );
        assert!(error(PipelineSchedule::Dualpipe, 4, 6)
            .contains("at least twice the 4 pipeline ranks (8 or more), found 6"));
        assert!(error(PipelineSchedule::Dualpipe, 4, 9).contains("found 9"));
        assert_eq!(error(PipelineSchedule::OneFOneB, 0, 4), "a pipeline needs at least one rank");
        assert_eq!(error(PipelineSchedule::Zb1p, 4, 0), "a step needs at least one micro-batch");
    }

    fn any_size() -> impl Strategy<Value = (PipelineSchedule, usize, usize)> {
        let one_direction = (prop_oneof![Just(PipelineSchedule::OneFOneB), Just(PipelineSchedule::Zb1p)], 2usize..=16)
            .prop_flat_map(|(kind, ranks)| (Just(kind), Just(ranks), 1..=4 * ranks));
        let dualpipe = (1usize..=8)
            .prop_flat_map(|half| (Just(PipelineSchedule::Dualpipe), Just(2 * half), 2 * half..=8 * half))
            .prop_map(|(kind, ranks, pairs)| (kind, ranks, 2 * pairs));
        prop_oneof![one_direction, dualpipe]
    }

    proptest! {
        /// Every generated schedule checks, with the table's peak of activations in flight.
        #[test]
        fn generated_schedules_check((kind, ranks, micro_batches) in any_size()) {
            let schedule = generated(kind, ranks, micro_batches);
            let peaks = check(&schedule).map_err(|e| TestCaseError::fail(e.0))?;
            let most = match kind {
                PipelineSchedule::Dualpipe => ranks + 1,
                _ => ranks.min(micro_batches),
            };
            prop_assert_eq!(peaks.iter().max().copied(), Some(most));
        }
    }
}
