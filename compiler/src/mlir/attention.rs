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

mod ring;

use super::ptx::{Lines, Loop};
use crate::fuse::kernels::base;
use crate::graph::ir::{Function, Node, Op};
pub use ring::{map_args, MAP_BOX};
use ring::{Ring, RowTiles};
use std::collections::HashSet;

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

    /// Whether the forward (`None`) or a backward pass streams its tiles by TMA from a
    /// producer warpgroup ([`ring`]): all of them where Q, K and V are packed BF16 (the key
    /// passes' dO from the packed copy the query pass writes). It then takes the tensor maps
    /// [`map_args`] names after its other arguments.
    pub fn streams(self, _pass: Option<Pass>) -> bool {
        self.bf16_inputs
    }

    /// Threads of a block of the forward (`None`) or a backward pass: the warpgroups, and the
    /// producer's where it [`Heads::streams`].
    pub fn threads(self, pass: Option<Pass>) -> u32 {
        if self.streams(pass) {
            ring::STREAMING_THREADS
        } else {
            THREADS
        }
    }

    /// Shared bytes of the columns of the forward (`None`) or a backward pass.
    fn columns_bytes(self, pass: Option<Pass>) -> u64 {
        if self.streams(pass) {
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

    pub fn check(self) -> Result<Self, String> {
        let fits = |d: u32| d > 0 && d.is_multiple_of(64) && d <= 256;
        if !fits(self.qk) || !fits(self.v) {
            return Err(format!("head dims {}/{} must be multiples of 64 up to 256", self.qk, self.v));
        }
        Ok(self)
    }
}

/// Where a block is: its threads' places, the (batch, head) it works on and the element
/// offsets of that head's first row in Q/K (`qk_at`) and V/O (`v_at`) and between rows, and
/// the constants every kernel uses.
struct Block {
    tid: String,
    /// The thread's warpgroup and its place in it.
    warpgroup: String,
    group_tid: String,
    quad_col: String,
    /// The thread's two rows in its warpgroup's tile: the warp's 16, lane / 4 and lane / 4 + 8.
    my_rows: [String; 2],
    seq: String,
    /// batch · H + head: the blocks' y.
    bh: String,
    /// The head, and its sequence's first row among the B·S (batch · S): the tensor maps'
    /// coordinates ([`ring`]).
    head: String,
    sequence_row: String,
    qk_at: String,
    v_at: String,
    qk_row: String,
    v_row: String,
    zero: String,
    minus_inf: String,
    /// The softmax scale times log₂e: scores to base-2 logits.
    log2_scale: String,
    minus_log2e: String,
    /// Shared memory's first byte (i64).
    smem: String,
    /// The blocks along x (i64: S / 128) and this one's index.
    blocks: String,
    block: String,
}

impl Block {
    /// The block of a kernel for `heads` (checked: the generators' callers pass checked dims).
    fn new(g: &mut Lines, heads: Heads) -> Self {
        let heads = heads.check().expect("valid head dims");
        let log2e = g.f32(std::f64::consts::LOG2_E);
        let log2_scale = g.line(format!("llvm.fmul %scale, {log2e} : f32"));
        let minus_log2e = g.f32(-std::f64::consts::LOG2_E);
        let zero = g.f32(0.0);
        let minus_inf = g.line("llvm.mlir.constant(0xFF800000 : f32) : f32");
        let tid = g.index_i64("gpu.thread_id x");
        let warpgroup = g.op_c("udiv", &tid, 128);
        let group_tid = g.op_c("urem", &tid, 128);
        let warp = g.op_c("udiv", &group_tid, 32);
        let lane = g.op_c("urem", &tid, 32);
        let quad_row = g.op_c("udiv", &lane, 4);
        let quad_col = g.op_c("urem", &lane, 4);
        let warp_row = g.op_c("mul", &warp, 16);
        let row = g.op("add", &warp_row, &quad_row);
        let my_rows = [row.clone(), g.op_c("add", &row, 8)];
        let [seq, nheads] = ["%seq", "%heads"].map(|x| g.line(format!("llvm.zext {x} : i32 to i64")));
        let bh = g.index_i64("gpu.block_id y");
        let batch = g.op("udiv", &bh, &nheads);
        let head = g.op("urem", &bh, &nheads);
        let token0 = g.op("mul", &batch, &seq);
        let first_row = g.op("mul", &token0, &nheads);
        let first_row = g.op("add", &first_row, &head);
        let [qk_at, v_at] = [heads.qk, heads.v].map(|w| g.op_c("mul", &first_row, w.into()));
        let [qk_row, v_row] = [heads.qk, heads.v].map(|w| g.op_c("mul", &nheads, w.into()));
        let smem = g.line("llvm.mlir.addressof @tiles : !llvm.ptr<3>");
        let smem = g.line(format!("llvm.ptrtoint {smem} : !llvm.ptr<3> to i64"));
        let blocks = g.index_i64("gpu.grid_dim x");
        let block = g.index_i64("gpu.block_id x");
        Block {
            tid,
            warpgroup,
            group_tid,
            quad_col,
            my_rows,
            seq,
            bh,
            head,
            sequence_row: token0,
            qk_at,
            v_at,
            qk_row,
            v_row,
            zero,
            minus_inf,
            log2_scale,
            minus_log2e,
            smem,
            blocks,
            block,
        }
    }

    /// The blocks counted from the last (i64): the order in which the block with most work
    /// starts first where that is the last row block.
    fn reversed_block(&self, g: &mut Lines) -> String {
        let last = g.op_c("sub", &self.blocks, 1);
        g.op("sub", &last, &self.block)
    }

    /// The warpgroup's 64-row tile of the rows of `block` (i64), and its first row.
    fn tile(&self, g: &mut Lines, block: &str) -> (String, String) {
        let tile = g.op_c("mul", block, WARPGROUPS.into());
        let tile = g.op("add", &tile, &self.warpgroup);
        let row0 = g.op_c("mul", &tile, TILE_ROWS.into());
        (tile, row0)
    }

    /// Waits for the warpgroup's threads (named barrier 1 + its index: the block's others go
    /// on).
    fn warpgroup_barrier(&self, g: &mut Lines) {
        let id = g.op_c("add", &self.warpgroup, 1);
        let id = g.line(format!("llvm.trunc {id} : i64 to i32"));
        g.asm("bar.sync $0, 128;", &[(id, "r", "i32")]);
    }

    /// The warpgroup's own tile of `bytes` from shared byte `at`, the tiles of the block's
    /// warpgroups one after another.
    fn own_tile(&self, g: &mut Lines, at: &str, bytes: u64) -> String {
        let offset = g.op_c("mul", &self.warpgroup, bytes);
        g.op("add", at, &offset)
    }

    /// The element offset of the head's first row of a tensor of `layout`, between its rows,
    /// and its width.
    fn place(&self, layout: Layout, heads: Heads) -> (&str, &str, u32) {
        let (first, row) = match layout {
            Layout::Qk => (&self.qk_at, &self.qk_row),
            Layout::V => (&self.v_at, &self.v_row),
        };
        (first, row, layout.width(heads))
    }

    /// Stages the 64 rows from `row0` of tensor `src` (of `layout`) at byte `at` of shared
    /// memory by `how`, by the block's threads or (`own`) the warpgroup's.
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &self,
        g: &mut Lines,
        src: &str,
        how: Move,
        layout: Layout,
        heads: Heads,
        row0: &str,
        at: &str,
        own: bool,
    ) {
        let (first, row, width) = self.place(layout, heads);
        let (tid, threads) = if own { (&self.group_tid, 128) } else { (&self.tid, THREADS) };
        stage(g, src, how, first, row, row0, width, at, tid, threads);
    }

    /// Stages the warpgroup's own 64 rows from `row0` of tensor `src` at byte `at`: copied
    /// where packed, else rounded.
    fn stage_own(&self, g: &mut Lines, src: &str, layout: Layout, heads: Heads, row0: &str, at: &str) {
        let how = if packed(heads, src) { Move::Copy } else { Move::Round };
        self.stage(g, src, how, layout, heads, row0, at, true);
    }

    /// The warpgroup's 64 × 64 products of the `rows` (A) with the column tile at `cols` (B),
    /// both K-major over `width`: for the thread, 8 tiles of 8 columns, 4 values each (its
    /// warp's rows g, g + 8; columns 2t, 2t + 1).
    fn products(&self, g: &mut Lines, rows: &Rows, cols: &str, width: u32) -> Vec<Vec<String>> {
        let held = match rows {
            Rows::Staged(_) => &[][..],
            Rows::Held(fragments) => fragments,
        };
        let d = fence(g, &vec![self.zero.clone(); 32], held);
        let d = issue_products(g, d, rows, cols, width);
        completed(g, &d).chunks(4).map(<[String]>::to_vec).collect()
    }

    /// The warpgroup's 64 rows of the tile staged at `tile` (`width` wide), read into registers
    /// as the A of products ([`Rows::Held`]): per 16 columns k, the thread's four BF16 pairs,
    /// (row, column) = (g, 16k + 2t), (g + 8, 16k + 2t), (g, 16k + 2t + 8), (g + 8, 16k + 2t + 8)
    /// of its warp's 16, each 4 bytes of the swizzled tile (its 16-byte chunk c of row r at
    /// chunk c ⊕ (r mod 8); conflict-free: a warp's eight rows g take eight chunks, its four
    /// t the chunk's four words).
    fn hold(&self, g: &mut Lines, tile: &str, width: u32) -> Vec<[String; 4]> {
        let rows = self.my_rows.clone().map(|row| {
            let at = g.op_c("mul", &row, 128);
            g.op("add", tile, &at)
        });
        let group_row = g.op_c("urem", &self.my_rows[0], 8);
        let word = g.op_c("mul", &self.quad_col, 4);
        (0..u64::from(width / 16))
            .map(|k| {
                std::array::from_fn(|i| {
                    let chunk = g.op_c("xor", &group_row, 2 * (k % 4) + (i / 2) as u64);
                    let chunk = g.op_c("mul", &chunk, 16);
                    let at = g.op_c("add", &rows[i % 2], k / 4 * REGION);
                    let at = g.op("add", &at, &chunk);
                    let at = g.op("add", &at, &word);
                    let p = g.line(format!("llvm.inttoptr {at} : i64 to !llvm.ptr<3>"));
                    g.line(format!("llvm.load {p} : !llvm.ptr<3> -> i32"))
                })
            })
            .collect()
    }

    /// `acc` (64 rows × `width` per warpgroup; per 8 columns 4 values) += `p` (the 64 × 64
    /// [`Block::products`] gives, rounded to BF16: each warp's rows of it are its rows of A)
    /// times the staged 64-row tile at `tile`, read N-major (its rows along the product's K).
    fn accumulate(&self, g: &mut Lines, acc: &mut [String], p: &[Vec<String>], tile: &str, width: u32) {
        let a = operands(g, p);
        let d = fence(g, acc, &a);
        let d = issue_accumulation(g, d, &a, tile, width);
        acc.clone_from_slice(&completed(g, &d));
    }

    /// The forward's online softmax of one column block: `scores` become their probabilities
    /// against the rows' new maximum scores (over the quad's four threads, from the old
    /// `maxima`); returns those maxima, the corrections of the old sums and outputs (2 to the
    /// old maximum's logit minus the new's: 0 where the old is −∞, no key yet) and the new
    /// sums (the old `sums` corrected plus the probabilities), each per thread's row.
    fn softmax(
        &self,
        g: &mut Lines,
        scores: &mut [Vec<String>],
        maxima: &[String],
        sums: &[String],
    ) -> ([String; 2], [String; 2], [String; 2]) {
        let mut row = |r: usize| {
            let mut max = maxima[r].clone();
            for tile in scores.iter() {
                for e in 0..2 {
                    max = g.line(format!("llvm.intr.maxnum({max}, {}) : (f32, f32) -> f32", tile[2 * r + e]));
                }
            }
            let new = quad_reduce(g, &max, Combine::Max);
            let logit = g.line(format!("llvm.fmul {new}, {} : f32", self.log2_scale));
            let shift = g.line(format!("llvm.fneg {logit} : f32"));
            let alpha = self.exp2_logit(g, &maxima[r], &shift);
            (new, shift, alpha)
        };
        let rows = [row(0), row(1)];
        for tile in scores.iter_mut() {
            for (e, x) in tile.iter_mut().enumerate() {
                *x = self.exp2_logit(g, x, &rows[e / 2].1);
            }
        }
        let new_sums = [0, 1].map(|r| {
            let mut sum = g.line(format!("llvm.fmul {}, {} : f32", sums[r], rows[r].2));
            for tile in scores.iter() {
                for e in 0..2 {
                    sum = g.line(format!("llvm.fadd {sum}, {} : f32", tile[2 * r + e]));
                }
            }
            sum
        });
        let [(m0, _, a0), (m1, _, a1)] = rows;
        ([m0, m1], [a0, a1], new_sums)
    }

    /// `scores` (of column block `j` and the rows of tile `tile`) set to −∞ where `keep` drops
    /// the column: on the diagonal block the columns past (or before) the row, all of a block
    /// past (or before) the diagonal (the last (or first) block of the masked loop for the
    /// warpgroup whose diagonal comes earlier (or later)); columns are 8n + 2t + {0, 1}, rows
    /// the thread's two. Only the [`column_loops`]' masked blocks call it.
    fn mask(&self, g: &mut Lines, scores: &mut [Vec<String>], j: &str, tile: &str, keep: Order) {
        let diagonal = g.line(format!("llvm.icmp \"eq\" {j}, {tile} : i64"));
        let beyond = match keep {
            Order::ColumnsUpToRow => g.line(format!("llvm.icmp \"ugt\" {j}, {tile} : i64")),
            Order::ColumnsFromRow => g.line(format!("llvm.icmp \"ult\" {j}, {tile} : i64")),
        };
        let col = g.op_c("mul", &self.quad_col, 2);
        for (n, tile) in scores.iter_mut().enumerate() {
            for (e, x) in tile.iter_mut().enumerate() {
                let column = g.op_c("add", &col, (8 * n + e % 2) as u64);
                let row = &self.my_rows[e / 2];
                let outside = match keep {
                    Order::ColumnsUpToRow => g.line(format!("llvm.icmp \"ugt\" {column}, {row} : i64")),
                    Order::ColumnsFromRow => g.line(format!("llvm.icmp \"ult\" {column}, {row} : i64")),
                };
                let masked = g.line(format!("llvm.and {diagonal}, {outside} : i1"));
                let masked = g.line(format!("llvm.or {beyond}, {masked} : i1"));
                *x = g.line(format!("llvm.select {masked}, {}, {x} : i1, f32", self.minus_inf));
            }
        }
    }

    /// 2 to the power of score `x`'s base-2 logit plus `shift` (a row's or column's negated
    /// base-2 maximum or log-sum-exp): one fused multiply-add and `ex2`.
    fn exp2_logit(&self, g: &mut Lines, x: &str, shift: &str) -> String {
        let y = g.line(format!("llvm.intr.fma({x}, {}, {shift}) : (f32, f32, f32) -> f32", self.log2_scale));
        exp2(g, &y)
    }

    /// Stores `acc` (the warp's 16 rows, times `factor`) at rows `row0 + r` of `dst` (of
    /// `layout`).
    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        g: &mut Lines,
        dst: &str,
        layout: Layout,
        heads: Heads,
        acc: &[String],
        row0: &str,
        factor: Option<&str>,
    ) {
        let (first, row_elems, width) = self.place(layout, heads);
        let col = g.op_c("mul", &self.quad_col, 2);
        for (r, my_row) in self.my_rows.iter().enumerate() {
            let row = g.op("add", row0, my_row);
            let at = g.op("mul", &row, row_elems);
            let at = g.op("add", &at, first);
            let at = g.op("add", &at, &col);
            for n in 0..(width / 8) as usize {
                let values = [0, 1].map(|e| {
                    let x = &acc[4 * n + 2 * r + e];
                    match factor {
                        Some(f) => g.line(format!("llvm.fmul {x}, {f} : f32")),
                        None => x.clone(),
                    }
                });
                let at = g.op_c("add", &at, 8 * n as u64);
                let p = g.line(format!("llvm.getelementptr {dst}[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
                let pair = g.line("llvm.mlir.poison : vector<2xf32>");
                let [first, second] = [g.i32(0), g.i32(1)];
                let pair = g.line(format!("llvm.insertelement {}, {pair}[{first} : i32] : vector<2xf32>", values[0]));
                let pair = g.line(format!("llvm.insertelement {}, {pair}[{second} : i32] : vector<2xf32>", values[1]));
                g.stmt(format!("llvm.store {pair}, {p} {{alignment = 8 : i64}} : vector<2xf32>, !llvm.ptr<1>"));
            }
        }
    }

    /// The log-sum-exp of row `row0 + row`, base 2, negated ([`Block::exp2_logit`]'s shift).
    fn negated_base2_lse(&self, g: &mut Lines, row0: &str, row: &str) -> String {
        let lse = self.row_value(g, "%lse", row0, row);
        g.line(format!("llvm.fmul {lse}, {} : f32", self.minus_log2e))
    }

    /// D = Σ dO ∘ O of the thread's row `row0 + row` (a quarter of the columns from each
    /// thread of the quad, summed over it), written to `%delta` by the quad's first thread.
    fn delta(&self, g: &mut Lines, heads: Heads, row0: &str, row: &str) -> String {
        let at = g.op("add", row0, row);
        let at = g.op("mul", &at, &self.v_row);
        let at = g.op("add", &at, &self.v_at);
        let quarter = u64::from(heads.v / 4);
        let from = g.op_c("mul", &self.quad_col, quarter);
        let at = g.op("add", &at, &from);
        let mut sum = self.zero.clone();
        for i in 0..quarter / 4 {
            let at = g.op_c("add", &at, 4 * i);
            let [o, d] = ["%o", "%do"].map(|src| {
                let p = g.line(format!("llvm.getelementptr {src}[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
                g.line(format!("llvm.load {p} {{alignment = 16 : i64}} : !llvm.ptr<1> -> vector<4xf32>"))
            });
            let product = g.line(format!("llvm.fmul {o}, {d} : vector<4xf32>"));
            for k in 0..4 {
                let k = g.i32(k);
                let x = g.line(format!("llvm.extractelement {product}[{k} : i32] : vector<4xf32>"));
                sum = g.line(format!("llvm.fadd {sum}, {x} : f32"));
            }
        }
        let sum = quad_reduce(g, &sum, Combine::Add);
        let zero = g.i64(0);
        let leads = g.line(format!("llvm.icmp \"eq\" {}, {zero} : i64", self.quad_col));
        g.stmt(format!("scf.if {leads} {{"));
        let at = g.op("mul", &self.bh, &self.seq);
        let at = g.op("add", &at, row0);
        let at = g.op("add", &at, row);
        let p = g.line(format!("llvm.getelementptr %delta[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
        g.stmt(format!("llvm.store {sum}, {p} : f32, !llvm.ptr<1>"));
        g.stmt("}");
        sum
    }

    /// A per-row f32 of [B, H, S] (`lse`, `delta`) at the block's row `row0 + row` (i64).
    fn row_value(&self, g: &mut Lines, src: &str, row0: &str, row: &str) -> String {
        let at = g.op("mul", &self.bh, &self.seq);
        let at = g.op("add", &at, row0);
        let at = g.op("add", &at, row);
        let p = g.line(format!("llvm.getelementptr {src}[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
        g.line(format!("llvm.load {p} : !llvm.ptr<1> -> f32"))
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

/// The column loop's two staged tensors (of widths Dqk and Dv). Each tensor trails the loop by
/// its lag (0 or 1): at the loop's block j its tile of block j − lag is read (the forward's V
/// trails its K, the scores of block j computed beside the accumulation of block j − 1). Every
/// tile is fetched by `cp.async` while the block before it is read: a packed tensor's (BF16 as
/// staged) into the second of its two tiles (block j's in tile j mod 2); an f32 tensor's values
/// as they are into its raw buffer ([`Move::Fetch`]), rounded into its one tile at the start of
/// the block that reads them ([`Move::Convert`]: each thread its own copies, right after awaiting
/// them, before it fetches the next block's into the same slots).
struct Columns<'a> {
    heads: Heads,
    sources: [(&'a str, Layout); 2],
    lags: [u64; 2],
    /// Each tensor's tile of an even and of an odd block (shared bytes, i64; the same tile twice
    /// for an f32 tensor), and an f32 tensor's raw buffer.
    tiles: [[String; 2]; 2],
    raw: [Option<String>; 2],
    /// Per-column f32 tensors ([B, H, S]: the key pass's log-sum-exp and D) whose values for
    /// the block's 64 columns are copied with the untrailing tiles, 256 bytes each, and each
    /// buffer's place for them ([`TERMS_BYTES`]).
    terms: &'a [&'a str],
    term_buffers: [String; 2],
}

impl<'a> Columns<'a> {
    /// Shared bytes a tensor of `width` takes: two tiles, or (f32) one and its raw buffer, as
    /// wide in f32.
    fn tensor_bytes(heads: Heads, src: &str, width: u32) -> u64 {
        let tile = Heads::tile_bytes(width);
        if packed(heads, src) {
            2 * tile
        } else {
            3 * tile
        }
    }

    /// Shared bytes the columns `sources` take: the tensors' tiles and raw buffers, and two
    /// blocks' terms.
    fn bytes(heads: Heads, (sources, _, terms): &ColumnSources) -> u64 {
        let tensors: u64 =
            sources.iter().map(|&(src, layout)| Self::tensor_bytes(heads, src, layout.width(heads))).sum();
        tensors + if terms.is_empty() { 0 } else { 2 * TERMS_BYTES }
    }

    /// The columns `sources` (each trailing by its lag, with their terms) from shared byte
    /// `at` (1,024-byte aligned): the tensors' tiles, then the raw buffers, then the terms.
    fn new(g: &mut Lines, heads: Heads, (sources, lags, terms): ColumnSources, at: &str) -> Columns<'a> {
        assert!(terms.len() as u64 * TILE_ROWS as u64 * 4 <= TERMS_BYTES, "terms fit their buffers");
        let mut next = at.to_string();
        let mut place = |g: &mut Lines, bytes: u64| {
            let here = next.clone();
            next = g.op_c("add", &here, bytes);
            here
        };
        let tiles = sources.map(|(src, layout)| {
            let tile = Heads::tile_bytes(layout.width(heads));
            let even = place(g, tile);
            let odd = if packed(heads, src) { place(g, tile) } else { even.clone() };
            [even, odd]
        });
        let raw = sources
            .map(|(src, layout)| (!packed(heads, src)).then(|| place(g, 2 * Heads::tile_bytes(layout.width(heads)))));
        let term_buffers = [place(g, TERMS_BYTES), place(g, TERMS_BYTES)];
        Columns { heads, sources, lags, tiles, raw, terms, term_buffers }
    }

    /// Of the places of an even and an odd column block: column block `block`'s (i64).
    fn select(g: &mut Lines, places: [&String; 2], block: &str) -> String {
        let parity = g.op_c("and", block, 1);
        let zero = g.i64(0);
        let odd = g.line(format!("llvm.icmp \"ne\" {parity}, {zero} : i64"));
        g.line(format!("llvm.select {odd}, {}, {} : i1, i64", places[1], places[0]))
    }

    /// Where tensor `t`'s tile of column block `block` (i64) lies.
    fn tile(&self, g: &mut Lines, t: usize, block: &str) -> String {
        Self::select(g, [&self.tiles[t][0], &self.tiles[t][1]], block)
    }

    /// Where the terms of column block `block` (i64) lie: term k's value of the block's column
    /// c at byte 256k + 4c.
    fn terms(&self, g: &mut Lines, block: &str) -> String {
        Self::select(g, [&self.term_buffers[0], &self.term_buffers[1]], block)
    }

    /// Copies the terms of column block `block` into its buffer: 16 bytes a thread, 16 threads a
    /// term.
    fn copy_terms(&self, g: &mut Lines, b: &Block, block: &str) {
        if self.terms.is_empty() {
            return;
        }
        let copying = g.op_c("udiv", &b.tid, 16);
        let count = g.i64(self.terms.len() as u64);
        let copies = g.line(format!("llvm.icmp \"ult\" {copying}, {count} : i64"));
        g.stmt(format!("scf.if {copies} {{"));
        let chunk = g.op_c("urem", &b.tid, 16);
        let at = self.terms(g, block);
        let to = g.op_c("mul", &copying, u64::from(TILE_ROWS) * 4);
        let to = g.op("add", &at, &to);
        let offset = g.op_c("mul", &chunk, 16);
        let to = g.op("add", &to, &offset);
        let to = g.line(format!("llvm.trunc {to} : i64 to i32"));
        let c0 = g.op_c("mul", block, TILE_ROWS.into());
        let first = g.op("mul", &b.bh, &b.seq);
        let first = g.op("add", &first, &c0);
        let lane = g.op_c("mul", &chunk, 4);
        let from = g.op("add", &first, &lane);
        // The term this thread copies: the k-th where `copying` is k.
        let source = self.terms.iter().enumerate().skip(1).fold(self.terms[0].to_string(), |earlier, (k, term)| {
            let k = g.i64(k as u64);
            let this = g.line(format!("llvm.icmp \"eq\" {copying}, {k} : i64"));
            g.line(format!("llvm.select {this}, {term}, {earlier} : i1, !llvm.ptr<1>"))
        });
        let p = g.line(format!("llvm.getelementptr {source}[{from}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
        let from = g.line(format!("llvm.ptrtoint {p} : !llvm.ptr<1> to i64"));
        g.asm("cp.async.cg.shared.global [$0], [$1], 16;", &[(to, "r", "i32"), (from, "l", "i64")]);
        g.stmt("}");
    }

    /// Moves tensor `t`'s tile of column block `block` by `how` into its tile.
    fn move_tile(&self, g: &mut Lines, b: &Block, t: usize, block: &str, how: Move) {
        let c0 = g.op_c("mul", block, TILE_ROWS.into());
        let (src, layout) = self.sources[t];
        let at = self.tile(g, t, block);
        b.stage(g, src, how, layout, self.heads, &c0, &at, false);
    }

    /// Issues the copies of tensor `t`'s values of column block `block` (i64).
    fn fetch(&self, g: &mut Lines, b: &Block, t: usize, block: &str) {
        let how = match &self.raw[t] {
            Some(raw) => Move::Fetch { raw },
            None => Move::Copy,
        };
        self.move_tile(g, b, t, block, how);
    }

    /// Rounds into its tile each f32 tensor's values (fetched and awaited) read at column block
    /// `j` of a walk from block `first` (a trailing tensor's of block j − lag, none before
    /// `first`), of the tensors whose lag `taken` takes.
    fn convert(&self, g: &mut Lines, b: &Block, [first, j]: [&str; 2], taken: impl Fn(u64) -> bool) {
        for t in (0..2).filter(|&t| taken(self.lags[t])) {
            let Some(raw) = &self.raw[t] else { continue };
            let lag = self.lags[t];
            let block = g.op_c("sub", j, lag);
            if lag > 0 {
                let earliest = g.op_c("add", first, lag);
                let exists = g.line(format!("llvm.icmp \"uge\" {j}, {earliest} : i64"));
                g.stmt(format!("scf.if {exists} {{"));
            }
            self.move_tile(g, b, t, &block, Move::Convert { raw });
            if lag > 0 {
                g.stmt("}");
            }
        }
    }

    /// Before the loop starting at block `first`: the copies of its untrailing tiles and its
    /// terms (with the rows' copies issued before them, one group).
    fn prefetch(&self, g: &mut Lines, b: &Block, first: &str) {
        for t in (0..2).filter(|&t| self.lags[t] == 0) {
            self.fetch(g, b, t, first);
        }
        self.copy_terms(g, b, first);
        g.asm("cp.async.commit_group;", &[]);
    }

    /// At the start of block `j` of a walk over blocks `first..upper`: once every warpgroup
    /// has read the last block's tiles, this block's copies (issued at the last) are awaited,
    /// the f32 tensors' values rounded into their tiles, the copies for the next block issued
    /// (a trailing tensor's of this block), and the tiles fenced for the tensor cores; returns
    /// the tiles read at this block (a trailing tensor's of block j − lag).
    fn stage(&self, g: &mut Lines, b: &Block, j: &str, [first, upper]: [&str; 2]) -> [String; 2] {
        g.stmt("gpu.barrier");
        g.asm("cp.async.wait_group 0;", &[]);
        let next = g.op_c("add", j, 1);
        let more = g.line(format!("llvm.icmp \"ult\" {next}, {upper} : i64"));
        g.stmt(format!("scf.if {more} {{"));
        for t in (0..2).filter(|&t| self.lags[t] == 0 && self.raw[t].is_none()) {
            self.fetch(g, b, t, &next);
        }
        self.copy_terms(g, b, &next);
        g.stmt("}");
        self.convert(g, b, [first, j], |_| true);
        g.stmt(format!("scf.if {more} {{"));
        for t in (0..2).filter(|&t| self.lags[t] == 0 && self.raw[t].is_some()) {
            self.fetch(g, b, t, &next);
        }
        g.stmt("}");
        for t in (0..2).filter(|&t| self.lags[t] > 0) {
            self.fetch(g, b, t, j);
        }
        g.asm("cp.async.commit_group;", &[]);
        g.asm("fence.proxy.async.shared::cta;", &[]);
        g.stmt("gpu.barrier");
        [0, 1].map(|t| {
            let block = g.op_c("sub", j, self.lags[t]);
            self.tile(g, t, &block)
        })
    }

    /// After the walk over blocks `first..upper`: the trailing tensors' tiles of the last
    /// block, awaited (and rounded), fenced; returns the tiles of that block.
    fn drain(&self, g: &mut Lines, b: &Block, [first, upper]: [&str; 2]) -> [String; 2] {
        let last = g.op_c("sub", upper, 1);
        // Every warpgroup past the last block's products (an f32 tensor has one tile).
        g.stmt("gpu.barrier");
        g.asm("cp.async.wait_group 0;", &[]);
        self.convert(g, b, [first, upper], |lag| lag > 0);
        g.asm("fence.proxy.async.shared::cta;", &[]);
        g.stmt("gpu.barrier");
        [0, 1].map(|t| self.tile(g, t, &last))
    }
}

/// Which columns of the diagonal block a row keeps: the forward's and the query pass's rows
/// are queries (keys up to the row), the key pass's rows are keys (queries from the row).
#[derive(Clone, Copy)]
enum Order {
    ColumnsUpToRow,
    ColumnsFromRow,
}

/// How a staged tile is read by a product: along its rows (K-major: the scores' operands) or
/// down its columns (N-major: the B of the accumulations, its rows along the product's K).
#[derive(Clone, Copy)]
enum Major {
    K,
    N,
}

/// The `wgmma` descriptor of a staged tile from shared byte `at` (i64): 128-byte swizzle,
/// 8-row groups 1,024 bytes apart; N-major, its 64-column regions [`REGION`] bytes apart
/// (K-major products stay within a region: that offset is unused).
fn descriptor(g: &mut Lines, at: &str, major: Major) -> String {
    let regions = match major {
        Major::K => 16,
        Major::N => REGION,
    };
    let layout = super::ptx::swizzled_layout(g, regions, 1024);
    super::ptx::descriptor(g, &layout, at)
}

/// A product's A: a staged tile (its descriptor, K-major) or four BF16 pairs per thread.
enum Operand<'a> {
    Shared(String),
    Registers(&'a [String; 4]),
}

/// `d` (the warpgroup's 64 × `n` f32 accumulators, `n / 2` a thread) + A · B over 16 of K:
/// one `wgmma.mma_async` on BF16, B read `b_major` (N-major only beside A in registers); `add`
/// false starts from zero.
fn wgmma(g: &mut Lines, n: u32, d: &[String], a: Operand, (b, b_major): (&str, Major), add: bool) -> Vec<String> {
    let count = d.len();
    let accumulators: Vec<String> = (0..count).map(|i| format!("${i}")).collect();
    let next = 2 * count;
    let transposed_b = match b_major {
        Major::K => "0",
        Major::N => "1",
    };
    let (a_text, mut operands, transposed) = match a {
        Operand::Shared(desc) => (format!("${next}"), vec![(desc, "l", "i64")], format!("0, {transposed_b}")),
        Operand::Registers(regs) => (
            format!("{{${next}, ${}, ${}, ${}}}", next + 1, next + 2, next + 3),
            regs.iter().map(|r| (r.clone(), "r", "i32")).collect(),
            transposed_b.to_string(),
        ),
    };
    let (b_at, add_at) = (next + operands.len(), next + operands.len() + 1);
    operands.push((b.to_string(), "l", "i64"));
    operands.push((g.i32(u32::from(add)), "r", "i32"));
    let text = format!(
        r"{{\0A.reg .pred p;\0Asetp.ne.b32 p, ${add_at}, 0;\0Awgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{}}}, {a_text}, ${b_at}, p, 1, 1, {transposed};\0A}}",
        accumulators.join(", ")
    );
    g.asm_f32s(&text, d, &operands)
}

/// The rows of the scores' products (their A, K-major): a staged tile's `wgmma` descriptor
/// ([`Rows::staged`]), or the warpgroup's 64 rows held in registers ([`Block::hold`]: per 16
/// columns, four BF16 pairs a thread).
enum Rows<'a> {
    Staged(String),
    Held(&'a [[String; 4]]),
}

impl Rows<'_> {
    /// The rows staged at shared byte `at` (i64).
    fn staged(g: &mut Lines, at: &str) -> Self {
        Rows::Staged(descriptor(g, at, Major::K))
    }
}

/// `value` (i64) as this loop iteration's own (an opaque move): what is computed from it stays
/// in the loop. The row tiles' descriptors: hoisted, their products' 20 per-step descriptors
/// stay live across the key pass's loop and spill; a few adds an iteration instead.
fn in_iteration(g: &mut Lines, value: &str) -> String {
    g.asm_i64("mov.b64 $0, $1;", &[(value.to_string(), "l", "i64")])
}

/// The 64 × 64 products of the `rows` (A) with the column tile at `cols` (B), both K-major
/// over `width`, into `d` (32 fenced values, overwritten), issued, not awaited.
fn issue_products(g: &mut Lines, d: Vec<String>, rows: &Rows, cols: &str, width: u32) -> Vec<String> {
    let cols = descriptor(g, cols, Major::K);
    (0..u64::from(width / 16)).fold(d, |d, k| {
        // 16 columns (32 bytes) a product, four to a region's 128-byte rows.
        let offset = k / 4 * REGION + k % 4 * 32;
        let b = super::ptx::descriptor_past(g, &cols, offset);
        let a = match rows {
            Rows::Staged(tile) => Operand::Shared(super::ptx::descriptor_past(g, tile, offset)),
            Rows::Held(fragments) => Operand::Registers(&fragments[k as usize]),
        };
        wgmma(g, 64, &d, a, (&b, Major::K), k > 0)
    })
}

/// `p` (64 × 64 scores per warpgroup, 8 tiles of 4 a thread) rounded to BF16 as the A of a
/// product: per 16 of its K, four pairs.
fn operands(g: &mut Lines, p: &[Vec<String>]) -> Vec<[String; 4]> {
    (0..4)
        .map(|kk| {
            let (t0, t1) = (&p[2 * kk], &p[2 * kk + 1]);
            [pack(g, &t0[0], &t0[1]), pack(g, &t0[2], &t0[3]), pack(g, &t1[0], &t1[1]), pack(g, &t1[2], &t1[3])]
        })
        .collect()
}

/// `wgmma.fence` before products that read accumulators `d` and A operands `a` written since
/// the last (after every write of them: they are its inputs); `d` after it.
fn fence(g: &mut Lines, d: &[String], a: &[[String; 4]]) -> Vec<String> {
    let packed: Vec<(String, &str, &str)> = a.iter().flatten().map(|x| (x.clone(), "r", "i32")).collect();
    g.asm_f32s("wgmma.fence.sync.aligned;", d, &packed)
}

/// `d` (fenced) + A `a` ([`operands`]) times the staged 64-row tile at `tile`, read N-major (its
/// rows along the product's K), `width` wide: issued, not awaited.
fn issue_accumulation(g: &mut Lines, d: Vec<String>, a: &[[String; 4]], tile: &str, width: u32) -> Vec<String> {
    let tile = descriptor(g, tile, Major::N);
    a.iter().enumerate().fold(d, |d, (kk, a)| {
        // 16 rows of the tile a product.
        let b = super::ptx::descriptor_past(g, &tile, kk as u64 * 16 * 128);
        wgmma(g, width, &d, Operand::Registers(a), (&b, Major::N), true)
    })
}

/// Closes the group of the products issued since the last.
fn commit(g: &mut Lines) {
    g.asm("wgmma.commit_group.sync.aligned;", &[]);
}

/// `d` once at most `pending` of the committed groups are still running (the accumulators
/// pass through the wait, so nothing reads them before it).
fn awaited(g: &mut Lines, d: &[String], pending: u32) -> Vec<String> {
    g.asm_f32s(&format!("wgmma.wait_group.sync.aligned {pending};"), d, &[])
}

/// `d` once the products issued since the last commit are done.
fn completed(g: &mut Lines, d: &[String]) -> Vec<String> {
    commit(g);
    awaited(g, d, 0)
}

/// A walk over the column blocks software-pipelined within each warpgroup (FlashAttention-3's
/// intra-warpgroup overlap): a block's scores and the last block's probabilities times its
/// trailing tile (the columns' second tensor, lag 1) are issued together, and the tensor cores
/// run that accumulation while the scores become probabilities: the forward's walk over keys.
struct Pipelined<'a> {
    b: &'a Block,
    feed: Feed<'a>,
    order: Order,
    /// The row block (i64) and the warpgroup's tile of it, for the mask.
    row_block: &'a str,
    tile: &'a str,
}

impl Pipelined<'_> {
    /// Walks column blocks `first..last` (i64): the scores of the rows tile `rows` (K-major,
    /// `width` wide) with each block's first tile become probabilities by `probabilities` (of
    /// block j, on the values carried beside the accumulators, `extra`: returns them anew and
    /// the factors of the accumulators' two rows, if they change), which are accumulated
    /// (`count` values a thread) with the block's trailing tile. Returns the accumulators and
    /// the extra values after the last block.
    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        g: &mut Lines,
        [first, last]: [&str; 2],
        (rows, width, count): (&str, u32, usize),
        extra: Vec<String>,
        mut probabilities: impl FnMut(&mut Lines, &str, &mut [Vec<String>], &[String]) -> (Vec<String>, Option<[String; 2]>),
    ) -> (Vec<String>, Vec<String>) {
        let (b, feed) = (self.b, &self.feed);
        let trailing_width = feed.trailing_width();
        feed.prefetch(g, b, first);
        // The first block's probabilities (masked: the mask leaves a block off the diagonal
        // as it is).
        let [s_cols, _] = feed.stage(g, b, first, [first, last]);
        // A streamed walk's rows are read into registers once ([`Block::hold`]), its scores'
        // products then reading only their column tiles from shared memory (a staged walk's
        // staging takes those registers).
        let held = matches!(feed, Feed::Streamed(_)).then(|| b.hold(g, rows, width));
        let rows = match &held {
            Some(fragments) => Rows::Held(fragments),
            None => Rows::staged(g, rows),
        };
        let mut scores = b.products(g, &rows, &s_cols, width);
        b.mask(g, &mut scores, first, self.tile, self.order);
        let (extra, _) = probabilities(g, first, &mut scores, &extra);
        // Released once the scores are read.
        feed.release(g, b, 0, first);
        let n_extra = extra.len();
        // Carried: the accumulators, the extra values and the last block's probabilities as the
        // accumulation's A (BF16 pairs, carried as f32 bits).
        let mut initial = vec![b.zero.clone(); count];
        initial.extend(extra);
        initial.extend(carried_bits(g, &scores));
        let carried_a = |g: &mut Lines, carried: &[String]| -> Vec<[String; 4]> {
            let bits: Vec<String> =
                carried[count + n_extra..].iter().map(|x| g.line(format!("llvm.bitcast {x} : f32 to i32"))).collect();
            bits.chunks(4).map(|c| [c[0].clone(), c[1].clone(), c[2].clone(), c[3].clone()]).collect()
        };
        let second = g.op_c("add", first, 1);
        let state = column_loops(g, self.order, self.row_block, [&second, last], &initial, |g, j, carried, masked| {
            let [s_cols, trailing_tile] = feed.stage(g, b, j, [first, last]);
            let a = carried_a(g, carried);
            let fenced = fence(g, &[&carried[..count], &vec![b.zero.clone(); 32][..]].concat(), &a);
            let (acc, scores) = fenced.split_at(count);
            let scores = issue_products(g, scores.to_vec(), &rows, &s_cols, width);
            commit(g);
            let acc = issue_accumulation(g, acc.to_vec(), &a, &trailing_tile, trailing_width);
            commit(g);
            let mut scores: Vec<Vec<String>> = awaited(g, &scores, 1).chunks(4).map(<[String]>::to_vec).collect();
            if masked {
                b.mask(g, &mut scores, j, self.tile, self.order);
            }
            let (extra, factors) = probabilities(g, j, &mut scores, &carried[count..count + n_extra]);
            feed.release(g, b, 0, j);
            let mut acc = awaited(g, &acc, 0);
            feed.release(g, b, 1, j);
            if let Some(factors) = factors {
                for (i, x) in acc.iter_mut().enumerate() {
                    *x = g.line(format!("llvm.fmul {x}, {} : f32", factors[(i % 4) / 2]));
                }
            }
            let a = carried_bits(g, &scores);
            acc.into_iter().chain(extra).chain(a).collect()
        });
        // The last block's accumulation.
        let trailing_tile = feed.drain(g, b, [first, last]);
        let a = carried_a(g, &state);
        let acc = fence(g, &state[..count], &a);
        let acc = issue_accumulation(g, acc, &a, &trailing_tile, trailing_width);
        (completed(g, &acc), state[count..count + n_extra].to_vec())
    }
}

/// Where a [`Pipelined`] walk's column tiles come from: staged by the block's threads
/// ([`Columns`]; block-wide barriers between column blocks) or streamed by the producer warpgroup
/// ([`Ring`]; each warpgroup waits for its tiles and releases them).
#[derive(Clone, Copy)]
enum Feed<'a> {
    Staged(&'a Columns<'a>),
    Streamed(&'a Ring),
}

impl Feed<'_> {
    /// The width of the trailing tensor (the accumulations' B).
    fn trailing_width(&self) -> u32 {
        match self {
            Feed::Staged(columns) => columns.sources[1].1.width(columns.heads),
            Feed::Streamed(ring) => ring.width(1),
        }
    }

    /// Before the walk from block `first`: [`Columns::prefetch`].
    fn prefetch(&self, g: &mut Lines, b: &Block, first: &str) {
        if let Feed::Staged(columns) = self {
            columns.prefetch(g, b, first);
        }
    }

    /// The tiles read at block `j` of the walk over `first..upper`, ready.
    fn stage(&self, g: &mut Lines, b: &Block, j: &str, walk: [&str; 2]) -> [String; 2] {
        match self {
            Feed::Staged(columns) => columns.stage(g, b, j, walk),
            Feed::Streamed(ring) => ring.stage(g, j, walk[0]),
        }
    }

    /// After the products reading tensor `t`'s tile at block `j` are done: its release
    /// (staged tiles are released by the next block's barrier).
    fn release(&self, g: &mut Lines, b: &Block, t: usize, j: &str) {
        if let Feed::Streamed(ring) = self {
            ring.release(g, b, t, j);
        }
    }

    /// Where the per-column terms of block `j` lie ([`Columns::terms`], [`Ring::terms`]).
    fn terms(&self, g: &mut Lines, j: &str) -> String {
        match self {
            Feed::Staged(columns) => columns.terms(g, j),
            Feed::Streamed(ring) => ring.terms(g, j),
        }
    }

    /// After the walk over `first..upper`: the trailing tensor's tile of its last block, ready.
    fn drain(&self, g: &mut Lines, b: &Block, [first, upper]: [&str; 2]) -> String {
        match self {
            Feed::Staged(columns) => {
                let [_, trailing] = columns.drain(g, b, [first, upper]);
                trailing
            }
            Feed::Streamed(ring) => ring.drain(g, upper),
        }
    }
}

/// Probabilities `p` as a product's A operands ([`operands`]), in f32 bits to be carried by a
/// loop.
fn carried_bits(g: &mut Lines, p: &[Vec<String>]) -> Vec<String> {
    let a = operands(g, p);
    a.iter().flatten().map(|x| g.line(format!("llvm.bitcast {x} : i32 to f32"))).collect()
}

/// The column blocks from `first` to `last` (i64) of row block `row_block` in two `scf.for`
/// loops carrying the f32 values `initial`: those no row of the block masks, and the block's
/// own [`WARPGROUPS`] (the warpgroups' diagonals), masked; in `order`'s direction (queries
/// walk the keys up to their diagonal, `last`; keys the queries from theirs, `first`). `body`
/// writes an iteration: of column block j (i64), on the carried values, masked or not; it
/// returns the values carried on. The values after both loops.
fn column_loops(
    g: &mut Lines,
    order: Order,
    row_block: &str,
    [first, last]: [&str; 2],
    initial: &[String],
    mut body: impl FnMut(&mut Lines, &str, &[String], bool) -> Vec<String>,
) -> Vec<String> {
    let diagonal = g.op_c("mul", row_block, WARPGROUPS.into());
    let loops = match order {
        Order::ColumnsUpToRow => {
            let split = g.line(format!("llvm.intr.umax({first}, {diagonal}) : (i64, i64) -> i64"));
            [(first.to_string(), split.clone(), false), (split, last.to_string(), true)]
        }
        Order::ColumnsFromRow => {
            let past = g.op_c("add", &diagonal, WARPGROUPS.into());
            [(first.to_string(), past.clone(), true), (past, last.to_string(), false)]
        }
    };
    loops.into_iter().fold(initial.to_vec(), |state, (lower, upper, masked)| {
        let one = g.i64(1);
        let carried: Vec<(String, &str)> = state.iter().map(|x| (x.clone(), "f32")).collect();
        let Loop { index, carried, results } = g.open_for(&lower, &upper, &one, &carried);
        let next = body(g, &index, &carried, masked);
        g.stmt(format!("scf.yield {} : {}", next.join(", "), vec!["f32"; next.len()].join(", ")));
        g.stmt("}");
        (0..next.len()).map(|i| format!("{results}#{i}")).collect()
    })
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

/// The three kernels for `heads` in launch order, each (name, MLIR): the forward
/// `attention_fwd_qk{QK}_v{V}`, then the backward passes `attention_bwd_{dq,dkv}_qk{QK}_v{V}`
/// (`bf16_qk{QK}` where the inputs are packed).
pub fn kernels(heads: Heads) -> Vec<(String, String)> {
    let forward = kernel_name(heads, None);
    let mut kernels = vec![(forward.clone(), attention_forward(&forward, heads))];
    for pass in Pass::ALL {
        let name = kernel_name(heads, Some(pass));
        kernels.push((name.clone(), attention_backward(&name, heads, pass)));
    }
    kernels
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

/// The MLIR module of the forward kernel `name` for `heads`. Launch: grid (S / [`BLOCK_ROWS`],
/// B·H), [`THREADS`] threads, [`Heads::shared_bytes`] of dynamic shared memory; arguments Q, K, V,
/// O, LSE (pointers), S, H (u32; S a multiple of [`BLOCK_ROWS`]) and the softmax scale (f32).
pub fn attention_forward(name: &str, heads: Heads) -> String {
    let mut g = Lines::new();
    let b = Block::new(&mut g, heads);
    // The heaviest blocks (most keys) first.
    let q_block = b.reversed_block(&mut g);
    let (q_tile, q0) = b.tile(&mut g, &q_block);
    // The warpgroups' tiles of Q, then the columns'.
    let sq = b.own_tile(&mut g, &b.smem, Heads::tile_bytes(heads.qk));
    let columns_at = g.op_c("add", &b.smem, Heads::forward_rows_bytes(heads));
    let o_count = (heads.v / 8 * 4) as usize;
    let zero64 = g.i64(0);
    // Up to the last warpgroup's diagonal.
    let upper = g.op_c("add", &q_block, 1);
    let upper = g.op_c("mul", &upper, WARPGROUPS.into());
    let sources = column_sources(None);
    let (ring, columns);
    let feed = if heads.streams(None) {
        // The producer warpgroup streams Q, K and V; the others wait for them.
        let rows = RowTiles { tensors: vec![("%q", Layout::Qk, 0)], at: &b.smem, stride: Heads::tile_bytes(heads.qk) };
        ring = Ring::start(&mut g, &b, (heads, sources), &columns_at, &q_block, &rows, [&zero64, &upper]);
        ring.await_rows(&mut g);
        Feed::Streamed(&ring)
    } else {
        columns = Columns::new(&mut g, heads, sources, &columns_at);
        // The warpgroup's 64 rows of Q, read by the products of every key block.
        b.stage_own(&mut g, "%q", Layout::Qk, heads, &q0, &sq);
        Feed::Staged(&columns)
    };
    // Carried beside the output accumulators (16 rows × Dv per warp): each of the thread's two
    // rows' running maximum score and sum.
    let walk = Pipelined { b: &b, feed, order: Order::ColumnsUpToRow, row_block: &q_block, tile: &q_tile };
    let initial = [&b.minus_inf, &b.minus_inf, &b.zero, &b.zero].map(String::clone).to_vec();
    let (mut out, state) =
        walk.run(&mut g, [&zero64, &upper], (&sq, heads.qk, o_count), initial, |g, _, scores, carried| {
            let (maxima, alphas, sums) = b.softmax(g, scores, &carried[..2], &carried[2..]);
            (maxima.into_iter().chain(sums).collect(), Some(alphas))
        });

    // O / l for the thread's rows and columns; the log-sum-exp from the quad's first thread.
    let ln2 = g.f32(std::f64::consts::LN_2);
    let one = g.f32(1.0);
    for (r, my_row) in b.my_rows.iter().enumerate() {
        let l = quad_reduce(&mut g, &state[2 + r], Combine::Add);
        let inverse = g.line(format!("llvm.fdiv {one}, {l} : f32"));
        for n in 0..o_count / 4 {
            for e in 0..2 {
                let x = &mut out[4 * n + 2 * r + e];
                *x = g.line(format!("llvm.fmul {x}, {inverse} : f32"));
            }
        }
        // The row's base-2 logits' maximum plus log₂ of their sum, in natural log.
        let log = g.asm_f32("lg2.approx.ftz.f32 $0, $1;", &[(l, "f", "f32")]);
        let lse = g.line(format!("llvm.intr.fma({}, {}, {log}) : (f32, f32, f32) -> f32", state[r], b.log2_scale));
        let lse = g.line(format!("llvm.fmul {lse}, {ln2} : f32"));
        let leads = g.line(format!("llvm.icmp \"eq\" {}, {zero64} : i64", b.quad_col));
        g.stmt(format!("scf.if {leads} {{"));
        let at = g.op("mul", &b.bh, &b.seq);
        let at = g.op("add", &at, &q0);
        let at = g.op("add", &at, my_row);
        let p = g.line(format!("llvm.getelementptr %lse[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
        g.stmt(format!("llvm.store {lse}, {p} : f32, !llvm.ptr<1>"));
        g.stmt("}");
    }
    b.store(&mut g, "%o", Layout::V, heads, &out, &q0, None);
    let mut args = "%q: !llvm.ptr<1>, %k: !llvm.ptr<1>, %v: !llvm.ptr<1>, %o: !llvm.ptr<1>, %lse: !llvm.ptr<1>, \
                    %seq: i32, %heads: i32, %scale: f32"
        .to_string();
    if heads.streams(None) {
        g.stmt("}");
        args = format!("{args}, {}", map_args(None));
    }
    module(name, &args, g.text(), heads.threads(None))
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

/// The MLIR module of backward kernel `name` (`pass`) for `heads`. Launch: grid (S /
/// [`BLOCK_ROWS`], B·H), [`THREADS`] threads, [`Heads::backward_shared_bytes`]; arguments Q, K, V,
/// O, dO, LSE (the forward's), D ([B, H, S]: written by the query pass, read by the key pass),
/// the gradients it writes (dQ, or dK and dV; every element written), S, H (u32) and the
/// softmax scale (f32).
pub fn attention_backward(name: &str, heads: Heads, pass: Pass) -> String {
    let mut g = Lines::new();
    let b = Block::new(&mut g, heads);
    // The heaviest blocks first: the last query block has the most keys, the first key block
    // the most queries.
    let row_block = match pass {
        Pass::Query => b.reversed_block(&mut g),
        Pass::Key => b.block.clone(),
    };
    let (tile, r0) = b.tile(&mut g, &row_block);
    // The warpgroups' row tiles (both widths), then the columns'.
    let s_rows = b.own_tile(&mut g, &b.smem, Heads::tile_bytes(heads.qk) + Heads::tile_bytes(heads.v));
    let s_rows_v = g.op_c("add", &s_rows, Heads::tile_bytes(heads.qk));
    // Each row tensor's tile: the first at the warpgroup's, the second after it.
    let row_tiles = [(Layout::Qk, 0, &s_rows), (Layout::V, Heads::tile_bytes(heads.qk), &s_rows_v)];
    let place_of = |layout: Layout| row_tiles.iter().find(|t| t.0 == layout).expect("a row tile");
    let columns_at = g.op_c("add", &b.smem, Heads::backward_rows_bytes(heads));
    // The column blocks up to the last warpgroup's diagonal (queries) or from the first's
    // (keys).
    let (order, lower, upper) = match pass {
        Pass::Query => (Order::ColumnsUpToRow, g.i64(0), g.op_c("add", &row_block, 1)),
        Pass::Key => (Order::ColumnsFromRow, row_block.clone(), b.blocks.clone()),
    };
    let [lower, upper] = [lower, upper].map(|x| g.op_c("mul", &x, WARPGROUPS.into()));
    let sources = column_sources(Some(pass));
    let (ring, columns);
    let rows = row_sources(Some(pass));
    let feed = if heads.streams(Some(pass)) {
        // The producer warpgroup streams the packed row tensors and the columns; each consumer
        // stages its f32 rows (the query pass's dO) itself, and stores them, rounded, into dO's
        // packed copy, which the key pass streams.
        let streamed = rows.iter().filter(|(src, _)| packed(heads, src));
        let tensors = streamed.map(|&(src, layout)| (src, layout, place_of(layout).1)).collect();
        let stride = Heads::tile_bytes(heads.qk) + Heads::tile_bytes(heads.v);
        let streamed = RowTiles { tensors, at: &b.smem, stride };
        ring = Ring::start(&mut g, &b, (heads, sources), &columns_at, &row_block, &streamed, [&lower, &upper]);
        for &(src, layout) in rows.iter().filter(|(src, _)| !packed(heads, src)) {
            let at = place_of(layout).2;
            b.stage_own(&mut g, src, layout, heads, &r0, at);
            b.warpgroup_barrier(&mut g);
            ring::store_rows(&mut g, &b, heads, at, &r0);
        }
        ring.await_rows(&mut g);
        Feed::Streamed(&ring)
    } else {
        columns = Columns::new(&mut g, heads, sources, &columns_at);
        for &(src, layout) in rows {
            b.stage_own(&mut g, src, layout, heads, &r0, place_of(layout).2);
        }
        Feed::Staged(&columns)
    };
    // The query pass's rows: their log-sum-exp (base 2, negated) and D, which it writes.
    let row_terms: Vec<[String; 2]> = if pass == Pass::Query {
        b.my_rows.iter().map(|row| [b.negated_base2_lse(&mut g, &r0, row), b.delta(&mut g, heads, &r0, row)]).collect()
    } else {
        Vec::new()
    };
    // Per value of the 64 × 64 scores (column 8n + 2t + e of row g or g + 8, at 4n + e): its
    // row's (query pass) or column's (key pass) term: the log-sum-exp (base 2, negated), then
    // D; the key pass's read from the staged terms after the products that precede their use
    // (before, they stay live across the products and spill).
    let per_value = |g: &mut Lines, term: usize, j: &str| -> Vec<String> {
        if pass == Pass::Query {
            return (0..32).map(|i| row_terms[(i % 4) / 2][term].clone()).collect();
        }
        let columns = match term {
            0 => column_shifts(g, &b, &feed, j),
            _ => column_terms(g, &b, &feed, j, 1),
        };
        (0..32).map(|i| columns[2 * (i / 4) + i % 2].clone()).collect()
    };
    // The accumulators: dQ (Dqk wide), or dK (Dqk) then dV (Dv).
    let count_qk = (heads.qk / 8 * 4) as usize;
    let count = match pass {
        Pass::Query => count_qk,
        Pass::Key => count_qk + (heads.v / 8 * 4) as usize,
    };
    feed.prefetch(&mut g, &b, &lower);
    let row_descriptors = [&s_rows, &s_rows_v].map(|tile| descriptor(&mut g, tile, Major::K));
    let initial = vec![b.zero.clone(); count];
    let sums = column_loops(&mut g, order, &row_block, [&lower, &upper], &initial, |g, j, carried, masked| {
        let [s_cols, s_cols_v] = feed.stage(g, &b, j, [&lower, &upper]);
        let [score_rows, dp_rows] = row_descriptors.each_ref().map(|d| Rows::Staged(in_iteration(g, d)));
        let probabilities = |g: &mut Lines, scores: &[String]| -> Vec<Vec<String>> {
            let mut p: Vec<Vec<String>> = scores.chunks(4).map(<[String]>::to_vec).collect();
            let shifts = per_value(g, 0, j);
            if masked {
                b.mask(g, &mut p, j, &tile, order);
            }
            for (n, tile) in p.iter_mut().enumerate() {
                for (e, x) in tile.iter_mut().enumerate() {
                    *x = b.exp2_logit(g, x, &shifts[4 * n + e]);
                }
            }
            p
        };
        // dS = P ∘ (dP − D), in place of P.
        let score_grads = |g: &mut Lines, p: &mut [Vec<String>], dp: &[String]| {
            let deltas = per_value(g, 1, j);
            for (n, tile) in p.iter_mut().enumerate() {
                for (e, x) in tile.iter_mut().enumerate() {
                    let d = g.line(format!("llvm.fsub {}, {} : f32", dp[4 * n + e], deltas[4 * n + e]));
                    *x = g.line(format!("llvm.fmul {x}, {d} : f32"));
                }
            }
        };
        let zeros = vec![b.zero.clone(); 32];
        match pass {
            Pass::Query => {
                // The scores' and dP's (dO·Vᵀ) products issued together: the tensor cores run
                // dP's while the scores become probabilities; then dQ += dS·K.
                let fenced = fence(g, &[&zeros[..], &zeros[..]].concat(), &[]);
                let scores = issue_products(g, fenced[..32].to_vec(), &score_rows, &s_cols, heads.qk);
                commit(g);
                let dp = issue_products(g, fenced[32..].to_vec(), &dp_rows, &s_cols_v, heads.v);
                commit(g);
                let scores = awaited(g, &scores, 1);
                let mut p = probabilities(g, &scores);
                let dp = awaited(g, &dp, 0);
                feed.release(g, &b, 1, j);
                score_grads(g, &mut p, &dp);
                let mut acc = carried.to_vec();
                b.accumulate(g, &mut acc, &p, &s_cols, heads.qk);
                feed.release(g, &b, 0, j);
                acc
            }
            Pass::Key => {
                // The scores (K·Qᵀ) become probabilities, rounded to BF16 as the A of dV +=
                // Pᵀ·dO, issued with dP's (V·dOᵀ) products; dS from the rounded P (the f32 P,
                // the scores and dP do not fit in the registers beside both accumulators: 160
                // a thread); then dK += dSᵀ·Q.
                let (acc_k, acc_v) = carried.split_at(count_qk);
                let scores = fence(g, &zeros, &[]);
                let scores = issue_products(g, scores, &score_rows, &s_cols, heads.qk);
                let scores = completed(g, &scores);
                let p = probabilities(g, &scores);
                let p = operands(g, &p);
                let fenced = fence(g, &[acc_v, &zeros[..]].concat(), &p);
                let (acc_v, dp) = fenced.split_at(acc_v.len());
                let acc_v = issue_accumulation(g, acc_v.to_vec(), &p, &s_cols_v, heads.v);
                let dp = issue_products(g, dp.to_vec(), &dp_rows, &s_cols_v, heads.v);
                let done = completed(g, &[acc_v, dp].concat());
                feed.release(g, &b, 1, j);
                let (acc_v, dp) = done.split_at(count - count_qk);
                let mut ds = unpacked(g, &p);
                score_grads(g, &mut ds, dp);
                let mut acc = acc_k.to_vec();
                b.accumulate(g, &mut acc, &ds, &s_cols, heads.qk);
                feed.release(g, &b, 0, j);
                acc.extend_from_slice(acc_v);
                acc
            }
        }
    });
    b.store(&mut g, "%grad", Layout::Qk, heads, &sums[..count_qk], &r0, Some("%scale"));
    let grads = match pass {
        Pass::Query => "%grad: !llvm.ptr<1>",
        Pass::Key => {
            b.store(&mut g, "%grad_v", Layout::V, heads, &sums[count_qk..], &r0, None);
            "%grad: !llvm.ptr<1>, %grad_v: !llvm.ptr<1>"
        }
    };
    if heads.streams(Some(pass)) && pass == Pass::Query {
        ring::await_stores(&mut g, &b);
    }
    let mut args = format!(
        "%q: !llvm.ptr<1>, %k: !llvm.ptr<1>, %v: !llvm.ptr<1>, %o: !llvm.ptr<1>, %do: !llvm.ptr<1>, \
         %lse: !llvm.ptr<1>, %delta: !llvm.ptr<1>, {grads}, %seq: i32, %heads: i32, %scale: f32"
    );
    if heads.streams(Some(pass)) {
        g.stmt("}");
        args = format!("{args}, {}", map_args(Some(pass)));
    }
    module(name, &args, g.text(), heads.threads(Some(pass)))
}

/// How a thread's pieces of a staged tile move ([`stage`]): 16 bytes of the source each.
#[derive(Clone, Copy)]
enum Move<'a> {
    /// Packed BF16 copied by `cp.async` as they are (the caller commits and awaits).
    Copy,
    /// f32 read, rounded and stored.
    Round,
    /// f32 copied by `cp.async` as they are into the thread's slots from shared byte `raw`
    /// (16 bytes each, the block's threads' k-th slots side by side), to be rounded later by
    /// [`Move::Convert`] (the caller commits and awaits).
    Fetch { raw: &'a str },
    /// The thread's slots a [`Move::Fetch`] filled (awaited), rounded and stored.
    Convert { raw: &'a str },
}

/// Stages 64 rows of `width` values of `src` (f32, or packed BF16 for [`Move::Copy`]) as BF16
/// at shared byte `smem`, swizzled as the module doc says: row r of the tile is element `at +
/// (row0 + r)·row + c` of `src`, by `threads` threads (`tid` the thread's place among them).
/// Each thread moves 16 bytes of the source at a time (4 f32, rounded and stored as 8 bytes, or
/// 8 BF16), the threads of a row (16, or 8) each taking the same columns of every region, the
/// passes' rows (8 to 32 apart) keeping its rows' places mod 8: a thread's pieces lie at one
/// address of its own plus offsets common to all threads (the per-piece addresses of any other
/// layout are registers the column loop keeps live). Rounded values stored are then fenced for
/// the tensor cores' reads (the async proxy; copies are fenced once awaited); the caller's
/// barrier follows.
#[allow(clippy::too_many_arguments)]
fn stage(
    g: &mut Lines,
    src: &str,
    how: Move,
    at: &str,
    row: &str,
    row0: &str,
    width: u32,
    smem: &str,
    tid: &str,
    threads: u32,
) {
    // Values a thread reads at once, and threads to a row's 64 columns.
    let values = if matches!(how, Move::Copy) { 8 } else { 4 };
    let lanes = 64 / values;
    let rows_per_pass = u64::from(threads / lanes);
    let lane_row = g.op_c("udiv", tid, lanes.into());
    let lane_col = g.op_c("urem", tid, lanes.into());
    let first = g.op("add", row0, &lane_row);
    let first = g.op("mul", &first, row);
    let first = g.op("add", &first, at);
    let col = g.op_c("mul", &lane_col, values.into());
    let from0 = g.op("add", &first, &col);
    // Columns c.. are bytes 2(c mod 8).. of the row's 16-byte chunk c / 8, which row r keeps
    // at chunk (c / 8) xor (r mod 8).
    let chunk = g.op_c("udiv", &col, 8);
    let row8 = g.op_c("urem", &lane_row, 8);
    let chunk = g.op("xor", &chunk, &row8);
    let to0 = g.op_c("mul", &lane_row, 128);
    let chunk = g.op_c("mul", &chunk, 16);
    let to0 = g.op("add", &to0, &chunk);
    let within = g.op_c("urem", &col, 8);
    let within = g.op_c("mul", &within, 2);
    let to0 = g.op("add", &to0, &within);
    let to0 = g.op("add", &to0, smem);
    // The thread's first slot (raw f32 moves).
    let slot0 = match how {
        Move::Fetch { raw } | Move::Convert { raw } => {
            let own = g.op_c("mul", tid, 16);
            Some(g.op("add", raw, &own))
        }
        Move::Copy | Move::Round => None,
    };
    let element = if matches!(how, Move::Copy) { "bf16" } else { "f32" };
    let regions = u64::from(width / 64);
    for pass in 0..u64::from(TILE_ROWS) / rows_per_pass {
        let rows = g.op_c("mul", row, pass * rows_per_pass);
        let from_row = g.op("add", &from0, &rows);
        for region in 0..regions {
            let from = g.op_c("add", &from_row, region * 64);
            let p =
                g.line(format!("llvm.getelementptr {src}[{from}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, {element}"));
            let to = g.op_c("add", &to0, pass * rows_per_pass * 128 + region * REGION);
            let to = g.line(format!("llvm.trunc {to} : i64 to i32"));
            let slot = slot0.as_ref().map(|slot0| {
                let at = g.op_c("add", slot0, (pass * regions + region) * u64::from(threads) * 16);
                g.line(format!("llvm.trunc {at} : i64 to i32"))
            });
            let copy = |g: &mut Lines, to: String| {
                let from = g.line(format!("llvm.ptrtoint {p} : !llvm.ptr<1> to i64"));
                g.asm("cp.async.cg.shared.global [$0], [$1], 16;", &[(to, "r", "i32"), (from, "l", "i64")]);
            };
            let x = match how {
                Move::Copy => {
                    copy(g, to);
                    continue;
                }
                Move::Fetch { .. } => {
                    copy(g, slot.expect("a slot"));
                    continue;
                }
                Move::Round => {
                    g.line(format!("llvm.load {p} {{alignment = 16 : i64}} : !llvm.ptr<1> -> vector<4xf32>"))
                }
                Move::Convert { .. } => {
                    let slot = slot.expect("a slot");
                    let q = g.line(format!("llvm.inttoptr {slot} : i32 to !llvm.ptr<3>"));
                    g.line(format!("llvm.load {q} {{alignment = 16 : i64}} : !llvm.ptr<3> -> vector<4xf32>"))
                }
            };
            let e: Vec<String> = (0..4)
                .map(|k| {
                    let k = g.i32(k);
                    g.line(format!("llvm.extractelement {x}[{k} : i32] : vector<4xf32>"))
                })
                .collect();
            let (low, high) = (pack(g, &e[0], &e[1]), pack(g, &e[2], &e[3]));
            g.asm("st.shared.v2.b32 [$0], {$1, $2};", &[(to, "r", "i32"), (low, "r", "i32"), (high, "r", "i32")]);
        }
    }
    if matches!(how, Move::Round | Move::Convert { .. }) {
        g.asm("fence.proxy.async.shared::cta;", &[]);
    }
}

/// Staged term `term` ([`Columns`]) of the thread's 16 columns of block `j` (i64), column
/// 8n + 2t + e at 2n + e.
fn column_terms(g: &mut Lines, b: &Block, feed: &Feed, j: &str, term: u64) -> Vec<String> {
    let terms = feed.terms(g, j);
    let col = g.op_c("mul", &b.quad_col, 8);
    let at = g.op("add", &terms, &col);
    (0..8u64)
        .flat_map(|n| {
            let at = g.op_c("add", &at, term * u64::from(TILE_ROWS) * 4 + 32 * n);
            shared_pair(g, &at)
        })
        .collect()
}

/// The key pass's shifts of the thread's 16 columns of block `j` ([`Block::exp2_logit`]'s):
/// their staged log-sum-exps ([`column_terms`]' first), base 2, negated.
fn column_shifts(g: &mut Lines, b: &Block, feed: &Feed, j: &str) -> Vec<String> {
    let lse = column_terms(g, b, feed, j, 0);
    lse.iter().map(|x| g.line(format!("llvm.fmul {x}, {} : f32", b.minus_log2e))).collect()
}

/// The two f32 at shared byte `at` (i64, 8-byte aligned).
fn shared_pair(g: &mut Lines, at: &str) -> [String; 2] {
    let p = g.line(format!("llvm.inttoptr {at} : i64 to !llvm.ptr<3>"));
    let pair = g.line(format!("llvm.load {p} {{alignment = 8 : i64}} : !llvm.ptr<3> -> vector<2xf32>"));
    [0, 1].map(|k| {
        let k = g.i32(k);
        g.line(format!("llvm.extractelement {pair}[{k} : i32] : vector<2xf32>"))
    })
}

/// [`operands`]' BF16 pairs back as f32, in the layout of the products they were rounded from.
fn unpacked(g: &mut Lines, a: &[[String; 4]]) -> Vec<Vec<String>> {
    let [shift, mask] = [16, -65536].map(|c| g.line(format!("llvm.mlir.constant({c} : i32) : i32")));
    let mut halves = |word: &String| {
        let low = g.line(format!("llvm.shl {word}, {shift} : i32"));
        let high = g.line(format!("llvm.and {word}, {mask} : i32"));
        [low, high].map(|x| g.line(format!("llvm.bitcast {x} : i32 to f32")))
    };
    a.iter()
        .flat_map(|pairs| {
            let [p0, p1, p2, p3] = pairs.each_ref().map(&mut halves);
            [[p0, p1].concat(), [p2, p3].concat()]
        })
        .collect()
}

/// Two f32 rounded to BF16 in one word, `low` in the low half.
fn pack(g: &mut Lines, low: &str, high: &str) -> String {
    g.asm_i32("cvt.rn.bf16x2.f32 $0, $1, $2;", &[(high.to_string(), "f", "f32"), (low.to_string(), "f", "f32")])
}

fn exp2(g: &mut Lines, x: &str) -> String {
    g.asm_f32("ex2.approx.ftz.f32 $0, $1;", &[(x.to_string(), "f", "f32")])
}

#[derive(Clone, Copy)]
enum Combine {
    Max,
    Add,
}

/// `x` combined (`maxnum` or `fadd`) over the four threads of a quad (the threads holding one
/// row's columns).
fn quad_reduce(g: &mut Lines, x: &str, combine: Combine) -> String {
    let mut x = x.to_string();
    for offset in [1, 2] {
        let other = g.asm_f32(&format!("shfl.sync.bfly.b32 $0, $1, {offset}, 31, -1;"), &[(x.clone(), "f", "f32")]);
        x = match combine {
            Combine::Max => g.line(format!("llvm.intr.maxnum({x}, {other}) : (f32, f32) -> f32")),
            Combine::Add => g.line(format!("llvm.fadd {x}, {other} : f32")),
        };
    }
    x
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
                if heads.streams([None, Some(Pass::Query), Some(Pass::Key)][i]) {
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
                    // The forward's (pipelined) scores read Q from registers (each thread's 4
                    // words per 16 of Dqk, read once), the backward's their rows from their tiles.
                    let held = ptx.lines().filter(|line| line.contains(scores) && line.contains("}, {%r")).count();
                    let loads = ptx.matches("ld.shared.b32").count();
                    let (held_products, held_loads) = if i == 0 { (score_products, 4 * 12) } else { (0, 0) };
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
