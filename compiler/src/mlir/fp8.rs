//! FP8 E4M3 values in generated kernels: the layout of a quantised buffer, the encoding, and
//! the kernels of `quantize` (any group shape, transposed or not, a stack of matrices each
//! transposed; a value's row-wise and transposed 1×tile quantisations as one kernel) and
//! `quantize_by_expert` (the same transposed quantisation, reading each column of the result
//! from the row of x the expert offsets say; x's rows stored, or made as they are read: a
//! permutation's, through its order, or a SwiGLU's of two operands).
//!
//! A value quantised in groups of `rows × cols` of its [m, n] matrix is one buffer: its m·n
//! E4M3 bytes row-major, then, from the next 16-byte boundary, one f32 scale per group in the
//! order DeepGEMM and cuBLASLt's block-scaled GEMM read them ([`scale_index`]): groups of one
//! row (activation tiles) group column by group column (M-major), taller groups (weight
//! blocks) group row by group row, each row padded to 4 scales. A group's scale is amax / 448 rounded to
//! f32 (1 where that is 0), and an element is `cvt.rn.satfinite.e4m3` of the f32 product
//! x · (1 / scale), the reciprocal rounded to f32 once per group (as DeepSeek's own casts
//! multiply): what the CPU reference's `quantize` computes.

use super::emit::{warp_reduce, Body, Emitted, TARGET};
use crate::graph::ir::{ExpertRows, Node, Op};
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
        Op::RmsNormQuantize { cols, .. }
        | Op::SwiGluQuantize { cols }
        | Op::PermuteQuantize { cols, .. }
        | Op::QuantizeByExpert { tile: cols, .. } => Some((1, *cols)),
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

/// A group's scale from its amax, and its reciprocal, which the elements are multiplied by
/// (a division per element took most of a quantize kernel's instructions).
fn scale(b: &mut Body, amax: &str) -> (String, String) {
    let max = b.constant(448.0);
    let s = b.line(format!("arith.divf {amax}, {max} : f32"));
    let zero = b.constant(0.0);
    let one = b.constant(1.0);
    let is_zero = b.line(format!("arith.cmpf oeq, {s}, {zero} : f32"));
    let s = b.line(format!("arith.select {is_zero}, {one}, {s} : f32"));
    let inverse = b.line(format!("arith.divf {one}, {s} : f32"));
    (s, inverse)
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

/// Stores 4 consecutive elements of one row (`values`, at column `col` of row `row`) of
/// output `slot` quantised in 1×`cols` groups held by cols / 4 lanes each: the group's amax
/// through shuffles, one i32 word of E4M3 bytes per lane, the scale from the group's first
/// lane. `inside`: whether the lane's elements are inside the row.
pub(super) fn store_row_group(
    b: &mut Body,
    slot: usize,
    values: &[String],
    row: &str,
    col: &str,
    inside: Option<&str>,
    cols: usize,
) {
    assert_eq!(values.len(), 4, "a lane stores one word of four elements");
    let lanes = cols / 4;
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
    let (s, inverse) = scale(b, &amax);
    let q: Vec<String> = values.iter().map(|v| b.line(format!("arith.mulf {v}, {inverse} : f32"))).collect();
    let word = encode_word(b, &q);
    let at = b.line(format!("arith.muli {row}, %n : index"));
    let at = b.line(format!("arith.addi {at}, {col} : index"));
    let c4 = b.line("arith.constant 4 : index".into());
    let at = b.line(format!("arith.divui {at}, {c4} : index"));
    let group_lanes = b.line(format!("arith.constant {lanes} : index"));
    let in_group = b.line(format!("arith.remui %lane, {group_lanes} : index"));
    let leads = b.line(format!("arith.cmpi eq, {in_group}, %c0 : index"));
    let width = b.line(format!("arith.constant {cols} : index"));
    let group_col = b.line(format!("arith.divui {col}, {width} : index"));
    let column_start = b.line(format!("arith.muli {group_col}, %rows : index"));
    let scale_at = b.line(format!("arith.addi {column_start}, {row} : index"));
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

/// The most shared memory a transposed group's tile may take (of the 48 KiB a block has
/// without asking).
const STAGE_BYTES: usize = 32 * 1024;

/// `quantize` of x into [m, n] (x is [m, n], or [n, m] when transposed; a stack of such, each
/// transposed) in `rows × cols` groups, or `quantize_by_expert` of x [r, m] into [m, n]
/// (`offsets` its second argument): a block per group reads it twice (its amax, then the
/// scaled elements) along x's contiguous axis, 32 lanes apart and the warps taking turns along the
/// other, each lane storing four E4M3 bytes of a row as one word; the warps' maxima meet in
/// shared memory.
///
/// `width`: x's extent along the result's rows (its columns, or its rows when transposed);
/// where it is less than the result's, the rest of each result row is zero.
/// `inputs`: x, and by expert the offsets and, for rows made as they are read, the order or
/// SwiGLU's second operand ([`ExpertRows`]).
pub fn quantize_kernel(name: &str, node: &Node, inputs: &[u32], width: usize, out: u32) -> Emitted {
    let (rows, cols, transpose, experts, source) = match node.op {
        Op::Quantize { rows, cols, transpose } => (rows, cols, transpose, None, ExpertRows::Stored),
        Op::QuantizeByExpert { experts, tile, rows } => (1, tile, true, Some(experts), rows),
        _ => unreachable!("a quantize node"),
    };
    let (x, offsets) = (inputs[0], inputs.get(1).copied());
    let (m, n) = matrix(node);
    // The rows of each matrix of a stack (of the result; x's are transposed).
    let batch_rows = node.shape[node.shape.len().saturating_sub(2)];
    let tiles = rows == 1 && n.is_multiple_of(4) && cols.is_multiple_of(4) && 128 % cols == 0;
    assert!(width == n || batch_rows == m, "{name}: a stack of matrices padded");
    if tiles && !transpose {
        return row_tiles_kernel(name, m, n, width, cols, x, out);
    }
    if tiles && m.is_multiple_of(2) && (experts.is_some() || batch_rows == m) {
        return column_tiles_kernel(name, m, n, width, cols, inputs, experts.map(|e| (e, source)), out);
    }
    let blocks = cols == BLOCK_COLS && rows.is_multiple_of(32) && rows <= 128 && n.is_multiple_of(4);
    if blocks && experts.is_none() && (batch_rows == m || batch_rows.is_multiple_of(rows)) {
        let layout = Layout { m, n, width, transpose, batch_rows };
        return block_tiles_kernel(name, layout, rows, x, out);
    }
    // The output's argument slot: after the inputs.
    let slot = inputs.len();
    let (gm, gn) = (m.div_ceil(rows), n.div_ceil(cols));
    let groups = gm * gn;
    let mut b = Body::new();
    let _ = write!(
        b.text,
        "      %tid = gpu.thread_id x\n      %bid = gpu.block_id x\n      %c0 = arith.constant 0 : index\n      %c1 = arith.constant 1 : index\n      %c32 = arith.constant 32 : index\n      %w32 = arith.constant 32 : i32\n      %wpb = arith.constant {WARPS} : index\n      %warp = arith.divui %tid, %c32 : index\n      %lane = arith.remui %tid, %c32 : index\n      %g = arith.addi %bid, %c0 : index\n      %groups = arith.constant {groups} : index\n      %m = arith.constant {m} : index\n      %n = arith.constant {n} : index\n      %gm = arith.constant {gm} : index\n      %rows = arith.constant {rows} : index\n      %cols = arith.constant {cols} : index\n      %active = arith.cmpi ult, %g, %groups : index\n      scf.if %active {{\n"
    );
    views(&mut b, slot, m, n, rows, cols);
    // Group (gr, gc) = (g mod gm, g / gm): rows i0..i1, columns j0..j1 of the result.
    let _ = write!(
        b.text,
        "      %gr = arith.remui %g, %gm : index\n      %gc = arith.divui %g, %gm : index\n      %i0 = arith.muli %gr, %rows : index\n      %j0 = arith.muli %gc, %cols : index\n      %ie = arith.addi %i0, %rows : index\n      %je = arith.addi %j0, %cols : index\n      %i1 = arith.minui %ie, %m : index\n      %j1 = arith.minui %je, %n : index\n"
    );
    if let Some(experts) = experts {
        expert_of_group(&mut b, experts, cols);
    }
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
    // The unit's elements: x[i, j + c], or x[j + c, i] when transposed (of the stack's
    // matrix holding row i; by expert, x's row for column j + c, zero where there is none).
    let load = |b: &mut Body, i: &str, j: &str| -> Vec<String> {
        (0..unit)
            .map(|c| {
                let offset = b.line(format!("arith.constant {c} : index"));
                let jc = b.line(format!("arith.addi {j}, {offset} : index"));
                if width < n {
                    // Zero past x's rows (of the transpose, its columns).
                    let limit = b.line(format!("arith.constant {width} : index"));
                    let inside = b.line(format!("arith.cmpi ult, {jc}, {limit} : index"));
                    let safe = b.line(format!("arith.select {inside}, {jc}, %c0 : index"));
                    let (row, col, stride) = if transpose { (safe.as_str(), i, m) } else { (i, safe.as_str(), width) };
                    let stride = b.line(format!("arith.constant {stride} : index"));
                    let at = b.line(format!("arith.muli {row}, {stride} : index"));
                    let at = b.line(format!("arith.addi {at}, {col} : index"));
                    let x = b.line(format!("memref.load %a0[{at}] : memref<?xf32>"));
                    let zero = b.constant(0.0);
                    return b.line(format!("arith.select {inside}, {x}, {zero} : f32"));
                }
                if !transpose {
                    let at = b.line(format!("arith.muli {i}, %n : index"));
                    let at = b.line(format!("arith.addi {at}, {jc} : index"));
                    return b.line(format!("memref.load %a0[{at}] : memref<?xf32>"));
                }
                if experts.is_some() {
                    let from = b.line(format!("arith.subi {jc}, %first_column : index"));
                    let row = b.line(format!("arith.addi {from}, %first_row : index"));
                    let inside = b.line(format!("arith.cmpi ult, {row}, %end_row : index"));
                    return elements_or_zero(b, &row, i, &inside, source, 1).remove(0);
                }
                // Element (jc, i mod batch_rows) of x's matrix i / batch_rows, [n, batch_rows].
                let matrix_rows = b.line(format!("arith.constant {batch_rows} : index"));
                let matrix = b.line(format!("arith.divui {i}, {matrix_rows} : index"));
                let within = b.line(format!("arith.remui {i}, {matrix_rows} : index"));
                let size = b.line(format!("arith.constant {} : index", batch_rows * n));
                let at = b.line(format!("arith.muli {matrix}, {size} : index"));
                let row = b.line(format!("arith.muli {jc}, {matrix_rows} : index"));
                let at = b.line(format!("arith.addi {at}, {row} : index"));
                let at = b.line(format!("arith.addi {at}, {within} : index"));
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
    let (s, inverse) = scale(&mut b, &amax);
    // Transposed, the lanes' words would go to 32 result rows apart (a word of each written
    // sector); they go to the group's tile in shared memory instead, whose rows then go out
    // whole. Its rows are one word longer than the group's so that the lanes' words of a
    // column fall in different banks.
    let pitch = cols / 4 + 1;
    let staged = transpose && unit == 4 && 4 * rows * pitch <= STAGE_BYTES;
    each(&mut b, None, &|b, i, j, _| {
        let q: Vec<String> = load(b, i, j).iter().map(|x| b.line(format!("arith.mulf {x}, {inverse} : f32"))).collect();
        if staged {
            let word = encode_word(b, &q);
            let row = b.line(format!("arith.subi {i}, %i0 : index"));
            let col = b.line(format!("arith.subi {j}, %j0 : index"));
            let c4 = b.line("arith.constant 4 : index".into());
            let col = b.line(format!("arith.divui {col}, {c4} : index"));
            let words = b.line(format!("arith.constant {pitch} : index"));
            let at = b.line(format!("arith.muli {row}, {words} : index"));
            let at = b.line(format!("arith.addi {at}, {col} : index"));
            let _ = writeln!(
                b.text,
                "        memref.store {word}, %stage[{at}] : memref<{}xi32, #gpu.address_space<workgroup>>",
                rows * pitch
            );
            return None;
        }
        let at = b.line(format!("arith.muli {i}, %n : index"));
        let at = b.line(format!("arith.addi {at}, {j} : index"));
        if unit == 4 {
            let word = encode_word(b, &q);
            let c4 = b.line("arith.constant 4 : index".into());
            let at = b.line(format!("arith.divui {at}, {c4} : index"));
            let _ = writeln!(b.text, "        memref.store {word}, %q{slot}[{at}] : memref<?xi32>");
        } else {
            let zero = b.constant(0.0);
            let pair = encode_pair(b, &q[0], &zero);
            let byte = b.line(format!("arith.trunci {pair} : i16 to i8"));
            let _ = writeln!(b.text, "        memref.store {byte}, %a{slot}[{at}] : memref<?xi8>");
        }
        None
    });
    if staged {
        // Warp w writes the tile's rows w, w + 8, …, a lane a word of each.
        let _ = write!(
            b.text,
            "      gpu.barrier\n      %stage_pitch = arith.constant {pitch} : index\n      %c4s = arith.constant 4 : index\n      %row_end = arith.subi %i1, %i0 : index\n      %width = arith.subi %j1, %j0 : index\n      %words = arith.divui %width, %c4s : index\n      %word0 = arith.divui %j0, %c4s : index\n      %n_words = arith.divui %n, %c4s : index\n      scf.for %r = %warp to %row_end step %wpb {{\n        %i_out = arith.addi %i0, %r : index\n        %from = arith.muli %r, %stage_pitch : index\n        %to_row = arith.muli %i_out, %n_words : index\n        %to = arith.addi %to_row, %word0 : index\n        scf.for %w = %lane to %words step %c32 {{\n          %sat_w = arith.addi %from, %w : index\n          %word = memref.load %stage[%sat_w] : memref<{}xi32, #gpu.address_space<workgroup>>\n          %qat = arith.addi %to, %w : index\n          memref.store %word, %q{slot}[%qat] : memref<?xi32>\n        }}\n      }}\n",
            rows * pitch
        );
    }
    // The scale's place (`scale_index`): M-major for one-row groups, else row-major.
    let (outer, stride, inner) = if rows == 1 { ("%gc", gm, "%gr") } else { ("%gr", gn.next_multiple_of(4), "%gc") };
    let _ = write!(
        b.text,
        "      %first_thread = arith.cmpi eq, %tid, %c0 : index\n      scf.if %first_thread {{\n      %sstride = arith.constant {stride} : index\n      %souter = arith.muli {outer}, %sstride : index\n      %sat = arith.addi %souter, {inner} : index\n      memref.store {s}, %s{slot}[%sat] : memref<?xf32>\n      }}\n      }}\n"
    );
    let params = params(source_types(offsets.is_some(), source));
    let stage = if staged {
        format!(", %stage : memref<{}xi32, #gpu.address_space<workgroup>>", rows * pitch)
    } else {
        String::new()
    };
    let mlir = format!(
        "module attributes {{gpu.container_module}} {{\n  gpu.module @{name} [{TARGET}] {{\n    gpu.func @{name}({params}) workgroup(%shared : memref<{WARPS}xf32, #gpu.address_space<workgroup>>{stage}) kernel {{\n{}      gpu.return\n    }}\n  }}\n}}\n",
        b.text
    );
    let args = inputs.iter().copied().chain([out]).collect();
    Emitted { mlir, grid: groups.max(1) as u32, block: (32 * WARPS) as u32, args, zeroed: false }
}

/// Columns of the groups [`block_tiles_kernel`] takes: a warp's 32 lanes, four each.
const BLOCK_COLS: usize = 128;

/// Where a quantised value's elements come from: the result [m, n] (`n` a multiple of 4), x
/// [m, width] or, transposed, [width, m] (a stack of matrices of `batch_rows` result rows each,
/// each transposed); the result's columns past `width` are zero.
#[derive(Clone, Copy)]
struct Layout {
    m: usize,
    n: usize,
    width: usize,
    transpose: bool,
    batch_rows: usize,
}

/// `quantize` in `rows × 128` groups (rows a multiple of 32, up to 128; weight blocks): a
/// block of 256 threads per group reads it once into registers (`rows / 8` units of four
/// elements a thread, all loads issued before the first use, lanes along x's contiguous
/// axis), takes its amax through shuffles and shared memory, and stores the E4M3 words. Not
/// transposed, a lane's unit is four consecutive elements of a result row, stored as one word
/// (a warp's row of the group is 128 contiguous bytes); transposed, it is four consecutive
/// result columns of one result row (four rows of x), its word staged in shared memory so
/// that the group's rows go out whole. (The general kernel read each group twice, the second
/// time from memory again once the groups in flight outgrew L2: 55% of copy bandwidth.)
fn block_tiles_kernel(name: &str, layout: Layout, rows: usize, x: u32, out: u32) -> Emitted {
    let Layout { m, n, width, transpose, batch_rows } = layout;
    let (gm, gn) = (m.div_ceil(rows), n.div_ceil(BLOCK_COLS));
    let words = BLOCK_COLS / 4;
    // The staged group's rows, one word longer than its 32 words: a warp's stores of one word
    // column fall in distinct banks.
    let pitch = words + 1;
    let mut b = Body::new();
    let _ = write!(
        b.text,
        "      %m = arith.constant {m} : index\n      %n = arith.constant {n} : index\n      %c{pitch} = arith.constant {pitch} : index\n      %gm = arith.constant {gm} : index\n      %group_rows = arith.constant {rows} : index\n      %group_cols = arith.constant {BLOCK_COLS} : index\n      %gr = arith.remui %bid, %gm : index\n      %gc = arith.divui %bid, %gm : index\n      %i0 = arith.muli %gr, %group_rows : index\n      %j0 = arith.muli %gc, %group_cols : index\n      %width = arith.constant {width} : index\n"
    );
    views(&mut b, 1, m, n, rows, BLOCK_COLS);
    if transpose {
        // The group's matrix of the stack: its first result row and where its x begins.
        let _ = write!(
            b.text,
            "      %batch_rows = arith.constant {batch_rows} : index\n      %matrix = arith.divui %i0, %batch_rows : index\n      %matrix_row = arith.muli %matrix, %batch_rows : index\n      %matrix_size = arith.constant {} : index\n      %matrix_at = arith.muli %matrix, %matrix_size : index\n",
            batch_rows * width
        );
    }
    // Unit k of a lane: result row i, result columns j..j+4. Transposed, the warps take the
    // group's word columns in turns (`turns` of them) for each 32 result rows, a lane a row.
    let turns = words / TILE_WARPS;
    let unit = |b: &mut Body, k: usize| -> (String, String) {
        if transpose {
            let (a, u) = (TILE_WARPS * (k % turns), 32 * (k / turns));
            let a = b.line(format!("arith.constant {a} : index"));
            let col = b.line(format!("arith.addi %warp, {a} : index"));
            let col = b.line(format!("arith.muli {col}, %c4 : index"));
            let u = b.line(format!("arith.constant {u} : index"));
            let row = b.line(format!("arith.addi %lane, {u} : index"));
            (row, col)
        } else {
            let step = b.line(format!("arith.constant {} : index", TILE_WARPS * k));
            let row = b.line(format!("arith.addi %warp, {step} : index"));
            (row, b.line("arith.muli %lane, %c4 : index".into()))
        }
    };
    let mut units = Vec::new();
    for k in 0..rows / TILE_WARPS {
        let (local_row, local_col) = unit(&mut b, k);
        let i = b.line(format!("arith.addi %i0, {local_row} : index"));
        let j = b.line(format!("arith.addi %j0, {local_col} : index"));
        let row_in = b.line(format!("arith.cmpi ult, {i}, %m : index"));
        let values: Vec<String> = (0..4)
            .map(|c| {
                let offset = b.line(format!("arith.constant {c} : index"));
                let jc = b.line(format!("arith.addi {j}, {offset} : index"));
                let in_x = b.line(format!("arith.cmpi ult, {jc}, %width : index"));
                let inside = b.line(format!("arith.andi {in_x}, {row_in} : i1"));
                let at = if transpose {
                    let within = b.line(format!("arith.subi {i}, %matrix_row : index"));
                    let stride = b.line(format!("arith.constant {batch_rows} : index"));
                    let at = b.line(format!("arith.muli {jc}, {stride} : index"));
                    let at = b.line(format!("arith.addi {at}, {within} : index"));
                    b.line(format!("arith.addi {at}, %matrix_at : index"))
                } else {
                    let at = b.line(format!("arith.muli {i}, %width : index"));
                    b.line(format!("arith.addi {at}, {jc} : index"))
                };
                let at = b.line(format!("arith.select {inside}, {at}, %c0 : index"));
                let v = b.line(format!("memref.load %a0[{at}] : memref<?xf32>"));
                let zero = b.constant(0.0);
                b.line(format!("arith.select {inside}, {v}, {zero} : f32"))
            })
            .collect();
        units.push((local_row, local_col, i, j, row_in, values));
    }
    let mut amax = b.constant(0.0);
    for (.., values) in &units {
        for v in values {
            let magnitude = magnitude(&mut b, v);
            amax = b.line(format!("arith.maximumf {amax}, {magnitude} : f32"));
        }
    }
    let reduction = b.fresh();
    let warp_amax = warp_reduce(&mut b.text, &reduction[1..], &amax, "arith.maximumf %acc, %y : f32");
    let _ = write!(
        b.text,
        "      %lane0 = arith.cmpi eq, %lane, %c0 : index\n      scf.if %lane0 {{\n      memref.store {warp_amax}, %shared[%warp] : memref<{TILE_WARPS}xf32, #gpu.address_space<workgroup>>\n      }}\n      gpu.barrier\n"
    );
    let mut amax = warp_amax;
    for w in 0..TILE_WARPS {
        let at = b.line(format!("arith.constant {w} : index"));
        let other =
            b.line(format!("memref.load %shared[{at}] : memref<{TILE_WARPS}xf32, #gpu.address_space<workgroup>>"));
        amax = b.line(format!("arith.maximumf {amax}, {other} : f32"));
    }
    let (s, inverse) = scale(&mut b, &amax);
    let stage_type = format!("memref<{}xi32, #gpu.address_space<workgroup>>", rows * pitch);
    for (local_row, local_col, i, j, row_in, values) in &units {
        let q: Vec<String> = values.iter().map(|v| b.line(format!("arith.mulf {v}, {inverse} : f32"))).collect();
        let word = encode_word(&mut b, &q);
        if transpose {
            let at = b.line(format!("arith.muli {local_row}, %c{pitch} : index"));
            let word_col = b.line(format!("arith.divui {local_col}, %c4 : index"));
            let at = b.line(format!("arith.addi {at}, {word_col} : index"));
            let _ = writeln!(b.text, "      memref.store {word}, %stage[{at}] : {stage_type}");
        } else {
            let col_in = b.line(format!("arith.cmpi ult, {j}, %n : index"));
            let stores = b.line(format!("arith.andi {row_in}, {col_in} : i1"));
            let at = b.line(format!("arith.muli {i}, %n : index"));
            let at = b.line(format!("arith.addi {at}, {j} : index"));
            let at = b.line(format!("arith.divui {at}, %c4 : index"));
            let _ = writeln!(
                b.text,
                "      scf.if {stores} {{\n        memref.store {word}, %q1[{at}] : memref<?xi32>\n      }}"
            );
        }
    }
    if transpose {
        // Warp w writes the group's rows w, w + 8, …, lane l its word l.
        let _ = write!(
            b.text,
            "      gpu.barrier\n      %wpb = arith.constant {TILE_WARPS} : index\n      %n_words = arith.constant {} : index\n      %word0 = arith.divui %j0, %c4 : index\n      %out_col = arith.addi %word0, %lane : index\n      %out_j = arith.muli %out_col, %c4 : index\n      %col_in = arith.cmpi ult, %out_j, %n : index\n      scf.for %r = %warp to %group_rows step %wpb {{\n        %out_i = arith.addi %i0, %r : index\n        %out_row_in = arith.cmpi ult, %out_i, %m : index\n        %out_in = arith.andi %out_row_in, %col_in : i1\n        scf.if %out_in {{\n          %from_row = arith.muli %r, %c{pitch} : index\n          %from = arith.addi %from_row, %lane : index\n          %word = memref.load %stage[%from] : {stage_type}\n          %to_row = arith.muli %out_i, %n_words : index\n          %to = arith.addi %to_row, %out_col : index\n          memref.store %word, %q1[%to] : memref<?xi32>\n        }}\n      }}\n",
            n / 4
        );
    }
    // The scale (`scale_index`: row-major over the groups, rows padded to 4 scales).
    let _ = write!(
        b.text,
        "      %first_thread = arith.cmpi eq, %tid, %c0 : index\n      scf.if %first_thread {{\n      %sstride = arith.constant {} : index\n      %souter = arith.muli %gr, %sstride : index\n      %sat = arith.addi %souter, %gc : index\n      memref.store {s}, %s1[%sat] : memref<?xf32>\n      }}\n",
        gn.next_multiple_of(4)
    );
    let mut workgroup = format!("%shared : memref<{TILE_WARPS}xf32, #gpu.address_space<workgroup>>");
    if transpose {
        let _ = write!(workgroup, ", %stage : {stage_type}");
    }
    let mlir = tile_module(name, &b.text, vec!["f32"], &workgroup);
    Emitted { mlir, grid: (gm * gn).max(1) as u32, block: (32 * TILE_WARPS) as u32, args: vec![x, out], zeroed: false }
}

/// x's `count` (1 or 2) elements from (`row`, `column`) of its rows of `%m` where `inside`,
/// else 0 (the load then reads row 0): two as one 8-byte load.
fn elements_or_zero(
    b: &mut Body,
    row: &str,
    column: &str,
    inside: &str,
    source: ExpertRows,
    count: usize,
) -> Vec<String> {
    let row = b.line(format!("arith.select {inside}, {row}, %c0 : index"));
    let (row, gate) = match source {
        ExpertRows::Permuted { k } | ExpertRows::UnpermutedGrad { k } => {
            let position = b.line(format!("memref.load %a2[{row}] : memref<?xi32>"));
            let position = b.line(format!("arith.index_cast {position} : i32 to index"));
            let gate = matches!(source, ExpertRows::UnpermutedGrad { .. })
                .then(|| b.line(format!("memref.load %a3[{position}] : memref<?xf32>")));
            let k = b.line(format!("arith.constant {k} : index"));
            (b.line(format!("arith.divui {position}, {k} : index")), gate)
        }
        ExpertRows::Stored | ExpertRows::SwiGlu => (row, None),
    };
    let at = b.line(format!("arith.muli {row}, %m : index"));
    let at = b.line(format!("arith.addi {at}, {column} : index"));
    let load = |b: &mut Body, slot: usize| -> Vec<String> {
        if count == 1 {
            return vec![b.line(format!("memref.load %a{slot}[{at}] : memref<?xf32>"))];
        }
        let v = b.line(format!(
            "vector.load %a{slot}[{at}] {{alignment = {} : i64}} : memref<?xf32>, vector<{count}xf32>",
            4 * count
        ));
        (0..count).map(|e| b.line(format!("vector.extract {v}[{e}] : f32 from vector<{count}xf32>"))).collect()
    };
    let xs = load(b, 0);
    let ys = matches!(source, ExpertRows::SwiGlu).then(|| load(b, 2));
    let zero = b.constant(0.0);
    (0..count)
        .map(|e| {
            let x = match (&ys, &gate) {
                (Some(ys), _) => b.op(&Op::SwiGlu, &[xs[e].clone(), ys[e].clone()]).expect("swiglu is generated"),
                (_, Some(gate)) => b.line(format!("arith.mulf {gate}, {} : f32", xs[e])),
                _ => xs[e].clone(),
            };
            b.line(format!("arith.select {inside}, {x}, {zero} : f32"))
        })
        .collect()
}

/// The element types of a quantisation's inputs: x, and by expert the offsets and what
/// `source` reads beside x (the order and the gates, or SwiGLU's second operand).
fn source_types(by_expert: bool, source: ExpertRows) -> Vec<&'static str> {
    let also: &[&str] = match source {
        ExpertRows::Stored => &[],
        ExpertRows::Permuted { .. } => &["i32"],
        ExpertRows::UnpermutedGrad { .. } => &["i32", "f32"],
        ExpertRows::SwiGlu => &["f32"],
    };
    ["f32"].into_iter().chain(by_expert.then_some("i32")).chain(also.iter().copied()).collect()
}

/// The kernel's parameters: its inputs of element types `inputs`, then the FP8 output.
fn params(inputs: Vec<&str>) -> String {
    let slots = inputs.into_iter().chain(["i8"]).enumerate();
    slots.map(|(k, t)| format!("%a{k}: memref<?x{t}>")).collect::<Vec<_>>().join(", ")
}

/// By expert: which expert's rows the group's columns j0.. hold, each expert's columns
/// starting where the previous one's, rounded up to whole `tile`s, ended. Every warp finds
/// it on its own, 32 experts at a time, a lane each: the lanes' padded lengths summed by a
/// scan of shuffles give each expert's columns, and the one lane whose columns hold j0 hands
/// its expert over through a sum of shuffles. (A walk over the experts one after another kept
/// every block waiting on 32 dependent loads before its first read of x.) Defines
/// `%first_column` (the expert's first), `%first_row` and `%end_row` (its rows of x, the
/// offsets `%a1`), all 0 where the group lies past the last expert.
fn expert_of_group(b: &mut Body, experts: usize, tile: usize) {
    let _ = write!(
        b.text,
        "      %experts = arith.constant {experts} : index\n      %tile_less = arith.constant {} : i32\n      %tile = arith.constant {tile} : i32\n      %lane_i32 = arith.index_cast %lane : index to i32\n      %zero_i32 = arith.constant 0 : i32\n      %j0_i64 = arith.index_cast %j0 : index to i64\n",
        tile - 1
    );
    let (mut start, mut first_column, mut first_row, mut end_row) =
        ("%zero_i32".to_string(), "%zero_i32".to_string(), "%zero_i32".to_string(), "%zero_i32".to_string());
    for chunk in 0..experts.div_ceil(32) {
        let base = b.line(format!("arith.constant {} : index", 32 * chunk));
        let e = b.line(format!("arith.addi %lane, {base} : index"));
        let valid = b.line(format!("arith.cmpi ult, {e}, %experts : index"));
        let e = b.line(format!("arith.select {valid}, {e}, %c0 : index"));
        let e1 = b.line(format!("arith.addi {e}, %c1 : index"));
        let o0 = b.line(format!("memref.load %a1[{e}] : memref<?xi32>"));
        let o1 = b.line(format!("memref.load %a1[{e1}] : memref<?xi32>"));
        let len = b.line(format!("arith.subi {o1}, {o0} : i32"));
        let len = b.line(format!("arith.addi {len}, %tile_less : i32"));
        let tiles = b.line(format!("arith.divui {len}, %tile : i32"));
        let padded = b.line(format!("arith.muli {tiles}, %tile : i32"));
        let padded = b.line(format!("arith.select {valid}, {padded}, %zero_i32 : i32"));
        let mut scan = padded.clone();
        for d in [1, 2, 4, 8, 16] {
            let offset = b.line(format!("arith.constant {d} : i32"));
            let from = b.fresh();
            let _ = writeln!(b.text, "      {from}, {from}_ok = gpu.shuffle up {scan}, {offset}, %w32 : i32");
            let has = b.line(format!("arith.cmpi uge, %lane_i32, {offset} : i32"));
            let from = b.line(format!("arith.select {has}, {from}, %zero_i32 : i32"));
            scan = b.line(format!("arith.addi {scan}, {from} : i32"));
        }
        let end = b.line(format!("arith.addi {start}, {scan} : i32"));
        let begin = b.line(format!("arith.subi {end}, {padded} : i32"));
        let begin_i64 = b.line(format!("arith.extui {begin} : i32 to i64"));
        let end_i64 = b.line(format!("arith.extui {end} : i32 to i64"));
        let from = b.line(format!("arith.cmpi uge, %j0_i64, {begin_i64} : i64"));
        let before = b.line(format!("arith.cmpi ult, %j0_i64, {end_i64} : i64"));
        let here = b.line(format!("arith.andi {from}, {before} : i1"));
        let here = b.line(format!("arith.andi {here}, {valid} : i1"));
        for (sum, value) in [(&mut first_column, &begin), (&mut first_row, &o0), (&mut end_row, &o1)] {
            let mine = b.line(format!("arith.select {here}, {value}, %zero_i32 : i32"));
            *sum = b.line(format!("arith.addi {sum}, {mine} : i32"));
        }
        let last = b.line("arith.constant 31 : i32".into());
        let total = b.fresh();
        let _ = writeln!(b.text, "      {total}, {total}_ok = gpu.shuffle idx {scan}, {last}, %w32 : i32");
        start = b.line(format!("arith.addi {start}, {total} : i32"));
    }
    for (name, lanes) in [("first_column", first_column), ("first_row", first_row), ("end_row", end_row)] {
        let mut sum = lanes;
        for d in [16, 8, 4, 2, 1] {
            let offset = b.line(format!("arith.constant {d} : i32"));
            let other = b.fresh();
            let _ = writeln!(b.text, "      {other}, {other}_ok = gpu.shuffle xor {sum}, {offset}, %w32 : i32");
            sum = b.line(format!("arith.addi {sum}, {other} : i32"));
        }
        let _ = writeln!(b.text, "      %{name} = arith.index_cast {sum} : i32 to index");
    }
}

/// Warps of the tile kernels' blocks.
const TILE_WARPS: usize = 8;

/// Result rows (x's columns) of a [`column_tiles_kernel`] block: two adjacent ones a lane (an
/// 8-byte load). With 32 (a load a lane) its blocks waited on memory's latency more than they
/// moved: a quarter of the copy's bandwidth where x's rows are gathered.
const COLUMN_TILE_ROWS: usize = 64;

/// The kernel's MLIR around `body`, on x, the offsets if any, and the output (`%a0`, …), with
/// shared memory as `workgroup`'s attributions say (none where it is empty).
fn tile_module(name: &str, body: &str, inputs: Vec<&str>, workgroup: &str) -> String {
    let params = params(inputs);
    let workgroup = if workgroup.is_empty() { String::new() } else { format!(" workgroup({workgroup})") };
    format!(
        "module attributes {{gpu.container_module}} {{\n  gpu.module @{name} [{TARGET}] {{\n    gpu.func @{name}({params}){workgroup} kernel {{\n      %tid = gpu.thread_id x\n      %bid = gpu.block_id x\n      %c0 = arith.constant 0 : index\n      %c1 = arith.constant 1 : index\n      %c4 = arith.constant 4 : index\n      %c32 = arith.constant 32 : index\n      %w32 = arith.constant 32 : i32\n      %warp = arith.divui %tid, %c32 : index\n      %lane = arith.remui %tid, %c32 : index\n{body}      gpu.return\n    }}\n  }}\n}}\n"
    )
}

/// `quantize` of x [m, n] in 1×`cols` tiles along its rows: a warp per row, each lane
/// reading four elements (16 bytes) a turn and storing them as one word, a tile's amax through
/// shuffles among its lanes.
fn row_tiles_kernel(name: &str, m: usize, n: usize, width: usize, cols: usize, x: u32, out: u32) -> Emitted {
    let mut b = Body::new();
    let _ = write!(
        b.text,
        "      %wpb = arith.constant {TILE_WARPS} : index\n      %first = arith.muli %bid, %wpb : index\n      %row = arith.addi %first, %warp : index\n      %rows = arith.constant {m} : index\n      %n = arith.constant {n} : index\n      %active = arith.cmpi ult, %row, %rows : index\n      scf.if %active {{\n"
    );
    views(&mut b, 1, m, n, 1, cols);
    let _ = write!(
        b.text,
        "      %lane4 = arith.muli %lane, %c4 : index\n      %c128 = arith.constant 128 : index\n      %n_up = arith.constant {} : index\n      %width = arith.constant {width} : index\n      %base = arith.muli %row, %width : index\n      scf.for %col = %lane4 to %n_up step %c128 {{\n",
        n.next_multiple_of(128)
    );
    let inside = b.line("arith.cmpi ult, %col, %n : index".into());
    // x's row is `width` long (the result's rest is zero); width is a multiple of 4 or the
    // elements are read one by one.
    let values: Vec<String> = (0..4)
        .map(|c| {
            let offset = b.line(format!("arith.constant {c} : index"));
            let j = b.line(format!("arith.addi %col, {offset} : index"));
            let in_x = b.line(format!("arith.cmpi ult, {j}, %width : index"));
            let safe = b.line(format!("arith.select {in_x}, {j}, %c0 : index"));
            let at = b.line(format!("arith.addi %base, {safe} : index"));
            let v = b.line(format!("memref.load %a0[{at}] : memref<?xf32>"));
            let zero = b.constant(0.0);
            b.line(format!("arith.select {in_x}, {v}, {zero} : f32"))
        })
        .collect();
    store_row_group(&mut b, 1, &values, "%row", "%col", Some(&inside), cols);
    let _ = write!(b.text, "      }}\n      }}\n");
    let mlir = tile_module(name, &b.text, vec!["f32"], "");
    Emitted {
        mlir,
        grid: m.div_ceil(TILE_WARPS).max(1) as u32,
        block: (32 * TILE_WARPS) as u32,
        args: vec![x, out],
        zeroed: false,
    }
}

/// `quantize` of xᵀ (x [n, m]) into [m, n] in 1×`cols` tiles along the result's rows (x's
/// columns), or `quantize_by_expert` (`offsets`: its value and the experts): a block per
/// [`COLUMN_TILE_ROWS`] result rows (m even) and one column group, transposed through shared
/// memory. First the lanes read along x's contiguous columns (the result's rows), two each,
/// the warps taking turns along its rows, x read once; then each warp quantises whole result rows, a lane a word of four E4M3 bytes,
/// so that a row's group goes out as one contiguous store (reading x's columns and storing
/// words 32 result rows apart left 7 of 8 bytes of every written sector unused).
#[allow(clippy::too_many_arguments)]
fn column_tiles_kernel(
    name: &str,
    m: usize,
    n: usize,
    width: usize,
    cols: usize,
    inputs: &[u32],
    by_expert: Option<(usize, ExpertRows)>,
    out: u32,
) -> Emitted {
    let slot = inputs.len();
    let source = by_expert.map_or(ExpertRows::Stored, |(_, source)| source);
    let (row_blocks, gn) = (m.div_ceil(COLUMN_TILE_ROWS), n.div_ceil(cols));
    // The block's tile of the result, [64 rows][cols], skewed so that neither side meets a
    // bank twice: element (r, c) at r·pitch + ⌊r/32⌋ + c + ⌊c/32⌋, the pitch odd. The writes
    // (a column, the lanes' rows 2l and 2l + 1) then differ in r·pitch mod 32 or, 16 lanes
    // apart, by ⌊r/32⌋; the reads (a row, lane l's columns 4l + k) differ in 4l mod 32 or,
    // 8 lanes apart, by ⌊c/32⌋. (A pitch of cols + 1 alone left two lanes to a bank in the
    // writes and four in the reads: ncu, session 35.)
    let pitch = column_tile_pitch(cols);
    let shared = COLUMN_TILE_ROWS * pitch;
    let per_lane = COLUMN_TILE_ROWS / 32;
    let mut b = Body::new();
    let _ = write!(
        b.text,
        "      %m = arith.constant {m} : index\n      %rows = arith.constant {m} : index\n      %n = arith.constant {n} : index\n      %cols = arith.constant {cols} : index\n      %pitch = arith.constant {pitch} : index\n      %wpb = arith.constant {TILE_WARPS} : index\n      %tile_rows = arith.constant {COLUMN_TILE_ROWS} : index\n      %per_lane = arith.constant {per_lane} : index\n      %row_blocks = arith.constant {row_blocks} : index\n      %rb = arith.remui %bid, %row_blocks : index\n      %gc = arith.divui %bid, %row_blocks : index\n      %i0 = arith.muli %rb, %tile_rows : index\n      %lane_rows = arith.muli %lane, %per_lane : index\n      %i = arith.addi %i0, %lane_rows : index\n      %lane_in = arith.cmpi ult, %i, %m : index\n      %j0 = arith.muli %gc, %cols : index\n      %je = arith.addi %j0, %cols : index\n      %j1 = arith.minui %je, %n : index\n      %lane_row_at = arith.muli %lane_rows, %pitch : index\n      %lane_skew = arith.divui %lane_rows, %c32 : index\n      %lane_at = arith.addi %lane_row_at, %lane_skew : index\n"
    );
    views(&mut b, slot, m, n, 1, cols);
    if let Some((experts, _)) = by_expert {
        expert_of_group(&mut b, experts, cols);
    }
    // x's element for the result's row i, column j = j0 + local (zero outside x or, by
    // expert, past the expert's rows), into the tile: warp w takes the columns w, w + 8, …
    // and issues all its loads before its first store, so that they are in flight together
    // (one at a time, each waited on memory's latency: a quarter of the copy's bandwidth).
    let mut loaded = Vec::new();
    for turn in 0..cols.div_ceil(TILE_WARPS) {
        let step = b.line(format!("arith.constant {} : index", turn * TILE_WARPS));
        let local = b.line(format!("arith.addi %warp, {step} : index"));
        let j = b.line(format!("arith.addi %j0, {local} : index"));
        let in_group = b.line(format!("arith.cmpi ult, {j}, %j1 : index"));
        let (row, inside) = if by_expert.is_some() {
            let from = b.line(format!("arith.subi {j}, %first_column : index"));
            let row = b.line(format!("arith.addi {from}, %first_row : index"));
            let in_expert = b.line(format!("arith.cmpi ult, {row}, %end_row : index"));
            (row, b.line(format!("arith.andi {in_group}, {in_expert} : i1")))
        } else {
            let rows = b.line(format!("arith.constant {width} : index"));
            let in_x = b.line(format!("arith.cmpi ult, {j}, {rows} : index"));
            (j, b.line(format!("arith.andi {in_group}, {in_x} : i1")))
        };
        let inside = b.line(format!("arith.andi {inside}, %lane_in : i1"));
        let column = b.line(format!("arith.select {inside}, %i, %c0 : index"));
        loaded.push((turn, local, elements_or_zero(&mut b, &row, &column, &inside, source, per_lane)));
    }
    for (turn, local, values) in loaded {
        let at = b.line(format!("arith.addi %lane_at, {local} : index"));
        // The lane's rows 2l + e share ⌊r/32⌋ (lane_at's), the turn's columns ⌊c/32⌋ (the warp
        // adds less than 8 to a multiple of 8).
        let column_skew = turn * TILE_WARPS / 32;
        let stores: Vec<String> = (values.iter().enumerate())
            .map(|(e, v)| {
                let offset = b.line(format!("arith.constant {} : index", e * pitch + column_skew));
                let at = b.line(format!("arith.addi {at}, {offset} : index"));
                format!("memref.store {v}, %shared[{at}] : memref<{shared}xf32, #gpu.address_space<workgroup>>")
            })
            .collect();
        let stores = stores.join("\n        ");
        if (turn + 1) * TILE_WARPS > cols {
            // The last turn's columns may pass the group's.
            let fits = b.line(format!("arith.cmpi ult, {local}, %cols : index"));
            let _ = writeln!(b.text, "        scf.if {fits} {{\n        {stores}\n        }}");
        } else {
            let _ = writeln!(b.text, "        {stores}");
        }
    }
    let _ = writeln!(b.text, "      gpu.barrier");
    // Warp w quantises the tile's rows w, w + 8, …: lane l the four columns from 4l.
    let _ = writeln!(b.text, "      scf.for %local_row = %warp to %tile_rows step %wpb {{");
    let _ = writeln!(b.text, "        %row = arith.addi %i0, %local_row : index");
    let row_in = b.line("arith.cmpi ult, %row, %m : index".into());
    let local_col = b.line("arith.muli %lane, %c4 : index".into());
    let col = b.line(format!("arith.addi %j0, {local_col} : index"));
    let col_in = b.line(format!("arith.cmpi ult, {col}, %j1 : index"));
    let stores = b.line(format!("arith.andi {row_in}, {col_in} : i1"));
    // Row r's start r·pitch + ⌊r/32⌋, lane l's columns 4l.. at 4l + ⌊l/8⌋ past it.
    let row_at = b.line("arith.muli %local_row, %pitch : index".into());
    let row_skew = b.line("arith.divui %local_row, %c32 : index".into());
    let eight = b.line("arith.constant 8 : index".into());
    let column_skew = b.line(format!("arith.divui %lane, {eight} : index"));
    let base = [row_skew, local_col.clone(), column_skew]
        .iter()
        .fold(row_at, |at, part| b.line(format!("arith.addi {at}, {part} : index")));
    let values: Vec<String> = (0..4)
        .map(|c| {
            let offset = b.line(format!("arith.constant {c} : index"));
            let at = b.line(format!("arith.addi {base}, {offset} : index"));
            // Lanes past the group read inside the tile (their columns wrap into the next
            // rows) and store nothing.
            let limit = b.line(format!("arith.constant {} : index", shared - 1));
            let at = b.line(format!("arith.minui {at}, {limit} : index"));
            b.line(format!("memref.load %shared[{at}] : memref<{shared}xf32, #gpu.address_space<workgroup>>"))
        })
        .collect();
    store_row_group(&mut b, slot, &values, "%row", &col, Some(&stores), cols);
    let _ = writeln!(b.text, "      }}");
    let workgroup = format!("%shared : memref<{shared}xf32, #gpu.address_space<workgroup>>");
    let mlir = tile_module(name, &b.text, source_types(by_expert.is_some(), source), &workgroup);
    let args = inputs.iter().copied().chain([out]).collect();
    Emitted { mlir, grid: (row_blocks * gn).max(1) as u32, block: (32 * TILE_WARPS) as u32, args, zeroed: false }
}

/// The row pitch (in floats) of [`column_tiles_kernel`]'s skewed tile `cols` wide: odd, and
/// room for each row's ⌊c/32⌋.
fn column_tile_pitch(cols: usize) -> usize {
    (cols + cols.div_ceil(32)) | 1
}

/// Rows of x each warp of [`both_ways_kernel`] keeps in registers (a block's warps: a tile).
const BOTH_WAYS_ROWS: usize = BLOCK_COLS / TILE_WARPS;

/// One [`both_ways_kernel`]'s quantisations of x [m, w]: its rows into [m, n] (n ≥ w, the rest
/// zero) and its columns into [w, m], both in 1×`cols` tiles.
#[derive(Clone, Copy, Debug)]
pub struct BothWays {
    pub m: usize,
    pub w: usize,
    pub n: usize,
    pub cols: usize,
}

/// The [`BothWays`] of `rows` (`quantize` of x in 1×`cols` tiles) and `columns` (`quantize`
/// of xᵀ in 1×`cols` tiles) of the same x, where one kernel does both: `cols` whole warps'
/// rows dividing 128, the rows' result [m, n] at least as wide as x, m whole blocks of 128
/// rows, w and n whole words.
pub fn both_ways(rows: &Node, columns: &Node, x: &Node) -> Option<BothWays> {
    let (m, n) = matrix(rows);
    let w = *x.shape.last()?;
    let cols = match (&rows.op, &columns.op) {
        (
            Op::Quantize { rows: 1, cols, transpose: false },
            Op::Quantize { rows: 1, cols: columns_cols, transpose: true },
        ) if cols == columns_cols => *cols,
        _ => return None,
    };
    let fits = cols.is_multiple_of(BOTH_WAYS_ROWS)
        && BLOCK_COLS.is_multiple_of(cols)
        && rows.shape.len() == 2
        && columns.shape == [w, m]
        && m * w == x.shape.iter().product::<usize>()
        && m.is_multiple_of(BLOCK_COLS)
        && w.is_multiple_of(4)
        && n.is_multiple_of(4)
        && n >= w;
    fits.then_some(BothWays { m, w, n, cols })
}

/// `quantize` of x [m, w] in 1×`cols` tiles along its rows into [m, n] (past w zero) and of
/// xᵀ along its columns into [w, m] (see [`both_ways`]), reading x once (a kernel
/// each read it twice). A block per 128 rows × 128 columns: warp v keeps rows 16v.. in
/// registers, lane l the four columns from 4l (16-byte loads, all in flight together); each
/// row's tiles go out as the row kernel's do (a tile's amax through shuffles, a word per lane);
/// each column's amax meets over the warps of its tile in shared memory, and a lane stores its
/// 16 rows of each of its columns as one 16-byte vector of xᵀ's row.
pub fn both_ways_kernel(name: &str, shape: BothWays, x: u32, outputs: [u32; 2]) -> Emitted {
    let BothWays { m, w, n, cols } = shape;
    let column_tiles = n.div_ceil(BLOCK_COLS);
    let shared = TILE_WARPS * BLOCK_COLS;
    let shared_type = format!("memref<{shared}xf32, #gpu.address_space<workgroup>>");
    let warps_per_tile = cols / BOTH_WAYS_ROWS;
    let mut b = Body::new();
    let _ = write!(
        b.text,
        "      %column_tiles = arith.constant {column_tiles} : index\n      %tile = arith.constant {BLOCK_COLS} : index\n      %ct = arith.remui %bid, %column_tiles : index\n      %rt = arith.divui %bid, %column_tiles : index\n      %i0 = arith.muli %rt, %tile : index\n      %j0 = arith.muli %ct, %tile : index\n      %lane4 = arith.muli %lane, %c4 : index\n      %j = arith.addi %j0, %lane4 : index\n      %width = arith.constant {w} : index\n      %in_x = arith.cmpi ult, %j, %width : index\n      %x_column = arith.select %in_x, %j, %c0 : index\n      %n = arith.constant {n} : index\n      %rows = arith.constant {m} : index\n      %in_rows = arith.cmpi ult, %j, %n : index\n      %warp_rows = arith.constant {BOTH_WAYS_ROWS} : index\n      %warp_first = arith.muli %warp, %warp_rows : index\n      %first_row = arith.addi %i0, %warp_first : index\n      %warps_per_tile = arith.constant {warps_per_tile} : index\n      %in_tile = arith.remui %warp, %warps_per_tile : index\n      %tile_warp = arith.subi %warp, %in_tile : index\n      %leads = arith.cmpi eq, %in_tile, %c0 : index\n      %cols = arith.constant {cols} : index\n      %group_col = arith.divui %first_row, %cols : index\n"
    );
    views(&mut b, 1, m, n, 1, cols);
    views(&mut b, 2, w, m, 1, cols);
    // x's rows first_row + r, its columns j.. (zero past w): all loads before any use.
    let zero = b.constant(0.0);
    let mut rows = Vec::new();
    for r in 0..BOTH_WAYS_ROWS {
        let offset = b.line(format!("arith.constant {r} : index"));
        let row = b.line(format!("arith.addi %first_row, {offset} : index"));
        let at = b.line(format!("arith.muli {row}, %width : index"));
        let at = b.line(format!("arith.addi {at}, %x_column : index"));
        let v = b.line(format!("vector.load %a0[{at}] {{alignment = 16 : i64}} : memref<?xf32>, vector<4xf32>"));
        rows.push((row, v));
    }
    let values: Vec<Vec<String>> = rows
        .iter()
        .map(|(_, v)| {
            (0..4)
                .map(|c| {
                    let e = b.line(format!("vector.extract {v}[{c}] : f32 from vector<4xf32>"));
                    b.line(format!("arith.select %in_x, {e}, {zero} : f32"))
                })
                .collect()
        })
        .collect();
    for ((row, _), row_values) in rows.iter().zip(&values) {
        store_row_group(&mut b, 1, row_values, row, "%j", Some("%in_rows"), cols);
    }
    // Each column's amax over the warp's rows, then over the warps of its tile.
    let _ = writeln!(
        b.text,
        "      %part_at = arith.muli %warp, %tile : index\n      %part_at_lane = arith.addi %part_at, %lane4 : index\n      %tile_parts = arith.muli %tile_warp, %tile : index\n      %tile_parts_lane = arith.addi %tile_parts, %lane4 : index"
    );
    for c in 0..4 {
        let mut amax = b.constant(0.0);
        for row_values in &values {
            let m = magnitude(&mut b, &row_values[c]);
            amax = b.line(format!("arith.maximumf {amax}, {m} : f32"));
        }
        let offset = b.line(format!("arith.constant {c} : index"));
        let at = b.line(format!("arith.addi %part_at_lane, {offset} : index"));
        let _ = writeln!(b.text, "      memref.store {amax}, %parts[{at}] : {shared_type}");
    }
    let _ = writeln!(b.text, "      gpu.barrier");
    // xᵀ's rows j + c: this warp's 16 elements of each as four words, one vector store.
    let _ = writeln!(
        b.text,
        "      %column_first_word = arith.divui %first_row, %c4 : index\n      %words_per_row = arith.constant {} : index\n      %scale_first = arith.muli %group_col, %width : index\n      %scales_here = arith.andi %in_x, %leads : i1",
        m / 4
    );
    for c in 0..4 {
        let mut amax = b.constant(0.0);
        for v in 0..warps_per_tile {
            let at = b.line(format!("arith.constant {} : index", v * BLOCK_COLS + c));
            let at = b.line(format!("arith.addi %tile_parts_lane, {at} : index"));
            let part = b.line(format!("memref.load %parts[{at}] : {shared_type}"));
            amax = b.line(format!("arith.maximumf {amax}, {part} : f32"));
        }
        let (s, inverse) = scale(&mut b, &amax);
        let q: Vec<String> =
            values.iter().map(|row_values| b.line(format!("arith.mulf {}, {inverse} : f32", row_values[c]))).collect();
        let words: Vec<String> = q.chunks(4).map(|four| encode_word(&mut b, four)).collect();
        let mut vector = b.line("arith.constant dense<0> : vector<4xi32>".into());
        for (k, word) in words.iter().enumerate() {
            vector = b.line(format!("vector.insert {word}, {vector} [{k}] : i32 into vector<4xi32>"));
        }
        let offset = b.line(format!("arith.constant {c} : index"));
        let column = b.line(format!("arith.addi %j, {offset} : index"));
        let at = b.line(format!("arith.muli {column}, %words_per_row : index"));
        let at = b.line(format!("arith.addi {at}, %column_first_word : index"));
        let scale_at = b.line(format!("arith.addi %scale_first, {column} : index"));
        let _ = writeln!(
            b.text,
            "      scf.if %in_x {{\n        vector.store {vector}, %q2[{at}] {{alignment = 16 : i64}} : memref<?xi32>, vector<4xi32>\n      }}\n      scf.if %scales_here {{\n        memref.store {s}, %s2[{scale_at}] : memref<?xf32>\n      }}"
        );
    }
    let workgroup = format!("%parts : {shared_type}");
    let mlir = tile_module(name, &b.text, vec!["f32", "i8"], &workgroup);
    Emitted {
        mlir,
        grid: (m / BLOCK_COLS * column_tiles) as u32,
        block: (32 * TILE_WARPS) as u32,
        args: vec![x, outputs[0], outputs[1]],
        zeroed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`column_tiles_kernel`]'s skewed tile (element (r, c) at r·pitch + ⌊r/32⌋ + c + ⌊c/32⌋)
    /// fits its shared memory, and each warp's access meets 32 distinct banks: its writes (a
    /// column; lane l's rows 2l and 2l + 1, one at a time) and its reads (a row; lane l's
    /// columns 4l + k, one k at a time), for every row, column and k.
    #[test]
    fn the_column_tile_is_free_of_bank_conflicts() {
        for cols in [32, 64, 128] {
            let pitch = column_tile_pitch(cols);
            let at = |r: usize, c: usize| r * pitch + r / 32 + c + c / 32;
            assert!(at(COLUMN_TILE_ROWS - 1, cols - 1) < COLUMN_TILE_ROWS * pitch);
            let distinct = |addresses: Vec<usize>| {
                let banks: std::collections::HashSet<usize> = addresses.iter().map(|a| a % 32).collect();
                banks.len() == addresses.len()
            };
            let per_lane = COLUMN_TILE_ROWS / 32;
            for c in 0..cols {
                for e in 0..per_lane {
                    assert!(distinct((0..32).map(|l| at(per_lane * l + e, c)).collect()), "cols {cols}, column {c}");
                }
            }
            for r in 0..COLUMN_TILE_ROWS {
                for k in 0..4 {
                    let lanes = (0..32).filter(|l| 4 * l + k < cols);
                    assert!(distinct(lanes.map(|l| at(r, 4 * l + k)).collect()), "cols {cols}, row {r}");
                }
            }
        }
    }
}
