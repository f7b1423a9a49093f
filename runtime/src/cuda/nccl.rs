//! Data parallelism across processes over NCCL: one process per GPU, started by a launcher
//! (`comm::rendezvous::World`); rank 0 makes NCCL's unique id and hands it to the others over
//! TCP (`comm::rendezvous::share`), every rank joins the communicator, and [`Nccl`] sums a
//! step's host sums (losses, expert loads, gradients) over the ranks with one all-reduce in
//! f64.
//! A collective that does not finish within the timeout (a peer died or hangs) fails the step
//! with a message instead of waiting forever; the communicator is then left alone (destroying
//! it would wait for the dead peer) and the process ends.
//!
//! Not here yet: pipeline stages and expert parallelism across GPUs (their schedules run on
//! thread-ranks, `train::parallel`), ZeRO-1 sharding of the optimizer (every rank runs the
//! whole update on the summed gradients), gradients kept on the device.

use super::{Gpu, GpuError};
use crate::comm::rendezvous::{share, Secret, World};
use crate::train::DataParallel;
use cudarc::driver::CudaStream;
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Nccl {
    /// Destroyed on drop unless a collective timed out.
    comm: ManuallyDrop<Comm>,
    timed_out: AtomicBool,
    stream: Arc<CudaStream>,
    world: World,
    timeout: Duration,
}

fn nccl(what: &str, e: impl std::fmt::Debug) -> GpuError {
    GpuError::Unsupported(format!("NCCL {what}: {e:?}"))
}

impl Nccl {
    /// Joins `world`'s communicator on `gpu`; every wait for a peer ends after `timeout`.
    pub fn new(gpu: &Gpu, world: &World, timeout: Duration) -> Result<Nccl, GpuError> {
        let id = if world.rank == 0 { Some(Id::new().map_err(|e| nccl("unique id", e))?) } else { None };
        let secret: Option<Secret> = id.as_ref().map(|id| id.internal().map(|c| c as u8));
        let shared = share(world, secret.as_ref(), timeout).map_err(|e| GpuError::Unsupported(e.to_string()))?;
        let comm = Comm::from_rank(gpu.stream.clone(), world.rank, world.size, Id::uninit(shared.map(|b| b as _)))
            .map_err(|e| nccl("communicator", e))?;
        Ok(Nccl {
            comm: ManuallyDrop::new(comm),
            timed_out: AtomicBool::new(false),
            stream: gpu.stream.clone(),
            world: world.clone(),
            timeout,
        })
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    /// Sums `data` over every rank, in place.
    pub fn sum(&self, data: &mut [f64]) -> Result<(), GpuError> {
        let mut buffer = self.stream.clone_htod(data)?;
        self.comm.all_reduce_in_place(&mut buffer, &ReduceOp::Sum).map_err(|e| nccl("all-reduce", e))?;
        let done = self.stream.record_event(None)?;
        let deadline = Instant::now() + self.timeout;
        while !done.try_is_complete()? {
            if Instant::now() >= deadline {
                self.timed_out.store(true, Ordering::Relaxed);
                return Err(GpuError::Unsupported(format!(
                    "rank {} of {}: a gradient all-reduce did not finish within {} s (a peer died or hangs: see the other ranks' output)",
                    self.world.rank,
                    self.world.size,
                    self.timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.stream.memcpy_dtoh(&buffer, data)?;
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if !self.timed_out.load(Ordering::Relaxed) {
            // SAFETY: dropped once, here, and not used after.
            unsafe { ManuallyDrop::drop(&mut self.comm) }
        }
    }
}

impl DataParallel for Nccl {
    fn rank(&self) -> usize {
        self.world.rank
    }

    fn size(&self) -> usize {
        self.world.size
    }

    fn sum(&mut self, data: &mut [f64]) -> Result<(), String> {
        Nccl::sum(self, data).map_err(|e| e.to_string())
    }
}
