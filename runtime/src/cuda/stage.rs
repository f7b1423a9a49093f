//! Pipeline stages on the GPU: the [`StageRunner`] of a rank of a parallel plan trained on
//! GPUs. A compiled plan of several pipeline stages holds each stage's forward and backward
//! (`Plan::stages`); [`runners`] runs them on an [`Executor`] of the plan, the stage's MoE
//! all-to-alls on the host through the stage's exchange with its expert-parallel group (lent
//! to the executor for each call: [`Executor::exchanging`]). One executor per thread serves
//! every stage the thread's rank holds and, where the thread lives on (a launched process's
//! one rank), every step: an executor cannot leave its thread (its cuBLASLt handle and NCCL
//! communicator are not `Send`), and the thread-ranks of one process live for one step each,
//! so they make theirs anew each step.
//!
//! What stays on the host for now: the parameters (uploaded with each call), the carry
//! between stages and its gradient (sent between the ranks as the CPU ranks send them), the
//! weight-gradient sums and ZeRO-1's optimizer (`train::pipeline`). The state on the device
//! and NCCL between GPUs are the next steps.

use super::exec::Executor;
use super::{Gpu, GpuError};
use crate::comm::CommError;
use crate::cpu::{Exchange, Value};
use crate::train::graph_stage::{Runners, StageRunner};
use dsc_compiler::graph::Module;
use dsc_compiler::plan::Plan;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

/// An executor its thread shares among the stages it runs.
type Shared = Rc<RefCell<Executor>>;

thread_local! {
    /// This thread's executors, by plan directory and GPU.
    static EXECUTORS: RefCell<HashMap<(PathBuf, usize), Shared>> = RefCell::new(HashMap::new());
}

/// A stage's functions on a thread's executor.
struct OnGpu {
    executor: Shared,
    /// The stage's exchange with its expert-parallel group, while the executor does not hold it.
    exchange: Option<Box<dyn Exchange>>,
    /// The plan (the executor's too, one copy for all): the module the stage's functions are in.
    plan: Arc<Plan>,
    forward: usize,
    backward: usize,
}

impl StageRunner for OnGpu {
    fn functions(&self) -> (&Module, usize, usize) {
        (&self.plan.module, self.forward, self.backward)
    }

    fn run(&mut self, f: usize, args: Vec<Value<f32>>) -> Result<Vec<Value<f32>>, CommError> {
        let name = &self.plan.module.functions[f].name;
        let mut executor = self.executor.borrow_mut();
        let before = executor.exchanging(self.exchange.take().expect("the stage holds its exchange between calls"));
        let result = executor.run(f, &args);
        self.exchange = Some(executor.exchanging(before));
        result.map_err(|e| CommError(format!("{name} on the GPU: {e}")))
    }
}

/// Which GPU runs a rank's stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gpus {
    /// This one, for every rank (a launched process's one rank: its `LOCAL_RANK`).
    One(usize),
    /// The first `count`, rank r on GPU r mod `count` (the thread-ranks of one process).
    Spread(usize),
}

impl Gpus {
    /// The GPU of rank `rank`.
    fn of(self, rank: usize) -> usize {
        match self {
            Gpus::One(ordinal) => ordinal,
            Gpus::Spread(count) => rank % count,
        }
    }
}

/// The runners of `plan`'s stages (compiled into `dir`) on `gpus`. Refused where the plan
/// holds no stages.
pub fn runners(plan: Plan, dir: &Path, gpus: Gpus) -> Result<Runners, GpuError> {
    if plan.stages.is_empty() {
        return Err(GpuError::Unsupported(format!(
            "the plan `{}` holds no pipeline stages: compile the spec with its parallel plan (`dsc compile`)",
            dir.display()
        )));
    }
    let (plan, dir) = (Arc::new(plan), dir.to_path_buf());
    Ok(Arc::new(move |rank, stage, exchange: Box<dyn Exchange + Send>| {
        let ordinal = gpus.of(rank);
        let executor = executor(&plan, &dir, ordinal).map_err(|e| format!("stage {stage} on GPU {ordinal}: {e}"))?;
        let held = &plan.stages[stage];
        let (forward, backward, exchange) = (held.forward, held.backward, Some(exchange as Box<dyn Exchange>));
        Ok(Box::new(OnGpu { executor, exchange, plan: Arc::clone(&plan), forward, backward }) as Box<dyn StageRunner>)
    }))
}

/// This thread's executor of the plan in `dir` on GPU `ordinal`, made at its first use.
fn executor(plan: &Arc<Plan>, dir: &Path, ordinal: usize) -> Result<Shared, GpuError> {
    let key = (dir.to_path_buf(), ordinal);
    if let Some(executor) = EXECUTORS.with_borrow(|executors| executors.get(&key).cloned()) {
        return Ok(executor);
    }
    let executor = Rc::new(RefCell::new(Executor::new(Arc::clone(plan), dir, Gpu::open_on(ordinal)?, false)?));
    EXECUTORS.with_borrow_mut(|executors| executors.insert(key, Rc::clone(&executor)));
    Ok(executor)
}
