//! Training data: packed batches of token sequences (`batch`), the built-in synthetic corpus
//! (`synthetic`), documents from users' files (`text`), tokenizers and data preparation
//! (`tokenizer`), the prepared token-file format (`tokens`), and the loader that mixes, FIMs,
//! shards and packs the spec's sources (`loader`).

pub mod batch;
pub mod loader;
pub mod synthetic;
pub mod text;
pub mod tokenizer;
pub mod tokens;
