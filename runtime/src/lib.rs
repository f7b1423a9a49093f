//! dsc's runtime: executes a training graph. `cpu` is the reference backend (op by op, exact
//! FP8 emulation); `cuda` (feature `cuda`) launches a compiled plan's generated kernels on the
//! GPU, in buffers `memory` places by lifetime; `comm` moves tensors between thread-ranks;
//! `train` holds the training loop, its schedules and metrics; `data` the corpora;
//! `checkpoint` the safetensors state.

pub mod checkpoint;
pub mod comm;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod forward;
pub mod memory;
pub mod rng;
pub mod train;
