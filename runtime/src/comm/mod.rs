//! Communication between ranks. [`threads`] connects ranks that are threads of one process
//! through memory (the CPU backend's multi-rank runs, in CI); [`rendezvous`] lets the processes
//! of a multi-process run find each other (and hand NCCL its id: `cuda::nccl`).

pub mod rendezvous;
pub mod threads;

pub use threads::{CommError, ThreadComm};
