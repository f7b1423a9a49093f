//! Fused causal attention for MLA's shapes, generated for Hopper's warpgroup tensor cores
//! (`wgmma` m64nNk16 on BF16 operands, f32 accumulation; sm_90a): flash-style kernels that
//! never materialise the S×S scores. Forward: O = softmax(scale·QKᵀ + causal mask)·V for Q, K
//! [B, S, H, Dqk] and V [B, S, H, Dv] (the plan's buffers: f32 rounded to BF16 as they are
//! staged in shared memory, the recipe keeping attention in BF16; or packed BF16 where the
//! plan casts them where they are made, [`Heads::bf16_inputs`]), O [B, S, H, Dv] in
//! f32 (the layout the output projection reads), and the rows' log-sum-exp [B, H, S] (natural
//! log, of the scaled scores). Backward: two passes ([`Pass`]) that recompute the
//! probabilities from the log-sum-exp: dQ (and D = Σ dO∘O per row), then dK and dV.
//!
//! A block takes [`BLOCK_ROWS`] rows of one (batch, head) (queries in the forward and the dQ pass,
//! keys in the key pass), each of its warpgroups 64 of them and a warp 16, and walks the
//! other side in blocks of 64 up to or from the diagonal (the block with most work starts first).
//! Per column block its threads stage the tiles it needs in shared memory, 128-byte swizzled as
//! `wgmma` reads them: a tile is regions of 64 columns, 64 rows of 128 bytes each, the 16-byte
//! chunks of row r permuted by r mod 8 ([`stage`]). The scores (`Block::products`: the block's rows
//! tile times a column tile, both K-major, 64 × 64 per warpgroup) are turned into probabilities,
//! each one fused multiply-add of the score by the scale times log₂e and the row's shift and one
//! `ex2` (`Block::exp2_logit`; the shift from the forward's running maximum, or the saved
//! log-sum-exp), masked (`Block::mask`) only in the loop over the row block's own diagonal column
//! blocks (`column_loops`: the others, unmasked, in a loop of their own); their product with a tile
//! read along its rows (`Block::accumulate`: P·V, dS·K, dSᵀ·Q, Pᵀ·dO; the tile N-major, the
//! instruction's transposed B) is added to the accumulators, P or dS rounded to BF16 as the A
//! operand straight from the score registers (a warp's rows of the accumulator are its rows of A).
//! The column tiles are fetched for the next column block by `cp.async` while this block's
//! products run ([`Columns`]; at MLA's dims a block takes 192 to 255 registers a thread, one block
//! a multiprocessor, so no other block hides the staging): packed BF16 into a second tile, f32
//! tensors (the backward's dO) as they are into a raw buffer, rounded into their tile where read.
//! The forward is software-pipelined within each warpgroup (FlashAttention-3's intra-warpgroup
//! overlap, [`Pipelined`]): a column block's scores and the last block's P·V are issued
//! together, and the tensor cores run that accumulation while the scores become probabilities
//! (V's tiles trail K's by a block); the query pass issues the scores' and dP's products
//! together, dP's running while the scores become probabilities; the key pass, whose two
//! accumulators (dK and dV: 160 registers a thread) leave room for the scores or dP but not
//! both, issues dV's accumulation and dP's products together once the scores are probabilities.
//! The key pass's per-column terms (log-sum-exp, D) are copied into shared memory with their
//! column block. The staging's thread layout keeps its addresses out of the loops' live
//! registers. Where Q, K and V are packed BF16, every pass instead streams its tiles by TMA
//! from a producer warpgroup into a ring ([`ring`]: warp specialisation, no block-wide barrier
//! in the column loop; the key pass's dO from a packed BF16 copy that the query pass stores as
//! it stages its own rows of it), and the forward holds its Q in registers ([`Block::hold`]):
//! its scores' products then read only the
//! column tile from shared memory (an m64n64k16 product reading both operands there takes 4 KB
//! in the about 32 cycles the tensor cores spend on it: all of shared memory's 128 bytes a
//! cycle). Not yet: the warpgroups' ping-pong (measured on the forward's held Q: no gain).
//!
//! The parts: [`forward`] and [`backward`] write the kernels from a thread's work on its rows
//! ([`block`]), the tensor-core products ([`products`]), the walk over the column blocks
//! ([`walk`]) and the tiles it reads, staged by the block's threads ([`columns`]) or streamed
//! by TMA ([`ring`]).

mod backward;
mod block;
mod columns;
mod forward;
mod products;
mod ring;
mod walk;

use super::ptx::{Lines, Loop};
use crate::fuse::kernels::base;
use crate::graph::ir::{Function, Node, Op};
pub use backward::attention_backward;
use block::*;
use columns::*;
pub use forward::attention_forward;
use products::*;
pub use ring::{map_args, MAP_BOX};
use ring::{Ring, RowTiles};
use std::collections::HashSet;
use walk::*;

/// Rows of a warpgroup's tile (its products' M: 16 per warp), and columns (keys or queries)
/// per step of the column loop.
const TILE_ROWS: u32 = 64;
/// Warpgroups per block, each on 64 rows of its own, all reading the column blocks' tiles
/// (staged once for both: half the staging per product of one warpgroup a block).
const WARPGROUPS: u32 = 2;
/// Rows per block (the sequence length must be a multiple) and its threads.
pub const BLOCK_ROWS: u32 = TILE_ROWS * WARPGROUPS;
pub const THREADS: u32 = WARPGROUPS * 128;

/// Bytes of a staged region: 64 rows of 64 BF16 values (128 bytes each, swizzled).
const REGION: u64 = TILE_ROWS as u64 * 128;

/// Bytes of a column block's staged terms ([`Columns`]): up to two f32 per column.
const TERMS_BYTES: u64 = 2 * TILE_ROWS as u64 * 4;

/// The head dimensions: `qk` of queries and keys (MLA: 128 nope + 64 rope), `v` of values;
/// multiples of 64 (whole swizzled regions); and how queries, keys and values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub qk: u32,
    pub v: u32,
    /// Queries, keys and values stored as packed BF16 (the plan's casts where they are made:
    /// `fuse::kernels::packed_bf16`), else f32 (rounded as they are staged). The backward's dO
    /// is f32 either way.
    pub bf16_inputs: bool,
}

impl Heads {
    /// Bytes of a staged 64-row tile `width` values wide.
    fn tile_bytes(width: u32) -> u64 {
        u64::from(width / 64) * REGION
    }

    /// Shared bytes of the forward's row tiles (each warpgroup's Q) and the backward's (each
    /// warpgroup's of both widths), which the columns' ([`Columns`]) follow.
    fn forward_rows_bytes(self) -> u64 {
        u64::from(WARPGROUPS) * Self::tile_bytes(self.qk)
    }

    fn backward_rows_bytes(self) -> u64 {
        u64::from(WARPGROUPS) * (Self::tile_bytes(self.qk) + Self::tile_bytes(self.v))
    }

    /// Whether the kernels stream their tiles by TMA from a producer warpgroup ([`ring`]):
    /// where Q, K and V are packed BF16 (the key pass's dO from the packed copy the query pass
    /// writes). Each then takes the tensor maps [`map_args`] names after its other arguments.
    pub fn streams(self) -> bool {
        self.bf16_inputs
    }

    /// Threads of a kernel's block: the warpgroups, and the producer's where the kernels
    /// [`Heads::streams`].
    pub fn threads(self) -> u32 {
        if self.streams() {
            ring::STREAMING_THREADS
        } else {
            THREADS
        }
    }

    /// Shared bytes of the columns of the forward (`None`) or a backward pass.
    fn columns_bytes(self, pass: Option<Pass>) -> u64 {
        if self.streams() {
            Ring::bytes(self, &column_sources(pass))
        } else {
            Columns::bytes(self, &column_sources(pass))
        }
    }

    /// Dynamic shared memory a forward block needs.
    pub fn shared_bytes(self) -> u32 {
        (self.forward_rows_bytes() + self.columns_bytes(None)) as u32
    }

    /// Dynamic shared memory a backward block needs: the most of its two passes'.
    pub fn backward_shared_bytes(self) -> u32 {
        let columns = Pass::ALL.map(|pass| self.columns_bytes(Some(pass)));
        (self.backward_rows_bytes() + columns.into_iter().max().unwrap_or(0)) as u32
    }

    /// Dynamic shared memory the forward kernel (`None`) or a backward pass's is launched with.
    pub fn launch_shared_bytes(self, pass: Option<Pass>) -> u32 {
        match pass {
            None => self.shared_bytes(),
            Some(_) => self.backward_shared_bytes(),
        }
    }

    pub fn check(self) -> Result<Self, String> {
        let fits = |d: u32| d > 0 && d.is_multiple_of(64) && d <= 256;
        if !fits(self.qk) || !fits(self.v) {
            return Err(format!("head dims {}/{} must be multiples of 64 up to 256", self.qk, self.v));
        }
        Ok(self)
    }
}

/// Q and K ([B, S, H, Dqk]; dQ, dK) or V and O ([B, S, H, Dv]; dO, dV).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Qk,
    V,
}

impl Layout {
    fn width(self, heads: Heads) -> u32 {
        match self {
            Layout::Qk => heads.qk,
            Layout::V => heads.v,
        }
    }
}

/// Whether tensor `src` is stored as packed BF16 (and so staged by asynchronous copies): the
/// inputs where the plan casts them, never dO.
fn packed(heads: Heads, src: &str) -> bool {
    heads.bf16_inputs && src != "%do"
}

/// A kernel's row tensors, each warpgroup's 64 rows staged once: the forward's (`None`) Q, the
/// query pass's Q and dO, the key pass's K and V.
fn row_sources(pass: Option<Pass>) -> &'static [(&'static str, Layout)] {
    match pass {
        None => &[("%q", Layout::Qk)],
        Some(Pass::Query) => &[("%q", Layout::Qk), ("%do", Layout::V)],
        Some(Pass::Key) => &[("%k", Layout::Qk), ("%v", Layout::V)],
    }
}

/// A kernel's column tensors ([`Columns`], [`Ring`]): the forward's (`None`) or a backward
/// pass's, each with its lag, and the per-column terms staged with them.
type ColumnSources = ([(&'static str, Layout); 2], [u64; 2], &'static [&'static str]);

fn column_sources(pass: Option<Pass>) -> ColumnSources {
    match pass {
        // V trails K by a block: block j's scores are computed beside block j − 1's accumulation.
        None => ([("%k", Layout::Qk), ("%v", Layout::V)], [0, 1], &[]),
        Some(Pass::Query) => ([("%k", Layout::Qk), ("%v", Layout::V)], [0, 0], &[]),
        // The key pass's columns are queries: their log-sum-exps and D staged with them.
        Some(Pass::Key) => ([("%q", Layout::Qk), ("%do", Layout::V)], [0, 0], &["%lse", "%delta"]),
    }
}

/// The module of kernel `name` with arguments `args` and `body`.
fn module(name: &str, args: &str, body: &str, threads: u32) -> String {
    format!(
        "module attributes {{gpu.container_module}} {{\n  gpu.module @{name} [{target}] {{\n    \
         llvm.mlir.global external @tiles() {{addr_space = 3 : i32, alignment = 1024 : i64}} : !llvm.array<0 x i8>\n    \
         gpu.func @{name}({args}) kernel attributes {{known_block_size = array<i32: {threads}, 1, 1>}} {{\n\
         {body}      gpu.return\n    }}\n  }}\n}}\n",
        target = super::emit::TARGET,
    )
}

/// The head dims of the kernels that run `node` of `f`: BF16 `attention` or `attention_grad`
/// on q [b, s, h, dqk] and v [b, s, h, dv] with dims multiples of 64 up to 256 and s a multiple
/// of [`BLOCK_ROWS`], q, k and v read packed where all are among `f`'s `packed` values; `None`
/// for any other node (a plan expands other attention: `fuse::expand`).
pub fn fused(f: &Function, node: &Node, packed: &HashSet<u32>) -> Option<Heads> {
    let (Op::Attention { bf16: true, .. } | Op::AttentionGrad { bf16: true, .. }) = node.op else { return None };
    let (q, v) = (&f.node(node.args[0]).shape, &f.node(node.args[2]).shape);
    let narrow = |x: usize| u32::try_from(x).ok();
    let bf16_inputs = node.args[..3].iter().all(|&x| packed.contains(&base(f, x).0));
    let heads = Heads { qk: narrow(q[3])?, v: narrow(v[3])?, bf16_inputs };
    (q[1].is_multiple_of(BLOCK_ROWS as usize) && heads.check().is_ok()).then_some(heads)
}

/// The kernels in launch order: the forward (`None`), then the backward's passes.
pub const LAUNCHES: [Option<Pass>; 3] = [None, Some(Pass::Query), Some(Pass::Key)];

/// The forward kernel (`None`) or a backward pass's for `heads`: (name, MLIR).
pub fn kernel(heads: Heads, pass: Option<Pass>) -> (String, String) {
    let name = kernel_name(heads, pass);
    let mlir = match pass {
        None => attention_forward(&name, heads),
        Some(pass) => attention_backward(&name, heads, pass),
    };
    (name, mlir)
}

/// The three kernels for `heads` in launch order ([`LAUNCHES`]), each (name, MLIR): the forward
/// `attention_fwd_qk{QK}_v{V}`, then the backward passes `attention_bwd_{dq,dkv}_qk{QK}_v{V}`
/// (`bf16_qk{QK}` where the inputs are packed).
pub fn kernels(heads: Heads) -> Vec<(String, String)> {
    LAUNCHES.map(|pass| kernel(heads, pass)).into()
}

/// The name of the forward kernel (`None`) or of a backward pass's for `heads`.
pub fn kernel_name(heads: Heads, pass: Option<Pass>) -> String {
    let kind = match pass {
        None => "fwd".to_string(),
        Some(pass) => format!("bwd_{}", pass.label()),
    };
    let packed = if heads.bf16_inputs { "bf16_" } else { "" };
    format!("attention_{kind}_{packed}qk{}_v{}", heads.qk, heads.v)
}

/// What a backward kernel computes; two kernels, launched in this order. dQ has a pass of its
/// own: the key pass would add each block's to dQ rows other blocks add to as well (by atomics,
/// whose order, and so the sum's bits, vary from run to run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// dQ, blocks of query rows walking the keys up to the diagonal; it also writes each
    /// row's D = Σ dO ∘ O, which the key pass reads.
    Query,
    /// dK and dV, blocks of key rows walking the queries from the diagonal.
    Key,
}

impl Pass {
    pub const ALL: [Pass; 2] = [Pass::Query, Pass::Key];

    pub fn label(self) -> &'static str {
        match self {
            Pass::Query => "dq",
            Pass::Key => "dkv",
        }
    }
}

#[cfg(all(test, feature = "mlir"))]
mod tests {
    use super::*;

    /// MLA's forward and backward passes lower to PTX whose products are BF16 `wgmma`s (the
    /// scores 64 × 64 from shared memory, the accumulations' A from registers and B N-major),
    /// after the staged tiles are fenced for the tensor cores (the inputs copied as they are
    /// where packed, 16 bytes a store) or, in the forward on packed inputs, streamed by TMA
    /// through mbarriers, within a multiprocessor's shared memory, and, where
    /// `DSC_PTXAS` names ptxas, assemble for sm_90a (spilling only where said).
    #[test]
    fn the_attention_kernels_lower_to_warpgroup_products_and_assemble() {
        for bf16_inputs in [false, true] {
            let heads = Heads { qk: 192, v: 128, bf16_inputs };
            assert!(heads.shared_bytes().max(heads.backward_shared_bytes()) <= 227 * 1024);
            let scores = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16";
            let lowering = crate::mlir::lower::Lowering::default();
            // Per column block, in each of the two column loops (masked and not): the scores 12
            // products over Dqk, dP 8 over Dv, then P·V, dS·K, or dSᵀ·Q and Pᵀ·dO: 4 over the
            // 64 columns, as wide as the tile they read. The forward's (pipelined) first block's
            // scores come before its loops, the last block's accumulation after them.
            let kernels = [
                (attention_forward("attention", heads), 12 + 2 * 12, &[(128, 2 * 4 + 4)][..]),
                (attention_backward("attention", heads, Pass::Query), 2 * (12 + 8), &[(192, 2 * 4)]),
                (attention_backward("attention", heads, Pass::Key), 2 * (12 + 8), &[(192, 2 * 4), (128, 2 * 4)]),
            ];
            for (i, (mlir, score_products, accumulations)) in kernels.into_iter().enumerate() {
                let ptx = lowering.ptx(&mlir, false).expect("lowers");
                assert_eq!(ptx.matches(scores).count(), score_products, "{ptx}");
                for &(width, count) in accumulations {
                    let accumulation = format!("wgmma.mma_async.sync.aligned.m64n{width}k16.f32.bf16.bf16");
                    assert_eq!(ptx.matches(&accumulation).count(), count, "{ptx}");
                }
                assert!(ptx.contains("ex2.approx.ftz.f32"), "{ptx}");
                let tma = ptx.matches("cp.async.bulk.tensor.2d.shared::cluster.global").count();
                // 16-byte f32 loads are only the warpgroups' own f32 row tiles' (staged once: 128
                // threads, 16 bytes each, 64 rows of 192 or 128) and, in the query pass, D's (dO
                // and O, 32).
                let (q, k, v, d_o) = if bf16_inputs { (0, 0, 0, 16) } else { (24, 24, 16, 16) };
                let rows = [q, q + d_o + 32, k + v][i];
                assert_eq!(ptx.matches("ld.global.v4.b32").count(), rows, "{ptx}");
                if heads.streams() {
                    // The producer's TMA copies: both warpgroups' row tiles (3 boxes of 64
                    // columns for Q or K, 2 for V), then per column block the column tensors'
                    // (K's 3 and V's 2, or Q's 3 and dO's 2) and, in the key pass, the terms
                    // (the log-sum-exp and D: 256 bytes each). No block-wide barrier
                    // after the roles part: the query pass's warpgroups each wait for their own
                    // dO's staging, then store it (2 boxes) into the packed copy.
                    let rows = [2 * 3, 2 * 3, 2 * (3 + 2)][i];
                    assert_eq!(tma, rows + 3 + 2, "{ptx}");
                    let terms = ptx.matches("cp.async.bulk.shared::cluster.global.mbarrier").count();
                    assert_eq!(terms, [0, 0, 2][i], "{ptx}");
                    let stores = ptx.matches("cp.async.bulk.tensor.2d.global.shared::cta").count();
                    assert_eq!(stores, if i == 1 { 2 } else { 0 }, "{ptx}");
                    assert!(ptx.contains(".maxntid 384, 1, 1") && ptx.contains("setmaxnreg.inc"), "{ptx}");
                    assert_eq!(ptx.matches("bar.sync").count(), if i == 1 { 2 } else { 1 }, "{ptx}");
                    assert!(ptx.contains("mbarrier.try_wait.parity") && ptx.contains("mbarrier.arrive.expect_tx"));
                    assert!(!ptx.contains("cp.async.cg.shared.global"), "{ptx}");
                    // The forward's scores read Q from registers and the query pass's dP dO
                    // (each thread's 4 words per 16 of the width, read once); the rest read
                    // their rows from their tiles.
                    let held = ptx.lines().filter(|line| line.contains(scores) && line.contains("}, {%r")).count();
                    let loads = ptx.matches("ld.shared.b32").count();
                    let (held_products, held_loads) = [(score_products, 4 * 12), (2 * 8, 4 * 8), (0, 0)][i];
                    assert_eq!((held, loads), (held_products, held_loads), "{ptx}");
                } else {
                    assert_eq!(tma, 0, "{ptx}");
                    assert!(ptx.contains("fence.proxy.async.shared::cta"), "{ptx}");
                    // Every column tile is fetched a block ahead by `cp.async` (f32 tensors' as
                    // they are).
                    assert!(ptx.contains("cp.async.cg.shared.global"), "{ptx}");
                }
                if let Some(report) = crate::mlir::ptx::assemble(&ptx) {
                    let spilled = crate::mlir::ptx::spilled_bytes(&report);
                    eprintln!("bf16 inputs {bf16_inputs}, pass {i}: {spilled} bytes spilled\n{report}");
                    // The f32 inputs (a test plans' policy) spill in the query and key passes,
                    // their column tiles' raw buffers costing addresses.
                    let allowed = if bf16_inputs { 0 } else { 512 };
                    assert!(spilled <= allowed, "{report}");
                }
            }
        }
    }
}
