//! The CPU backend: the reference that executes a training graph op by op in `f32` (or `f64`
//! for checks), with exact FP8 and BF16 rounding emulation; a graph whose MoE layers exchange
//! rows with other ranks reaches them through an [`Exchange`]. Its heaviest ops (the FP8 GEMM,
//! quantisation) spread their rows over the cores ([`rows`]).

pub mod exchange;
pub mod exec;
pub mod kernels;
pub mod numerics;
pub mod real;
pub mod rows;
pub mod value;

pub use exchange::Exchange;
pub use exec::{run, run_exchanging, run_observed};
pub use real::Real;
pub use value::{Tensor, Value};
