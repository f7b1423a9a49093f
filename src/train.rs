//! `dsc train`: runs the trainer step by step (on thread-ranks when the spec's parallel plan
//! has several; on the GPU with a compiled plan and the `cuda` feature; when a launcher
//! (torchrun, srun, mpirun) started it, as one data-parallel process of several over NCCL with
//! a compiled plan on the GPU, or else as one rank of the plan's on the CPU over TCP), printing
//! a line per step (and a progress bar on terminals), writing JSONL metrics and checkpoints,
//! resuming from one, and stopping cleanly: on SIGINT/SIGTERM after the current step (a
//! checkpoint, then exit 0), and after `--max-bad-steps` skipped steps in a row (a checkpoint,
//! then exit 1).

use crate::cli::{Backend, Cli, NumericsArg, SpecArgs, TrainArgs};
use anyhow::{bail, Context};
use dsc_compiler::graph::{Numerics, TrainingGraph};
use dsc_compiler::plan::{has_stages, Plan};
use dsc_lang::Spec;
use dsc_runtime::checkpoint::{self, Opened, SpecRecord};
use dsc_runtime::comm::rendezvous::World;
use dsc_runtime::comm::Sockets;
use dsc_runtime::train::graph_stage::plan_stages;
use dsc_runtime::train::metrics::{MetricsWriter, StepMetrics};
use dsc_runtime::train::parallel::{check_world, is_parallel, Here, PEER_TIMEOUT};
use dsc_runtime::train::{Backend as TrainBackend, DataParallel, Trainer};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub fn run(cli: &Cli, args: &TrainArgs) -> anyhow::Result<ExitCode> {
    let opened = match &args.resume {
        Some(path) => Some(checkpoint::open(path).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let Some((spec, record)) = spec_of_run(cli, args, opened.as_ref())? else {
        return Ok(ExitCode::FAILURE);
    };
    let numerics = match (args.numerics, &opened) {
        (Some(n), Some(o)) if name(n) != o.meta.numerics => {
            bail!(
                "the checkpoint was trained with `--numerics {}`; resume without `--numerics` or with that value",
                o.meta.numerics
            )
        }
        (Some(n), _) => n,
        (None, Some(o)) if o.meta.numerics == "exact" => NumericsArg::Exact,
        (None, _) => NumericsArg::Policy,
    };
    let graph_numerics = if numerics == NumericsArg::Exact { Numerics::Exact } else { Numerics::Policy };
    let plan = args.plan.as_deref().map(|dir| read_plan(dir, &spec)).transpose()?;
    if plan.is_some() && numerics == NumericsArg::Exact {
        bail!("a compiled plan follows the spec's precision policy: leave out `--numerics exact` or `--plan`");
    }
    let graph = match &plan {
        Some(plan) => plan.training_graph(),
        None => TrainingGraph::build(&spec, graph_numerics),
    };
    let world = World::from_env(|name| std::env::var(name).ok()).map_err(|e| anyhow::anyhow!("{e}"))?;
    // A launched run of data parallelism alone trains a compiled plan on GPUs over NCCL; the
    // ranks of a pipeline or of expert parallelism run the plan's stages on GPUs, or else on
    // CPUs.
    let staged = has_stages(&spec);
    let on_gpus = world.is_some() && plan.is_some() && args.backend != Some(Backend::Cpu) && !staged;
    let launching = Launching { profile: args.profile, graphs: !args.no_cuda_graphs };
    if let Some(why) = launching.off_the_gpu().filter(|_| !on_gpus && (world.is_some() || is_parallel(&spec))) {
        bail!("{why}");
    }
    let stages_on = |gpu: Option<usize>| -> anyhow::Result<Option<StageRunners>> {
        let cuda = args.backend == Some(Backend::Cuda);
        match plan.as_ref().zip(args.plan.as_deref()) {
            Some((plan, dir)) if staged => stage_runners(args.backend, plan, dir, gpu).map(Some),
            _ if cuda && world.is_some() => {
                bail!("a launched run trains on GPUs from a compiled plan: give `--plan DIR`")
            }
            _ if cuda && !staged => bail!("{DATA_PARALLEL_ON_GPUS}"),
            _ if cuda => bail!("{CUDA_NEEDS_A_PLAN}"),
            _ => Ok(None),
        }
    };
    let mut runners = None;
    let (on, backend, replicas) = match &world {
        Some(world) if on_gpus => {
            let (plan, dir) = plan.zip(args.plan.as_deref()).expect("checked above");
            let (on, backend, replicas) = launched(plan, dir, world, launching)?;
            (Some(on), Some(backend), Some(replicas))
        }
        Some(world) => {
            runners = stages_on(Some(world.local_rank))?;
            if let Err(e) = check_world(&spec, world.size) {
                eprintln!("error: cannot train `{}`: {}", spec.model.name, e.0);
                return Ok(ExitCode::FAILURE);
            }
            (None, None, None)
        }
        None if is_parallel(&spec) => {
            runners = stages_on(None)?;
            (None, None, None)
        }
        None => {
            let (on, backend) = backend(args.backend, plan.zip(args.plan.as_deref()), launching)?;
            (Some(on), backend, None)
        }
    };
    let trainer = match &opened {
        Some(o) => {
            if args.seed.is_some_and(|s| s != o.meta.seed) {
                bail!("the checkpoint was trained with seed {}; resume without `--seed`", o.meta.seed);
            }
            let state = o.checkpoint(&graph.forward.params).map_err(anyhow::Error::msg)?;
            eprintln!("resuming from `{}` at step {} ({} tokens)", o.dir.display(), o.meta.step, o.meta.tokens);
            Trainer::<f32>::resume(&spec, graph, &state)
        }
        None => Trainer::<f32>::with_graph(&spec, graph, args.seed.unwrap_or(spec.train.seed)),
    };
    let here = match &world {
        Some(world) if !on_gpus => Some(Here::Process(Arc::new(
            Sockets::connect(world, PEER_TIMEOUT).map_err(|e| anyhow::anyhow!("rank {}: {e}", world.rank))?,
        ))),
        None if is_parallel(&spec) => Some(Here::Threads),
        _ => None,
    };
    let trainer = match here {
        Some(here) => trainer.and_then(|mut trainer| {
            let ranks = trainer.on_ranks(graph_numerics, here, runners)?;
            eprintln!("training on {ranks}");
            Ok(trainer)
        }),
        None => trainer,
    };
    let mut trainer = match trainer {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot train `{}`: {}", spec.model.name, e.0);
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Some(backend) = backend {
        trainer.set_backend(backend);
    }
    if let Some(replicas) = replicas {
        if let Err(e) = trainer.set_data_parallel(replicas) {
            eprintln!("error: cannot train `{}`: {}", spec.model.name, e.0);
            return Ok(ExitCode::FAILURE);
        }
    }
    // In a launched run, rank 0 alone writes metrics and checkpoints (of the state gathered
    // from every rank: `Saver`).
    let lead = world.as_ref().is_none_or(|w| w.rank == 0);
    if let Some(on) = on {
        eprintln!("training `{}` on {on}", spec.model.name);
    }
    let checkpoints = args.checkpoint_dir.clone().or_else(|| opened.as_ref().map(|o| run_dir(&o.dir)));
    if let Some(dir) = checkpoints.as_ref().filter(|_| lead) {
        check_run_dir(dir, opened.as_ref())?;
    }
    // A resumed run's own checkpoint need not be written again before a step is taken.
    let last = opened.as_ref().filter(|o| {
        checkpoints.as_deref().is_some_and(|c| run_dir(&o.dir).canonicalize().ok() == c.canonicalize().ok())
    });
    let last = last.map(|o| (o.dir.clone(), o.meta.step));
    let mut saver =
        Saver { dir: checkpoints, lead, keep: args.keep.map(|k| k as usize), numerics: name(numerics), record, last };
    let mut writer = match (&args.metrics.as_ref().filter(|_| lead), &opened) {
        (Some(path), Some(o)) => Some(MetricsWriter::resume(path, o.meta.step)),
        (Some(path), None) => Some(MetricsWriter::create(path)),
        (None, _) => None,
    }
    .transpose()
    .with_context(|| {
        format!("cannot open the metrics file `{}`", args.metrics.as_deref().unwrap_or(Path::new("")).display())
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while the checkpoint is written ends the process at once (the
        // write is atomic, so the previous checkpoint stays intact).
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())?;
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let budget = spec.train.tokens;
    // The other ranks of a launched run report the same steps: rank 0 alone prints them.
    let bar = progress_bar(args.steps, trainer.progress().step).filter(|_| lead);
    let mut bad_in_a_row = 0u64;
    loop {
        let progress = trainer.progress();
        if args.steps.is_some_and(|n| progress.step >= n) || progress.tokens >= budget {
            break;
        }
        // The processes of a launched run stop at the same step (a signal reaches them at
        // slightly different times), as the checkpoint gathers from all of them.
        let stopping = trainer
            .any_process(stop.load(Ordering::SeqCst))
            .map_err(|e| anyhow::anyhow!("the processes cannot agree whether to stop: {}", e.0))?;
        if stopping {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            match saver.save(&mut trainer)? {
                Some(dir) => eprintln!("interrupted at step {}: saved `{}`", progress.step, dir.display()),
                None if !lead => eprintln!("interrupted at step {}", progress.step),
                None => eprintln!("interrupted at step {}: nothing saved (no `--checkpoint-dir`)", progress.step),
            }
            return Ok(ExitCode::SUCCESS);
        }
        let m = match trainer.step() {
            Ok(m) => m,
            Err(e) => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                eprintln!("error: step {} failed: {e}", progress.step + 1);
                return Ok(ExitCode::FAILURE);
            }
        };
        if let Some(w) = writer.as_mut() {
            w.write(&m).context("cannot write metrics")?;
        }
        let line = step_line(&m, args.steps);
        match &bar {
            Some(bar) => {
                bar.println(line);
                bar.set_position(m.step);
            }
            None if lead => println!("{line}"),
            None => {}
        }
        if m.skipped {
            bad_in_a_row += 1;
            let what = if m.loss.is_finite() {
                "a gradient is not finite".to_string()
            } else {
                format!("the loss is {}", m.loss)
            };
            if lead {
                eprintln!(
                    "warning: step {} skipped: {what}; parameters unchanged ({bad_in_a_row} in a row)",
                    m.step + 1
                );
            }
            if bad_in_a_row >= args.max_bad_steps {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                let saved = saver.save(&mut trainer)?;
                eprintln!(
                    "error: {bad_in_a_row} steps in a row had a non-finite loss or gradient; stopping at step {}. {}\
                     Lower the learning rate or check the data, then resume.",
                    m.step,
                    saved.map_or("Nothing was saved (no `--checkpoint-dir`). ".to_string(), |d| {
                        format!("The last good state is saved in `{}`. ", d.display())
                    })
                );
                return Ok(ExitCode::FAILURE);
            }
            continue;
        }
        bad_in_a_row = 0;
        if args.checkpoint_every.is_some_and(|every| m.step.is_multiple_of(every)) {
            saver.save(&mut trainer)?;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(profile) = trainer.backend_profile() {
        eprintln!("where the GPU's time went:\n{profile}");
    }
    if let Some(dir) = saver.save(&mut trainer)? {
        eprintln!("saved `{}`", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The compiled plan in `dir`, which must be of `spec` (its data sources aside: they do not
/// shape the plan).
fn read_plan(dir: &Path, spec: &Spec) -> anyhow::Result<Plan> {
    let plan = Plan::read(dir)?;
    let mut compiled_for = plan.spec.clone();
    compiled_for.train.data = spec.train.data.clone();
    if compiled_for != *spec {
        bail!(
            "`{}` was compiled from another spec (or other `--set` values): {}; give the same `--set` values \
             as its `dsc compile`, or recompile it with `dsc compile FILE -o {}`",
            dir.display(),
            compiled_for.differences_in_words(spec),
            dir.display()
        );
    }
    Ok(plan)
}

/// A backend for the trainer: where the steps run, in words, and the backend to set (`None`:
/// the trainer's CPU reference).
type Chosen = (String, Option<Box<dyn TrainBackend<f32>>>);

/// What runs the pipeline stages of a rank, and where, in words.
type StageRunners = (dsc_runtime::train::graph_stage::Runners, String);

/// Why `--backend cuda` is refused without a plan.
const CUDA_NEEDS_A_PLAN: &str =
    "`--backend cuda` runs a compiled plan: give `--plan DIR` (from `dsc compile FILE -o DIR`)";

/// Why `--backend cuda` is refused for data parallelism in one process.
const DATA_PARALLEL_ON_GPUS: &str =
    "data parallelism alone runs on GPUs as processes, one per GPU over NCCL (start them with torchrun, srun or mpirun)";

/// How the CUDA backend launches a plan's kernels: timed one by one (`--profile`), or the
/// step's calls replayed from CUDA graphs (unless `--no-cuda-graphs`).
#[derive(Clone, Copy)]
struct Launching {
    profile: bool,
    graphs: bool,
}

impl Launching {
    /// Why training off the GPU refuses these flags, where one of them is given.
    fn off_the_gpu(self) -> Option<String> {
        let flag = match self {
            Launching { profile: true, .. } => "`--profile` times the GPU's kernels",
            Launching { graphs: false, .. } => "`--no-cuda-graphs` is for the GPU's kernels",
            _ => return None,
        };
        Some(format!("{flag}: train a plan on the GPU (`--plan DIR --backend cuda`)"))
    }
}

/// `--backend cuda` needs a plan and a GPU; by default the GPU is taken when a plan is given,
/// this dsc has the `cuda` feature and a GPU is found.
fn backend(choice: Option<Backend>, plan: Option<(Plan, &Path)>, launching: Launching) -> anyhow::Result<Chosen> {
    let cpu = || {
        if let Some(why) = launching.off_the_gpu() {
            bail!("{why}");
        }
        Ok(("the CPU".to_string(), None))
    };
    match (choice, plan) {
        (Some(Backend::Cpu), _) => cpu(),
        (Some(Backend::Cuda), None) => bail!("{CUDA_NEEDS_A_PLAN}"),
        (Some(Backend::Cuda), Some((plan, dir))) => cuda(plan, dir, launching),
        (None, Some((plan, dir))) if cfg!(feature = "cuda") => cuda(plan, dir, launching).or_else(|e| {
            eprintln!("note: training on the CPU: {e:#}");
            cpu()
        }),
        (None, _) => cpu(),
    }
}

#[cfg(feature = "cuda")]
fn cuda(plan: Plan, dir: &Path, launching: Launching) -> anyhow::Result<Chosen> {
    use dsc_runtime::cuda::Gpu;
    let gpu = Gpu::open()?;
    let name = gpu.name()?;
    let tuned = match dsc_compiler::plan::tuning::Tuning::read(dir)? {
        Some(tuning) if tuning.gpu != name => {
            tracing::warn!("`{}`'s tuning was measured on {}, not this {name}", dir.display(), tuning.gpu);
            format!(", tuned on {}", tuning.gpu)
        }
        Some(_) => ", tuned".to_string(),
        None => String::new(),
    };
    let launches = match launching {
        Launching { profile: false, graphs: true } => ", CUDA graphs where the plan allows",
        _ => ", kernels launched one by one",
    };
    let on = format!("{name} (CUDA, plan `{}`{tuned}{launches})", dir.display());
    Ok((on, Some(Box::new(executor(plan, dir, gpu, launching)?))))
}

/// The executor of `plan` on `gpu`, launching its kernels as `launching` says.
#[cfg(feature = "cuda")]
fn executor(
    plan: Plan,
    dir: &Path,
    gpu: dsc_runtime::cuda::Gpu,
    launching: Launching,
) -> anyhow::Result<dsc_runtime::cuda::exec::Executor> {
    let executor = dsc_runtime::cuda::exec::Executor::new(plan, dir, gpu, false)?;
    Ok(match launching {
        Launching { profile: true, .. } => executor.profiled(),
        Launching { graphs: false, .. } => executor.eager(),
        _ => executor,
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: Plan, _: &Path, _: Launching) -> anyhow::Result<Chosen> {
    bail!("this dsc was built without the `cuda` feature (build it with `--features cuda`)")
}

/// What runs the pipeline stages of `plan` (compiled into `dir`) on a rank, and where, in
/// words: GPUs where `choice` asks for them, or by default where this dsc has the `cuda`
/// feature and finds one (`gpu`, a launched process's; else every GPU, the thread-ranks
/// spread over them); else the plan's stage functions on the CPU.
fn stage_runners(choice: Option<Backend>, plan: &Plan, dir: &Path, gpu: Option<usize>) -> anyhow::Result<StageRunners> {
    let on_cpu = || (plan_stages(plan), format!("the CPU (plan `{}`)", dir.display()));
    match choice {
        Some(Backend::Cpu) => Ok(on_cpu()),
        Some(Backend::Cuda) => on_gpu(plan, dir, gpu),
        None if cfg!(feature = "cuda") => on_gpu(plan, dir, gpu).or_else(|e| {
            eprintln!("note: the pipeline stages run on the CPU: {e:#}");
            Ok(on_cpu())
        }),
        None => Ok(on_cpu()),
    }
}

/// The runners of `plan`'s stages on GPU `gpu` (else on every GPU), and where, in words.
#[cfg(feature = "cuda")]
fn on_gpu(plan: &Plan, dir: &Path, gpu: Option<usize>) -> anyhow::Result<StageRunners> {
    use dsc_runtime::cuda::stage::{self, Gpus};
    use dsc_runtime::cuda::Gpu;
    let gpus = match gpu {
        Some(ordinal) => Gpus::One(ordinal),
        None => Gpus::Spread(Gpu::count()?),
    };
    let first = if let Gpus::One(ordinal) = gpus { ordinal } else { 0 };
    let name = Gpu::open_on(first)?.name()?;
    let on = match gpus {
        Gpus::Spread(count) if count > 1 => format!("GPUs 0–{} ({count} × {name})", count - 1),
        _ => format!("GPU {first}, {name}"),
    };
    Ok((stage::runners(plan.clone(), dir, gpus)?, format!("{on} (CUDA, plan `{}`)", dir.display())))
}

#[cfg(not(feature = "cuda"))]
fn on_gpu(_: &Plan, _: &Path, _: Option<usize>) -> anyhow::Result<StageRunners> {
    bail!("this dsc was built without the `cuda` feature (build it with `--features cuda`)")
}

/// A process of a launched run: where it trains, in words, its backend and its replicas.
type Launched = (String, Box<dyn TrainBackend<f32>>, Box<dyn DataParallel>);

/// One process of a launched run: the plan on its GPU (`LOCAL_RANK`), joined to the others
/// over NCCL.
#[cfg(feature = "cuda")]
fn launched(plan: Plan, dir: &Path, world: &World, launching: Launching) -> anyhow::Result<Launched> {
    use dsc_runtime::cuda::{nccl::Nccl, Gpu};
    let gpu = Gpu::open_on(world.local_rank)?;
    let nccl = std::rc::Rc::new(Nccl::new(&gpu, world, PEER_TIMEOUT)?);
    let on = format!(
        "{} (CUDA, plan `{}`), rank {} of {} over NCCL, ZeRO-1",
        gpu.name()?,
        dir.display(),
        world.rank,
        world.size
    );
    let mut executor = executor(plan, dir, gpu, launching)?;
    executor.join(std::rc::Rc::clone(&nccl));
    Ok((on, Box::new(executor), Box::new(nccl)))
}

#[cfg(not(feature = "cuda"))]
fn launched(_: Plan, _: &Path, _: &World, _: Launching) -> anyhow::Result<Launched> {
    bail!("a launched run trains on GPUs over NCCL, and this dsc was built without the `cuda` feature (build it with `--features cuda`)")
}

/// The spec of the run and its record for checkpoints: the file given (checked against the
/// checkpoint's spec when resuming) or the checkpoint's own copy. `None` after printed errors.
fn spec_of_run(cli: &Cli, args: &TrainArgs, opened: Option<&Opened>) -> anyhow::Result<Option<(Spec, SpecRecord)>> {
    let Some(file) = &args.file else {
        let o = opened.expect("clap requires a spec file or --resume");
        let stored = &o.meta.spec;
        if !args.set.is_empty() {
            bail!("`--set` changes the spec, and a resumed run keeps the checkpoint's: leave `--set` out");
        }
        let loaded = dsc_lang::load_str(&stored.file, &stored.source, &stored.overrides);
        crate::report(cli, &loaded);
        let Some(spec) = loaded.checked_spec().cloned() else {
            return Ok(None);
        };
        checkpoint::same_spec(stored, &spec, &o.dir).map_err(anyhow::Error::msg)?;
        return Ok(Some((spec, stored.clone())));
    };
    let spec_args = SpecArgs { file: file.clone(), set: args.set.clone() };
    let Some((loaded, spec)) = crate::load(cli, &spec_args) else {
        return Ok(None);
    };
    if let Some(o) = opened {
        checkpoint::same_spec(&o.meta.spec, &spec, &o.dir).map_err(anyhow::Error::msg)?;
    }
    let record = SpecRecord {
        file: file.display().to_string(),
        source: loaded.sources.text(0).to_string(),
        overrides: args.set.clone(),
        resolved: spec.clone(),
    };
    Ok(Some((spec, record)))
}

fn name(numerics: NumericsArg) -> String {
    match numerics {
        NumericsArg::Policy => "policy",
        NumericsArg::Exact => "exact",
    }
    .to_string()
}

/// Refuses to mix two runs' checkpoints in one directory: a new run needs a directory without
/// checkpoints, a resumed one must continue from the newest checkpoint there.
fn check_run_dir(dir: &Path, opened: Option<&Opened>) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let Some(&newest) = checkpoint::store::complete_steps(dir).map_err(anyhow::Error::msg)?.last() else {
        return Ok(());
    };
    let same = |a: &Path, b: &Path| a.canonicalize().ok().is_some_and(|a| b.canonicalize().ok() == Some(a));
    match opened {
        Some(o) if !same(&run_dir(&o.dir), dir) => bail!(
            "`{}` holds checkpoints of another run (the newest of step {newest}): give this run another `--checkpoint-dir`",
            dir.display()
        ),
        None => bail!(
            "`{}` already holds checkpoints (the newest of step {newest}): continue that run with `--resume {}`, \
             or give this run another `--checkpoint-dir`",
            dir.display(),
            dir.display()
        ),
        Some(o) if o.meta.step < newest => bail!(
            "`{}` holds checkpoints newer than step {} (up to {newest}); resuming there would mix two runs: \
             give this branch another `--checkpoint-dir`",
            dir.display(),
            o.meta.step
        ),
        Some(_) => Ok(()),
    }
}

/// The checkpoint directory a checkpoint folder belongs to.
fn run_dir(checkpoint: &Path) -> PathBuf {
    checkpoint.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Writes checkpoints of the run, when it has a checkpoint directory: every process of a
/// launched run gathers the state (the ranks' optimizer shards), rank 0 writes it.
struct Saver {
    dir: Option<PathBuf>,
    lead: bool,
    keep: Option<usize>,
    numerics: String,
    record: SpecRecord,
    /// The checkpoint last written (or resumed from) and its step.
    last: Option<(PathBuf, u64)>,
}

impl Saver {
    /// Writes a checkpoint of the trainer's state, unless one of this step exists already.
    fn save(&mut self, trainer: &mut Trainer<f32>) -> anyhow::Result<Option<PathBuf>> {
        let Some(dir) = &self.dir else { return Ok(None) };
        let step = trainer.progress().step;
        if let Some((written, _)) = self.last.as_ref().filter(|(_, at)| *at == step) {
            return Ok(Some(written.clone()));
        }
        // The other ranks take part where the state is gathered from them (their ZeRO-1
        // shards); a replica's whole state stays where it is.
        if !self.lead && !trainer.shards_state() {
            return Ok(None);
        }
        trainer.sync().map_err(|e| anyhow::anyhow!("cannot read the training state back: {}", e.0))?;
        if !self.lead {
            return Ok(None);
        }
        let state = trainer.checkpoint(&self.numerics, self.record.clone());
        let written = checkpoint::save(dir, self.keep, &trainer.graph().forward.params, &state)
            .map_err(|e| anyhow::anyhow!("cannot write the checkpoint: {e}"))?;
        tracing::info!(dir = %written.display(), "checkpoint written");
        self.last = Some((written.clone(), step));
        Ok(Some(written))
    }
}

/// A bar on stderr when it is a terminal and the length is known.
fn progress_bar(steps: Option<u64>, done: u64) -> Option<ProgressBar> {
    let steps = steps?;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(steps);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} steps, eta {eta}").expect("valid template"));
    bar.set_position(done);
    bar.reset_eta();
    Some(bar)
}

fn step_line(m: &StepMetrics, steps: Option<u64>) -> String {
    let of = steps.map_or(String::new(), |n| format!("/{n}"));
    let skipped = if m.skipped { "  (skipped)" } else { "" };
    format!(
        "step {:>4}{of}  loss {:.4}  mtp {:.4}  balance {:.2e}  lr {:.3e}  grad norm {:.3}  load max/mean {:.2}  {:.0} tok/s{skipped}",
        m.step, m.loss, m.mtp_loss, m.balance_loss, m.lr, m.grad_norm, m.expert_load_max, m.tokens_per_s
    )
}
