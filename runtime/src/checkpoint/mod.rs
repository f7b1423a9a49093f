//! Checkpoints of a training run. A checkpoint folder (see [`store`] for the atomic layout and
//! checksums) holds `model.safetensors`, the weights in the Hugging Face DeepSeek-V3 layout
//! ([`hf`]) with its `config.json`, so the folder loads in `transformers` as it is;
//! `state.safetensors`, the rest of the training state: AdamW moments (`exp_avg.NAME`,
//! `exp_avg_sq.NAME`), the EMA of the weights (`ema.NAME`) and, in its metadata, [`StateMeta`]
//! (step, tokens, seed, numerics, data position, the spec's text and overrides); and `spec.dsc`,
//! the spec's text again for people and for `dsc train --resume DIR` without a spec file.

pub mod hf;
pub mod store;
pub mod tensors;

use dsc_compiler::graph::ParamInfo;
use dsc_lang::Spec;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tensors::{Loaded, TensorRef};

pub const MODEL_FILE: &str = "model.safetensors";
pub const STATE_FILE: &str = "state.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const SPEC_FILE: &str = "spec.dsc";
/// The metadata key of [`StateMeta`] in the state file.
const STATE_KEY: &str = "dsc.state";

/// Where training stands, beyond the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateMeta {
    /// Optimizer steps done.
    pub step: u64,
    /// Tokens seen.
    pub tokens: u64,
    pub seed: u64,
    /// `policy` or `exact`.
    pub numerics: String,
    /// The data loader's position; `None` starts the data from the beginning (an import).
    pub data: Option<serde_json::Value>,
    pub spec: SpecRecord,
}

/// The spec a checkpoint was trained with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpecRecord {
    /// The file it was read from, for messages.
    pub file: String,
    pub source: String,
    pub overrides: Vec<String>,
    pub resolved: Spec,
}

/// A whole training state in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Every parameter and buffer, in the graph's order.
    pub params: Vec<Vec<f32>>,
    /// AdamW's two moments per learned parameter, in order; `None` for fresh (zero) moments.
    pub moments: Option<Vec<[Vec<f32>; 2]>>,
    /// The EMA of every parameter, in the graph's order, when the spec keeps one.
    pub ema: Option<Vec<Vec<f32>>>,
    pub meta: StateMeta,
}

/// Writes `checkpoint` under `root` as the checkpoint of its step (see [`store::write`]).
pub fn save(
    root: &Path,
    keep: Option<usize>,
    params: &[ParamInfo],
    checkpoint: &Checkpoint,
) -> Result<PathBuf, String> {
    let spec = &checkpoint.meta.spec.resolved;
    let config = hf::config(spec).unwrap_or_else(
        |why| serde_json::json!({ "note": format!("this model has no Hugging Face DeepSeek-V3 equivalent: {why}") }),
    );
    let model = tensors::encode(
        &hf::to_hf(spec, params, &checkpoint.params),
        HashMap::from([("format".to_string(), "pt".to_string())]),
    )?;
    let learned: Vec<&ParamInfo> = params.iter().filter(|p| p.learned).collect();
    let mut state = Vec::new();
    if let Some(moments) = &checkpoint.moments {
        for (p, [m, v]) in learned.iter().zip(moments) {
            state.push(TensorRef { name: format!("exp_avg.{}", p.name), shape: p.shape.clone(), data: m });
            state.push(TensorRef { name: format!("exp_avg_sq.{}", p.name), shape: p.shape.clone(), data: v });
        }
    }
    if let Some(ema) = &checkpoint.ema {
        for (p, data) in params.iter().zip(ema) {
            state.push(TensorRef { name: format!("ema.{}", p.name), shape: p.shape.clone(), data });
        }
    }
    let meta = serde_json::to_string(&checkpoint.meta).map_err(|e| e.to_string())?;
    let state = tensors::encode(&state, HashMap::from([(STATE_KEY.to_string(), meta)]))?;
    let config = serde_json::to_vec_pretty(&config).map_err(|e| e.to_string())?;
    let files = [
        (MODEL_FILE, model),
        (CONFIG_FILE, config),
        (STATE_FILE, state),
        (SPEC_FILE, checkpoint.meta.spec.source.clone().into_bytes()),
    ];
    store::write(root, checkpoint.meta.step, &files, keep)
}

/// A checkpoint folder whose files matched their checksums, with its state read; the
/// tensors are decoded once the model they belong to is known ([`Opened::checkpoint`]).
pub struct Opened {
    pub dir: PathBuf,
    pub meta: StateMeta,
    verified: store::Verified,
}

/// Opens the checkpoint `path` names (a checkpoint folder, or a run's checkpoint directory for
/// its newest checkpoint) and verifies it.
pub fn open(path: &Path) -> Result<Opened, String> {
    let dir = store::resolve(path)?;
    let verified = store::read_verified(&dir)?;
    let state_path = dir.join(STATE_FILE);
    let (_, metadata) =
        tensors::decode(verified.file(STATE_FILE)?).map_err(|e| format!("`{}`: {e}", state_path.display()))?;
    let meta = metadata.get(STATE_KEY).ok_or_else(|| {
        format!("`{}` has no `{STATE_KEY}` metadata: it is not a dsc state file", state_path.display())
    })?;
    let meta: StateMeta = serde_json::from_str(meta)
        .map_err(|e| format!("`{}`: its `{STATE_KEY}` metadata is not valid ({e})", state_path.display()))?;
    Ok(Opened { dir, meta, verified })
}

impl Opened {
    /// The training state for a model with these parameters (built from the checkpoint's
    /// spec); an error names the file and the tensor that does not fit.
    pub fn checkpoint(&self, params: &[ParamInfo]) -> Result<Checkpoint, String> {
        let spec = &self.meta.spec.resolved;
        let model_path = self.dir.join(MODEL_FILE).display().to_string();
        let (model, _) =
            tensors::decode(self.verified.file(MODEL_FILE)?).map_err(|e| format!("`{model_path}`: {e}"))?;
        let values = hf::from_hf(spec, params, &model, &model_path)?;
        let state_path = self.dir.join(STATE_FILE).display().to_string();
        let (state, _) =
            tensors::decode(self.verified.file(STATE_FILE)?).map_err(|e| format!("`{state_path}`: {e}"))?;
        let named = |prefix: &str, p: &ParamInfo| -> Result<Option<Vec<f32>>, String> {
            match state.get(&format!("{prefix}.{}", p.name)) {
                Some(Loaded { shape, data, .. }) if *shape == p.shape => Ok(Some(data.clone())),
                Some(t) => Err(format!(
                    "`{state_path}`: `{prefix}.{}` has shape {:?}, the model needs {:?}",
                    p.name, t.shape, p.shape
                )),
                None => Ok(None),
            }
        };
        let all =
            |prefix: &str, params: &mut dyn Iterator<Item = &ParamInfo>| -> Result<Option<Vec<Vec<f32>>>, String> {
                let found: Vec<Option<Vec<f32>>> = params.map(|p| named(prefix, p)).collect::<Result<_, _>>()?;
                match found.iter().filter(|f| f.is_some()).count() {
                    0 => Ok(None),
                    n if n == found.len() => Ok(Some(found.into_iter().flatten().collect())),
                    _ => Err(format!("`{state_path}` has `{prefix}` tensors for some parameters only: it is damaged")),
                }
            };
        let m = all("exp_avg", &mut params.iter().filter(|p| p.learned))?;
        let v = all("exp_avg_sq", &mut params.iter().filter(|p| p.learned))?;
        let moments = match (m, v) {
            (Some(m), Some(v)) => Some(m.into_iter().zip(v).map(|(m, v)| [m, v]).collect()),
            (None, None) => None,
            _ => return Err(format!("`{state_path}` has one AdamW moment without the other: it is damaged")),
        };
        let ema = all("ema", &mut params.iter())?;
        Ok(Checkpoint { params: values, moments, ema, meta: self.meta.clone() })
    }
}

/// Whether `current` is the spec the checkpoint was trained with; otherwise an error listing
/// the settings that differ.
pub fn same_spec(stored: &SpecRecord, current: &Spec, dir: &Path) -> Result<(), String> {
    if &stored.resolved == current {
        return Ok(());
    }
    Err(format!(
        "checkpoint `{}` was trained with another spec (`{}`): {}; resume with the spec it was \
         written with (`dsc train --resume {}` alone uses its copy) or start a new run in another directory",
        dir.display(),
        stored.file,
        stored.resolved.differences_in_words(current),
        dir.display()
    ))
}

/// Every tensor of the safetensors files in a folder (a HF model folder, sharded or not).
pub fn read_hf_folder(dir: &Path) -> Result<BTreeMap<String, Loaded>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read `{}`: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("`{}` has no `.safetensors` files", dir.display()));
    }
    let mut all = BTreeMap::new();
    for file in files {
        let bytes = std::fs::read(&file).map_err(|e| format!("cannot read `{}`: {e}", file.display()))?;
        let (tensors, _) = tensors::decode(&bytes).map_err(|e| format!("`{}`: {e}", file.display()))?;
        all.extend(tensors);
    }
    Ok(all)
}
