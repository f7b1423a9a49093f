//! Runs a [`Schedule`]'s per-rank lists against the clock, the way the ranks would: each rank
//! runs its instructions in order; a send hands its tensor to the link and the rank goes on
//! (the tensor arrives after the link's time); a receive blocks the rank until its tensor has
//! arrived; a ZeRO collective starts once every rank of its group has reached it. Both the
//! checker (unit times, to find deadlocks) and the simulator (the cost model's times) use it.

use std::collections::HashMap;

use super::schedule::{Compute, Instruction, Schedule, Tensor};

/// How long things take, in seconds.
pub trait Durations {
    /// A compute chunk on `rank`.
    fn compute(&self, rank: usize, chunk: &Compute) -> f64;
    /// From the send to the arrival of `tensor` (latency included).
    fn transfer(&self, from: usize, to: usize, tensor: &Tensor) -> f64;
    /// A ZeRO collective or the optimizer step on `rank`.
    fn step_end(&self, rank: usize, instruction: &Instruction) -> f64;
}

/// When one instruction ran. A receive's span is the wait for its tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    pub instruction: usize,
    pub start: f64,
    pub end: f64,
}

/// Every instruction of every rank, with its span.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub spans: Vec<Vec<Span>>,
}

/// The ranks that could not go on: each with the index of the instruction it is blocked at.
/// Finished ranks are absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stuck {
    pub blocked: Vec<(usize, usize)>,
}

/// Runs `schedule` until every rank has finished, or no rank can go on.
pub fn run(schedule: &Schedule, durations: &impl Durations) -> Result<Run, Stuck> {
    let ranks = schedule.programs.len();
    let mut next = vec![0usize; ranks];
    let mut clock = vec![0.0f64; ranks];
    let mut spans: Vec<Vec<Span>> = schedule.programs.iter().map(|p| Vec::with_capacity(p.len())).collect();
    // (from, to, tensor) → arrival time, for tensors sent and not yet received.
    let mut in_transit: HashMap<(usize, usize, Tensor), f64> = HashMap::new();
    let mut progressed = true;
    while progressed {
        progressed = false;
        for rank in 0..ranks {
            while let Some(&instruction) = schedule.programs[rank].get(next[rank]) {
                let start = clock[rank];
                let end = match instruction {
                    Instruction::Compute(chunk) => start + durations.compute(rank, &chunk),
                    Instruction::Send { to, tensor } => {
                        in_transit.insert((rank, to, tensor), start + durations.transfer(rank, to, &tensor));
                        start
                    }
                    Instruction::Recv { from, tensor } => match in_transit.remove(&(from, rank, tensor)) {
                        Some(arrival) => start.max(arrival),
                        None => break,
                    },
                    Instruction::OptimizerStep => start + durations.step_end(rank, &instruction),
                    Instruction::ReduceScatterGrads | Instruction::AllGatherParams => {
                        let peers = schedule.replica_peers(rank);
                        let at = |peer: usize| schedule.programs[peer].get(next[peer]) == Some(&instruction);
                        if !peers.iter().all(|&peer| at(peer)) {
                            break;
                        }
                        let start = peers.iter().map(|&peer| clock[peer]).fold(0.0, f64::max);
                        let end = start
                            + peers.iter().map(|&peer| durations.step_end(peer, &instruction)).fold(0.0, f64::max);
                        for &peer in peers.iter().filter(|&&peer| peer != rank) {
                            spans[peer].push(Span { instruction: next[peer], start, end });
                            next[peer] += 1;
                            clock[peer] = end;
                        }
                        spans[rank].push(Span { instruction: next[rank], start, end });
                        next[rank] += 1;
                        clock[rank] = end;
                        progressed = true;
                        continue;
                    }
                };
                spans[rank].push(Span { instruction: next[rank], start, end });
                next[rank] += 1;
                clock[rank] = end;
                progressed = true;
            }
        }
    }
    let blocked: Vec<(usize, usize)> =
        (0..ranks).filter(|&rank| next[rank] < schedule.programs[rank].len()).map(|rank| (rank, next[rank])).collect();
    if blocked.is_empty() {
        Ok(Run { spans })
    } else {
        Err(Stuck { blocked })
    }
}

/// Every compute chunk takes one unit; transfers and the end of the step take none.
pub struct UnitTimes;

impl Durations for UnitTimes {
    fn compute(&self, _: usize, _: &Compute) -> f64 {
        1.0
    }
    fn transfer(&self, _: usize, _: usize, _: &Tensor) -> f64 {
        0.0
    }
    fn step_end(&self, _: usize, _: &Instruction) -> f64 {
        0.0
    }
}
