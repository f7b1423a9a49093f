//! `dsc tune PLAN`: measures the plan's FP8 GEMMs that generated tiles can run (dense Fprop and
//! Dgrad, the experts' products and weight gradients) on this GPU, each on every tile the plan
//! carries and on cuBLASLt, prints what each took and writes the fastest right choices to
//! `PLAN/tuning.json`, which `dsc train --plan PLAN` then runs (`dsc_runtime::cuda::tune`).

use std::path::Path;
use std::process::ExitCode;

#[cfg(feature = "cuda")]
pub fn run(dir: &Path, repeats: usize) -> anyhow::Result<ExitCode> {
    use dsc_compiler::plan::tuning::LIBRARY;
    use dsc_compiler::plan::Plan;
    use dsc_runtime::cuda::{tune, Gpu};
    let plan = Plan::read(dir)?;
    let gpu = Gpu::open()?;
    println!("tuning `{}` on {} (median of {repeats} launches after a first)", dir.display(), gpu.name()?);
    let tuning = tune::tune(&plan, dir, &gpu, repeats, |gemm| {
        let [rows, n, k, experts] = gemm.shape;
        let of = if experts > 1 { format!(", {experts} experts") } else { String::new() };
        println!("{} ({rows}×{n}, K {k}{of}):", gemm.kernel);
        let library = gemm.measured.iter().find(|m| m.candidate == LIBRARY).map(|m| m.micros);
        for m in &gemm.measured {
            let mark = if m.candidate == gemm.chosen { "  chosen" } else { "" };
            let wrong = if m.error > dsc_compiler::plan::tuning::MAX_ERROR { "  wrong" } else { "" };
            // The experts' sum has no cuBLASLt time to compare with: its reference is the first tile.
            let ratio = library.map_or("  (no cuBLASLt)".to_string(), |l| format!("{:>6.2}× cuBLASLt", l / m.micros));
            println!("  {:<28} {:>10.1} µs {ratio}  error {:.1e}{wrong}{mark}", m.candidate, m.micros, m.error);
        }
    })?;
    if tuning.gemms.is_empty() {
        println!("the plan has no FP8 GEMM to tune (an FP8 plan has)");
        return Ok(ExitCode::SUCCESS);
    }
    tuning.write(dir)?;
    println!("wrote {}", dir.join(dsc_compiler::plan::tuning::TUNING_FILE).display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "cuda"))]
pub fn run(_: &Path, _: usize) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`dsc tune` measures kernels on a GPU: this dsc was built without the `cuda` feature (build it with `--features cuda`)")
}
