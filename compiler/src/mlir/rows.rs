//! Row kernels: the fused ops that work along the last axis. RMSNorm with its residual-add,
//! quantising and backward forms; softmax plain, masked and scaled, and its backward; the
//! loss's cross-entropy and its backward; SwiGLU's quantising and backward forms; the MoE
//! dispatch with quantisation. Each op is written as a row program ([`Program`]): how every
//! input is addressed (a row of its own, one row shared by all rows such as a norm weight, a
//! broadcast row such as the attention mask, the row an index picks as the dispatch does, one
//! value per row, or a row's label as a one-hot row), the reductions over the row it needs in
//! order, and what it writes per element: a value (or, where the kernel also holds the cast
//! that alone reads it, the value rounded to bf16, packed where its readers read it packed),
//! an FP8 value in 1×`cols` groups ([`super::fp8`]), or a sum over all rows (a norm weight's
//! gradient); or values per row from the reductions alone (a row's loss, and its max and sum
//! for the backward). Reductions that do not read one another share a pass over the row; a
//! softmax's max and sum are one reduction (online, [`Kind::Softmax`]), so a cross-entropy
//! reads its logits once, and its backward, given the forward's max and sum, once more.
//!
//! Warps own rows (four warps per block, each looping over rows when the launch holds fewer
//! warps than rows); a lane holds W = 4 consecutive elements (16-byte loads and stores) of
//! every chunk of 32·W elements. When a row's inputs fit in [`REGISTER_FLOATS`] registers per
//! lane they are read once and kept there for every pass (one pass over memory; an addend,
//! which only the writing pass reads, is not kept); otherwise
//! each pass reads them again (from memory once rows outgrow the caches: a cross-entropy's rows
//! of 32K logits). Reductions meet through warp shuffles; sums over
//! rows are kept per lane across the warp's rows, added up over the block's warps in shared
//! memory at the end and atomically into the zeroed output (streamed rows add theirs per row).

use super::emit::{kernel_input as input, Body, Emitted, TARGET};
use super::fp8;
use crate::fuse::kernels::Kernel;
use crate::graph::ir::{Function, Node, Op};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// Warps per block.
const WARPS: usize = 4;
/// Floats per lane a row may keep in registers (inputs, and the column sums carried): 192
/// leaves the rest of a kernel within 255 registers (ptxas: RMSNorm's backward over 2,048
/// columns, x and dy kept and the weight's column sums carried, 240 to 242, no spills; with
/// 128 it read x and dy twice).
const REGISTER_FLOATS: usize = 192;
/// Chunks of a row written out one by one (longer rows loop).
const MAX_UNROLLED_CHUNKS: usize = 32;
/// Blocks of a kernel that sums over rows: enough to fill an H100 twice, few enough that the
/// blocks' column sums are cheap to add up (measured: 528 slower when each warp added its own,
/// the atomics on a column waiting on one another; 396 no faster with the block's added once).
const COLUMN_SUM_BLOCKS: usize = 264;
/// Floats of a chunk's column partials, one set per warp; the shared buffer that adds them up
/// holds two.
const SUM_FLOATS: usize = WARPS * 32 * W;

/// How an input's row for output row `r` is found.
#[derive(Clone, Debug)]
enum Rows {
    /// Row r of its own.
    Own,
    /// Row r of its own that only the outputs read (a gradient added to): read in the pass
    /// that writes, so never kept in registers for a later pass.
    Addend,
    /// One row for every row (a weight over the last axis).
    Shared,
    /// Broadcast against the output's leading shape (an attention mask): the input's leading
    /// shape (as many axes as the output's, extent 1 where broadcast) and the output's.
    Broadcast { input: Vec<usize>, output: Vec<usize> },
    /// Row order[r] / k (the MoE dispatch, an embedding lookup with k = 1), `order` being the
    /// kernel's index input.
    Picked { k: usize },
    /// One value per row, element order[r] (a gate), read once and the same for every column.
    PickedScalar,
    /// One value per row, element r (a row's gradient), read once and the same for every column.
    PerRow,
    /// An index per row, element r (a label): per element, 1 in the column it names, else 0.
    OneHot,
}

/// A value of one element from the elements of the inputs there and the finished reductions.
type Term<'p> = Box<dyn Fn(&mut Body, &[String], &[String]) -> String + 'p>;
/// A value of one element from the elements of the inputs there.
type Elementwise<'p> = Box<dyn Fn(&mut Body, &[String]) -> String + 'p>;
/// What a reduction makes of the warp's totals (one, or a softmax's two), given the
/// reductions finished before it.
type Finish<'p> = Box<dyn Fn(&mut Body, &[String], &[String]) -> Vec<String> + 'p>;
/// A pass's work on one chunk: its column, its number when unrolled, the values carried.
type ChunkStep<'w, 'p, 'q> = dyn FnMut(&mut RowWriter<'p, 'q>, &str, Option<usize>, &[String]) -> Vec<String> + 'w;

/// A reduction over the row: its term per element (reading the first `reads` finished
/// values), and what it makes of the warp's total (values appended to the finished ones).
/// Consecutive reductions whose terms read only what was finished before the first of them
/// share one pass over the row.
struct Reduction<'p> {
    kind: Kind,
    reads: usize,
    term: Term<'p>,
    finish: Finish<'p>,
}

/// How a reduction combines its terms.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sum,
    /// The terms' max m and Σ e^(x − m) in one pass (online softmax): a partial (m, s) takes
    /// x as (m', s·e^(m − m') + e^(x − m')) with m' = max(m, x), and two partials meet the
    /// same way. (Two passes, the max then the sum, read a row that outgrows the caches from
    /// memory twice.)
    Softmax,
}

impl Kind {
    /// The f32 bits the partials start from (a softmax's two: m, s); the first is also the
    /// term that leaves a partial as it is.
    fn identities(self) -> &'static [&'static str] {
        match self {
            Kind::Sum => &["0x00000000"],
            Kind::Softmax => &["0xFF800000", "0x00000000"],
        }
    }

    /// The partial `acc` with `terms` added.
    fn add(self, b: &mut Body, acc: &[String], terms: &[String]) -> Vec<String> {
        match self {
            Kind::Sum => vec![terms.iter().fold(acc[0].clone(), |a, x| bin(b, "addf", &a, x))],
            Kind::Softmax => {
                let m = terms.iter().fold(acc[0].clone(), |a, x| bin(b, "maximumf", &a, x));
                let base = softmax_base(b, &m);
                let kept = rescaled(b, &acc[1], &acc[0], &base);
                let s = terms.iter().fold(kept, |s, x| {
                    let d = bin(b, "subf", x, &base);
                    let e = b.exp(&d);
                    bin(b, "addf", &s, &e)
                });
                vec![m, s]
            }
        }
    }

    /// Two partials as one.
    fn merge(self, b: &mut Body, x: &[String], y: &[String]) -> Vec<String> {
        match self {
            Kind::Sum => self.add(b, x, &y[..1]),
            Kind::Softmax => {
                let m = bin(b, "maximumf", &x[0], &y[0]);
                let base = softmax_base(b, &m);
                let sx = rescaled(b, &x[1], &x[0], &base);
                let sy = rescaled(b, &y[1], &y[0], &base);
                let s = bin(b, "addf", &sx, &sy);
                vec![m, s]
            }
        }
    }
}

/// The max that a softmax's terms are taken relative to: m, or 0 while m is −∞ (no finite
/// term yet), so that −∞ − m is −∞, not NaN.
fn softmax_base(b: &mut Body, m: &str) -> String {
    let minus_infinity = b.line("arith.constant 0xFF800000 : f32".into());
    let none = b.line(format!("arith.cmpf oeq, {m}, {minus_infinity} : f32"));
    let zero = b.constant(0.0);
    b.line(format!("arith.select {none}, {zero}, {m} : f32"))
}

/// A softmax partial's sum `s` (relative to `from`) relative to `base`: s·e^(from − base).
fn rescaled(b: &mut Body, s: &str, from: &str, base: &str) -> String {
    let d = bin(b, "subf", from, base);
    let e = b.exp(&d);
    bin(b, "mulf", s, &e)
}

enum Write {
    Element,
    /// An element rounded to bf16: stored packed, or as the f32 of the rounded value.
    Bf16 {
        packed: bool,
    },
    Fp8 {
        cols: usize,
    },
    ColumnSum,
    /// One value per row from the reductions alone (a row's loss).
    RowValue,
}

struct Output<'p> {
    value: u32,
    write: Write,
    term: Term<'p>,
}

/// One row op as a program over rows of `n` elements.
struct Program<'p> {
    n: usize,
    rows: usize,
    inputs: Vec<(u32, Rows)>,
    /// The index input that `Rows::Picked` reads.
    order: Option<u32>,
    reductions: Vec<Reduction<'p>>,
    outputs: Vec<Output<'p>>,
}

/// The type of the shared buffer in which a block's warps add up their column sums.
fn sum_buffer() -> String {
    format!("memref<{}xf32, #gpu.address_space<workgroup>>", 2 * SUM_FLOATS)
}

/// Whether this module writes `op`'s kernel: the ops that work along rows, but the routing
/// (its kernel is by index: `super::indexed`).
pub fn is_row_program(op: &Op) -> bool {
    op.works_along_rows() && !matches!(op, Op::Route { .. })
}

/// The row kernel of `node`, the first node of `kernel`; the second, where there is one,
/// casts its result to bf16 (`crate::fuse::kernels::cast_row_outputs`), which the kernel
/// writes instead, packed if it is in `packed`.
pub fn row_kernel(
    f: &Function,
    kernel: &Kernel,
    node: &Node,
    v: u32,
    packed: &HashSet<u32>,
) -> Result<Emitted, String> {
    let mut program = program(f, kernel, node, v)?;
    if let [_, cast] = kernel.nodes[..] {
        let output = (program.outputs.iter_mut())
            .find(|o| o.value == v && matches!(o.write, Write::Element))
            .ok_or_else(|| format!("`{}` writes no elements to cast", node.op.name()))?;
        output.value = cast;
        output.write = Write::Bf16 { packed: packed.contains(&cast) };
    }
    if !program.n.is_multiple_of(W) {
        return Err(format!("rows of {} elements (not a multiple of {W}) are not generated", program.n));
    }
    for o in &program.outputs {
        if let Write::Fp8 { cols } = o.write {
            let lanes = cols / W;
            if !cols.is_multiple_of(W) || !lanes.is_power_of_two() || lanes > 32 || !program.n.is_multiple_of(cols) {
                return Err(format!("FP8 groups of {cols} in rows of {} are not generated", program.n));
            }
        }
    }
    Ok(emit(&kernel.name, &program, |v| f.nodes[v as usize].dtype == crate::graph::ir::DType::I32))
}

/// The parts of fused op `v`'s tuple that are read (its `get` nodes), by position.
pub(super) fn parts(f: &Function, v: u32, count: usize) -> Vec<Option<u32>> {
    let mut parts = vec![None; count];
    for (i, n) in f.nodes.iter().enumerate() {
        if let (Op::Get(p), [a]) = (&n.op, n.args.as_slice()) {
            if a.0 == v {
                parts[*p] = Some(i as u32);
            }
        }
    }
    parts
}

fn last(shape: &[usize]) -> usize {
    *shape.last().unwrap_or(&1)
}

/// x·rsqrt(Σx²/n + eps)·w's finish: the reciprocal root.
fn rms_finish<'p>(n: usize, eps: f64) -> Finish<'p> {
    Box::new(move |b, _, total| {
        let nf = b.constant(n as f64);
        let eps = b.constant(eps);
        let mean = b.line(format!("arith.divf {}, {nf} : f32", total[0]));
        let var = b.line(format!("arith.addf {mean}, {eps} : f32"));
        vec![b.ptx("rsqrt.approx.ftz.f32", &var)]
    })
}

fn square_sum<'p>(x: impl Fn(&mut Body, &[String]) -> String + 'p) -> Term<'p> {
    Box::new(move |b, e, _| {
        let x = x(b, e);
        b.line(format!("arith.mulf {x}, {x} : f32"))
    })
}

/// Softmax over `logit` (an element's logit from the inputs): the max, and Σ e^(x − max)
/// (two finished values), in one pass.
fn softmax<'p>(logit: impl Fn(&mut Body, &[String]) -> String + 'p) -> Reduction<'p> {
    Reduction {
        kind: Kind::Softmax,
        reads: 0,
        term: Box::new(move |b, e, _| logit(b, e)),
        finish: Box::new(|_, _, t| t.to_vec()),
    }
}

fn bin(b: &mut Body, op: &str, x: &str, y: &str) -> String {
    b.line(format!("arith.{op} {x}, {y} : f32"))
}

fn program<'p>(f: &'p Function, kernel: &Kernel, node: &'p Node, v: u32) -> Result<Program<'p>, String> {
    let arg = |k: usize| input(f, kernel, node.args[k]);
    let arg_shape = |k: usize| &f.node(node.args[k]).shape;
    let n = last(arg_shape(0));
    let rows = arg_shape(0).iter().product::<usize>() / n.max(1);
    let element = |term: Term<'p>| Output { value: v, write: Write::Element, term };
    let pick = |k: usize| -> Elementwise<'p> { Box::new(move |_, e| e[k].clone()) };
    let program = |inputs, reductions, outputs| Program { n, rows, inputs, order: None, reductions, outputs };
    Ok(match &node.op {
        Op::RmsNorm { eps } => program(
            vec![(arg(0)?, Rows::Own), (arg(1)?, Rows::Shared)],
            vec![Reduction { kind: Kind::Sum, reads: 0, term: square_sum(pick(0)), finish: rms_finish(n, *eps) }],
            vec![element(Box::new(|b, e, r| {
                let xn = bin(b, "mulf", &e[0], &r[0]);
                bin(b, "mulf", &xn, &e[1])
            }))],
        ),
        Op::RmsNormQuantize { eps, cols } => program(
            vec![(arg(0)?, Rows::Own), (arg(1)?, Rows::Shared)],
            vec![Reduction { kind: Kind::Sum, reads: 0, term: square_sum(pick(0)), finish: rms_finish(n, *eps) }],
            vec![Output {
                value: v,
                write: Write::Fp8 { cols: *cols },
                term: Box::new(|b, e, r| {
                    let xn = bin(b, "mulf", &e[0], &r[0]);
                    bin(b, "mulf", &xn, &e[1])
                }),
            }],
        ),
        Op::AddRmsNorm { eps } => {
            let [sum, norm] = parts(f, v, 2)[..] else { unreachable!("two parts") };
            let x = |b: &mut Body, e: &[String]| bin(b, "addf", &e[0], &e[1]);
            let mut outputs = Vec::new();
            if let Some(sum) = sum {
                outputs.push(Output { value: sum, write: Write::Element, term: Box::new(move |b, e, _| x(b, e)) });
            }
            if let Some(norm) = norm {
                outputs.push(Output {
                    value: norm,
                    write: Write::Element,
                    term: Box::new(move |b, e, r| {
                        let x = x(b, e);
                        let xn = bin(b, "mulf", &x, &r[0]);
                        bin(b, "mulf", &xn, &e[2])
                    }),
                });
            }
            program(
                vec![(arg(0)?, Rows::Own), (arg(1)?, Rows::Own), (arg(2)?, Rows::Shared)],
                vec![Reduction { kind: Kind::Sum, reads: 0, term: square_sum(x), finish: rms_finish(n, *eps) }],
                outputs,
            )
        }
        Op::RmsNormGrad { eps } => {
            // var = Σx²·(1/n) + eps, r = 1/√var; dx = [acc +] dy·w·r + (Σ dy·w·x)·(r/var·−½)·(1/n)·2x;
            // dw = Σ_rows dy·(x·r).
            let [dx, dw] = parts(f, v, 2)[..] else { unreachable!("two parts") };
            let accumulates = node.args.len() == 4;
            let mut inputs = vec![(arg(0)?, Rows::Own), (arg(1)?, Rows::Shared), (arg(2)?, Rows::Own)];
            if accumulates {
                inputs.push((arg(3)?, Rows::Addend));
            }
            let eps = *eps;
            let reductions = vec![
                Reduction {
                    kind: Kind::Sum,
                    reads: 0,
                    term: square_sum(pick(0)),
                    finish: Box::new(move |b, _, total| {
                        let inverse_n = b.constant(1.0 / n as f64);
                        let eps = b.constant(eps);
                        let scaled = bin(b, "mulf", &total[0], &inverse_n);
                        let var = bin(b, "addf", &scaled, &eps);
                        let root = b.ptx("sqrt.rn.f32", &var);
                        let one = b.constant(1.0);
                        let r = bin(b, "divf", &one, &root);
                        vec![var, r]
                    }),
                },
                Reduction {
                    kind: Kind::Sum,
                    reads: 0,
                    term: Box::new(|b, e, _| {
                        let gw = bin(b, "mulf", &e[2], &e[1]);
                        bin(b, "mulf", &gw, &e[0])
                    }),
                    finish: Box::new(move |b, r, projection| {
                        let half = b.constant(-0.5);
                        let inverse_n = b.constant(1.0 / n as f64);
                        let rv = bin(b, "divf", &r[1], &r[0]);
                        let rvh = bin(b, "mulf", &rv, &half);
                        let through = bin(b, "mulf", &projection[0], &rvh);
                        vec![bin(b, "mulf", &through, &inverse_n)]
                    }),
                },
            ];
            let mut outputs = Vec::new();
            if let Some(dx) = dx {
                outputs.push(Output {
                    value: dx,
                    write: Write::Element,
                    term: Box::new(move |b, e, r| {
                        let gw = bin(b, "mulf", &e[2], &e[1]);
                        let mut direct = bin(b, "mulf", &gw, &r[1]);
                        if accumulates {
                            direct = bin(b, "addf", &e[3], &direct);
                        }
                        let two = b.constant(2.0);
                        let x2 = bin(b, "mulf", &e[0], &two);
                        let through = bin(b, "mulf", &r[2], &x2);
                        bin(b, "addf", &direct, &through)
                    }),
                });
            }
            if let Some(dw) = dw {
                outputs.push(Output {
                    value: dw,
                    write: Write::ColumnSum,
                    term: Box::new(|b, e, r| {
                        let xr = bin(b, "mulf", &e[0], &r[1]);
                        bin(b, "mulf", &e[2], &xr)
                    }),
                });
            }
            program(inputs, reductions, outputs)
        }
        Op::Softmax => program(
            vec![(arg(0)?, Rows::Own)],
            vec![softmax(|_, e| e[0].clone())],
            vec![element(Box::new(|b, e, r| {
                let d = bin(b, "subf", &e[0], &r[0]);
                let x = b.exp(&d);
                bin(b, "divf", &x, &r[1])
            }))],
        ),
        Op::MaskedSoftmax { scale } => {
            // softmax(s·scale + mask), the mask broadcast against s's leading shape.
            let out_shape = &node.shape;
            let mask_shape = arg_shape(1);
            let lead = out_shape.len() - 1;
            let mut mask_lead = vec![1; lead.saturating_sub(mask_shape.len() - 1)];
            mask_lead.extend(&mask_shape[..mask_shape.len() - 1]);
            let broadcast = Rows::Broadcast { input: mask_lead, output: out_shape[..lead].to_vec() };
            if last(mask_shape) != n {
                return Err("a masked softmax whose mask is broadcast along the row is not generated".into());
            }
            let scale = *scale;
            let logit = move |b: &mut Body, e: &[String]| {
                let s = b.constant(scale);
                let x = bin(b, "mulf", &e[0], &s);
                bin(b, "addf", &x, &e[1])
            };
            program(
                vec![(arg(0)?, Rows::Own), (arg(1)?, broadcast)],
                vec![softmax(logit)],
                vec![element(Box::new(move |b, e, r| {
                    let x = logit(b, e);
                    let d = bin(b, "subf", &x, &r[0]);
                    let x = b.exp(&d);
                    bin(b, "divf", &x, &r[1])
                }))],
            )
        }
        Op::SoftmaxGrad => {
            // e = exp(x − max), z = Σe, dx = (dy/z + Σ −(dy/z)·(e/z))·e.
            let mut reductions = vec![softmax(|_, e| e[0].clone())];
            reductions.push(Reduction {
                kind: Kind::Sum,
                reads: 2,
                term: Box::new(|b, e, r| {
                    let d = bin(b, "subf", &e[0], &r[0]);
                    let ex = b.exp(&d);
                    let gz = bin(b, "divf", &e[1], &r[1]);
                    let ez = bin(b, "divf", &ex, &r[1]);
                    let p = bin(b, "mulf", &gz, &ez);
                    b.line(format!("arith.negf {p} : f32"))
                }),
                finish: Box::new(|_, _, t| t.to_vec()),
            });
            program(
                vec![(arg(0)?, Rows::Own), (arg(1)?, Rows::Own)],
                reductions,
                vec![element(Box::new(|b, e, r| {
                    let d = bin(b, "subf", &e[0], &r[0]);
                    let ex = b.exp(&d);
                    let gz = bin(b, "divf", &e[1], &r[1]);
                    let s = bin(b, "addf", &gz, &r[2]);
                    bin(b, "mulf", &s, &ex)
                }))],
            )
        }
        Op::CrossEntropy => {
            // m = max x, z = Σ e^(x − m) and the label's logit x[label] = Σ [column = label]·x
            // in one pass; log z − (x[label] − m), and m and z where they are read.
            let mut reductions = vec![softmax(|_, e| e[0].clone())];
            reductions.push(Reduction {
                kind: Kind::Sum,
                reads: 0,
                term: Box::new(|b, e, _| {
                    // Selected, not multiplied: 0·x would be NaN at an infinite x.
                    let one = b.constant(1.0);
                    let zero = b.constant(0.0);
                    let hit = b.line(format!("arith.cmpf oeq, {}, {one} : f32", e[1]));
                    b.line(format!("arith.select {hit}, {}, {zero} : f32", e[0]))
                }),
                finish: Box::new(|_, _, t| t.to_vec()),
            });
            let row_value = |value, term: Term<'p>| Output { value, write: Write::RowValue, term };
            let [nll, max, sum] = parts(f, v, 3)[..] else { unreachable!("three parts") };
            let outputs = [
                nll.map(|nll| {
                    row_value(
                        nll,
                        Box::new(|b, _, r| {
                            let log_z = b.op(&Op::Log, &[r[1].clone()]).expect("log is generated");
                            let picked = bin(b, "subf", &r[2], &r[0]);
                            bin(b, "subf", &log_z, &picked)
                        }),
                    )
                }),
                max.map(|max| row_value(max, Box::new(|_, _, r| r[0].clone()))),
                sum.map(|sum| row_value(sum, Box::new(|_, _, r| r[1].clone()))),
            ];
            program(
                vec![(arg(0)?, Rows::Own), (arg(1)?, Rows::OneHot)],
                reductions,
                outputs.into_iter().flatten().collect(),
            )
        }
        Op::CrossEntropyGrad => {
            // dx = onehot·(−dy) + (dy/z)·e^(x − m), m and z the forward's.
            program(
                vec![
                    (arg(0)?, Rows::Own),
                    (arg(1)?, Rows::OneHot),
                    (arg(2)?, Rows::PerRow),
                    (arg(3)?, Rows::PerRow),
                    (arg(4)?, Rows::PerRow),
                ],
                vec![],
                vec![element(Box::new(|b, e, _| {
                    let d = bin(b, "subf", &e[0], &e[3]);
                    let ex = b.exp(&d);
                    let scale = bin(b, "divf", &e[2], &e[4]);
                    let t = bin(b, "mulf", &scale, &ex);
                    let minus = b.line(format!("arith.negf {} : f32", e[2]));
                    let put = bin(b, "mulf", &e[1], &minus);
                    bin(b, "addf", &put, &t)
                }))],
            )
        }
        Op::SwiGluQuantize { cols } => program(
            vec![(arg(0)?, Rows::Own), (arg(1)?, Rows::Own)],
            vec![],
            vec![Output {
                value: v,
                write: Write::Fp8 { cols: *cols },
                term: Box::new(|b, e, _| b.op(&Op::SwiGlu, e).expect("swiglu is generated")),
            }],
        ),
        Op::SwiGluGrad => {
            // σ = sigmoid(a), da = dy·b·σ·(1 + a·(1 − σ)), db = dy·(a·σ).
            let [da, db] = parts(f, v, 2)[..] else { unreachable!("two parts") };
            let sigma = |b: &mut Body, a: &str| b.op(&Op::Sigmoid, &[a.to_string()]).expect("sigmoid is generated");
            let mut outputs = Vec::new();
            if let Some(da) = da {
                outputs.push(Output {
                    value: da,
                    write: Write::Element,
                    term: Box::new(move |b, e, _| {
                        let s = sigma(b, &e[0]);
                        let one = b.constant(1.0);
                        let rest = bin(b, "subf", &one, &s);
                        let ar = bin(b, "mulf", &e[0], &rest);
                        let inner = bin(b, "addf", &one, &ar);
                        let derivative = bin(b, "mulf", &s, &inner);
                        let gb = bin(b, "mulf", &e[2], &e[1]);
                        bin(b, "mulf", &gb, &derivative)
                    }),
                });
            }
            if let Some(db) = db {
                outputs.push(Output {
                    value: db,
                    write: Write::Element,
                    term: Box::new(move |b, e, _| {
                        let s = sigma(b, &e[0]);
                        let a_s = bin(b, "mulf", &e[0], &s);
                        bin(b, "mulf", &e[2], &a_s)
                    }),
                });
            }
            program(vec![(arg(0)?, Rows::Own), (arg(1)?, Rows::Own), (arg(2)?, Rows::Own)], vec![], outputs)
        }
        Op::Permute { .. } | Op::Gather | Op::UnpermuteGradRows { .. } | Op::PermuteQuantize { .. } => {
            // Rows for the experts (x[order[i] / k]), an embedding lookup (table[ids[i]]), or
            // the combine's row gradient (gates(order[i]) · g[order[i] / k]); the first or the
            // last quantised as they are written.
            let (k, gated, write) = match node.op {
                Op::Permute { k } => (k, false, Write::Element),
                Op::UnpermuteGradRows { k } => (k, true, Write::Element),
                Op::PermuteQuantize { k, cols, gated } => (k, gated, Write::Fp8 { cols }),
                _ => (1, false, Write::Element),
            };
            let mut inputs = vec![(arg(0)?, Rows::Picked { k })];
            if gated {
                inputs.push((arg(2)?, Rows::PickedScalar));
            }
            Program {
                n,
                rows: node.shape.iter().product::<usize>() / n.max(1),
                inputs,
                order: Some(arg(1)?),
                reductions: vec![],
                outputs: vec![Output {
                    value: v,
                    write,
                    term: Box::new(move |b, e, _| if gated { bin(b, "mulf", &e[1], &e[0]) } else { e[0].clone() }),
                }],
            }
        }
        op => unreachable!("`{}` is not a row op", op.name()),
    })
}

/// Elements per lane in a chunk.
const W: usize = 4;

/// Whether a row's elements of an input so read are kept in registers for the passes after
/// the first (when they fit): not a shared row's (the same for every row, from the caches),
/// nor an addend's (read once, by the outputs).
fn kept(rows: &Rows) -> bool {
    !matches!(rows, Rows::Shared | Rows::Addend)
}

/// Writes a program's kernel.
fn emit(name: &str, p: &Program, is_index: impl Fn(u32) -> bool) -> Emitted {
    let chunk = 32 * W;
    let chunks = p.n.div_ceil(chunk);
    let column_sums = p.outputs.iter().filter(|o| matches!(o.write, Write::ColumnSum)).count();
    let cached = p.inputs.iter().filter(|(_, r)| kept(r)).count();
    // Unrolled over the chunks when the column sums fit in registers; the inputs kept there
    // too when they also fit.
    let registers = chunks <= MAX_UNROLLED_CHUNKS && chunks * W * column_sums <= REGISTER_FLOATS / 2;
    let caching = registers && chunks * W * (cached + column_sums) <= REGISTER_FLOATS;
    let mut args: Vec<u32> = p.inputs.iter().map(|(v, _)| *v).collect();
    args.extend(p.order);
    let first_output = args.len();
    args.extend(p.outputs.iter().map(|o| o.value));
    let types: Vec<&str> = args
        .iter()
        .enumerate()
        .map(|(slot, &v)| {
            let write = (slot >= first_output).then(|| &p.outputs[slot - first_output].write);
            if let Some(Write::Fp8 { .. }) = write {
                "i8"
            } else if let Some(Write::Bf16 { packed: true }) = write {
                "bf16"
            } else if is_index(v) {
                "i32"
            } else {
                "f32"
            }
        })
        .collect();
    let mut w = RowWriter {
        p,
        b: Body::new(),
        chunks,
        registers,
        caching,
        cache: HashMap::new(),
        bases: Vec::new(),
        columns: Vec::new(),
    };
    let b = &mut w.b;
    for l in [
        "%tid = gpu.thread_id x",
        "%bid = gpu.block_id x",
        "%gdim = gpu.grid_dim x",
        "%c0 = arith.constant 0 : index",
        "%c1 = arith.constant 1 : index",
        "%c32 = arith.constant 32 : index",
        "%w32 = arith.constant 32 : i32",
    ] {
        let _ = writeln!(b.text, "      {l}");
    }
    let _ = write!(
        b.text,
        "      %wpb = arith.constant {WARPS} : index\n      %warp = arith.divui %tid, %c32 : index\n      %lane = arith.remui %tid, %c32 : index\n      %bw = arith.muli %bid, %wpb : index\n      %first = arith.addi %bw, %warp : index\n      %stride = arith.muli %gdim, %wpb : index\n      %cw = arith.constant {W} : index\n      %laneW = arith.muli %lane, %cw : index\n      %n = arith.constant {} : index\n      %rows = arith.constant {} : index\n",
        p.n, p.rows
    );
    for (k, o) in p.outputs.iter().enumerate() {
        if let Write::Fp8 { cols } = o.write {
            fp8::views(&mut w.b, first_output + k, p.rows, p.n, 1, cols);
        }
    }
    if registers {
        w.columns = (0..chunks).map(|c| w.col(c)).collect();
    }
    // Column sums carried across the warp's rows, per (chunk, element).
    let carried = if registers { chunks * W * column_sums } else { 0 };
    let zero = w.b.constant(0.0);
    let init: Vec<String> = vec![zero; carried];
    let carried_names: Vec<String> = (0..carried).map(|_| w.b.fresh()).collect();
    let result = w.b.fresh();
    let f32s = vec!["f32"; carried].join(", ");
    let bindings: Vec<String> = carried_names.iter().zip(&init).map(|(c, i)| format!("{c} = {i}")).collect();
    let _ = writeln!(
        w.b.text,
        "      {}scf.for %row = %first to %rows step %stride iter_args({}) -> ({f32s}) {{",
        if carried > 0 { format!("{result}:{carried} = ") } else { String::new() },
        bindings.join(", ")
    );
    let next = w.row(first_output, &carried_names);
    if carried > 0 {
        let _ = writeln!(w.b.text, "        scf.yield {} : {f32s}", next.join(", "));
    } else {
        let _ = writeln!(w.b.text, "        scf.yield");
    }
    let _ = writeln!(w.b.text, "      }}");
    if carried > 0 {
        // The block's column sums into the zeroed outputs: per chunk, the warps' lane partials
        // meet in shared memory (one half of it per chunk in turn, so one barrier a chunk) and
        // one warp adds their total atomically; a block, not each warp, adds to every column
        // (the atomics on one column wait on one another).
        let sums: Vec<String> = (0..carried).map(|i| format!("{result}#{i}")).collect();
        let buffer = sum_buffer();
        let _ = writeln!(w.b.text, "      %chunk_floats = arith.constant {} : index", 32 * W);
        let _ = writeln!(w.b.text, "      %warp_part = arith.muli %warp, %chunk_floats : index");
        let mut round = 0;
        let mut at = 0;
        for (k, o) in p.outputs.iter().enumerate() {
            if matches!(o.write, Write::ColumnSum) {
                for c in 0..chunks {
                    let half = w.b.line(format!("arith.constant {} : index", (round % 2) * SUM_FLOATS));
                    let mine = w.b.line(format!("arith.addi %warp_part, {half} : index"));
                    let mine = w.b.line(format!("arith.addi {mine}, %laneW : index"));
                    for l in 0..W {
                        let to = w.b.line(format!("arith.addi {mine}, %c{l}_e : index"));
                        let _ =
                            writeln!(w.b.text, "        memref.store {}, %sums[{to}] : {buffer}", sums[at + c * W + l]);
                    }
                    let _ = writeln!(w.b.text, "        gpu.barrier");
                    let adder = w.b.line(format!("arith.constant {} : index", c % WARPS));
                    let adder = w.b.line(format!("arith.cmpi eq, %warp, {adder} : index"));
                    let _ = writeln!(w.b.text, "        scf.if {adder} {{");
                    let lanes = w.b.line(format!("arith.addi {half}, %laneW : index"));
                    let mut total = vec![String::new(); W];
                    for warp in 0..WARPS {
                        let from = w.b.line(format!("arith.constant {} : index", warp * 32 * W));
                        let from = w.b.line(format!("arith.addi {lanes}, {from} : index"));
                        for (l, t) in total.iter_mut().enumerate() {
                            let from = w.b.line(format!("arith.addi {from}, %c{l}_e : index"));
                            let x = w.b.line(format!("memref.load %sums[{from}] : {buffer}"));
                            *t = if warp == 0 { x } else { w.b.line(format!("arith.addf {t}, {x} : f32")) };
                        }
                    }
                    let col = w.columns[c].clone();
                    w.masked(&col, |b| {
                        for (l, t) in total.iter().enumerate() {
                            let cl = b.line(format!("arith.addi {col}, %c{l}_e : index"));
                            b.line(format!(
                                "memref.atomic_rmw addf {t}, %a{}[{cl}] : (f32, memref<?xf32>) -> f32",
                                first_output + k
                            ));
                        }
                    });
                    let _ = writeln!(w.b.text, "        }}");
                    round += 1;
                }
                at += chunks * W;
            }
        }
    }
    let blocks = if column_sums > 0 { p.rows.div_ceil(WARPS).min(COLUMN_SUM_BLOCKS) } else { p.rows.div_ceil(WARPS) };
    let params: Vec<String> = types.iter().enumerate().map(|(i, t)| format!("%a{i}: memref<?x{t}>")).collect();
    let element_offsets: String = (0..W).map(|l| format!("      %c{l}_e = arith.constant {l} : index\n")).collect();
    let mlir = format!(
        "module attributes {{gpu.container_module}} {{\n  gpu.module @{name} [{TARGET}] {{\n    gpu.func @{name}({}){} kernel {{\n{element_offsets}{}      gpu.return\n    }}\n  }}\n}}\n",
        params.join(", "),
        if carried > 0 { format!(" workgroup(%sums : {})", sum_buffer()) } else { String::new() },
        w.b.text
    );
    Emitted { mlir, grid: blocks.max(1) as u32, block: (32 * WARPS) as u32, args, zeroed: column_sums > 0 }
}

struct RowWriter<'p, 'q> {
    p: &'q Program<'p>,
    b: Body,
    chunks: usize,
    /// Chunks unrolled (their columns constants, column sums carried in registers).
    registers: bool,
    /// Inputs loaded once per row and kept in registers.
    caching: bool,
    /// Loaded elements of the current row by (input, column value).
    cache: HashMap<(usize, String), Vec<String>>,
    /// Each input's first element of the current row.
    bases: Vec<String>,
    /// This lane's first column of each chunk, when the row is held in registers.
    columns: Vec<String>,
}

impl<'p, 'q> RowWriter<'p, 'q> {
    /// This lane's first column in register chunk `c`.
    fn col(&mut self, c: usize) -> String {
        let off = self.b.line(format!("arith.constant {} : index", c * 32 * W));
        self.b.line(format!("arith.addi %laneW, {off} : index"))
    }

    /// Whether the chunk is partial (some lanes past the row's end).
    fn partial(&self) -> bool {
        !self.p.n.is_multiple_of(32 * W)
    }

    /// Runs `inner` only where `col` is inside the row (always when no chunk is partial).
    fn masked(&mut self, col: &str, inner: impl FnOnce(&mut Body)) {
        if self.partial() {
            let inside = self.b.line(format!("arith.cmpi ult, {col}, %n : index"));
            let _ = writeln!(self.b.text, "        scf.if {inside} {{");
            inner(&mut self.b);
            let _ = writeln!(self.b.text, "        }}");
        } else {
            inner(&mut self.b);
        }
    }

    /// The elements of input `k` at `col` (W of them), loaded once per row in registers.
    fn load(&mut self, k: usize, col: &str) -> Vec<String> {
        if let Some(e) = self.cache.get(&(k, col.to_string())) {
            return e.clone();
        }
        let base = self.bases[k].clone();
        match self.p.inputs[k].1 {
            Rows::PickedScalar | Rows::PerRow => {
                let x = self.b.line(format!("memref.load %a{k}[{base}] : memref<?xf32>"));
                return vec![x; W];
            }
            Rows::OneHot => {
                let (one, zero) = (self.b.constant(1.0), self.b.constant(0.0));
                return (0..W)
                    .map(|l| {
                        let c = self.b.line(format!("arith.addi {col}, %c{l}_e : index"));
                        let hit = self.b.line(format!("arith.cmpi eq, {c}, {base} : index"));
                        self.b.line(format!("arith.select {hit}, {one}, {zero} : f32"))
                    })
                    .collect();
            }
            _ => {}
        }
        let at = self.b.line(format!("arith.addi {base}, {col} : index"));
        let ty = format!("vector<{W}xf32>");
        let load = format!("vector.load %a{k}[{at}] {{alignment = {} : i64}} : memref<?xf32>, {ty}", 4 * W);
        let vector = if self.partial() {
            let inside = self.b.line(format!("arith.cmpi ult, {col}, %n : index"));
            let r = self.b.fresh();
            let _ = writeln!(self.b.text, "        {r} = scf.if {inside} -> ({ty}) {{");
            let x = self.b.line(load);
            let _ = writeln!(self.b.text, "        scf.yield {x} : {ty}\n        }} else {{");
            let z = self.b.line(format!("arith.constant dense<0.0> : {ty}"));
            let _ = writeln!(self.b.text, "        scf.yield {z} : {ty}\n        }}");
            r
        } else {
            self.b.line(load)
        };
        let e: Vec<String> =
            (0..W).map(|l| self.b.line(format!("vector.extract {vector}[{l}] : f32 from {ty}"))).collect();
        if self.caching && kept(&self.p.inputs[k].1) {
            self.cache.insert((k, col.to_string()), e.clone());
        }
        e
    }

    /// Every input's elements at `col`, lane element by lane element.
    fn elements(&mut self, col: &str) -> Vec<Vec<String>> {
        let per_input: Vec<Vec<String>> = (0..self.p.inputs.len()).map(|k| self.load(k, col)).collect();
        (0..W).map(|l| per_input.iter().map(|e| e[l].clone()).collect()).collect()
    }

    /// A pass over the row's chunks carrying `init`; `step` gets the chunk's column (and, in
    /// registers, its number) and the carried values.
    fn pass(&mut self, init: Vec<String>, step: &mut ChunkStep<'_, 'p, 'q>) -> Vec<String> {
        if self.registers {
            let mut carried = init;
            for c in 0..self.chunks {
                let col = self.columns[c].clone();
                carried = step(self, &col, Some(c), &carried);
            }
            return carried;
        }
        let chunks = self.b.line(format!("arith.constant {} : index", self.chunks));
        let result = self.b.fresh();
        let iv = self.b.fresh();
        let names: Vec<String> = init.iter().map(|_| self.b.fresh()).collect();
        let types = vec!["f32"; init.len()].join(", ");
        let bindings: Vec<String> = names.iter().zip(&init).map(|(n, i)| format!("{n} = {i}")).collect();
        let head = if init.is_empty() { String::new() } else { format!("{result}:{} = ", init.len()) };
        let _ = writeln!(
            self.b.text,
            "        {head}scf.for {iv} = %c0 to {chunks} step %c1 iter_args({}) -> ({types}) {{",
            bindings.join(", ")
        );
        let span = self.b.line(format!("arith.constant {} : index", 32 * W));
        let start = self.b.line(format!("arith.muli {iv}, {span} : index"));
        let col = self.b.line(format!("arith.addi {start}, %laneW : index"));
        let next = step(self, &col, None, &names);
        self.cache.clear();
        let yielded = if next.is_empty() { String::new() } else { format!(" {} : {types}", next.join(", ")) };
        let _ = writeln!(self.b.text, "        scf.yield{yielded}\n        }}");
        (0..init.len()).map(|i| format!("{result}#{i}")).collect()
    }

    /// One row: bases, reductions, outputs; returns the column sums carried on.
    fn row(&mut self, first_output: usize, carried: &[String]) -> Vec<String> {
        self.cache.clear();
        self.bases = (0..self.p.inputs.len()).map(|k| self.base(k)).collect();
        let p = self.p;
        let mut finished: Vec<String> = Vec::new();
        let mut next = 0;
        while next < p.reductions.len() {
            // The reductions of this pass: those reading only what is finished now.
            let count = p.reductions[next..].iter().take_while(|r| r.reads <= finished.len()).count().max(1);
            let group = &p.reductions[next..next + count];
            next += count;
            // Each reduction's partials, one after another in the values carried.
            let widths: Vec<usize> = group.iter().map(|r| r.kind.identities().len()).collect();
            let init: Vec<String> = (group.iter().flat_map(|r| r.kind.identities()))
                .map(|id| self.b.line(format!("arith.constant {id} : f32")))
                .collect();
            let done = finished.clone();
            let partials = self.pass(init, &mut |w, col, _, acc| {
                let inside = w.partial().then(|| w.b.line(format!("arith.cmpi ult, {col}, %n : index")));
                let elements = w.elements(col);
                let mut next = Vec::new();
                let mut at = 0;
                for (reduction, &width) in group.iter().zip(&widths) {
                    let terms: Vec<String> = (elements.iter())
                        .map(|e| {
                            let x = (reduction.term)(&mut w.b, e, &done);
                            match &inside {
                                Some(inside) => {
                                    let id = reduction.kind.identities()[0];
                                    let id = w.b.line(format!("arith.constant {id} : f32"));
                                    w.b.line(format!("arith.select {inside}, {x}, {id} : f32"))
                                }
                                None => x,
                            }
                        })
                        .collect();
                    next.extend(reduction.kind.add(&mut w.b, &acc[at..at + width], &terms));
                    at += width;
                }
                next
            });
            let mut at = 0;
            for (reduction, &width) in group.iter().zip(&widths) {
                let mut total = partials[at..at + width].to_vec();
                at += width;
                for offset in [16, 8, 4, 2, 1] {
                    let offset = self.b.line(format!("arith.constant {offset} : i32"));
                    let other: Vec<String> = (total.iter())
                        .map(|x| {
                            let y = self.b.fresh();
                            let _ = writeln!(
                                self.b.text,
                                "        {y}, {y}_ok = gpu.shuffle xor {x}, {offset}, %w32 : f32"
                            );
                            y
                        })
                        .collect();
                    total = reduction.kind.merge(&mut self.b, &total, &other);
                }
                let more = (reduction.finish)(&mut self.b, &finished, &total);
                finished.extend(more);
            }
        }
        // Values per row, from the reductions alone (every lane holds them): the first lane
        // stores them.
        let per_row = |o: &&Output| matches!(o.write, Write::RowValue);
        for (k, o) in p.outputs.iter().enumerate().filter(|(_, o)| per_row(o)) {
            let x = (o.term)(&mut self.b, &[], &finished);
            let first = self.b.line("arith.cmpi eq, %lane, %c0 : index".into());
            let _ = writeln!(
                self.b.text,
                "        scf.if {first} {{\n        memref.store {x}, %a{}[%row] : memref<?xf32>\n        }}",
                first_output + k
            );
        }
        let mut next = carried.to_vec();
        if p.outputs.iter().all(|o| per_row(&o)) {
            return next;
        }
        // The other outputs, in one pass; column sums in registers are carried per (chunk,
        // element).
        let chunk_sums = self.chunks * W;
        self.pass(vec![], &mut |w, col, chunk, _| {
            let elements = w.elements(col);
            let mut sum_index = 0;
            for (k, o) in p.outputs.iter().enumerate().filter(|(_, o)| !per_row(o)) {
                let slot = first_output + k;
                let values: Vec<String> = elements.iter().map(|e| (o.term)(&mut w.b, e, &finished)).collect();
                match o.write {
                    Write::Element | Write::Bf16 { .. } => {
                        let (values, element) = match o.write {
                            Write::Bf16 { packed } => {
                                let rounded = values.iter().map(|x| w.b.line(format!("arith.truncf {x} : f32 to bf16")));
                                let rounded: Vec<String> = rounded.collect();
                                if packed {
                                    (rounded, "bf16")
                                } else {
                                    (rounded.iter().map(|x| w.b.line(format!("arith.extf {x} : bf16 to f32"))).collect(), "f32")
                                }
                            }
                            _ => (values, "f32"),
                        };
                        let at = w.b.line("arith.muli %row, %n : index".into());
                        let at = w.b.line(format!("arith.addi {at}, {col} : index"));
                        let ty = format!("vector<{W}x{element}>");
                        let v = w.b.line(format!("vector.from_elements {} : {ty}", values.join(", ")));
                        let alignment = if element == "bf16" { 2 * W } else { 4 * W };
                        w.masked(col, |b| {
                            let _ = writeln!(
                                b.text,
                                "        vector.store {v}, %a{slot}[{at}] {{alignment = {alignment} : i64}} : memref<?x{element}>, {ty}"
                            );
                        });
                    }
                    Write::Fp8 { cols } => {
                        let inside = w.partial().then(|| w.b.line(format!("arith.cmpi ult, {col}, %n : index")));
                        fp8::store_row_group(&mut w.b, slot, &values, "%row", col, inside.as_deref(), cols);
                    }
                    Write::ColumnSum => match chunk {
                        Some(c) => {
                            for (l, x) in values.iter().enumerate() {
                                let i = sum_index * chunk_sums + c * W + l;
                                next[i] = w.b.line(format!("arith.addf {}, {x} : f32", next[i]));
                            }
                            sum_index += 1;
                        }
                        None => w.masked(col, |b| {
                            for (l, x) in values.iter().enumerate() {
                                let cl = b.line(format!("arith.addi {col}, %c{l}_e : index"));
                                b.line(format!("memref.atomic_rmw addf {x}, %a{slot}[{cl}] : (f32, memref<?xf32>) -> f32"));
                            }
                        }),
                    },
                    Write::RowValue => unreachable!("stored after the reductions"),
                }
            }
            vec![]
        });
        next
    }

    /// Input `k`'s first element of the current row.
    fn base(&mut self, k: usize) -> String {
        let b = &mut self.b;
        match &self.p.inputs[k].1 {
            Rows::Own | Rows::Addend => b.line("arith.muli %row, %n : index".into()),
            Rows::Shared => "%c0".into(),
            Rows::Picked { k: per_token } => {
                let order = self.p.inputs.len();
                let a = b.line(format!("memref.load %a{order}[%row] : memref<?xi32>"));
                let a = b.line(format!("arith.index_cast {a} : i32 to index"));
                let kk = b.line(format!("arith.constant {per_token} : index"));
                let t = b.line(format!("arith.divui {a}, {kk} : index"));
                b.line(format!("arith.muli {t}, %n : index"))
            }
            Rows::PickedScalar => {
                let order = self.p.inputs.len();
                let a = b.line(format!("memref.load %a{order}[%row] : memref<?xi32>"));
                b.line(format!("arith.index_cast {a} : i32 to index"))
            }
            Rows::PerRow => "%row".into(),
            Rows::OneHot => {
                let a = b.line(format!("memref.load %a{k}[%row] : memref<?xi32>"));
                b.line(format!("arith.index_cast {a} : i32 to index"))
            }
            Rows::Broadcast { input, output } => {
                // The output row's multi-index over the output's leading shape, linearised in
                // the input's rows with the broadcast axes left out.
                let mut row = "%c0".to_string();
                let mut rest = "%row".to_string();
                let mut stride = 1;
                for (&d_in, &d_out) in input.iter().zip(output).rev() {
                    let extent = b.line(format!("arith.constant {d_out} : index"));
                    let i = b.line(format!("arith.remui {rest}, {extent} : index"));
                    rest = b.line(format!("arith.divui {rest}, {extent} : index"));
                    if d_in != 1 {
                        let s = b.line(format!("arith.constant {stride} : index"));
                        let term = b.line(format!("arith.muli {i}, {s} : index"));
                        row = b.line(format!("arith.addi {row}, {term} : index"));
                        stride *= d_in;
                    }
                }
                b.line(format!("arith.muli {row}, %n : index"))
            }
        }
    }
}
