//! Data parallelism across processes over NCCL: one process per GPU, started by a launcher
//! (`comm::rendezvous::World`); rank 0 makes NCCL's unique id and hands it to the others over
//! TCP (`comm::rendezvous::share`), every rank joins the communicator. [`Nccl`] sums a step's
//! host sums (losses, expert loads, gradient norms; the whole gradient where the state is on
//! the host) over the ranks with one all-reduce in f64, and for ZeRO-1 on the device
//! (`super::resident`) reduce-scatters the gradient sums and all-gathers the updated shards,
//! in f32, on the executor's stream.
//! A collective that does not finish within the timeout (a peer died or hangs) fails the step
//! with a message instead of waiting forever; the communicator is then left alone (destroying
//! it would wait for the dead peer) and the process ends.
//!
//! Not here yet: pipeline stages and expert parallelism across GPUs (their schedules run on
//! thread-ranks, `train::parallel`).

use super::{Gpu, GpuError};
use crate::comm::rendezvous::{share, Secret, World};
use crate::train::DataParallel;
use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut};
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
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
        self.wait("a sum of the step's results")?;
        self.stream.memcpy_dtoh(&buffer, data)?;
        Ok(())
    }

    /// Sums `whole` over every rank; rank r gets the r-th of its equal parts in `part`.
    pub fn reduce_scatter(&self, whole: &CudaSlice<f32>, part: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        self.check_parts(whole.len(), part.len())?;
        self.comm.reduce_scatter(whole, part, &ReduceOp::Sum).map_err(|e| nccl("reduce-scatter", e))?;
        self.wait("a gradient reduce-scatter")
    }

    /// Puts every rank's `part` into `whole`, in rank order.
    pub fn all_gather<T: NcclType>(&self, part: &CudaSlice<T>, whole: &mut CudaViewMut<T>) -> Result<(), GpuError> {
        self.check_parts(whole.len(), part.len())?;
        self.comm.all_gather(part, whole).map_err(|e| nccl("all-gather", e))?;
        self.wait("an all-gather of the updated parameters")
    }

    fn check_parts(&self, whole: usize, part: usize) -> Result<(), GpuError> {
        if whole != part * self.world.size {
            return Err(GpuError::Unsupported(format!(
                "a collective of {whole} elements in {} parts of {part}",
                self.world.size
            )));
        }
        Ok(())
    }

    /// Waits for the stream's work so far (the collective just queued), at most the timeout.
    fn wait(&self, what: &str) -> Result<(), GpuError> {
        let done = self.stream.record_event(None)?;
        let deadline = Instant::now() + self.timeout;
        while !done.try_is_complete()? {
            if Instant::now() >= deadline {
                self.timed_out.store(true, Ordering::Relaxed);
                return Err(GpuError::Unsupported(format!(
                    "rank {} of {}: {what} did not finish within {} s (a peer died or hangs: see the other ranks' output)",
                    self.world.rank,
                    self.world.size,
                    self.timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
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

impl DataParallel for std::rc::Rc<Nccl> {
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
