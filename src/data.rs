//! `dsc data tokenizer` and `dsc data prepare`: train a tokenizer, tokenize documents.

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
