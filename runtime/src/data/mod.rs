//! Training data: packed batches of token sequences (`batch`) and the corpora that fill them,
//! starting with the built-in synthetic corpus (`synthetic`).

pub mod batch;
pub mod synthetic;
