//! The roofline cost model: a kernel takes max(FLOPs / peak, bytes / bandwidth) plus a
//! launch overhead. The device figures live in a [`Profile`] (H100 by default, as measured on
//! the device machine: ~800 TFLOP/s BF16, ~1600 FP8, ~3.0 TB/s).

use super::lang::Fx;
use super::{attr_op, FusionAnalysis};
use crate::graph::ir::Op;
use egg::{EGraph, Id, Language};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Dense BF16 tensor-core FLOP/s.
    pub bf16_flops: f64,
    /// Dense FP8 tensor-core FLOP/s.
    pub fp8_flops: f64,
    /// Non-tensor FLOP/s (elementwise work on the CUDA cores).
    pub vector_flops: f64,
    /// Device memory bandwidth, bytes/s (read + write).
    pub bandwidth: f64,
    /// Cost of one kernel launch, seconds.
    pub launch: f64,
}

impl Default for Profile {
    fn default() -> Self {
        Profile { bf16_flops: 800e12, fp8_flops: 1600e12, vector_flops: 60e12, bandwidth: 3.0e12, launch: 4e-6 }
    }
}

impl Profile {
    /// The roofline time of a kernel.
    pub fn seconds(&self, flops: f64, peak: f64, bytes: f64) -> f64 {
        self.launch + (flops / peak).max(bytes / self.bandwidth)
    }
}

/// Extraction cost of one e-node: its roofline time as a kernel of its own; constants,
/// attributes, views, tuple access and opaque ops (the same in every alternative) are free.
/// Loop fusion in [`super::kernels`] later merges neighbouring elementwise kernels, so this
/// overestimates chains of them alike in every alternative.
pub fn node_seconds(egraph: &EGraph<Fx, FusionAnalysis>, class: Id, enode: &Fx, profile: &Profile) -> f64 {
    let bytes = |id: Id| egraph[id].data.bytes();
    let moved: f64 = enode.children().iter().map(|&c| bytes(c)).sum::<f64>() + bytes(class);
    match enode {
        Fx::Const(_)
        | Fx::Attr(_)
        | Fx::Opaque(..)
        | Fx::Stop(_)
        | Fx::Reshape(_)
        | Fx::Get0(_)
        | Fx::Get1(_)
        | Fx::Get2(_) => 0.0,
        Fx::MatMul([attr, a, _])
        | Fx::MatMulAdd([attr, a, ..])
        | Fx::ConcatKMatMul([attr, a, ..])
        | Fx::ConcatRowsMatMul([attr, a, ..])
        | Fx::ScaledMatMul([attr, a, _])
        | Fx::ConcatMatMul([attr, a, ..]) => {
            let (ta, fp8) = match attr_op(egraph, *attr) {
                Op::MatMul { ta, fp8, .. } => (ta, fp8.is_some()),
                _ => (false, true),
            };
            let inner = |a: Id| {
                let a = egraph[a].data.shape.as_ref().expect("shaped");
                a[a.len() - if ta { 2 } else { 1 }] as f64
            };
            // A sum of two products runs over both operands' K.
            let k = inner(*a) + if let Fx::ConcatKMatMul([_, _, _, a2, _]) = enode { inner(*a2) } else { 0.0 };
            let flops = 2.0 * egraph[class].data.numel() * k;
            let peak = if fp8 { profile.fp8_flops } else { profile.bf16_flops };
            profile.seconds(flops, peak, moved)
        }
        Fx::GroupedMatMul([attr, xs, ..]) | Fx::ConcatGroupedMatMul([attr, xs, ..]) => {
            let Op::GroupedMatMul { fp8, .. } = attr_op(egraph, *attr) else {
                unreachable!("a grouped GEMM's attribute")
            };
            let k = egraph[*xs].data.shape.as_ref().and_then(|s| s.last().copied()).unwrap_or(0);
            let flops = 2.0 * egraph[class].data.numel() * k as f64;
            profile.seconds(flops, if fp8.is_some() { profile.fp8_flops } else { profile.bf16_flops }, moved)
        }
        _ => {
            let elements = enode.children().iter().map(|&c| egraph[c].data.numel()).fold(0.0, f64::max);
            profile.seconds(5.0 * elements, profile.vector_flops, moved)
        }
    }
}
