//! FP8 GEMMs generated for Hopper's warpgroup tensor cores (`wgmma`, sm_90a), with
//! DeepSeek-V3's fine-grained scaling: C = A·Bᵀ for A [M, K] (E4M3, 1×128 tiles along K, f32
//! scales stored M-contiguous: `sa[k/128 · M + m]`) and B [N, K] (E4M3, 128×128 blocks, scales
//! `sb[n/128 · R + k/128]`, R = K/128 rounded up to 4), C [M, N] in f32, row-major: the
//! layouts of the plan's quantised operands (`fuse::library`, as cuBLASLt reads them).
//!
//! A block of C ([`Tile`]) is one warpgroup (128 threads) per 64 rows. Both operands' tiles
//! go through a ring of shared-memory stages, one 128-wide block of K per stage, copied with
//! `cp.async` (16 bytes a thread, `stages - 1` blocks ahead of the products) into the
//! canonical no-swizzle layout: 8-row × 16-byte core matrices, adjacent along K 128 bytes
//! apart and along M/N 1,024 bytes apart (the descriptors' leading and stride offsets; the
//! swapped pair was measured wrong on the GPU). Per block of K, each warpgroup sums four
//! `wgmma.m64nNk32` products into fresh tensor-core accumulators, which are then promoted
//! into the f32 accumulators times the block's two scales: DeepSeek's promotion every 128
//! elements of K.
//!
//! This is the first form of issue 9: no TMA, no warp specialisation, no persistent
//! schedule yet, and the plan's GEMMs still run on cuBLASLt; `benches/fp8_gemm.py
//! --generated` checks it against float64 and measures it beside cuBLASLt on the GPU. The
//! `wgmma` instructions are inline PTX (MLIR 22's `nvvm.wgmma.mma_async` needs the struct
//! plumbing this gives directly). M must be a multiple of the tile's m, N of its n, K of 128.

use super::emit::Body;
use std::fmt::Write;

/// Rows of C per block: one warpgroup's `wgmma` M.
pub const TILE_M: u32 = 64;
/// K per scale block, and per shared-memory stage.
pub const TILE_K: u32 = 128;
/// Bytes between core matrices adjacent along K, and along M or N (8 rows of 128 bytes).
const ALONG_K: u32 = 128;
const ALONG_MN: u32 = (TILE_K / 16) * 128;

/// One kernel body ([`Body`] names and emits its SSA values), with the LLVM-dialect integer
/// arithmetic and inline PTX the GEMM is written in.
struct Lines(Body);

impl Lines {
    fn line(&mut self, rhs: impl AsRef<str>) -> String {
        self.0.line(rhs.as_ref().to_string())
    }

    fn stmt(&mut self, s: impl AsRef<str>) {
        let _ = writeln!(self.0.text, "        {}", s.as_ref());
    }

    fn i64(&mut self, c: u64) -> String {
        self.line(format!("llvm.mlir.constant({c} : i64) : i64"))
    }

    fn i32(&mut self, c: u32) -> String {
        self.line(format!("llvm.mlir.constant({c} : i32) : i32"))
    }

    /// `a <op> b` on i64 (`op` an LLVM dialect binary op: add, mul, udiv, urem, or, lshr, and).
    fn op(&mut self, op: &str, a: &str, b: &str) -> String {
        self.line(format!("llvm.{op} {a}, {b} : i64"))
    }

    fn op_c(&mut self, op: &str, a: &str, c: u64) -> String {
        let c = self.i64(c);
        self.op(op, a, &c)
    }

    fn index_i64(&mut self, rhs: &str) -> String {
        let i = self.line(rhs);
        self.line(format!("arith.index_cast {i} : index to i64"))
    }

    /// Inline PTX with side effects: `outputs` "=f" results (tied to the first `outputs`
    /// operands when `tied`), then the other operands with their constraints.
    fn asm(&mut self, text: &str, outputs: usize, tied: bool, operands: &[(String, &str, &str)]) -> Option<String> {
        let mut constraints: Vec<String> = vec!["=f".into(); outputs];
        if tied {
            constraints.extend((0..outputs).map(|i| i.to_string()));
        }
        constraints.extend(operands.iter().skip(if tied { outputs } else { 0 }).map(|(_, c, _)| c.to_string()));
        let args: Vec<&str> = operands.iter().map(|(v, _, _)| v.as_str()).collect();
        let types: Vec<&str> = operands.iter().map(|(_, _, t)| *t).collect();
        let call = format!(
            r#"llvm.inline_asm has_side_effects asm_dialect = att "{text}", "{}" {} : ({}) -> "#,
            constraints.join(","),
            args.join(", "),
            types.join(", ")
        );
        if outputs == 0 {
            self.stmt(format!("{call}()"));
            None
        } else {
            Some(self.line(format!("{call}{}", accumulators(outputs))))
        }
    }

    /// The fields of struct `s` of `count` f32.
    fn fields(&mut self, s: &str, count: usize) -> Vec<String> {
        (0..count).map(|i| self.line(format!("llvm.extractvalue {s}[{i}] : {}", accumulators(count)))).collect()
    }
}

fn accumulators(count: usize) -> String {
    format!("!llvm.struct<({})>", vec!["f32"; count].join(", "))
}

/// A block's shape: `m` rows of C (64 per warpgroup: 64 or 128), `n` columns (16 to 128, a
/// divisor of 128: the columns share one weight-scale block; 32 or more when `m` is 128, so
/// that every thread copies whole pieces), and the shared-memory `stages`
/// (2 to 6) of 128 × (`m` + `n`) bytes each, 227 KB at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub m: u32,
    pub n: u32,
    pub stages: u32,
}

impl Tile {
    /// Why the tile cannot be generated, if it cannot.
    pub fn check(self) -> Result<Self, String> {
        let Tile { m, n, stages } = self;
        // A block's columns share one 128×128 weight-scale block: n divides 128.
        // And each thread copies whole 16-byte pieces of both tiles (n·8 a multiple of the
        // threads).
        let fits = matches!(m, 64 | 128)
            && matches!(n, 8 | 16 | 32 | 64 | 128)
            && (n * (TILE_K / 16)).is_multiple_of(self.threads())
            && (2..=6).contains(&stages)
            && self.shared_bytes() <= 227 << 10;
        if fits {
            Ok(self)
        } else {
            Err(format!(
                "tile {m}x{n} in {stages} stages: m is 64 or 128, n 16, 32, 64 or 128 (its columns share a \
                 128x128 weight-scale block; 32 or more when m is 128), 2 to 6 stages of 128 x (m + n) bytes \
                 within 227 KB"
            ))
        }
    }

    /// Dynamic shared memory of a block: the launch passes it (and raises the kernel's limit).
    pub fn shared_bytes(self) -> u32 {
        self.stages * (self.m + self.n) * TILE_K
    }

    /// Threads of a block: a warpgroup per 64 rows.
    pub fn threads(self) -> u32 {
        self.m / TILE_M * 128
    }
}

/// The kernels a plan carries for its experts' FP8 products and weight gradients
/// (`kernels/NAME.ptx`), with their tiles.
pub const GROUPED: (&str, Tile) = ("fp8_grouped_m128_n128_s4", Tile { m: 128, n: 128, stages: 4 });
pub const WGRAD: (&str, Tile) = ("fp8_wgrad_m128_n128_s4", Tile { m: 128, n: 128, stages: 4 });

/// The MLIR module of kernel `name`: C = A·Bᵀ with fine-grained scales (see the module doc) in
/// blocks of `tile` (checked by [`Tile::check`]). Launch: grid (N / n, M / m), `tile.threads()`
/// threads, `tile.shared_bytes()` of dynamic shared memory; arguments A, B, sa, sb, C
/// (pointers), M, N, K (u32).
pub fn fp8_gemm(name: &str, tile: Tile, form: Form) -> String {
    let tile = tile.check().expect("a valid tile");
    let Tile { m: tile_m, n: tile_n, stages } = tile;
    let registers = (tile_n / 2) as usize;
    let a_bytes = tile_m * TILE_K;
    let mut g = Lines(Body::new());
    let tid = g.index_i64("gpu.thread_id x");
    let bx = g.index_i64("gpu.block_id x");
    let by = g.index_i64("gpu.block_id y");
    let [m, n, k] = ["%m", "%n", "%k"].map(|x| g.line(format!("llvm.zext {x} : i32 to i64")));
    let n0 = g.op_c("mul", &bx, tile_n.into());
    let all_rows = g.i64(tile_m.into());
    let whole = |g: &mut Lines| g.op_c("udiv", &k, TILE_K.into());
    let Setup { m0, valid, b, sb, k_from, k_blocks, c } = match form {
        Form::Dense => {
            let m0 = g.op_c("mul", &by, tile_m.into());
            let k_blocks = whole(&mut g);
            let k_from = g.i64(0);
            Setup { m0, valid: all_rows, b: "%b".into(), sb: "%sb".into(), k_from, k_blocks, c: "%c".into() }
        }
        Form::Grouped => {
            let (expert, m0, valid, active) = expert_rows(&mut g, &by, tile_m);
            g.stmt(format!("scf.if {active} {{"));
            let weights = g.op("mul", &n, &k);
            let weights_at = g.op("mul", &expert, &weights);
            let b = g.line(format!("llvm.getelementptr %b[{weights_at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, i8"));
            let k_blocks = whole(&mut g);
            let row_blocks = padded_row(&mut g, &k_blocks);
            let n_blocks = g.op_c("udiv", &n, 128);
            let scales = g.op("mul", &n_blocks, &row_blocks);
            let scales_at = g.op("mul", &expert, &scales);
            let sb = g.line(format!("llvm.getelementptr %sb[{scales_at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
            let k_from = g.i64(0);
            Setup { m0, valid, b, sb, k_from, k_blocks, c: "%c".into() }
        }
        Form::Wgrad => {
            let expert = g.index_i64("gpu.block_id z");
            let (k_from, tokens) = expert_tokens(&mut g, &expert);
            let k_blocks = g.op_c("udiv", &tokens, TILE_K.into());
            let m0 = g.op_c("mul", &by, tile_m.into());
            let out = g.op("mul", &m, &n);
            let out_at = g.op("mul", &expert, &out);
            let c = g.line(format!("llvm.getelementptr %c[{out_at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
            Setup { m0, valid: all_rows, b: "%b".into(), sb: "%sb".into(), k_from, k_blocks, c }
        }
    };
    let first_kb = g.op_c("udiv", &k_from, TILE_K.into());
    let last_row = g.op_c("sub", &m, 1);
    let smem = g.line("llvm.mlir.addressof @tiles : !llvm.ptr<3>");
    let smem_at = g.line(format!("llvm.ptrtoint {smem} : !llvm.ptr<3> to i64"));
    let no_blocks = g.i64(0);
    let any_block = g.line(format!("llvm.icmp \"ugt\" {k_blocks}, {no_blocks} : i64"));
    // Used only where there is a block (the first copies and the loop).
    let last_block = g.op_c("sub", &k_blocks, 1);
    // This thread's rows of the accumulators: warpgroup v holds rows 64v..64v+63, its warp w
    // rows 16w..16w+15 of those, lane l rows l/4 and l/4 + 8 of those, columns
    // 8j + 2(l mod 4) + {0, 1}.
    let group = g.op_c("udiv", &tid, 128);
    let group_rows = g.op_c("mul", &group, TILE_M.into());
    let in_group = g.op_c("urem", &tid, 128);
    let warp = g.op_c("udiv", &in_group, 32);
    let lane = g.op_c("urem", &tid, 32);
    let warp_rows = g.op_c("mul", &warp, 16);
    let lane_row = g.op_c("udiv", &lane, 4);
    let row0 = g.op("add", &warp_rows, &lane_row);
    let row0 = g.op("add", &row0, &group_rows);
    let row1 = g.op_c("add", &row0, 8);
    let lane_col = g.op_c("urem", &lane, 4);
    let col = g.op_c("mul", &lane_col, 2);
    // The warpgroup's A rows start 8 core-matrix rows (of ALONG_MN bytes) per 64 rows in.
    let group_a_at = g.op_c("mul", &group, u64::from(TILE_M / 8 * ALONG_MN));
    let strides = g.i64(((ALONG_K as u64 >> 4) << 16) | ((ALONG_MN as u64 >> 4) << 32));
    let zero = g.line("llvm.mlir.constant(0.0 : f32) : f32");
    let stage_bytes = u64::from(tile.shared_bytes() / stages);
    // Starts copying `block`'s tiles into stage `stage`, as one group of copies.
    let copy = |g: &mut Lines, block: &str, stage: &str| {
        let stage_at = g.op_c("mul", stage, stage_bytes);
        let k_at = g.op_c("mul", block, TILE_K.into());
        let k_at = g.op("add", &k_from, &k_at);
        let b_at = g.op_c("add", &stage_at, a_bytes.into());
        let operands =
            [("%a", tile_m, &m0, Some(last_row.as_str()), &stage_at), (b.as_str(), tile_n, &n0, None, &b_at)];
        for (ptr, rows, origin, last, at) in operands {
            let operand = Operand { ptr, rows, origin, last, k: &k, k_at: &k_at };
            copy_tile(g, &tid, tile.threads(), operand, &smem, at);
        }
        g.stmt("nvvm.cp.async.commit.group");
    };
    // The block at `position` (the last block instead where K is shorter) into stage
    // `position` mod stages: past the end, a stage no later iteration reads.
    let copy_at = |g: &mut Lines, position: &str| {
        let more = g.line(format!("llvm.icmp \"ult\" {position}, {k_blocks} : i64"));
        let block = g.line(format!("llvm.select {more}, {position}, {last_block} : i1, i64"));
        let stage = g.op_c("urem", position, stages.into());
        copy(g, &block, &stage);
    };
    // The first stages - 1 blocks in flight (none where K has no block: a Wgrad's expert
    // without tokens).
    g.stmt(format!("scf.if {any_block} {{"));
    for position in 0..stages - 1 {
        let position = g.i64(position.into());
        copy_at(&mut g, &position);
    }
    g.stmt("}");
    let [lower, upper, step] =
        [g.i64(0), k_blocks.clone(), g.i64(1)].map(|v| g.line(format!("arith.index_cast {v} : i64 to index")));
    let iter_args: Vec<String> = (0..registers).map(|i| format!("%acc{i} = {zero}")).collect();
    let f32s = vec!["f32"; registers].join(", ");
    let sums = "%sums";
    g.stmt(format!(
        "{sums}:{registers} = scf.for %kb_index = {lower} to {upper} step {step} iter_args({}) -> ({f32s}) {{",
        iter_args.join(", ")
    ));
    let kb = g.line("arith.index_cast %kb_index : index to i64");
    // Block kb's copies are done once at most stages - 2 later groups are pending.
    g.stmt(format!("nvvm.cp.async.wait.group {}", stages - 2));
    // This thread's copies, ordered before the tensor cores' reads, then the whole block's.
    g.asm("fence.proxy.async.shared::cta;", 0, false, &[]);
    g.stmt("gpu.barrier");
    // Block kb + stages - 1 into the stage block kb - 1 used: every thread is past those
    // products (it waited for them before the barrier above).
    let ahead = g.op_c("add", &kb, u64::from(stages - 1));
    copy_at(&mut g, &ahead);
    let scale = |g: &mut Lines, ptr: &str, at: &str| {
        let p = g.line(format!("llvm.getelementptr {ptr}[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
        g.line(format!("llvm.load {p} : !llvm.ptr<1> -> f32"))
    };
    let kb_at = g.op("add", &first_kb, &kb);
    let sa_block = g.op("mul", &kb_at, &m);
    let [sa0, sa1] = [&row0, &row1].map(|r| {
        let row = g.op("add", &m0, r);
        let row = clamp(&mut g, &row, &last_row);
        let at = g.op("add", &sa_block, &row);
        scale(&mut g, "%sa", &at)
    });
    // Each accumulator's scale: its row's times its block's (Dense, Grouped) or its column's
    // (Wgrad: this thread's columns 8j + 2(l mod 4) + {0, 1}).
    let scales: Vec<String> = if form == Form::Wgrad {
        let sb_block = g.op("mul", &kb_at, &n);
        let c_col = g.op("add", &n0, &col);
        let columns: Vec<String> = (0..registers / 2)
            .map(|j| {
                let column = g.op_c("add", &c_col, (j as u64 / 2) * 8 + j as u64 % 2);
                let at = g.op("add", &sb_block, &column);
                scale(&mut g, &sb, &at)
            })
            .collect();
        (0..registers)
            .map(|i| {
                let (row, column) = ([&sa0, &sa1][(i / 2) % 2], &columns[(i / 4) * 2 + i % 2]);
                g.line(format!("llvm.fmul {row}, {column} : f32"))
            })
            .collect()
    } else {
        let n_block = g.op_c("udiv", &n0, 128);
        let row_blocks = padded_row(&mut g, &k_blocks);
        let sb_row = g.op("mul", &n_block, &row_blocks);
        let sb_at = g.op("add", &sb_row, &kb);
        let block = scale(&mut g, &sb, &sb_at);
        let [s0, s1] = [&sa0, &sa1].map(|s| g.line(format!("llvm.fmul {s}, {block} : f32")));
        (0..registers).map(|i| [&s0, &s1][(i / 2) % 2].clone()).collect()
    };
    let stage = g.op_c("urem", &kb, stages.into());
    let stage_at = g.op_c("mul", &stage, stage_bytes);
    let stage_at = g.op("add", &smem_at, &stage_at);
    let a_at = g.op("add", &stage_at, &group_a_at);
    let b_at = g.op_c("add", &stage_at, a_bytes.into());
    g.asm("wgmma.fence.sync.aligned;", 0, false, &[]);
    let registers_ptx: Vec<String> = (0..registers).map(|i| format!("${i}")).collect();
    let mut partial = vec![zero.clone(); registers];
    for step in 0..TILE_K / 32 {
        let descriptor = |g: &mut Lines, base: &str| {
            // 32 bytes of K per product: two core matrices along K.
            let at = g.op_c("add", base, u64::from(step * 2 * ALONG_K));
            let low = g.op_c("and", &at, 0x3FFFF);
            let address = g.op_c("lshr", &low, 4);
            g.op("or", &strides, &address)
        };
        let a = descriptor(&mut g, &a_at);
        let b = descriptor(&mut g, &b_at);
        let keep = g.i32(u32::from(step > 0));
        let text = format!(
            r"{{\0A.reg .pred p;\0Asetp.ne.b32 p, ${}, 0;\0Awgmma.mma_async.sync.aligned.m64n{tile_n}k32.f32.e4m3.e4m3 {{{}}}, ${}, ${}, p, 1, 1;\0A}}",
            2 * registers + 2,
            registers_ptx.join(", "),
            2 * registers,
            2 * registers + 1
        );
        let mut operands: Vec<(String, &str, &str)> = partial.iter().map(|v| (v.clone(), "", "f32")).collect();
        operands.extend([(a, "l", "i64"), (b, "l", "i64"), (keep, "r", "i32")]);
        let s = g.asm(&text, registers, true, &operands).expect("results");
        partial = g.fields(&s, registers);
    }
    g.asm("wgmma.commit_group.sync.aligned;", 0, false, &[]);
    // The accumulators pass through the wait so that nothing reads them before it.
    let operands: Vec<(String, &str, &str)> = partial.iter().map(|v| (v.clone(), "", "f32")).collect();
    let waited = g.asm("wgmma.wait_group.sync.aligned 0;", registers, true, &operands).expect("results");
    let block = g.fields(&waited, registers);
    let promoted: Vec<String> = block
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let scaled = g.line(format!("llvm.fmul {x}, {} : f32", scales[i]));
            g.line(format!("llvm.fadd %acc{i}, {scaled} : f32"))
        })
        .collect();
    g.stmt(format!("scf.yield {} : {f32s}", promoted.join(", ")));
    g.stmt("}");
    g.stmt("nvvm.cp.async.wait.group 0");
    // Each of this thread's two rows, if the block has it (an expert's last block may not).
    let c_col = g.op("add", &n0, &col);
    for (half, row) in [&row0, &row1].into_iter().enumerate() {
        let here = g.line(format!("llvm.icmp \"ult\" {row}, {valid} : i64"));
        g.stmt(format!("scf.if {here} {{"));
        let c_row = g.op("add", &m0, row);
        let row_at = g.op("mul", &c_row, &n);
        for i in (0..registers).step_by(2).filter(|i| (i / 2) % 2 == half) {
            let column = g.op_c("add", &c_col, (i as u64 / 4) * 8);
            let at = g.op("add", &row_at, &column);
            let p = g.line(format!("llvm.getelementptr {c}[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
            let pair = g.line("llvm.mlir.poison : vector<2xf32>");
            let [first, second] = [g.i32(0), g.i32(1)];
            let pair = g.line(format!("llvm.insertelement {sums}#{i}, {pair}[{first} : i32] : vector<2xf32>"));
            let pair = g.line(format!("llvm.insertelement {sums}#{}, {pair}[{second} : i32] : vector<2xf32>", i + 1));
            g.stmt(format!("llvm.store {pair}, {p} {{alignment = 8 : i64}} : vector<2xf32>, !llvm.ptr<1>"));
        }
        g.stmt("}");
    }
    if form == Form::Grouped {
        g.stmt("}");
    }
    format!(
        "module attributes {{gpu.container_module}} {{\n  gpu.module @{name} [{target}] {{\n    \
         llvm.mlir.global external @tiles() {{addr_space = 3 : i32, alignment = 1024 : i64}} : !llvm.array<0 x i8>\n    \
         gpu.func @{name}(%a: !llvm.ptr<1>, %b: !llvm.ptr<1>, %sa: !llvm.ptr<1>, %sb: !llvm.ptr<1>, %c: !llvm.ptr<1>, \
         %m: i32, %n: i32, %k: i32{grouped}) kernel attributes {{known_block_size = array<i32: {threads}, 1, 1>}} {{\n{body}      \
         gpu.return\n    }}\n  }}\n}}\n",
        target = super::emit::TARGET,
        threads = tile.threads(),
        grouped = if form == Form::Dense { "" } else { ", %offsets: !llvm.ptr<1>, %experts: i32" },
        body = g.0.text
    )
}

/// What a kernel multiplies: one A by one B, or the experts' rows by their own weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// C = A·Bᵀ; grid (N / n, M / m).
    Dense,
    /// The MoE experts' grouped GEMM: A's rows sorted by expert, expert e's rows
    /// `offsets[e]..offsets[e + 1]` (i32, E + 1 of them, on the device), B [E, N, K] with
    /// scales [E, N/128, R]: C's rows of expert e = A's times B[e]ᵀ. Two more arguments, the
    /// offsets (pointer) and E (u32); grid (N / n, ⌈M / m⌉ + E): each block finds its expert
    /// and tile from the offsets, blocks past the last tile do nothing.
    Grouped,
    /// The experts' weight gradients (`quantize_by_expert` operands): out[e] [M, N] =
    /// A_e·B_eᵀ over expert e's tokens, A [M, L] and B [N, L] with expert e's tokens in the
    /// columns from the earlier experts' token counts, each rounded up to 128, summed (1×128
    /// tiles along tokens; scales [L/128, M] and [L/128, N]: B's scale is a column's, applied
    /// at the promotion). K is L; the offsets and E as for `Grouped`; grid (N / n, M / m, E);
    /// an expert without tokens gets zeros.
    Wgrad,
}

/// Where a block's operands are: its first row of A and C (`m0`) and how many it has
/// (`valid`), B and B's scales (pointers), the first byte of K (`k_from`, a multiple of 128) and
/// the blocks of K from there, and C (pointer).
struct Setup {
    m0: String,
    valid: String,
    b: String,
    sb: String,
    k_from: String,
    k_blocks: String,
    c: String,
}

/// Expert `expert`'s tokens in the Wgrad's operands: (its first column, its token count
/// rounded up to 128), the columns of the earlier experts' rounded counts summed.
fn expert_tokens(g: &mut Lines, expert: &str) -> (String, String) {
    let rounded = |g: &mut Lines, e: &str| {
        let first = offset(g, e);
        let next = g.op_c("add", e, 1);
        let end = offset(g, &next);
        let tokens = g.op("sub", &end, &first);
        let up = g.op_c("add", &tokens, u64::from(TILE_K - 1));
        let blocks = g.op_c("udiv", &up, TILE_K.into());
        g.op_c("mul", &blocks, TILE_K.into())
    };
    let [lower, upper, step] =
        [g.i64(0), expert.to_string(), g.i64(1)].map(|v| g.line(format!("arith.index_cast {v} : i64 to index")));
    let zero = g.i64(0);
    g.stmt(format!(
        "%earlier = scf.for %t_index = {lower} to {upper} step {step} iter_args(%columns = {zero}) -> (i64) {{"
    ));
    let e = g.line("arith.index_cast %t_index : index to i64");
    let tokens = rounded(g, &e);
    let sum = g.op("add", "%columns", &tokens);
    g.stmt(format!("scf.yield {sum} : i64"));
    g.stmt("}");
    let tokens = rounded(g, expert);
    ("%earlier".to_string(), tokens)
}

/// `x` if at most `last`, else `last`.
fn clamp(g: &mut Lines, x: &str, last: &str) -> String {
    let within = g.line(format!("llvm.icmp \"ule\" {x}, {last} : i64"));
    g.line(format!("llvm.select {within}, {x}, {last} : i1, i64"))
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

/// The expert and rows of grouped block `by`: walks the experts counting each one's tiles of
/// `tile_m` rows until the block's; returns (expert, first row, rows it has, whether it has
/// any: false past the last tile).
fn expert_rows(g: &mut Lines, by: &str, tile_m: u32) -> (String, String, String, String) {
    let experts = g.line("llvm.zext %experts : i32 to i64");
    let none = experts.clone();
    let [lower, upper, step] =
        [g.i64(0), experts.clone(), g.i64(1)].map(|v| g.line(format!("arith.index_cast {v} : i64 to index")));
    let start = g.i64(0);
    g.stmt(format!(
        "%found:3 = scf.for %e_index = {lower} to {upper} step {step} iter_args(%expert = {none}, %tile = {start}, \
         %before = {start}) -> (i64, i64, i64) {{"
    ));
    let e = g.line("arith.index_cast %e_index : index to i64");
    let first = offset(g, &e);
    let next = g.op_c("add", &e, 1);
    let end = offset(g, &next);
    let rows = g.op("sub", &end, &first);
    let rows_up = g.op_c("add", &rows, u64::from(tile_m - 1));
    let tiles = g.op_c("udiv", &rows_up, tile_m.into());
    let after = g.op("add", "%before", &tiles);
    let from = g.line(format!("llvm.icmp \"uge\" {by}, %before : i64"));
    let until = g.line(format!("llvm.icmp \"ult\" {by}, {after} : i64"));
    let inside = g.line(format!("llvm.and {from}, {until} : i1"));
    let expert = g.line(format!("llvm.select {inside}, {e}, %expert : i1, i64"));
    let local = g.op("sub", by, "%before");
    let tile = g.line(format!("llvm.select {inside}, {local}, %tile : i1, i64"));
    g.stmt(format!("scf.yield {expert}, {tile}, {after} : i64, i64, i64"));
    g.stmt("}");
    let active = g.line(format!("llvm.icmp \"ult\" %found#0, {experts} : i64"));
    // Past the last tile the expert is E: read offsets[0] and [1] instead (unused).
    let expert = g.line(format!("llvm.select {active}, %found#0, {start} : i1, i64"));
    let first = offset(g, &expert);
    let next = g.op_c("add", &expert, 1);
    let end = offset(g, &next);
    let tile_at = g.op_c("mul", "%found#1", tile_m.into());
    let m0 = g.op("add", &first, &tile_at);
    let valid = g.op("sub", &end, &m0);
    (expert, m0, valid, active)
}

/// Rows `origin..origin + rows` of operand `ptr` ([_, k] bytes), bytes `k_at..k_at + 128` of
/// each.
struct Operand<'s> {
    ptr: &'s str,
    rows: u32,
    origin: &'s str,
    /// The last row there is (rows past it read it instead), where a tile may run past it.
    last: Option<&'s str>,
    k: &'s str,
    k_at: &'s str,
}

/// Starts copying a tile of an operand into shared memory at `offset`, in the core-matrix
/// layout, with `cp.async` (16 bytes a thread at a time; `threads` threads). A warp takes 8
/// rows × 4 pieces of 16 bytes: each row's 64 bytes read whole from global memory, and the 8
/// threads of each quarter-warp write the 8 rows of one core matrix, 128 consecutive bytes
/// of shared memory (no bank conflicts).
fn copy_tile(
    g: &mut Lines,
    tid: &str,
    threads: u32,
    Operand { ptr, rows, origin, last, k, k_at }: Operand,
    smem: &str,
    offset: &str,
) {
    for pass in 0..u64::from(rows * (TILE_K / 16) / threads) {
        let chunk = g.op_c("add", tid, pass * u64::from(threads));
        let warp = g.op_c("udiv", &chunk, 32);
        let lane = g.op_c("urem", &chunk, 32);
        let row_group = g.op_c("udiv", &warp, 2);
        let half = g.op_c("urem", &warp, 2);
        let in_group = g.op_c("urem", &lane, 8);
        let quarter = g.op_c("udiv", &lane, 8);
        let group_first = g.op_c("mul", &row_group, 8);
        let row = g.op("add", &group_first, &in_group);
        let half_first = g.op_c("mul", &half, 4);
        let piece = g.op("add", &half_first, &quarter);
        let global_row = g.op("add", origin, &row);
        let global_row = match last {
            Some(last) => clamp(g, &global_row, last),
            None => global_row,
        };
        let row_at = g.op("mul", &global_row, k);
        let piece_at = g.op_c("mul", &piece, 16);
        let within = g.op("add", k_at, &piece_at);
        let from = g.op("add", &row_at, &within);
        let src = g.line(format!("llvm.getelementptr {ptr}[{from}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, i8"));
        let groups_at = g.op_c("mul", &row_group, ALONG_MN.into());
        let pieces_at = g.op_c("mul", &piece, ALONG_K.into());
        let line_at = g.op_c("mul", &in_group, 16);
        let to = g.op("add", &groups_at, &pieces_at);
        let to = g.op("add", &to, &line_at);
        let to = g.op("add", &to, offset);
        let dst = g.line(format!("llvm.getelementptr {smem}[{to}] : (!llvm.ptr<3>, i64) -> !llvm.ptr<3>, i8"));
        g.stmt(format!("nvvm.cp.async.shared.global {dst}, {src}, 16, cache = cg : !llvm.ptr<3>, !llvm.ptr<1>"));
    }
}

#[cfg(all(test, feature = "mlir"))]
mod tests {
    use super::*;

    /// The kernels (every form) lower through MLIR's pipeline to PTX with Hopper's FP8 `wgmma`, and, where
    /// `DSC_PTXAS` names ptxas, assembles for sm_90a without spilling registers.
    #[test]
    fn the_fp8_gemm_lowers_to_wgmma_and_assembles() {
        let forms = [
            (64, 64, 2, Form::Dense),
            (128, 128, 4, Form::Dense),
            (128, 128, 4, Form::Grouped),
            (128, 128, 4, Form::Wgrad),
        ];
        for (m, n, stages, form) in forms {
            let mlir = fp8_gemm("fp8_gemm", Tile { m, n, stages }, form);
            let ptx = crate::mlir::lower::Lowering::default().ptx(&mlir, false).expect("lowers");
            let wgmma = format!("wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3");
            assert_eq!(ptx.matches(&wgmma).count(), 4, "{ptx}");
            let Some(ptxas) = std::env::var_os("DSC_PTXAS") else {
                eprintln!("ptxas not run: set DSC_PTXAS (scripts/install-deps.sh installs it)");
                continue;
            };
            let dir = tempfile::tempdir().expect("tempdir");
            let source = dir.path().join("gemm.ptx");
            std::fs::write(&source, &ptx).expect("write");
            let out = std::process::Command::new(ptxas)
                .args(["-arch=sm_90a", "-v", "-o"])
                .arg(dir.path().join("gemm.cubin"))
                .arg(&source)
                .output()
                .expect("ptxas runs");
            let report = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{report}");
            assert!(report.contains("0 bytes spill stores"), "{report}");
        }
    }
}
