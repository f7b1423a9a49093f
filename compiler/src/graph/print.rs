//! The stable printed form of a module (`dsc compile --emit=graph`):
//!
//! ```text
//! func @layer0(%0: f32[2,64,64], ...) -> (h) {
//!   %3 = square(%0) : f32[2,64,64]
//!   %7 = matmul(%5, %1) {tb, fp8 1x32*32x32/32} : f32[128,32]
//!   return %21
//! }
//! ```

use super::ir::{ExpertRows, Fp8Gemm, Function, Module, Op};
use std::fmt::Write;

pub fn module(m: &Module) -> String {
    let mut out = String::new();
    for c in &m.constants {
        let _ = writeln!(out, "const @{}: f32{:?}", c.name, c.shape);
    }
    for f in &m.functions {
        out.push('\n');
        function(&mut out, m, f);
    }
    out
}

fn function(out: &mut String, m: &Module, f: &Function) {
    let args: Vec<String> =
        f.args.iter().enumerate().map(|(i, (name, shape, dtype))| format!("%{i} {name}: {dtype}{shape:?}")).collect();
    let _ = writeln!(out, "func @{}(\n  {}\n) -> ({}) {{", f.name, args.join(",\n  "), f.output_names.join(", "));
    for (i, node) in f.nodes.iter().enumerate() {
        if let Op::Arg(_) = node.op {
            continue;
        }
        let args: Vec<String> = node.args.iter().map(|a| format!("%{}", a.0)).collect();
        let attrs = attributes(m, &node.op);
        let attrs = if attrs.is_empty() { String::new() } else { format!(" {{{attrs}}}") };
        let _ =
            writeln!(out, "  %{i} = {}({}){attrs} : {}{:?}", node.op.name(), args.join(", "), node.dtype, node.shape);
    }
    let outs: Vec<String> = f.outputs.iter().map(|o| format!("%{}", o.0)).collect();
    let _ = writeln!(out, "  return {}\n}}", outs.join(", "));
}

/// Renumbers nothing: `%N` is the node index in its function.
fn attributes(m: &Module, op: &Op) -> String {
    match op {
        Op::Arg(i) | Op::Get(i) => i.to_string(),
        Op::Const(c) => format!("{c:e}"),
        Op::Table(i) => format!("@{}", m.constants[*i].name),
        Op::Cast(t) => t.to_string(),
        Op::Sum { axis, keep } | Op::Max { axis, keep } => format!("axis {axis}{}", if *keep { ", keep" } else { "" }),
        Op::SumTo(s) | Op::BroadcastTo(s) | Op::Reshape(s) => format!("{s:?}"),
        Op::Transpose(p) => format!("{p:?}"),
        Op::Slice { axis, start, end } => format!("axis {axis}, {start}..{end}"),
        Op::PadSlice { axis, start, len } => format!("axis {axis}, at {start} of {len}"),
        Op::Concat { axis } => format!("axis {axis}"),
        Op::MatMul { ta, tb, fp8 }
        | Op::ConcatMatMul { ta, tb, fp8 }
        | Op::ConcatKMatMul { ta, tb, fp8 }
        | Op::ConcatRowsMatMul { ta, tb, fp8 }
        | Op::MatMulAdd { ta, tb, fp8 } => {
            let mut parts = vec![];
            if *ta {
                parts.push("ta".to_string());
            }
            if *tb {
                parts.push("tb".to_string());
            }
            if let Some(f) = fp8 {
                parts.push(format!("fp8 {}x{}*{}x{}/{}", f.a.outer, f.a.k, f.b.outer, f.b.k, f.promote));
            }
            parts.join(", ")
        }
        Op::GroupedMatMul { tb, fp8 } | Op::ConcatGroupedMatMul { tb, fp8 } => {
            let t = if *tb { "tb" } else { "" };
            match fp8 {
                Some(f) => format!("{t}, fp8 {}x{}*{}x{}/{}", f.a.outer, f.a.k, f.b.outer, f.b.k, f.promote),
                None => t.to_string(),
            }
        }
        Op::GroupedWgrad { experts, fp8 } => match fp8 {
            Some(f) => format!("experts {experts}, fp8 {}x{}*{}x{}/{}", f.a.outer, f.a.k, f.b.outer, f.b.k, f.promote),
            None => format!("experts {experts}"),
        },
        Op::ScatterRows { rows } => format!("rows {rows}"),
        Op::PutAlong { n } => format!("n {n}"),
        Op::TopK { k } => format!("k {k}"),
        Op::Count { bins } => format!("bins {bins}"),
        Op::SortByExpert { experts } | Op::ExpertOffsets { experts } => format!("experts {experts}"),
        Op::Permute { k } | Op::Unpermute { k } | Op::UnpermuteGradRows { k } | Op::UnpermuteGradGates { k } => {
            format!("k {k}")
        }
        Op::PermuteGrad { k, tokens } => format!("k {k}, tokens {tokens}"),
        Op::ExchangeCounts { ranks } | Op::Dispatch { ranks } | Op::Combine { ranks } => format!("ranks {ranks}"),
        Op::Call(f) => format!("@{}", m.functions[*f].name),
        Op::RmsNorm { eps } | Op::AddRmsNorm { eps } | Op::RmsNormGrad { eps } => format!("eps {eps:e}"),
        Op::Quantize { rows, cols, transpose } => {
            format!("{rows}x{cols}{}", if *transpose { ", transposed" } else { "" })
        }
        Op::ConcatKScaledGroupedMatMul { fp8: Fp8Gemm { promote, .. } }
        | Op::ScaledMatMul { promote }
        | Op::ConcatScaledMatMul { promote }
        | Op::ConcatKScaledMatMul { promote }
        | Op::ScaledGroupedWgrad { promote } => {
            format!("promote {promote}")
        }
        Op::QuantizeByExpert { experts, tile, rows } => {
            let source = match rows {
                ExpertRows::Stored => String::new(),
                ExpertRows::Permuted { k } => format!(", permuted k={k}"),
                ExpertRows::SwiGlu => ", swiglu".into(),
                ExpertRows::UnpermutedGrad { k } => format!(", unpermuted gradient k={k}"),
            };
            format!("experts {experts}, 1x{tile}{source}")
        }
        Op::RmsNormQuantize { eps, cols } => format!("eps {eps:e}, 1x{cols}"),
        Op::SwiGluQuantize { cols } => format!("1x{cols}"),
        Op::PermuteQuantize { k, cols, gated } => format!("k {k}, 1x{cols}{}", if *gated { ", gated" } else { "" }),
        Op::MaskedSoftmax { scale } => format!("scale {scale:e}"),
        Op::Attention { scale, bf16 } | Op::AttentionGrad { scale, bf16 } => {
            format!("causal, scale {scale:e}{}", if *bf16 { ", bf16" } else { "" })
        }
        Op::Route { groups, keep, k, scale } => format!("groups {groups}, keep {keep}, k {k}, scale {scale:e}"),
        _ => String::new(),
    }
}
