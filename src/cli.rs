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
    // issue 6 commands
    /// Tokenizers and training data: `dsc data tokenizer`, `dsc data prepare`.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// The logits of a checkpoint's model for token rows (f64, no rounding): the reference a
    /// Hugging Face port is checked against (tests/device/hf_parity.py).
    Forward {
        /// A checkpoint folder, or a run's checkpoint directory for its newest.
        checkpoint: PathBuf,
        /// A JSON file of token rows of equal length: `[[1, 2, 3], [4, 5, 6]]`.
        #[arg(long)]
        tokens: PathBuf,
        /// Where to write `{"shape": [rows, seq, vocab], "logits": [...]}`.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Export a checkpoint as a Hugging Face DeepSeek-V3 model folder.
    Export {
        /// A checkpoint folder, or a run's checkpoint directory for its newest.
        checkpoint: PathBuf,
        /// The folder to write (`model.safetensors`, `config.json`).
        #[arg(long, value_name = "OUT")]
        hf: PathBuf,
        /// Export the EMA of the weights (`precision.ema`) instead of the weights.
        #[arg(long)]
        ema: bool,
    },
    /// Import a Hugging Face DeepSeek-V3-style model: its config.json becomes a spec file, its
    /// weights a checkpoint to train on with `dsc train --resume`.
    Import {
        /// The model folder (`config.json` and `*.safetensors`).
        #[arg(long, value_name = "DIR")]
        hf: PathBuf,
        /// The folder to write: `model.dsc` and `checkpoint/step-00000000`.
        #[arg(short, long)]
        output: PathBuf,
        /// The model's name in the spec (default: the folder's name).
        #[arg(long)]
        name: Option<String>,
        /// Write the spec only, without converting the weights.
        #[arg(long)]
        config_only: bool,
    },
    /// Draw the loss and learning-rate curves of a metrics file (`dsc train --metrics`) as SVG.
    Plot {
        /// The metrics JSONL file.
        metrics: PathBuf,
        /// The SVG file to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    // end issue 6 commands
    /// Train a spec's model: on the CPU, on thread-ranks for a parallel plan, on the GPU with
    /// `--plan`; started by torchrun, srun or mpirun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `MASTER_ADDR`, `MASTER_PORT`, or SLURM's or MPI's), as one data-parallel process per GPU
    /// over NCCL with `--plan`, or else as one rank of the plan's on the CPU over TCP.
    Train(TrainArgs),
    /// Compile a spec into a plan directory (`-o DIR`), or print a stage (`--emit`).
    Compile {
        #[command(flatten)]
        spec: SpecArgs,
        /// Print this stage instead of writing a plan.
        #[arg(long, value_enum)]
        emit: Option<EmitStage>,
        /// The plan directory to write; with `--emit`, a file for the stage (default: stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print the IR after every MLIR pass while lowering kernels (to standard error).
        #[arg(long)]
        print_ir_after_all: bool,
    },
    /// Simulate one training step on the spec's cluster: step time, pipeline bubble, memory per
    /// GPU, all-to-all volume and GPU-hours per trillion tokens.
    Simulate {
        #[command(flatten)]
        spec: SpecArgs,
        #[arg(long, value_enum, default_value_t = InfoFormat::Text)]
        format: InfoFormat,
        /// Also draw each rank's chunks over time as an SVG file.
        #[arg(long, value_name = "FILE")]
        timeline: Option<PathBuf>,
    },
    /// Summarise a compiled plan: kernels, fused ops, bytes and launches per step.
    Inspect {
        /// The plan directory written by `dsc compile -o`.
        plan: PathBuf,
        /// Show one kernel: its ops, inputs and outputs.
        #[arg(long, value_name = "NAME")]
        kernel: Option<String>,
        #[arg(long, value_enum, default_value_t = InfoFormat::Text)]
        format: InfoFormat,
    },
    /// Measure a plan's FP8 GEMMs on this GPU (every tile it carries, and cuBLASLt) and
    /// record the fastest in `PLAN/tuning.json`, which training then runs.
    Tune {
        /// The plan directory written by `dsc compile -o`.
        plan: PathBuf,
        /// Timed launches per candidate (their median counts).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
        repeats: u32,
    },
}

#[derive(Args)]
pub struct TrainArgs {
    /// The spec file (`.dsc`); with `--resume` it may be left out: the checkpoint's copy is used.
    #[arg(required_unless_present = "resume")]
    pub file: Option<PathBuf>,
    /// Override a value: `--set train.seq_len=2Ki` (dotted key path, list items by index).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
    /// Where the steps run (default: the GPU when this dsc has the `cuda` feature, `--plan`
    /// is given and a GPU is found; the CPU otherwise).
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Train this compiled plan of the spec (`dsc compile FILE -o DIR`): its fused graph, and on
    /// the GPU its kernels. Needed for `--backend cuda`.
    #[arg(long, value_name = "DIR")]
    pub plan: Option<PathBuf>,
    /// Stop once this many optimizer steps are done, counting those before `--resume`
    /// (default: the spec's token budget).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Seed of the initialisation and the data order (default: the spec's `train.seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write one JSON object per step to this file (continued when resuming: lines of steps
    /// after the checkpoint are replaced).
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// `policy` follows the spec's precision policy (FP8 GEMMs…); `exact` rounds nothing
    /// (default: `policy`, or the checkpoint's when resuming).
    #[arg(long, value_enum)]
    pub numerics: Option<NumericsArg>,
    /// Write checkpoints into this directory (one `step-N` folder each); on SIGINT/SIGTERM
    /// and when training ends, a last one is written. Default with `--resume`: the run's directory.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every N optimizer steps.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: Option<u64>,
    /// Keep only the newest N checkpoints.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep: Option<u64>,
    /// Continue a run exactly from a checkpoint: a `step-N` folder, or a checkpoint directory
    /// for its newest checkpoint.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) after this many steps in a row are skipped for a non-finite
    /// loss or gradient.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_bad_steps: u64,
    /// Time every kernel on the GPU and print at the end where the time went, by function and
    /// op (the CUDA backend; one more synchronisation per call; kernels launched one by one,
    /// without CUDA graphs).
    #[arg(long)]
    pub profile: bool,
    /// Launch every kernel of the step from the host (the CUDA backend; by default the step's
    /// calls are captured in CUDA graphs at the second step and replayed from then on).
    #[arg(long)]
    pub no_cuda_graphs: bool,
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
pub enum Backend {
    /// The reference backend: f32, every op on the CPU.
    Cpu,
    /// A compiled plan (`--plan`) on the first NVIDIA GPU (needs the `cuda` feature).
    Cuda,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NumericsArg {
    Policy,
    Exact,
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
    /// The training graph (forward, backward and optimizer functions) in its printed form.
    Graph,
    /// Op counts of the forward, backward and optimizer functions and the parameter count (JSON).
    GraphStats,
    /// The training graph after e-graph fusion.
    Fused,
    /// Each pipeline rank's instruction list for one step (compute chunks, sends, receives,
    /// ZeRO-1 collectives).
    Schedule,
}

// issue 6 types
#[derive(Subcommand)]
pub enum DataCommand {
    /// Train a byte-level BPE tokenizer of exactly `--vocab` tokens (Hugging Face `tokenizers`).
    Tokenizer {
        /// Text files (one document each) or JSONL files (`{"text": ...}` per line).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The vocabulary size; the model's `vocab` must equal it.
        #[arg(long)]
        vocab: usize,
        /// Where to write the `tokenizer.json`.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Tokenize documents into a folder that a spec's `files { path = ... }` source reads.
    Prepare {
        /// Text files (one document each) or JSONL files (`{"text": ...}` per line).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The `tokenizer.json` to use (from `dsc data tokenizer`).
        #[arg(long)]
        tokenizer: PathBuf,
        /// The folder to write (`tokens.bin`, `index.bin`, `meta.json`).
        #[arg(short, long)]
        output: PathBuf,
    },
}
