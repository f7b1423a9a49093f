//! How the processes of a multi-process run find each other. [`World::from_env`] reads the
//! launcher's variables: torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`), SLURM's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) or mpirun's
//! (Open MPI's `OMPI_COMM_WORLD_RANK`, `…_SIZE`, `…_LOCAL_RANK`; MPICH's and Intel MPI's
//! `PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`), with `MASTER_ADDR` and `MASTER_PORT` set by the
//! job script; without them rank 0 is looked for on 127.0.0.1:29500, and a job over several
//! nodes must set `MASTER_ADDR`. [`exchange`] then hands
//! every rank's few bytes (an address to reach it at, or rank 0's NCCL id: [`share`]) to every
//! rank over TCP: rank 0 listens on the master address and, once every other rank has
//! connected, said who it is and handed its bytes, sends all of them to each; the others
//! connect, retrying while rank 0 is not up yet. Every wait has a deadline, so a
//! peer that never comes makes rank 0 fail naming the ranks missing, and a rank that cannot
//! reach rank 0 fails naming the address, instead of hanging.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The secret rank 0 shares (NCCL's unique id is 128 bytes).
pub type Secret = [u8; 128];

/// This process's place in the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// The GPU of this process on its node.
    pub local_rank: usize,
    /// Rank 0's `host:port`.
    pub master: String,
}

#[derive(Debug, PartialEq, Eq)]
pub struct RendezvousError(pub String);

impl fmt::Display for RendezvousError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RendezvousError {}

fn error(message: String) -> RendezvousError {
    RendezvousError(message)
}

impl World {
    /// The world the launcher describes through `var` (the process environment in `dsc`), or
    /// `None` when no launcher started this process (none of `WORLD_SIZE`, `SLURM_NTASKS`,
    /// `OMPI_COMM_WORLD_SIZE`, `PMI_SIZE` set).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<World>, RendezvousError> {
        const LAUNCHERS: [(&str, &str, &str); 4] = [
            ("RANK", "WORLD_SIZE", "LOCAL_RANK"),              // torchrun
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"), // srun
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"), // Open MPI's mpirun
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),       // MPICH's and Intel MPI's mpirun
        ];
        let Some(&(rank, size, local)) = LAUNCHERS.iter().find(|(_, size, _)| var(size).is_some()) else {
            return Ok(None);
        };
        // A launcher spreading processes over nodes must say where rank 0 listens.
        let fewer_here = |here: &str, all: &str| var(here).zip(var(all)).is_some_and(|(h, a)| h.trim() != a.trim());
        let several_nodes = var("SLURM_NNODES").is_some_and(|n| n.trim() != "1")
            || fewer_here("OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE")
            || fewer_here("MPI_LOCALNRANKS", "PMI_SIZE");
        if var("MASTER_ADDR").is_none() && several_nodes {
            return Err(error(
                "the job spans several nodes but `MASTER_ADDR` is not set: set it to the first node's address (under SLURM: `export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)`)".into(),
            ));
        }
        let number = |name: &str| -> Result<usize, RendezvousError> {
            let value = var(name).ok_or_else(|| error(format!("`{size}` is set but `{name}` is not: set both")))?;
            value.trim().parse().map_err(|_| error(format!("`{name}={value}` is not a whole number")))
        };
        let world = World {
            rank: number(rank)?,
            size: number(size)?,
            local_rank: if var(local).is_some() { number(local)? } else { 0 },
            master: format!(
                "{}:{}",
                var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                var("MASTER_PORT").map_or(Ok(29500), |_| number("MASTER_PORT"))?
            ),
        };
        if world.size == 0 || world.rank >= world.size {
            return Err(error(format!(
                "`{rank}={}` is not a rank of a world of `{size}={}` processes",
                world.rank, world.size
            )));
        }
        Ok(Some(world))
    }
}

/// Rank 0 gives `secret` (which only it has) to every rank of `world`; every rank returns
/// it. Fails after `timeout` if a peer is missing.
pub fn share(world: &World, secret: Option<&Secret>, timeout: Duration) -> Result<Secret, RendezvousError> {
    let mine = match (world.rank, secret) {
        (0, Some(secret)) => &secret[..],
        (0, None) => return Err(error("rank 0 shares the secret, so it must have one".into())),
        _ => &[],
    };
    let all = exchange(world, mine, timeout)?;
    all[0].as_slice().try_into().map_err(|_| error(format!("rank 0 sent {} bytes, not a secret", all[0].len())))
}

/// Every rank of `world` hands `mine` to every rank: each returns all ranks' bytes in rank
/// order. Fails after `timeout` if a peer is missing.
pub fn exchange(world: &World, mine: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>, RendezvousError> {
    let deadline = Instant::now() + timeout;
    if world.rank == 0 {
        serve(world, mine, deadline)
    } else {
        fetch(world, mine, deadline, timeout)
    }
}

/// Rank 0: accepts every other rank and its bytes, then sends each everyone's.
fn serve(world: &World, mine: &[u8], deadline: Instant) -> Result<Vec<Vec<u8>>, RendezvousError> {
    if world.size == 1 {
        return Ok(vec![mine.to_vec()]);
    }
    let listener = TcpListener::bind(listen_address(&world.master)?)
        .map_err(|e| error(format!("rank 0 cannot listen on `{}`: {e} (is MASTER_PORT free?)", world.master)))?;
    listener.set_nonblocking(true).map_err(|e| error(format!("rank 0's listener: {e}")))?;
    let mut peers: BTreeMap<usize, (TcpStream, Vec<u8>)> = BTreeMap::new();
    while peers.len() < world.size - 1 {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream.set_nonblocking(false).map_err(|e| error(format!("a connection from {from}: {e}")))?;
                stream.set_read_timeout(Some(remaining(deadline))).map_err(|e| error(format!("{from}: {e}")))?;
                let mut hello = [0u8; 8];
                if stream.read_exact(&mut hello).is_err() {
                    continue; // not one of ours (or it went away): wait for the real peer
                }
                let rank = u32::from_le_bytes(hello[..4].try_into().expect("4 bytes")) as usize;
                let size = u32::from_le_bytes(hello[4..].try_into().expect("4 bytes")) as usize;
                if size != world.size {
                    return Err(error(format!(
                        "rank {rank} (from {from}) runs in a world of {size} processes, rank 0 in one of {}: start every process with the same WORLD_SIZE",
                        world.size
                    )));
                }
                if rank == 0 || rank >= world.size || peers.contains_key(&rank) {
                    return Err(error(format!(
                        "two processes (one from {from}) claim rank {rank}: give each its own RANK"
                    )));
                }
                let Ok(bytes) = read_bytes(&mut stream) else { continue };
                peers.insert(rank, (stream, bytes));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> =
                        (1..world.size).filter(|r| !peers.contains_key(r)).map(|r| r.to_string()).collect();
                    return Err(error(format!(
                        "rank 0 waited for the other ranks at `{}` and rank(s) {} never came: did they start, with MASTER_ADDR and MASTER_PORT pointing here?",
                        world.master,
                        missing.join(", ")
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(error(format!("rank 0 accepting peers on `{}`: {e}", world.master))),
        }
    }
    let all: Vec<Vec<u8>> =
        std::iter::once(mine.to_vec()).chain(peers.values().map(|(_, bytes)| bytes.clone())).collect();
    let mut message = Vec::new();
    for bytes in &all {
        message.extend((bytes.len() as u32).to_le_bytes());
        message.extend(bytes);
    }
    for (rank, (stream, _)) in &mut peers {
        stream.write_all(&message).map_err(|e| error(format!("rank 0 sending to rank {rank}: {e}")))?;
    }
    Ok(all)
}

/// The most bytes a rank hands round (an address or an id is far less): a connection claiming
/// more is not one of ours.
const MAX_BYTES: usize = 1 << 16;

/// Reads a length (4 bytes) and as many bytes.
fn read_bytes(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_BYTES {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("{len} bytes claimed")));
    }
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Another rank: connects to rank 0 (retrying until the deadline), says who it is and hands
/// its bytes, reads everyone's.
fn fetch(world: &World, mine: &[u8], deadline: Instant, timeout: Duration) -> Result<Vec<Vec<u8>>, RendezvousError> {
    let unreachable = |why: String| {
        error(format!(
            "rank {} could not reach rank 0 at `{}` within {} s ({why}): is rank 0 running, and MASTER_ADDR/MASTER_PORT the same for every rank?",
            world.rank,
            world.master,
            timeout.as_secs_f64()
        ))
    };
    let mut stream = dial(&world.master, deadline).map_err(|e| unreachable(e.to_string()))?;
    let mut hello = Vec::with_capacity(12 + mine.len());
    hello.extend((world.rank as u32).to_le_bytes());
    hello.extend((world.size as u32).to_le_bytes());
    hello.extend((mine.len() as u32).to_le_bytes());
    hello.extend(mine);
    stream.write_all(&hello).map_err(|e| unreachable(e.to_string()))?;
    stream
        .set_read_timeout(Some(remaining(deadline).max(Duration::from_millis(1))))
        .map_err(|e| unreachable(e.to_string()))?;
    (0..world.size).map(|_| read_bytes(&mut stream)).collect::<std::io::Result<_>>().map_err(|e| {
        error(format!(
            "rank {} reached rank 0 at `{}` but got no answer from it ({e}): a rank missing, or rank 0 failed (see its output)",
            world.rank, world.master
        ))
    })
}

/// Connects to `address` (`host:port`), retrying until `deadline` (the peer may not listen
/// yet).
pub(super) fn dial(address: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    let target = address
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "the address does not resolve"))?;
    loop {
        match TcpStream::connect_timeout(&target, remaining(deadline).max(Duration::from_millis(1))) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// What rank 0 binds: the master address's port on every interface.
fn listen_address(master: &str) -> Result<String, RendezvousError> {
    let port = master.rsplit_once(':').map(|(_, port)| port).ok_or_else(|| error(format!("`{master}` has no port")))?;
    Ok(format!("0.0.0.0:{port}"))
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    /// A free port on this machine (bound, then released).
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").expect("a port").local_addr().expect("address").port()
    }

    fn world(rank: usize, size: usize, port: u16) -> World {
        World { rank, size, local_rank: rank, master: format!("127.0.0.1:{port}") }
    }

    #[test]
    fn the_launchers_variables() {
        assert_eq!(World::from_env(env(&[])), Ok(None));
        let torchrun = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ]);
        assert_eq!(
            World::from_env(torchrun),
            Ok(Some(World { rank: 3, size: 8, local_rank: 1, master: "node0:1234".into() }))
        );
        let slurm =
            env(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "5"), ("MASTER_ADDR", "n1")]);
        assert_eq!(
            World::from_env(slurm),
            Ok(Some(World { rank: 5, size: 16, local_rank: 5, master: "n1:29500".into() }))
        );
        let open_mpi = env(&[
            ("OMPI_COMM_WORLD_RANK", "9"),
            ("OMPI_COMM_WORLD_SIZE", "16"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("MASTER_ADDR", "n0"),
        ]);
        assert_eq!(
            World::from_env(open_mpi),
            Ok(Some(World { rank: 9, size: 16, local_rank: 1, master: "n0:29500".into() }))
        );
        let mpich = env(&[("PMI_RANK", "2"), ("PMI_SIZE", "4"), ("MPI_LOCALRANKID", "2")]);
        assert_eq!(
            World::from_env(mpich),
            Ok(Some(World { rank: 2, size: 4, local_rank: 2, master: "127.0.0.1:29500".into() }))
        );
        for (pairs, says) in [
            (vec![("WORLD_SIZE", "2")], "`RANK` is not"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "two")], "`RANK=two` is not a whole number"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "not a rank of a world of `WORLD_SIZE=2`"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")], "`MASTER_PORT=x`"),
            (vec![("SLURM_NTASKS", "16"), ("SLURM_PROCID", "0"), ("SLURM_NNODES", "2")], "`MASTER_ADDR` is not set"),
            (
                vec![
                    ("OMPI_COMM_WORLD_SIZE", "16"),
                    ("OMPI_COMM_WORLD_RANK", "0"),
                    ("OMPI_COMM_WORLD_LOCAL_SIZE", "8"),
                ],
                "`MASTER_ADDR` is not set",
            ),
        ] {
            let got = World::from_env(env(&pairs)).expect_err("malformed");
            assert!(got.0.contains(says), "{got}");
        }
    }

    #[test]
    fn every_rank_gets_rank_0s_secret() {
        let port = free_port();
        let secret: Secret = std::array::from_fn(|i| i as u8 ^ 0x5a);
        let timeout = Duration::from_secs(20);
        let others: Vec<_> =
            (1..4).map(|rank| std::thread::spawn(move || share(&world(rank, 4, port), None, timeout))).collect();
        assert_eq!(share(&world(0, 4, port), Some(&secret), timeout), Ok(secret));
        for other in others {
            assert_eq!(other.join().expect("rank thread"), Ok(secret));
        }
    }

    #[test]
    fn every_rank_gets_every_ranks_bytes() {
        let port = free_port();
        let timeout = Duration::from_secs(20);
        let bytes = |rank: usize| vec![rank as u8; rank];
        let others: Vec<_> = (1..4)
            .map(|rank| std::thread::spawn(move || exchange(&world(rank, 4, port), &bytes(rank), timeout)))
            .collect();
        let all: Vec<Vec<u8>> = (0..4).map(bytes).collect();
        assert_eq!(exchange(&world(0, 4, port), &bytes(0), timeout), Ok(all.clone()));
        for other in others {
            assert_eq!(other.join().expect("rank thread"), Ok(all.clone()));
        }
    }

    #[test]
    fn a_world_of_one_needs_no_network() {
        let secret = [7u8; 128];
        assert_eq!(share(&world(0, 1, 1), Some(&secret), Duration::ZERO), Ok(secret));
    }

    #[test]
    fn a_rank_that_never_comes_fails_rank_0_naming_it() {
        let port = free_port();
        let timeout = Duration::from_millis(800);
        let one = std::thread::spawn(move || share(&world(1, 3, port), None, Duration::from_secs(20)));
        let started = Instant::now();
        let got = share(&world(0, 3, port), Some(&[1; 128]), timeout).expect_err("rank 2 is missing");
        assert!(got.0.contains("rank(s) 2 never came"), "{got}");
        assert!(started.elapsed() < Duration::from_secs(10));
        // Rank 1 reached rank 0 but got nothing: it fails too, saying so.
        let one = one.join().expect("rank thread").expect_err("no id");
        assert!(one.0.contains("got no answer"), "{one}");
    }

    #[test]
    fn a_rank_without_rank_0_fails_naming_the_address() {
        let port = free_port();
        let got = share(&world(2, 3, port), None, Duration::from_millis(500)).expect_err("nobody listens");
        assert!(got.0.contains(&format!("could not reach rank 0 at `127.0.0.1:{port}`")), "{got}");
    }

    #[test]
    fn disagreeing_world_sizes_are_named() {
        let port = free_port();
        let one = std::thread::spawn(move || share(&world(1, 3, port), None, Duration::from_secs(5)));
        let got = share(&world(0, 2, port), Some(&[0; 128]), Duration::from_secs(5)).expect_err("sizes differ");
        assert!(got.0.contains("start every process with the same WORLD_SIZE"), "{got}");
        assert!(one.join().expect("rank thread").is_err());
    }
}
