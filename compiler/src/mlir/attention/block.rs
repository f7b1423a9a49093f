//! A block's threads and what each does on its own rows: where a thread sits in its warpgroup's
//! 64 × 64 products (its rows and columns of the accumulators), the row tiles it stages or
//! holds, the softmax, the mask and the probabilities of its scores, the rows' log-sum-exp and
//! D, and the stores of its accumulators; with the quad reductions those use.

use super::*;

/// Where a block is: its threads' places, the (batch, head) it works on and the element
/// offsets of that head's first row in Q/K (`qk_at`) and V/O (`v_at`) and between rows, and
/// the constants every kernel uses.
pub(super) struct Block {
    pub(super) tid: String,
    /// The thread's warpgroup and its place in it.
    pub(super) warpgroup: String,
    pub(super) group_tid: String,
    pub(super) quad_col: String,
    /// The thread's two rows in its warpgroup's tile: the warp's 16, lane / 4 and lane / 4 + 8.
    pub(super) my_rows: [String; 2],
    pub(super) seq: String,
    /// batch · H + head: the blocks' y.
    pub(super) bh: String,
    /// The head, and its sequence's first row among the B·S (batch · S): the tensor maps'
    /// coordinates ([`ring`]).
    pub(super) head: String,
    pub(super) sequence_row: String,
    pub(super) qk_at: String,
    pub(super) v_at: String,
    pub(super) qk_row: String,
    pub(super) v_row: String,
    pub(super) zero: String,
    pub(super) minus_inf: String,
    /// The softmax scale times log₂e: scores to base-2 logits.
    pub(super) log2_scale: String,
    pub(super) minus_log2e: String,
    /// Shared memory's first byte (i64).
    pub(super) smem: String,
    /// The blocks along x (i64: S / 128) and this one's index.
    pub(super) blocks: String,
    pub(super) block: String,
}

impl Block {
    /// The block of a kernel for `heads` (checked: the generators' callers pass checked dims).
    pub(super) fn new(g: &mut Lines, heads: Heads) -> Self {
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
    pub(super) fn reversed_block(&self, g: &mut Lines) -> String {
        let last = g.op_c("sub", &self.blocks, 1);
        g.op("sub", &last, &self.block)
    }

    /// The warpgroup's 64-row tile of the rows of `block` (i64), and its first row.
    pub(super) fn tile(&self, g: &mut Lines, block: &str) -> (String, String) {
        let tile = g.op_c("mul", block, WARPGROUPS.into());
        let tile = g.op("add", &tile, &self.warpgroup);
        let row0 = g.op_c("mul", &tile, TILE_ROWS.into());
        (tile, row0)
    }

    /// Waits for the warpgroup's threads (named barrier 1 + its index: the block's others go
    /// on).
    pub(super) fn warpgroup_barrier(&self, g: &mut Lines) {
        let id = g.op_c("add", &self.warpgroup, 1);
        let id = g.line(format!("llvm.trunc {id} : i64 to i32"));
        g.asm("bar.sync $0, 128;", &[(id, "r", "i32")]);
    }

    /// The warpgroup's own tile of `bytes` from shared byte `at`, the tiles of the block's
    /// warpgroups one after another.
    pub(super) fn own_tile(&self, g: &mut Lines, at: &str, bytes: u64) -> String {
        let offset = g.op_c("mul", &self.warpgroup, bytes);
        g.op("add", at, &offset)
    }

    /// The element offset of the head's first row of a tensor of `layout`, between its rows,
    /// and its width.
    pub(super) fn place(&self, layout: Layout, heads: Heads) -> (&str, &str, u32) {
        let (first, row) = match layout {
            Layout::Qk => (&self.qk_at, &self.qk_row),
            Layout::V => (&self.v_at, &self.v_row),
        };
        (first, row, layout.width(heads))
    }

    /// Stages the 64 rows from `row0` of tensor `src` (of `layout`) at byte `at` of shared
    /// memory by `how`, by the block's threads or (`own`) the warpgroup's.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn stage(
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
    pub(super) fn stage_own(&self, g: &mut Lines, src: &str, layout: Layout, heads: Heads, row0: &str, at: &str) {
        let how = if packed(heads, src) { Move::Copy } else { Move::Round };
        self.stage(g, src, how, layout, heads, row0, at, true);
    }

    /// The warpgroup's 64 × 64 products of the `rows` (A) with the column tile at `cols` (B),
    /// both K-major over `width`: for the thread, 8 tiles of 8 columns, 4 values each (its
    /// warp's rows g, g + 8; columns 2t, 2t + 1).
    pub(super) fn products(&self, g: &mut Lines, rows: &Rows, cols: &str, width: u32) -> Vec<Vec<String>> {
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
    pub(super) fn hold(&self, g: &mut Lines, tile: &str, width: u32) -> Vec<[String; 4]> {
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
    pub(super) fn accumulate(&self, g: &mut Lines, acc: &mut [String], p: &[Vec<String>], tile: &str, width: u32) {
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
    pub(super) fn softmax(
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
    pub(super) fn mask(&self, g: &mut Lines, scores: &mut [Vec<String>], j: &str, tile: &str, keep: Order) {
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
    pub(super) fn exp2_logit(&self, g: &mut Lines, x: &str, shift: &str) -> String {
        let y = g.line(format!("llvm.intr.fma({x}, {}, {shift}) : (f32, f32, f32) -> f32", self.log2_scale));
        exp2(g, &y)
    }

    /// Stores `acc` (the warp's 16 rows, times `factor`) at rows `row0 + r` of `dst` (of
    /// `layout`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn store(
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
    pub(super) fn negated_base2_lse(&self, g: &mut Lines, row0: &str, row: &str) -> String {
        let lse = self.row_value(g, "%lse", row0, row);
        g.line(format!("llvm.fmul {lse}, {} : f32", self.minus_log2e))
    }

    /// D = Σ dO ∘ O of the thread's row `row0 + row` (a quarter of the columns from each
    /// thread of the quad, summed over it), written to `%delta` by the quad's first thread.
    pub(super) fn delta(&self, g: &mut Lines, heads: Heads, row0: &str, row: &str) -> String {
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
        self.store_row_value(g, "%delta", row0, row, &sum);
        sum
    }

    /// A per-row f32 of [B, H, S] (`lse`, `delta`) at the block's row `row0 + row` (i64).
    pub(super) fn row_value(&self, g: &mut Lines, src: &str, row0: &str, row: &str) -> String {
        let p = self.row_at(g, src, row0, row);
        g.line(format!("llvm.load {p} : !llvm.ptr<1> -> f32"))
    }

    /// Stores `value` (the row's, which its quad's four threads hold) at the block's row
    /// `row0 + row` of the per-row f32 `dst` ([B, H, S]), by the quad's first thread.
    pub(super) fn store_row_value(&self, g: &mut Lines, dst: &str, row0: &str, row: &str, value: &str) {
        g.open_if_first(&self.quad_col);
        let p = self.row_at(g, dst, row0, row);
        g.stmt(format!("llvm.store {value}, {p} : f32, !llvm.ptr<1>"));
        g.stmt("}");
    }

    /// Where row `row0 + row` of the head's per-row f32 `src` ([B, H, S]) lies.
    fn row_at(&self, g: &mut Lines, src: &str, row0: &str, row: &str) -> String {
        let at = g.op("mul", &self.bh, &self.seq);
        let at = g.op("add", &at, row0);
        let at = g.op("add", &at, row);
        g.line(format!("llvm.getelementptr {src}[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"))
    }
}

/// The two f32 at shared byte `at` (i64, 8-byte aligned).
pub(super) fn shared_pair(g: &mut Lines, at: &str) -> [String; 2] {
    let p = g.line(format!("llvm.inttoptr {at} : i64 to !llvm.ptr<3>"));
    let pair = g.line(format!("llvm.load {p} {{alignment = 8 : i64}} : !llvm.ptr<3> -> vector<2xf32>"));
    [0, 1].map(|k| {
        let k = g.i32(k);
        g.line(format!("llvm.extractelement {pair}[{k} : i32] : vector<2xf32>"))
    })
}

pub(super) fn exp2(g: &mut Lines, x: &str) -> String {
    g.asm_f32("ex2.approx.ftz.f32 $0, $1;", &[(x.to_string(), "f", "f32")])
}

#[derive(Clone, Copy)]
pub(super) enum Combine {
    Max,
    Add,
}

/// `x` combined (`maxnum` or `fadd`) over the four threads of a quad (the threads holding one
/// row's columns).
pub(super) fn quad_reduce(g: &mut Lines, x: &str, combine: Combine) -> String {
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
