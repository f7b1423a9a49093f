//! Matrix products: batched GEMMs with optional transposes, the grouped GEMMs of the MoE
//! experts (one weight matrix per expert over its row range), and their FP8 forms, which
//! quantise each operand per scaling group and promote partial sums every N elements of K
//! (`numerics::matmul_fp8`).

use super::layout::transpose;
use crate::cpu::numerics::{self, Quantized, Tiling};
use crate::cpu::real::Real;
use dsc_compiler::graph::ir::Fp8Gemm;

/// A matrix operand: row-major `rows × cols` data, read transposed if `t`.
#[derive(Clone, Copy)]
pub struct Operand<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub t: bool,
}

impl<T: Real> Operand<'_, T> {
    /// The (rows, cols) of the operand as used.
    fn dims(&self) -> (usize, usize) {
        if self.t {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    fn strides(&self) -> [isize; 2] {
        if self.t {
            [1, self.cols as isize]
        } else {
            [self.cols as isize, 1]
        }
    }

    /// The operand as used, as a dense row-major matrix.
    fn materialise(&self) -> Vec<T> {
        if self.t {
            transpose(self.data, &[self.rows, self.cols], &[1, 0])
        } else {
            self.data.to_vec()
        }
    }
}

/// C = op(A)·op(B) for one pair of matrices; in FP8 when `fp8` says so.
pub fn matmul<T: Real>(a: Operand<T>, b: Operand<T>, fp8: Option<Fp8Gemm>) -> Vec<T> {
    let (m, k) = a.dims();
    let (kb, n) = b.dims();
    assert_eq!(k, kb, "GEMM inner dimensions");
    let mut c = vec![T::ZERO; m * n];
    if m == 0 || n == 0 {
        return c;
    }
    if k == 0 {
        return c;
    }
    match fp8 {
        None => T::gemm(m, k, n, a.data, a.strides(), b.data, b.strides(), T::ZERO, &mut c, [n as isize, 1]),
        Some(f) => {
            // A is [m, k] with groups of outer rows × k.
            let qa = numerics::quantize(&a.materialise(), m, k, Tiling { rows: f.a.outer, cols: f.a.k });
            c = matmul_quantized_a(&qa, b, f);
        }
    }
    c
}

/// C = A·op(B) in FP8 for A already quantised: B [k, n] is quantised in groups of k × outer
/// columns, as `f` says.
fn matmul_quantized_a<T: Real>(qa: &Quantized, b: Operand<T>, f: Fp8Gemm) -> Vec<T> {
    let (k, n) = b.dims();
    let qb = numerics::quantize(&b.materialise(), k, n, Tiling { rows: f.b.k, cols: f.b.outer });
    numerics::matmul_fp8(qa, &qb, f.promote).into_iter().map(T::from_f64).collect()
}

/// Batched `matmul` over equal leading dimensions.
pub fn batched_matmul<T: Real>(
    a: &[T],
    a_shape: &[usize],
    b: &[T],
    b_shape: &[usize],
    ta: bool,
    tb: bool,
    fp8: Option<Fp8Gemm>,
) -> Vec<T> {
    let r = a_shape.len();
    let batch: usize = a_shape[..r - 2].iter().product();
    let (ar, ac) = (a_shape[r - 2], a_shape[r - 1]);
    let (br, bc) = (b_shape[r - 2], b_shape[r - 1]);
    let mut out = Vec::new();
    for i in 0..batch {
        let a = Operand { data: &a[i * ar * ac..(i + 1) * ar * ac], rows: ar, cols: ac, t: ta };
        let b = Operand { data: &b[i * br * bc..(i + 1) * br * bc], rows: br, cols: bc, t: tb };
        out.extend(matmul(a, b, fp8));
    }
    out
}

/// Expert `e`'s row range in the expert-sorted layout.
fn rows_of(offsets: &[i32], e: usize) -> std::ops::Range<usize> {
    offsets[e] as usize..offsets[e + 1] as usize
}

/// The rows of a grouped GEMM: real [r, cols], or already quantised to FP8 in one-row
/// groups (MoE dispatch sends FP8 activations), so that each expert's rows are a quantised
/// matrix of their own.
#[derive(Clone, Copy)]
pub enum Rows<'a, T> {
    Real { data: &'a [T], cols: usize },
    Quantized(&'a Quantized),
}

impl<T> Rows<'_, T> {
    /// How many rows there are.
    pub fn count(&self) -> usize {
        match self {
            Rows::Real { data, cols } => data.len() / cols,
            Rows::Quantized(q) => q.m,
        }
    }
}

/// The experts' matrices of a grouped GEMM: real [experts, p, q], or quantised K-major by
/// `fuse::library` (each expert's [n, k] in blocks of its own, stacked: [experts·n, k], used
/// transposed).
#[derive(Clone, Copy)]
pub enum Weights<'a, T> {
    Real { data: &'a [T], shape: &'a [usize] },
    Quantized { q: &'a Quantized, experts: usize },
}

/// Per expert: its rows of `xs` times its matrix `w[e]` [p, q] (transposed if `tb`). Rows past
/// the last offset (a fixed-capacity buffer's spare rows) come out zero.
pub fn grouped_matmul<T: Real>(xs: Rows<T>, w: Weights<T>, offsets: &[i32], tb: bool, fp8: Option<Fp8Gemm>) -> Vec<T> {
    let (experts, n) = match w {
        Weights::Real { shape, .. } => (shape[0], if tb { shape[1] } else { shape[2] }),
        Weights::Quantized { q, experts } => (experts, q.m / experts),
    };
    let rows = xs.count();
    let mut out = vec![T::ZERO; rows * n];
    for e in 0..experts {
        let range = rows_of(offsets, e);
        if range.is_empty() {
            continue;
        }
        let product = match (fp8, w) {
            (None, Weights::Real { data: w, shape }) => {
                let (p, q) = (shape[1], shape[2]);
                let we = Operand { data: &w[e * p * q..(e + 1) * p * q], rows: p, cols: q, t: tb };
                let Rows::Real { data, cols } = xs else { panic!("FP8 rows need an FP8 GEMM") };
                let x =
                    Operand { data: &data[range.start * cols..range.end * cols], rows: range.len(), cols, t: false };
                matmul(x, we, None)
            }
            (Some(f), w) => {
                let qa = match xs {
                    Rows::Quantized(q) => q.rows(range.clone()),
                    Rows::Real { data, cols } => numerics::quantize(
                        &data[range.start * cols..range.end * cols],
                        range.len(),
                        cols,
                        Tiling { rows: f.a.outer, cols: f.a.k },
                    ),
                };
                let qb = match w {
                    Weights::Real { data: w, shape } => {
                        let (p, q) = (shape[1], shape[2]);
                        let we = Operand { data: &w[e * p * q..(e + 1) * p * q], rows: p, cols: q, t: tb };
                        let (k, n) = we.dims();
                        numerics::quantize(&we.materialise(), k, n, Tiling { rows: f.b.k, cols: f.b.outer })
                    }
                    Weights::Quantized { q, .. } => {
                        assert!(tb, "quantised expert weights are K-major");
                        q.rows(e * n..(e + 1) * n).transposed()
                    }
                };
                numerics::matmul_fp8(&qa, &qb, f.promote).into_iter().map(T::from_f64).collect()
            }
            (None, Weights::Quantized { .. }) => panic!("quantised weights need an FP8 GEMM"),
        };
        out[range.start * n..range.end * n].copy_from_slice(&product);
    }
    out
}

/// Per expert: gᵉᵀ · xsᵉ, the weight gradient [experts, p, q] of `grouped_matmul` with `tb`.
pub fn grouped_wgrad<T: Real>(
    xs: &[T],
    q: usize,
    g: &[T],
    p: usize,
    offsets: &[i32],
    experts: usize,
    fp8: Option<Fp8Gemm>,
) -> Vec<T> {
    let mut out = vec![T::ZERO; experts * p * q];
    for e in 0..experts {
        let range = rows_of(offsets, e);
        if range.is_empty() {
            continue;
        }
        let ge = Operand { data: &g[range.start * p..range.end * p], rows: range.len(), cols: p, t: true };
        let xe = Operand { data: &xs[range.start * q..range.end * q], rows: range.len(), cols: q, t: false };
        out[e * p * q..(e + 1) * p * q].copy_from_slice(&matmul(ge, xe, fp8));
    }
    out
}

/// Per expert: its columns of `qg` [p, capacity] times the transpose of its columns of `qx`
/// [q, capacity] (both made by `quantize_by_expert`: each expert's tokens from a group
/// boundary on, in whole groups), the weight gradient [experts, p, q].
pub fn scaled_grouped_wgrad(qg: &Quantized, qx: &Quantized, offsets: &[i32], promote: usize) -> Vec<f64> {
    let (p, q) = (qg.m, qx.m);
    let experts = offsets.len() - 1;
    let mut out = vec![0.0; experts * p * q];
    let mut start = 0;
    for e in 0..experts {
        let columns = start..start + rows_of(offsets, e).len().next_multiple_of(qg.tiling.cols);
        if !columns.is_empty() {
            let product =
                numerics::matmul_fp8(&qg.columns(columns.clone()), &qx.columns(columns.clone()).transposed(), promote);
            out[e * p * q..(e + 1) * p * q].copy_from_slice(&product);
        }
        start = columns.end;
    }
    out
}

/// Expert-sorted rows x [r, d] as `quantize_by_expert` lays them out: transposed to
/// [d, capacity], each expert's rows from a multiple of `tile` on, zeros between and after, in
/// 1×`tile` groups.
pub fn quantize_by_expert<T: Real>(x: &[T], d: usize, offsets: &[i32], tile: usize, capacity: usize) -> Quantized {
    let mut padded = vec![T::ZERO; d * capacity];
    let mut start = 0;
    for e in 0..offsets.len() - 1 {
        let rows = rows_of(offsets, e);
        for (i, row) in rows.clone().enumerate() {
            for (c, &value) in x[row * d..(row + 1) * d].iter().enumerate() {
                padded[c * capacity + start + i] = value;
            }
        }
        start += rows.len().next_multiple_of(tile);
    }
    numerics::quantize(&padded, d, capacity, Tiling { rows: 1, cols: tile })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_operands_read_correctly() {
        // A = [[1, 2, 3], [4, 5, 6]], B = [[1, 0], [0, 1], [1, 1]]
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let c = matmul(
            Operand { data: &a, rows: 2, cols: 3, t: false },
            Operand { data: &b, rows: 3, cols: 2, t: false },
            None,
        );
        assert_eq!(c, vec![4.0, 5.0, 10.0, 11.0]);
        // Aᵀ·A via the transpose flag = [[17, 22, 27], [22, 29, 36], [27, 36, 45]]
        let ata = matmul(
            Operand { data: &a, rows: 2, cols: 3, t: true },
            Operand { data: &a, rows: 2, cols: 3, t: false },
            None,
        );
        assert_eq!(ata, vec![17.0, 22.0, 27.0, 22.0, 29.0, 36.0, 27.0, 36.0, 45.0]);
    }

    #[test]
    fn grouped_products_use_each_experts_matrix() {
        // Two experts; rows 0..1 go to expert 0 (w = 2·I), rows 1..3 to expert 1 (w = 3·I).
        let xs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w = [2.0, 0.0, 0.0, 2.0, 3.0, 0.0, 0.0, 3.0];
        let weights = Weights::Real { data: &w, shape: &[2, 2, 2] };
        let out = grouped_matmul(Rows::Real { data: &xs, cols: 2 }, weights, &[0, 1, 3], true, None);
        assert_eq!(out, vec![2.0, 4.0, 9.0, 12.0, 15.0, 18.0]);
        let g = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        let dw = grouped_wgrad(&xs, 2, &g, 2, &[0, 1, 3], 2, None);
        // expert 0: [1,1]ᵀ[1,2]; expert 1: [[1,0],[0,1]]ᵀ·[[3,4],[5,6]]
        assert_eq!(dw, vec![1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }
}
