//! The tiles of the forward and the query pass streamed by TMA (FlashAttention-3's warp
//! specialisation), where Q, K and V are packed BF16: a producer warpgroup (the block's third;
//! its first thread) copies each consumer warpgroup's Q tile once, then every column block's K
//! and V tiles, into a ring of [`SLOTS`] slots per tensor, each box 64 rows × 64 columns of one
//! head (128 bytes, TMA's 128-byte swizzle: the layout [`super::stage`] writes and the products
//! read). Each slot has
//! two mbarriers: `full` (the producer's expected bytes, completed by the copies) and `empty`
//! (one arrival per consumer warp once its products have read the slot). The consumer
//! warpgroups meet no block-wide barrier in the column loop: each waits for the tiles it reads
//! and releases them as soon as its products are done with them, so neither waits for the
//! other, and the copies run up to [`SLOTS`] blocks ahead of both. The producer gives its
//! registers to the consumers (`setmaxnreg`): a ninth warp alone would cost them as many (the
//! register file is split among the four schedulers, whose warps share it: 3 warps on one of
//! them caps a thread at 168 registers, which the query pass exceeds).
//!
//! The launch passes three tensor maps ([`MAP_ARGS`]): Q's, K's and V's, each the 2-D BF16
//! tensor [B·S rows, H·D columns] (the packed [B, S, H, D] as it lies), boxes of 64 × 64.

use super::{Block, Heads, Lines, REGION, TILE_ROWS, WARPGROUPS};
use crate::mlir::ptx;

/// A tensor map's box: 64 columns (128 bytes of BF16) × 64 rows.
pub const MAP_BOX: [u32; 2] = [64, TILE_ROWS];

/// Slots of each tensor's ring.
pub const SLOTS: u64 = 3;

/// The tensor maps a streaming kernel (the forward, the query pass) takes after its other
/// arguments.
pub const MAP_ARGS: &str = "%q_map: !llvm.ptr<1>, %k_map: !llvm.ptr<1>, %v_map: !llvm.ptr<1>";

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

/// The ring of the column blocks' K (tensor 0) and V (tensor 1) tiles, each trailing the walk
/// by its lag (`lags`, as [`super::Columns`]' do: the forward's V by a block), and the
/// mbarriers after them.
pub(super) struct Ring {
    heads: Heads,
    lags: [u64; 2],
    /// Each tensor's first slot (shared byte, i64).
    slots: [String; 2],
    /// The mbarriers' first (shared byte, i64): each tensor's `full` then `empty` per slot,
    /// then Q's `full`.
    barriers: String,
}

impl Ring {
    /// Shared bytes the ring takes at `heads`: the slots and their mbarriers.
    pub fn bytes(heads: Heads) -> u64 {
        SLOTS * (Heads::tile_bytes(heads.qk) + Heads::tile_bytes(heads.v)) + (4 * SLOTS + 1) * 8
    }

    /// The ring from shared byte `at` (1,024-byte aligned) for the walk over column blocks
    /// `walk` (i64) of row block `row_block`, the warpgroups' Q tiles at `q_tiles` (shared
    /// byte, i64), `q_stride` bytes apart: its mbarriers initialised, then the roles part. The
    /// producer's code ([`Ring::produce`]) is written here; the consumers' follows, in the
    /// `else` branch the caller closes (`}`) after it.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        g: &mut Lines,
        b: &Block,
        heads: Heads,
        lags: [u64; 2],
        at: &str,
        row_block: &str,
        (q_tiles, q_stride): (&str, u64),
        walk: [&str; 2],
    ) -> Ring {
        let ring = Ring::new(g, b, heads, lags, at);
        g.stmt("gpu.barrier");
        let threads = g.i64(u64::from(CONSUMER_WARPS) * 32);
        let produces = g.line(format!("llvm.icmp \"uge\" {}, {threads} : i64", b.tid));
        g.stmt(format!("scf.if {produces} {{"));
        g.asm(&format!("setmaxnreg.dec.sync.aligned.u32 {PRODUCER_REGISTERS};"), &[]);
        ring.produce(g, b, row_block, (q_tiles, q_stride), walk);
        g.stmt("} else {");
        g.asm(&format!("setmaxnreg.inc.sync.aligned.u32 {CONSUMER_REGISTERS};"), &[]);
        ring
    }

    /// The ring from shared byte `at`, its mbarriers initialised by the block's first thread;
    /// the caller's block-wide barrier follows, before any role reads them.
    fn new(g: &mut Lines, b: &Block, heads: Heads, lags: [u64; 2], at: &str) -> Ring {
        let k_bytes = SLOTS * Heads::tile_bytes(heads.qk);
        let v_at = g.op_c("add", at, k_bytes);
        let barriers = g.op_c("add", &v_at, SLOTS * Heads::tile_bytes(heads.v));
        let ring = Ring { heads, lags, slots: [at.to_string(), v_at], barriers };
        let zero = g.i64(0);
        let first = g.line(format!("llvm.icmp \"eq\" {}, {zero} : i64", b.tid));
        g.stmt(format!("scf.if {first} {{"));
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
        [self.heads.qk, self.heads.v][t]
    }

    /// Column block `block`'s (i64) slot and the parity of its round through the ring.
    fn slot(g: &mut Lines, block: &str) -> (String, String) {
        let slot = g.op_c("urem", block, SLOTS);
        let round = g.op_c("udiv", block, SLOTS);
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

    /// Q's `full` mbarrier, a 32-bit shared address.
    fn q_full(&self, g: &mut Lines) -> String {
        let at = g.op_c("add", &self.barriers, 8 * 4 * SLOTS);
        g.line(format!("llvm.trunc {at} : i64 to i32"))
    }

    /// Tensor `t`'s tile in `slot` (shared byte, i64).
    fn tile_at(&self, g: &mut Lines, t: usize, slot: &str) -> String {
        let offset = g.op_c("mul", slot, Heads::tile_bytes(self.width(t)));
        g.op("add", &self.slots[t], &offset)
    }

    /// The producer (the producer warpgroup's first thread): the consumer warpgroups' Q tiles
    /// of row block `row_block` at `q_tiles` (shared byte, i64), `q_stride` bytes apart, then
    /// K's and V's tiles of column blocks `first..upper` (i64), each into its slot once the
    /// consumers have released the slot's last round.
    fn produce(&self, g: &mut Lines, b: &Block, row_block: &str, (q_tiles, q_stride): (&str, u64), walk: [&str; 2]) {
        let [first, upper] = walk;
        let producer = g.i64(u64::from(CONSUMER_WARPS) * 32);
        let is_producer = g.line(format!("llvm.icmp \"eq\" {}, {producer} : i64", b.tid));
        g.stmt(format!("scf.if {is_producer} {{"));
        let q_full = self.q_full(g);
        let q_row = g.op_c("mul", row_block, u64::from(TILE_ROWS * WARPGROUPS));
        let q_bytes = u64::from(WARPGROUPS) * Heads::tile_bytes(self.heads.qk);
        let q_tiles = (q_tiles, WARPGROUPS.into(), q_stride);
        self.copy(g, b, "%q_map", self.heads.qk, &q_row, q_tiles, &q_full, q_bytes);
        let one = g.i64(1);
        let j = g.open_for(first, upper, &one, &[]).index;
        let (slot, parity) = Self::slot(g, &j);
        let released = g.op_c("xor", &parity, 1);
        let row = g.op_c("mul", &j, TILE_ROWS.into());
        for (t, map) in ["%k_map", "%v_map"].into_iter().enumerate() {
            let empty = self.barrier(g, t, 1, &slot);
            ptx::mbarrier_wait(g, &empty, &released);
            let full = self.barrier(g, t, 0, &slot);
            let to = self.tile_at(g, t, &slot);
            let width = self.width(t);
            let bytes = Heads::tile_bytes(width);
            self.copy(g, b, map, width, &row, (&to, 1, bytes), &full, bytes);
        }
        g.stmt("}");
        g.stmt("}");
    }

    /// Expects `bytes` on mbarrier `full`, then copies `tiles` 64-row tiles of tensor `map`
    /// (`width` wide) from the head's row `row` (i64, within its sequence) into shared byte
    /// `to` on, `stride` bytes apart, one box per 64 columns.
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
        bytes: u64,
    ) {
        let bytes = u32::try_from(bytes).expect("a stage's bytes fit a u32");
        ptx::mbarrier_expect_bytes(g, full, bytes);
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

    /// Waits for the warpgroups' Q tiles.
    pub fn await_q(&self, g: &mut Lines) {
        let q_full = self.q_full(g);
        let zero = g.i64(0);
        ptx::mbarrier_wait(g, &q_full, &zero);
    }

    /// Waits for tensor `t`'s tile of column block `block` (i64); where it lies.
    fn acquire(&self, g: &mut Lines, t: usize, block: &str) -> String {
        let (slot, parity) = Self::slot(g, block);
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
            let lag = self.lags[t];
            let block = g.op_c("sub", j, lag);
            if lag == 0 {
                return self.acquire(g, t, &block);
            }
            let earliest = g.op_c("add", first, lag);
            let exists = g.line(format!("llvm.icmp \"uge\" {j}, {earliest} : i64"));
            let (slot, parity) = Self::slot(g, &block);
            g.stmt(format!("scf.if {exists} {{"));
            self.await_full(g, t, &slot, &parity);
            g.stmt("}");
            self.tile_at(g, t, &slot)
        })
    }

    /// After the walk up to block `upper` (i64, exclusive): the trailing tensor's tile of the
    /// last block, awaited.
    pub fn drain(&self, g: &mut Lines, upper: &str) -> String {
        let block = g.op_c("sub", upper, self.lags[1]);
        self.acquire(g, 1, &block)
    }

    /// After the products that read tensor `t`'s tile of the walk's block `j` (a trailing
    /// tensor's of j − lag) are done: the warp's release of its slot (its first lane's).
    pub fn release(&self, g: &mut Lines, b: &Block, t: usize, j: &str) {
        let block = g.op_c("sub", j, self.lags[t]);
        let (slot, _) = Self::slot(g, &block);
        let empty = self.barrier(g, t, 1, &slot);
        let lane = g.op_c("urem", &b.tid, 32);
        let zero = g.i64(0);
        let leads = g.line(format!("llvm.icmp \"eq\" {lane}, {zero} : i64"));
        g.stmt(format!("scf.if {leads} {{"));
        ptx::mbarrier_arrive(g, &empty);
        g.stmt("}");
    }
}
