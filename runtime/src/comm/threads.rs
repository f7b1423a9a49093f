//! Ranks as threads of one process, talking through shared memory: a send leaves its tensor in
//! the receiver's mailbox (queued behind earlier ones under the same tag) and returns; a
//! receive waits for it. Every wait has a deadline, so a rank that died or never comes makes
//! the others fail with a message naming whom they waited for, instead of hanging.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Comm, CommError};

/// What a message is, so that a receive takes the right one: its sender, its receiver and a
/// free-form tag (e.g. "activation ↓3").
type MessageKey = (usize, usize, String);

type Mailbox = HashMap<MessageKey, VecDeque<Vec<f32>>>;

/// One process's ranks: clone it into every rank's thread.
#[derive(Clone)]
pub struct ThreadComm {
    shared: Arc<(Mutex<Mailbox>, Condvar)>,
    timeout: Duration,
}

impl ThreadComm {
    /// Ranks that give up waiting after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        ThreadComm { shared: Arc::new((Mutex::new(Mailbox::new()), Condvar::new())), timeout }
    }

    fn lock(&self) -> MutexGuard<'_, Mailbox> {
        // A rank that panicked while holding the lock left a consistent map: go on with it.
        self.shared.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Comm for ThreadComm {
    fn send(&self, from: usize, to: usize, tag: &str, data: Vec<f32>) -> Result<(), CommError> {
        self.lock().entry((from, to, tag.to_string())).or_default().push_back(data);
        self.shared.1.notify_all();
        Ok(())
    }

    fn recv(&self, from: usize, to: usize, tag: &str) -> Result<Vec<f32>, CommError> {
        let key = (from, to, tag.to_string());
        let deadline = Instant::now() + self.timeout;
        let mut mailbox = self.lock();
        loop {
            if let Some(data) = mailbox.get_mut(&key).and_then(VecDeque::pop_front) {
                return Ok(data);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError(format!(
                    "rank {to} waited for {tag} from rank {from} for {:?}: the rank died or never got there",
                    self.timeout
                )));
            }
            mailbox = self.shared.1.wait_timeout(mailbox, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_peer_is_an_error_not_a_hang() {
        let comm = ThreadComm::new(Duration::from_millis(50));
        let err = comm.recv(1, 0, "activation ↓0").unwrap_err();
        assert!(err.0.starts_with("rank 0 waited for activation ↓0 from rank 1 for 50ms"), "{err}");
        let err = comm.all_gather(&[0, 1, 2], 0, "params", vec![1.0]).unwrap_err();
        assert!(err.0.starts_with("rank 0 waited for params from rank 1"), "{err}");
    }

    #[test]
    fn messages_under_one_tag_arrive_in_order() {
        let comm = ThreadComm::new(Duration::from_millis(50));
        for i in 0..3 {
            comm.send(0, 1, "x", vec![i as f32]).unwrap();
        }
        for i in 0..3 {
            assert_eq!(comm.recv(0, 1, "x").unwrap(), vec![i as f32]);
        }
    }
}
