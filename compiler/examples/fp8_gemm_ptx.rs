//! Writes the generated FP8 GEMM (`compiler::mlir::gemm`) as PTX for each tile given as
//! `MxNxSTAGES[xCLUSTER]` (dense) or `gMxNxSTAGES[xCLUSTER]` (the experts' grouped form), to
//! `DIR/fp8_gemm_m{M}_n{N}_s{STAGES}[_c{CLUSTER}].ptx` or `DIR/fp8_grouped_…` (entry of the
//! same name), for `benches/fp8_gemm.py --generated` on the GPU machine.
//!
//! Usage: cargo run --release -p dsc-compiler --features mlir --example fp8_gemm_ptx -- DIR 128x128x4 g128x128x4...

use dsc_compiler::mlir::{gemm, lower::Lowering};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((dir, tiles)) = args.split_first().filter(|(_, tiles)| !tiles.is_empty()) else {
        eprintln!(
            "usage: fp8_gemm_ptx DIR [g]MxNxSTAGES[xCLUSTER]... (e.g. 128x128x4, g128x128x4 for the grouped form, \
             128x192x4x2 in clusters of two)"
        );
        return ExitCode::from(2);
    };
    let lowering = Lowering::default();
    for given in tiles {
        let (form, kind, shape) = match given.strip_prefix('g') {
            Some(shape) => (gemm::Form::Grouped, "grouped", shape),
            None => (gemm::Form::Dense, "gemm", given.as_str()),
        };
        let numbers: Vec<u32> = shape.split('x').filter_map(|x| x.parse().ok()).collect();
        let tile = match numbers[..] {
            [m, n, stages] => gemm::Tile { m, n, stages, cluster: 1 }.check(),
            [m, n, stages, cluster] => gemm::Tile { m, n, stages, cluster }.check(),
            _ => Err(format!("`{given}` is not [g]MxNxSTAGES[xCLUSTER]")),
        };
        let tile = match tile {
            Ok(tile) => tile,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        };
        let clusters = if tile.cluster > 1 { format!("_c{}", tile.cluster) } else { String::new() };
        let name = format!("fp8_{kind}_m{}_n{}_s{}{clusters}", tile.m, tile.n, tile.stages);
        let written = lowering
            .ptx(&gemm::fp8_gemm(&name, tile, form), false)
            .and_then(|ptx| std::fs::write(format!("{dir}/{name}.ptx"), ptx).map_err(|e| format!("{dir}: {e}")));
        if let Err(e) = written {
            eprintln!("{name}: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!("wrote {dir}/{name}.ptx");
    }
    ExitCode::SUCCESS
}
