//! Fused row kernels: operations over the last axis that fusion forms from several
//! primitives (RMSNorm, softmax). Each is written from its definition, not from the
//! primitives it replaces, so that comparing the two proves the fusion rule; the arithmetic
//! keeps the primitives' order (a mean as Σ·(1/n)) so a fused plan trains bit-identically.

use crate::cpu::real::Real;

/// y = x · (mean(x²) + eps)^(−½) · w, per row of `n`.
pub fn rms_norm<T: Real>(x: &[T], n: usize, w: &[T], eps: T) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    let inverse_n = T::from_f64(1.0 / n as f64);
    for row in x.chunks(n) {
        let mean_square = row.iter().map(|&v| v * v).sum::<T>() * inverse_n;
        let inv = T::ONE / (mean_square + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &g)| v * inv * g));
    }
    out
}

/// exp(x − max) / Σ exp(x − max), per row of `n`.
pub fn softmax<T: Real>(x: &[T], n: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(n) {
        let max = row.iter().fold(T::from_f64(f64::NEG_INFINITY), |m, &v| m.max(v));
        let start = out.len();
        out.extend(row.iter().map(|&v| (v - max).exp()));
        let total: T = out[start..].iter().copied().sum();
        for v in &mut out[start..] {
            *v = *v / total;
        }
    }
    out
}
