//! Writes the generated FP8 GEMM (`compiler::mlir::gemm`) as PTX for each variant given as
//! `TILE_N:STAGES` (tile width, shared-memory stages), to `DIR/fp8_gemm_s{stages}_n{tile}.ptx`
//! (entry of the same name), for `benches/fp8_gemm.py --generated` on the GPU machine.
//!
//! Usage: cargo run --release -p dsc-compiler --features mlir --example fp8_gemm_ptx -- DIR 128:2...

use dsc_compiler::mlir::{gemm, lower::Lowering};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((dir, tiles)) = args.split_first().filter(|(_, tiles)| !tiles.is_empty()) else {
        eprintln!("usage: fp8_gemm_ptx DIR TILE_N:STAGES... (e.g. 128:2)");
        return ExitCode::from(2);
    };
    let lowering = Lowering::default();
    for tile in tiles {
        let variant = tile.split_once(':').and_then(|(n, s)| Some((n.parse::<u32>().ok()?, s.parse::<u32>().ok()?)));
        let Some((tile_n, stages)) = variant
            .filter(|&(n, s)| gemm::TILE_WIDTHS.contains(&n) && matches!(s, 1 | 2) && s * (64 + n) * 128 <= 48 << 10)
        else {
            eprintln!("`{tile}` is not TILE_N:STAGES (16, 32, 64 or 128; 1 or 2 stages; 48 KB of tiles at most)");
            return ExitCode::from(2);
        };
        let name = format!("fp8_gemm_s{stages}_n{tile_n}");
        let written = lowering
            .ptx(&gemm::fp8_gemm(&name, tile_n, stages), false)
            .and_then(|ptx| std::fs::write(format!("{dir}/{name}.ptx"), ptx).map_err(|e| format!("{dir}: {e}")));
        if let Err(e) = written {
            eprintln!("{name}: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!("wrote {dir}/{name}.ptx");
    }
    ExitCode::SUCCESS
}
