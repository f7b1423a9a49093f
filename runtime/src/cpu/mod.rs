//! The CPU backend: the reference that executes a training graph op by op in `f32` (or `f64`
//! for checks), with exact FP8 and BF16 rounding emulation.

pub mod exec;
pub mod kernels;
pub mod numerics;
pub mod real;
pub mod value;

pub use exec::{run, run_observed};
pub use real::Real;
pub use value::{Tensor, Value};
