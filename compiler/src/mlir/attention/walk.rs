//! The walk over the column blocks: the two loops (masked at the diagonal, unmasked off it),
//! where their tiles come from ([`Feed`]: staged or streamed), the per-column terms, and the
//! forward's software-pipelined walk ([`Pipelined`]).

use super::*;

/// Which columns of the diagonal block a row keeps: the forward's and the query pass's rows
/// are queries (keys up to the row), the key pass's rows are keys (queries from the row).
#[derive(Clone, Copy)]
pub(super) enum Order {
    ColumnsUpToRow,
    ColumnsFromRow,
}

/// A walk over the column blocks software-pipelined within each warpgroup (FlashAttention-3's
/// intra-warpgroup overlap): a block's scores and the last block's probabilities times its
/// trailing tile (the columns' second tensor, lag 1) are issued together, and the tensor cores
/// run that accumulation while the scores become probabilities: the forward's walk over keys.
pub(super) struct Pipelined<'a> {
    pub(super) b: &'a Block,
    pub(super) feed: Feed<'a>,
    pub(super) order: Order,
    /// The row block (i64) and the warpgroup's tile of it, for the mask.
    pub(super) row_block: &'a str,
    pub(super) tile: &'a str,
}

impl Pipelined<'_> {
    /// Walks column blocks `first..last` (i64): the scores of the rows tile `rows` (K-major,
    /// `width` wide) with each block's first tile become probabilities by `probabilities` (of
    /// block j, on the values carried beside the accumulators, `extra`: returns them anew and
    /// the factors of the accumulators' two rows, if they change), which are accumulated
    /// (`count` values a thread) with the block's trailing tile. Returns the accumulators and
    /// the extra values after the last block.
    #[allow(clippy::type_complexity)]
    pub(super) fn run(
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
pub(super) enum Feed<'a> {
    Staged(&'a Columns<'a>),
    Streamed(&'a Ring),
}

impl Feed<'_> {
    /// The width of the trailing tensor (the accumulations' B).
    pub(super) fn trailing_width(&self) -> u32 {
        match self {
            Feed::Staged(columns) => columns.sources[1].1.width(columns.heads),
            Feed::Streamed(ring) => ring.width(1),
        }
    }

    /// Before the walk from block `first`: [`Columns::prefetch`].
    pub(super) fn prefetch(&self, g: &mut Lines, b: &Block, first: &str) {
        if let Feed::Staged(columns) = self {
            columns.prefetch(g, b, first);
        }
    }

    /// The tiles read at block `j` of the walk over `first..upper`, ready.
    pub(super) fn stage(&self, g: &mut Lines, b: &Block, j: &str, walk: [&str; 2]) -> [String; 2] {
        match self {
            Feed::Staged(columns) => columns.stage(g, b, j, walk),
            Feed::Streamed(ring) => ring.stage(g, j, walk[0]),
        }
    }

    /// After the products reading tensor `t`'s tile at block `j` are done: its release
    /// (staged tiles are released by the next block's barrier).
    pub(super) fn release(&self, g: &mut Lines, b: &Block, t: usize, j: &str) {
        if let Feed::Streamed(ring) = self {
            ring.release(g, b, t, j);
        }
    }

    /// Where the per-column terms of block `j` lie ([`Columns::terms`], [`Ring::terms`]).
    pub(super) fn terms(&self, g: &mut Lines, j: &str) -> String {
        match self {
            Feed::Staged(columns) => columns.terms(g, j),
            Feed::Streamed(ring) => ring.terms(g, j),
        }
    }

    /// After the walk over `first..upper`: the trailing tensor's tile of its last block, ready.
    pub(super) fn drain(&self, g: &mut Lines, b: &Block, [first, upper]: [&str; 2]) -> String {
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
pub(super) fn carried_bits(g: &mut Lines, p: &[Vec<String>]) -> Vec<String> {
    let a = operands(g, p);
    a.iter().flatten().map(|x| g.line(format!("llvm.bitcast {x} : i32 to f32"))).collect()
}

/// The column blocks from `first` to `last` (i64) of row block `row_block` in two `scf.for`
/// loops carrying the f32 values `initial`: those no row of the block masks, and the block's
/// own [`WARPGROUPS`] (the warpgroups' diagonals), masked; in `order`'s direction (queries
/// walk the keys up to their diagonal, `last`; keys the queries from theirs, `first`). `body`
/// writes an iteration: of column block j (i64), on the carried values, masked or not; it
/// returns the values carried on. The values after both loops.
pub(super) fn column_loops(
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

/// Staged term `term` ([`Columns`]) of the thread's 16 columns of block `j` (i64), column
/// 8n + 2t + e at 2n + e.
pub(super) fn column_terms(g: &mut Lines, b: &Block, feed: &Feed, j: &str, term: u64) -> Vec<String> {
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
pub(super) fn column_shifts(g: &mut Lines, b: &Block, feed: &Feed, j: &str) -> Vec<String> {
    let lse = column_terms(g, b, feed, j, 0);
    lse.iter().map(|x| g.line(format!("llvm.fmul {x}, {} : f32", b.minus_log2e))).collect()
}
