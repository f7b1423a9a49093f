//! Communication between ranks. [`Comm`] is what a rank needs: point-to-point messages and
//! the collectives built on them (all-gather, all-to-all, reduce-scatter, all-gather of
//! shards). Two transports carry them: [`threads`] connects ranks that are threads of one
//! process through memory (the CPU backend's multi-rank runs in one process, in CI), and
//! [`sockets`] connects processes over TCP (the CPU backend's ranks as processes started by a
//! launcher). [`rendezvous`] lets the processes of a multi-process run find each other (and
//! hand NCCL its id: `cuda::nccl`).

pub mod rendezvous;
pub mod sockets;
pub mod threads;

use std::fmt;
use std::sync::Arc;

use crate::cpu::exchange::Exchange;

pub use sockets::Sockets;
pub use threads::ThreadComm;

/// A communication that failed: a wait that ran past its deadline, a peer that went away, or
/// an exchange a rank cannot take part in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommError(pub String);

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CommError {}

/// Messages between ranks, by global rank id. Messages from one rank to another under the same
/// tag arrive in the order they were sent, so members calling the same collectives in the same
/// order meet in the same round.
pub trait Comm: Send + Sync {
    /// Sends `data` to rank `to` (this rank is `from`); does not wait for the receiver.
    fn send(&self, from: usize, to: usize, tag: &str, data: Vec<f32>) -> Result<(), CommError>;

    /// Takes the oldest message rank `from` sent `to` under `tag`, waiting for it (up to the
    /// transport's deadline).
    fn recv(&self, from: usize, to: usize, tag: &str) -> Result<Vec<f32>, CommError>;

    /// Every member of `group` (sorted rank ids, `rank` among them) contributes `data` and gets
    /// all contributions in the group's order.
    fn all_gather(&self, group: &[usize], rank: usize, name: &str, data: Vec<f32>) -> Result<Vec<Vec<f32>>, CommError> {
        self.all_to_all(group, rank, name, vec![data; group.len()])
    }

    /// Every member of `group` (`rank` among them) sends `parts[j]` to the group's member j and
    /// gets what each member sent it, in group order.
    fn all_to_all(
        &self,
        group: &[usize],
        rank: usize,
        name: &str,
        parts: Vec<Vec<f32>>,
    ) -> Result<Vec<Vec<f32>>, CommError> {
        for (&member, part) in group.iter().zip(parts) {
            self.send(rank, member, name, part)?;
        }
        group.iter().map(|&member| self.recv(member, rank, name)).collect()
    }

    /// Sums `data` over `group` (in group order) and returns this member's contiguous shard of
    /// the sum (the members' shards, in group order, tile the vector; the first ones are one
    /// longer when it does not divide evenly).
    fn reduce_scatter(&self, group: &[usize], rank: usize, name: &str, data: Vec<f32>) -> Result<Vec<f32>, CommError> {
        let len = data.len();
        let parts = (0..group.len()).map(|member| data[shard(len, group.len(), member)].to_vec()).collect();
        let mine = self.all_to_all(group, rank, name, parts)?;
        let width = shard(len, group.len(), position(group, rank)).len();
        Ok((0..width).map(|i| mine.iter().map(|contribution| contribution[i]).sum()).collect())
    }

    /// Concatenates the members' shards in group order.
    fn all_gather_shards(
        &self,
        group: &[usize],
        rank: usize,
        name: &str,
        shard: Vec<f32>,
    ) -> Result<Vec<f32>, CommError> {
        Ok(self.all_gather(group, rank, name, shard)?.concat())
    }

    /// Sums `data` over `group` in f64, every member adding the contributions up in group
    /// order, so that all get the same bits. Each value travels exactly, as the bits of two
    /// f32s.
    fn sum_exact(&self, group: &[usize], rank: usize, name: &str, data: &[f64]) -> Result<Vec<f64>, CommError> {
        let halves = |x: &f64| {
            let bits = x.to_bits();
            [f32::from_bits((bits >> 32) as u32), f32::from_bits(bits as u32)]
        };
        let contributions = self.all_gather(group, rank, name, data.iter().flat_map(halves).collect())?;
        let mut sum = vec![0.0; data.len()];
        for (&member, contribution) in group.iter().zip(contributions) {
            if contribution.len() != 2 * data.len() {
                return Err(CommError(format!(
                    "{name}: rank {member} summed {} values, rank {rank} {}: the ranks run different plans",
                    contribution.len() / 2,
                    data.len()
                )));
            }
            let values = contribution
                .chunks_exact(2)
                .map(|h| f64::from_bits((u64::from(h[0].to_bits()) << 32) | u64::from(h[1].to_bits())));
            sum.iter_mut().zip(values).for_each(|(s, x)| *s += x);
        }
        Ok(sum)
    }
}

/// A rank's expert-parallel group as a running graph sees it: its all-to-alls, named after the
/// stage (one rank may hold two stages, whose exchanges must not meet).
pub struct ExpertGroup {
    comm: Arc<dyn Comm>,
    group: Vec<usize>,
    rank: usize,
    name: String,
}

impl ExpertGroup {
    /// `rank` in `group` (sorted rank ids, in the order of the experts they hold).
    pub fn new(comm: Arc<dyn Comm>, group: Vec<usize>, rank: usize, name: impl Into<String>) -> Self {
        ExpertGroup { comm, group, rank, name: name.into() }
    }
}

impl Exchange for ExpertGroup {
    fn all_to_all(&self, parts: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CommError> {
        self.comm.all_to_all(&self.group, self.rank, &self.name, parts)
    }
}

fn position(group: &[usize], rank: usize) -> usize {
    group.iter().position(|&member| member == rank).expect("a rank takes part in its own group's collectives")
}

/// The range of member `index` of `members` in a vector of `len`.
pub fn shard(len: usize, members: usize, index: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / members, len % members);
    let start = index * base + index.min(extra);
    start..start + base + usize::from(index < extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Point-to-point messages and every collective among three ranks of `comms` (rank r's
    /// transport at index r), each rank on a thread of its own.
    pub(crate) fn messages_and_collectives(comms: Vec<Arc<dyn Comm>>) {
        let group = [0, 1, 2];
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                std::thread::spawn(move || {
                    comm.send(rank, (rank + 1) % 3, "x", vec![rank as f32]).unwrap();
                    let got = comm.recv((rank + 2) % 3, rank, "x").unwrap();
                    assert_eq!(got, vec![((rank + 2) % 3) as f32]);
                    // Sum [r, 10r, 100r, 1000r] over the ranks: [3, 30, 300, 3000], scattered 2/1/1.
                    let data: Vec<f32> = [1.0, 10.0, 100.0, 1000.0].iter().map(|x| x * rank as f32).collect();
                    let mine = comm.reduce_scatter(&group, rank, "grads", data).unwrap();
                    let expected = [vec![3.0, 30.0], vec![300.0], vec![3000.0]];
                    assert_eq!(mine, expected[rank]);
                    // Twice in a row: each round is its own collective.
                    for round in 0..2 {
                        let all =
                            comm.all_gather_shards(&group, rank, "params", vec![(10 * round + rank) as f32]).unwrap();
                        assert_eq!(all, [0, 1, 2].map(|r| (10 * round + r) as f32));
                    }
                    let parts = (0..3).map(|to| vec![(10 * rank + to) as f32; to + 1]).collect();
                    let got = comm.all_to_all(&group, rank, "rows", parts).unwrap();
                    assert_eq!(got, (0..3).map(|from| vec![(10 * from + rank) as f32; rank + 1]).collect::<Vec<_>>());
                    // f64s beyond f32's range and precision come through exactly.
                    let r = rank as f64;
                    let sum =
                        comm.sum_exact(&group, rank, "norms", &[r, 0.1 * r, 1e30 * (r - 1.0), 1e200 * r]).unwrap();
                    assert_eq!(sum, [3.0, 0.1 + 0.2, 0.0, 3e200]);
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("the rank's checks hold");
        }
    }

    #[test]
    fn messages_and_collectives_between_threads() {
        let comm = ThreadComm::new(Duration::from_secs(5));
        messages_and_collectives((0..3).map(|_| Arc::new(comm.clone()) as Arc<dyn Comm>).collect());
    }

    #[test]
    fn shards_tile_the_vector() {
        for (len, members) in [(10, 3), (3, 3), (2, 4), (0, 2), (7, 1)] {
            let ranges: Vec<_> = (0..members).map(|i| shard(len, members, i)).collect();
            assert_eq!(ranges.first().map(|r| r.start), Some(0));
            assert_eq!(ranges.last().map(|r| r.end), Some(len));
            assert!(ranges.windows(2).all(|pair| pair[0].end == pair[1].start));
        }
    }
}
