//! On the GPU (skipped with the reason when there is none): the FP8 block-scaled GEMM on
//! cuBLASLt (`cuda::scaled`), D = A·Bᵀ on operands in the plan's FP8 buffer layout, against the
//! CPU reference's FP8 GEMM (`numerics::matmul_fp8`, the same E4M3 values and scales) and a
//! float64 product of the dequantised operands, for activation tiles × weight blocks (Fprop and
//! Dgrad) and tiles × tiles (Wgrad), K up to 7168, partial weight blocks: within DESIGN.md's
//! FP8 bound, 1e-3.
#![cfg(feature = "cuda")]

use cudarc::driver::DevicePtr;
use dsc_runtime::cpu::numerics::{matmul_fp8, quantize, Quantized, Tiling};
use dsc_runtime::cuda::exec::fp8_bytes;
use dsc_runtime::cuda::scaled::{Groups, ScaledGemm};
use dsc_runtime::cuda::Gpu;
use dsc_runtime::rng::Rng;

fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    let diff: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (diff / norm).sqrt()
}

/// A·Bᵀ in float64 of the dequantised operands, A [m, k], B [n, k].
fn dequantised_product(a: &Quantized, b: &Quantized) -> Vec<f64> {
    let (da, db) = (a.dequantize(), b.dequantize());
    let k = a.n;
    (0..a.m * b.m)
        .map(|index| {
            let (i, j) = (index / b.m, index % b.m);
            (0..k).map(|kk| da[i * k + kk] * db[j * k + kk]).sum()
        })
        .collect()
}

#[test]
fn fp8_gemms_on_cublaslt_match_the_cpu_reference() {
    let gpu = match Gpu::open() {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let blas = gpu.blas().expect("cuBLAS and cuBLASLt");
    let mut rng = Rng::new(7);
    let mut worst: f64 = 0.0;
    for (m, n, k, b_groups) in
        [(256, 512, 1024, Groups::Blocks), (128, 2112, 7168, Groups::Blocks), (512, 384, 4096, Groups::Tiles)]
    {
        let b_tiling = match b_groups {
            Groups::Tiles => Tiling::ACTIVATION,
            Groups::Blocks => Tiling::WEIGHT,
        };
        // Rows of different magnitudes, so that scales differ from group to group.
        let scaled = |rng: &mut Rng, rows: usize| -> Vec<f64> {
            rng.gaussians(rows * k)
                .into_iter()
                .enumerate()
                .map(|(i, x)| x * 2f64.powi((i / k % 7) as i32 - 3))
                .collect()
        };
        let a = quantize(&scaled(&mut rng, m), m, k, Tiling::ACTIVATION);
        let b = quantize(&scaled(&mut rng, n), n, k, b_tiling);
        let want: Vec<f64> = matmul_fp8(&a, &b.transposed(), 128);
        let exact = dequantised_product(&a, &b);
        let (bytes_a, bytes_b) = (fp8_bytes(&a), fp8_bytes(&b));
        let on_gpu = |bytes: &[u8]| gpu.stream.clone_htod(bytes).expect("upload");
        let (da, db) = (on_gpu(&bytes_a), on_gpu(&bytes_b));
        let dd = gpu.stream.clone_htod(&vec![f32::NAN; m * n]).expect("upload");
        {
            let ((pa, _sa), (pb, _sb), (pd, _sd)) =
                (da.device_ptr(&gpu.stream), db.device_ptr(&gpu.stream), dd.device_ptr(&gpu.stream));
            let g = ScaledGemm { a: pa, b: pb, d: pd, m, n, k, b_groups };
            blas.fp8.run(&gpu, &g).expect("cuBLASLt FP8 GEMM");
        }
        let got: Vec<f64> = gpu.stream.clone_dtoh(&dd).expect("download").into_iter().map(f64::from).collect();
        let (vs_cpu, vs_f64) = (relative_error(&got, &want), relative_error(&got, &exact));
        println!("m {m} n {n} k {k} {b_groups:?}: vs CPU FP8 GEMM {vs_cpu:.2e}, vs f64 {vs_f64:.2e}");
        // DESIGN.md's bound for FP8 against the FP8-emulated reference: the tensor cores sum a
        // 128-element chunk in reduced precision, which the reference (exact products summed in
        // f32) does not model.
        assert!(vs_cpu <= 1e-3 && vs_f64 <= 1e-3, "m {m} n {n} k {k} {b_groups:?}: {vs_cpu:.2e} / {vs_f64:.2e}");
        worst = worst.max(vs_cpu);
    }
    println!("worst relative error against the CPU reference: {worst:.2e}");
}
