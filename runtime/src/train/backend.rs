//! What runs a training graph's functions for the [`super::Trainer`]: the CPU reference
//! ([`Cpu`]), or with the `cuda` feature a compiled plan on the GPU
//! (`cuda::exec::Executor`). Functions take and return host values.

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
