//! dsc's runtime: executes a training graph. `cpu` is the reference backend (op by op, exact
//! FP8 emulation); `train` holds the training loop's schedules and metrics; `data` the
//! corpora. The `cuda` backend, communication, checkpoints follow (DESIGN.md).

pub mod checkpoint;
pub mod comm;
pub mod cpu;
pub mod data;
pub mod forward;
pub mod rng;
pub mod train;
