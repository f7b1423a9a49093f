//! What runs a training graph's functions for the [`super::Trainer`]: the CPU reference
//! ([`Cpu`]), or with the `cuda` feature a compiled plan on the GPU
//! (`cuda::exec::Executor`). Functions take and return host values. And what joins the
//! trainer to its data-parallel replicas in other processes ([`DataParallel`]: NCCL, with the
//! `cuda` feature).

use crate::cpu::{self, Real, Value};
use dsc_compiler::graph::Module;

pub trait Backend<T: Real> {
    /// Runs function `f` of the training graph on `args`.
    fn run(&mut self, f: usize, args: Vec<Value<T>>) -> Result<Vec<Value<T>>, String>;
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
