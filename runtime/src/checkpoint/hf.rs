//! The Hugging Face DeepSeek-V3 layout: tensor names and `config.json`. The graph already
//! names its parameters as HF does; here the stacked routed experts `…mlp.experts.X.weight`
//! [E, out, in] become one tensor per expert (`…mlp.experts.{e}.X.weight`), and each MTP layer
//! (`model.layers.{layers + k}`) gets the copies of the embedding and head that HF's layout
//! keeps there. [`from_hf`] reads that layout back (F32, BF16, F16, or E4M3 with 128×128
//! `weight_scale_inv` blocks as DeepSeek publishes), [`config`] writes the `config.json`
//! `transformers`' `DeepseekV3ForCausalLM` reads, and [`spec_from_config`] turns one back into
//! a spec file.

use super::tensors::{Loaded, TensorRef};
use dsc_compiler::graph::ParamInfo;
use dsc_lang::{Ffn, Gating, Moe, Spec};
use safetensors::tensor::Dtype;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

/// The marker of stacked routed-expert parameters in the graph's names.
const EXPERTS: &str = ".mlp.experts.";

/// Whether a parameter is a stack of routed experts.
fn stacked(p: &ParamInfo) -> bool {
    p.name.contains(EXPERTS) && p.shape.len() == 3
}

/// The HF name of expert `e` of a stacked parameter.
fn expert_name(stacked_name: &str, e: usize) -> String {
    stacked_name.replacen(EXPERTS, &format!("{EXPERTS}{e}."), 1)
}

/// The copies HF keeps in each MTP layer: (its name in the layer, the main model's name).
const MTP_COPIES: [(&str, &str); 2] =
    [("embed_tokens.weight", "model.embed_tokens.weight"), ("shared_head.head.weight", "lm_head.weight")];

/// The graph's parameters (`values` in the graph's order) as HF tensors, borrowing the data.
pub fn to_hf<'a>(spec: &Spec, params: &[ParamInfo], values: &'a [Vec<f32>]) -> Vec<TensorRef<'a>> {
    let mut out = Vec::new();
    for (p, data) in params.iter().zip(values) {
        if stacked(p) {
            let per_expert = p.shape[1] * p.shape[2];
            for (e, chunk) in data.chunks(per_expert).enumerate() {
                out.push(TensorRef { name: expert_name(&p.name, e), shape: p.shape[1..].to_vec(), data: chunk });
            }
        } else {
            out.push(TensorRef { name: p.name.clone(), shape: p.shape.clone(), data });
        }
    }
    let depth = spec.model.mtp.as_ref().map_or(0, |m| m.depth);
    for k in 0..depth {
        for (copy, original) in MTP_COPIES {
            if let Some((p, data)) = params.iter().zip(values).find(|(p, _)| p.name == original) {
                let name = format!("model.layers.{}.{copy}", spec.model.layers + k);
                out.push(TensorRef { name, shape: p.shape.clone(), data });
            }
        }
    }
    out
}

/// The graph's parameter values from HF tensors. `file` names the source in errors. Every
/// tensor must be used, apart from the MTP copies and FP8 scales.
pub fn from_hf(
    spec: &Spec,
    params: &[ParamInfo],
    tensors: &BTreeMap<String, Loaded>,
    file: &str,
) -> Result<Vec<Vec<f32>>, String> {
    let mut used = BTreeSet::new();
    let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
        let t = tensors.get(name).ok_or_else(|| {
            format!("`{file}` has no tensor `{name}`: it holds another model than the spec describes")
        })?;
        if t.shape != shape {
            return Err(format!(
                "tensor `{name}` in `{file}` has shape {:?}, the spec's model needs {shape:?}: it holds another model",
                t.shape
            ));
        }
        used.insert(name.to_string());
        let scale_name = format!("{name}_scale_inv");
        match (t.dtype, tensors.get(&scale_name)) {
            (Dtype::F8_E4M3, Some(scale)) => {
                used.insert(scale_name.clone());
                dequantise(&t.data, shape, scale).map_err(|e| format!("tensor `{name}` in `{file}`: {e}"))
            }
            (Dtype::F8_E4M3, None) => Err(format!("FP8 tensor `{name}` in `{file}` has no `{scale_name}`")),
            _ => Ok(t.data.clone()),
        }
    };
    let mut values = Vec::with_capacity(params.len());
    for p in params {
        if stacked(p) {
            let mut data = Vec::with_capacity(p.numel());
            for e in 0..p.shape[0] {
                data.extend(take(&expert_name(&p.name, e), &p.shape[1..])?);
            }
            values.push(data);
        } else {
            values.push(take(&p.name, &p.shape)?);
        }
    }
    let mtp_layers = spec.model.layers..spec.model.layers + spec.model.mtp.as_ref().map_or(0, |m| m.depth);
    let is_copy = |name: &str| {
        mtp_layers.clone().any(|l| MTP_COPIES.iter().any(|(copy, _)| name == format!("model.layers.{l}.{copy}")))
    };
    if let Some(extra) = tensors.keys().find(|n| !used.contains(*n) && !is_copy(n) && !n.ends_with("_scale_inv")) {
        return Err(format!("`{file}` has a tensor `{extra}` the spec's model does not: it holds another model"));
    }
    Ok(values)
}

/// An E4M3 weight [rows, cols] times its per-block inverse scales [⌈rows/b⌉, ⌈cols/b⌉].
fn dequantise(data: &[f32], shape: &[usize], scale: &Loaded) -> Result<Vec<f32>, String> {
    let [rows, cols] = shape else { return Err("only matrices are stored in FP8".into()) };
    let [srows, scols] = scale.shape[..] else { return Err("its scales are not a matrix".into()) };
    if srows == 0 || scols == 0 {
        return Err("its scales are empty".into());
    }
    let (br, bc) = (rows.div_ceil(srows), cols.div_ceil(scols));
    if rows.div_ceil(br) != srows || cols.div_ceil(bc) != scols {
        return Err(format!("scales of shape {:?} do not tile {shape:?}", scale.shape));
    }
    Ok(data.iter().enumerate().map(|(i, &w)| w * scale.data[(i / cols / br) * scols + (i % cols) / bc]).collect())
}

/// Why a spec has no HF DeepSeek-V3 equivalent, or its layout: the dense FFN, then the MoE.
struct Layout<'a> {
    dense: Option<(u64, u64)>,
    moe: Option<&'a Moe>,
}

fn layout(spec: &Spec) -> Result<Layout<'_>, String> {
    let mut dense = None;
    let mut moe: Option<&Moe> = None;
    for range in &spec.model.ffn {
        match &range.ffn {
            Ffn::Dense { intermediate } if moe.is_none() && dense.is_none() => {
                dense = Some((range.layers.end, *intermediate))
            }
            Ffn::Dense { .. } => {
                return Err("HF DeepSeek-V3 has dense FFN layers only before the MoE layers, in one range".into())
            }
            Ffn::Moe(m) => match moe {
                Some(first) if first != m => {
                    return Err("HF DeepSeek-V3 has one MoE configuration for all MoE layers".into())
                }
                _ => moe = Some(m),
            },
        }
    }
    if let Some(m) = moe {
        if m.gating != Gating::Sigmoid {
            return Err("HF DeepSeek-V3 routes with sigmoid scores (`gating = sigmoid`)".into());
        }
        if m.shared_experts == 0 {
            return Err("HF DeepSeek-V3 has at least one shared expert".into());
        }
    }
    Ok(Layout { dense, moe })
}

/// The YaRN settings in force when the spec trains (the model as trained), if any.
fn active_yarn(spec: &Spec) -> Option<&dsc_lang::Yarn> {
    spec.model.attention.yarn.as_ref().filter(|y| spec.train.seq_len > y.original_seq)
}

/// The `config.json` of the spec's model for `transformers`' DeepseekV3ForCausalLM.
pub fn config(spec: &Spec) -> Result<Value, String> {
    let m = &spec.model;
    let a = &m.attention;
    let Layout { dense, moe } = layout(spec)?;
    let (first_dense, dense_intermediate) = dense.unwrap_or((0, moe.map_or(0, |m| m.intermediate)));
    let (experts, top_k, moe_intermediate, shared, groups, keep, scale, alpha) = match moe {
        Some(x) => (
            x.routed_experts,
            x.top_k,
            x.intermediate,
            x.shared_experts,
            x.groups,
            x.keep_groups,
            x.routed_scale,
            x.balance_alpha,
        ),
        None => (1, 1, dense_intermediate, 1, 1, 1, 1.0, 0.0),
    };
    let yarn = active_yarn(spec);
    let max_positions = yarn.map_or(spec.train.seq_len, |y| (y.original_seq as f64 * y.factor).round() as u64);
    let rope_scaling = yarn.map_or(Value::Null, |y| {
        json!({
            "type": "yarn",
            "rope_type": "yarn",
            "factor": y.factor,
            "original_max_position_embeddings": y.original_seq,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim,
        })
    });
    let fields: Vec<(&str, Value)> = vec![
        ("architectures", json!(["DeepseekV3ForCausalLM"])),
        ("model_type", json!("deepseek_v3")),
        ("vocab_size", json!(m.vocab)),
        ("hidden_size", json!(m.hidden)),
        ("intermediate_size", json!(dense_intermediate)),
        ("moe_intermediate_size", json!(moe_intermediate)),
        ("num_hidden_layers", json!(m.layers)),
        ("num_attention_heads", json!(a.heads)),
        ("num_key_value_heads", json!(a.heads)),
        ("n_shared_experts", json!(shared)),
        ("n_routed_experts", json!(experts)),
        ("num_experts_per_tok", json!(top_k)),
        ("n_group", json!(groups)),
        ("topk_group", json!(keep)),
        ("routed_scaling_factor", json!(scale)),
        ("first_k_dense_replace", json!(first_dense)),
        ("moe_layer_freq", json!(1)),
        ("q_lora_rank", json!(a.q_rank)),
        ("kv_lora_rank", json!(a.kv_rank)),
        ("qk_nope_head_dim", json!(a.qk_nope_dim)),
        ("qk_rope_head_dim", json!(a.qk_rope_dim)),
        ("v_head_dim", json!(a.v_dim)),
        ("rope_theta", json!(a.rope_theta)),
        ("rope_scaling", json!(rope_scaling)),
        ("rope_interleave", json!(true)),
        ("rms_norm_eps", json!(m.norm_eps)),
        ("max_position_embeddings", json!(max_positions)),
        ("num_nextn_predict_layers", json!(m.mtp.as_ref().map_or(0, |x| x.depth))),
        ("norm_topk_prob", json!(true)),
        ("scoring_func", json!("sigmoid")),
        ("topk_method", json!("noaux_tc")),
        ("aux_loss_alpha", json!(alpha)),
        ("seq_aux", json!(true)),
        ("tie_word_embeddings", json!(false)),
        ("hidden_act", json!("silu")),
        ("attention_bias", json!(false)),
        ("attention_dropout", json!(0.0)),
        ("initializer_range", json!(m.init_std)),
        ("bos_token_id", json!(0)),
        ("eos_token_id", json!(0)),
        ("use_cache", json!(true)),
        ("torch_dtype", json!("float32")),
    ];
    Ok(Value::Object(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// A spec file for the model a HF DeepSeek-V3 `config.json` describes, with a small default
/// recipe (synthetic data, f32 GEMMs, one GPU) to edit. `name` becomes the model's name.
pub fn spec_from_config(config: &Value, name: &str) -> Result<String, String> {
    let int = |key: &str| -> Result<u64, String> {
        config[key].as_u64().ok_or_else(|| format!("`config.json` has no integer `{key}`"))
    };
    let float = |key: &str, default: f64| config[key].as_f64().unwrap_or(default);
    if let Some(kind) = config["model_type"].as_str().filter(|t| !matches!(*t, "deepseek_v3" | "kimi_k2")) {
        return Err(format!("`config.json` describes a `{kind}` model, not `deepseek_v3`"));
    }
    let q_rank =
        int("q_lora_rank").map_err(|_| "a model without `q_lora_rank` (full-rank q) has no dsc spec".to_string())?;
    let (heads, kv_heads) =
        (int("num_attention_heads")?, int("num_key_value_heads").unwrap_or(int("num_attention_heads")?));
    if heads != kv_heads {
        return Err(format!("MLA has as many key/value heads as heads ({kv_heads} ≠ {heads})"));
    }
    if let Some(f) = config["scoring_func"].as_str().filter(|f| *f != "sigmoid") {
        return Err(format!("`scoring_func` is `{f}`; dsc's DeepSeek-V3 routing uses `sigmoid`"));
    }
    if config["norm_topk_prob"].as_bool() == Some(false) {
        return Err("`norm_topk_prob` is false; dsc normalises the chosen experts' weights".into());
    }
    let layers = int("num_hidden_layers")?;
    let first_dense = int("first_k_dense_replace").unwrap_or(0).min(layers);
    let yarn = match config["rope_scaling"].as_object() {
        Some(r) if r.get("type").or(r.get("rope_type")).and_then(Value::as_str) == Some("yarn") => format!(
            "\n    yarn        = {{ factor = {}, original_seq = {}, beta_fast = {}, beta_slow = {}, mscale = {}, mscale_all_dim = {} }}",
            num(r.get("factor").and_then(Value::as_f64).unwrap_or(1.0)),
            r.get("original_max_position_embeddings").and_then(Value::as_u64).unwrap_or(4096),
            num(r.get("beta_fast").and_then(Value::as_f64).unwrap_or(32.0)),
            num(r.get("beta_slow").and_then(Value::as_f64).unwrap_or(1.0)),
            num(r.get("mscale").and_then(Value::as_f64).unwrap_or(1.0)),
            num(r.get("mscale_all_dim").and_then(Value::as_f64).unwrap_or(1.0)),
        ),
        Some(_) => return Err("only YaRN `rope_scaling` has a dsc equivalent".into()),
        None => String::new(),
    };
    let mut ffn = Vec::new();
    if first_dense > 0 {
        ffn.push(format!("dense {{ layers = 0..{first_dense}, intermediate = {} }}", int("intermediate_size")?));
    }
    if first_dense < layers {
        ffn.push(format!(
            "moe {{\n      layers         = {first_dense}..{layers}\n      shared_experts = {}\n      routed_experts = {}\n      top_k          = {}\n      intermediate   = {}\n      gating         = sigmoid\n      groups         = {}\n      keep_groups    = {}\n      routed_scale   = {}\n      bias_speed     = 0.001\n      balance_alpha  = {}\n    }}",
            int("n_shared_experts")?,
            int("n_routed_experts")?,
            int("num_experts_per_tok")?,
            int("moe_intermediate_size")?,
            int("n_group").unwrap_or(1),
            int("topk_group").unwrap_or(1),
            num(float("routed_scaling_factor", 1.0)),
            num(float("aux_loss_alpha", 0.0001)),
        ));
    }
    let mtp = match int("num_nextn_predict_layers").unwrap_or(0) {
        0 => String::new(),
        depth => format!("\n  mtp {{ depth = {depth}, share = [embedding, head], loss_weight = 0.3 }}\n"),
    };
    let seq = int("max_position_embeddings").unwrap_or(4096).min(4096);
    Ok(format!(
        r#"// Imported from a Hugging Face DeepSeek-V3 `config.json` by `dsc import --hf`. The model
// section is the checkpoint's; the recipe below is a small default to edit.

model {{
  name   = "{name}"
  vocab  = {vocab}
  hidden = {hidden}
  layers = {layers}
  norm   = rmsnorm {{ eps = {eps} }}
  init   = normal {{ std = {std} }}

  attention = mla {{
    heads       = {heads}
    q_rank      = {q_rank}
    kv_rank     = {kv_rank}
    qk_nope_dim = {nope}
    qk_rope_dim = {rope}
    v_dim       = {v}
    rope_theta  = {theta}{yarn}
  }}

  ffn = [
    {ffn},
  ]
{mtp}}}

train {{
  tokens      = 1B
  seq_len     = {seq}
  batch       = 8
  micro_batch = 1
  optimizer   = adamw {{ beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1, no_decay = [norms] }}
  grad_clip   = 1.0
  lr          = [linear {{ for = 100 steps, to = 1e-5 }}, constant {{}}]
  data {{ sources = [synthetic {{ weight = 1 }}] }}
}}

precision {{
  gemm               = f32
  activation_tile    = [1, 128]
  weight_block       = [128, 128]
  promotion_interval = 128
  high_precision     = [embedding, head, gating, norms, attention]
  master_weights     = f32
  grads              = f32
  adam_moments       = f32
  saved_activations  = f32
  dispatch           = f32
  combine            = f32
}}

parallel {{ gpu = h100 }}
"#,
        vocab = int("vocab_size")?,
        hidden = int("hidden_size")?,
        eps = num(float("rms_norm_eps", 1e-6)),
        std = num(float("initializer_range", 0.02)),
        kv_rank = int("kv_lora_rank")?,
        nope = int("qk_nope_head_dim")?,
        rope = int("qk_rope_head_dim")?,
        v = int("v_head_dim")?,
        theta = num(float("rope_theta", 10000.0)),
        ffn = ffn.join(",\n    "),
    ))
}

/// A float in the spec language (which has no `inf`/`NaN`, and wants a digit before `e`).
fn num(x: f64) -> String {
    let s = format!("{x:?}");
    s.strip_suffix(".0").map_or(s.clone(), str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_weights_are_dequantised_by_their_block_scales() {
        // A 3×4 weight in blocks of 2×2 (so 2×2 scales, the last row block partial).
        let data: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let scale = Loaded { shape: vec![2, 2], data: vec![1.0, 10.0, 100.0, 1000.0], dtype: Dtype::F32 };
        let out = dequantise(&data, &[3, 4], &scale).expect("dequantise");
        assert_eq!(out, vec![0.0, 1.0, 20.0, 30.0, 4.0, 5.0, 60.0, 70.0, 800.0, 900.0, 10000.0, 11000.0]);
        let wrong = Loaded { shape: vec![3, 3], data: vec![1.0; 9], dtype: Dtype::F32 };
        assert!(dequantise(&data, &[3, 4], &wrong).is_err());
    }

    #[test]
    fn specs_without_a_hf_equivalent_are_named() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
        let softmax = dsc_lang::load(&path, &["model.ffn.1.gating=softmax".into()]);
        let spec = softmax.checked_spec().expect("checks").clone();
        assert!(config(&spec).unwrap_err().contains("sigmoid"));
        let v3 = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3.dsc");
        let spec = dsc_lang::load(&v3, &[]).checked_spec().expect("V3").clone();
        let config = config(&spec).expect("V3 has a HF config");
        // DeepSeek-V3's published config.json values.
        for (key, value) in [
            ("vocab_size", 129280.0),
            ("hidden_size", 7168.0),
            ("intermediate_size", 18432.0),
            ("moe_intermediate_size", 2048.0),
            ("num_hidden_layers", 61.0),
            ("num_attention_heads", 128.0),
            ("n_routed_experts", 256.0),
            ("num_experts_per_tok", 8.0),
            ("n_group", 8.0),
            ("topk_group", 4.0),
            ("first_k_dense_replace", 3.0),
            ("q_lora_rank", 1536.0),
            ("kv_lora_rank", 512.0),
            ("qk_rope_head_dim", 64.0),
            ("routed_scaling_factor", 2.5),
            ("num_nextn_predict_layers", 1.0),
        ] {
            assert_eq!(config[key].as_f64(), Some(value), "{key}");
        }
        let back = spec_from_config(&config, "deepseek-v3").expect("a spec");
        let loaded = dsc_lang::load_str("imported.dsc", &back, &[]);
        let imported = loaded.checked_spec().expect("the imported spec checks");
        // The bias-update schedule is a training setting HF does not record: the import's is 0.001.
        let mut expected = spec.model.ffn.clone();
        if let Ffn::Moe(m) = &mut expected[1].ffn {
            m.bias_speed = dsc_lang::Schedule::constant(0.001);
        }
        assert_eq!(imported.model.ffn, expected);
        assert_eq!(imported.model.attention.heads, 128);
    }
}
