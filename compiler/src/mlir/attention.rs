//! Fused causal attention for MLA's shapes, generated for the tensor cores (`mma.sync`
//! m16n8k16 on BF16 operands, f32 accumulation; sm_80 and later, run on sm_90a): flash-style
//! kernels that never materialise the S×S scores. Forward: O = softmax(scale·QKᵀ + causal
//! mask)·V for Q, K [B, S, H, Dqk] and V [B, S, H, Dv] (f32 in memory, the plan's buffers,
//! rounded to BF16 as they are staged in shared memory: the recipe keeps attention in BF16),
//! O [B, S, H, Dv] in f32 (the layout the output projection reads), and the rows' log-sum-exp
//! [B, H, S] (natural log, of the scaled scores). Backward: three passes ([`Pass`]) that
//! recompute the probabilities from the log-sum-exp: dQ (and D = Σ dO∘O per row), dK, dV.
//!
//! A block takes 64 rows of one (batch, head) (queries in the forward and the dQ pass, keys in
//! the dK and dV passes), a warp 16 of them, and walks the other side in blocks of 64 up to or
//! from the diagonal (the block with most work starts first). Per column block it stages the
//! tiles it needs in shared memory (rows padded by 16 bytes: the `ldmatrix` rows fall in
//! distinct banks); each warp computes its 16×64 scores (`Block::products`, its own rows'
//! fragments read by `ldmatrix` at each block: kept in registers they would spill), turns them
//! into base-2 logits (the scale times log₂e folded in; `Block::logits`) and probabilities
//! (the forward's running maximum and sum, or the saved log-sum-exp), and adds their product
//! with a tile read transposed (`Block::accumulate`: P·V, dS·K, dSᵀ·Q, Pᵀ·dO), P or dS
//! rounded to BF16 as the A operand straight from the score registers. Not yet: TMA, `wgmma`,
//! warp specialisation and overlapping the next block's loads with this block's products
//! (FlashAttention-3's machinery). Registers per thread (ptxas, sm_90a, MLA's dims): forward
//! 164 (three blocks share a multiprocessor), dQ 255 (4 bytes spilled), dK 252, dV 167; the
//! staging's thread layout (`stage`) keeps its addresses out of the loops' live registers.

use super::ptx::{Lines, Loop};
use crate::graph::ir::{Function, Node, Op};

/// Query rows per block (16 per warp, four warps) and keys per step.
pub const BLOCK_ROWS: u32 = 64;
const WARPS: u32 = 4;
pub const THREADS: u32 = WARPS * 32;

/// The head dimensions: `qk` of queries and keys (MLA: 128 nope + 64 rope), `v` of values;
/// multiples of 16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub qk: u32,
    pub v: u32,
}

impl Heads {
    /// Bytes between staged rows: BF16 values plus 16 bytes of padding.
    fn stride(width: u32) -> u64 {
        u64::from(width) * 2 + 16
    }

    /// Dynamic shared memory a backward block needs: its rows' and a column block's tiles of
    /// both widths.
    pub fn backward_shared_bytes(self) -> u32 {
        let rows = u64::from(BLOCK_ROWS);
        (rows * 2 * (Self::stride(self.qk) + Self::stride(self.v))) as u32
    }

    /// Dynamic shared memory a block needs: Q, K and V tiles.
    pub fn shared_bytes(self) -> u32 {
        let rows = u64::from(BLOCK_ROWS);
        (rows * (2 * Self::stride(self.qk) + Self::stride(self.v))) as u32
    }

    pub fn check(self) -> Result<Self, String> {
        if self.qk == 0
            || self.v == 0
            || !self.qk.is_multiple_of(16)
            || !self.v.is_multiple_of(16)
            || self.qk > 256
            || self.v > 256
        {
            return Err(format!("head dims {}/{} must be multiples of 16 up to 256", self.qk, self.v));
        }
        Ok(self)
    }
}

/// Where a block is: its threads' places, the (batch, head) it works on and the element
/// offsets of that head's first row in Q/K (`qk_at`) and V/O (`v_at`) and between rows, and
/// the constants every kernel uses.
struct Block {
    tid: String,
    lane: String,
    quad_col: String,
    /// This warp's first row in the block (16 per warp).
    warp_row: String,
    /// The thread's two rows in the block: the warp's 16, lane / 4 and lane / 4 + 8.
    my_rows: [String; 2],
    seq: String,
    /// batch · H + head: the blocks' y.
    bh: String,
    qk_at: String,
    v_at: String,
    qk_row: String,
    v_row: String,
    zero: String,
    minus_inf: String,
    /// The softmax scale times log₂e: scores to base-2 logits.
    log2_scale: String,
    log2e: String,
    /// Shared memory's first byte (i64).
    smem: String,
    /// The blocks along x (i64: S / 64) and this one's index.
    blocks: String,
    block: String,
    /// Bytes between staged rows of Dqk and of Dv.
    qk_stride: u64,
    v_stride: u64,
}

impl Block {
    /// The block of a kernel for `heads` (checked: the generators' callers pass checked dims).
    fn new(g: &mut Lines, heads: Heads) -> Self {
        let heads = heads.check().expect("valid head dims");
        let log2e = g.f32(std::f64::consts::LOG2_E);
        let log2_scale = g.line(format!("llvm.fmul %scale, {log2e} : f32"));
        let zero = g.f32(0.0);
        let minus_inf = g.line("llvm.mlir.constant(0xFF800000 : f32) : f32");
        let tid = g.index_i64("gpu.thread_id x");
        let warp = g.op_c("udiv", &tid, 32);
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
            lane,
            quad_col,
            warp_row,
            my_rows,
            seq,
            bh,
            qk_at,
            v_at,
            qk_row,
            v_row,
            zero,
            minus_inf,
            log2_scale,
            log2e,
            smem,
            blocks,
            block,
            qk_stride: Heads::stride(heads.qk),
            v_stride: Heads::stride(heads.v),
        }
    }

    /// The blocks counted from the last (i64): the order in which the block with most work
    /// starts first where that is the last row block.
    fn reversed_block(&self, g: &mut Lines) -> String {
        let last = g.op_c("sub", &self.blocks, 1);
        g.op("sub", &last, &self.block)
    }

    /// The element offset of the head's first row of a tensor of `layout`, between its rows,
    /// and its width.
    fn place(&self, layout: Layout, heads: Heads) -> (&str, &str, u32) {
        match layout {
            Layout::Qk => (&self.qk_at, &self.qk_row, heads.qk),
            Layout::V => (&self.v_at, &self.v_row, heads.v),
        }
    }

    /// Stages the 64 rows from `row0` of tensor `src` (of `layout`) at byte `at` of shared
    /// memory.
    fn stage(&self, g: &mut Lines, src: &str, layout: Layout, heads: Heads, row0: &str, at: &str) {
        let (first, row, width) = self.place(layout, heads);
        stage(g, src, first, row, row0, width, at, Heads::stride(width), &self.tid);
    }

    /// This lane's row address for `ldmatrix` of the A fragments of the warp's 16 rows of a
    /// tile at `tile` (rows `stride` bytes apart): rows lane mod 16, columns 8·(lane / 16).
    fn a_lane(&self, g: &mut Lines, tile: &str, stride: u64) -> String {
        let row = g.op_c("urem", &self.lane, 16);
        let row = g.op("add", &self.warp_row, &row);
        let col = g.op_c("udiv", &self.lane, 16);
        lane_at(g, tile, &row, stride, &col)
    }

    /// …of B fragments of a tile whose rows are the product's columns (`ldmatrix` as stored):
    /// rows lane mod 8 + 8·(lane / 16), columns 8·(lane / 8 mod 2): two tiles of 8 columns.
    fn b_lane(&self, g: &mut Lines, tile: &str, stride: u64) -> String {
        let row = g.op_c("urem", &self.lane, 8);
        let upper = g.op_c("udiv", &self.lane, 16);
        let upper = g.op_c("mul", &upper, 8);
        let row = g.op("add", &row, &upper);
        let col = g.op_c("udiv", &self.lane, 8);
        let col = g.op_c("urem", &col, 2);
        lane_at(g, tile, &row, stride, &col)
    }

    /// …of B fragments of a tile whose rows run along the product's K (`ldmatrix.trans`):
    /// rows lane mod 8 + 8·(lane / 8 mod 2), columns 8·(lane / 16).
    fn bt_lane(&self, g: &mut Lines, tile: &str, stride: u64) -> String {
        let row = g.op_c("urem", &self.lane, 8);
        let second = g.op_c("udiv", &self.lane, 8);
        let second = g.op_c("urem", &second, 2);
        let second = g.op_c("mul", &second, 8);
        let row = g.op("add", &row, &second);
        let col = g.op_c("udiv", &self.lane, 16);
        lane_at(g, tile, &row, stride, &col)
    }

    /// The warp's 16 × 64 products of its rows of one staged tile (`a`, A lane address) with
    /// the 64 rows of another (`b`, B lane address, rows `b_stride` apart), over `width`: 8
    /// tiles of 8 columns, 4 values each (rows g, g + 8; columns 2t, 2t + 1).
    fn products(&self, g: &mut Lines, a: &str, b: &str, width: u32, b_stride: u64) -> Vec<Vec<String>> {
        let mut tiles = vec![vec![self.zero.clone(); 4]; 8];
        for kk in 0..u64::from(width / 16) {
            let a_at = g.op_c("add", a, kk * 32);
            let a = ldmatrix(g, &a_at, false);
            for pair in 0..4u64 {
                let b_at = g.op_c("add", b, pair * 16 * b_stride + kk * 32);
                let b = ldmatrix(g, &b_at, false);
                for half in 0..2 {
                    let n = 2 * pair as usize + half;
                    tiles[n] = mma(g, &tiles[n], &a, &b[2 * half..2 * half + 2]);
                }
            }
        }
        tiles
    }

    /// `acc` (16 rows × `width`: per 8 columns 4 values) += `p` (the warp's 16 × 64, as
    /// [`Block::products`] gives them, rounded to BF16) times a staged 64-row tile (`t`, its
    /// transposed-B lane address, rows `stride` apart).
    fn accumulate(&self, g: &mut Lines, acc: &mut [String], p: &[Vec<String>], t: &str, width: u32, stride: u64) {
        for kk in 0..4usize {
            let (t0, t1) = (&p[2 * kk], &p[2 * kk + 1]);
            let a =
                [pack(g, &t0[0], &t0[1]), pack(g, &t0[2], &t0[3]), pack(g, &t1[0], &t1[1]), pack(g, &t1[2], &t1[3])];
            for pair in 0..(width / 16) as usize {
                let at = g.op_c("add", t, (kk as u64) * 16 * stride + pair as u64 * 32);
                let b = ldmatrix(g, &at, true);
                for half in 0..2 {
                    let n = 2 * pair + half;
                    let out = mma(g, &acc[4 * n..4 * n + 4], &a, &b[2 * half..2 * half + 2]);
                    acc[4 * n..4 * n + 4].clone_from_slice(&out);
                }
            }
        }
    }

    /// Base-2 logits of `scores`, minus `shift` per value, −∞ where `masked(column, row)` on the
    /// diagonal block (`diagonal`, i1); columns are 8n + 2t + {0, 1}, rows the thread's two.
    fn logits(
        &self,
        g: &mut Lines,
        scores: &mut [Vec<String>],
        diagonal: &str,
        keep: Order,
        shift: impl Fn(&mut Lines, usize, usize) -> Option<String>,
    ) {
        let col = g.op_c("mul", &self.quad_col, 2);
        for (n, tile) in scores.iter_mut().enumerate() {
            for (e, x) in tile.iter_mut().enumerate() {
                let mut y = g.line(format!("llvm.fmul {x}, {} : f32", self.log2_scale));
                if let Some(shift) = shift(g, n, e) {
                    y = g.line(format!("llvm.fsub {y}, {shift} : f32"));
                }
                let column = g.op_c("add", &col, (8 * n + e % 2) as u64);
                let row = &self.my_rows[e / 2];
                let outside = match keep {
                    Order::ColumnsUpToRow => g.line(format!("llvm.icmp \"ugt\" {column}, {row} : i64")),
                    Order::ColumnsFromRow => g.line(format!("llvm.icmp \"ult\" {column}, {row} : i64")),
                };
                let masked = g.line(format!("llvm.and {diagonal}, {outside} : i1"));
                *x = g.line(format!("llvm.select {masked}, {}, {y} : i1, f32", self.minus_inf));
            }
        }
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

    /// The log-sum-exp of row `row0 + row`, base 2.
    fn base2_lse(&self, g: &mut Lines, row0: &str, row: &str) -> String {
        let lse = self.row_value(g, "%lse", row0, row);
        g.line(format!("llvm.fmul {lse}, {} : f32", self.log2e))
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

/// Which columns of the diagonal block a row keeps: the forward's and the query pass's rows
/// are queries (keys up to the row), the key passes' rows are keys (queries from the row).
#[derive(Clone, Copy)]
enum Order {
    ColumnsUpToRow,
    ColumnsFromRow,
}

/// `tile + row·stride + 16·col8` (bytes).
fn lane_at(g: &mut Lines, tile: &str, row: &str, stride: u64, col8: &str) -> String {
    let at = g.op_c("mul", row, stride);
    let col = g.op_c("mul", col8, 16);
    let at = g.op("add", &at, &col);
    g.op("add", &at, tile)
}

/// Opens `scf.for` over the column blocks `lower..upper` (i64) carrying the f32 values
/// `initial`: the block index (i64), the carried values inside and the results' name.
fn column_loop(g: &mut Lines, lower: &str, upper: &str, initial: &[String]) -> Loop {
    let one = g.i64(1);
    let carried: Vec<(String, &str)> = initial.iter().map(|x| (x.clone(), "f32")).collect();
    g.open_for(lower, upper, &one, &carried)
}

/// The module of kernel `name` with arguments `args` and `body`.
fn module(name: &str, args: &str, body: &str) -> String {
    format!(
        "module attributes {{gpu.container_module}} {{\n  gpu.module @{name} [{target}] {{\n    \
         llvm.mlir.global external @tiles() {{addr_space = 3 : i32, alignment = 16 : i64}} : !llvm.array<0 x i8>\n    \
         gpu.func @{name}({args}) kernel attributes {{known_block_size = array<i32: {THREADS}, 1, 1>}} {{\n\
         {body}      gpu.return\n    }}\n  }}\n}}\n",
        target = super::emit::TARGET,
    )
}

/// The head dims of the kernels that run `node` of `f`: BF16 `attention` or `attention_grad`
/// on q [b, s, h, dqk] and v [b, s, h, dv] with dims multiples of 16 up to 256 and s a multiple
/// of [`BLOCK_ROWS`]; `None` for any other node (a plan expands other attention:
/// `fuse::expand`).
pub fn fused(f: &Function, node: &Node) -> Option<Heads> {
    let (Op::Attention { bf16: true, .. } | Op::AttentionGrad { bf16: true, .. }) = node.op else { return None };
    let (q, v) = (&f.node(node.args[0]).shape, &f.node(node.args[2]).shape);
    let narrow = |x: usize| u32::try_from(x).ok();
    let heads = Heads { qk: narrow(q[3])?, v: narrow(v[3])? };
    (q[1].is_multiple_of(BLOCK_ROWS as usize) && heads.check().is_ok()).then_some(heads)
}

/// The four kernels for `heads` in launch order, each (name, MLIR): the forward
/// `attention_fwd_qk{QK}_v{V}`, then the backward passes `attention_bwd_{dq,dk,dv}_qk{QK}_v{V}`.
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
    format!("attention_{kind}_qk{}_v{}", heads.qk, heads.v)
}

/// The MLIR module of the forward kernel `name` for `heads`. Launch: grid (S / 64, B·H),
/// [`THREADS`] threads, [`Heads::shared_bytes`] of dynamic shared memory; arguments Q, K, V,
/// O, LSE (pointers), S, H (u32; S a multiple of 64) and the softmax scale (f32).
pub fn attention_forward(name: &str, heads: Heads) -> String {
    let mut g = Lines::new();
    let b = Block::new(&mut g, heads);
    let (qk_stride, v_stride) = (b.qk_stride, b.v_stride);
    // The heaviest blocks (most keys) first.
    let q_block = b.reversed_block(&mut g);
    let q0 = g.op_c("mul", &q_block, BLOCK_ROWS.into());
    let rows = u64::from(BLOCK_ROWS);
    let sq = b.smem.clone();
    let sk = g.op_c("add", &sq, rows * qk_stride);
    let sv = g.op_c("add", &sk, rows * qk_stride);
    // Q's 64 rows, their A fragments read at each key block (kept in registers they spill).
    b.stage(&mut g, "%q", Layout::Qk, heads, &q0, &sq);
    let q_lane = b.a_lane(&mut g, &sq, qk_stride);
    let k_lane = b.b_lane(&mut g, &sk, qk_stride);
    let v_lane = b.bt_lane(&mut g, &sv, v_stride);
    // The key blocks up to the diagonal, carrying the output accumulators (16 rows × Dv per
    // warp) and each of the thread's two rows' running maximum and sum.
    let o_count = (heads.v / 8 * 4) as usize;
    let mut initial = vec![b.zero.clone(); o_count];
    initial.extend([b.minus_inf.clone(), b.minus_inf.clone(), b.zero.clone(), b.zero.clone()]);
    let zero64 = g.i64(0);
    let upper = g.op_c("add", &q_block, 1);
    let Loop { index: j, carried, results: state } = column_loop(&mut g, &zero64, &upper, &initial);
    let carried = |i: usize| carried[i].clone();
    let k0 = g.op_c("mul", &j, BLOCK_ROWS.into());
    // The last block's K and V are read: stage this block's.
    g.stmt("gpu.barrier");
    b.stage(&mut g, "%k", Layout::Qk, heads, &k0, &sk);
    b.stage(&mut g, "%v", Layout::V, heads, &k0, &sv);
    g.stmt("gpu.barrier");
    let mut scores = b.products(&mut g, &q_lane, &k_lane, heads.qk, qk_stride);
    let diagonal = g.line(format!("llvm.icmp \"eq\" {j}, {q_block} : i64"));
    b.logits(&mut g, &mut scores, &diagonal, Order::ColumnsUpToRow, |_, _, _| None);
    // Per row: the new maximum (over the quad's four threads), the correction of the old sum
    // and output, the probabilities and their sum.
    let mut alphas = Vec::new();
    let mut news = Vec::new();
    for r in 0..2 {
        let mut max = carried(o_count + r);
        for tile in &scores {
            for e in 0..2 {
                max = g.line(format!("llvm.intr.maxnum({max}, {}) : (f32, f32) -> f32", tile[2 * r + e]));
            }
        }
        let new = quad_reduce(&mut g, &max, Combine::Max);
        // Old maximum −∞ (no key yet): the difference is −∞ and 2^−∞ = 0.
        let drop = g.line(format!("llvm.fsub {}, {new} : f32", carried(o_count + r)));
        alphas.push(exp2(&mut g, &drop));
        news.push(new);
    }
    for tile in scores.iter_mut() {
        for (e, x) in tile.iter_mut().enumerate() {
            let d = g.line(format!("llvm.fsub {x}, {} : f32", news[e / 2]));
            *x = exp2(&mut g, &d);
        }
    }
    let mut sums = Vec::new();
    for (r, alpha) in alphas.iter().enumerate() {
        let mut sum = g.line(format!("llvm.fmul {}, {alpha} : f32", carried(o_count + 2 + r)));
        for tile in &scores {
            for e in 0..2 {
                sum = g.line(format!("llvm.fadd {sum}, {} : f32", tile[2 * r + e]));
            }
        }
        sums.push(sum);
    }
    let mut o: Vec<String> =
        (0..o_count).map(|i| g.line(format!("llvm.fmul {}, {} : f32", carried(i), alphas[(i % 4) / 2]))).collect();
    b.accumulate(&mut g, &mut o, &scores, &v_lane, heads.v, v_stride);
    let yielded: Vec<String> = o.iter().chain(&news).chain(&sums).cloned().collect();
    g.stmt(format!("scf.yield {} : {}", yielded.join(", "), vec!["f32"; yielded.len()].join(", ")));
    g.stmt("}");

    // O / l for the thread's rows and columns; the log-sum-exp from the quad's first thread.
    let ln2 = g.f32(std::f64::consts::LN_2);
    let one = g.f32(1.0);
    let mut out: Vec<String> = (0..o_count).map(|i| format!("{state}#{i}")).collect();
    for (r, my_row) in b.my_rows.iter().enumerate() {
        let l = quad_reduce(&mut g, &format!("{state}#{}", o_count + 2 + r), Combine::Add);
        let inverse = g.line(format!("llvm.fdiv {one}, {l} : f32"));
        for n in 0..o_count / 4 {
            for e in 0..2 {
                let x = &mut out[4 * n + 2 * r + e];
                *x = g.line(format!("llvm.fmul {x}, {inverse} : f32"));
            }
        }
        let log = g.asm_f32("lg2.approx.ftz.f32 $0, $1;", &[(l, "f", "f32")]);
        let lse = g.line(format!("llvm.fadd {state}#{}, {log} : f32", o_count + r));
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
    module(
        name,
        "%q: !llvm.ptr<1>, %k: !llvm.ptr<1>, %v: !llvm.ptr<1>, %o: !llvm.ptr<1>, %lse: !llvm.ptr<1>, \
         %seq: i32, %heads: i32, %scale: f32",
        g.text(),
    )
}

/// What a backward kernel computes; three kernels, launched in this order, because the
/// thread's accumulators of dK and dV together would not fit its registers beside the
/// recomputed scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// dQ, blocks of query rows walking the keys up to the diagonal; it also writes each
    /// row's D = Σ dO ∘ O, which the key passes read.
    Query,
    /// dK, blocks of key rows walking the queries from the diagonal.
    Key,
    /// dV, the same way.
    Value,
}

impl Pass {
    pub const ALL: [Pass; 3] = [Pass::Query, Pass::Key, Pass::Value];

    pub fn label(self) -> &'static str {
        match self {
            Pass::Query => "dq",
            Pass::Key => "dk",
            Pass::Value => "dv",
        }
    }
}

/// The MLIR module of backward kernel `name` (`pass`) for `heads`. Launch: grid (S / 64,
/// B·H), [`THREADS`] threads, [`Heads::backward_shared_bytes`]; arguments Q, K, V, O, dO, LSE
/// (the forward's), D ([B, H, S]: written by the query pass, read by the others), the
/// gradient it writes (dQ, dK or dV; every element written), S, H (u32) and the softmax scale
/// (f32).
pub fn attention_backward(name: &str, heads: Heads, pass: Pass) -> String {
    let mut g = Lines::new();
    let b = Block::new(&mut g, heads);
    let (qk_stride, v_stride) = (b.qk_stride, b.v_stride);
    // The heaviest blocks first: the last query block has the most keys, the first key block
    // the most queries.
    let row_block = match pass {
        Pass::Query => b.reversed_block(&mut g),
        Pass::Key | Pass::Value => b.block.clone(),
    };
    let r0 = g.op_c("mul", &row_block, BLOCK_ROWS.into());
    let rows = u64::from(BLOCK_ROWS);
    let s_rows = b.smem.clone();
    let s_rows_v = g.op_c("add", &s_rows, rows * qk_stride);
    let s_cols = g.op_c("add", &s_rows_v, rows * v_stride);
    let s_cols_v = g.op_c("add", &s_cols, rows * qk_stride);
    let (rows_qk, rows_v, cols_qk, cols_v) = match pass {
        Pass::Query => ("%q", "%do", "%k", "%v"),
        Pass::Key | Pass::Value => ("%k", "%v", "%q", "%do"),
    };
    b.stage(&mut g, rows_qk, Layout::Qk, heads, &r0, &s_rows);
    if pass != Pass::Value {
        b.stage(&mut g, rows_v, Layout::V, heads, &r0, &s_rows_v);
    }
    let a_rows = b.a_lane(&mut g, &s_rows, qk_stride);
    let a_rows_v = b.a_lane(&mut g, &s_rows_v, v_stride);
    let b_cols = b.b_lane(&mut g, &s_cols, qk_stride);
    let b_cols_v = b.b_lane(&mut g, &s_cols_v, v_stride);
    let (layout, t_lane, t_stride) = match pass {
        Pass::Query | Pass::Key => (Layout::Qk, b.bt_lane(&mut g, &s_cols, qk_stride), qk_stride),
        Pass::Value => (Layout::V, b.bt_lane(&mut g, &s_cols_v, v_stride), v_stride),
    };
    let width = b.place(layout, heads).2;
    // The query pass's rows: their log-sum-exp (base 2) and D, which it writes.
    let row_terms: Vec<(String, String)> = if pass == Pass::Query {
        b.my_rows.iter().map(|row| (b.base2_lse(&mut g, &r0, row), b.delta(&mut g, heads, &r0, row))).collect()
    } else {
        Vec::new()
    };
    let count = (width / 8 * 4) as usize;
    let (lower, upper) = match pass {
        Pass::Query => (g.i64(0), g.op_c("add", &row_block, 1)),
        Pass::Key | Pass::Value => (row_block.clone(), b.blocks.clone()),
    };
    let Loop { index: j, carried, results: state } = column_loop(&mut g, &lower, &upper, &vec![b.zero.clone(); count]);
    let c0 = g.op_c("mul", &j, BLOCK_ROWS.into());
    g.stmt("gpu.barrier");
    b.stage(&mut g, cols_qk, Layout::Qk, heads, &c0, &s_cols);
    b.stage(&mut g, cols_v, Layout::V, heads, &c0, &s_cols_v);
    g.stmt("gpu.barrier");
    let mut p = b.products(&mut g, &a_rows, &b_cols, heads.qk, qk_stride);
    // The key passes' columns are queries: their log-sum-exps and (for dK) D, per column
    // 8n + 2t + e, loaded after the scores' products (before them, they stay live across the
    // products and spill).
    let col_terms: Vec<(String, Option<String>)> = if pass == Pass::Query {
        Vec::new()
    } else {
        let col = g.op_c("mul", &b.quad_col, 2);
        (0..16u64)
            .map(|i| {
                let column = g.op_c("add", &col, 8 * (i / 2) + i % 2);
                let delta = (pass == Pass::Key).then(|| b.row_value(&mut g, "%delta", &c0, &column));
                (b.base2_lse(&mut g, &c0, &column), delta)
            })
            .collect()
    };
    let term = |n: usize, e: usize| -> (&str, Option<&str>) {
        if row_terms.is_empty() {
            let (lse, delta) = &col_terms[2 * n + e % 2];
            (lse, delta.as_deref())
        } else {
            let (lse, delta) = &row_terms[e / 2];
            (lse, Some(delta))
        }
    };
    let diagonal = g.line(format!("llvm.icmp \"eq\" {j}, {row_block} : i64"));
    let order = if pass == Pass::Query { Order::ColumnsUpToRow } else { Order::ColumnsFromRow };
    b.logits(&mut g, &mut p, &diagonal, order, |_, n, e| Some(term(n, e).0.to_string()));
    for tile in p.iter_mut() {
        for x in tile.iter_mut() {
            *x = exp2(&mut g, x);
        }
    }
    let mut acc = carried;
    if pass == Pass::Value {
        b.accumulate(&mut g, &mut acc, &p, &t_lane, width, t_stride);
    } else {
        // dS = P ∘ (dP − D), dP = dO·Vᵀ (query rows) or V·dOᵀ (key rows).
        let dp = b.products(&mut g, &a_rows_v, &b_cols_v, heads.v, v_stride);
        for (n, tile) in p.iter_mut().enumerate() {
            for (e, x) in tile.iter_mut().enumerate() {
                let delta = term(n, e).1.expect("the dQ and dK passes read D");
                let d = g.line(format!("llvm.fsub {}, {delta} : f32", dp[n][e]));
                *x = g.line(format!("llvm.fmul {x}, {d} : f32"));
            }
        }
        b.accumulate(&mut g, &mut acc, &p, &t_lane, width, t_stride);
    }
    g.stmt(format!("scf.yield {} : {}", acc.join(", "), vec!["f32"; count].join(", ")));
    g.stmt("}");
    let sums: Vec<String> = (0..count).map(|i| format!("{state}#{i}")).collect();
    let grad = match pass {
        Pass::Value => None,
        Pass::Query | Pass::Key => Some("%scale"),
    };
    b.store(&mut g, "%grad", layout, heads, &sums, &r0, grad);
    module(
        name,
        "%q: !llvm.ptr<1>, %k: !llvm.ptr<1>, %v: !llvm.ptr<1>, %o: !llvm.ptr<1>, %do: !llvm.ptr<1>, \
         %lse: !llvm.ptr<1>, %delta: !llvm.ptr<1>, %grad: !llvm.ptr<1>, %seq: i32, %heads: i32, %scale: f32",
        g.text(),
    )
}

/// Stages 64 rows of `width` f32 values as BF16 in shared memory at `smem` (rows `stride`
/// bytes apart): row r of the tile is element `at + (row0 + r)·row + c` of `src`. Each thread
/// moves 16 bytes at a time: `lanes` consecutive threads share a row (16, or the most that
/// divides its 16-byte pieces), each taking every `lanes`-th piece, so that a thread's pieces
/// lie at one address of its own plus offsets common to all threads (the per-piece addresses
/// of any other layout are registers the column loop keeps live).
#[allow(clippy::too_many_arguments)]
fn stage(g: &mut Lines, src: &str, at: &str, row: &str, row0: &str, width: u32, smem: &str, stride: u64, tid: &str) {
    let chunks = width / 4;
    let lanes = [16, 8, 4].into_iter().find(|l| chunks.is_multiple_of(*l)).expect("widths are multiples of 16");
    let rows_per_pass = THREADS / lanes;
    let lane_row = g.op_c("udiv", tid, lanes.into());
    let lane_col = g.op_c("urem", tid, lanes.into());
    let first = g.op("add", row0, &lane_row);
    let first = g.op("mul", &first, row);
    let first = g.op("add", &first, at);
    let col4 = g.op_c("mul", &lane_col, 4);
    let from0 = g.op("add", &first, &col4);
    let to0 = g.op_c("mul", &lane_row, stride);
    let col8 = g.op_c("mul", &lane_col, 8);
    let to0 = g.op("add", &to0, &col8);
    let to0 = g.op("add", &to0, smem);
    for pass in 0..u64::from(BLOCK_ROWS / rows_per_pass) {
        let rows = g.op_c("mul", row, pass * u64::from(rows_per_pass));
        let from_row = g.op("add", &from0, &rows);
        for k in 0..u64::from(chunks / lanes) {
            let from = g.op_c("add", &from_row, k * u64::from(lanes) * 4);
            let p = g.line(format!("llvm.getelementptr {src}[{from}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
            let x = g.line(format!("llvm.load {p} {{alignment = 16 : i64}} : !llvm.ptr<1> -> vector<4xf32>"));
            let e: Vec<String> = (0..4)
                .map(|k| {
                    let k = g.i32(k);
                    g.line(format!("llvm.extractelement {x}[{k} : i32] : vector<4xf32>"))
                })
                .collect();
            let (low, high) = (pack(g, &e[0], &e[1]), pack(g, &e[2], &e[3]));
            let to = g.op_c("add", &to0, pass * u64::from(rows_per_pass) * stride + k * u64::from(lanes) * 8);
            let to = g.line(format!("llvm.trunc {to} : i64 to i32"));
            g.asm("st.shared.v2.b32 [$0], {$1, $2};", &[(to, "r", "i32"), (low, "r", "i32"), (high, "r", "i32")]);
        }
    }
}

/// Four 8×8 BF16 matrices from shared memory (this lane's row at `at`, i64), transposed or not.
fn ldmatrix(g: &mut Lines, at: &str, transposed: bool) -> Vec<String> {
    let at = g.line(format!("llvm.trunc {at} : i64 to i32"));
    let trans = if transposed { ".trans" } else { "" };
    g.asm_i32s(
        &format!("ldmatrix.sync.aligned.m8n8.x4{trans}.shared.b16 {{$0, $1, $2, $3}}, [$4];"),
        4,
        &[(at, "r", "i32")],
    )
}

/// `acc` (4 f32) + A (4 BF16 pairs) · B (2 BF16 pairs): one m16n8k16 product.
fn mma(g: &mut Lines, acc: &[String], a: &[String], b: &[String]) -> Vec<String> {
    let operands: Vec<(String, &str, &str)> = a.iter().chain(b).map(|x| (x.clone(), "r", "i32")).collect();
    g.asm_f32s(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$8, $9, $10, $11}, {$12, $13}, {$0, $1, $2, $3};",
        acc,
        &operands,
    )
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

    /// MLA's forward and backward passes lower to PTX whose products are BF16 `mma.sync`s fed
    /// by `ldmatrix` (transposed where a tile runs along the product's K), within a
    /// multiprocessor's shared memory, and, where `DSC_PTXAS` names ptxas, assemble for sm_90a
    /// (without spilling but for 4 bytes of the dQ pass; the forward in three blocks' share of
    /// the registers).
    #[test]
    fn the_attention_kernels_lower_to_tensor_core_products_and_assemble() {
        let heads = Heads { qk: 192, v: 128 };
        assert!(heads.shared_bytes().max(heads.backward_shared_bytes()) <= 227 * 1024);
        let mma = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
        let transposed = "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16";
        let lowering = crate::mlir::lower::Lowering::default();
        // Per column block and warp: scores 12 × 8 products, dP 8 × 8, then P·V or dS·K (4 × 16
        // or 4 × 24), their B fragments transposed (4 × 8 or 4 × 12 loads).
        let kernels = [
            (attention_forward("attention", heads), 12 * 8 + 4 * 16, 4 * 8),
            (attention_backward("attention", heads, Pass::Query), 12 * 8 + 8 * 8 + 4 * 24, 4 * 12),
            (attention_backward("attention", heads, Pass::Key), 12 * 8 + 8 * 8 + 4 * 24, 4 * 12),
            (attention_backward("attention", heads, Pass::Value), 12 * 8 + 4 * 16, 4 * 8),
        ];
        for (i, (mlir, products, loads)) in kernels.into_iter().enumerate() {
            let ptx = lowering.ptx(&mlir, false).expect("lowers");
            assert_eq!(ptx.matches(mma).count(), products, "{ptx}");
            assert_eq!(ptx.matches(transposed).count(), loads, "{ptx}");
            assert!(ptx.contains("ex2.approx.ftz.f32"), "{ptx}");
            if let Some(report) = crate::mlir::ptx::assemble(&ptx) {
                // All but the dQ pass (4 bytes) without spilling; the forward in at most 168
                // registers, so that three blocks share a multiprocessor's 65,536.
                assert!(i == 1 || crate::mlir::ptx::spilled_bytes(&report) == 0, "{report}");
                let registers: u32 = report
                    .split("Used ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .expect("ptxas reports the registers");
                assert!(i > 0 || registers <= 168, "{report}");
            }
        }
    }
}
