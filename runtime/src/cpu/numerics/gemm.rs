//! The FP8 GEMM with fine-grained scales and accumulation promotion, in the order DeepGEMM's
//! Hopper kernel computes it. Along K the products are summed in chunks of `promote` elements
//! (N_C = 128 in DeepSeek-V3: four WGMMAs); each chunk's sum of raw E4M3 products is then
//! multiplied by the two scales of that chunk and added into an FP32 accumulator per output. The
//! tensor cores' own reduced-precision alignment inside a chunk (the loss that promotion bounds)
//! is not modelled: a chunk is summed in f32, in k order.

use std::ops::Range;

use super::scaling::Quantized;
use crate::cpu::rows::fill_rows;

/// C = A · B for A quantised as an [m, k] matrix and B as a [k, n] matrix; C is row-major
/// [m, n], each element the f32 accumulator's value.
///
/// For every output (i, j) and every chunk of `promote` indices along K (the last may be
/// shorter):
/// 1. `sum` = Σ a[i, k] · b[k, j] over the chunk, in f32, in k order (each product of two E4M3
///    values is exact in f32), starting from 0;
/// 2. `scale` = f32(scale_a(i, chunk) · scale_b(chunk, j));
/// 3. `acc` = fma(sum, scale, acc) in f32, starting from 0 (DeepGEMM's
///    `final_accum += scale_a * scale_b * accum`, which nvcc contracts into one FFMA).
///
/// Panics unless A's columns match B's rows and each scaling group's extent along K (A's tile
/// columns, B's block rows) is a multiple of `promote`, so that one pair of scales covers a chunk.
pub fn matmul_fp8(a: &Quantized, b: &Quantized, promote: usize) -> Vec<f64> {
    let (m, k, n) = (a.m, a.n, b.n);
    assert_eq!(b.m, k, "matmul_fp8: a is [{m}, {k}] but b is [{}, {n}]", b.m);
    assert!(
        promote > 0 && a.tiling.cols.is_multiple_of(promote) && b.tiling.rows.is_multiple_of(promote),
        "matmul_fp8: promotion every {promote} elements of K straddles the scaling groups of a {:?} and b {:?}",
        a.tiling,
        b.tiling
    );
    // E4M3 values and their products are exact in f32 (4 and 8 significant bits, magnitudes
    // 2⁻¹⁸ to 2¹⁸), so the products are taken there.
    let b_values: Vec<f32> = b.values.iter().map(|&x| x as f32).collect();
    let mut c = vec![0.0; m * n];
    fill_rows(&mut c, n, n * k, |first, block| {
        let mut sums = vec![0.0f32; n];
        let mut accumulators = vec![0.0f32; n];
        for (r, row) in block.chunks_mut(n).enumerate() {
            accumulators.fill(0.0);
            for start in (0..k).step_by(promote) {
                chunk_sums(a, &b_values, n, first + r, start..(start + promote).min(k), &mut sums);
                promote_chunk(a, b, first + r, start, &sums, &mut accumulators);
            }
            row.iter_mut().zip(&accumulators).for_each(|(c, &acc)| *c = f64::from(acc));
        }
    });
    c
}

/// Step 1 for row i and every column j at once: `sums[j]` = Σ_{k ∈ chunk} a[i, k] · b[k, j] in
/// f32, each sum taken in k order (`b_values`: b's E4M3 values in f32, rows of `n`).
fn chunk_sums(a: &Quantized, b_values: &[f32], n: usize, i: usize, chunk: Range<usize>, sums: &mut [f32]) {
    sums.fill(0.0);
    for kk in chunk {
        let a_ik = a.values[i * a.n + kk] as f32;
        for (sum, &b_kj) in sums.iter_mut().zip(&b_values[kk * n..(kk + 1) * n]) {
            *sum += a_ik * b_kj;
        }
    }
}

/// Steps 2 and 3 for row i: adds each chunk sum, scaled by f32(scale_a · scale_b), into its FP32
/// accumulator with one fused multiply-add.
fn promote_chunk(a: &Quantized, b: &Quantized, i: usize, start: usize, sums: &[f32], accumulators: &mut [f32]) {
    let scale_a = a.scale_at(i, start);
    for (j, (acc, &sum)) in accumulators.iter_mut().zip(sums).enumerate() {
        let scale = (scale_a * b.scale_at(start, j)) as f32;
        *acc = sum.mul_add(scale, *acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::numerics::scaling::{quantize, Tiling};
    use crate::rng::Rng;

    /// The f64 reference: both operands dequantised, C = A · B in f64, with Σ_k |a_ik b_kj| per
    /// output for error bounds.
    fn reference(a: &Quantized, b: &Quantized) -> (Vec<f64>, Vec<f64>) {
        let (da, db) = (a.dequantize(), b.dequantize());
        let (m, k, n) = (a.m, a.n, b.n);
        let mut c = vec![0.0; m * n];
        let mut magnitude = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for kk in 0..k {
                    let product = da[i * k + kk] * db[kk * n + j];
                    c[i * n + j] += product;
                    magnitude[i * n + j] += product.abs();
                }
            }
        }
        (c, magnitude)
    }

    /// Checks C against the f64 reference with the worst-case bound of the f32 arithmetic:
    /// |C − ref| ≤ γ · Σ_k |a_ik b_kj| with γ = (promote + chunks + 2) · 2⁻²⁴ (the additions
    /// inside a chunk, one fma per chunk, the rounding of each scale product); and returns the
    /// norm-wise relative error ‖C − ref‖ / ‖ref‖.
    fn check_against_reference(a: &Quantized, b: &Quantized, promote: usize) -> f64 {
        let c = matmul_fp8(a, b, promote);
        let (exact, magnitude) = reference(a, b);
        let gamma = (promote + a.n.div_ceil(promote) + 2) as f64 * 2f64.powi(-24);
        for (index, ((&c, &exact), &magnitude)) in c.iter().zip(&exact).zip(&magnitude).enumerate() {
            assert!((c - exact).abs() <= gamma * magnitude, "C[{index}] = {c}, reference {exact}");
        }
        let diff: f64 = c.iter().zip(&exact).map(|(c, e)| (c - e).powi(2)).sum();
        let norm: f64 = exact.iter().map(|e| e * e).sum();
        (diff / norm).sqrt()
    }

    fn random(rng: &mut Rng, rows: usize, cols: usize, tiling: Tiling) -> Quantized {
        quantize(&rng.gaussians(rows * cols), rows, cols, tiling)
    }

    /// Random Gaussian operands at DeepSeek-V3's K = 4096 scale: within the worst-case bound,
    /// and ≤ 1e-6 relative norm-wise.
    #[test]
    fn matches_the_f64_reference_at_k_4096() {
        let mut rng = Rng::new(10);
        let (m, k, n) = (8, 4096, 6);
        let a = random(&mut rng, m, k, Tiling::ACTIVATION);
        let b = random(&mut rng, k, n, Tiling::WEIGHT);
        for promote in [128, 32] {
            let error = check_against_reference(&a, &b, promote);
            assert!(error <= 1e-6, "promote {promote}: {error}");
        }
    }

    /// K = 300 with promotion every 64: a short last chunk, partial groups at every edge.
    #[test]
    fn short_last_chunk_and_partial_groups() {
        let mut rng = Rng::new(11);
        let (m, k, n) = (3, 300, 130);
        let a = random(&mut rng, m, k, Tiling::ACTIVATION);
        let b = random(&mut rng, k, n, Tiling::WEIGHT);
        let error = check_against_reference(&a, &b, 64);
        assert!(error <= 1e-6, "{error}");
    }

    /// Each 128-chunk of K carries its own scales: A's tile c is scaled by 10^(3c) and B's block
    /// row c by 10^(−3c), so every chunk contributes about equally while the scales span twelve
    /// orders of magnitude; applying any chunk's scales to another chunk would be off by 10³ or
    /// more, far outside the bound.
    #[test]
    fn scales_apply_per_chunk() {
        let mut rng = Rng::new(12);
        let (m, k, n) = (4, 640, 3);
        let magnitude = |kk: usize| 10f64.powi(3 * (kk / 128) as i32);
        let a: Vec<f64> = (0..m * k).map(|index| rng.gaussian().abs() * magnitude(index % k)).collect();
        let b: Vec<f64> = (0..k * n).map(|index| rng.gaussian().abs() / magnitude(index / n)).collect();
        let (a, b) = (quantize(&a, m, k, Tiling::ACTIVATION), quantize(&b, k, n, Tiling::WEIGHT));
        assert!(a.scales[4] / a.scales[0] > 1e11 && b.scales[0] / b.scales[4] > 1e11);
        let error = check_against_reference(&a, &b, 128);
        assert!(error <= 1e-6, "{error}");
    }

    /// The order of the f32 arithmetic, by hand. With all scales 1 (each group's amax is 448),
    /// the products are 448², 2⁻⁹, −448², 2⁻⁹, and f32 cannot hold 448² + 2⁻⁹ (its step there is
    /// 2⁻⁶). One chunk of 4: ((448² + 2⁻⁹) − 448²) + 2⁻⁹ = 2⁻⁹, and the same with chunks of 1.
    /// Chunks of 2 sum to 448² and −448² + 2⁻⁹ = −448², promoted to 0. The f64 reference is 2⁻⁸.
    #[test]
    fn chunks_are_summed_in_f32_then_promoted() {
        let tiny = 2f64.powi(-9);
        let a = quantize(&[448.0, tiny, -448.0, tiny], 1, 4, Tiling { rows: 1, cols: 4 });
        let b = quantize(&[448.0, 1.0, 448.0, 1.0], 4, 1, Tiling { rows: 4, cols: 1 });
        assert_eq!((a.scales[0], b.scales[0]), (1.0, 1.0));
        assert_eq!(matmul_fp8(&a, &b, 4), vec![tiny]);
        assert_eq!(matmul_fp8(&a, &b, 2), vec![0.0]);
        assert_eq!(matmul_fp8(&a, &b, 1), vec![tiny]);
        assert_eq!(reference(&a, &b).0, vec![2.0 * tiny]);
    }

    #[test]
    #[should_panic(expected = "straddles the scaling groups")]
    fn a_chunk_may_not_straddle_scaling_groups() {
        let a = quantize(&[1.0f64; 256], 1, 256, Tiling::ACTIVATION);
        let b = quantize(&[1.0f64; 256], 256, 1, Tiling::WEIGHT);
        matmul_fp8(&a, &b, 256);
    }

    #[test]
    #[should_panic(expected = "a is [1, 4] but b is [3, 1]")]
    fn inner_dimensions_must_match() {
        let a = quantize(&[1.0f64; 4], 1, 4, Tiling::ACTIVATION);
        let b = quantize(&[1.0f64; 3], 3, 1, Tiling::WEIGHT);
        matmul_fp8(&a, &b, 128);
    }
}
