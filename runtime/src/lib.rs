//! dsc's runtime: executes a compiled plan. It will own the `Backend` trait with its `cpu`
//! reference and `cuda` implementations, communication (`comm`), the training loop (`train`),
//! data loading, checkpoints and metrics (DESIGN.md). It is empty until the training graph
//! exists; the crate is here so that the workspace has its final shape and dependency
//! direction (`runtime` → `compiler` without MLIR).
