//! Fused causal attention for MLA's shapes, generated for the tensor cores (`mma.sync`
//! m16n8k16 on BF16 operands, f32 accumulation; sm_80 and later, run on sm_90a): the forward
//! of a flash-style kernel that never materialises the S×S scores. O = softmax(scale·QKᵀ +
//! causal mask)·V for Q, K [B, S, H, Dqk] and V [B, S, H, Dv] (f32 in memory, the plan's
//! buffers, rounded to BF16 as they are staged in shared memory: the recipe keeps attention in
//! BF16), O [B, S, H, Dv] in f32 (the layout the output projection reads), and the rows'
//! log-sum-exp [B, H, S] (natural log, of the scaled scores) that the backward needs.
//!
//! A block takes 64 query rows of one (batch, head), a warp 16 of them, and walks the keys in
//! blocks of 64 up to the diagonal (the block with the most keys starts first). Per key block
//! the block stages K and V in shared memory (rows padded by 16 bytes: the `ldmatrix` rows fall
//! in distinct banks), each warp computes its 16×64 scores from its Q fragments (loaded once,
//! kept in registers), updates its rows' running maximum and sum (base-2, the scale times
//! log₂e folded in), rescales its output accumulators and adds P·V, P rounded to BF16 as the
//! A operand straight from the score registers. Not yet: TMA, `wgmma`, warp specialisation,
//! and overlapping the next block's loads with this block's products (FlashAttention-3's
//! machinery); the backward.

use super::ptx::Lines;

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

/// The MLIR module of the forward kernel `name` for `heads`. Launch: grid (S / 64, B·H),
/// [`THREADS`] threads, [`Heads::shared_bytes`] of dynamic shared memory; arguments Q, K, V,
/// O, LSE (pointers), S, H (u32; S a multiple of 64) and the softmax scale (f32).
pub fn attention_forward(name: &str, heads: Heads) -> String {
    let heads = heads.check().expect("valid head dims");
    let (qk_stride, v_stride) = (Heads::stride(heads.qk), Heads::stride(heads.v));
    let mut g = Lines::new();
    let log2e = g.f32(std::f64::consts::LOG2_E);
    let tid = g.index_i64("gpu.thread_id x");
    let warp = g.op_c("udiv", &tid, 32);
    let lane = g.op_c("urem", &tid, 32);
    let quad_row = g.op_c("udiv", &lane, 4);
    let quad_col = g.op_c("urem", &lane, 4);
    let [seq, nheads] = ["%seq", "%heads"].map(|x| g.line(format!("llvm.zext {x} : i32 to i64")));
    // The heaviest blocks (most keys) first.
    let blocks = g.index_i64("gpu.grid_dim x");
    let block = g.index_i64("gpu.block_id x");
    let last = g.op_c("sub", &blocks, 1);
    let q_block = g.op("sub", &last, &block);
    let q0 = g.op_c("mul", &q_block, BLOCK_ROWS.into());
    let bh = g.index_i64("gpu.block_id y");
    let batch = g.op("udiv", &bh, &nheads);
    let head = g.op("urem", &bh, &nheads);
    // Element offsets of (batch, head)'s first row in Q/K and in V/O, and between rows.
    let token0 = g.op("mul", &batch, &seq);
    let first_row = g.op("mul", &token0, &nheads);
    let first_row = g.op("add", &first_row, &head);
    let [qk_at, v_at] = [heads.qk, heads.v].map(|w| g.op_c("mul", &first_row, w.into()));
    let [qk_row, v_row] = [heads.qk, heads.v].map(|w| g.op_c("mul", &nheads, w.into()));

    let smem = g.line("llvm.mlir.addressof @tiles : !llvm.ptr<3>");
    let sq = g.line(format!("llvm.ptrtoint {smem} : !llvm.ptr<3> to i64"));
    let rows = u64::from(BLOCK_ROWS);
    let sk = g.op_c("add", &sq, rows * qk_stride);
    let sv = g.op_c("add", &sk, rows * qk_stride);

    // Q's 64 rows; this lane's row of this warp's A fragments (16 of Dqk at a time), read from
    // shared memory at each key block (kept in registers they would spill).
    stage(&mut g, "%q", &qk_at, &qk_row, &q0, heads.qk, &sq, qk_stride, &tid);
    let warp_row = g.op_c("mul", &warp, 16);
    let q_lane_at = {
        let row = g.op_c("urem", &lane, 16);
        let row = g.op("add", &warp_row, &row);
        let col = g.op_c("udiv", &lane, 16);
        let col = g.op_c("mul", &col, 16);
        let at = g.op_c("mul", &row, qk_stride);
        let at = g.op("add", &at, &col);
        g.op("add", &at, &sq)
    };

    // The thread's two rows within the block.
    let my_rows = {
        let r = g.op("add", &warp_row, &quad_row);
        [r.clone(), g.op_c("add", &r, 8)]
    };
    // The key blocks up to the diagonal, carrying the output accumulators (16 rows × Dv per
    // warp: per 8 columns, rows g and g + 8, two columns each) and each of the thread's two
    // rows' running maximum and sum.
    let o_count = (heads.v / 8 * 4) as usize;
    let zero = g.f32(0.0);
    let minus_inf = g.line("llvm.mlir.constant(0xFF800000 : f32) : f32");
    let mut iter_args: Vec<String> = (0..o_count).map(|i| format!("%o{i} = {zero}")).collect();
    iter_args.extend([
        format!("%m0 = {minus_inf}"),
        format!("%m1 = {minus_inf}"),
        format!("%l0 = {zero}"),
        format!("%l1 = {zero}"),
    ]);
    let carried = o_count + 4;
    let f32s = vec!["f32"; carried].join(", ");
    let [lower, upper, step] = {
        let upper = g.op_c("add", &q_block, 1);
        [g.i64(0), upper, g.i64(1)].map(|v| g.line(format!("arith.index_cast {v} : i64 to index")))
    };
    g.stmt(format!(
        "%state:{carried} = scf.for %key_block = {lower} to {upper} step {step} iter_args({}) -> ({f32s}) {{",
        iter_args.join(", ")
    ));
    let j = g.line("arith.index_cast %key_block : index to i64");
    let k0 = g.op_c("mul", &j, BLOCK_ROWS.into());
    // The last block's K and V are read: stage this block's.
    g.stmt("gpu.barrier");
    stage(&mut g, "%k", &qk_at, &qk_row, &k0, heads.qk, &sk, qk_stride, &tid);
    stage(&mut g, "%v", &v_at, &v_row, &k0, heads.v, &sv, v_stride, &tid);
    g.stmt("gpu.barrier");

    // Scores: 8 tiles of 8 keys, each the sum over Dqk of Q's fragments times K's.
    let mut scores: Vec<Vec<String>> = vec![vec![zero.clone(); 4]; 8];
    {
        let key = g.op_c("urem", &lane, 8);
        let upper_half = g.op_c("udiv", &lane, 16);
        let upper_half = g.op_c("mul", &upper_half, 8);
        let key = g.op("add", &key, &upper_half);
        let col = g.op_c("udiv", &lane, 8);
        let col = g.op_c("urem", &col, 2);
        let col = g.op_c("mul", &col, 16);
        let at = g.op_c("mul", &key, qk_stride);
        let at = g.op("add", &at, &col);
        let at = g.op("add", &at, &sk);
        for kk in 0..heads.qk / 16 {
            let q_at = g.op_c("add", &q_lane_at, u64::from(kk) * 32);
            let a = ldmatrix(&mut g, &q_at, false);
            for pair in 0..4u64 {
                let at = g.op_c("add", &at, pair * 16 * qk_stride + u64::from(kk) * 32);
                let b = ldmatrix(&mut g, &at, false);
                for half in 0..2 {
                    let n = 2 * pair as usize + half;
                    scores[n] = mma(&mut g, &scores[n], &a, &b[2 * half..2 * half + 2]);
                }
            }
        }
    }
    // Base-2 logits; on the diagonal block, keys after the query masked out.
    let log2_scale = g.line(format!("llvm.fmul %scale, {log2e} : f32"));
    let diagonal = g.line(format!("llvm.icmp \"eq\" {j}, {q_block} : i64"));
    let key_col = g.op_c("mul", &quad_col, 2);
    for (n, tile) in scores.iter_mut().enumerate() {
        for (e, x) in tile.iter_mut().enumerate() {
            let scaled = g.line(format!("llvm.fmul {x}, {log2_scale} : f32"));
            let key = g.op_c("add", &key_col, (8 * n + e % 2) as u64);
            let after = g.line(format!("llvm.icmp \"ugt\" {key}, {} : i64", my_rows[e / 2]));
            let masked = g.line(format!("llvm.and {diagonal}, {after} : i1"));
            *x = g.line(format!("llvm.select {masked}, {minus_inf}, {scaled} : i1, f32"));
        }
    }
    // Per row: the new maximum (over the quad's four threads), the correction of the old sum
    // and output, the probabilities and their sum.
    let mut alphas = Vec::new();
    let mut news = Vec::new();
    let mut sums = Vec::new();
    for r in 0..2 {
        let mut max =
            g.line(format!("llvm.intr.maxnum({}, {}) : (f32, f32) -> f32", scores[0][2 * r], scores[0][2 * r + 1]));
        for tile in &scores[1..] {
            for e in 0..2 {
                max = g.line(format!("llvm.intr.maxnum({max}, {}) : (f32, f32) -> f32", tile[2 * r + e]));
            }
        }
        let max = quad_reduce(&mut g, &max, Combine::Max);
        let new = g.line(format!("llvm.intr.maxnum(%m{r}, {max}) : (f32, f32) -> f32"));
        // Old maximum −∞ (no key yet): the difference is −∞ and 2^−∞ = 0.
        let drop = g.line(format!("llvm.fsub %m{r}, {new} : f32"));
        alphas.push(exp2(&mut g, &drop));
        news.push(new);
    }
    for tile in scores.iter_mut() {
        for (e, x) in tile.iter_mut().enumerate() {
            let d = g.line(format!("llvm.fsub {x}, {} : f32", news[e / 2]));
            *x = exp2(&mut g, &d);
        }
    }
    for r in 0..2 {
        let mut sum = g.line(format!("llvm.fmul %l{r}, {} : f32", alphas[r]));
        for tile in &scores {
            for e in 0..2 {
                sum = g.line(format!("llvm.fadd {sum}, {} : f32", tile[2 * r + e]));
            }
        }
        sums.push(sum);
    }
    let mut o: Vec<String> =
        (0..o_count).map(|i| g.line(format!("llvm.fmul %o{i}, {} : f32", alphas[(i % 4) / 2]))).collect();
    // O += P·V: P's score tiles become A fragments (keys 16kk.. as two tiles of 8), V's
    // transposed 8×8 matrices the B fragments.
    {
        let key = g.op_c("urem", &lane, 8);
        let second = g.op_c("udiv", &lane, 8);
        let second = g.op_c("urem", &second, 2);
        let second = g.op_c("mul", &second, 8);
        let key = g.op("add", &key, &second);
        let col = g.op_c("udiv", &lane, 16);
        let col = g.op_c("mul", &col, 16);
        let at = g.op_c("mul", &key, v_stride);
        let at = g.op("add", &at, &col);
        let at = g.op("add", &at, &sv);
        for kk in 0..4usize {
            let (t0, t1) = (&scores[2 * kk], &scores[2 * kk + 1]);
            let a = [
                pack(&mut g, &t0[0], &t0[1]),
                pack(&mut g, &t0[2], &t0[3]),
                pack(&mut g, &t1[0], &t1[1]),
                pack(&mut g, &t1[2], &t1[3]),
            ];
            for pair in 0..(heads.v / 16) as usize {
                let at = g.op_c("add", &at, (kk as u64) * 16 * v_stride + pair as u64 * 32);
                let b = ldmatrix(&mut g, &at, true);
                for half in 0..2 {
                    let n = 2 * pair + half;
                    let acc = o[4 * n..4 * n + 4].to_vec();
                    let out = mma(&mut g, &acc, &a, &b[2 * half..2 * half + 2]);
                    o.splice(4 * n..4 * n + 4, out);
                }
            }
        }
    }
    let yielded: Vec<String> = o.iter().chain(&news).chain(&sums).cloned().collect();
    g.stmt(format!("scf.yield {} : {f32s}", yielded.join(", ")));
    g.stmt("}");

    // O / l for the thread's rows and columns; the log-sum-exp from the quad's first thread.
    let ln2 = g.f32(std::f64::consts::LN_2);
    let zero64 = g.i64(0);
    let one = g.f32(1.0);
    let mut inverse = Vec::new();
    for (r, my_row) in my_rows.iter().enumerate() {
        let l = quad_reduce(&mut g, &format!("%state#{}", o_count + 2 + r), Combine::Add);
        inverse.push(g.line(format!("llvm.fdiv {one}, {l} : f32")));
        let log = g.asm_f32("lg2.approx.ftz.f32 $0, $1;", &[(l, "f", "f32")]);
        let lse = g.line(format!("llvm.fadd %state#{}, {log} : f32", o_count + r));
        let lse = g.line(format!("llvm.fmul {lse}, {ln2} : f32"));
        let leads = g.line(format!("llvm.icmp \"eq\" {quad_col}, {zero64} : i64"));
        g.stmt(format!("scf.if {leads} {{"));
        let row = g.op("add", &q0, my_row);
        let at = g.op("mul", &bh, &seq);
        let at = g.op("add", &at, &row);
        let p = g.line(format!("llvm.getelementptr %lse[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
        g.stmt(format!("llvm.store {lse}, {p} : f32, !llvm.ptr<1>"));
        g.stmt("}");
    }
    let col = g.op_c("mul", &quad_col, 2);
    for (r, my_row) in my_rows.iter().enumerate() {
        let row = g.op("add", &q0, my_row);
        let at = g.op("mul", &row, &v_row);
        let at = g.op("add", &at, &v_at);
        let at = g.op("add", &at, &col);
        for n in 0..(heads.v / 8) as usize {
            let values =
                [0, 1].map(|e| g.line(format!("llvm.fmul %state#{}, {} : f32", 4 * n + 2 * r + e, inverse[r])));
            let at = g.op_c("add", &at, 8 * n as u64);
            let p = g.line(format!("llvm.getelementptr %o[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
            let pair = g.line("llvm.mlir.poison : vector<2xf32>");
            let [first, second] = [g.i32(0), g.i32(1)];
            let pair = g.line(format!("llvm.insertelement {}, {pair}[{first} : i32] : vector<2xf32>", values[0]));
            let pair = g.line(format!("llvm.insertelement {}, {pair}[{second} : i32] : vector<2xf32>", values[1]));
            g.stmt(format!("llvm.store {pair}, {p} {{alignment = 8 : i64}} : vector<2xf32>, !llvm.ptr<1>"));
        }
    }
    format!(
        "module attributes {{gpu.container_module}} {{\n  gpu.module @{name} [{target}] {{\n    \
         llvm.mlir.global external @tiles() {{addr_space = 3 : i32, alignment = 16 : i64}} : !llvm.array<0 x i8>\n    \
         gpu.func @{name}(%q: !llvm.ptr<1>, %k: !llvm.ptr<1>, %v: !llvm.ptr<1>, %o: !llvm.ptr<1>, %lse: !llvm.ptr<1>, \
         %seq: i32, %heads: i32, %scale: f32) kernel attributes {{known_block_size = array<i32: {THREADS}, 1, 1>}} {{\n\
         {body}      gpu.return\n    }}\n  }}\n}}\n",
        target = super::emit::TARGET,
        body = g.text()
    )
}

/// Stages 64 rows of `width` f32 values as BF16 in shared memory at `smem` (rows `stride`
/// bytes apart): row r of the tile is element `at + (row0 + r)·row + c` of `src`. Each thread
/// moves 16 bytes at a time, consecutive threads consecutive bytes.
#[allow(clippy::too_many_arguments)]
fn stage(g: &mut Lines, src: &str, at: &str, row: &str, row0: &str, width: u32, smem: &str, stride: u64, tid: &str) {
    let chunks = u64::from(width / 4);
    let first = g.op("mul", row0, row);
    let first = g.op("add", &first, at);
    for i in 0..u64::from(BLOCK_ROWS * width / 4 / THREADS) {
        let c = g.op_c("add", tid, i * u64::from(THREADS));
        let r = g.op_c("udiv", &c, chunks);
        let col = g.op_c("urem", &c, chunks);
        let from = g.op("mul", &r, row);
        let from = g.op("add", &from, &first);
        let col4 = g.op_c("mul", &col, 4);
        let from = g.op("add", &from, &col4);
        let p = g.line(format!("llvm.getelementptr {src}[{from}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
        let x = g.line(format!("llvm.load {p} {{alignment = 16 : i64}} : !llvm.ptr<1> -> vector<4xf32>"));
        let e: Vec<String> = (0..4)
            .map(|k| {
                let k = g.i32(k);
                g.line(format!("llvm.extractelement {x}[{k} : i32] : vector<4xf32>"))
            })
            .collect();
        let (low, high) = (pack(g, &e[0], &e[1]), pack(g, &e[2], &e[3]));
        let to = g.op_c("mul", &r, stride);
        let col8 = g.op_c("mul", &col, 8);
        let to = g.op("add", &to, &col8);
        let to = g.op("add", &to, smem);
        let to = g.line(format!("llvm.trunc {to} : i64 to i32"));
        g.asm("st.shared.v2.b32 [$0], {$1, $2};", &[(to, "r", "i32"), (low, "r", "i32"), (high, "r", "i32")]);
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

    /// MLA's forward lowers to PTX whose products are BF16 `mma.sync`s fed by `ldmatrix` (V's
    /// transposed), and, where `DSC_PTXAS` names ptxas, assembles for sm_90a without spilling.
    #[test]
    fn the_attention_forward_lowers_to_tensor_core_products_and_assembles() {
        let heads = Heads { qk: 192, v: 128 };
        let ptx =
            crate::mlir::lower::Lowering::default().ptx(&attention_forward("attention", heads), false).expect("lowers");
        // Per key block and warp: 12 × 8 score products and 4 × 16 output products.
        assert_eq!(
            ptx.matches("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32").count(),
            12 * 8 + 4 * 16,
            "{ptx}"
        );
        assert_eq!(ptx.matches("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16").count(), 4 * 8, "{ptx}");
        assert!(ptx.contains("ex2.approx.ftz.f32") && ptx.contains("shfl.sync.bfly.b32"), "{ptx}");
        if let Some(report) = crate::mlir::ptx::assemble(&ptx) {
            assert!(report.contains("0 bytes spill stores"), "{report}");
        }
    }
}
