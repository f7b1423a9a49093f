//! Writes the hand-scheduled generated kernels as PTX into `DIR`, for the GPU machine's
//! benchmarks, each given as
//! - `MxNxSTAGES[xCLUSTER]` or `gMxNxSTAGES[xCLUSTER]`: the FP8 GEMM (`compiler::mlir::gemm`),
//!   dense or the experts' grouped form, to `fp8_gemm_m{M}_n{N}_s{STAGES}[_c{CLUSTER}].ptx` or
//!   `fp8_grouped_…` (`benches/fp8_gemm.py --generated`);
//! - `attention:QKxV` or `attention:bf16:QKxV`: the fused attention
//!   (`compiler::mlir::attention`) for those head dims, Q, K and V read as f32 or packed
//!   BF16, the forward to `attention_fwd_[bf16_]qk{QK}_v{V}.ptx` and the backward's passes to
//!   `attention_bwd_{dq,dkv}_[bf16_]qk{QK}_v{V}.ptx` (`benches/attention.py`).
//!
//! Each file's entry has its name, and its first line says how to launch it (what the
//! runtime gives the kernel: `Tile::threads` and `Tile::shared_bytes`, or the attention's
//! `Heads::threads` and its pass's shared bytes), for the benchmarks to read rather than
//! work out: `// dsc launch: threads T, shared bytes S`.
//!
//! Usage: cargo run --release -p dsc-compiler --features mlir --example kernel_ptx -- DIR 128x128x4 g128x128x4 attention:192x128

use dsc_compiler::mlir::{attention, gemm, lower::Lowering};
use std::process::ExitCode;

const USAGE: &str = "usage: kernel_ptx DIR KERNEL... where KERNEL is [g]MxNxSTAGES[xCLUSTER] (an FP8 GEMM tile, \
                     g for the grouped form, e.g. 128x192x4x2) or attention:[bf16:]QKxV (e.g. attention:bf16:192x128)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((dir, given)) = args.split_first().filter(|(_, given)| !given.is_empty()) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let lowering = Lowering::default();
    for one in given {
        let kernels = match kernels(one) {
            Ok(kernels) => kernels,
            Err(e) => {
                eprintln!("{e}\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        for Kernel { name, mlir, threads, shared } in kernels {
            let written = lowering.ptx(&mlir, false).and_then(|ptx| {
                let text = format!("// dsc launch: threads {threads}, shared bytes {shared}\n{ptx}");
                std::fs::write(format!("{dir}/{name}.ptx"), text).map_err(|e| format!("{dir}: {e}"))
            });
            if let Err(e) = written {
                eprintln!("{name}: {e}");
                return ExitCode::FAILURE;
            }
            eprintln!("wrote {dir}/{name}.ptx");
        }
    }
    ExitCode::SUCCESS
}

/// A kernel to write: its entry's name, its MLIR and how it is launched (threads a block,
/// dynamic shared bytes).
struct Kernel {
    name: String,
    mlir: String,
    threads: u32,
    shared: u32,
}

/// The kernels `given` names.
fn kernels(given: &str) -> Result<Vec<Kernel>, String> {
    let numbers = |shape: &str| -> Vec<u32> { shape.split('x').map(|x| x.parse().unwrap_or(0)).collect() };
    if let Some(shape) = given.strip_prefix("attention:") {
        let (bf16_inputs, shape) = shape.strip_prefix("bf16:").map_or((false, shape), |shape| (true, shape));
        let [qk, v] = numbers(shape)[..] else { return Err(format!("`{given}` is not attention:[bf16:]QKxV")) };
        let heads = attention::Heads { qk, v, bf16_inputs }.check()?;
        let kernels = attention::LAUNCHES.map(|pass| {
            let (name, mlir) = attention::kernel(heads, pass);
            Kernel { name, mlir, threads: heads.threads(), shared: heads.launch_shared_bytes(pass) }
        });
        return Ok(kernels.into());
    }
    let (form, shape) = match given.strip_prefix('g') {
        Some(shape) => (gemm::Form::Grouped, shape),
        None => (gemm::Form::Dense, given),
    };
    let tile = match numbers(shape)[..] {
        [m, n, stages] => gemm::Tile { m, n, stages, cluster: 1 },
        [m, n, stages, cluster] => gemm::Tile { m, n, stages, cluster },
        _ => return Err(format!("`{given}` is not [g]MxNxSTAGES[xCLUSTER]")),
    }
    .check(form)?;
    let name = tile.name(form);
    let mlir = gemm::fp8_gemm(&name, tile, form);
    Ok(vec![Kernel { name, mlir, threads: tile.threads(), shared: tile.shared_bytes(form) }])
}
