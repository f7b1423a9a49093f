//! The backward kernels ([`Pass`]): the query pass (dQ, and D) and the key pass (dK and dV),
//! each recomputing the probabilities from the forward's log-sum-exp.

use super::*;

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
    let feed = if heads.streams() {
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
    // A streamed query pass holds its dO rows in registers (32 a thread; the key pass's
    // accumulators leave no room for its V), its dP products then reading only V's tile from
    // shared memory, as the forward's scores read only K's.
    let held_do = (pass == Pass::Query && heads.streams()).then(|| b.hold(&mut g, &s_rows_v, heads.v));
    let initial = vec![b.zero.clone(); count];
    let sums = column_loops(&mut g, order, &row_block, [&lower, &upper], &initial, |g, j, carried, masked| {
        let [s_cols, s_cols_v] = feed.stage(g, &b, j, [&lower, &upper]);
        let score_rows = Rows::Staged(in_iteration(g, &row_descriptors[0]));
        let dp_rows = match &held_do {
            Some(fragments) => Rows::Held(fragments),
            None => Rows::Staged(in_iteration(g, &row_descriptors[1])),
        };
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
    if heads.streams() && pass == Pass::Query {
        ring::await_stores(&mut g, &b);
    }
    let mut args = format!(
        "%q: !llvm.ptr<1>, %k: !llvm.ptr<1>, %v: !llvm.ptr<1>, %o: !llvm.ptr<1>, %do: !llvm.ptr<1>, \
         %lse: !llvm.ptr<1>, %delta: !llvm.ptr<1>, {grads}, %seq: i32, %heads: i32, %scale: f32"
    );
    if heads.streams() {
        g.stmt("}");
        args = format!("{args}, {}", map_args(Some(pass)));
    }
    module(name, &args, g.text(), heads.threads())
}
