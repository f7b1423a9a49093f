//! FP8 GEMMs generated for Hopper's warpgroup tensor cores (`wgmma`, sm_90a), with
//! DeepSeek-V3's fine-grained scaling: C = A·Bᵀ for A [M, K] (E4M3, 1×128 tiles along K, f32
//! scales stored M-contiguous: `sa[k/128 · M + m]`) and B [N, K] (E4M3, 128×128 blocks, scales
//! `sb[n/128 · R + k/128]`, R = K/128 rounded up to 4), C [M, N] in f32, row-major: the
//! layouts of the plan's quantised operands (`fuse::library`, as cuBLASLt reads them).
//!
//! A block of C ([`Tile`]) is warp-specialised: one producer warpgroup, whose first thread
//! streams both operands' tiles, one 128-wide block of K at a time, into a ring of
//! shared-memory stages with TMA (`cp.async.bulk.tensor`, through the tensor maps the launch
//! passes: [`TensorMap`]; 128-byte swizzle), and one consumer warpgroup per 64 rows of C.
//! Each stage has two mbarriers: `full` (the producer's expected bytes, completed by the
//! copies) and `empty` (one arrival per consumer warp once its products have read the stage).
//! With two consumers the producer gives its registers to them (`setmaxnreg`). Per block of K,
//! a consumer sums four `wgmma.m64nNk32` products into fresh tensor-core accumulators, which
//! are then promoted into the f32 accumulators times the block's two scales: DeepSeek's
//! promotion every 128 elements of K. Tiles up to 128 wide (but the Wgrad's) issue a block's
//! products before they wait for the block before's and promote them, so that the promotion
//! runs beside the tensor cores (`Tile::overlaps`); wider ones wait for each block's products
//! before issuing the next. The producer copies each block's scales into its stage with the
//! operands' tiles (`cp.async.bulk` on the same `full` mbarrier: A's rows', and B's block's or,
//! the Wgrad's, whose B has a scale per column, its columns'), and the consumers read them from
//! shared memory while the block's products run; the grouped form's consumers load theirs
//! from global memory one block ahead (see `Tile::scale_bytes`).
//!
//! The schedule is persistent: a block takes tile `blockIdx.x`, then every `gridDim.x`-th
//! after it, its ring running on from tile to tile (the producer loads the next tile's blocks
//! of K while the consumers store the last), the tiles ordered in bands of 8 rows of tiles,
//! down the rows first, so that the blocks at work at once share A and B tiles in L2. In
//! clusters of two ([`Tile::cluster`]) a pair of blocks takes neighbouring tiles along N and
//! shares A: each producer loads half of A's rows and multicasts it to both blocks, and every
//! consumer warp releases the stage in both (their `empty` barriers count the pair's warps).
//! The grouped form may sum a second product over its own K into C (`Form::Grouped`); and a
//! launch may ask any form to add its products to what C holds (`accumulate`: a gradient
//! summed over micro-batches where it lies) instead of storing over it. The dense and Wgrad
//! forms' C leaves through shared memory ([`Stores`]): a consumer writes 32 columns of its rows
//! into a buffer swizzled as C's tensor map's box, and one TMA copy stores them (or adds them
//! to C's values, `cp.reduce.async.bulk`, where the launch accumulates: no load of C) while it
//! fills its other buffer and goes on to its next tile (ncu, session 34: the store-bound shapes' memory pipes
//! were 86–90% busy with the consumers' own 8-byte stores, DRAM at 60–64%). The grouped form
//! stores from registers: an expert's last tile may end inside a box's rows, where the next
//! expert's rows lie. The `wgmma`, TMA and mbarrier instructions are inline PTX (MLIR 22's
//! NVVM ops for them need the struct plumbing this gives directly).
//! M must be a multiple of the tile's m (Dense and Wgrad), K of 128; N any even number (Wgrad:
//! a multiple of n times the cluster's blocks; Dense: a multiple of 4, C's rows 16-byte
//! aligned for its tensor map).

use super::ptx::{Lines, Loop};

/// Rows of C per block: one warpgroup's `wgmma` M.
pub const TILE_M: u32 = 64;
/// The most experts a grouped or Wgrad kernel takes (its table of their first tiles is in
/// shared memory).
pub const MAX_EXPERTS: u32 = 256;
/// K per scale block, and per shared-memory stage: one 128-byte (swizzled) row of each
/// operand's tile.
pub const TILE_K: u32 = 128;
/// Bytes between 8-row groups of a swizzled tile (the descriptors' stride offset).
const ROW_GROUP: u64 = 8 * TILE_K as u64;
/// Columns of C (f32) per TMA store of the dense and Wgrad forms: one 128-byte swizzled row
/// of its box, [`TILE_M`] rows (C's tensor map: see [`fp8_gemm`]).
pub const STORE_COLUMNS: u32 = 32;
const STORE_BYTES: u32 = TILE_M * STORE_COLUMNS * 4;
/// Registers a thread keeps when the producer warpgroup gives its own to two consumers. They
/// must fit what the block was given at launch: 384 threads at most 168 registers each (the
/// 65,536 of a multiprocessor over 384, in steps of 8), 64,512, not the whole file, or
/// `setmaxnreg.inc` waits for registers that never come.
const PRODUCER_REGISTERS: u32 = 56;
const CONSUMER_REGISTERS: u32 = 224;
const _: () = assert!(PRODUCER_REGISTERS * 128 + CONSUMER_REGISTERS * 256 <= (65_536 / 384) / 8 * 8 * 384);

/// A block's shape: `m` rows of C (64 per consumer warpgroup: 64 or 128), `n` columns (a
/// divisor of 128, or 192: a block's columns lie in at most two 128-column weight-scale blocks;
/// 192 is the widest whose accumulators fit a consumer's registers twice), and the
/// shared-memory `stages` (2 to 8) of 128 × (`m` + `n`) bytes each (and their scales:
/// `Tile::scale_bytes`), 227 KB at most with the mbarriers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub m: u32,
    pub n: u32,
    pub stages: u32,
    /// Blocks per cluster, 1 or 2: a pair of blocks on neighbouring tiles along N shares its
    /// A tiles, each loading half of one and multicasting it to both (half the A traffic).
    pub cluster: u32,
}

impl Tile {
    /// Why the tile cannot be generated in `form`, if it cannot.
    pub fn check(self, form: Form) -> Result<Self, String> {
        let Tile { m, n, stages, cluster } = self;
        let fits = matches!(m, 64 | 128)
            && matches!(cluster, 1 | 2)
            && matches!(n, 16 | 32 | 64 | 128 | 192)
            // The stores through shared memory (the dense and Wgrad forms') alternate between two
            // buffers, an even number a tile.
            && (form == Form::Grouped || n.is_multiple_of(64))
            && (2..=8).contains(&stages)
            && self.shared_bytes(form) <= 227 << 10;
        if fits {
            Ok(self)
        } else {
            Err(format!(
                "tile {m}x{n} in {stages} stages, clusters of {cluster}: m is 64 or 128, n 16, 32, 64, 128 or 192 \
                 (its columns in at most two 128x128 weight-scale blocks; but for the grouped form a multiple of \
                 64), 2 to 8 stages of 128 x (m + n) bytes and their scales within 227 KB with, but \
                 for the grouped form, two 8 KB buffers of C per 64 rows, clusters of 1 or 2 blocks"
            ))
        }
    }

    /// The name of its kernel of `form`: `fp8_grouped_m128_n128_s4` (`fp8_gemm_…` for the dense
    /// form, `fp8_wgrad_…`), `_c2` after it in clusters of two.
    pub fn name(self, form: Form) -> String {
        let kind = match form {
            Form::Dense => "gemm",
            Form::Grouped => "grouped",
            Form::Wgrad => "wgrad",
        };
        let clusters = if self.cluster > 1 { format!("_c{}", self.cluster) } else { String::new() };
        format!("fp8_{kind}_m{}_n{}_s{}{clusters}", self.m, self.n, self.stages)
    }

    /// Bytes of one stage: a 128-wide block of K of both operands' tiles.
    fn stage_bytes(self) -> u32 {
        (self.m + self.n) * TILE_K
    }

    /// Bytes of one stage's scales in `form`, copied with the operands' tiles: A's rows' (f32,
    /// 1×128 tiles along K), then the Wgrad's B columns', or the dense form's 16-byte group of
    /// B's row of block scales that holds the block's, for each 128-column block the tile
    /// touches. The grouped form loads its own (an expert's first row, where A's scales of a
    /// block of K begin, need not be 16-byte aligned for a bulk copy).
    fn scale_bytes(self, form: Form) -> u32 {
        match form {
            Form::Wgrad => 4 * (self.m + self.n),
            Form::Dense => 4 * self.m + 16 * self.n.div_ceil(128),
            Form::Grouped => 0,
        }
    }

    /// Bytes of the buffers of C on its way out: two [`STORE_BYTES`] a consumer (one filled
    /// while the other's TMA store reads it). The grouped form stores from registers (see the
    /// module doc).
    fn store_bytes(self, form: Form) -> u32 {
        if form != Form::Grouped {
            self.consumers() * 2 * STORE_BYTES
        } else {
            0
        }
    }

    /// Dynamic shared memory of a block of `form` (the stages' tiles, then the buffers of C,
    /// then the stages' scales, then two 8-byte mbarriers per stage, then the experts' forms'
    /// table of their first tiles): the launch passes it (and raises the kernel's limit).
    pub fn shared_bytes(self, form: Form) -> u32 {
        self.stages * (self.stage_bytes() + self.scale_bytes(form) + 16)
            + self.store_bytes(form)
            + 4 * (MAX_EXPERTS + 1)
    }

    /// Consumer warpgroups: one per 64 rows.
    fn consumers(self) -> u32 {
        self.m / TILE_M
    }

    /// Whether a consumer of `form` issues a block of K's products before it waits for the
    /// block before's and promotes them, so that the promotion runs beside the tensor cores:
    /// two blocks' products in flight beside the accumulators, 3 × n/2 registers a thread,
    /// which fits the consumers' registers up to n = 128; not beside the Wgrad's scales, one a
    /// column (ptxas: 968 bytes spilled at 128 × 128).
    fn overlaps(self, form: Form) -> bool {
        form != Form::Wgrad && self.n <= 128
    }

    /// Threads of a block: the producer warpgroup and the consumers.
    pub fn threads(self) -> u32 {
        (self.consumers() + 1) * 128
    }

    /// The boxes of the operands' tensor maps, (A, B): 128 bytes of K × the rows a block
    /// loads (of A, its share in a cluster).
    pub fn boxes(self) -> (TensorMap, TensorMap) {
        (TensorMap { rows: self.m / self.cluster }, TensorMap { rows: self.n })
    }
}

/// What a launch passes for an operand (row-major E4M3 bytes, [rows, K]) in place of its
/// pointer: the address of a 128-byte `CUtensorMap` in global memory (64-byte aligned) that
/// `cuTensorMapEncodeTiled` wrote for the operand as a 2-D u8 tensor (K innermost, rows
/// outer; for the grouped B, all experts' rows), with a box of 128 × `rows`, 128-byte
/// swizzle and zeros out of bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorMap {
    pub rows: u32,
}

/// The tiles a plan carries for its experts' FP8 products (`Form::Grouped`) and weight
/// gradients (`Form::Wgrad`), and for its dense FP8 Fprop and Dgrad products (`Form::Dense`),
/// `kernels/NAME.ptx` each ([`Tile::name`]); `dsc tune` measures them on the plan's shapes
/// and records the fastest per GEMM. An untuned plan runs the experts' first tile, 128×128 in 4
/// stages, and the dense products on cuBLASLt (no one tile beats it on all of issue 9's shapes:
/// benches/README.md).
/// The grouped products' second pair of operands makes 128×192 spill registers (ptxas: 120
/// bytes, 440 with the sum's loads batched), though 128×192 is faster for one product; the
/// Wgrad's N, the operands' widths, must be a multiple of the tile's (so no 192), and its M of
/// the tile's m.
pub fn candidates(form: Form) -> &'static [Tile] {
    const fn tile(m: u32, n: u32, stages: u32) -> Tile {
        Tile { m, n, stages, cluster: 1 }
    }
    /// A pair of blocks sharing A (session 34: 128×192 in pairs the fastest dense tile on three
    /// of issue 9's six shapes, the grouped within 10% of 128×128 alone).
    const PAIR: Tile = Tile { m: 128, n: 192, stages: 4, cluster: 2 };
    const GROUPED: [Tile; 5] = [tile(128, 128, 4), tile(128, 192, 4), tile(128, 128, 6), tile(128, 64, 8), PAIR];
    // With its buffers of C, the Wgrad's 128-row tiles take a stage fewer than the experts'.
    const WGRAD: [Tile; 4] = [tile(128, 128, 4), tile(128, 128, 5), tile(128, 64, 7), tile(64, 128, 6)];
    const DENSE: [Tile; 4] = [tile(128, 192, 4), tile(128, 128, 4), tile(128, 64, 7), PAIR];
    match form {
        Form::Grouped => &GROUPED,
        Form::Wgrad => &WGRAD,
        Form::Dense => &DENSE,
    }
}

/// The MLIR module of kernel `name`: C = A·Bᵀ with fine-grained scales (see the module doc) in
/// blocks of `tile` (checked by [`Tile::check`]). Launch: any number of blocks along x (each
/// takes every so-many tile of [`Form`]'s; one per multiprocessor at most is best),
/// `tile.threads()` threads, `tile.shared_bytes()` of dynamic shared memory;
/// arguments A's and B's tensor maps ([`TensorMap`]), sa, sb, C (pointers; the scales 16-byte
/// aligned, copied in bulk), M, N, K and `accumulate` (u32: non-zero adds the products to C's
/// values instead of storing over them).
/// The dense and Wgrad forms take C (f32, row-major [M, N], the Wgrad's one per expert) as a
/// tensor map too, in place of its pointer: the address of a `CUtensorMap` of C as a 3-D f32
/// tensor (N innermost, then M, then the experts; one for the dense form), a box of
/// [`STORE_COLUMNS`] × [`TILE_M`] × 1, 128-byte swizzle (the consumers' [`Stores`]).
pub fn fp8_gemm(name: &str, tile: Tile, form: Form) -> String {
    let tile = tile.check(form).expect("a valid tile");
    let Tile { m: tile_m, n: tile_n, stages, cluster } = tile;
    let consumers = tile.consumers();
    let registers = (tile_n / 2) as usize;
    let a_bytes = u64::from(tile_m * TILE_K);
    let stage_bytes = u64::from(tile.stage_bytes());
    let scale_bytes = u64::from(tile.scale_bytes(form));
    // The Wgrad's scales come with its stages (see the consumers).
    let staged = scale_bytes > 0;
    let mut g = Lines::new();
    let tid = g.index_i64("gpu.thread_id x");
    let [m, n, k] = ["%m", "%n", "%k"].map(|x| g.line(format!("llvm.zext {x} : i32 to i64")));
    let zero32 = g.i32(0);
    let accumulating = g.line(format!("llvm.icmp \"ne\" %accumulate, {zero32} : i32"));
    let smem = g.line("llvm.mlir.addressof @tiles : !llvm.ptr<3>");
    let expert_tiles = g.line(format!(
        "llvm.getelementptr {smem}[{}] : (!llvm.ptr<3>) -> !llvm.ptr<3>, i8",
        tile.shared_bytes(form) - 4 * (MAX_EXPERTS + 1)
    ));
    let dims = Dims { m: m.clone(), n: n.clone(), k: k.clone(), expert_tiles: expert_tiles.clone() };
    let last_row = g.op_c("sub", &m, 1);
    let smem_at = g.line(format!("llvm.ptrtoint {smem} : !llvm.ptr<3> to i64"));
    // Block kb's stage and the parity of that stage's round (kb / stages, mod 2).
    let stage_of = |g: &mut Lines, kb: &str| {
        let stage = g.op_c("urem", kb, stages.into());
        let round = g.op_c("udiv", kb, stages.into());
        let parity = g.op_c("and", &round, 1);
        (stage, parity)
    };
    let stage_at = |g: &mut Lines, stage: &str| {
        let at = g.op_c("mul", stage, stage_bytes);
        g.op("add", &smem_at, &at)
    };
    // The stage's scales (Wgrad): A's rows', then B's columns'.
    // The buffers of C, after the stages (1,024-byte aligned: their swizzle follows the
    // address bits as the stages' does).
    let stores_base = g.op_c("add", &smem_at, u64::from(stages) * stage_bytes);
    let scales_base = g.op_c("add", &stores_base, tile.store_bytes(form).into());
    let scales_at = |g: &mut Lines, stage: &str| {
        let at = g.op_c("mul", stage, scale_bytes);
        g.op("add", &scales_base, &at)
    };
    // The stage's `full` (which 0) or `empty` (which 1) mbarrier, a 32-bit shared address.
    let barriers = g.op_c("add", &scales_base, u64::from(stages) * scale_bytes);
    let barrier = |g: &mut Lines, which: u64, stage: &str| {
        let at = g.op_c("mul", stage, 8);
        let at = g.op_c("add", &at, which * 8 * u64::from(stages));
        let at = g.op("add", &barriers, &at);
        g.line(format!("llvm.trunc {at} : i64 to i32"))
    };
    let zero64 = g.i64(0);
    let is_first = g.line(format!("llvm.icmp \"eq\" {tid}, {zero64} : i64"));
    g.stmt(format!("scf.if {is_first} {{"));
    for stage in 0..stages {
        let stage = g.i64(stage.into());
        // `empty` takes a release from every consumer warp of the cluster: the pair's
        // producers both write every stage (A's halves).
        for (which, count) in [(0, 1), (1, 4 * consumers * cluster)] {
            let at = barrier(&mut g, which, &stage);
            super::ptx::mbarrier_init(&mut g, &at, count);
        }
    }
    g.asm("fence.mbarrier_init.release.cluster;", &[]);
    match form {
        Form::Grouped => write_expert_tiles(&mut g, &expert_tiles, tile_m),
        Form::Wgrad => write_expert_tiles(&mut g, &expert_tiles, TILE_K),
        Form::Dense => {}
    }
    g.stmt("}");
    // Every block's mbarriers ready before any copy or release reaches them.
    let cluster_barrier = |g: &mut Lines| {
        if cluster > 1 {
            g.asm(r"barrier.cluster.arrive.release.aligned;\0Abarrier.cluster.wait.acquire.aligned;", &[]);
        } else {
            g.stmt("gpu.barrier");
        }
    };
    cluster_barrier(&mut g);
    // This block's place in its cluster.
    let rank = if cluster > 1 {
        let rank = g.asm_i32("mov.u32 $0, %cluster_ctarank;", &[]);
        g.line(format!("llvm.zext {rank} : i32 to i64"))
    } else {
        zero64.clone()
    };
    let group = g.op_c("udiv", &tid, 128);
    let in_group = g.op_c("urem", &tid, 128);
    let producers = g.i64(consumers.into());
    let is_producer = g.line(format!("llvm.icmp \"eq\" {group}, {producers} : i64"));
    g.stmt(format!("scf.if {is_producer} {{"));
    if consumers > 1 {
        g.asm(&format!("setmaxnreg.dec.sync.aligned.u32 {PRODUCER_REGISTERS};"), &[]);
    }
    let leader = g.line(format!("llvm.icmp \"eq\" {in_group}, {zero64} : i64"));
    g.stmt(format!("scf.if {leader} {{"));
    each_tile(&mut g, tile, form, &dims, &rank, |g, at, done| {
        let Setup { n0, m0, b_row, segments, .. } = at;
        let mut passed = done.to_string();
        for segment in &segments {
            let (zero, one) = (g.i64(0), g.i64(1));
            let kb = g.open_for(&zero, &segment.k_blocks, &one, &[]).index;
            let position = g.op("add", &passed, &kb);
            let (stage, parity) = stage_of(g, &position);
            // The stage's previous round released (a fresh barrier passes the wait for parity 1).
            let released = g.op_c("xor", &parity, 1);
            let empty = barrier(g, 1, &stage);
            super::ptx::mbarrier_wait(g, &empty, &released);
            let full = barrier(g, 0, &stage);
            super::ptx::mbarrier_expect_bytes(g, &full, tile.stage_bytes() + tile.scale_bytes(form));
            let k_at = g.op_c("mul", &kb, TILE_K.into());
            let k_at = g.op("add", &segment.k_from, &k_at);
            let stage_first = stage_at(g, &stage);
            // A: this block's share of the rows (all of them, or its half, sent to both blocks).
            let share = u64::from(tile_m / cluster);
            let share_at = g.op_c("mul", &rank, share);
            let a_row = g.op("add", &m0, &share_at);
            let a_share_at = g.op_c("mul", &share_at, TILE_K.into());
            let a_to = g.op("add", &stage_first, &a_share_at);
            let b_to = g.op_c("add", &stage_first, a_bytes);
            for (map, to, row, shared) in [(&segment.ta, a_to, &a_row, cluster > 1), (&segment.tb, b_to, &b_row, false)]
            {
                super::ptx::tma_load(g, &to, map, [&k_at, row], &full, shared);
            }
            // The stage's scales of this block of K (see `Tile::scale_bytes`): A's [K/128, M],
            // the tile's rows contiguous (16-byte aligned: M is a multiple of the tile's m), then
            // the Wgrad's B columns' ([K/128, N], likewise) or the dense form's groups of 4 block
            // scales (B's rows of them padded to 16 bytes).
            if staged {
                let kb_abs = g.op_c("udiv", &k_at, TILE_K.into());
                let scales_first = scales_at(g, &stage);
                let a_block = g.op("mul", &kb_abs, &m);
                let mut copies =
                    vec![(segment.sa.clone(), g.op("add", &a_block, &m0), scales_first.clone(), 4 * tile_m)];
                let b_first = g.op_c("add", &scales_first, u64::from(4 * tile_m));
                if form == Form::Wgrad {
                    let b_block = g.op("mul", &kb_abs, &n);
                    copies.push((segment.sb.clone(), g.op("add", &b_block, &b_row), b_first, 4 * tile_n));
                } else {
                    let row_blocks = padded_row(g, &segment.k_blocks);
                    let group = g.op_c("udiv", &kb_abs, 4);
                    let group = g.op_c("mul", &group, 4);
                    for (i, n_block) in scale_blocks(g, &n, &n0, tile_n).iter().enumerate() {
                        let row = g.op("mul", n_block, &row_blocks);
                        let to = g.op_c("add", &b_first, 16 * i as u64);
                        copies.push((segment.sb.clone(), g.op("add", &row, &group), to, 16));
                    }
                }
                for (scales, at, to, bytes) in copies {
                    let from =
                        g.line(format!("llvm.getelementptr {scales}[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
                    let from = g.line(format!("llvm.ptrtoint {from} : !llvm.ptr<1> to i64"));
                    let to = g.line(format!("llvm.trunc {to} : i64 to i32"));
                    let size = g.i32(bytes);
                    g.asm(
                        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1], $2, [$3];",
                        &[(to, "r", "i32"), (from, "l", "i64"), (size, "r", "i32"), (full.clone(), "r", "i32")],
                    );
                }
            }
            g.stmt("}");
            passed = g.op("add", &passed, &segment.k_blocks);
        }
        g.op("sub", &passed, done)
    });
    g.stmt("}");
    g.stmt("} else {");
    if consumers > 1 {
        g.asm(&format!("setmaxnreg.inc.sync.aligned.u32 {CONSUMER_REGISTERS};"), &[]);
    }
    // This thread's rows of the accumulators: consumer v holds rows 64v..64v+63, its warp w
    // rows 16w..16w+15 of those, lane l rows l/4 and l/4 + 8 of those, columns
    // 8j + 2(l mod 4) + {0, 1}.
    let group_rows = g.op_c("mul", &group, TILE_M.into());
    let warp = g.op_c("udiv", &in_group, 32);
    let lane = g.op_c("urem", &tid, 32);
    let warp_rows = g.op_c("mul", &warp, 16);
    let lane_row = g.op_c("udiv", &lane, 4);
    let row0 = g.op("add", &warp_rows, &lane_row);
    let row0 = g.op("add", &row0, &group_rows);
    let row1 = g.op_c("add", &row0, 8);
    let lane_col = g.op_c("urem", &lane, 4);
    let col = g.op_c("mul", &lane_col, 2);
    let lane_leads = g.line(format!("llvm.icmp \"eq\" {lane}, {zero64} : i64"));
    let stores = (form != Form::Grouped).then(|| Stores {
        base: stores_base.clone(),
        group: group.clone(),
        in_group: in_group.clone(),
        warp: warp.clone(),
        lane: lane.clone(),
    });
    // The consumer's A rows: 64 rows of 128 bytes in.
    let group_a_at = g.op_c("mul", &group, u64::from(TILE_M * TILE_K));
    // Descriptors: 128-byte swizzle (bits 62–63), stride offset 1,024 bytes between 8-row
    // groups, leading offset unused (1).
    let layout = super::ptx::swizzled_layout(&mut g, 16, ROW_GROUP);
    let zero = g.line("llvm.mlir.constant(0.0 : f32) : f32");
    each_tile(&mut g, tile, form, &dims, &rank, |g, at, done| {
        let Setup { n0, m0, valid, segments, layer, .. } = at;
        let mut passed = done.to_string();
        for (later, segment) in segments.iter().enumerate().map(|(s, segment)| (s > 0, segment)) {
            let Segment { sa, sb, k_from, k_blocks, .. } = segment;
            // A later segment adds its products to the earlier's in C, where it has blocks of K.
            if later {
                let none = g.i64(0);
                let any = g.line(format!("llvm.icmp \"ugt\" {k_blocks}, {none} : i64"));
                g.stmt(format!("scf.if {any} {{"));
            }
            let first_kb = g.op_c("udiv", k_from, TILE_K.into());
            // The scales of block `kb` of K as loaded (Grouped): the thread's two rows'
            // (A's), then B's blocks' (the tile's first 128-column block, and its second where
            // the tile is wider).
            let load_scales = |g: &mut Lines, kb: &str| -> Vec<String> {
                let scale = |g: &mut Lines, ptr: &str, at: &str| {
                    let p =
                        g.line(format!("llvm.getelementptr {ptr}[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
                    g.line(format!("llvm.load {p} : !llvm.ptr<1> -> f32"))
                };
                let kb_at = g.op("add", &first_kb, kb);
                let sa_block = g.op("mul", &kb_at, &m);
                let mut loaded: Vec<String> = [&row0, &row1]
                    .map(|r| {
                        let row = g.op("add", &m0, r);
                        let row = clamp(g, &row, &last_row);
                        let at = g.op("add", &sa_block, &row);
                        scale(g, sa, &at)
                    })
                    .into();
                let row_blocks = padded_row(g, k_blocks);
                loaded.extend(scale_blocks(g, &n, &n0, tile_n).iter().map(|n_block| {
                    let sb_row = g.op("mul", n_block, &row_blocks);
                    let sb_at = g.op("add", &sb_row, kb);
                    scale(g, sb, &sb_at)
                }));
                loaded
            };
            // The scales of block `kb` in `stage` (Dense, Wgrad), read where its copies put them,
            // in the order loaded above: the thread's two rows', then the dense form's blocks'
            // (word kb mod 4 of each group) or the Wgrad's columns' (8j + 2(l mod 4) + {0, 1}),
            // in pairs.
            let staged_scales = |g: &mut Lines, stage: &str, kb: &str| -> Vec<String> {
                let at = scales_at(g, stage);
                let read = |g: &mut Lines, offset: &str, ty: &str| {
                    let offset = g.op_c("mul", offset, 4);
                    let p = g.op("add", &at, &offset);
                    let p = g.line(format!("llvm.inttoptr {p} : i64 to !llvm.ptr<3>"));
                    g.line(format!("llvm.load {p} : !llvm.ptr<3> -> {ty}"))
                };
                let mut loaded: Vec<String> = [&row0, &row1].map(|r| read(g, r, "f32")).into();
                if form == Form::Wgrad {
                    for j in 0..registers / 4 {
                        let column = g.op_c("add", &col, u64::from(tile_m) + j as u64 * 8);
                        let pair = read(g, &column, "vector<2xf32>");
                        for half in 0..2 {
                            let half = g.i32(half);
                            loaded.push(g.line(format!("llvm.extractelement {pair}[{half} : i32] : vector<2xf32>")));
                        }
                    }
                } else {
                    let kb_at = g.op("add", &first_kb, kb);
                    let word = g.op_c("urem", &kb_at, 4);
                    for i in 0..tile_n.div_ceil(128) {
                        let offset = g.op_c("add", &word, u64::from(tile_m + 4 * i));
                        loaded.push(read(g, &offset, "f32"));
                    }
                }
                loaded
            };
            // Each accumulator's scale from the loaded ones: its row's times its column's or
            // its block's (the second block's from the group of 8 columns that crosses into it).
            let accumulator_scales = |g: &mut Lines, loaded: &[String]| -> Vec<String> {
                let (rows, columns) = loaded.split_at(2);
                let column_of = |i: usize| if form == Form::Wgrad { (i / 4) * 2 + i % 2 } else { 0 };
                let mut products: Vec<String> = (0..registers)
                    .map(|i| g.line(format!("llvm.fmul {}, {} : f32", rows[(i / 2) % 2], columns[column_of(i)])))
                    .collect();
                if form != Form::Wgrad && tile_n > 128 {
                    let within = g.op_c("urem", &n0, 128);
                    let block_end = g.i64(128);
                    let second: Vec<String> =
                        rows.iter().map(|r| g.line(format!("llvm.fmul {r}, {} : f32", columns[1]))).collect();
                    for (i, product) in products.iter_mut().enumerate() {
                        let column = g.op_c("add", &within, (i as u64 / 4) * 8);
                        let crossed = g.line(format!("llvm.icmp \"uge\" {column}, {block_end} : i64"));
                        *product =
                            g.line(format!("llvm.select {crossed}, {}, {product} : i1, f32", second[(i / 2) % 2]));
                    }
                }
                products
            };
            // Block kb's scales as loaded (Grouped): A's two rows', then B's blocks'. The other
            // forms' come with the stage and are read where they are used.
            let load = |g: &mut Lines, kb: &str| if staged { Vec::new() } else { load_scales(g, kb) };
            // Block kb's products into fresh tensor-core accumulators, issued and committed as
            // one group once its stage is full.
            let issue = |g: &mut Lines, kb: &str| -> Vec<String> {
                let position = g.op("add", &passed, kb);
                let (stage, parity) = stage_of(g, &position);
                let full = barrier(g, 0, &stage);
                super::ptx::mbarrier_wait(g, &full, &parity);
                let stage_at = stage_at(g, &stage);
                let a_at = g.op("add", &stage_at, &group_a_at);
                let b_at = g.op_c("add", &stage_at, a_bytes);
                g.asm("wgmma.fence.sync.aligned;", &[]);
                let registers_ptx: Vec<String> = (0..registers).map(|i| format!("${i}")).collect();
                let mut partial = vec![zero.clone(); registers];
                let [a_tile, b_tile] = [&a_at, &b_at].map(|at| super::ptx::descriptor(g, &layout, at));
                for step in 0..TILE_K / 32 {
                    // 32 bytes of K per product, within the swizzled rows.
                    let offset = u64::from(step * 32);
                    let a = super::ptx::descriptor_past(g, &a_tile, offset);
                    let b = super::ptx::descriptor_past(g, &b_tile, offset);
                    let keep = g.i32(u32::from(step > 0));
                    let text = format!(
                        r"{{\0A.reg .pred p;\0Asetp.ne.b32 p, ${}, 0;\0Awgmma.mma_async.sync.aligned.m64n{tile_n}k32.f32.e4m3.e4m3 {{{}}}, ${}, ${}, p, 1, 1;\0A}}",
                        2 * registers + 2,
                        registers_ptx.join(", "),
                        2 * registers,
                        2 * registers + 1
                    );
                    partial = g.asm_f32s(&text, &partial, &[(a, "l", "i64"), (b, "l", "i64"), (keep, "r", "i32")]);
                }
                g.asm("wgmma.commit_group.sync.aligned;", &[]);
                partial
            };
            // Block kb's products (`partial`, issued) promoted into `sums` times its scales
            // (`loaded`, or the stage's) once at most `pending` later groups are still running;
            // its stage is released between. Returns the sums.
            let settle = |g: &mut Lines,
                          kb: &str,
                          partial: &[String],
                          loaded: &[String],
                          pending: u32,
                          sums: &[String]| {
                let position = g.op("add", &passed, kb);
                let (stage, _) = stage_of(g, &position);
                // Read while the products run, before the stage is released.
                let staged_loaded = staged.then(|| staged_scales(g, &stage, kb));
                let scales = accumulator_scales(g, staged_loaded.as_deref().unwrap_or(loaded));
                // The accumulators pass through the wait so that nothing reads them before it.
                let block = g.asm_f32s(&format!("wgmma.wait_group.sync.aligned {pending};"), partial, &[]);
                // The stage is read: each warp's first lane releases it.
                g.stmt(format!("scf.if {lane_leads} {{"));
                let empty = barrier(g, 1, &stage);
                if cluster > 1 {
                    // Each block's barrier, at the default release of the CTA's scope: a release
                    // at the cluster's (`.release.cluster`) is a fence waiting on every memory
                    // access the thread has in flight (the next block's scales), which measured
                    // (ncu, session 34) as the clusters' main stall, 2 to 3 times their time.
                    for block in 0..cluster {
                        let block = g.i32(block);
                        g.asm(
                            r"{\0A.reg .b32 at;\0Amapa.shared::cluster.u32 at, $0, $1;\0Ambarrier.arrive.shared::cluster.b64 _, [at];\0A}",
                            &[(empty.clone(), "r", "i32"), (block, "r", "i32")],
                        );
                    }
                } else {
                    super::ptx::mbarrier_arrive(g, &empty);
                }
                g.stmt("}");
                block
                    .iter()
                    .zip(sums)
                    .enumerate()
                    .map(|(i, (x, sum))| {
                        g.line(format!("llvm.intr.fma({x}, {}, {sum}) : (f32, f32, f32) -> f32", scales[i]))
                    })
                    .collect::<Vec<String>>()
            };
            let zeros = vec![zero.clone(); registers];
            let f32s = |count: usize| vec!["f32"; count];
            let none = g.i64(0);
            let any = g.line(format!("llvm.icmp \"ugt\" {k_blocks}, {none} : i64"));
            let sums = g.if_else(
                &any,
                &f32s(registers),
                |g| {
                    let (first, one) = (g.i64(0), g.i64(1));
                    let loaded = load(g, &first);
                    if !tile.overlaps(form) {
                        // Each block's products waited for and promoted before the next block's
                        // are issued; its scales loaded the block before.
                        let carried: Vec<(String, &str)> =
                            zeros.iter().chain(&loaded).map(|v| (v.clone(), "f32")).collect();
                        let k_loop = g.open_for(&first, k_blocks, &one, &carried);
                        let (sums, loaded) = k_loop.carried.split_at(registers);
                        let kb = &k_loop.index;
                        let last_kb = g.op_c("sub", k_blocks, 1);
                        let next_kb = g.op_c("add", kb, 1);
                        let next_kb = clamp(g, &next_kb, &last_kb);
                        let next_loaded = load(g, &next_kb);
                        let partial = issue(g, kb);
                        let sums = settle(g, kb, &partial, loaded, 0, sums);
                        let yielded: Vec<String> = sums.into_iter().chain(next_loaded).collect();
                        g.stmt(format!("scf.yield {} : {}", yielded.join(", "), f32s(yielded.len()).join(", ")));
                        g.stmt("}");
                        return (0..registers).map(|i| format!("{}#{i}", k_loop.results)).collect();
                    }
                    let partial = issue(g, &first);
                    // The products of block kb are issued before those of block kb - 1 are waited
                    // for and promoted, so that the promotion runs beside the tensor cores' work.
                    // Unrolled twice: the two blocks' accumulators stay in their registers.
                    let pairs = g.op_c("sub", k_blocks, 1);
                    let pairs = g.op_c("udiv", &pairs, 2);
                    let carried: Vec<(String, &str)> =
                        zeros.iter().chain(&partial).chain(&loaded).map(|v| (v.clone(), "f32")).collect();
                    let pair_loop = g.open_for(&first, &pairs, &one, &carried);
                    let (sums, rest) = pair_loop.carried.split_at(registers);
                    let (partial, loaded) = rest.split_at(registers);
                    let (mut sums, mut partial, mut loaded) = (sums.to_vec(), partial.to_vec(), loaded.to_vec());
                    let twice = g.op_c("mul", &pair_loop.index, 2);
                    let mut kb = g.op_c("add", &twice, 1);
                    for _ in 0..2 {
                        let next_loaded = load(g, &kb);
                        let next = issue(g, &kb);
                        let before = g.op_c("sub", &kb, 1);
                        sums = settle(g, &before, &partial, &loaded, 1, &sums);
                        (partial, loaded) = (next, next_loaded);
                        kb = g.op_c("add", &kb, 1);
                    }
                    let yielded: Vec<String> = sums.iter().chain(&partial).chain(&loaded).cloned().collect();
                    g.stmt(format!("scf.yield {} : {}", yielded.join(", "), f32s(yielded.len()).join(", ")));
                    g.stmt("}");
                    let results: Vec<String> =
                        (0..yielded.len()).map(|i| format!("{}#{i}", pair_loop.results)).collect();
                    let (sums, rest) = results.split_at(registers);
                    let (partial, loaded) = rest.split_at(registers);
                    // An even count of blocks leaves its last after the pairs.
                    let last = g.op_c("sub", k_blocks, 1);
                    let odd = g.op_c("urem", k_blocks, 2);
                    let even = g.line(format!("llvm.icmp \"eq\" {odd}, {none} : i64"));
                    g.if_else(
                        &even,
                        &f32s(registers),
                        |g| {
                            let last_loaded = load(g, &last);
                            let last_partial = issue(g, &last);
                            let before = g.op_c("sub", &last, 1);
                            let sums = settle(g, &before, partial, loaded, 1, sums);
                            settle(g, &last, &last_partial, &last_loaded, 0, &sums)
                        },
                        |g| settle(g, &last, partial, loaded, 0, sums),
                    )
                },
                |_| zeros.clone(),
            );
            if let Some(stores) = &stores {
                stores.store(g, &sums, registers, [&n0, &m0, &layer], &accumulating);
            } else {
                let c = "%c";
                // Each of this thread's two rows, if the block has it (an expert's last block may not).
                let c_col = g.op("add", &n0, &col);
                for (half, row) in [&row0, &row1].into_iter().enumerate() {
                    let pairs = (0..registers).step_by(2).filter(|i| (i / 2) % 2 == half);
                    // A later segment's sums add to the earlier's, the row's loaded together before
                    // any is stored (one by one, each inside its row's and column's conditions,
                    // every load waited out memory's latency): from places clamped into the block's
                    // rows and C's columns, used only where stored.
                    // C's own sums come first where the launch accumulates into C (the values are
                    // the same loads, under a condition the whole block takes alike).
                    let load_earlier = |g: &mut Lines| {
                        let [last_row, last_column] = [g.op_c("sub", &valid, 1), g.op_c("sub", &n, 2)];
                        let row = clamp(g, row, &last_row);
                        let c_row = g.op("add", &m0, &row);
                        let row_at = g.op("mul", &c_row, &n);
                        let mut loaded = Vec::new();
                        for i in pairs.clone() {
                            let column = g.op_c("add", &c_col, (i as u64 / 4) * 8);
                            let column = clamp(g, &column, &last_column);
                            let at = g.op("add", &row_at, &column);
                            let p = g.line(format!(
                                "llvm.getelementptr {c}[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"
                            ));
                            loaded.push(g.line(format!(
                                "llvm.load {p} {{alignment = 8 : i64}} : !llvm.ptr<1> -> vector<2xf32>"
                            )));
                        }
                        loaded
                    };
                    let earlier = if later {
                        load_earlier(g)
                    } else {
                        let count = pairs.clone().count();
                        g.if_else(&accumulating, &vec!["vector<2xf32>"; count], load_earlier, |g| {
                            vec![g.line("llvm.mlir.zero : vector<2xf32>"); count]
                        })
                    };
                    let mut earlier = earlier.into_iter();
                    let here = g.line(format!("llvm.icmp \"ult\" {row}, {valid} : i64"));
                    g.stmt(format!("scf.if {here} {{"));
                    let c_row = g.op("add", &m0, row);
                    let row_at = g.op("mul", &c_row, &n);
                    for i in pairs {
                        let column = g.op_c("add", &c_col, (i as u64 / 4) * 8);
                        // A block past N's last column (N not a multiple of the tile's n) stores nothing there.
                        let inside = g.line(format!("llvm.icmp \"ult\" {column}, {n} : i64"));
                        g.stmt(format!("scf.if {inside} {{"));
                        let at = g.op("add", &row_at, &column);
                        let p =
                            g.line(format!("llvm.getelementptr {c}[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
                        let pair = g.line("llvm.mlir.poison : vector<2xf32>");
                        let [first, second] = [g.i32(0), g.i32(1)];
                        let pair =
                            g.line(format!("llvm.insertelement {}, {pair}[{first} : i32] : vector<2xf32>", sums[i]));
                        let mut pair = g.line(format!(
                            "llvm.insertelement {}, {pair}[{second} : i32] : vector<2xf32>",
                            sums[i + 1]
                        ));
                        let sum = g.line(format!(
                            "llvm.fadd {}, {pair} : vector<2xf32>",
                            earlier.next().expect("a load a pair")
                        ));
                        pair = match later {
                            true => sum,
                            false => g.line(format!("llvm.select {accumulating}, {sum}, {pair} : i1, vector<2xf32>")),
                        };
                        g.stmt(format!("llvm.store {pair}, {p} {{alignment = 8 : i64}} : vector<2xf32>, !llvm.ptr<1>"));
                        g.stmt("}");
                    }
                    g.stmt("}");
                }
            }
            if later {
                g.stmt("}");
            }
            passed = g.op("add", &passed, k_blocks);
        }
        g.op("sub", &passed, done)
    });
    if let Some(stores) = &stores {
        stores.finish(&mut g);
    }
    g.stmt("}");
    // No block leaves while its pair may still release its stages.
    if cluster > 1 {
        cluster_barrier(&mut g);
    }
    format!(
        "module attributes {{gpu.container_module}} {{\n  gpu.module @{name} [{target}] {{\n    \
         llvm.mlir.global external @tiles() {{addr_space = 3 : i32, alignment = 1024 : i64}} : !llvm.array<0 x i8>\n    \
         gpu.func @{name}(%ta: !llvm.ptr<1>, %tb: !llvm.ptr<1>, %sa: !llvm.ptr<1>, %sb: !llvm.ptr<1>, %c: !llvm.ptr<1>, \
         %m: i32, %n: i32, %k: i32, %accumulate: i32{grouped}) kernel attributes {{known_block_size = array<i32: {threads}, 1, 1>{clusters}}} {{\n{body}      \
         gpu.return\n    }}\n  }}\n}}\n",
        target = super::emit::TARGET,
        threads = tile.threads(),
        clusters = if cluster > 1 { format!(", nvvm.cluster_dim = array<i32: {cluster}, 1, 1>") } else { String::new() },
        grouped = match form {
            Form::Dense => "",
            Form::Grouped => {
                ", %offsets: !llvm.ptr<1>, %experts: i32, %ta2: !llvm.ptr<1>, %tb2: !llvm.ptr<1>, %sa2: !llvm.ptr<1>, \
                 %sb2: !llvm.ptr<1>, %k2: i32"
            }
            Form::Wgrad => ", %offsets: !llvm.ptr<1>, %experts: i32",
        },
        body = g.text()
    )
}

/// The dense and Wgrad forms' way out for C: a consumer's 64 rows of a tile,
/// [`STORE_COLUMNS`] columns at a time, written into one of its two shared buffers as C's
/// tensor map's box lies there (64 rows of 128 bytes, 128-byte swizzle: row r's 16-byte chunks
/// permuted by r mod 8), then stored by one TMA copy (or added to C's values, where the launch
/// accumulates), which reads the buffer while the consumer fills the other and goes on to its
/// next tile.
struct Stores {
    /// The block's buffers of C (i64, a shared address), two per consumer.
    base: String,
    /// The thread's consumer, place in it, warp in it and lane (i64): where it writes and
    /// whether it issues the consumer's copies are worked out where it stores, not kept live
    /// through the loop of K.
    group: String,
    in_group: String,
    warp: String,
    lane: String,
}

impl Stores {
    /// The thread's places in a buffer (i64 bytes): per row of its two (r and r + 8), the row's
    /// first byte and the thread's 8 bytes within a 16-byte chunk; and per 8 columns of the 32
    /// (j), its swizzled chunk's byte: column 8j + 2(l mod 4) lies in chunk 2j + (l mod 4)/2 of
    /// its row, XOR the row mod 8, which is l/4 for both rows.
    fn places(&self, g: &mut Lines) -> ([String; 2], [String; 4]) {
        let warp_rows = g.op_c("mul", &self.warp, 16);
        let quad = g.op_c("udiv", &self.lane, 4);
        let row = g.op("add", &warp_rows, &quad);
        let half_chunk = g.op_c("urem", &self.lane, 2);
        let half_chunk = g.op_c("mul", &half_chunk, 8);
        let rows = [0, 8].map(|plus| {
            let row = g.op_c("add", &row, plus);
            let at = g.op_c("mul", &row, 128);
            g.op("add", &at, &half_chunk)
        });
        let pair = g.op_c("urem", &self.lane, 4);
        let pair = g.op_c("udiv", &pair, 2);
        let chunks = [0, 1, 2, 3].map(|j| {
            let chunk = g.op_c("add", &pair, 2 * j);
            let chunk = g.op("xor", &chunk, &quad);
            g.op_c("mul", &chunk, 16)
        });
        (rows, chunks)
    }

    /// The tile's `sums` (the accumulators' `registers` values: register i holds row
    /// 8((i/2) mod 2) + the thread's first, column 8(i/4) + 2(l mod 4) + i mod 2) stored at
    /// the tile's column, row and layer of C (`[n0, m0, layer]`, i64) through C's tensor map,
    /// or added where `accumulating` (i1).
    fn store(&self, g: &mut Lines, sums: &[String], registers: usize, [n0, m0, layer]: [&str; 3], accumulating: &str) {
        let per_store = STORE_COLUMNS as usize / 2;
        let map = g.line("llvm.ptrtoint %c : !llvm.ptr<1> to i64");
        let layer = g.line(format!("llvm.trunc {layer} : i64 to i32"));
        let first_row = g.op_c("mul", &self.group, TILE_M.into());
        let row = g.op("add", m0, &first_row);
        let row = g.line(format!("llvm.trunc {row} : i64 to i32"));
        let buffers = g.op_c("mul", &self.group, u64::from(2 * STORE_BYTES));
        let buffers = g.op("add", &self.base, &buffers);
        let storer = self.storer(g);
        let barrier = g.op_c("add", &self.group, 1);
        let barrier = g.line(format!("llvm.trunc {barrier} : i64 to i32"));
        let (rows, chunks) = self.places(g);
        for store in 0..registers / per_store {
            let buffer = g.op_c("add", &buffers, (store as u64 % 2) * u64::from(STORE_BYTES));
            // The buffer's last store has read it (the other's may still be reading).
            g.stmt(format!("scf.if {storer} {{"));
            g.asm("cp.async.bulk.wait_group.read 1;", &[]);
            g.stmt("}");
            g.asm("bar.sync $0, 128;", &[(barrier.clone(), "r", "i32")]);
            for i in (store * per_store..(store + 1) * per_store).step_by(2) {
                let at = g.op("add", &buffer, &rows[(i / 2) % 2]);
                let at = g.op("add", &at, &chunks[(i / 4) % 4]);
                let at = g.line(format!("llvm.trunc {at} : i64 to i32"));
                g.asm(
                    "st.shared.v2.f32 [$0], {$1, $2};",
                    &[(at, "r", "i32"), (sums[i].clone(), "f", "f32"), (sums[i + 1].clone(), "f", "f32")],
                );
            }
            // The threads' writes seen by the copy (the async proxy), all of them written.
            g.asm("fence.proxy.async.shared::cta;", &[]);
            g.asm("bar.sync $0, 128;", &[(barrier.clone(), "r", "i32")]);
            g.stmt(format!("scf.if {storer} {{"));
            let column = g.op_c("add", n0, (store as u64) * u64::from(STORE_COLUMNS));
            let column = g.line(format!("llvm.trunc {column} : i64 to i32"));
            let from = g.line(format!("llvm.trunc {buffer} : i64 to i32"));
            let operands = [
                (map.clone(), "l", "i64"),
                (column, "r", "i32"),
                (row.clone(), "r", "i32"),
                (layer.clone(), "r", "i32"),
                (from, "r", "i32"),
            ];
            g.stmt(format!("scf.if {accumulating} {{"));
            g.asm(
                "cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [$0, {$1, $2, $3}], [$4];",
                &operands,
            );
            g.stmt("} else {");
            g.asm("cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [$0, {$1, $2, $3}], [$4];", &operands);
            g.stmt("}");
            g.asm("cp.async.bulk.commit_group;", &[]);
            g.stmt("}");
        }
    }

    /// Whether the thread issues its consumer's copies (i1): the consumer's first thread.
    fn storer(&self, g: &mut Lines) -> String {
        let zero = g.i64(0);
        g.line(format!("llvm.icmp \"eq\" {}, {zero} : i64", self.in_group))
    }

    /// The consumer's last stores done before the block ends (their buffers are its shared
    /// memory).
    fn finish(&self, g: &mut Lines) {
        let storer = self.storer(g);
        g.stmt(format!("scf.if {storer} {{"));
        g.asm("cp.async.bulk.wait_group 0;", &[]);
        g.stmt("}");
    }
}

/// What a kernel multiplies: one A by one B, or the experts' rows by their own weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// C = A·Bᵀ; tiles ⌈N / n⌉ × M / m.
    Dense,
    /// The MoE experts' grouped GEMM: A's rows sorted by expert, expert e's rows
    /// `offsets[e]..offsets[e + 1]` (i32, E + 1 of them, on the device), B [E, N, K] with
    /// scales [E, N/128, R]: C's rows of expert e = A's times `B[e]`ᵀ. Two more arguments, the
    /// offsets (pointer) and E (u32); tiles ⌈N / n⌉ × (⌈M / m⌉ + E): each tile's expert and rows
    /// are found from the offsets, tiles past the experts' last are empty. Then a second pair of
    /// operands and its K: A2's and B2's tensor maps, their scales (A2 [M, K2], B2 [E, N, K2],
    /// laid out as A and B) and K2 (u32): C = A·B[e]ᵀ + A2·B2[e]ᵀ, the second product summed on
    /// its own and added to the first in C (the sum an addition of the two products makes: the
    /// Dgrads of the experts' gate and up projections, which share their input); K2 = 0 for
    /// one product.
    Grouped,
    /// The experts' weight gradients (`quantize_by_expert` operands): `out[e]` [M, N] =
    /// A_e·B_eᵀ over expert e's tokens, A [M, L] and B [N, L] with expert e's tokens in the
    /// columns from the earlier experts' token counts, each rounded up to 128, summed (1×128
    /// tiles along tokens; scales [L/128, M] and [L/128, N]: B's scale is a column's, applied
    /// at the promotion, so N must be a multiple of n times the cluster's blocks: every column
    /// a block reads the scale of is there). K is L; the offsets and E as for `Grouped`; tiles
    /// N / n × M / m × E;
    /// an expert without tokens gets zeros.
    Wgrad,
}

/// Where a block's operands are: its first row of A and C (`m0`) and how many it has
/// (`valid`), its first row of B (in B's tensor maps), the segments of K it sums, and C's
/// layer (i64: the Wgrad's expert, in C's tensor map; 0).
struct Setup {
    n0: String,
    m0: String,
    valid: String,
    b_row: String,
    segments: Vec<Segment>,
    layer: String,
}

/// A pair of operands a block multiplies over K: their tensor maps and scales (pointers; B's at
/// the block's expert), the first byte of K (`k_from`, a multiple of 128) and the blocks of K
/// from there.
struct Segment {
    ta: String,
    tb: String,
    sa: String,
    sb: String,
    k_from: String,
    k_blocks: String,
}

impl Segment {
    /// The kernel's first pair of operands, B's scales at `sb`.
    fn first(sb: String, k_from: String, k_blocks: String) -> Segment {
        Segment { ta: "%ta".into(), tb: "%tb".into(), sa: "%sa".into(), sb, k_from, k_blocks }
    }
}

/// M, N and K (i64).
struct Dims {
    m: String,
    n: String,
    k: String,
    /// The experts' forms' table in shared memory (`!llvm.ptr<3>`): i32 entry e the tiles (the
    /// Wgrad's: blocks of K) of the experts before e, entry E all of them
    /// ([`write_expert_tiles`]).
    expert_tiles: String,
}

/// Rows of tiles a band of the schedule spans: a band's tiles go down its rows first, so that
/// the blocks at work at once share their B tiles as well as their A tiles in L2.
const BAND: u64 = 8;

/// Emits `body` for each tile of C this block computes: the persistent schedule, tiles
/// `blockIdx.x`, `+ gridDim.x`, … of all of them (any grid), each with its [`Setup`] and the
/// blocks of K the block's ring passed before it (i64); `body` returns the tile's blocks of K.
fn each_tile(
    g: &mut Lines,
    tile: Tile,
    form: Form,
    dims: &Dims,
    rank: &str,
    mut body: impl FnMut(&mut Lines, Setup, &str) -> String,
) {
    // In clusters of two, the pair takes neighbouring tiles along N (the pair's own tile
    // count rounded up: a last block past N loads what lies there and stores nothing).
    let along_n = g.op_c("add", &dims.n, u64::from(tile.n * tile.cluster - 1));
    let along_n = g.op_c("udiv", &along_n, u64::from(tile.n * tile.cluster));
    let along_m = match form {
        Form::Dense | Form::Wgrad => g.op_c("udiv", &dims.m, tile.m.into()),
        Form::Grouped => {
            let up = g.op_c("add", &dims.m, u64::from(tile.m - 1));
            let tiles = g.op_c("udiv", &up, tile.m.into());
            let experts = g.line("llvm.zext %experts : i32 to i64");
            g.op("add", &tiles, &experts)
        }
    };
    let per_expert = g.op("mul", &along_n, &along_m);
    let tiles = match form {
        Form::Wgrad => {
            let experts = g.line("llvm.zext %experts : i32 to i64");
            g.op("mul", &per_expert, &experts)
        }
        Form::Dense | Form::Grouped => per_expert.clone(),
    };
    let first = g.index_i64("gpu.block_id x");
    let first = g.op_c("udiv", &first, tile.cluster.into());
    let every = g.index_i64("gpu.grid_dim x");
    let every = g.op_c("udiv", &every, tile.cluster.into());
    let zero = g.i64(0);
    let Loop { index: t, carried, .. } = g.open_for(&first, &tiles, &every, &[(zero, "i64")]);
    let done = &carried[0];
    let (expert, within) = match form {
        Form::Wgrad => (Some(g.op("udiv", &t, &per_expert)), g.op("urem", &t, &per_expert)),
        Form::Dense | Form::Grouped => (None, t),
    };
    let band_tiles = g.op_c("mul", &along_n, BAND);
    let band = g.op("udiv", &within, &band_tiles);
    let in_band = g.op("urem", &within, &band_tiles);
    let band_first = g.op_c("mul", &band, BAND);
    let left = g.op("sub", &along_m, &band_first);
    let band_rows = g.i64(BAND);
    let band_rows = clamp(g, &left, &band_rows);
    let row_in_band = g.op("urem", &in_band, &band_rows);
    let by = g.op("add", &band_first, &row_in_band);
    let pair = g.op("udiv", &in_band, &band_rows);
    let pair_first = g.op_c("mul", &pair, tile.cluster.into());
    let bx = g.op("add", &pair_first, rank);
    let at = setup(g, tile, form, dims, &bx, &by, expert.as_deref());
    let k_blocks = body(g, at, done);
    let next = g.op("add", done, &k_blocks);
    g.stmt(format!("scf.yield {next} : i64"));
    g.stmt("}");
}

/// The operands of tile (`bx`, `by`) (and expert `expert` of a Wgrad).
fn setup(g: &mut Lines, tile: Tile, form: Form, dims: &Dims, bx: &str, by: &str, expert: Option<&str>) -> Setup {
    let Dims { n, k, expert_tiles, .. } = dims;
    let n0 = g.op_c("mul", bx, tile.n.into());
    let all_rows = g.i64(tile.m.into());
    let whole = g.op_c("udiv", k, TILE_K.into());
    let k_from = g.i64(0);
    match (form, expert) {
        (Form::Dense, _) => {
            let m0 = g.op_c("mul", by, tile.m.into());
            let b_row = n0.clone();
            let segments = vec![Segment::first("%sb".into(), k_from, whole)];
            Setup { n0, m0, valid: all_rows, b_row, segments, layer: g.i64(0) }
        }
        (Form::Grouped, _) => {
            let (expert, m0, valid, active) = expert_rows(g, expert_tiles, by, tile.m);
            // Past the experts' last tile: no block of K, no row.
            let none = g.i64(0);
            let valid = g.line(format!("llvm.select {active}, {valid}, {none} : i1, i64"));
            let expert_first = g.op("mul", &expert, n);
            let b_row = g.op("add", &expert_first, &n0);
            let n_up = g.op_c("add", n, 127);
            let n_blocks = g.op_c("udiv", &n_up, 128);
            // Each pair's blocks of K (none past the last tile) and B's scales at the expert.
            let pair = |g: &mut Lines, k: &str, sb: &str| {
                let whole = g.op_c("udiv", k, TILE_K.into());
                let k_blocks = g.line(format!("llvm.select {active}, {whole}, {none} : i1, i64"));
                let row_blocks = padded_row(g, &whole);
                let scales = g.op("mul", &n_blocks, &row_blocks);
                let scales_at = g.op("mul", &expert, &scales);
                let sb =
                    g.line(format!("llvm.getelementptr {sb}[{scales_at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
                (sb, k_blocks)
            };
            let (sb, k_blocks) = pair(g, k, "%sb");
            let k2 = g.line("llvm.zext %k2 : i32 to i64");
            let (sb2, k_blocks2) = pair(g, &k2, "%sb2");
            let second = Segment {
                ta: "%ta2".into(),
                tb: "%tb2".into(),
                sa: "%sa2".into(),
                sb: sb2,
                k_from: k_from.clone(),
                k_blocks: k_blocks2,
            };
            let segments = vec![Segment::first(sb, k_from, k_blocks), second];
            Setup { n0, m0, valid, b_row, segments, layer: g.i64(0) }
        }
        (Form::Wgrad, expert) => {
            let expert = expert.expect("a Wgrad tile has its expert");
            let (k_from, tokens) = expert_tokens(g, expert_tiles, expert);
            let k_blocks = g.op_c("udiv", &tokens, TILE_K.into());
            let m0 = g.op_c("mul", by, tile.m.into());
            let b_row = n0.clone();
            let segments = vec![Segment::first("%sb".into(), k_from, k_blocks)];
            Setup { n0, m0, valid: all_rows, b_row, segments, layer: expert.to_string() }
        }
    }
}

/// Expert `expert`'s tokens in the Wgrad's operands: (its first column, its token count
/// rounded up to 128), from the table of the experts' blocks of 128 tokens
/// ([`write_expert_tiles`]): the columns of the earlier experts' rounded counts summed.
fn expert_tokens(g: &mut Lines, table: &str, expert: &str) -> (String, String) {
    let first = load_entry(g, table, expert);
    let next = g.op_c("add", expert, 1);
    let end = load_entry(g, table, &next);
    let blocks = g.op("sub", &end, &first);
    let [first, tokens] = [&first, &blocks].map(|x| g.op_c("mul", x, TILE_K.into()));
    (first, tokens)
}

/// `x` if at most `last`, else `last`.
fn clamp(g: &mut Lines, x: &str, last: &str) -> String {
    let within = g.line(format!("llvm.icmp \"ule\" {x}, {last} : i64"));
    g.line(format!("llvm.select {within}, {x}, {last} : i1, i64"))
}

/// The 128-column blocks of B's scales a tile of `tile_n` columns from `n0` reads (i64): its
/// first, and its second where it is wider than 128; clamped to N's last (a cluster's block
/// past N reads a real scale, and stores nothing).
fn scale_blocks(g: &mut Lines, n: &str, n0: &str, tile_n: u32) -> Vec<String> {
    let up = g.op_c("add", n, 127);
    let blocks = g.op_c("udiv", &up, 128);
    let last = g.op_c("sub", &blocks, 1);
    let n_block = g.op_c("udiv", n0, 128);
    let first = clamp(g, &n_block, &last);
    let mut n_blocks = vec![first.clone()];
    if tile_n > 128 {
        let next = g.op_c("add", &first, 1);
        n_blocks.push(clamp(g, &next, &last));
    }
    n_blocks
}

/// 128×128 weight-scale blocks a row holds: `blocks` rounded up to 4 (16 bytes).
fn padded_row(g: &mut Lines, blocks: &str) -> String {
    let up = g.op_c("add", blocks, 3);
    let fours = g.op_c("udiv", &up, 4);
    g.op_c("mul", &fours, 4)
}

/// Expert e's row offset `offsets[at]` (negative values read as 0).
fn offset(g: &mut Lines, at: &str) -> String {
    let p = g.line(format!("llvm.getelementptr %offsets[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, i32"));
    let x = g.line(format!("llvm.load {p} : !llvm.ptr<1> -> i32"));
    let zero = g.i32(0);
    let negative = g.line(format!("llvm.icmp \"slt\" {x}, {zero} : i32"));
    let x = g.line(format!("llvm.select {negative}, {zero}, {x} : i1, i32"));
    g.line(format!("llvm.zext {x} : i32 to i64"))
}

/// Writes the table of the experts' first tiles at `table` (one thread, once a block): entry e
/// the tiles of `tile_m` rows (the grouped form's; the Wgrad's blocks of 128 tokens) of the
/// experts before e, entry E all of them. Scanned per tile instead, the experts' offsets cost
/// a chain of dependent loads at the start of every tile.
fn write_expert_tiles(g: &mut Lines, table: &str, tile_m: u32) {
    let experts = g.line("llvm.zext %experts : i32 to i64");
    let (start, one) = (g.i64(0), g.i64(1));
    let Loop { index: e, carried, results: total } = g.open_for(&start, &experts, &one, &[(start.clone(), "i64")]);
    let before = &carried[0];
    store_entry(g, table, &e, before);
    let first = offset(g, &e);
    let next = g.op_c("add", &e, 1);
    let end = offset(g, &next);
    let rows = g.op("sub", &end, &first);
    let rows_up = g.op_c("add", &rows, u64::from(tile_m - 1));
    let tiles = g.op_c("udiv", &rows_up, tile_m.into());
    let after = g.op("add", before, &tiles);
    g.stmt(format!("scf.yield {after} : i64"));
    g.stmt("}");
    store_entry(g, table, &experts, &total);
}

/// Entry `at` of the table of experts' first tiles: `value`.
fn store_entry(g: &mut Lines, table: &str, at: &str, value: &str) {
    let p = g.line(format!("llvm.getelementptr {table}[{at}] : (!llvm.ptr<3>, i64) -> !llvm.ptr<3>, i32"));
    let v = g.line(format!("llvm.trunc {value} : i64 to i32"));
    g.stmt(format!("llvm.store {v}, {p} : i32, !llvm.ptr<3>"));
}

/// Entry `at` of the table of experts' first tiles.
fn load_entry(g: &mut Lines, table: &str, at: &str) -> String {
    let p = g.line(format!("llvm.getelementptr {table}[{at}] : (!llvm.ptr<3>, i64) -> !llvm.ptr<3>, i32"));
    let v = g.line(format!("llvm.load {p} : !llvm.ptr<3> -> i32"));
    g.line(format!("llvm.zext {v} : i32 to i64"))
}

/// The grouped form's row tile `by` (counted over every expert's tiles, each expert's rows
/// starting a tile): its expert (the last whose first tile is at most `by`, found by bisecting
/// the table), its first row, its valid rows, and whether it is any expert's (past the
/// last tile: none).
fn expert_rows(g: &mut Lines, table: &str, by: &str, tile_m: u32) -> (String, String, String, String) {
    let experts = g.line("llvm.zext %experts : i32 to i64");
    let (mut low, mut high) = (g.i64(0), experts.clone());
    // Invariant: entry `low` ≤ by, and the answer is at most `high`.
    for _ in 0..=MAX_EXPERTS.ilog2() {
        let sum = g.op("add", &low, &high);
        let sum = g.op_c("add", &sum, 1);
        let middle = g.op_c("lshr", &sum, 1);
        let first = load_entry(g, table, &middle);
        let below = g.line(format!("llvm.icmp \"ule\" {first}, {by} : i64"));
        let lower = g.op_c("sub", &middle, 1);
        low = g.line(format!("llvm.select {below}, {middle}, {low} : i1, i64"));
        high = g.line(format!("llvm.select {below}, {high}, {lower} : i1, i64"));
    }
    let active = g.line(format!("llvm.icmp \"ult\" {low}, {experts} : i64"));
    // Past the last tile the expert is E: read offsets[0] and [1] instead (unused).
    let start = g.i64(0);
    let expert = g.line(format!("llvm.select {active}, {low}, {start} : i1, i64"));
    let first_tile = load_entry(g, table, &expert);
    let local = g.op("sub", by, &first_tile);
    let first = offset(g, &expert);
    let next = g.op_c("add", &expert, 1);
    let end = offset(g, &next);
    let tile_at = g.op_c("mul", &local, tile_m.into());
    let m0 = g.op("add", &first, &tile_at);
    let valid = g.op("sub", &end, &m0);
    (expert, m0, valid, active)
}

#[cfg(all(test, feature = "mlir"))]
mod tests {
    use super::*;

    /// The kernels (every form, and the tiles the plans carry) lower through MLIR's pipeline to
    /// PTX with Hopper's FP8 `wgmma` fed by TMA through mbarriers (registers handed to two
    /// consumers; the Wgrad's scales copied with the stages; the dense and Wgrad forms' C stored by TMA),
    /// and, where `DSC_PTXAS` names ptxas, assemble for sm_90a without spilling registers, but
    /// for the 128×192 tiles.
    #[test]
    fn the_fp8_gemm_lowers_to_wgmma_and_assembles() {
        let forms = [
            (64, 64, 2, 1, Form::Dense),
            (128, 128, 4, 1, Form::Dense),
            (128, 192, 4, 2, Form::Dense),
            (128, 128, 4, 1, Form::Grouped),
            (128, 128, 4, 2, Form::Grouped),
            (128, 128, 4, 1, Form::Wgrad),
        ];
        // And the tiles the plans carry.
        let carried = [Form::Dense, Form::Grouped, Form::Wgrad]
            .into_iter()
            .flat_map(|form| candidates(form).iter().map(move |t| (t.m, t.n, t.stages, t.cluster, form)));
        for (m, n, stages, cluster, form) in forms.into_iter().chain(carried) {
            let tile = Tile { m, n, stages, cluster };
            let mlir = fp8_gemm("fp8_gemm", tile, form);
            let ptx = crate::mlir::lower::Lowering::default().ptx(&mlir, false).expect("lowers");
            let wgmma = format!("wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3");
            // The grouped form's second pair of operands has its loop of K and its copies.
            let segments = if form == Form::Grouped { 2 } else { 1 };
            // An overlapping tile issues a block of K's products in four places: the first
            // block, the loop's two (unrolled), the last of an even count.
            let places = if tile.overlaps(form) { 4 } else { 1 };
            assert_eq!(ptx.matches(&wgmma).count(), 4 * places * segments, "{ptx}");
            let loads = ptx.matches("cp.async.bulk.tensor.2d.shared::cluster.global").count();
            assert_eq!(loads, 2 * segments, "A and B by TMA: {ptx}");
            // The dense and Wgrad forms' C by TMA, stored or added, from shared memory.
            let stores = if form == Form::Grouped { 0 } else { n as usize / STORE_COLUMNS as usize };
            let stored = ptx.matches("cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group").count();
            let added = ptx.matches("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group").count();
            assert_eq!((stored, added), (stores, stores), "C by TMA: {ptx}");
            assert!(ptx.contains("mbarrier.try_wait.parity") && ptx.contains("mbarrier.arrive.expect_tx"), "{ptx}");
            assert_eq!(ptx.contains("setmaxnreg"), m == 128, "{ptx}");
            // The dense and Wgrad forms' scales come with the stages: A's rows, then B's columns
            // or group of block scales per 128-column block.
            let scale_copies = ptx.matches("cp.async.bulk.shared::cluster.global.mbarrier").count();
            let expected = match form {
                Form::Wgrad => 2,
                Form::Dense => 1 + n.div_ceil(128) as usize,
                Form::Grouped => 0,
            };
            assert_eq!(scale_copies, expected, "{ptx}");
            assert_eq!(
                ptx.contains(".multicast::cluster") && ptx.contains(".reqnctapercluster 2"),
                cluster == 2,
                "{ptx}"
            );
            // A pair's consumers release the stages at the CTA's scope: a release at the
            // cluster's fences every access in flight (session 34: 2–3 times the kernel's time).
            assert!(!ptx.contains("arrive.release.cluster"), "{ptx}");
            let Some(report) = crate::mlir::ptx::assemble(&ptx) else { continue };
            // The grouped 128×192's second pair spills (see `candidates`); `dsc tune` weighs it.
            // The overlapping tiles, two blocks' products in flight, park up to 60 bytes of a
            // tile's addresses outside the loop of K (SASS, ptxas 13.0).
            let spilled = crate::mlir::ptx::spilled_bytes(&report);
            if tile.overlaps(form) {
                assert!(spilled <= 64, "{report}");
            } else {
                assert_eq!(spilled > 0, form == Form::Grouped && n == 192, "{report}");
            }
        }
    }
}
