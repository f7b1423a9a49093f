//! Helpers the CLI-level test files share: running the `dsc` binary from the repository root,
//! the small-run overrides, and reading metrics files.
#![allow(dead_code)] // each test file uses a subset

use std::path::Path;
use std::process::{Command, Output};

/// Overrides that make the tiny model's runs take about a second.
pub const SMALL: [&str; 6] = ["--set", "train.seq_len=16", "--set", "train.batch=4", "--set", "train.micro_batch=2"];

pub fn dsc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsc"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .expect("running dsc")
}

/// Runs dsc and insists that it succeeded.
pub fn ok(args: &[&str]) -> Output {
    let o = dsc(args);
    assert!(o.status.success(), "dsc {args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    o
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The `loss` of each line of a metrics file, as written (so equal text is equal bits).
pub fn losses(metrics: &Path) -> Vec<String> {
    std::fs::read_to_string(metrics)
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line")["loss"].to_string())
        .collect()
}
