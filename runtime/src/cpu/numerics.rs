//! Exact emulation of the low-precision number formats of DeepSeek-V3's mixed-precision recipe,
//! so the CPU backend computes what the GPU kernels compute: FP8 E4M3 encoding and decoding
//! (`e4m3`), rounding to bfloat16 (`bf16`), fine-grained FP8 quantisation with one scale per
//! 1×128 activation tile or 128×128 weight block (`scaling`), and the FP8 GEMM whose tensor-core
//! partial sums are promoted into FP32 every `promote` elements of K (`gemm`).

mod bf16;
mod e4m3;
mod gemm;
mod scaling;

pub use bf16::{bf16_bits, from_bf16_bits, round_bf16};
pub use e4m3::{e4m3_decode, e4m3_encode, round_e4m3, E4M3_MAX};
pub use gemm::matmul_fp8;
pub use scaling::{quantize, Quantized, Tiling};
