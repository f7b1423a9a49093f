//! The forward kernel: O and the rows' log-sum-exp, by the online softmax over the key blocks.

use super::*;

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
    let feed = if heads.streams() {
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
        b.store_row_value(&mut g, "%lse", &q0, my_row, &lse);
    }
    b.store(&mut g, "%o", Layout::V, heads, &out, &q0, None);
    let mut args = "%q: !llvm.ptr<1>, %k: !llvm.ptr<1>, %v: !llvm.ptr<1>, %o: !llvm.ptr<1>, %lse: !llvm.ptr<1>, \
                    %seq: i32, %heads: i32, %scale: f32"
        .to_string();
    if heads.streams() {
        g.stmt("}");
        args = format!("{args}, {}", map_args(None));
    }
    module(name, &args, g.text(), heads.threads())
}
