//! FP8 GEMMs generated for Hopper's warpgroup tensor cores (`wgmma`, sm_90a), with
//! DeepSeek-V3's fine-grained scaling: C = A·Bᵀ for A [M, K] (E4M3, 1×128 tiles along K, f32
//! scales stored M-contiguous: `sa[k/128 · M + m]`) and B [N, K] (E4M3, 128×128 blocks, scales
//! `sb[n/128 · R + k/128]`, R = K/128 rounded up to 4), C [M, N] in f32, row-major: the
//! layouts of the plan's quantised operands (`fuse::library`, as cuBLASLt reads them).
//!
//! One warpgroup (128 threads) per 64 × `tile_n` block of C. For each 128-wide block of K the
//! threads copy both operand tiles into shared memory in the canonical no-swizzle layout
//! (8-row × 16-byte core matrices, adjacent along K 128 bytes apart, along M/N 1,024 bytes
//! apart: the descriptors' leading and stride offsets; the swapped pair was measured wrong on
//! the GPU), four `wgmma.m64nNk32` products sum
//! the block into fresh tensor-core accumulators, and those are promoted into the f32
//! accumulators times the block's two scales (DeepSeek's promotion every 128 elements of K).
//! With two stages, the next block's tiles are copied into the other half of shared memory
//! while the tensor cores work on this one.
//!
//! This is the correct-first form of issue 9: no TMA, no deeper pipeline, no warp
//! specialisation yet, and the plan's GEMMs still run on cuBLASLt; `benches/fp8_gemm.py
//! --generated` checks it against float64 and measures it beside cuBLASLt on the GPU. The
//! `wgmma` instructions are inline PTX (MLIR 22's `nvvm.wgmma.mma_async` needs the struct
//! plumbing this gives directly); M must be a multiple of 64, N of `tile_n`, K of 128.

use super::emit::Body;
use std::fmt::Write;

/// Rows of C per block: one warpgroup's `wgmma` M.
pub const TILE_M: u32 = 64;
/// The tile widths (columns of C per block): `wgmma` N values whose blocks of C each lie in
/// one 128-wide weight-scale block, with at least one 16-byte piece of B's tile per thread.
pub const TILE_WIDTHS: [u32; 4] = [16, 32, 64, 128];
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

/// Orders this thread's shared-memory stores before the tensor cores' reads, then waits for
/// the block.
fn fence_and_barrier(g: &mut Lines) {
    g.asm("fence.proxy.async.shared::cta;", 0, false, &[]);
    g.stmt("gpu.barrier");
}

fn accumulators(count: usize) -> String {
    format!("!llvm.struct<({})>", vec!["f32"; count].join(", "))
}

/// The MLIR module of kernel `name`: C = A·Bᵀ with fine-grained scales (see the module doc),
/// blocks of 64 × `tile_n` (one of [`TILE_WIDTHS`]) through 1 or 2 shared-memory `stages`
/// (of 128 × (64 + `tile_n`) bytes; 48 KB at most). Launch: grid (N / tile_n, M / 64),
/// 128 threads; arguments A, B, sa, sb, C (pointers), M, N, K (u32).
pub fn fp8_gemm(name: &str, tile_n: u32, stages: u32) -> String {
    assert!(TILE_WIDTHS.contains(&tile_n), "the tile's width is one of TILE_WIDTHS");
    assert!(matches!(stages, 1 | 2), "one or two shared-memory stages");
    assert!(stages * (TILE_M + tile_n) * TILE_K <= 48 << 10, "static shared memory is 48 KB at most");
    let registers = (tile_n / 2) as usize;
    let (a_bytes, b_bytes) = (TILE_M * TILE_K, tile_n * TILE_K);
    let mut g = Lines(Body::new());
    let tid = g.index_i64("gpu.thread_id x");
    let bx = g.index_i64("gpu.block_id x");
    let by = g.index_i64("gpu.block_id y");
    let [m, n, k] = ["%m", "%n", "%k"].map(|x| g.line(format!("llvm.zext {x} : i32 to i64")));
    let m0 = g.op_c("mul", &by, TILE_M.into());
    let n0 = g.op_c("mul", &bx, tile_n.into());
    let smem = g.line("llvm.mlir.addressof @tiles : !llvm.ptr<3>");
    let smem_at = g.line(format!("llvm.ptrtoint {smem} : !llvm.ptr<3> to i64"));
    let k_blocks = g.op_c("udiv", &k, TILE_K.into());
    // This thread's rows of the accumulators: warp w holds rows 16w..16w+15, lane l rows
    // l/4 and l/4 + 8 of those, columns 8j + 2(l mod 4) + {0, 1}.
    let warp = g.op_c("udiv", &tid, 32);
    let lane = g.op_c("urem", &tid, 32);
    let warp_rows = g.op_c("mul", &warp, 16);
    let lane_row = g.op_c("udiv", &lane, 4);
    let row0 = g.op("add", &warp_rows, &lane_row);
    let row1 = g.op_c("add", &row0, 8);
    let lane_col = g.op_c("urem", &lane, 4);
    let col = g.op_c("mul", &lane_col, 2);
    let stage_bytes = a_bytes + b_bytes;
    let stage_bytes_value = g.i64(stage_bytes.into());
    let strides = g.i64(((ALONG_K as u64 >> 4) << 16) | ((ALONG_MN as u64 >> 4) << 32));
    let zero = g.line("llvm.mlir.constant(0.0 : f32) : f32");
    let [lower, upper, step] =
        [g.i64(0), k_blocks.clone(), g.i64(1)].map(|v| g.line(format!("arith.index_cast {v} : i64 to index")));
    let copy = |g: &mut Lines, kb: &str, stage_at: &str| {
        let k_at = g.op_c("mul", kb, TILE_K.into());
        let b_at = g.op_c("add", stage_at, a_bytes.into());
        for (ptr, rows, origin, at) in [("%a", TILE_M, &m0, stage_at), ("%b", tile_n, &n0, b_at.as_str())] {
            copy_tile(g, &tid, Operand { ptr, rows, origin, k: &k, k_at: &k_at }, &smem, at);
        }
    };
    let first_stage = g.i64(0);
    if stages == 2 {
        copy(&mut g, &first_stage, &first_stage);
        fence_and_barrier(&mut g);
    }
    let iter_args: Vec<String> = (0..registers).map(|i| format!("%acc{i} = {zero}")).collect();
    let f32s = vec!["f32"; registers].join(", ");
    let sums = "%sums";
    g.stmt(format!(
        "{sums}:{registers} = scf.for %kb_index = {lower} to {upper} step {step} iter_args({}) -> ({f32s}) {{",
        iter_args.join(", ")
    ));
    let kb = g.line("arith.index_cast %kb_index : index to i64");
    let stage_at = if stages == 1 {
        copy(&mut g, &kb, &first_stage);
        fence_and_barrier(&mut g);
        first_stage.clone()
    } else {
        let stage = g.op_c("urem", &kb, 2);
        g.op_c("mul", &stage, stage_bytes.into())
    };
    let scale = |g: &mut Lines, ptr: &str, at: &str| {
        let p = g.line(format!("llvm.getelementptr {ptr}[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
        g.line(format!("llvm.load {p} : !llvm.ptr<1> -> f32"))
    };
    let sa_block = g.op("mul", &kb, &m);
    let sa_rows = g.op("add", &sa_block, &m0);
    let [sa0, sa1] = [&row0, &row1].map(|r| {
        let at = g.op("add", &sa_rows, r);
        scale(&mut g, "%sa", &at)
    });
    let n_block = g.op_c("udiv", &n0, 128);
    let row_blocks = g.op_c("add", &k_blocks, 3);
    let row_blocks = g.op_c("udiv", &row_blocks, 4);
    let row_blocks = g.op_c("mul", &row_blocks, 4);
    let sb_row = g.op("mul", &n_block, &row_blocks);
    let sb_at = g.op("add", &sb_row, &kb);
    let sb = scale(&mut g, "%sb", &sb_at);
    let scales = [sa0, sa1].map(|s| g.line(format!("llvm.fmul {s}, {sb} : f32")));
    g.asm("wgmma.fence.sync.aligned;", 0, false, &[]);
    let registers_ptx: Vec<String> = (0..registers).map(|i| format!("${i}")).collect();
    let mut partial = vec![zero.clone(); registers];
    for step in 0..TILE_K / 32 {
        let descriptor = |g: &mut Lines, offset: u32| {
            let stage = g.op("add", &smem_at, &stage_at);
            let at = g.op_c("add", &stage, offset.into());
            let low = g.op_c("and", &at, 0x3FFFF);
            let address = g.op_c("lshr", &low, 4);
            g.op("or", &strides, &address)
        };
        // 32 bytes of K per product: two core matrices along K.
        let a = descriptor(&mut g, step * 2 * ALONG_K);
        let b = descriptor(&mut g, a_bytes + step * 2 * ALONG_K);
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
    if stages == 2 {
        // The next block (the last again at the end) into the other stage while the tensor
        // cores work: that stage's products finished before the previous block's barrier.
        let next = g.op_c("add", &kb, 1);
        let last = g.op_c("sub", &k_blocks, 1);
        let more = g.line(format!("llvm.icmp \"ult\" {next}, {k_blocks} : i64"));
        let next = g.line(format!("llvm.select {more}, {next}, {last} : i1, i64"));
        let other = g.op("sub", &stage_bytes_value, &stage_at);
        copy(&mut g, &next, &other);
    }
    // The accumulators pass through the wait so that nothing reads them before it.
    let operands: Vec<(String, &str, &str)> = partial.iter().map(|v| (v.clone(), "", "f32")).collect();
    let waited = g.asm("wgmma.wait_group.sync.aligned 0;", registers, true, &operands).expect("results");
    let block = g.fields(&waited, registers);
    let promoted: Vec<String> = block
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let scaled = g.line(format!("llvm.fmul {x}, {} : f32", scales[(i / 2) % 2]));
            g.line(format!("llvm.fadd %acc{i}, {scaled} : f32"))
        })
        .collect();
    if stages == 2 {
        fence_and_barrier(&mut g);
    } else {
        g.stmt("gpu.barrier");
    }
    g.stmt(format!("scf.yield {} : {f32s}", promoted.join(", ")));
    g.stmt("}");
    let c_row0 = g.op("add", &m0, &row0);
    let c_row1 = g.op("add", &m0, &row1);
    let c_col = g.op("add", &n0, &col);
    for i in (0..registers).step_by(2) {
        let row = if (i / 2) % 2 == 0 { &c_row0 } else { &c_row1 };
        let row_at = g.op("mul", row, &n);
        let column = g.op_c("add", &c_col, (i as u64 / 4) * 8);
        let at = g.op("add", &row_at, &column);
        let p = g.line(format!("llvm.getelementptr %c[{at}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, f32"));
        let pair = g.line("llvm.mlir.poison : vector<2xf32>");
        let [first, second] = [g.i32(0), g.i32(1)];
        let pair = g.line(format!("llvm.insertelement {sums}#{i}, {pair}[{first} : i32] : vector<2xf32>"));
        let pair = g.line(format!("llvm.insertelement {sums}#{}, {pair}[{second} : i32] : vector<2xf32>", i + 1));
        g.stmt(format!("llvm.store {pair}, {p} {{alignment = 8 : i64}} : vector<2xf32>, !llvm.ptr<1>"));
    }
    format!(
        "module attributes {{gpu.container_module}} {{\n  gpu.module @{name} [{target}] {{\n    \
         llvm.mlir.global internal @tiles() {{addr_space = 3 : i32, alignment = 1024 : i64}} : !llvm.array<{bytes} x i8>\n    \
         gpu.func @{name}(%a: !llvm.ptr<1>, %b: !llvm.ptr<1>, %sa: !llvm.ptr<1>, %sb: !llvm.ptr<1>, %c: !llvm.ptr<1>, \
         %m: i32, %n: i32, %k: i32) kernel attributes {{known_block_size = array<i32: 128, 1, 1>}} {{\n{body}      \
         gpu.return\n    }}\n  }}\n}}\n",
        target = super::emit::TARGET,
        bytes = stages * (a_bytes + b_bytes),
        body = g.0.text
    )
}

/// Rows `origin..origin + rows` of operand `ptr` ([_, k] bytes), bytes `k_at..k_at + 128` of
/// each.
struct Operand<'s> {
    ptr: &'s str,
    rows: u32,
    origin: &'s str,
    k: &'s str,
    k_at: &'s str,
}

/// Copies a tile of an operand into shared memory at `offset` in the core-matrix layout; each
/// of the 128 threads (`tid`) moves 16 bytes at a time, a row's 8 chunks on 8 consecutive
/// threads (coalesced).
fn copy_tile(g: &mut Lines, tid: &str, Operand { ptr, rows, origin, k, k_at }: Operand, smem: &str, offset: &str) {
    let chunks_per_row = u64::from(TILE_K / 16);
    for pass in 0..(rows as u64 * chunks_per_row) / 128 {
        let chunk = g.op_c("add", tid, pass * 128);
        let row = g.op_c("udiv", &chunk, chunks_per_row);
        let piece = g.op_c("urem", &chunk, chunks_per_row);
        let global_row = g.op("add", origin, &row);
        let row_at = g.op("mul", &global_row, k);
        let piece_at = g.op_c("mul", &piece, 16);
        let within = g.op("add", k_at, &piece_at);
        let from = g.op("add", &row_at, &within);
        let p = g.line(format!("llvm.getelementptr {ptr}[{from}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, i8"));
        let bytes = g.line(format!("llvm.load {p} {{alignment = 16 : i64}} : !llvm.ptr<1> -> vector<4xi32>"));
        let group = g.op_c("udiv", &row, 8);
        let groups_at = g.op_c("mul", &group, ALONG_MN.into());
        let pieces_at = g.op_c("mul", &piece, ALONG_K.into());
        let in_group = g.op_c("urem", &row, 8);
        let line_at = g.op_c("mul", &in_group, 16);
        let to = g.op("add", &groups_at, &pieces_at);
        let to = g.op("add", &to, &line_at);
        let to = g.op("add", &to, offset);
        let q = g.line(format!("llvm.getelementptr {smem}[{to}] : (!llvm.ptr<3>, i64) -> !llvm.ptr<3>, i8"));
        g.stmt(format!("llvm.store {bytes}, {q} {{alignment = 16 : i64}} : vector<4xi32>, !llvm.ptr<3>"));
    }
}

#[cfg(all(test, feature = "mlir"))]
mod tests {
    use super::*;

    /// The kernel lowers through MLIR's pipeline to PTX with Hopper's FP8 `wgmma`, and, where
    /// `DSC_PTXAS` names ptxas, assembles for sm_90a without spilling registers.
    #[test]
    fn the_fp8_gemm_lowers_to_wgmma_and_assembles() {
        for (tile_n, stages) in [(64, 1), (128, 1), (128, 2)] {
            let mlir = fp8_gemm("fp8_gemm", tile_n, stages);
            let ptx = crate::mlir::lower::Lowering::default().ptx(&mlir, false).expect("lowers");
            let wgmma = format!("wgmma.mma_async.sync.aligned.m64n{tile_n}k32.f32.e4m3.e4m3");
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
