//! `dsc train`: runs the CPU trainer step by step, printing a line per step (and a progress
//! bar on terminals) and writing JSONL metrics.

use crate::cli::NumericsArg;
use anyhow::Context;
use dsc_compiler::graph::Numerics;
use dsc_lang::Spec;
use dsc_runtime::train::metrics::{MetricsWriter, StepMetrics};
use dsc_runtime::train::CpuTrainer;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

pub struct Options {
    pub steps: Option<u64>,
    pub seed: Option<u64>,
    pub metrics: Option<PathBuf>,
    pub numerics: NumericsArg,
}

pub fn run(spec: &Spec, options: &Options) -> anyhow::Result<ExitCode> {
    let numerics = match options.numerics {
        NumericsArg::Policy => Numerics::Policy,
        NumericsArg::Exact => Numerics::Exact,
    };
    let seed = options.seed.unwrap_or(spec.train.seed);
    let mut trainer = match CpuTrainer::<f32>::new(spec, numerics, seed) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot train `{}`: {}", spec.model.name, e.0);
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut writer = match &options.metrics {
        Some(path) => Some(MetricsWriter::create(path).with_context(|| format!("cannot create `{}`", path.display()))?),
        None => None,
    };
    let budget = spec.train.tokens;
    let bar = progress_bar(options.steps);
    let mut tokens = 0u64;
    let mut step = 0u64;
    tracing::info!(model = %spec.model.name, seed, "training on the CPU");
    while options.steps.is_none_or(|n| step < n) && tokens < budget {
        let m = trainer.step();
        step = m.step;
        tokens += m.tokens;
        if let Some(w) = writer.as_mut() {
            w.write(&m).context("cannot write metrics")?;
        }
        let line = step_line(&m, options.steps);
        match &bar {
            Some(bar) => {
                bar.println(line);
                bar.set_position(step);
            }
            None => println!("{line}"),
        }
        if !m.loss.is_finite() {
            eprintln!("error: the loss is {} at step {step}; stopping", m.loss);
            return Ok(ExitCode::FAILURE);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(ExitCode::SUCCESS)
}

/// A bar on stderr when it is a terminal and the length is known.
fn progress_bar(steps: Option<u64>) -> Option<ProgressBar> {
    let steps = steps?;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(steps);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} steps, eta {eta}").expect("valid template"));
    Some(bar)
}

fn step_line(m: &StepMetrics, steps: Option<u64>) -> String {
    let of = steps.map_or(String::new(), |n| format!("/{n}"));
    format!(
        "step {:>4}{of}  loss {:.4}  mtp {:.4}  balance {:.2e}  lr {:.3e}  grad norm {:.3}  load max/mean {:.2}  {:.0} tok/s",
        m.step, m.loss, m.mtp_loss, m.balance_loss, m.lr, m.grad_norm, m.expert_load_max, m.tokens_per_s
    )
}
