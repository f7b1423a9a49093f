//! RoPE in DeepSeek-V3's layout joined to the part of a head without position: the fused
//! `rope_concat`, written from its definition in the order the unfused graph computes it
//! (x·cos + rotate_half(x)·sin on the de-interleaved pairs), so it is bit-identical to it.

use super::layout::{broadcast_to, concat, for_each_broadcast};
use crate::cpu::real::Real;
use crate::cpu::value::Tensor;

/// concat(nope, rope(pe)) along the last axis, rope(pe) broadcast to nope's leading shape.
/// rope(pe): the interleaved pairs of pe's last axis (r values) de-interleaved into halves,
/// `x[j] = pe[2j]` for j < r/2 and `pe[2(j − r/2) + 1]` after; then `x·cos + [−x_hi, x_lo]·sin`,
/// with cos and sin broadcast against x.
pub fn rope_concat<T: Real>(nope: &Tensor<T>, pe: &Tensor<T>, cos: &Tensor<T>, sin: &Tensor<T>) -> Tensor<T> {
    let r = *pe.shape.last().expect("rank ≥ 1");
    let half = r / 2;
    let x: Vec<T> = pe
        .data
        .chunks(r)
        .flat_map(|row| (0..r).map(move |j| if j < half { row[2 * j] } else { row[2 * (j - half) + 1] }))
        .collect();
    let rotated: Vec<T> = x
        .chunks(r)
        .flat_map(|row| (0..r).map(move |j| if j < half { -row[j + half] } else { row[j - half] }))
        .collect();
    let mut rope = Vec::with_capacity(x.len());
    for_each_broadcast(&pe.shape, &[&pe.shape, &cos.shape, &sin.shape], |i, off| {
        rope.push(x[i] * cos.data[off[1]] + rotated[i] * sin.data[off[2]]);
    });
    let mut spread = nope.shape.clone();
    *spread.last_mut().expect("rank ≥ 1") = r;
    let rope = broadcast_to(&rope, &pe.shape, &spread);
    let axis = nope.shape.len() - 1;
    let mut shape = nope.shape.clone();
    shape[axis] += r;
    Tensor::new(shape, concat(&[(&nope.data, &nope.shape), (&rope, &spread)], axis))
}
