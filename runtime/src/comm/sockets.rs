//! Ranks as processes, talking over TCP: the CPU backend's ranks when a launcher (torchrun,
//! srun) starts one process per rank. Each process listens on a port of its own; the ranks
//! hand each other their addresses through the rendezvous with rank 0, then every pair of
//! ranks connects once (the higher rank dials the lower). A message is a frame (tag, length,
//! bytes) on the pair's connection; a reader thread per connection files arriving frames by
//! sender and tag, where receives take them in order. Every wait has a deadline, and a peer
//! whose connection closes (it ended or died) fails the receives waiting for it at once,
//! naming it.
//!
//! The collectives are [`Comm`]'s, over these messages (the exact f64 sums over all processes
//! included: [`Comm::sum_exact`]).

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::rendezvous::{dial, exchange, World};
use super::{Comm, CommError};

/// What has arrived, by sender and tag, and the peers whose connection closed (with why).
#[derive(Default)]
struct Inbox {
    messages: HashMap<(usize, String), VecDeque<Vec<u8>>>,
    gone: HashMap<usize, String>,
}

/// This process's connections to the other ranks of its world.
pub struct Sockets {
    rank: usize,
    size: usize,
    /// Per rank, the connection to it (none to this rank itself).
    peers: Vec<Option<Mutex<TcpStream>>>,
    inbox: Arc<(Mutex<Inbox>, Condvar)>,
    timeout: Duration,
}

fn failed(what: String) -> CommError {
    CommError(what)
}

impl Sockets {
    /// Connects this process to every rank of `world`; every wait (for the rendezvous, a
    /// connection, a message) ends after `timeout`.
    pub fn connect(world: &World, timeout: Duration) -> Result<Sockets, CommError> {
        let deadline = Instant::now() + timeout;
        let me = world.rank;
        let listener =
            TcpListener::bind("0.0.0.0:0").map_err(|e| failed(format!("rank {me} cannot listen on a port: {e}")))?;
        let port = listener.local_addr().map_err(|e| failed(format!("rank {me}'s listener: {e}")))?.port();
        let address = format!("{}:{port}", own_host(world)?);
        let addresses = exchange(world, address.as_bytes(), timeout).map_err(|e| failed(e.0))?;
        let mut peers: Vec<Option<TcpStream>> = (0..world.size).map(|_| None).collect();
        for (lower, address) in addresses.iter().enumerate().take(me) {
            let address = String::from_utf8_lossy(address).into_owned();
            let mut stream = dial(&address, deadline)
                .map_err(|e| failed(format!("rank {me} could not reach rank {lower} at `{address}`: {e}")))?;
            stream
                .write_all(&(me as u32).to_le_bytes())
                .map_err(|e| failed(format!("rank {me} to rank {lower}: {e}")))?;
            peers[lower] = Some(stream);
        }
        listener.set_nonblocking(true).map_err(|e| failed(format!("rank {me}'s listener: {e}")))?;
        while peers[me + 1..].iter().any(Option::is_none) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| failed(format!("rank {me}: {e}")))?;
                    stream.set_read_timeout(Some(timeout)).map_err(|e| failed(format!("rank {me}: {e}")))?;
                    let mut hello = [0u8; 4];
                    if stream.read_exact(&mut hello).is_err() {
                        continue; // not one of ours
                    }
                    let rank = u32::from_le_bytes(hello) as usize;
                    if rank > me && rank < world.size && peers[rank].is_none() {
                        peers[rank] = Some(stream);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = (me + 1..world.size).filter(|&r| peers[r].is_none()).collect();
                        return Err(failed(format!("rank {me} waited {timeout:?} for rank(s) {missing:?} to connect")));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(failed(format!("rank {me} accepting its peers: {e}"))),
            }
        }
        let inbox = Arc::new((Mutex::new(Inbox::default()), Condvar::new()));
        let mut connected = Vec::with_capacity(world.size);
        for (rank, stream) in peers.into_iter().enumerate() {
            let Some(stream) = stream else {
                connected.push(None);
                continue;
            };
            let setup = |e: std::io::Error| failed(format!("rank {me}'s connection to rank {rank}: {e}"));
            stream.set_nodelay(true).map_err(setup)?;
            stream.set_read_timeout(None).map_err(setup)?;
            let reader = stream.try_clone().map_err(setup)?;
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || read_frames(reader, rank, inbox));
            connected.push(Some(Mutex::new(stream)));
        }
        Ok(Sockets { rank: me, size: world.size, peers: connected, inbox, timeout })
    }

    fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn send_bytes(&self, to: usize, tag: &str, bytes: &[u8]) -> Result<(), CommError> {
        let Some(peer) = self.peers.get(to) else {
            return Err(failed(format!("rank {} has no rank {to} in a world of {}", self.rank, self.size)));
        };
        let Some(stream) = peer else {
            file(&self.inbox, to, Ok((tag.to_string(), bytes.to_vec())));
            return Ok(());
        };
        let mut stream = stream.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut writer = BufWriter::new(&mut *stream);
        let mut frame = || -> std::io::Result<()> {
            writer.write_all(&(tag.len() as u32).to_le_bytes())?;
            writer.write_all(tag.as_bytes())?;
            writer.write_all(&(bytes.len() as u64).to_le_bytes())?;
            writer.write_all(bytes)?;
            writer.flush()
        };
        frame().map_err(|e| failed(format!("rank {} sending {tag} to rank {to}: {e} (it ended or died)", self.rank)))
    }

    fn recv_bytes(&self, from: usize, tag: &str) -> Result<Vec<u8>, CommError> {
        let key = (from, tag.to_string());
        let deadline = Instant::now() + self.timeout;
        let mut inbox = self.lock();
        loop {
            if let Some(bytes) = inbox.messages.get_mut(&key).and_then(VecDeque::pop_front) {
                return Ok(bytes);
            }
            if let Some(why) = inbox.gone.get(&from) {
                return Err(failed(format!(
                    "rank {} waited for {tag} from rank {from}, whose connection closed ({why}): it ended or died, see its output",
                    self.rank
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(failed(format!(
                    "rank {} waited for {tag} from rank {from} for {:?}: the rank died or never got there",
                    self.rank, self.timeout
                )));
            }
            inbox = self.inbox.1.wait_timeout(inbox, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl Drop for Sockets {
    fn drop(&mut self) {
        // Ends the reader threads (and tells the peers this rank is gone).
        for stream in self.peers.iter().flatten() {
            let stream = stream.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// The host the other ranks reach this one at: rank 0's is the master address's; another
/// rank's is the address of its interface towards rank 0 (no packet is sent to find it).
fn own_host(world: &World) -> Result<String, CommError> {
    let (host, _) = world.master.rsplit_once(':').ok_or_else(|| failed(format!("`{}` has no port", world.master)))?;
    if world.rank == 0 {
        return Ok(host.to_string());
    }
    let local = || -> std::io::Result<String> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(&world.master)?;
        Ok(socket.local_addr()?.ip().to_string())
    };
    local().map_err(|e| failed(format!("rank {} finding its address towards `{}`: {e}", world.rank, world.master)))
}

/// Files every frame from rank `from` into `inbox` until the connection closes, then marks
/// the rank gone.
fn read_frames(stream: TcpStream, from: usize, inbox: Arc<(Mutex<Inbox>, Condvar)>) {
    let mut reader = BufReader::new(stream);
    let mut frame = || -> std::io::Result<(String, Vec<u8>)> {
        let mut len = [0u8; 4];
        reader.read_exact(&mut len)?;
        let mut tag = vec![0u8; u32::from_le_bytes(len) as usize];
        reader.read_exact(&mut tag)?;
        let mut len = [0u8; 8];
        reader.read_exact(&mut len)?;
        let mut bytes = vec![0u8; u64::from_le_bytes(len) as usize];
        reader.read_exact(&mut bytes)?;
        Ok((String::from_utf8_lossy(&tag).into_owned(), bytes))
    };
    while file(&inbox, from, frame()) {}
}

/// Files what arrived from rank `from` (a message, or why its connection ended) and wakes the
/// receives; whether the connection is still open.
fn file(inbox: &(Mutex<Inbox>, Condvar), from: usize, arrived: std::io::Result<(String, Vec<u8>)>) -> bool {
    let mut filed = inbox.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let open = match arrived {
        Ok((tag, bytes)) => {
            filed.messages.entry((from, tag)).or_default().push_back(bytes);
            true
        }
        Err(e) => {
            let why = if e.kind() == ErrorKind::UnexpectedEof { "closed by the peer".into() } else { e.to_string() };
            filed.gone.insert(from, why);
            false
        }
    };
    drop(filed);
    inbox.1.notify_all();
    open
}

impl Comm for Sockets {
    fn send(&self, from: usize, to: usize, tag: &str, data: Vec<f32>) -> Result<(), CommError> {
        debug_assert_eq!(from, self.rank, "a process sends as its own rank");
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.send_bytes(to, tag, &bytes)
    }

    fn recv(&self, from: usize, to: usize, tag: &str) -> Result<Vec<f32>, CommError> {
        debug_assert_eq!(to, self.rank, "a process receives as its own rank");
        let bytes = self.recv_bytes(from, tag)?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
    }
}

impl Sockets {
    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// How many processes there are.
    pub fn size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::tests::messages_and_collectives;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").expect("a port").local_addr().expect("address").port()
    }

    /// `size` ranks connected over loopback, each made on a thread of its own.
    fn connected(size: usize, timeout: Duration) -> Vec<Sockets> {
        let port = free_port();
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let world = World { rank, size, local_rank: rank, master: format!("127.0.0.1:{port}") };
                std::thread::spawn(move || Sockets::connect(&world, timeout).expect("connects"))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    }

    #[test]
    fn messages_and_collectives_between_processes() {
        let ranks = connected(3, Duration::from_secs(10));
        messages_and_collectives(ranks.into_iter().map(|s| Arc::new(s) as Arc<dyn Comm>).collect());
    }

    #[test]
    fn a_peer_that_ends_fails_the_ranks_waiting_for_it_at_once() {
        let mut ranks = connected(2, Duration::from_secs(30));
        let one = ranks.pop().expect("rank 1");
        let zero = ranks.pop().expect("rank 0");
        drop(one);
        let started = Instant::now();
        let error = zero.recv(1, 0, "activation ↓0").expect_err("rank 1 is gone");
        assert!(error.0.contains("from rank 1, whose connection closed"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5), "it failed at once, not at the deadline");
    }

    #[test]
    fn a_peer_that_never_comes_is_named() {
        let port = free_port();
        let world = World { rank: 0, size: 2, local_rank: 0, master: format!("127.0.0.1:{port}") };
        let error = Sockets::connect(&world, Duration::from_millis(300)).err().expect("rank 1 never comes");
        assert!(error.0.contains("rank(s) 1 never came"), "{error}");
    }
}
