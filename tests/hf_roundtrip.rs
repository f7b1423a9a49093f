//! The Hugging Face layout end to end: a trained checkpoint exported with `dsc export --hf`,
//! imported back with `dsc import --hf`, gives a spec with the same model and a checkpoint
//! whose `dsc forward` logits are bitwise those of the original; configs that have no dsc
//! equivalent are refused with the reason. (`tests/device/hf_parity.py` compares the export
//! with `transformers` itself, on a machine that has it.)

mod common;

use common::{dsc, ok, path};
use std::path::Path;

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("JSON")
}

#[test]
fn export_import_round_trip_keeps_the_model_and_its_logits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (run, exported, imported) = (dir.path().join("run"), dir.path().join("hf"), dir.path().join("imported"));
    ok(&[
        "train",
        "models/deepseek-v3-tiny.dsc",
        "--set",
        "train.seq_len=16",
        "--set",
        "train.batch=4",
        "--steps",
        "2",
        "--checkpoint-dir",
        path(&run),
    ]);
    ok(&["export", path(&run), "--hf", path(&exported)]);
    let config = json(&exported.join("config.json"));
    for (key, value) in [
        ("model_type", serde_json::json!("deepseek_v3")),
        ("vocab_size", 512.into()),
        ("num_hidden_layers", 3.into()),
        ("first_k_dense_replace", 1.into()),
        ("n_routed_experts", 8.into()),
        ("num_experts_per_tok", 2.into()),
        ("n_group", 4.into()),
        ("topk_group", 2.into()),
        ("moe_intermediate_size", 32.into()),
        ("intermediate_size", 128.into()),
        ("scoring_func", "sigmoid".into()),
        ("topk_method", "noaux_tc".into()),
        ("norm_topk_prob", true.into()),
        ("tie_word_embeddings", false.into()),
    ] {
        assert_eq!(config[key], value, "{key}");
    }
    ok(&["import", "--hf", path(&exported), "-o", path(&imported), "--name", "deepseek-v3-tiny"]);
    let spec_of = |file: &str, extra: &[&str]| {
        let mut args = vec!["compile", file, "--emit=spec"];
        args.extend(extra);
        serde_json::from_slice::<serde_json::Value>(&ok(&args).stdout).expect("spec JSON")
    };
    let original = spec_of("models/deepseek-v3-tiny.dsc", &[]);
    let back = spec_of(path(&imported.join("model.dsc")), &[]);
    assert_eq!(back["model"], original["model"], "the imported spec describes another model");
    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, "[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [500, 400, 300, 200, 100, 0, 11, 12, 13, 14]]").unwrap();
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    ok(&["forward", path(&run), "--tokens", path(&tokens), "-o", path(&a)]);
    ok(&["forward", path(&imported.join("checkpoint")), "--tokens", path(&tokens), "-o", path(&b)]);
    let (a, b) = (json(&a), json(&b));
    assert_eq!(a["shape"], serde_json::json!([2, 10, 512]));
    assert_eq!(a, b, "the imported checkpoint computes other logits");
    // The imported checkpoint trains.
    ok(&["train", "--resume", path(&imported.join("checkpoint")), "--steps", "1"]);
}

#[test]
fn configs_without_a_dsc_equivalent_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |config: serde_json::Value| {
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let o = dsc(&["import", "--hf", path(dir.path()), "-o", path(&dir.path().join("out")), "--config-only"]);
        assert_eq!(o.status.code(), Some(1));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = write(serde_json::json!({ "model_type": "llama" }));
    assert!(err.contains("llama") && err.contains("config.json"), "{err}");
    let err = write(serde_json::json!({ "model_type": "deepseek_v3", "num_attention_heads": 4, "q_lora_rank": null }));
    assert!(err.contains("q_lora_rank"), "{err}");
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let o = dsc(&["import", "--hf", path(dir.path()), "-o", path(&dir.path().join("out"))]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not JSON"));
}
