//! The training loop and its parts: parameter initialisation (`init`), the parameters' EMA
//! (`ema`), where training is and
//! the recipe's scheduled values there (`schedule`: batch size, learning rate, γ, λ), the
//! metrics each step reports (`metrics`) and their curves (`plot`), the trainer that runs
//! steps (`trainer`) on a `backend` (the CPU reference, or a compiled plan on the GPU), the executor of a pipeline schedule on thread-ranks (`pipeline`),
//! the training graph's stages it runs and what runs their functions (`graph_stage`), ZeRO-1's optimizer shards (`zero`)
//! and the spec's parallel plan on thread-ranks for the trainer (`parallel`).

pub mod backend;
pub mod ema;
pub mod graph_stage;
pub mod init;
pub mod metrics;
pub mod parallel;
pub mod pipeline;
pub mod plot;
pub mod schedule;
pub mod trainer;
pub mod zero;

pub use backend::{Backend, Cpu, DataParallel, Resident};
pub use trainer::{StepError, Trainer, Unsupported};
