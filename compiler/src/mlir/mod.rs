//! Kernels through MLIR: [`emit`] writes each generated kernel as an MLIR `gpu.module`,
//! [`gemm`] the FP8 GEMM on Hopper's warpgroup tensor cores, [`attention`] fused causal
//! attention (both hand-scheduled, written through `ptx`); with the `mlir` feature, `lower`
//! runs MLIR's own passes (through melior) down to PTX for sm_90a. No CUDA toolkit is needed
//! to compile.

pub mod attention;
pub mod emit;
pub mod fp8;
pub mod gemm;
mod indexed;
#[cfg(feature = "mlir")]
pub mod lower;
mod ptx;
pub(crate) mod rows;
