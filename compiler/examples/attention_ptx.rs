//! Writes the generated fused attention (`compiler::mlir::attention`) as PTX for each head
//! shape given as `QKxV` (MLA's: 192x128): the forward to `DIR/attention_fwd_qk{QK}_v{V}.ptx`
//! and the three backward passes to `DIR/attention_bwd_{dq,dk,dv}_qk{QK}_v{V}.ptx` (entries of
//! the same names), for `benches/attention.py` on the GPU machine.
//!
//! Usage: cargo run --release -p dsc-compiler --features mlir --example attention_ptx -- DIR 192x128

use dsc_compiler::mlir::{attention, lower::Lowering};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((dir, shapes)) = args.split_first().filter(|(_, shapes)| !shapes.is_empty()) else {
        eprintln!("usage: attention_ptx DIR QKxV... (e.g. 192x128)");
        return ExitCode::from(2);
    };
    for given in shapes {
        let heads = match given.split_once('x').map(|(qk, v)| (qk.parse(), v.parse())) {
            Some((Ok(qk), Ok(v))) => attention::Heads { qk, v }.check(),
            _ => Err(format!("`{given}` is not QKxV")),
        };
        let heads = match heads {
            Ok(heads) => heads,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        };
        let shape = format!("qk{}_v{}", heads.qk, heads.v);
        let forward =
            (format!("attention_fwd_{shape}"), attention::attention_forward(&format!("attention_fwd_{shape}"), heads));
        let backward = attention::Pass::ALL.map(|pass| {
            let name = format!("attention_bwd_{}_{shape}", pass.label());
            let mlir = attention::attention_backward(&name, heads, pass);
            (name, mlir)
        });
        for (name, mlir) in std::iter::once(forward).chain(backward) {
            let written = Lowering::default()
                .ptx(&mlir, false)
                .and_then(|ptx| std::fs::write(format!("{dir}/{name}.ptx"), ptx).map_err(|e| format!("{dir}: {e}")));
            if let Err(e) = written {
                eprintln!("{name}: {e}");
                return ExitCode::FAILURE;
            }
            eprintln!("wrote {dir}/{name}.ptx");
        }
    }
    ExitCode::SUCCESS
}
