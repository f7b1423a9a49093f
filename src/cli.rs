//! The command-line grammar of `dsc` (clap).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "dsc", version, about = "Compile and train DeepSeek-V3-style models from one spec file")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// How diagnostics are printed: rustc-style text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = ErrorFormat::Human)]
    pub error_format: ErrorFormat,
    /// Colour in diagnostics.
    #[arg(long, global = true, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
}

#[derive(Subcommand)]
pub enum Command {
    /// Check a spec: syntax, types, dimensions, schedules, the parallel plan.
    Check {
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Print a spec in canonical form.
    Fmt {
        #[command(flatten)]
        spec: SpecArgs,
        /// Print nothing; exit 1 if the file is not in canonical form.
        #[arg(long)]
        check: bool,
    },
    /// Sizes, FLOPs per token, tokens per step and memory per GPU of a spec.
    Info {
        #[command(flatten)]
        spec: SpecArgs,
        #[arg(long, value_enum, default_value_t = InfoFormat::Text)]
        format: InfoFormat,
    },
    /// Compile a spec and print a stage of the pipeline.
    Compile {
        #[command(flatten)]
        spec: SpecArgs,
        /// The stage to print.
        #[arg(long, value_enum)]
        emit: EmitStage,
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct SpecArgs {
    /// The spec file (`.dsc`).
    pub file: PathBuf,
    /// Override a value: `--set train.seq_len=2Ki` (dotted key path, list items by index).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ErrorFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

impl Color {
    pub fn enabled(self, terminal: bool) -> bool {
        match self {
            Color::Auto => terminal,
            Color::Always => true,
            Color::Never => false,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InfoFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EmitStage {
    /// The resolved spec as JSON.
    Spec,
}
