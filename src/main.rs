//! The `dsc` command line: argument parsing, calling the crates, printing. No logic of its
//! own lives here beyond choosing what to print and the exit code.

mod cli;
mod data;
mod hf;
mod inspect;
mod train;
mod tune;

use clap::Parser;
use cli::{Cli, Command, EmitStage, ErrorFormat, InfoFormat, SpecArgs};
use dsc_compiler::graph::{Numerics, TrainingGraph};
use dsc_compiler::parallel::schedule::{GenerateError, Schedule};
use dsc_compiler::parallel::simulate::{self, SimulateError};
use dsc_lang::diagnostics::{render_json, render_text, Code, Diagnostic, Sources};
use dsc_lang::{Loaded, Spec};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

/// A closed stdout (`dsc inspect PLAN --kernel K | head`) ends a command that only prints,
/// quietly and with the shell's code for SIGPIPE, as Unix tools do. `train` keeps Rust's
/// default, where a broken pipe is an error it reports: a peer's closed socket must not end it.
fn exit_on_closed_stdout() {
    // SAFETY: the action only calls `low_level::exit`, which is async-signal-safe.
    let registered =
        unsafe { signal_hook::low_level::register(signal_hook::consts::SIGPIPE, || signal_hook::low_level::exit(141)) };
    if let Err(e) = registered {
        tracing::debug!("SIGPIPE left as it was: {e}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    if !matches!(cli.command, Command::Train(_)) {
        exit_on_closed_stdout();
    }
    let result = match &cli.command {
        Command::Check { spec } => check(&cli, spec),
        Command::Fmt { spec, check } => fmt(&cli, spec, *check),
        Command::Info { spec, format } => info(&cli, spec, *format),
        Command::Compile { spec, emit, output, print_ir_after_all } => {
            compile(&cli, spec, *emit, output.as_deref(), *print_ir_after_all)
        }
        Command::Simulate { spec, format, timeline } => simulate(&cli, spec, *format, timeline.as_deref()),
        Command::Inspect { plan, kernel, format } => inspect::run(plan, kernel.as_deref(), *format),
        Command::Train(args) => train::run(&cli, args),
        Command::Tune { plan, repeats } => tune::run(plan, *repeats as usize),
        // issue 6 commands
        Command::Import { hf, output, name, config_only } => {
            hf::import(&cli, hf, output, name.as_deref(), *config_only)
        }
        Command::Forward { checkpoint, tokens, output } => hf::forward(checkpoint, tokens, output),
        Command::Export { checkpoint, hf, ema } => hf::export(checkpoint, hf, *ema),
        Command::Data { command } => data::run(command),
        Command::Plot { metrics, output } => data::plot(metrics, output),
        // end issue 6 commands
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads and checks a spec, printing its diagnostics; `None` if it has errors.
fn load(cli: &Cli, args: &SpecArgs) -> Option<(Loaded, Spec)> {
    tracing::debug!(file = %args.file.display(), overrides = args.set.len(), "loading spec");
    let mut loaded = dsc_lang::load(&args.file, &args.set);
    if let Some(spec) = loaded.checked_spec() {
        let warning = memory_warnings(spec);
        loaded.diagnostics.extend(warning);
    }
    report(cli, &loaded);
    let spec = loaded.checked_spec()?.clone();
    Some((loaded, spec))
}

/// One warning naming the pipeline ranks whose estimated memory exceeds the GPU's.
fn memory_warnings(spec: &Spec) -> Option<Diagnostic> {
    let info = dsc_compiler::estimate::info(spec);
    let over: Vec<_> = info.memory.iter().filter(|rank| !rank.fits).collect();
    let worst = over.iter().map(|rank| rank.bytes).max()?;
    let ranks: Vec<String> = over.iter().map(|rank| rank.stage.to_string()).collect();
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    Some(
        Diagnostic::warning(
            Code::Memory,
            format!(
                "pipeline rank{} {} need{} up to {:.1} GiB, more than the {:.1} GiB of one {}",
                if ranks.len() == 1 { "" } else { "s" },
                ranks.join(", "),
                if ranks.len() == 1 { "s" } else { "" },
                gib(worst),
                gib(spec.parallel.gpu.memory_bytes),
                spec.parallel.gpu.name
            ),
        )
        .with_help("`dsc info` shows the breakdown; recompute more, lower micro_batch or use more stages"),
    )
}

fn report(cli: &Cli, loaded: &Loaded) {
    render(cli, &loaded.sources, &loaded.diagnostics);
}

fn render(cli: &Cli, sources: &Sources, diagnostics: &[Diagnostic]) {
    if diagnostics.is_empty() {
        return;
    }
    let text = match cli.error_format {
        ErrorFormat::Json => render_json(sources, diagnostics),
        ErrorFormat::Human => render_text(sources, diagnostics, cli.color.enabled(std::io::stderr().is_terminal())),
    };
    eprint!("{text}");
    if cli.error_format == ErrorFormat::Human {
        let errors = diagnostics.iter().filter(|d| d.is_error()).count();
        if errors > 0 {
            let plural = if errors == 1 { "" } else { "s" };
            eprintln!("error: {errors} error{plural} in the spec");
        }
    }
}

fn check(cli: &Cli, args: &SpecArgs) -> anyhow::Result<ExitCode> {
    let Some((_, spec)) = load(cli, args) else {
        return Ok(ExitCode::FAILURE);
    };
    eprintln!("{}: `{}` is consistent", args.file.display(), spec.model.name);
    Ok(ExitCode::SUCCESS)
}

fn fmt(cli: &Cli, args: &SpecArgs, check_only: bool) -> anyhow::Result<ExitCode> {
    let loaded = dsc_lang::load(&args.file, &args.set);
    let Some(tree) = loaded
        .syntax
        .as_ref()
        .filter(|_| !loaded.diagnostics.iter().any(|d| d.code == Code::Syntax || d.code == Code::Input))
    else {
        report(cli, &loaded);
        return Ok(ExitCode::FAILURE);
    };
    let source = loaded.sources.text(0);
    let formatted = dsc_lang::format::format_file(tree, source);
    if check_only {
        if formatted != source {
            eprintln!("{} is not formatted: run `dsc fmt {0}`", args.file.display());
            return Ok(ExitCode::FAILURE);
        }
        return Ok(ExitCode::SUCCESS);
    }
    std::io::stdout().write_all(formatted.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn info(cli: &Cli, args: &SpecArgs, format: InfoFormat) -> anyhow::Result<ExitCode> {
    let Some((_, spec)) = load(cli, args) else {
        return Ok(ExitCode::FAILURE);
    };
    let info = dsc_compiler::estimate::info(&spec);
    match format {
        InfoFormat::Text => print!("{info}"),
        InfoFormat::Json => println!("{}", serde_json::to_string_pretty(&info)?),
    }
    Ok(ExitCode::SUCCESS)
}

/// The spec's pipeline schedule, or its absence reported as a diagnostic at the pipeline.
fn schedule(cli: &Cli, loaded: &Loaded, spec: &Spec) -> Option<Schedule> {
    simulate::schedule_of(spec).map_err(|e| no_schedule(cli, loaded, &e)).ok()
}

/// Reports that no schedule of the spec's kind fits its sizes (the spec itself checked).
fn no_schedule(cli: &Cli, loaded: &Loaded, error: &GenerateError) {
    let mut diagnostic = Diagnostic::error(Code::Pipeline, format!("no pipeline schedule: {error}"))
        .with_help("change the stages, the batch or `micro_batch`, or pick another schedule");
    if let Some(&span) = loaded.spans.get("parallel.pipeline") {
        diagnostic = diagnostic.with_label(span, "this pipeline");
    }
    render(cli, &loaded.sources, &[diagnostic]);
}

fn simulate(
    cli: &Cli,
    args: &SpecArgs,
    format: InfoFormat,
    timeline: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let Some((loaded, spec)) = load(cli, args) else { return Ok(ExitCode::FAILURE) };
    let cluster = dsc_compiler::parallel::cost::Cluster::of(&spec.parallel);
    let (schedule, run, simulation) = match simulate::simulate(&spec, &cluster) {
        Ok(simulated) => simulated,
        Err(SimulateError::Generate(e)) => {
            no_schedule(cli, &loaded, &e);
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => anyhow::bail!("{e}"),
    };
    if let Some(path) = timeline {
        let svg = dsc_compiler::parallel::timeline::svg(&schedule, &run);
        std::fs::write(path, svg).map_err(|e| anyhow::anyhow!("cannot write `{}`: {e}", path.display()))?;
    }
    match format {
        InfoFormat::Text => print!("{simulation}"),
        InfoFormat::Json => println!("{}", serde_json::to_string_pretty(&simulation)?),
    }
    Ok(ExitCode::SUCCESS)
}

/// Lowers every generated kernel of the plan to `kernels/NAME.ptx`, on every core (one MLIR
/// context per thread; one thread when the IR after each pass is printed); returns how many.
#[cfg(feature = "mlir")]
fn write_ptx(plan: &dsc_compiler::plan::Plan, dir: &std::path::Path, print_ir: bool) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir.join("kernels"))?;
    let kernels = plan.kernel_mlir();
    let threads = if print_ir { 1 } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let kernels = &kernels;
                scope.spawn(move || -> anyhow::Result<()> {
                    let lowering = dsc_compiler::mlir::lower::Lowering::default();
                    for (name, mlir) in kernels.iter().skip(t).step_by(threads) {
                        let ptx = lowering.ptx(mlir, print_ir).map_err(|e| {
                            anyhow::anyhow!("kernel `{name}`: {e} (a compiler bug: please report it with the spec)")
                        })?;
                        std::fs::write(dir.join("kernels").join(format!("{name}.ptx")), ptx)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("a lowering thread panicked"))
    })?;
    dsc_compiler::plan::remove_stale(&dir.join("kernels"), "ptx", kernels.iter().map(|(name, _)| name.as_str()))?;
    Ok(kernels.len())
}

/// Without MLIR, plans carry their kernels' MLIR but no PTX.
#[cfg(not(feature = "mlir"))]
fn write_ptx(_: &dsc_compiler::plan::Plan, _: &std::path::Path, _: bool) -> anyhow::Result<usize> {
    eprintln!("note: this dsc was built without MLIR (`--features mlir`): the plan has no PTX");
    Ok(0)
}

fn compile(
    cli: &Cli,
    args: &SpecArgs,
    emit: Option<EmitStage>,
    output: Option<&std::path::Path>,
    print_ir: bool,
) -> anyhow::Result<ExitCode> {
    let Some((loaded, spec)) = load(cli, args) else { return Ok(ExitCode::FAILURE) };
    let Some(emit) = emit else {
        let Some(dir) = output else {
            eprintln!("error: say where the plan goes (`-o DIR`), or which stage to print (`--emit=spec|graph|graph-stats|fused|schedule`)");
            return Ok(ExitCode::FAILURE);
        };
        let plan = dsc_compiler::plan::compile(&spec, dsc_compiler::fuse::Limits::default());
        plan.write(dir).map_err(|e| anyhow::anyhow!("cannot write the plan to `{}`: {e}", dir.display()))?;
        let ptx = write_ptx(&plan, dir, print_ir)?;
        let s = &plan.summary;
        eprintln!(
            "wrote {}: {} kernels ({ptx} generated as PTX), {} launches per step ({} unfused)",
            dir.display(),
            plan.functions.iter().map(|f| f.kernels.len()).sum::<usize>(),
            s.launches_per_step,
            s.launches_per_step_unfused
        );
        return Ok(ExitCode::SUCCESS);
    };
    let text = match emit {
        EmitStage::Spec => serde_json::to_string_pretty(&spec)? + "\n",
        EmitStage::Graph => dsc_compiler::graph::print::module(TrainingGraph::build(&spec, Numerics::Policy).module()),
        EmitStage::GraphStats => {
            serde_json::to_string_pretty(&TrainingGraph::build(&spec, Numerics::Policy).stats())? + "\n"
        }
        EmitStage::Fused => {
            let graph = TrainingGraph::build(&spec, Numerics::Policy);
            let (fused, _) = dsc_compiler::fuse::fuse_module(graph.module(), dsc_compiler::fuse::Limits::default());
            dsc_compiler::graph::print::module(&fused)
        }
        EmitStage::Schedule => {
            let Some(schedule) = schedule(cli, &loaded, &spec) else { return Ok(ExitCode::FAILURE) };
            let stages = dsc_compiler::parallel::split(&spec);
            dsc_compiler::parallel::chunks::describe(&spec.model, &stages) + &schedule.to_string()
        }
    };
    match output {
        Some(path) => {
            std::fs::write(path, text).map_err(|e| anyhow::anyhow!("cannot write `{}`: {e}", path.display()))?
        }
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(ExitCode::SUCCESS)
}
