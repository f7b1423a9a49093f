//! Backward twins of the fused row and elementwise kernels. Each computes its VJP in the
//! order of the primitive VJPs autodiff emits (the same products, sums in the same order),
//! so the CPU reference runs a fused plan bit-identically to the unfused graph: in FP8
//! training any other rounding order is amplified (FP8 rounding of gradients, AdamW's
//! normalised updates) beyond the plan test's 1e-5 within a few steps. The formulas are the
//! derivatives of each op's definition, written in that order.

use crate::cpu::real::Real;

/// RMSNorm's VJP per row of `n`, y = x·r·w with var = Σx²·(1/n) + eps and r = var^(−½):
/// dx = [acc +] (dy·w)·r + (Σ (dy·w)·x · (r/var · −½) · (1/n)) · 2x, and dw = Σ over rows of
/// dy·(x·r). `acc` is what x's adjoint held before (it is added first, as autodiff adds).
/// Returns (dx, dw).
pub fn rms_norm_grad<T: Real>(x: &[T], n: usize, w: &[T], dy: &[T], acc: Option<&[T]>, eps: T) -> (Vec<T>, Vec<T>) {
    let inverse_n = T::from_f64(1.0 / n as f64);
    let half = T::from_f64(-0.5);
    let two = T::from_f64(2.0);
    let mut dx = Vec::with_capacity(x.len());
    let mut dw = vec![T::ZERO; n];
    for (i, (row, g)) in x.chunks(n).zip(dy.chunks(n)).enumerate() {
        let var = row.iter().fold(T::ZERO, |s, &v| s + v * v) * inverse_n + eps;
        let r = T::ONE / var.sqrt();
        let projection = row.iter().zip(g).zip(w).fold(T::ZERO, |s, ((&v, &g), &w)| s + g * w * v);
        let through_r = projection * (r / var * half) * inverse_n;
        for (j, ((&v, &g), &w)) in row.iter().zip(g).zip(w).enumerate() {
            let direct = g * w * r;
            let direct = acc.map_or(direct, |acc| acc[i * n + j] + direct);
            dx.push(direct + through_r * (v * two));
            dw[j] += g * (v * r);
        }
    }
    (dx, dw)
}

/// Softmax's VJP per row of `n`, recomputed from its input x: with e = exp(x − max),
/// z = Σ e and y = e/z, dx = (dy/z + Σ −(dy/z)·y)·e (= y·(dy − Σ dy·y)).
pub fn softmax_grad<T: Real>(x: &[T], n: usize, dy: &[T]) -> Vec<T> {
    let mut dx = Vec::with_capacity(x.len());
    for (row, g) in x.chunks(n).zip(dy.chunks(n)) {
        let max = row.iter().fold(T::from_f64(f64::NEG_INFINITY), |m, &v| m.max(v));
        let e: Vec<T> = row.iter().map(|&v| (v - max).exp()).collect();
        let z = e.iter().fold(T::ZERO, |s, &v| s + v);
        let through_z = e.iter().zip(g).fold(T::ZERO, |s, (&e, &g)| s + -(g / z * (e / z)));
        dx.extend(e.iter().zip(g).map(|(&e, &g)| (g / z + through_z) * e));
    }
    dx
}

/// Each row's cross-entropy against its label, as the primitives compute it: with
/// m = max x, s = x − m and z = Σ eˢ, log z − s[label]. Returns the losses, the maxima and
/// the sums (the backward's statistics), a value a row each.
pub fn cross_entropy<T: Real>(x: &[T], n: usize, labels: &[i32]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let rows = x.len() / n.max(1);
    let (mut nll, mut maxima, mut sums) =
        (Vec::with_capacity(rows), Vec::with_capacity(rows), Vec::with_capacity(rows));
    for (row, &label) in x.chunks(n).zip(labels) {
        let (max, z) = max_and_sum(row);
        nll.push(z.ln() - (row[label_index(label, n)] - max));
        maxima.push(max);
        sums.push(z);
    }
    (nll, maxima, sums)
}

/// The cross-entropy's VJP per row from the logits x and the forward's row maxima and sums,
/// for the row cotangent dy: with e = e^(x − max), dx = put_along(label, −dy) + (dy/z)·e, the
/// put first as autodiff adds.
pub fn cross_entropy_grad<T: Real>(x: &[T], n: usize, labels: &[i32], dy: &[T], maxima: &[T], sums: &[T]) -> Vec<T> {
    let mut dx = Vec::with_capacity(x.len());
    for ((((row, &label), &g), &max), &z) in x.chunks(n).zip(labels).zip(dy).zip(maxima).zip(sums) {
        let label = label_index(label, n);
        let scale = g / z;
        dx.extend(row.iter().enumerate().map(|(j, &v)| {
            let put = if j == label { T::ZERO + -g } else { T::ZERO };
            put + scale * (v - max).exp()
        }));
    }
    dx
}

/// A row's max and Σ e^(x − max), summed in order.
fn max_and_sum<T: Real>(row: &[T]) -> (T, T) {
    let max = row.iter().fold(T::from_f64(f64::NEG_INFINITY), |m, &v| m.max(v));
    (max, row.iter().fold(T::ZERO, |s, &v| s + (v - max).exp()))
}

/// A label as a column of a row of `n`.
fn label_index(label: i32, n: usize) -> usize {
    usize::try_from(label).ok().filter(|&l| l < n).unwrap_or_else(|| panic!("label {label} outside a row of {n}"))
}

/// SwiGLU's VJP, y = silu(a)·b, elementwise: with σ = sigmoid(a), silu'(a) = σ·(1 + a·(1 − σ)),
/// da = (dy·b)·silu'(a) and db = dy·(a·σ). Returns (da, db).
pub fn swiglu_grad<T: Real>(a: &[T], b: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    assert!(a.len() == b.len() && a.len() == dy.len(), "swiglu_grad: operands of one shape");
    a.iter()
        .zip(b)
        .zip(dy)
        .map(|((&a, &b), &g)| {
            let sigma = T::ONE / (T::ONE + (-a).exp());
            let derivative = sigma * (T::ONE + a * (T::ONE - sigma));
            (g * b * derivative, g * (a * sigma))
        })
        .unzip()
}
