//! Communication between ranks. [`threads`] connects ranks that are threads of one process
//! through memory (the CPU backend's multi-rank runs, in CI); NCCL for GPUs comes later.

pub mod threads;

pub use threads::{CommError, ThreadComm};
