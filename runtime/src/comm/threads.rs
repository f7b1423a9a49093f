//! Ranks as threads of one process, talking through shared memory: point-to-point messages
//! (a send leaves its tensor in the receiver's mailbox and returns; a receive waits for it),
//! all-to-all over a group built on them (and [`ExpertGroup`], the all-to-all of an
//! expert-parallel group as a running graph uses it), and collectives over a group of ranks
//! (every member contributes and gets every member's contribution; reduce-scatter and
//! all-gather are built on that). Every wait has a deadline,
//! so a rank that died or never comes makes the others fail with a message naming whom they
//! waited for, instead of hanging.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::cpu::exchange::Exchange;

/// What a message is, so that a receive takes the right one: a free-form tag (e.g. "activation
/// ↓3"), with its sender and receiver.
type MessageKey = (usize, usize, String);

#[derive(Default)]
struct Shared {
    mailbox: HashMap<MessageKey, Vec<f32>>,
    /// Per collective (its group and name, and how many times that group ran it): the
    /// contributions so far, by member, and how many members have taken the result.
    collectives: HashMap<(Vec<usize>, String, u64), Collective>,
    /// How many times each rank has entered each (group, name) collective.
    generations: HashMap<(usize, Vec<usize>, String), u64>,
}

#[derive(Default)]
struct Collective {
    contributions: HashMap<usize, Vec<f32>>,
    taken: usize,
}

/// One process's ranks: clone it into every rank's thread.
#[derive(Clone)]
pub struct ThreadComm {
    shared: Arc<(Mutex<Shared>, Condvar)>,
    timeout: Duration,
}

/// A communication that failed: a wait that ran past its deadline, or an exchange a rank
/// cannot take part in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommError(pub String);

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CommError {}

impl ThreadComm {
    /// Ranks that give up waiting after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        ThreadComm { shared: Arc::new((Mutex::new(Shared::default()), Condvar::new())), timeout }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A rank that panicked while holding the lock left consistent maps: go on with them.
        self.shared.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until `ready` returns a value, or the deadline passes.
    /// `what` says what was waited for (from the state at the deadline).
    fn wait<R>(
        &self,
        mut ready: impl FnMut(&mut Shared) -> Option<R>,
        what: impl Fn(&Shared) -> String,
    ) -> Result<R, CommError> {
        let deadline = Instant::now() + self.timeout;
        let mut shared = self.lock();
        loop {
            if let Some(result) = ready(&mut shared) {
                self.shared.1.notify_all();
                return Ok(result);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError(format!(
                    "{} for {:?}: the rank died or never got there",
                    what(&shared),
                    self.timeout
                )));
            }
            shared = self.shared.1.wait_timeout(shared, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Leaves `data` for rank `to`.
    pub fn send(&self, from: usize, to: usize, tag: &str, data: Vec<f32>) {
        self.lock().mailbox.insert((from, to, tag.to_string()), data);
        self.shared.1.notify_all();
    }

    /// Takes what rank `from` sent `to` under `tag`, waiting for it.
    pub fn recv(&self, from: usize, to: usize, tag: &str) -> Result<Vec<f32>, CommError> {
        let key = (from, to, tag.to_string());
        self.wait(|shared| shared.mailbox.remove(&key), |_| format!("rank {to} waited for {tag} from rank {from}"))
    }

    /// Every member of `group` (sorted rank ids, `rank` among them) contributes `data` and gets
    /// all contributions in the group's order. Members call it in the same order.
    pub fn all_gather(
        &self,
        group: &[usize],
        rank: usize,
        name: &str,
        data: Vec<f32>,
    ) -> Result<Vec<Vec<f32>>, CommError> {
        let generation = self.enter(group, rank, name);
        let key = (group.to_vec(), name.to_string(), generation);
        self.lock().collectives.entry(key.clone()).or_default().contributions.insert(rank, data);
        self.shared.1.notify_all();
        let missing = |shared: &Shared| -> Vec<usize> {
            let contributions = shared.collectives.get(&key).map(|c| &c.contributions);
            group.iter().copied().filter(|member| !contributions.is_some_and(|c| c.contains_key(member))).collect()
        };
        self.wait(
            |shared| {
                if !missing(shared).is_empty() {
                    return None;
                }
                let collective = shared.collectives.get_mut(&key).expect("entered above");
                let all = group.iter().map(|member| collective.contributions[member].clone()).collect::<Vec<_>>();
                collective.taken += 1;
                if collective.taken == group.len() {
                    shared.collectives.remove(&key);
                }
                Some(all)
            },
            |shared| format!("rank {rank} waited in `{name}` for rank(s) {:?}", missing(shared)),
        )
    }

    /// How many times `rank` has now entered `group`'s collective `name`: members calling it in
    /// the same order meet in the same round.
    fn enter(&self, group: &[usize], rank: usize, name: &str) -> u64 {
        let mut shared = self.lock();
        let counter = shared.generations.entry((rank, group.to_vec(), name.to_string())).or_default();
        *counter += 1;
        *counter
    }

    /// Every member of `group` (`rank` among them) sends `parts[j]` to the group's member j and
    /// gets what each member sent it, in group order. Members call it in the same order.
    pub fn all_to_all(
        &self,
        group: &[usize],
        rank: usize,
        name: &str,
        parts: Vec<Vec<f32>>,
    ) -> Result<Vec<Vec<f32>>, CommError> {
        let tag = format!("{name} #{}", self.enter(group, rank, name));
        for (&member, part) in group.iter().zip(parts) {
            self.send(rank, member, &tag, part);
        }
        group.iter().map(|&member| self.recv(member, rank, &tag)).collect()
    }

    /// Sums `data` over `group` and returns this member's contiguous shard of the sum (the
    /// members' shards, in group order, tile the vector; the first ones are one longer when it
    /// does not divide evenly).
    pub fn reduce_scatter(
        &self,
        group: &[usize],
        rank: usize,
        name: &str,
        data: Vec<f32>,
    ) -> Result<Vec<f32>, CommError> {
        let len = data.len();
        let all = self.all_gather(group, rank, name, data)?;
        let range = shard(len, group.len(), position(group, rank));
        Ok(range.map(|i| all.iter().map(|contribution| contribution[i]).sum()).collect())
    }

    /// Concatenates the members' shards in group order.
    pub fn all_gather_shards(
        &self,
        group: &[usize],
        rank: usize,
        name: &str,
        shard: Vec<f32>,
    ) -> Result<Vec<f32>, CommError> {
        Ok(self.all_gather(group, rank, name, shard)?.concat())
    }
}

/// A rank's expert-parallel group as a running graph sees it: its all-to-alls, named after the
/// stage (one rank may hold two stages, whose exchanges must not meet).
pub struct ExpertGroup {
    comm: ThreadComm,
    group: Vec<usize>,
    rank: usize,
    name: String,
}

impl ExpertGroup {
    /// `rank` in `group` (sorted rank ids, in the order of the experts they hold).
    pub fn new(comm: ThreadComm, group: Vec<usize>, rank: usize, name: impl Into<String>) -> Self {
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
    use std::thread;

    #[test]
    fn messages_and_collectives_between_threads() {
        let comm = ThreadComm::new(Duration::from_secs(5));
        let group = [0, 1, 2];
        let handles: Vec<_> = group
            .iter()
            .map(|&rank| {
                let comm = comm.clone();
                thread::spawn(move || {
                    comm.send(rank, (rank + 1) % 3, "x", vec![rank as f32]);
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
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("the rank's checks hold");
        }
    }

    #[test]
    fn a_missing_peer_is_an_error_not_a_hang() {
        let comm = ThreadComm::new(Duration::from_millis(50));
        let err = comm.recv(1, 0, "activation ↓0").unwrap_err();
        assert!(err.0.starts_with("rank 0 waited for activation ↓0 from rank 1 for 50ms"), "{err}");
        let err = comm.all_gather(&[0, 1, 2], 0, "params", vec![1.0]).unwrap_err();
        assert!(err.0.starts_with("rank 0 waited in `params` for rank(s) [1, 2]"), "{err}");
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
