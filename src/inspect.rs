//! `dsc inspect PLAN`: a compiled plan read back and summarised for people (kernels, fused
//! ops, launches, bytes and estimated time per step, fused against unfused, the GPU memory a
//! step takes on the CUDA backend, the tiles its tuning chose) or as JSON.

use crate::cli::InfoFormat;
use dsc_compiler::fuse::kernels::{Code, Kernel, KernelKind};
use dsc_compiler::graph::Function;
use dsc_compiler::plan::tuning::Tuning;
use dsc_compiler::plan::Plan;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

pub fn run(dir: &Path, kernel: Option<&str>, format: InfoFormat) -> anyhow::Result<ExitCode> {
    let plan = match Plan::read(dir) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Some(name) = kernel {
        let Some((function, k)) =
            plan.functions.iter().find_map(|f| f.kernels.iter().find(|k| k.name == name).map(|k| (f, k)))
        else {
            if plan.carried_kernels().iter().any(|(carried, _)| carried == name) {
                println!(
                    "kernel {name}: hand-scheduled by the compiler, carried by the plan for the backend's launcher"
                );
                print_code(dir, name);
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("error: no kernel `{name}` in {} (`dsc inspect {}` lists them)", dir.display(), dir.display());
            return Ok(ExitCode::FAILURE);
        };
        match format {
            InfoFormat::Json => println!("{}", serde_json::to_string_pretty(k)?),
            InfoFormat::Text => print_kernel(&plan, dir, &function.name, k),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let tuning = match Tuning::read(dir) {
        Ok(tuning) => tuning,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    match format {
        InfoFormat::Json => println!("{}", serde_json::to_string_pretty(&summary_json(&plan, tuning.as_ref()))?),
        InfoFormat::Text => print_summary(&plan, tuning.as_ref()),
    }
    Ok(ExitCode::SUCCESS)
}

fn summary_json(plan: &Plan, tuning: Option<&Tuning>) -> serde_json::Value {
    let layouts = dsc_runtime::memory::layouts(plan);
    let functions: Vec<serde_json::Value> = plan
        .functions
        .iter()
        .zip(&layouts)
        .map(|(f, memory)| {
            serde_json::json!({
                "name": f.name,
                "kernels": f.kernels.iter().map(|k| serde_json::json!({
                    "name": k.name, "kind": k.kind, "ops": k.ops, "bytes": k.bytes, "flops": k.flops, "seconds": k.seconds,
                })).collect::<Vec<_>>(),
                "fusion": f.fusion,
                "memory": { "peak": memory.peak, "total": memory.total },
            })
        })
        .collect();
    let gpu = dsc_runtime::memory::step_memory(plan, &layouts);
    let gpu_memory = serde_json::json!({
        "state": gpu.state, "weights": gpu.weights, "gradients": gpu.gradients, "optimizer": gpu.optimizer,
        "peak": gpu.peak(), "kept": gpu.kept(),
    });
    serde_json::json!({
        "model": plan.spec.model.name, "version": plan.version, "summary": plan.summary,
        "gpu_memory": gpu_memory, "functions": functions, "tuning": tuning,
    })
}

fn print_summary(plan: &Plan, tuning: Option<&Tuning>) {
    let s = &plan.summary;
    println!("plan for {} (format {}, dsc {})", plan.spec.model.name, plan.version, plan.dsc_version);
    println!("per step ({} micro-batches + optimizer)       fused      unfused", s.micro_batches_per_step);
    println!(
        "  kernel launches                  {:>12} {:>12}  ({:.2}×)",
        s.launches_per_step,
        s.launches_per_step_unfused,
        ratio(s.launches_per_step_unfused as f64, s.launches_per_step as f64)
    );
    println!(
        "  bytes moved (estimate)           {:>12} {:>12}  ({:.2}×)",
        bytes(s.bytes_per_step),
        bytes(s.bytes_per_step_unfused),
        ratio(s.bytes_per_step_unfused as f64, s.bytes_per_step as f64)
    );
    println!("  roofline time (estimate)         {:>11.3}s {:>11.3}s", s.seconds_per_step, s.seconds_per_step_unfused);
    let layouts = dsc_runtime::memory::layouts(plan);
    let gpu = dsc_runtime::memory::step_memory(plan, &layouts);
    println!(
        "  GPU memory (CUDA backend)    {} = state {} (parameters, gradients, Adam moments) + FP8 weights {} + the larger of the gradient calls' arenas {} and the optimizer's {}; {} with every arena kept between steps where the GPU has room",
        bytes(gpu.peak()),
        bytes(gpu.state),
        bytes(gpu.weights),
        bytes(gpu.gradients),
        bytes(gpu.optimizer),
        bytes(gpu.kept())
    );
    println!();
    println!(
        "{:<16} {:>7} {:>8} {:>9}  {:>21}  {:<22} fused ops",
        "function", "kernels", "gemms", "nodes", "memory (reused/all)", "saturation"
    );
    for (f, memory) in plan.functions.iter().zip(&layouts) {
        let gemms = f.kernels.iter().filter(|k| k.kind == KernelKind::LibraryGemm).count();
        let fused: Vec<String> = f.fusion.fused.iter().map(|(op, n)| format!("{op}×{n}")).collect();
        // Buffers placed by lifetime in one arena (a function's arguments read where
        // they are), against each allocated on its own.
        println!(
            "{:<16} {:>7} {:>8} {:>4}→{:<4}  {:>21}  {:<22} {}",
            f.name,
            f.kernels.len(),
            gemms,
            f.fusion.nodes_before,
            f.fusion.nodes_after,
            format!("{}/{}", bytes(memory.peak), bytes(memory.total)),
            f.fusion.stop_reason,
            fused.join(" ")
        );
    }
    println!();
    let all: Vec<(&Function, &Kernel)> = plan
        .module
        .functions
        .iter()
        .zip(&plan.functions)
        .flat_map(|(f, pf)| pf.kernels.iter().map(move |k| (f, k)))
        .collect();
    let generated = all.iter().filter(|(_, k)| matches!(k.code, Code::Generated { .. })).count();
    let library = |kind| all.iter().filter(|(_, k)| matches!(k.code, Code::Library) && k.kind == kind).count();
    let (gemms, attention) = (library(KernelKind::LibraryGemm), library(KernelKind::Attention));
    // An expert-parallel stage's all-to-alls run on the host, through the group's transport.
    let exchanges = all.iter().filter(|(f, k)| matches!(k.code, Code::NotGenerated { .. }) && k.is_exchange(f)).count();
    println!(
        "{} kernels: {generated} generated (MLIR → PTX), {gemms} library GEMMs, {attention} on the fused attention kernels, {exchanges} all-to-alls between expert-parallel ranks, {} not generated yet. `dsc inspect DIR --kernel NAME` shows one.",
        all.len(),
        all.len() - generated - gemms - attention - exchanges
    );
    let carried: Vec<String> = plan.carried_kernels().into_iter().map(|(name, _)| name).collect();
    if !carried.is_empty() {
        println!("hand-scheduled kernels carried for the backend: {}", carried.join(", "));
    }
    match tuning {
        Some(t) => {
            let mut tiles: BTreeMap<&str, usize> = BTreeMap::new();
            t.gemms.iter().for_each(|g| *tiles.entry(g.chosen.as_str()).or_default() += 1);
            let chosen: Vec<String> = tiles.iter().map(|(tile, n)| format!("{tile} ×{n}")).collect();
            println!("tuned on {} (`dsc tune`): {} GEMM kernels on {}", t.gpu, t.gemms.len(), chosen.join(", "));
        }
        None if !plan.generated_gemms().is_empty() => println!(
            "untuned: the experts' GEMMs on their first tiles, dense FP8 GEMMs on cuBLASLt (`dsc tune DIR` on a GPU measures every tile)"
        ),
        None => {}
    }
}

fn print_kernel(plan: &Plan, dir: &Path, function: &str, k: &Kernel) {
    let f = plan.module.functions.iter().find(|f| f.name == function).expect("kernels belong to functions");
    println!("kernel {} in {function} ({:?})", k.name, k.kind);
    println!("  estimate: {} moved, {} FLOP, {:.2} µs", bytes(k.bytes), k.flops, k.seconds * 1e6);
    let show = |v: u32| {
        let n = &f.nodes[v as usize];
        format!("%{v}: {}{:?}", n.dtype, n.shape)
    };
    println!("  inputs:  {}", k.inputs.iter().map(|&v| show(v)).collect::<Vec<_>>().join(", "));
    println!("  outputs: {}", k.outputs.iter().map(|&v| show(v)).collect::<Vec<_>>().join(", "));
    println!("  ops:");
    for &v in &k.nodes {
        let n = &f.nodes[v as usize];
        let args: Vec<String> = n.args.iter().map(|a| format!("%{}", a.0)).collect();
        println!("    %{v} = {}({}) : {}{:?}", n.op.name(), args.join(", "), n.dtype, n.shape);
    }
    match &k.code {
        Code::Generated { grid, block, .. } => {
            println!("  launch: {grid} blocks × {block} threads");
            print_code(dir, &k.name);
        }
        Code::Library if k.kind == KernelKind::Attention => {
            let heads = plan.attention_heads().expect("a plan with attention kernels carries them");
            let names = dsc_compiler::mlir::attention::LAUNCHES
                .map(|pass| dsc_compiler::mlir::attention::kernel_name(heads, pass));
            println!("  runs on the fused attention kernels (`--kernel NAME` shows each): {}", names.join(", "));
        }
        Code::Library => println!("  runs in a library GEMM"),
        Code::NotGenerated { reason } => println!("  not generated yet: {reason}"),
        Code::Unassigned => {}
    }
}

/// Kernel `name`'s MLIR (`ir/`) and PTX (`kernels/`) in the plan directory.
fn print_code(dir: &Path, name: &str) {
    for (what, path) in [
        ("MLIR", dir.join("ir").join(format!("{name}.mlir"))),
        ("PTX", dir.join("kernels").join(format!("{name}.ptx"))),
    ] {
        match std::fs::read_to_string(&path) {
            Ok(text) => println!("\n{what} ({}):\n{text}", path.display()),
            Err(_) => println!("\n{what}: not in the plan (`{}` is missing)", path.display()),
        }
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn bytes(b: u64) -> String {
    let b = b as f64;
    match b {
        x if x >= 1e12 => format!("{:.2} TB", x / 1e12),
        x if x >= 1e9 => format!("{:.2} GB", x / 1e9),
        x if x >= 1e6 => format!("{:.2} MB", x / 1e6),
        x => format!("{:.0} kB", x / 1e3),
    }
}
