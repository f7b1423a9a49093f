//! `dsc data tokenizer` and `dsc data prepare` on the shipped sample text, then training on
//! it: FIM and the file loader resume exactly, and a vocabulary that differs from the model's
//! is refused with a message saying what to change.

mod common;

use common::{dsc, losses, ok, path, SMALL};
use std::path::Path;

const SAMPLE: &str = "examples/data/rust-book.jsonl";

#[test]
fn the_shipped_tokenizer_is_what_dsc_data_tokenizer_makes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let made = dir.path().join("tokenizer.json");
    ok(&["data", "tokenizer", SAMPLE, "--vocab", "512", "-o", path(&made)]);
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/tokenizer.json");
    assert_eq!(std::fs::read(&made).unwrap(), std::fs::read(shipped).unwrap());
}

#[test]
fn prepared_text_trains_with_fim_and_resumes_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("book");
    let o = ok(&["data", "prepare", SAMPLE, "--tokenizer", "examples/data/tokenizer.json", "-o", path(&data)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("149 documents"), "{}", String::from_utf8_lossy(&o.stderr));
    let source = format!("train.data.sources=[files {{ path = \"{}\" }}]", path(&data));
    let mut args = vec!["train", "models/deepseek-v3-tiny.dsc", "--set", &source, "--set", "train.data.fim_rate=0.5"];
    args.extend(SMALL);
    let straight = dir.path().join("straight.jsonl");
    let mut run = args.clone();
    run.extend(["--steps", "6", "--metrics", path(&straight)]);
    ok(&run);
    let (ckpt, resumed) = (dir.path().join("run"), dir.path().join("resumed.jsonl"));
    let mut first = args.clone();
    first.extend(["--steps", "3", "--metrics", path(&resumed), "--checkpoint-dir", path(&ckpt)]);
    ok(&first);
    ok(&["train", "--resume", path(&ckpt), "--steps", "6", "--metrics", path(&resumed)]);
    let a = losses(&straight);
    assert_eq!(a.len(), 6);
    assert_eq!(a, losses(&resumed));
    // Text is not uniform noise: the first loss is about ln 512 and falls.
    let first_loss: f64 = a[0].parse().unwrap();
    assert!((first_loss - 512f64.ln()).abs() < 0.2, "{first_loss}");
    // Data prepared again with other documents does not resume silently.
    let fewer = dir.path().join("fewer.jsonl");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(SAMPLE)).unwrap();
    std::fs::write(&fewer, text.lines().take(50).collect::<Vec<_>>().join("\n")).unwrap();
    ok(&["data", "prepare", path(&fewer), "--tokenizer", "examples/data/tokenizer.json", "-o", path(&data)]);
    let o = dsc(&["train", "--resume", path(&ckpt), "--steps", "7"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("149 documents") && err.contains("prepared again"), "{err}");
}

#[test]
fn a_vocabulary_mismatch_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tokenizer, data) = (dir.path().join("t.json"), dir.path().join("d"));
    ok(&["data", "tokenizer", SAMPLE, "--vocab", "600", "-o", path(&tokenizer)]);
    ok(&["data", "prepare", SAMPLE, "--tokenizer", path(&tokenizer), "-o", path(&data)]);
    let source = format!("train.data.sources=[files {{ path = \"{}\" }}]", path(&data));
    let o = dsc(&["train", "models/deepseek-v3-tiny.dsc", "--set", &source, "--steps", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("600") && err.contains("vocab = 512") && err.contains("model.vocab=600"), "{err}");
    // Broken inputs: a missing file, a JSONL line without text.
    let o = dsc(&["data", "prepare", "nowhere.jsonl", "--tokenizer", path(&tokenizer), "-o", path(&data)]);
    assert!(o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("nowhere.jsonl"));
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"txt\": \"oops\"}\n").unwrap();
    let o = dsc(&["data", "prepare", path(&bad), "--tokenizer", path(&tokenizer), "-o", path(&data)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 2"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn sft_examples_train_with_the_loss_on_responses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sft, data) = (dir.path().join("sft.jsonl"), dir.path().join("sft"));
    let lines: Vec<String> = (0..40)
        .map(|i| {
            serde_json::json!({ "prompt": format!("What is {i} plus {i}?"), "response": format!(" {} is the sum.", 2 * i) })
                .to_string()
        })
        .collect();
    std::fs::write(&sft, lines.join("\n")).unwrap();
    let o = ok(&["data", "prepare", path(&sft), "--tokenizer", "examples/data/tokenizer.json", "-o", path(&data)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("40 documents"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["masked"], true);
    assert_eq!(std::fs::metadata(data.join("mask.bin")).unwrap().len(), meta["tokens"].as_u64().unwrap());
    let source = format!("train.data.sources=[files {{ path = \"{}\" }}]", path(&data));
    let mut args = vec!["train", "models/deepseek-v3-tiny.dsc", "--set", &source, "--steps", "2"];
    args.extend(SMALL);
    let o = ok(&args);
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("step")).count(), 2);
}
