//! FP8 E4M3 values in generated kernels: the layout of a quantised buffer, the encoding, and
//! the kernel of `quantize` (any group shape, transposed or not).
//!
//! A value quantised in groups of `rows × cols` of its [m, n] matrix is one buffer: its m·n
//! E4M3 bytes row-major, then, from the next 16-byte boundary, one f32 scale per group in the
//! order DeepGEMM and cuBLASLt's block-scaled GEMM read them ([`scale_index`]): groups of one
//! row (activation tiles) group column by group column (M-major), taller groups (weight
//! blocks) group row by group row, each row padded to 4 scales. A group's scale is amax / 448 rounded to
//! f32 (1 where that is 0), and an element is `cvt.rn.satfinite.e4m3` of the f32 quotient
//! x / scale (a true division): what the CPU reference's `quantize` computes.

use super::emit::{warp_reduce, Body, Emitted, TARGET};
use crate::graph::ir::{Node, Op};
use std::fmt::Write as _;

/// Where the scale of group (`group_row`, `group_col`) of a matrix cut into `row_groups` ×
/// `col_groups` groups of `rows` rows each lies among its scales: M-major for one-row groups
/// (`group_col · row_groups + group_row`), row-major over the groups otherwise, each row of
/// groups padded to a multiple of 4 scales (16 bytes: cuBLASLt reads 128×128 scales so; with
/// 6 groups a row unpadded its results were off by 50% on the H100).
pub fn scale_index(rows: usize, row_groups: usize, col_groups: usize, group_row: usize, group_col: usize) -> usize {
    if rows == 1 {
        group_col * row_groups + group_row
    } else {
        group_row * col_groups.next_multiple_of(4) + group_col
    }
}

/// How many scales the buffer holds (padding included, see [`scale_index`]).
pub fn scale_count(rows: usize, row_groups: usize, col_groups: usize) -> usize {
    if rows == 1 {
        row_groups * col_groups
    } else {
        row_groups * col_groups.next_multiple_of(4)
    }
}

/// The scaling group (rows, cols) of an FP8 value made by `op`.
pub fn tiling(op: &Op) -> Option<(usize, usize)> {
    match op {
        Op::Quantize { rows, cols, .. } => Some((*rows, *cols)),
        Op::RmsNormQuantize { cols, .. } | Op::SwiGluQuantize { cols } | Op::PermuteQuantize { cols, .. } => {
            Some((1, *cols))
        }
        _ => None,
    }
}

/// The FP8 value's matrix: [m, n] with n its last axis.
fn matrix(node: &Node) -> (usize, usize) {
    let n = *node.shape.last().unwrap_or(&1);
    (node.shape.iter().product::<usize>() / n.max(1), n)
}

/// Where the scales start in the buffer.
fn scales_offset(m: usize, n: usize) -> usize {
    (m * n).next_multiple_of(16)
}

/// Bytes of the buffer of FP8 value `node` (made by an op with a [`tiling`]).
pub fn storage_bytes(node: &Node) -> Option<u64> {
    let (rows, cols) = tiling(&node.op)?;
    let (m, n) = matrix(node);
    Some((scales_offset(m, n) + 4 * scale_count(rows, m.div_ceil(rows), n.div_ceil(cols))) as u64)
}

/// `%q{slot}` (the bytes as i32 words, when there are whole words) and `%s{slot}` (the scales)
/// over argument `slot`, an [m, n] value in `rows × cols` groups.
pub(super) fn views(b: &mut Body, slot: usize, m: usize, n: usize, rows: usize, cols: usize) {
    let groups = scale_count(rows, m.div_ceil(rows), n.div_ceil(cols));
    let _ = write!(
        b.text,
        "      %qn{slot} = arith.constant {} : index\n      %q{slot} = memref.view %a{slot}[%c0][%qn{slot}] : memref<?xi8> to memref<?xi32>\n      %so{slot} = arith.constant {} : index\n      %sn{slot} = arith.constant {groups} : index\n      %s{slot} = memref.view %a{slot}[%so{slot}][%sn{slot}] : memref<?xi8> to memref<?xf32>\n",
        m * n / 4,
        scales_offset(m, n)
    );
}

/// |x|, NaN staying NaN.
fn magnitude(b: &mut Body, x: &str) -> String {
    let negated = b.line(format!("arith.negf {x} : f32"));
    b.line(format!("arith.maximumf {x}, {negated} : f32"))
}

/// A group's scale from its amax.
fn scale(b: &mut Body, amax: &str) -> String {
    let max = b.constant(448.0);
    let s = b.line(format!("arith.divf {amax}, {max} : f32"));
    let zero = b.constant(0.0);
    let one = b.constant(1.0);
    let is_zero = b.line(format!("arith.cmpf oeq, {s}, {zero} : f32"));
    b.line(format!("arith.select {is_zero}, {one}, {s} : f32"))
}

/// Two E4M3 bytes as an i16, `low` in the low byte.
fn encode_pair(b: &mut Body, low: &str, high: &str) -> String {
    b.line(format!(
        "nvvm.convert.f32x2.to.f8x2 {high}, {low} {{rnd = #nvvm.fp_rnd_mode<rn>, sat = #nvvm.sat_mode<satfinite>}} : i16 (f8E4M3FN)"
    ))
}

/// Four E4M3 bytes as an i32, the first in the low byte (memory order).
fn encode_word(b: &mut Body, q: &[String]) -> String {
    let low = encode_pair(b, &q[0], &q[1]);
    let high = encode_pair(b, &q[2], &q[3]);
    let low = b.line(format!("arith.extui {low} : i16 to i32"));
    let high = b.line(format!("arith.extui {high} : i16 to i32"));
    let sixteen = b.line("arith.constant 16 : i32".into());
    let high = b.line(format!("arith.shli {high}, {sixteen} : i32"));
    b.line(format!("arith.ori {low}, {high} : i32"))
}

/// Stores 4 consecutive elements of one row (`values`, at column `col` of row `%row`) of
/// output `slot` quantised in 1×`cols` groups held by `lanes` lanes each: the group's amax
/// through shuffles, one i32 word of E4M3 bytes per lane, the scale from the group's first
/// lane. `inside`: whether the lane's elements are inside the row.
pub(super) fn store_row_group(
    b: &mut Body,
    slot: usize,
    values: &[String],
    col: &str,
    inside: Option<&str>,
    lanes: usize,
    cols: usize,
) {
    assert_eq!(values.len(), 4, "a lane stores one word of four elements");
    let mut amax = b.constant(0.0);
    for v in values {
        let m = magnitude(b, v);
        amax = b.line(format!("arith.maximumf {amax}, {m} : f32"));
    }
    if let Some(inside) = inside {
        let zero = b.constant(0.0);
        amax = b.line(format!("arith.select {inside}, {amax}, {zero} : f32"));
    }
    let mut offset = lanes / 2;
    while offset > 0 {
        let o = b.line(format!("arith.constant {offset} : i32"));
        let r = b.fresh();
        let _ = writeln!(b.text, "        {r}, {r}_ok = gpu.shuffle xor {amax}, {o}, %w32 : f32");
        amax = b.line(format!("arith.maximumf {amax}, {r} : f32"));
        offset /= 2;
    }
    let s = scale(b, &amax);
    let q: Vec<String> = values.iter().map(|v| b.line(format!("arith.divf {v}, {s} : f32"))).collect();
    let word = encode_word(b, &q);
    let at = b.line("arith.muli %row, %n : index".into());
    let at = b.line(format!("arith.addi {at}, {col} : index"));
    let c4 = b.line("arith.constant 4 : index".into());
    let at = b.line(format!("arith.divui {at}, {c4} : index"));
    let group_lanes = b.line(format!("arith.constant {lanes} : index"));
    let in_group = b.line(format!("arith.remui %lane, {group_lanes} : index"));
    let leads = b.line(format!("arith.cmpi eq, {in_group}, %c0 : index"));
    let width = b.line(format!("arith.constant {cols} : index"));
    let group_col = b.line(format!("arith.divui {col}, {width} : index"));
    let column_start = b.line(format!("arith.muli {group_col}, %rows : index"));
    let scale_at = b.line(format!("arith.addi {column_start}, %row : index"));
    let guard = |b: &mut Body, cond: &str, body: &str| {
        let _ = writeln!(b.text, "        scf.if {cond} {{\n        {body}\n        }}");
    };
    let store_word = format!("memref.store {word}, %q{slot}[{at}] : memref<?xi32>");
    let store_scale = format!("memref.store {s}, %s{slot}[{scale_at}] : memref<?xf32>");
    match inside {
        Some(inside) => {
            guard(b, inside, &store_word);
            let both = b.line(format!("arith.andi {inside}, {leads} : i1"));
            guard(b, &both, &store_scale);
        }
        None => {
            let _ = writeln!(b.text, "        {store_word}");
            guard(b, &leads, &store_scale);
        }
    }
}

/// The work on one unit (i, j) of a group, given the value carried, if any; the next one.
type UnitBody<'a> = dyn Fn(&mut Body, &str, &str, Option<&str>) -> Option<String> + 'a;

/// Warps of the quantize kernel sharing a group (a block per group).
const WARPS: usize = 8;

/// `quantize` of x into [m, n] (x is [m, n], or [n, m] when transposed) in `rows × cols`
/// groups: a block per group reads it twice (its amax, then the quotients) along x's
/// contiguous axis, 32 lanes apart and the warps taking turns along the other, each lane
/// storing four E4M3 bytes of a row as one word; the warps' maxima meet in shared memory.
pub fn quantize_kernel(name: &str, node: &Node, x: u32, out: u32) -> Emitted {
    let Op::Quantize { rows, cols, transpose } = node.op else { unreachable!("a quantize node") };
    let (m, n) = matrix(node);
    let (gm, gn) = (m.div_ceil(rows), n.div_ceil(cols));
    let groups = gm * gn;
    let mut b = Body::new();
    let _ = write!(
        b.text,
        "      %tid = gpu.thread_id x\n      %bid = gpu.block_id x\n      %c0 = arith.constant 0 : index\n      %c1 = arith.constant 1 : index\n      %c32 = arith.constant 32 : index\n      %w32 = arith.constant 32 : i32\n      %wpb = arith.constant {WARPS} : index\n      %warp = arith.divui %tid, %c32 : index\n      %lane = arith.remui %tid, %c32 : index\n      %g = arith.addi %bid, %c0 : index\n      %groups = arith.constant {groups} : index\n      %m = arith.constant {m} : index\n      %n = arith.constant {n} : index\n      %gm = arith.constant {gm} : index\n      %rows = arith.constant {rows} : index\n      %cols = arith.constant {cols} : index\n      %active = arith.cmpi ult, %g, %groups : index\n      scf.if %active {{\n"
    );
    views(&mut b, 1, m, n, rows, cols);
    // Group (gr, gc) = (g mod gm, g / gm): rows i0..i1, columns j0..j1 of the result.
    let _ = write!(
        b.text,
        "      %gr = arith.remui %g, %gm : index\n      %gc = arith.divui %g, %gm : index\n      %i0 = arith.muli %gr, %rows : index\n      %j0 = arith.muli %gc, %cols : index\n      %ie = arith.addi %i0, %rows : index\n      %je = arith.addi %j0, %cols : index\n      %i1 = arith.minui %ie, %m : index\n      %j1 = arith.minui %je, %n : index\n"
    );
    // A lane's unit: row i, columns j..j+U of the result (U = 4 when columns come in whole
    // words: one i32 store). Lanes run along x's contiguous axis: the result's rows when
    // transposed (the unit's columns are then U rows of x), its column units if not.
    let unit = if n.is_multiple_of(4) && cols.is_multiple_of(4) { 4 } else { 1 };
    let _ = writeln!(
        b.text,
        "      %cu = arith.constant {unit} : index\n      %cu32 = arith.constant {} : index",
        32 * unit
    );
    let (slow, fast, slow_step, fast_step) = if transpose {
        (("%j0", "%j1"), ("%i0", "%i1"), "%cu", "%c32")
    } else {
        (("%i0", "%i1"), ("%j0", "%j1"), "%c1", "%cu32")
    };
    // The block's warps take turns along the slow axis.
    let warp_offset = b.line(format!("arith.muli %warp, {slow_step} : index"));
    let slow_start = b.line(format!("arith.addi {}, {warp_offset} : index", slow.0));
    let slow_stride = b.line(format!("arith.muli {slow_step}, %wpb : index"));
    let lane_offset = if transpose { "%lane".to_string() } else { b.line("arith.muli %lane, %cu : index".into()) };
    let fast_start = b.line(format!("arith.addi {}, {lane_offset} : index", fast.0));
    // Runs `body` on every unit (i, j) of the group this lane reads; returns the carried value.
    let each = |b: &mut Body, init: Option<&str>, body: &UnitBody| {
        let (s, f) = (b.fresh(), b.fresh());
        let (outer, inner) = (b.fresh(), b.fresh());
        let (acc_o, acc_i) = (b.fresh(), b.fresh());
        let carry =
            |acc: &str, from: &str| init.map_or(String::new(), |_| format!(" iter_args({acc} = {from}) -> (f32)"));
        let head = |r: &str| if init.is_some() { format!("{r} = ") } else { String::new() };
        let _ = writeln!(
            b.text,
            "        {}scf.for {s} = {slow_start} to {} step {slow_stride}{} {{",
            head(&outer),
            slow.1,
            carry(&acc_o, init.unwrap_or(""))
        );
        let _ = writeln!(
            b.text,
            "        {}scf.for {f} = {fast_start} to {} step {fast_step}{} {{",
            head(&inner),
            fast.1,
            carry(&acc_i, &acc_o)
        );
        let (i, j) = if transpose { (f.as_str(), s.as_str()) } else { (s.as_str(), f.as_str()) };
        let next = body(b, i, j, init.map(|_| acc_i.as_str()));
        match next {
            Some(next) => {
                let _ = writeln!(
                    b.text,
                    "        scf.yield {next} : f32\n        }}\n        scf.yield {inner} : f32\n        }}"
                );
                Some(outer)
            }
            None => {
                let _ = writeln!(b.text, "        }}\n        }}");
                None
            }
        }
    };
    // The unit's elements: x[i, j + c], or x[j + c, i] when transposed.
    let load = |b: &mut Body, i: &str, j: &str| -> Vec<String> {
        (0..unit)
            .map(|c| {
                let offset = b.line(format!("arith.constant {c} : index"));
                let jc = b.line(format!("arith.addi {j}, {offset} : index"));
                let (r, col, width) = if transpose { (jc.as_str(), i, "%m") } else { (i, jc.as_str(), "%n") };
                let at = b.line(format!("arith.muli {r}, {width} : index"));
                let at = b.line(format!("arith.addi {at}, {col} : index"));
                b.line(format!("memref.load %a0[{at}] : memref<?xf32>"))
            })
            .collect()
    };
    let zero = b.constant(0.0);
    let partial = each(&mut b, Some(&zero), &|b, i, j, acc| {
        let mut amax = acc.expect("carried").to_string();
        for x in load(b, i, j) {
            let m = magnitude(b, &x);
            amax = b.line(format!("arith.maximumf {amax}, {m} : f32"));
        }
        Some(amax)
    })
    .expect("carried");
    let reduction = b.fresh();
    let warp_amax = warp_reduce(&mut b.text, &reduction[1..], &partial, "arith.maximumf %acc, %y : f32");
    // The warps' maxima meet in shared memory.
    let _ = write!(
        b.text,
        "      %lane0 = arith.cmpi eq, %lane, %c0 : index\n      scf.if %lane0 {{\n      memref.store {warp_amax}, %shared[%warp] : memref<{WARPS}xf32, #gpu.address_space<workgroup>>\n      }}\n      gpu.barrier\n"
    );
    let mut amax = warp_amax.clone();
    for w in 0..WARPS {
        let at = b.line(format!("arith.constant {w} : index"));
        let x = b.line(format!("memref.load %shared[{at}] : memref<{WARPS}xf32, #gpu.address_space<workgroup>>"));
        amax = b.line(format!("arith.maximumf {amax}, {x} : f32"));
    }
    let s = scale(&mut b, &amax);
    each(&mut b, None, &|b, i, j, _| {
        let q: Vec<String> = load(b, i, j).iter().map(|x| b.line(format!("arith.divf {x}, {s} : f32"))).collect();
        let at = b.line(format!("arith.muli {i}, %n : index"));
        let at = b.line(format!("arith.addi {at}, {j} : index"));
        if unit == 4 {
            let word = encode_word(b, &q);
            let c4 = b.line("arith.constant 4 : index".into());
            let at = b.line(format!("arith.divui {at}, {c4} : index"));
            let _ = writeln!(b.text, "        memref.store {word}, %q1[{at}] : memref<?xi32>");
        } else {
            let zero = b.constant(0.0);
            let pair = encode_pair(b, &q[0], &zero);
            let byte = b.line(format!("arith.trunci {pair} : i16 to i8"));
            let _ = writeln!(b.text, "        memref.store {byte}, %a1[{at}] : memref<?xi8>");
        }
        None
    });
    // The scale's place (`scale_index`): M-major for one-row groups, else row-major.
    let (outer, stride, inner) = if rows == 1 { ("%gc", gm, "%gr") } else { ("%gr", gn.next_multiple_of(4), "%gc") };
    let _ = write!(
        b.text,
        "      %first_thread = arith.cmpi eq, %tid, %c0 : index\n      scf.if %first_thread {{\n      %sstride = arith.constant {stride} : index\n      %souter = arith.muli {outer}, %sstride : index\n      %sat = arith.addi %souter, {inner} : index\n      memref.store {s}, %s1[%sat] : memref<?xf32>\n      }}\n      }}\n"
    );
    let mlir = format!(
        "module attributes {{gpu.container_module}} {{\n  gpu.module @{name} [{TARGET}] {{\n    gpu.func @{name}(%a0: memref<?xf32>, %a1: memref<?xi8>) workgroup(%shared : memref<{WARPS}xf32, #gpu.address_space<workgroup>>) kernel {{\n{}      gpu.return\n    }}\n  }}\n}}\n",
        b.text
    );
    Emitted { mlir, grid: groups.max(1) as u32, block: (32 * WARPS) as u32, args: vec![x, out], zeroed: false }
}
