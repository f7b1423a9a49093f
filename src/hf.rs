//! `dsc forward`, `dsc export --hf` and `dsc import --hf`: a checkpoint's logits, a
//! checkpoint as a Hugging Face model folder, and a Hugging Face model as a spec and checkpoint.

use crate::cli::Cli;
use anyhow::{anyhow, Context};
use dsc_compiler::graph::model::build;
use dsc_compiler::graph::Numerics;
use dsc_runtime::checkpoint::{self, hf, tensors, Checkpoint, SpecRecord, StateMeta};
use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

/// The checkpoint `path` names, verified, with its spec and parameters.
fn load(path: &Path) -> anyhow::Result<(dsc_lang::Spec, Checkpoint)> {
    let opened = checkpoint::open(path).map_err(anyhow::Error::msg)?;
    let spec = opened.meta.spec.resolved.clone();
    let params = build(&spec, Numerics::Exact).params;
    let state = opened.checkpoint(&params).map_err(anyhow::Error::msg)?;
    Ok((spec, state))
}

pub fn forward(checkpoint: &Path, tokens: &Path, output: &Path) -> anyhow::Result<ExitCode> {
    let (spec, state) = load(checkpoint)?;
    let text = std::fs::read_to_string(tokens).with_context(|| format!("cannot read `{}`", tokens.display()))?;
    let rows: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| {
        format!("`{}` is not a JSON list of token rows (`[[1, 2, 3], [4, 5, 6]]`)", tokens.display())
    })?;
    let logits = dsc_runtime::forward::logits(&spec, &state.params, &rows).map_err(anyhow::Error::msg)?;
    let shape = [rows.len(), rows[0].len(), spec.model.vocab as usize];
    let json = serde_json::json!({ "shape": shape, "logits": logits.concat() });
    std::fs::write(output, serde_json::to_vec(&json)?)
        .with_context(|| format!("cannot write `{}`", output.display()))?;
    eprintln!("wrote `{}`: logits {shape:?}", output.display());
    Ok(ExitCode::SUCCESS)
}

pub fn export(checkpoint: &Path, out: &Path, ema: bool) -> anyhow::Result<ExitCode> {
    let (spec, state) = load(checkpoint)?;
    let weights = match (&state.ema, ema) {
        (Some(averaged), true) => averaged,
        (None, true) => anyhow::bail!(
            "the checkpoint holds no EMA of the weights: the run's spec had no `precision.ema {{ decay = ... }}`"
        ),
        (_, false) => &state.params,
    };
    let config =
        hf::config(&spec).map_err(|why| anyhow!("`{}` has no Hugging Face equivalent: {why}", spec.model.name))?;
    let params = build(&spec, Numerics::Exact).params;
    let bytes =
        tensors::encode(&hf::to_hf(&spec, &params, weights), HashMap::from([("format".to_string(), "pt".to_string())]))
            .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create `{}`", out.display()))?;
    for (name, data) in [("model.safetensors", bytes), ("config.json", serde_json::to_vec_pretty(&config)?)] {
        let path = out.join(name);
        std::fs::write(&path, data).with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    let what = if ema { "the EMA of the weights" } else { "the weights" };
    eprintln!("wrote `{}`: {what} at step {} (DeepseekV3ForCausalLM, f32)", out.display(), state.meta.step);
    Ok(ExitCode::SUCCESS)
}

pub fn import(cli: &Cli, dir: &Path, out: &Path, name: Option<&str>, config_only: bool) -> anyhow::Result<ExitCode> {
    let config_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).with_context(|| format!("cannot read `{}`", config_path.display()))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("`{}` is not JSON", config_path.display()))?;
    let folder_name = dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    let name = name.map(str::to_string).or(folder_name).unwrap_or_else(|| "imported".into());
    let source = hf::spec_from_config(&config, &name).map_err(|e| anyhow!("`{}`: {e}", config_path.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create `{}`", out.display()))?;
    let spec_path = out.join("model.dsc");
    let loaded = dsc_lang::load_str(&spec_path.display().to_string(), &source, &[]);
    crate::report(cli, &loaded);
    let Some(spec) = loaded.checked_spec().cloned() else {
        return Ok(ExitCode::FAILURE);
    };
    std::fs::write(&spec_path, &source).with_context(|| format!("cannot write `{}`", spec_path.display()))?;
    eprintln!("wrote `{}`", spec_path.display());
    if config_only {
        return Ok(ExitCode::SUCCESS);
    }
    let params = build(&spec, Numerics::Exact).params;
    let tensors = checkpoint::read_hf_folder(dir).map_err(anyhow::Error::msg)?;
    let values = hf::from_hf(&spec, &params, &tensors, &dir.display().to_string()).map_err(anyhow::Error::msg)?;
    let record =
        SpecRecord { file: spec_path.display().to_string(), source, overrides: vec![], resolved: spec.clone() };
    let meta =
        StateMeta { step: 0, tokens: 0, seed: spec.train.seed, numerics: "policy".into(), data: None, spec: record };
    let state = Checkpoint { params: values, moments: None, ema: None, meta };
    let written = checkpoint::save(&out.join("checkpoint"), None, &params, &state).map_err(anyhow::Error::msg)?;
    eprintln!("wrote `{}`: continue training with `dsc train --resume {}`", written.display(), written.display());
    Ok(ExitCode::SUCCESS)
}
