//! Fine-grained FP8 scaling as DeepSeek-V3 trains with it. A row-major [m, n] matrix is cut into
//! groups of `rows × cols` elements (activations: 1×128 tiles, one token by 128 channels;
//! weights: 128×128 blocks); groups at the bottom and right edges may be partial and use their
//! own amax. Each group gets one scale, amax / 448 rounded to f32 (the kernels keep scales in
//! FP32), and each element is stored as the E4M3 value nearest x · (1 / scale), so that
//! value × scale approximates x and the group's largest element maps to ±448.

use super::e4m3::{round_e4m3, E4M3_MAX};
use crate::cpu::real::Real;
use crate::cpu::rows::fill_rows;

/// The shape of one scaling group of a row-major matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub rows: usize,
    pub cols: usize,
}

impl Tiling {
    /// Activations: per token, per 128 channels.
    pub const ACTIVATION: Tiling = Tiling { rows: 1, cols: 128 };
    /// Weights: 128×128 blocks.
    pub const WEIGHT: Tiling = Tiling { rows: 128, cols: 128 };

    /// The number of groups along the rows and along the columns of an [m, n] matrix.
    fn grid(self, m: usize, n: usize) -> (usize, usize) {
        (m.div_ceil(self.rows), n.div_ceil(self.cols))
    }

    /// The index of the group holding element (i, j) of an [m, n] matrix, row-major over groups.
    fn group_of(self, n: usize, i: usize, j: usize) -> usize {
        (i / self.rows) * n.div_ceil(self.cols) + j / self.cols
    }
}

/// An FP8-quantised [m, n] matrix: element (i, j) stands for `values[i·n + j] × scale_at(i, j)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    /// E4M3 values (each exactly representable), row-major [m, n].
    pub values: Vec<f64>,
    /// One f32-representable scale per group, row-major over the groups.
    pub scales: Vec<f64>,
    pub m: usize,
    pub n: usize,
    pub tiling: Tiling,
}

impl Quantized {
    /// The scale of the group holding element (i, j).
    pub fn scale_at(&self, i: usize, j: usize) -> f64 {
        self.scales[self.tiling.group_of(self.n, i, j)]
    }

    /// Rows `range` as a quantised matrix of their own; the range may not cut a scaling group
    /// (with one-row groups, as activations have, any range is whole groups).
    pub fn rows(&self, range: std::ops::Range<usize>) -> Quantized {
        let group_rows = self.tiling.rows;
        assert!(
            range.start.is_multiple_of(group_rows) && (range.end.is_multiple_of(group_rows) || range.end == self.m),
            "rows {range:?} cut the {group_rows}-row scaling groups"
        );
        let groups_per_row = self.n.div_ceil(self.tiling.cols);
        let (first, end) = (range.start / group_rows, range.end.div_ceil(group_rows));
        Quantized {
            values: self.values[range.start * self.n..range.end * self.n].to_vec(),
            scales: self.scales[first * groups_per_row..end * groups_per_row].to_vec(),
            m: range.len(),
            n: self.n,
            tiling: self.tiling,
        }
    }

    /// Columns `range` as a quantised matrix of their own; the range may not cut a scaling
    /// group.
    pub fn columns(&self, range: std::ops::Range<usize>) -> Quantized {
        let group_cols = self.tiling.cols;
        assert!(
            range.start.is_multiple_of(group_cols) && (range.end.is_multiple_of(group_cols) || range.end == self.n),
            "columns {range:?} cut the {group_cols}-column scaling groups"
        );
        let (group_rows, groups_per_row) = self.tiling.grid(self.m, self.n);
        let (first, end) = (range.start / group_cols, range.end.div_ceil(group_cols));
        Quantized {
            values: (0..self.m)
                .flat_map(|i| &self.values[i * self.n + range.start..i * self.n + range.end])
                .copied()
                .collect(),
            scales: (0..group_rows)
                .flat_map(|g| &self.scales[g * groups_per_row + first..g * groups_per_row + end])
                .copied()
                .collect(),
            m: self.m,
            n: range.len(),
            tiling: self.tiling,
        }
    }

    /// The transposed matrix [n, m], each group transposed with it: the same values under the
    /// same scales (FP8 GEMMs read both operands K-major, so a [k, n] operand arrives as its
    /// transpose).
    pub fn transposed(&self) -> Quantized {
        let (m, n) = (self.m, self.n);
        let (group_rows, group_cols) = self.tiling.grid(m, n);
        let values = (0..n * m).map(|index| self.values[(index % m) * n + index / m]).collect();
        let scales =
            (0..group_cols * group_rows).map(|g| self.scales[(g % group_rows) * group_cols + g / group_rows]).collect();
        Quantized { values, scales, m: n, n: m, tiling: Tiling { rows: self.tiling.cols, cols: self.tiling.rows } }
    }

    /// The represented matrix, value × scale per element, row-major [m, n]. Each product is exact
    /// in f64 (4 significant bits times 24).
    pub fn dequantize(&self) -> Vec<f64> {
        let n = self.n;
        self.values.iter().enumerate().map(|(index, &value)| value * self.scale_at(index / n, index % n)).collect()
    }
}

/// Quantises a row-major [m, n] matrix with one scale per `tiling` group.
///
/// A group's scale is amax / 448 rounded to f32; when that is 0 (the group is all zeros, or its
/// amax is at most 448 × 2⁻¹⁵⁰ so the f32 scale underflows) the scale is 1, under which every
/// element of the group encodes as a signed zero. A NaN or infinity in a group makes its scale
/// NaN or infinite, and the whole group then dequantises to NaN. An element is stored as
/// `round_e4m3(f32(x · f32(1 / scale)))`: multiplied by the scale's reciprocal rounded to f32,
/// as the kernels do it (one division per group, not per element; DeepSeek's own casts
/// multiply too), the product rounded to f32 as the kernel holds it (for f32 inputs exactly
/// the kernel's correctly rounded f32 product), then to E4M3 to nearest-even with saturation,
/// so a product just above 448 (the f32 scale may be rounded down) becomes 448.
pub fn quantize<T: Real>(x: &[T], m: usize, n: usize, tiling: Tiling) -> Quantized {
    assert_eq!(x.len(), m * n, "quantize: {} elements for a [{m}, {n}] matrix", x.len());
    assert!(tiling.rows > 0 && tiling.cols > 0, "quantize: empty scaling group {tiling:?}");
    let (group_rows, group_cols) = tiling.grid(m, n);
    // The columns of group column g.
    let columns = |g: usize| g * tiling.cols..n.min((g + 1) * tiling.cols);
    // Each band of `tiling.rows` rows makes one row of groups.
    let mut amax = vec![0.0; group_rows * group_cols];
    fill_rows(&mut amax, group_cols, tiling.rows * n, |first, bands| {
        for (b, band) in bands.chunks_mut(group_cols.max(1)).enumerate() {
            for row in x[(first + b) * tiling.rows * n..m.min((first + b + 1) * tiling.rows) * n].chunks(n) {
                for (g, group) in band.iter_mut().enumerate() {
                    for element in &row[columns(g)] {
                        *group = larger_magnitude(*group, element.to_f64());
                    }
                }
            }
        }
    });
    let scales: Vec<f64> = amax.into_iter().map(group_scale).collect();
    // Each group's f32 reciprocal, which its elements are multiplied by (f64 holds it
    // correctly rounded: 53 ≥ 2·24 + 2 bits).
    let inverses: Vec<f64> = scales.iter().map(|&s| f64::from((1.0 / s) as f32)).collect();
    let mut values = vec![0.0; m * n];
    fill_rows(&mut values, n, n, |first, block| {
        for (r, row) in block.chunks_mut(n.max(1)).enumerate() {
            let i = first + r;
            let band_inverses = &inverses[i / tiling.rows * group_cols..];
            for (g, &inverse) in band_inverses[..group_cols].iter().enumerate() {
                for j in columns(g) {
                    row[j] = encode_scaled(x[i * n + j].to_f64(), inverse);
                }
            }
        }
    });
    Quantized { values, scales, m, n, tiling }
}

/// The running amax: the larger of `amax` and |x|, where a NaN, once seen, stays.
fn larger_magnitude(amax: f64, x: f64) -> f64 {
    if x.is_nan() || x.abs() > amax {
        x.abs()
    } else {
        amax
    }
}

/// A group's scale: amax / 448 rounded to f32, or 1 where that is 0.
fn group_scale(amax: f64) -> f64 {
    let scale = f64::from((amax / E4M3_MAX) as f32);
    if scale == 0.0 {
        1.0
    } else {
        scale
    }
}

/// The E4M3 value stored for `x` under a scale of f32 reciprocal `inverse`: their product
/// (exact in f64 for an f32 x) rounded to f32, then to E4M3.
fn encode_scaled(x: f64, inverse: f64) -> f64 {
    round_e4m3(f64::from((x * inverse) as f32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Elements of a random matrix whose rows and column blocks differ in magnitude by up to 2¹⁶.
    fn uneven_matrix(rng: &mut Rng, m: usize, n: usize) -> Vec<f64> {
        (0..m * n)
            .map(|index| rng.gaussian() * 2f64.powi(((index / n) % 5) as i32 * 4 - (index % n / 50) as i32))
            .collect()
    }

    /// Checks a quantisation group by group, walking each group's rectangle explicitly: the
    /// scale is f32(amax/448), every value is an E4M3 value, and the largest maps to ±448.
    fn assert_groups(x: &[f64], q: &Quantized) {
        let Tiling { rows, cols } = q.tiling;
        let mut groups = 0;
        for row0 in (0..q.m).step_by(rows) {
            for col0 in (0..q.n).step_by(cols) {
                let cells: Vec<usize> = (row0..(row0 + rows).min(q.m))
                    .flat_map(|i| (col0..(col0 + cols).min(q.n)).map(move |j| i * q.n + j))
                    .collect();
                let amax = cells.iter().map(|&c| x[c].abs()).fold(0.0, f64::max);
                let scale = q.scale_at(row0, col0);
                assert_eq!(scale, f64::from((amax / 448.0) as f32), "group at ({row0}, {col0})");
                assert_eq!(q.scales[groups], scale, "row-major order of groups");
                let largest = cells.iter().map(|&c| q.values[c].abs()).fold(0.0, f64::max);
                assert_eq!(largest, 448.0, "group at ({row0}, {col0})");
                for &c in &cells {
                    assert_eq!(q.scale_at(c / q.n, c % q.n), scale);
                    assert_eq!(round_e4m3(q.values[c]), q.values[c], "value {} is not E4M3", q.values[c]);
                }
                groups += 1;
            }
        }
        assert_eq!(q.scales.len(), groups);
    }

    fn relative_error(approx: &[f64], exact: &[f64]) -> f64 {
        let diff: f64 = approx.iter().zip(exact).map(|(a, e)| (a - e).powi(2)).sum();
        let norm: f64 = exact.iter().map(|e| e * e).sum();
        (diff / norm).sqrt()
    }

    #[test]
    fn activation_tiles_and_weight_blocks_with_partial_edges() {
        let mut rng = Rng::new(1);
        for (m, n, tiling, groups) in [
            (3, 300, Tiling::ACTIVATION, 9),
            (130, 200, Tiling::WEIGHT, 4),
            (5, 7, Tiling { rows: 2, cols: 3 }, 9),
            (1, 100, Tiling::ACTIVATION, 1),
        ] {
            let x = uneven_matrix(&mut rng, m, n);
            let q = quantize(&x, m, n, tiling);
            assert_eq!((q.m, q.n, q.tiling, q.scales.len(), q.values.len()), (m, n, tiling, groups, m * n));
            assert_groups(&x, &q);
        }
    }

    #[test]
    fn a_row_range_is_quantised_as_a_matrix_of_its_own() {
        let mut rng = Rng::new(4);
        let x = uneven_matrix(&mut rng, 7, 300);
        let whole = quantize(&x, 7, 300, Tiling::ACTIVATION);
        assert_eq!(whole.rows(2..5), quantize(&x[2 * 300..5 * 300], 3, 300, Tiling::ACTIVATION));
    }

    /// Transposing a quantised matrix gives what quantising the transpose in transposed groups
    /// gives, partial edge groups included.
    #[test]
    fn transposing_commutes_with_quantising() {
        let mut rng = Rng::new(5);
        for (m, n, tiling) in
            [(130, 200, Tiling::WEIGHT), (300, 3, Tiling { rows: 128, cols: 1 }), (5, 7, Tiling { rows: 2, cols: 3 })]
        {
            let x = uneven_matrix(&mut rng, m, n);
            let xt: Vec<f64> = (0..n * m).map(|index| x[(index % m) * n + index / m]).collect();
            let transposed_tiling = Tiling { rows: tiling.cols, cols: tiling.rows };
            assert_eq!(quantize(&x, m, n, tiling).transposed(), quantize(&xt, n, m, transposed_tiling));
        }
    }

    #[test]
    fn scales_are_rounded_to_f32() {
        let x = [0.1f64, -0.3, 1.0 / 3.0];
        let q = quantize(&x, 1, 3, Tiling::ACTIVATION);
        assert_ne!(q.scales[0], (1.0 / 3.0) / 448.0, "the f64 quotient is not an f32");
        assert_eq!(q.scales[0], f64::from(((1.0f64 / 3.0) / 448.0) as f32));
        assert_eq!(q.values[2], 448.0);
    }

    #[test]
    fn zero_and_underflowing_groups_get_scale_one() {
        let tiny = 448.0 * 2f64.powi(-150);
        let x = [0.0, -0.0, 5.0, 1.0, tiny, -tiny];
        let q = quantize(&x, 3, 2, Tiling { rows: 1, cols: 2 });
        assert_eq!(q.scales, vec![1.0, f64::from((5.0f64 / 448.0) as f32), 1.0]);
        assert_eq!(q.values[..2], [0.0, 0.0]);
        assert!(q.values[1].is_sign_negative() && q.values[5].is_sign_negative());
        assert_eq!(q.values[4..], [0.0, 0.0]);
        // Above that threshold the scale is an f32 subnormal, here the smallest, 2⁻¹⁴⁹.
        let q = quantize(&[1.5 * tiny], 1, 1, Tiling::ACTIVATION);
        assert_eq!(q.scales, vec![2f64.powi(-149)]);
    }

    #[test]
    fn non_finite_elements_poison_their_group_only() {
        let x = [1.0, f64::NAN, 2.0, 3.0, f64::INFINITY, 4.0];
        let dq = quantize(&x, 3, 2, Tiling { rows: 1, cols: 2 }).dequantize();
        assert!(dq[..2].iter().all(|v| v.is_nan()));
        assert_eq!(dq[2..4], quantize(&x[2..4], 1, 2, Tiling::ACTIVATION).dequantize());
        assert!(dq[4..].iter().all(|v| v.is_nan()));
    }

    /// A hand-worked case where rounding the scaled element to f32 first matters. The scale is
    /// 1 + 2⁻²³ (amax = 448·(1 + 2⁻²³)), its f32 reciprocal 1 − 2⁻²³; x = 1.8125 + 2⁻²² gives
    /// x · (1 − 2⁻²³) ≈ 1.8125 + 0.19·2⁻²³, just above the E4M3 midpoint 1.8125 of 1.75
    /// (mantissa 110) and 1.875 (111). In f32 the product is the midpoint itself, which goes to
    /// the even 1.75; rounded straight from f64 it would be 1.875.
    #[test]
    fn the_scaled_element_is_rounded_to_f32_before_e4m3() {
        let epsilon = 2f64.powi(-23);
        let x = [448.0 * (1.0 + epsilon), 1.8125 + 2.0 * epsilon];
        let q = quantize(&x, 1, 2, Tiling::ACTIVATION);
        assert_eq!(q.scales[0], 1.0 + epsilon);
        assert_eq!(round_e4m3(x[1] * (1.0 - epsilon)), 1.875);
        assert_eq!(q.values, vec![448.0, 1.75]);
    }

    /// A scaled element on a midpoint rounds to even: 3.1875 · f32(1/3) is 1.0625 in f32 → 1.0.
    #[test]
    fn a_midpoint_rounds_to_even() {
        let q = quantize(&[1344.0f32, 3.1875], 1, 2, Tiling::ACTIVATION);
        assert_eq!(q.scales[0], 3.0);
        assert_eq!(q.values, vec![448.0, 1.0]);
    }

    /// Each element is within half an E4M3 step of x / scale: 2⁻⁴ relative in the normal range,
    /// 2⁻¹⁰ × scale absolute among the subnormals (slack 2⁻²⁰ for the f32 reciprocal and product).
    #[test]
    fn every_element_is_within_half_a_step() {
        let mut rng = Rng::new(2);
        let (m, n) = (64, 384);
        let x = uneven_matrix(&mut rng, m, n);
        for tiling in [Tiling::ACTIVATION, Tiling::WEIGHT] {
            let q = quantize(&x, m, n, tiling);
            for (index, (&dq, &x)) in q.dequantize().iter().zip(&x).enumerate() {
                let scale = q.scale_at(index / n, index % n);
                let bound = (2f64.powi(-4) * x.abs()).max(2f64.powi(-10) * scale) * (1.0 + 2f64.powi(-20));
                assert!((dq - x).abs() <= bound, "{x} → {dq} (scale {scale})");
            }
        }
    }

    #[test]
    fn gaussian_relative_error_is_below_one_sixteenth() {
        let mut rng = Rng::new(3);
        let (m, n) = (256, 512);
        let x = rng.gaussians(m * n);
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let x32_as_f64: Vec<f64> = x32.iter().map(|&v| f64::from(v)).collect();
        for tiling in [Tiling::ACTIVATION, Tiling::WEIGHT] {
            let error = relative_error(&quantize(&x, m, n, tiling).dequantize(), &x);
            assert!(error > 0.0 && error < 2f64.powi(-4), "{tiling:?}: {error}");
            let error = relative_error(&quantize(&x32, m, n, tiling).dequantize(), &x32_as_f64);
            assert!(error > 0.0 && error < 2f64.powi(-4), "{tiling:?} f32: {error}");
        }
    }

    #[test]
    #[should_panic(expected = "5 elements for a [2, 3] matrix")]
    fn a_wrong_length_is_rejected() {
        quantize(&[0.0f64; 5], 2, 3, Tiling::ACTIVATION);
    }
}
