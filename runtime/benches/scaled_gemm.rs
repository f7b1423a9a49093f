//! Benchmark (GPU machine; prints nothing useful without a GPU): dsc's FP8 block-scaled GEMM on
//! cuBLASLt (`cuda::scaled`) at issue 9's DeepSeek-V3 shapes, M = 4096, activation tiles ×
//! weight blocks, f32 output. Prints one JSON line per shape: microseconds per GEMM (the
//! median of 20 timed runs of 10 after 5 warm-ups, each run synchronised) and TFLOP/s.
//! `benches/fp8_gemm.py` measures PyTorch's block-scaled `scaled_mm` on the same shapes.
//!
//! `cargo bench -p dsc-runtime --features cuda --bench scaled_gemm`

use cudarc::driver::DevicePtr;
use dsc_runtime::cpu::numerics::{quantize, Tiling};
use dsc_runtime::cuda::exec::fp8_bytes;
use dsc_runtime::cuda::scaled::{Fp8Operand, Groups, ScaledGemm};
use dsc_runtime::cuda::Gpu;
use dsc_runtime::rng::Rng;
use std::time::Instant;

const SHAPES: [(usize, usize); 6] =
    [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)];

fn main() {
    let gpu = match Gpu::open() {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("no GPU: {e}");
            return;
        }
    };
    let blas = gpu.blas(false).expect("cuBLAS and cuBLASLt");
    let m = 4096;
    let mut rng = Rng::new(1);
    for (n, k) in SHAPES {
        // Random operands: E4M3 bytes and scales as the plan lays them out (quantised once on
        // the host from Gaussian values; the timing does not depend on them).
        let a = fp8_bytes(&quantize(&rng.gaussians(m * k), m, k, Tiling::ACTIVATION));
        let b = fp8_bytes(&quantize(&rng.gaussians(n * k), n, k, Tiling::WEIGHT));
        let (da, db) = (gpu.stream.clone_htod(&a).expect("upload"), gpu.stream.clone_htod(&b).expect("upload"));
        let dd = gpu.stream.alloc_zeros::<f32>(m * n).expect("alloc");
        let ((pa, _a), (pb, _b), (pd, _d)) =
            (da.device_ptr(&gpu.stream), db.device_ptr(&gpu.stream), dd.device_ptr(&gpu.stream));
        let (a, b) = (Fp8Operand::buffer(pa, m, k), Fp8Operand::buffer(pb, n, k));
        let g = ScaledGemm { a, b, d: pd, m, n, k, b_groups: Groups::Blocks, accumulate: false };
        let run = |times: usize| {
            let start = Instant::now();
            for _ in 0..times {
                blas.fp8.run(&gpu, &g).expect("cuBLASLt FP8 GEMM");
            }
            gpu.stream.synchronize().expect("sync");
            start.elapsed().as_secs_f64() / times as f64
        };
        run(5);
        let mut samples: Vec<f64> = (0..20).map(|_| run(10)).collect();
        samples.sort_by(f64::total_cmp);
        let seconds = samples[samples.len() / 2];
        let tflops = 2.0 * (m * n * k) as f64 / seconds / 1e12;
        println!(
            r#"{{"impl": "dsc cuBLASLt", "m": {m}, "n": {n}, "k": {k}, "us": {:.1}, "tflops": {tflops:.0}}}"#,
            seconds * 1e6
        );
    }
}
