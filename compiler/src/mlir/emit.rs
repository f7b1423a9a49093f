//! MLIR for a generated kernel: one `gpu.module` with one kernel per fused group, in the
//! gpu, scf, arith, memref and vector dialects, with inline PTX for the transcendental
//! instructions (`ex2`, `rsqrt`, `lg2`, `sqrt`) so that no CUDA libdevice is needed.
//! Elementwise kernels give each thread 4 consecutive elements through 16-byte vector loads
//! and stores (coalesced across the warp); a scalar argument is loaded once. Ops along rows
//! are row programs (`super::rows`), `quantize` has its own kernel ([`super::fp8`]; one for
//! a value's row-wise and transposed quantisation together), and every other kernel is
//! written by index (`super::indexed`); a kernel that none of them handles is reported with
//! the reason.

use crate::fuse::kernels::Kernel;
use crate::graph::ir::{DType, Function, Node, Op, V};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// Emits `%{name}_r4`, the butterfly reduction over the warp of `value` with `combine`
/// (an op taking `%acc` and `%y`); needs `%w32`.
pub(super) fn warp_reduce(t: &mut String, name: &str, value: &str, combine: &str) -> String {
    let mut v = value.to_string();
    for (k, offset) in [16, 8, 4, 2, 1].iter().enumerate() {
        let _ = write!(t, "      %{name}_off{k} = arith.constant {offset} : i32\n      %{name}_s{k}, %{name}_ok{k} = gpu.shuffle xor {v}, %{name}_off{k}, %w32 : f32\n");
        let combined = combine.replace("%acc", &v).replace("%y", &format!("%{name}_s{k}"));
        let _ = writeln!(t, "      %{name}_r{k} = {combined}");
        v = format!("%{name}_r{k}");
    }
    v
}

/// The sm_90a target of every module.
pub(super) const TARGET: &str = r#"#nvvm.target<chip = "sm_90a", features = "+ptx80">"#;
/// Threads per block of elementwise kernels; row kernels use one warp per row.
pub(super) const BLOCK: u32 = 256;

/// A kernel's MLIR and how to launch it: arguments are `memref<?xf32>` buffers (`memref<?xi32>`
/// for index values, `memref<?xbf16>` for packed ones), inputs first then outputs, each passed as MLIR's memref descriptor
/// (pointer, aligned pointer, offset, size, stride).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Emitted {
    pub mlir: String,
    pub grid: u32,
    pub block: u32,
    /// The values bound to the kernel's arguments, in order.
    pub args: Vec<u32>,
    /// The outputs must be zeroed before the launch (the kernel adds into them).
    pub zeroed: bool,
}

/// The MLIR of `kernel` (a kernel of `f`, whose `packed` values are stored as bf16:
/// [`crate::fuse::kernels::packed_bf16`]), or why it is not generated yet.
pub fn emit(f: &Function, kernel: &Kernel, packed: &HashSet<u32>) -> Result<Emitted, String> {
    let nodes: Vec<&Node> = kernel.nodes.iter().map(|&i| &f.nodes[i as usize]).collect();
    let elementwise = crate::fuse::kernels::elementwise(f, kernel);
    let (reads, writes) =
        (kernel.inputs.iter().any(|v| packed.contains(v)), kernel.outputs.iter().any(|v| packed.contains(v)));
    if writes && !crate::fuse::kernels::writes_packed(f, kernel) {
        return Err("only kernels computing each element at its own index, or a row kernel casting its result, write bf16-packed values".into());
    }
    if reads && !crate::fuse::kernels::reads_packed(f, kernel) {
        return Err("row programs and quantisers do not read bf16-packed values".into());
    }
    if let [rows, columns] = nodes.as_slice() {
        if let Some(shape) = super::fp8::both_ways(rows, columns, f.node(rows.args[0])) {
            let x = kernel_input(f, kernel, rows.args[0])?;
            return Ok(super::fp8::both_ways_kernel(&kernel.name, shape, x, [kernel.nodes[0], kernel.nodes[1]]));
        }
    }
    match nodes.as_slice() {
        [row, ..] if super::rows::is_row_program(&row.op) => {
            super::rows::row_kernel(f, kernel, row, kernel.nodes[0], packed)
        }
        [one] if matches!(one.op, Op::Quantize { .. }) => {
            let x = kernel_input(f, kernel, one.args[0])?;
            let (shape, transposed) =
                (&f.node(one.args[0]).shape, matches!(one.op, Op::Quantize { transpose: true, .. }));
            let width = shape[shape.len() - if transposed { 2 } else { 1 }];
            Ok(super::fp8::quantize_kernel(&kernel.name, one, &[x], width, kernel.nodes[0]))
        }
        [one] if matches!(one.op, Op::QuantizeByExpert { .. }) => {
            let inputs = one.args.iter().map(|&a| kernel_input(f, kernel, a)).collect::<Result<Vec<u32>, String>>()?;
            Ok(super::fp8::quantize_kernel(&kernel.name, one, &inputs, one.shape[1], kernel.nodes[0]))
        }
        _ if elementwise => elementwise_kernel(f, kernel, &nodes, packed),
        _ => super::indexed::indexed_kernel(f, kernel, packed),
    }
}

fn numel(n: &Node) -> usize {
    n.shape.iter().product()
}

/// Names and emits SSA values.
pub(super) struct Body {
    pub text: String,
    pub next: usize,
}

impl Body {
    pub fn new() -> Self {
        Body { text: String::new(), next: 0 }
    }

    pub fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%v{}", self.next)
    }

    /// Emits `%vN = <rhs>` and returns `%vN`.
    pub fn line(&mut self, rhs: String) -> String {
        let v = self.fresh();
        let _ = writeln!(self.text, "        {v} = {rhs}");
        v
    }

    pub fn constant(&mut self, c: f64) -> String {
        self.line(format!("arith.constant {} : f32", float(c)))
    }

    pub(super) fn ptx(&mut self, instruction: &str, x: &str) -> String {
        self.line(format!(r#"llvm.inline_asm "{instruction} $0, $1;", "=f,f" {x} : (f32) -> f32"#))
    }

    /// e^x = 2^(x·log₂e)
    pub(super) fn exp(&mut self, x: &str) -> String {
        let l2e = self.constant(std::f64::consts::LOG2_E);
        let s = self.line(format!("arith.mulf {x}, {l2e} : f32"));
        self.ptx("ex2.approx.ftz.f32", &s)
    }

    /// 1 / (1 + e^−x)
    fn sigmoid(&mut self, x: &str) -> String {
        let n = self.line(format!("arith.negf {x} : f32"));
        let e = self.exp(&n);
        let one = self.constant(1.0);
        let d = self.line(format!("arith.addf {one}, {e} : f32"));
        self.line(format!("arith.divf {one}, {d} : f32"))
    }

    /// One elementwise op on scalars.
    pub fn op(&mut self, op: &Op, a: &[String]) -> Result<String, String> {
        Ok(match op {
            Op::Neg => self.line(format!("arith.negf {} : f32", a[0])),
            Op::Add => self.line(format!("arith.addf {}, {} : f32", a[0], a[1])),
            Op::Sub => self.line(format!("arith.subf {}, {} : f32", a[0], a[1])),
            Op::Mul => self.line(format!("arith.mulf {}, {} : f32", a[0], a[1])),
            Op::Div => self.line(format!("arith.divf {}, {} : f32", a[0], a[1])),
            Op::Maximum => self.line(format!("arith.maximumf {}, {} : f32", a[0], a[1])),
            Op::Square => self.line(format!("arith.mulf {}, {} : f32", a[0], a[0])),
            Op::Exp => self.exp(&a[0]),
            Op::Log => {
                // ln x = log₂x · ln 2
                let l = self.ptx("lg2.approx.ftz.f32", &a[0]);
                let ln2 = self.constant(std::f64::consts::LN_2);
                self.line(format!("arith.mulf {l}, {ln2} : f32"))
            }
            Op::Rsqrt => self.ptx("rsqrt.approx.ftz.f32", &a[0]),
            Op::Sqrt => self.ptx("sqrt.rn.f32", &a[0]),
            Op::Sigmoid => self.sigmoid(&a[0]),
            Op::Silu => {
                let s = self.sigmoid(&a[0]);
                self.line(format!("arith.mulf {}, {s} : f32", a[0]))
            }
            Op::SwiGlu => {
                let s = self.sigmoid(&a[0]);
                let silu = self.line(format!("arith.mulf {}, {s} : f32", a[0]));
                self.line(format!("arith.mulf {silu}, {} : f32", a[1]))
            }
            Op::Sign => {
                let zero = self.constant(0.0);
                let one = self.constant(1.0);
                let minus = self.constant(-1.0);
                let pos = self.line(format!("arith.cmpf ogt, {}, {zero} : f32", a[0]));
                let neg = self.line(format!("arith.cmpf olt, {}, {zero} : f32", a[0]));
                let lower = self.line(format!("arith.select {neg}, {minus}, {zero} : f32"));
                self.line(format!("arith.select {pos}, {one}, {lower} : f32"))
            }
            Op::Cast(DType::Bf16) => {
                let t = self.line(format!("arith.truncf {} : f32 to bf16", a[0]));
                self.line(format!("arith.extf {t} : bf16 to f32"))
            }
            Op::Cast(DType::F32) | Op::StopGradient => a[0].clone(),
            other => return Err(format!("`{}` is not generated yet", other.name())),
        })
    }
}

/// An f32 literal as its exact bit pattern.
pub(super) fn float(c: f64) -> String {
    format!("0x{:08X}", (c as f32).to_bits())
}

/// The kernel's opening, its arguments buffers of the element types `types` (`f32`, `bf16`).
fn header(name: &str, types: &[&str]) -> String {
    let params: Vec<String> = types.iter().enumerate().map(|(i, t)| format!("%a{i}: memref<?x{t}>")).collect();
    format!(
        "module attributes {{gpu.container_module}} {{\n  gpu.module @{name} [{TARGET}] {{\n    gpu.func @{name}({}) kernel {{\n",
        params.join(", ")
    )
}

const FOOTER: &str = "    gpu.return\n    }\n  }\n}\n";

/// An elementwise kernel: all its ops over the same elements, inputs of that size or scalars.
/// A packed (bf16) buffer is widened to f32 as it is loaded and rounded back as it is stored.
fn elementwise_kernel(
    f: &Function,
    kernel: &Kernel,
    nodes: &[&Node],
    packed: &HashSet<u32>,
) -> Result<Emitted, String> {
    let size = nodes.iter().map(|n| numel(n)).max().unwrap_or(0);
    let vectorised = size % 4 == 0 && size > 0;
    let mut args: Vec<u32> = kernel.inputs.clone();
    args.extend(&kernel.outputs);
    let types: Vec<&str> = args.iter().map(|v| if packed.contains(v) { "bf16" } else { "f32" }).collect();
    let lanes = if vectorised { 4 } else { 1 };
    let mut body = Body::new();
    let mut text = header(&kernel.name, &types);
    text.push_str(&index_prelude(lanes, size));
    // Scalars are loaded once; vector inputs per lane.
    let mut lane_values: Vec<HashMap<u32, String>> = vec![HashMap::new(); lanes];
    let c0 = body.line("arith.constant 0 : index".into());
    for (slot, &i) in kernel.inputs.iter().enumerate() {
        let t = types[slot];
        let widen = |body: &mut Body, x: String, of: &str| {
            if t == "f32" {
                x
            } else {
                body.line(format!("arith.extf {x} : {of} to {}", of.replace(t, "f32")))
            }
        };
        if numel(&f.nodes[i as usize]) == 1 {
            let s = body.line(format!("memref.load %a{slot}[{c0}] : memref<?x{t}>"));
            let s = widen(&mut body, s, t);
            lane_values.iter_mut().for_each(|m| {
                m.insert(i, s.clone());
            });
        } else if vectorised {
            let v = body.line(format!(
                "vector.load %a{slot}[%base] {{alignment = {} : i64}} : memref<?x{t}>, vector<4x{t}>",
                alignment(t)
            ));
            let v = widen(&mut body, v, &format!("vector<4x{t}>"));
            for (lane, m) in lane_values.iter_mut().enumerate() {
                m.insert(i, body.line(format!("vector.extract {v}[{lane}] : f32 from vector<4xf32>")));
            }
        } else {
            let s = body.line(format!("memref.load %a{slot}[%base] : memref<?x{t}>"));
            lane_values[0].insert(i, widen(&mut body, s, t));
        }
    }
    // In the function's order: a kernel folded into this one follows its nodes
    // (`fuse::kernels`), though it computes what they read.
    let mut order: Vec<(u32, &Node)> = kernel.nodes.iter().copied().zip(nodes.iter().copied()).collect();
    order.sort_by_key(|&(i, _)| i);
    for values in &mut lane_values {
        for &(i, n) in &order {
            let a: Vec<String> = n.args.iter().map(|v| operand(f, *v, values, &mut body)).collect::<Result<_, _>>()?;
            let r = body.op(&n.op, &a)?;
            values.insert(i, r);
        }
    }
    for (k, &o) in kernel.outputs.iter().enumerate() {
        let slot = kernel.inputs.len() + k;
        let t = types[slot];
        let narrow = |body: &mut Body, x: String, of: &str| {
            if t == "f32" {
                x
            } else {
                body.line(format!("arith.truncf {x} : {of} to {}", of.replace("f32", t)))
            }
        };
        if vectorised {
            let mut v = body.line("arith.constant dense<0.0> : vector<4xf32>".into());
            for (lane, values) in lane_values.iter().enumerate() {
                v = body.line(format!("vector.insert {}, {v} [{lane}] : f32 into vector<4xf32>", values[&o]));
            }
            let v = narrow(&mut body, v, "vector<4xf32>");
            let _ = writeln!(
                body.text,
                "        vector.store {v}, %a{slot}[%base] {{alignment = {} : i64}} : memref<?x{t}>, vector<4x{t}>",
                alignment(t)
            );
        } else {
            let s = narrow(&mut body, lane_values[0][&o].clone(), "f32");
            let _ = writeln!(body.text, "        memref.store {s}, %a{slot}[%base] : memref<?x{t}>");
        }
    }
    text.push_str(&body.text);
    text.push_str("      }\n");
    text.push_str(FOOTER);
    let threads = size.div_ceil(lanes) as u32;
    Ok(Emitted { mlir: text, grid: threads.div_ceil(BLOCK).max(1), block: BLOCK, args, zeroed: false })
}

/// The alignment of 4 elements of type `t` (a vector load's or store's).
fn alignment(t: &str) -> usize {
    if t == "f32" {
        16
    } else {
        8
    }
}

/// A kernel argument value: a computed one, a constant (through views), or an input.
fn operand(f: &Function, v: V, values: &HashMap<u32, String>, body: &mut Body) -> Result<String, String> {
    let mut v = v;
    loop {
        if let Some(s) = values.get(&v.0) {
            return Ok(s.clone());
        }
        match &f.node(v).op {
            Op::Const(c) => return Ok(body.constant(*c)),
            Op::Reshape(_) | Op::StopGradient => v = f.node(v).args[0],
            op => return Err(format!("operand `{}` is not available in the kernel", op.name())),
        }
    }
}

/// `%base`: the first element of this thread, and the bounds check around the body.
fn index_prelude(lanes: usize, size: usize) -> String {
    format!(
        "      %bid = gpu.block_id x\n      %bdim = gpu.block_dim x\n      %tid = gpu.thread_id x\n      %t0 = arith.muli %bid, %bdim : index\n      %thread = arith.addi %t0, %tid : index\n      %lanes = arith.constant {lanes} : index\n      %base = arith.muli %thread, %lanes : index\n      %size = arith.constant {size} : index\n      %inside = arith.cmpi ult, %base, %size : index\n      scf.if %inside {{\n"
    )
}

/// The data argument `a` of a one-node kernel reads: through reshapes and stop-gradients,
/// an input of the kernel.
pub(super) fn kernel_input(f: &Function, kernel: &Kernel, a: V) -> Result<u32, String> {
    let mut v = a;
    while matches!(f.node(v).op, Op::Reshape(_) | Op::StopGradient) {
        v = f.node(v).args[0];
    }
    if kernel.inputs.contains(&v.0) {
        Ok(v.0)
    } else {
        Err("a row kernel reads a value computed in the kernel".to_string())
    }
}
