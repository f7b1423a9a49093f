//! The column blocks' tiles staged by the block's own threads ([`Columns`]: `cp.async` a block
//! ahead, f32 tensors rounded where read) and the swizzled staging of any tile ([`stage`]), where
//! the pass does not stream them ([`super::ring`]).

use super::*;

/// The column loop's two staged tensors (of widths Dqk and Dv). Each tensor trails the loop by
/// its lag (0 or 1): at the loop's block j its tile of block j − lag is read (the forward's V
/// trails its K, the scores of block j computed beside the accumulation of block j − 1). Every
/// tile is fetched by `cp.async` while the block before it is read: a packed tensor's (BF16 as
/// staged) into the second of its two tiles (block j's in tile j mod 2); an f32 tensor's values
/// as they are into its raw buffer ([`Move::Fetch`]), rounded into its one tile at the start of
/// the block that reads them ([`Move::Convert`]: each thread its own copies, right after awaiting
/// them, before it fetches the next block's into the same slots).
pub(super) struct Columns<'a> {
    pub(super) heads: Heads,
    pub(super) sources: [(&'a str, Layout); 2],
    pub(super) lags: [u64; 2],
    /// Each tensor's tile of an even and of an odd block (shared bytes, i64; the same tile twice
    /// for an f32 tensor), and an f32 tensor's raw buffer.
    pub(super) tiles: [[String; 2]; 2],
    pub(super) raw: [Option<String>; 2],
    /// Per-column f32 tensors ([B, H, S]: the key pass's log-sum-exp and D) whose values for
    /// the block's 64 columns are copied with the untrailing tiles, 256 bytes each, and each
    /// buffer's place for them ([`TERMS_BYTES`]).
    pub(super) terms: &'a [&'a str],
    pub(super) term_buffers: [String; 2],
}

impl<'a> Columns<'a> {
    /// Shared bytes a tensor of `width` takes: two tiles, or (f32) one and its raw buffer, as
    /// wide in f32.
    pub(super) fn tensor_bytes(heads: Heads, src: &str, width: u32) -> u64 {
        let tile = Heads::tile_bytes(width);
        if packed(heads, src) {
            2 * tile
        } else {
            3 * tile
        }
    }

    /// Shared bytes the columns `sources` take: the tensors' tiles and raw buffers, and two
    /// blocks' terms.
    pub(super) fn bytes(heads: Heads, (sources, _, terms): &ColumnSources) -> u64 {
        let tensors: u64 =
            sources.iter().map(|&(src, layout)| Self::tensor_bytes(heads, src, layout.width(heads))).sum();
        tensors + if terms.is_empty() { 0 } else { 2 * TERMS_BYTES }
    }

    /// The columns `sources` (each trailing by its lag, with their terms) from shared byte
    /// `at` (1,024-byte aligned): the tensors' tiles, then the raw buffers, then the terms.
    pub(super) fn new(g: &mut Lines, heads: Heads, (sources, lags, terms): ColumnSources, at: &str) -> Columns<'a> {
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
    pub(super) fn select(g: &mut Lines, places: [&String; 2], block: &str) -> String {
        let parity = g.op_c("and", block, 1);
        let zero = g.i64(0);
        let odd = g.line(format!("llvm.icmp \"ne\" {parity}, {zero} : i64"));
        g.line(format!("llvm.select {odd}, {}, {} : i1, i64", places[1], places[0]))
    }

    /// Where tensor `t`'s tile of column block `block` (i64) lies.
    pub(super) fn tile(&self, g: &mut Lines, t: usize, block: &str) -> String {
        Self::select(g, [&self.tiles[t][0], &self.tiles[t][1]], block)
    }

    /// Where the terms of column block `block` (i64) lie: term k's value of the block's column
    /// c at byte 256k + 4c.
    pub(super) fn terms(&self, g: &mut Lines, block: &str) -> String {
        Self::select(g, [&self.term_buffers[0], &self.term_buffers[1]], block)
    }

    /// Copies the terms of column block `block` into its buffer: 16 bytes a thread, 16 threads a
    /// term.
    pub(super) fn copy_terms(&self, g: &mut Lines, b: &Block, block: &str) {
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
    pub(super) fn move_tile(&self, g: &mut Lines, b: &Block, t: usize, block: &str, how: Move) {
        let c0 = g.op_c("mul", block, TILE_ROWS.into());
        let (src, layout) = self.sources[t];
        let at = self.tile(g, t, block);
        b.stage(g, src, how, layout, self.heads, &c0, &at, false);
    }

    /// Issues the copies of tensor `t`'s values of column block `block` (i64).
    pub(super) fn fetch(&self, g: &mut Lines, b: &Block, t: usize, block: &str) {
        let how = match &self.raw[t] {
            Some(raw) => Move::Fetch { raw },
            None => Move::Copy,
        };
        self.move_tile(g, b, t, block, how);
    }

    /// Rounds into its tile each f32 tensor's values (fetched and awaited) read at column block
    /// `j` of a walk from block `first` (a trailing tensor's of block j − lag, none before
    /// `first`), of the tensors whose lag `taken` takes.
    pub(super) fn convert(&self, g: &mut Lines, b: &Block, [first, j]: [&str; 2], taken: impl Fn(u64) -> bool) {
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
    pub(super) fn prefetch(&self, g: &mut Lines, b: &Block, first: &str) {
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
    pub(super) fn stage(&self, g: &mut Lines, b: &Block, j: &str, [first, upper]: [&str; 2]) -> [String; 2] {
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
    pub(super) fn drain(&self, g: &mut Lines, b: &Block, [first, upper]: [&str; 2]) -> [String; 2] {
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

/// How a thread's pieces of a staged tile move ([`stage`]): 16 bytes of the source each.
#[derive(Clone, Copy)]
pub(super) enum Move<'a> {
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
pub(super) fn stage(
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
