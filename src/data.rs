//! `dsc data tokenizer` and `dsc data prepare`: train a tokenizer, tokenize documents; and
//! `dsc plot`: the curves of a run's metrics.

use crate::cli::DataCommand;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn paths(files: &[PathBuf]) -> Vec<&Path> {
    files.iter().map(PathBuf::as_path).collect()
}

pub fn run(command: &DataCommand) -> anyhow::Result<ExitCode> {
    match command {
        DataCommand::Tokenizer { files, vocab, output } => {
            dsc_runtime::data::tokenizer::train(&paths(files), *vocab, output).map_err(anyhow::Error::msg)?;
            eprintln!("wrote `{}`: a byte-level BPE of {vocab} tokens", output.display());
        }
        DataCommand::Prepare { files, tokenizer, output } => {
            let meta =
                dsc_runtime::data::tokenizer::prepare(&paths(files), tokenizer, output).map_err(anyhow::Error::msg)?;
            eprintln!(
                "wrote `{}`: {} documents, {} tokens, vocabulary {} (set the model's `vocab` to it)",
                output.display(),
                meta.documents,
                meta.tokens,
                meta.vocab
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn plot(metrics: &Path, output: &Path) -> anyhow::Result<ExitCode> {
    use dsc_runtime::train::plot;
    let curves = plot::read_curves(metrics).map_err(anyhow::Error::msg)?;
    let title = metrics.file_stem().map_or_else(|| "training".into(), |s| s.to_string_lossy().into_owned());
    plot::plot(&curves, &title, output).map_err(anyhow::Error::msg)?;
    eprintln!("wrote `{}`: {} steps", output.display(), curves.loss.len());
    Ok(ExitCode::SUCCESS)
}
