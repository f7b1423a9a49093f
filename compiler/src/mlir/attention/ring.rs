//! The tiles of a pass streamed by TMA (FlashAttention-3's warp specialisation), where Q, K
//! and V are packed BF16: a producer warpgroup (the block's third; its first thread) copies
//! each consumer warpgroup's row tiles once (the packed ones of [`super::row_sources`]: Q in
//! the forward and the query pass, K and V in the key pass), then every column block's tiles
//! of the two column tensors (K and V, or Q and dO) and, with the first's, the block's
//! per-column terms (the key pass's log-sum-exp and D, 256 bytes each: `cp.async.bulk`), into a
//! ring of [`SLOTS`] slots per tensor, each box 64 rows × 64 columns of one head (128 bytes,
//! TMA's 128-byte swizzle: the layout [`super::stage`] writes and the products read). Each slot
//! has two mbarriers: `full` (the producer's expected bytes, completed by the copies) and
//! `empty` (one arrival per consumer warp once its products have read the slot). The consumer
//! warpgroups meet no block-wide barrier in the column loop: each waits for the tiles it reads
//! and releases them as soon as it is done with them, so neither waits for the other, and the
//! copies run up to [`SLOTS`] blocks ahead of both. The producer gives its registers to the
//! consumers (`setmaxnreg`): a ninth warp alone would cost them as many (the register file is
//! split among the four schedulers, whose warps share it: 3 warps on one of them caps a thread
//! at 168 registers, which the query pass exceeds).
//!
//! The launch passes the tensor maps [`map_args`] names: Q's, K's and V's, and in the backward
//! dO's, each the 2-D BF16 tensor [B·S rows, H·D columns] (the packed [B, S, H, D] as it lies),
//! boxes of 64 × 64. The backward's dO is f32: the query pass, which stages its rows of it
//! rounded to BF16, stores them through dO's map into a packed copy ([`store_rows`]), which
//! the key pass streams.

use super::{Block, ColumnSources, Heads, Layout, Lines, Pass, REGION, TILE_ROWS, WARPGROUPS};
use crate::mlir::ptx;

/// A tensor map's box: 64 columns (128 bytes of BF16) × 64 rows.
pub const MAP_BOX: [u32; 2] = [64, TILE_ROWS];

/// Slots of each tensor's ring.
pub const SLOTS: u64 = 3;

/// Bytes of a column block's term: 64 f32.
const TERM_BYTES: u64 = TILE_ROWS as u64 * 4;

/// The tensor maps a streaming kernel takes after its other arguments: the forward's (`None`)
/// Q's, K's and V's; a backward pass's also dO's (its packed copy).
pub fn map_args(pass: Option<Pass>) -> String {
    let tensors: &[&str] = if pass.is_some() { &["q", "k", "v", "do"] } else { &["q", "k", "v"] };
    tensors.iter().map(|t| format!("%{t}_map: !llvm.ptr<1>")).collect::<Vec<_>>().join(", ")
}

/// The map of tensor `src` (`%q`, `%k`, `%v`, `%do`).
fn map(src: &str) -> String {
    format!("{src}_map")
}

/// Warps that read the ring (each arrives once at a slot's `empty`).
const CONSUMER_WARPS: u32 = WARPGROUPS * 4;

/// Threads of a streaming block: the consumer warpgroups and the producer's.
pub const STREAMING_THREADS: u32 = (WARPGROUPS + 1) * 128;

/// Registers a producer thread keeps and a consumer's take (`setmaxnreg`). They must fit what
/// the block was given at launch: 384 threads at most 168 registers each (the file over 384,
/// in steps of 8), or `setmaxnreg.inc` waits for registers that never come.
const PRODUCER_REGISTERS: u32 = 24;
const CONSUMER_REGISTERS: u32 = 240;
const _: () = assert!(
    PRODUCER_REGISTERS * 128 + CONSUMER_REGISTERS * 128 * WARPGROUPS
        <= (65_536 / STREAMING_THREADS) / 8 * 8 * STREAMING_THREADS
);

/// The ring of the column blocks' tiles of two tensors (K and V, or Q and dO; `sources`),
/// each trailing the walk by its lag (as [`super::Columns`]' do: the forward's V by a block),
/// with the first's per-column terms, and the mbarriers after them.
pub(super) struct Ring {
    heads: Heads,
    sources: ColumnSources,
    /// The walk's first column block (i64): its rounds through the ring count from there.
    first: String,
    /// Each tensor's first slot, the terms' (shared byte, i64).
    slots: [String; 2],
    terms: String,
    /// The mbarriers' first (shared byte, i64): each tensor's `full` then `empty` per slot,
    /// then the row tiles' `full`.
    barriers: String,
}

/// The row tiles the producer copies: tensors (`%q`, `%k`, `%v`) of a layout, each at its
/// offset within a warpgroup's row tiles, which lie from shared byte `at` (i64) `stride`
/// bytes apart.
pub(super) struct RowTiles<'a> {
    pub tensors: Vec<(&'static str, Layout, u64)>,
    pub at: &'a str,
    pub stride: u64,
}

impl Ring {
    /// Shared bytes the ring of `sources` takes at `heads`: the slots, the terms and the
    /// mbarriers.
    pub fn bytes(heads: Heads, (tensors, _, terms): &ColumnSources) -> u64 {
        let tiles: u64 = tensors.iter().map(|&(_, layout)| Heads::tile_bytes(layout.width(heads))).sum();
        SLOTS * (tiles + terms.len() as u64 * TERM_BYTES) + (4 * SLOTS + 1) * 8
    }

    /// The ring of `sources` from shared byte `at` (1,024-byte aligned) for the walk over
    /// column blocks `walk` (i64) of row block `row_block`, its producer copying `rows`: its
    /// mbarriers initialised, then the roles part. The producer's code ([`Ring::produce`]) is
    /// written here; the consumers' follows, in the `else` branch the caller closes (`}`)
    /// after it.
    pub fn start(
        g: &mut Lines,
        b: &Block,
        (heads, sources): (Heads, ColumnSources),
        at: &str,
        row_block: &str,
        rows: &RowTiles,
        walk: [&str; 2],
    ) -> Ring {
        let ring = Ring::new(g, b, (heads, sources), at, walk[0]);
        g.stmt("gpu.barrier");
        let threads = g.i64(u64::from(CONSUMER_WARPS) * 32);
        let produces = g.line(format!("llvm.icmp \"uge\" {}, {threads} : i64", b.tid));
        g.stmt(format!("scf.if {produces} {{"));
        g.asm(&format!("setmaxnreg.dec.sync.aligned.u32 {PRODUCER_REGISTERS};"), &[]);
        ring.produce(g, b, row_block, rows, walk);
        g.stmt("} else {");
        g.asm(&format!("setmaxnreg.inc.sync.aligned.u32 {CONSUMER_REGISTERS};"), &[]);
        ring
    }

    /// The ring from shared byte `at`, its mbarriers initialised by the block's first thread;
    /// the caller's block-wide barrier follows, before any role reads them.
    fn new(g: &mut Lines, b: &Block, (heads, sources): (Heads, ColumnSources), at: &str, first: &str) -> Ring {
        let [first_bytes, second_bytes] = sources.0.map(|(_, layout)| SLOTS * Heads::tile_bytes(layout.width(heads)));
        let second_at = g.op_c("add", at, first_bytes);
        let terms = g.op_c("add", &second_at, second_bytes);
        let barriers = g.op_c("add", &terms, SLOTS * sources.2.len() as u64 * TERM_BYTES);
        let ring =
            Ring { heads, sources, first: first.to_string(), slots: [at.to_string(), second_at], terms, barriers };
        g.open_if_first(&b.tid);
        for index in 0..4 * SLOTS + 1 {
            // `empty` (the odd sets) takes an arrival from every consumer warp.
            let count = if index < 4 * SLOTS && (index / SLOTS) % 2 == 1 { CONSUMER_WARPS } else { 1 };
            let at = g.op_c("add", &ring.barriers, 8 * index);
            let at = g.line(format!("llvm.trunc {at} : i64 to i32"));
            ptx::mbarrier_init(g, &at, count);
        }
        g.asm("fence.mbarrier_init.release.cluster;", &[]);
        g.stmt("}");
        ring
    }

    /// Tensor `t`'s width.
    pub fn width(&self, t: usize) -> u32 {
        self.sources.0[t].1.width(self.heads)
    }

    /// Column block `block`'s (i64) slot and the parity of its round through the ring, counted
    /// from the walk's first block (the key pass's walks start at their diagonal: a slot's first
    /// round must be round 0, whose `empty` the producer passes without waiting).
    fn slot(&self, g: &mut Lines, block: &str) -> (String, String) {
        let position = g.op("sub", block, &self.first);
        let slot = g.op_c("urem", &position, SLOTS);
        let round = g.op_c("udiv", &position, SLOTS);
        (slot, g.op_c("and", &round, 1))
    }

    /// Tensor `t`'s `full` (`empty`: 1) mbarrier of `slot` (i64), a 32-bit shared address.
    fn barrier(&self, g: &mut Lines, t: usize, empty: u64, slot: &str) -> String {
        let set = g.i64(8 * (2 * t as u64 + empty) * SLOTS);
        let at = g.op_c("mul", slot, 8);
        let at = g.op("add", &at, &set);
        let at = g.op("add", &self.barriers, &at);
        g.line(format!("llvm.trunc {at} : i64 to i32"))
    }

    /// The row tiles' `full` mbarrier, a 32-bit shared address.
    fn rows_full(&self, g: &mut Lines) -> String {
        let at = g.op_c("add", &self.barriers, 8 * 4 * SLOTS);
        g.line(format!("llvm.trunc {at} : i64 to i32"))
    }

    /// Tensor `t`'s tile in `slot` (shared byte, i64).
    fn tile_at(&self, g: &mut Lines, t: usize, slot: &str) -> String {
        let offset = g.op_c("mul", slot, Heads::tile_bytes(self.width(t)));
        g.op("add", &self.slots[t], &offset)
    }

    /// Where the terms of column block `block` (i64) lie: term k's value of the block's column
    /// c at byte 256k + 4c (as [`super::Columns::terms`]).
    pub fn terms(&self, g: &mut Lines, block: &str) -> String {
        let (slot, _) = self.slot(g, block);
        let offset = g.op_c("mul", &slot, self.sources.2.len() as u64 * TERM_BYTES);
        g.op("add", &self.terms, &offset)
    }

    /// The producer (the producer warpgroup's first thread): the consumer warpgroups' `rows`
    /// of row block `row_block`, then the column tensors' tiles (and the first's terms) of
    /// column blocks `first..upper` (i64), each into its slot once the consumers have released
    /// the slot's last round.
    fn produce(&self, g: &mut Lines, b: &Block, row_block: &str, rows: &RowTiles, walk: [&str; 2]) {
        let [first, upper] = walk;
        let producer = g.i64(u64::from(CONSUMER_WARPS) * 32);
        let is_producer = g.line(format!("llvm.icmp \"eq\" {}, {producer} : i64", b.tid));
        g.stmt(format!("scf.if {is_producer} {{"));
        let rows_full = self.rows_full(g);
        let row = g.op_c("mul", row_block, u64::from(TILE_ROWS * WARPGROUPS));
        let tile_bytes = |layout: Layout| Heads::tile_bytes(layout.width(self.heads));
        let bytes = u64::from(WARPGROUPS) * rows.tensors.iter().map(|&(_, layout, _)| tile_bytes(layout)).sum::<u64>();
        ptx::mbarrier_expect_bytes(g, &rows_full, u32::try_from(bytes).expect("row tiles' bytes fit a u32"));
        for &(src, layout, offset) in &rows.tensors {
            let to = g.op_c("add", rows.at, offset);
            self.copy(
                g,
                b,
                &map(src),
                layout.width(self.heads),
                &row,
                (&to, WARPGROUPS.into(), rows.stride),
                &rows_full,
            );
        }
        let one = g.i64(1);
        let j = g.open_for(first, upper, &one, &[]).index;
        let (slot, parity) = self.slot(g, &j);
        let released = g.op_c("xor", &parity, 1);
        let row = g.op_c("mul", &j, TILE_ROWS.into());
        for (t, &(src, layout)) in self.sources.0.iter().enumerate() {
            let empty = self.barrier(g, t, 1, &slot);
            ptx::mbarrier_wait(g, &empty, &released);
            let full = self.barrier(g, t, 0, &slot);
            let to = self.tile_at(g, t, &slot);
            let width = layout.width(self.heads);
            let terms = if t == 0 { self.sources.2 } else { &[] };
            let bytes = Heads::tile_bytes(width) + terms.len() as u64 * TERM_BYTES;
            ptx::mbarrier_expect_bytes(g, &full, u32::try_from(bytes).expect("a slot's bytes fit a u32"));
            self.copy(g, b, &map(src), width, &row, (&to, 1, 0), &full);
            if !terms.is_empty() {
                self.copy_terms(g, b, &j, &full);
            }
        }
        g.stmt("}");
        g.stmt("}");
    }

    /// Copies the terms of column block `block` (i64) into its slot's, completing on `full`.
    fn copy_terms(&self, g: &mut Lines, b: &Block, block: &str, full: &str) {
        let to = self.terms(g, block);
        let c0 = g.op_c("mul", block, TILE_ROWS.into());
        let from = g.op("mul", &b.bh, &b.seq);
        let from = g.op("add", &from, &c0);
        for (k, term) in self.sources.2.iter().enumerate() {
            let to = g.op_c("add", &to, k as u64 * TERM_BYTES);
            let to = g.line(format!("llvm.trunc {to} : i64 to i32"));
            let p = g.line(format!("llvm.getelementptr {term}[{from}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
            let p = g.line(format!("llvm.ptrtoint {p} : !llvm.ptr<1> to i64"));
            let bytes = g.i32(TERM_BYTES as u32);
            g.asm(
                "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1], $2, [$3];",
                &[(to, "r", "i32"), (p, "l", "i64"), (bytes, "r", "i32"), (full.to_string(), "r", "i32")],
            );
        }
    }

    /// Copies `tiles` 64-row tiles of the tensor of `map` (`width` wide) from the head's row
    /// `row` (i64, within its sequence) into shared byte `to` on, `stride` bytes apart, one box
    /// per 64 columns, completing on mbarrier `full` (which expects their bytes).
    #[allow(clippy::too_many_arguments)]
    fn copy(
        &self,
        g: &mut Lines,
        b: &Block,
        map: &str,
        width: u32,
        row: &str,
        (to, tiles, stride): (&str, u64, u64),
        full: &str,
    ) {
        let row = g.op("add", &b.sequence_row, row);
        let column = g.op_c("mul", &b.head, width.into());
        for tile in 0..tiles {
            let row = g.op_c("add", &row, tile * u64::from(TILE_ROWS));
            for region in 0..u64::from(width / MAP_BOX[0]) {
                let column = g.op_c("add", &column, region * u64::from(MAP_BOX[0]));
                let at = g.op_c("add", to, tile * stride + region * REGION);
                ptx::tma_load(g, &at, map, [&column, &row], full, false);
            }
        }
    }

    /// Waits for the warpgroups' row tiles.
    pub fn await_rows(&self, g: &mut Lines) {
        let rows_full = self.rows_full(g);
        let zero = g.i64(0);
        ptx::mbarrier_wait(g, &rows_full, &zero);
    }

    /// Waits for tensor `t`'s tile of column block `block` (i64); where it lies.
    fn acquire(&self, g: &mut Lines, t: usize, block: &str) -> String {
        let (slot, parity) = self.slot(g, block);
        self.await_full(g, t, &slot, &parity);
        self.tile_at(g, t, &slot)
    }

    /// Waits for the round of parity `parity` of tensor `t`'s `slot` to be filled.
    fn await_full(&self, g: &mut Lines, t: usize, slot: &str, parity: &str) {
        let full = self.barrier(g, t, 0, slot);
        ptx::mbarrier_wait(g, &full, parity);
    }

    /// At block `j` of the walk from block `first`: where the tiles read there lie (a trailing
    /// tensor's of block j − lag), each awaited where it exists (a trailing tensor has none
    /// before `first + lag`).
    pub fn stage(&self, g: &mut Lines, j: &str, first: &str) -> [String; 2] {
        [0, 1].map(|t| {
            let lag = self.sources.1[t];
            let block = g.op_c("sub", j, lag);
            if lag == 0 {
                return self.acquire(g, t, &block);
            }
            let earliest = g.op_c("add", first, lag);
            let exists = g.line(format!("llvm.icmp \"uge\" {j}, {earliest} : i64"));
            let (slot, parity) = self.slot(g, &block);
            g.stmt(format!("scf.if {exists} {{"));
            self.await_full(g, t, &slot, &parity);
            g.stmt("}");
            self.tile_at(g, t, &slot)
        })
    }

    /// After the walk up to block `upper` (i64, exclusive): the trailing tensor's tile of the
    /// last block, awaited.
    pub fn drain(&self, g: &mut Lines, upper: &str) -> String {
        let block = g.op_c("sub", upper, self.sources.1[1]);
        self.acquire(g, 1, &block)
    }

    /// After the products that read tensor `t`'s tile of the walk's block `j` (a trailing
    /// tensor's of j − lag) are done: the warp's release of its slot (its first lane's).
    pub fn release(&self, g: &mut Lines, b: &Block, t: usize, j: &str) {
        let block = g.op_c("sub", j, self.sources.1[t]);
        let (slot, _) = self.slot(g, &block);
        let empty = self.barrier(g, t, 1, &slot);
        let lane = g.op_c("urem", &b.tid, 32);
        g.open_if_first(&lane);
        ptx::mbarrier_arrive(g, &empty);
        g.stmt("}");
    }
}

/// The query pass's store of the warpgroup's dO rows (staged at shared byte `at`, i64, rounded
/// to BF16 and fenced for the async proxy; the warpgroup past its barrier): rows `row0` on
/// (i64, within the sequence) of the head, into dO's packed copy through its map, one box per
/// 64 columns, by the warpgroup's first thread; [`await_stores`] before the block ends.
pub(super) fn store_rows(g: &mut Lines, b: &Block, heads: Heads, at: &str, row0: &str) {
    g.open_if_first(&b.group_tid);
    let row = g.op("add", &b.sequence_row, row0);
    let row = g.line(format!("llvm.trunc {row} : i64 to i32"));
    let columns = g.op_c("mul", &b.head, heads.v.into());
    let map = g.line(format!("llvm.ptrtoint {} : !llvm.ptr<1> to i64", map("%do")));
    for region in 0..u64::from(heads.v / MAP_BOX[0]) {
        let column = g.op_c("add", &columns, region * u64::from(MAP_BOX[0]));
        let column = g.line(format!("llvm.trunc {column} : i64 to i32"));
        let from = g.op_c("add", at, region * REGION);
        let from = g.line(format!("llvm.trunc {from} : i64 to i32"));
        g.asm(
            "cp.async.bulk.tensor.2d.global.shared::cta.tile.bulk_group [$0, {$1, $2}], [$3];",
            &[(map.clone(), "l", "i64"), (column, "r", "i32"), (row.clone(), "r", "i32"), (from, "r", "i32")],
        );
    }
    g.asm("cp.async.bulk.commit_group;", &[]);
    g.stmt("}");
}

/// The warpgroup's stores ([`store_rows`]) done reading its shared memory, before the block
/// ends.
pub(super) fn await_stores(g: &mut Lines, b: &Block) {
    g.open_if_first(&b.group_tid);
    g.asm("cp.async.bulk.wait_group.read 0;", &[]);
    g.stmt("}");
}
