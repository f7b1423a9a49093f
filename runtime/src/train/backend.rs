//! What runs a training graph's functions for the [`super::Trainer`]: the CPU reference
//! ([`Cpu`]), or with the `cuda` feature a compiled plan on the GPU
//! (`cuda::exec::Executor`). Functions take and return host values; a backend may also keep
//! the training state itself ([`Resident`]: the GPU's memory), so that a step moves only its
//! batch and a few numbers. And what joins the trainer to its data-parallel replicas in other
//! processes ([`DataParallel`]: NCCL, with the `cuda` feature).

use crate::cpu::{self, Real, Value};
use dsc_compiler::graph::Module;

pub trait Backend<T: Real> {
    /// Runs function `f` of the training graph on `args`.
    fn run(&mut self, f: usize, args: Vec<Value<T>>) -> Result<Vec<Value<T>>, String>;

    /// The backend as one that keeps the training state, if it can.
    fn resident(&mut self) -> Option<&mut dyn Resident<T>> {
        None
    }

    /// Where its time went, if it was asked to measure that.
    fn profile(&self) -> Option<String> {
        None
    }
}

/// Adam's (m, v) of each learned parameter, in the graph's order.
pub type Moments<T> = Vec<(Value<T>, Value<T>)>;

/// A backend keeping the parameters (every one, in the graph's order), the Adam moments of
/// the learned ones and the step's gradient sums where it computes: the trainer hands the
/// state over once and reads it back when asked. Among data-parallel processes it keeps its
/// ZeRO-1 shard of the moments (the training graph's layout) and shares the gradients and
/// the updated parameters with the others; then `reduce_gradients`, `update` and `state` are
/// collectives every process calls.
pub trait Resident<T: Real> {
    /// Takes the state over.
    fn load(&mut self, params: &[Value<T>], moments: &[(Value<T>, Value<T>)]) -> Result<(), String>;
    /// Runs gradient function `f` on the parameters and `rest` (the micro-batch's arguments);
    /// its outputs from `grads` on (one per parameter) are added into the gradient sums (the
    /// step's `first` micro-batch sets them); returns the outputs before them.
    fn gradients(&mut self, f: usize, rest: Vec<Value<T>>, grads: usize, first: bool) -> Result<Vec<Value<T>>, String>;
    /// Sums the gradient sums over the processes, this one keeping its shard (alone, the
    /// whole); returns the sum of the squares of the shard's elements (not finite where one
    /// is not).
    fn reduce_gradients(&mut self) -> Result<f64, String>;
    /// Runs this process's optimizer function on (parameter, gradient sum, m, v) of each of
    /// the shard's pieces, (bias, `loads`) of each of `biases`, then `scalars`; keeps its
    /// results (new parameters, moments and biases) and shares the new parameters with the
    /// other processes.
    fn update(&mut self, biases: &[(usize, Value<T>)], scalars: Vec<Value<T>>) -> Result<(), String>;
    /// The state: the parameters and the moments (every process's).
    fn state(&mut self) -> Result<(Vec<Value<T>>, Moments<T>), String>;
}

/// The CPU reference backend, over its own copy of the training graph's module.
pub struct Cpu(pub Module);

impl<T: Real> Backend<T> for Cpu {
    fn run(&mut self, f: usize, args: Vec<Value<T>>) -> Result<Vec<Value<T>>, String> {
        Ok(cpu::run(&self.0, f, args))
    }
}

/// This process's place among the data-parallel replicas of a multi-process run, and the sum
/// of a step's host sums over them.
pub trait DataParallel {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Sums `data` over every replica, in place (each replica passes the same length).
    fn sum(&mut self, data: &mut [f64]) -> Result<(), String>;
}
