//! dsc's compiler: everything between a resolved [`dsc_lang::Spec`] and a runnable plan. So far
//! it holds the closed-form estimates `dsc info` prints ([`estimate`]: parameter counts, training
//! FLOPs, tokens per step and memory per GPU) and the first piece of the parallel plan
//! ([`parallel`]: the split of the model into pipeline stages).

pub mod estimate;
pub mod fuse;
pub mod graph;
pub mod mlir;
pub mod parallel;
pub mod plan;

#[cfg(test)]
mod testing;
