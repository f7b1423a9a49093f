//! UI tests for diagnostics: each `tests/ui/NAME.dsc` holds one mistake (its first line says
//! which; an `// args:` line adds command-line arguments). `dsc check` must print exactly
//! `tests/ui/NAME.stderr` and exit with 1, or with 0 where that output holds warnings only. After an intended change to diagnostics, run
//! `DSC_BLESS=1 cargo test --test ui` to rewrite the expected files, and review the diff.

use std::path::{Path, PathBuf};
use std::process::Command;

fn dsc_check(file: &Path) -> (Option<i32>, String) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let args: Vec<String> = text
        .lines()
        .find_map(|l| l.strip_prefix("// args: "))
        .map(|a| a.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let output = Command::new(env!("CARGO_BIN_EXE_dsc"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["check", "--color", "never"])
        .arg(file.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(file))
        .args(args)
        .output()
        .expect("running dsc");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/ui")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "dsc"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_mistake_gets_its_expected_diagnostics() {
    let bless = std::env::var_os("DSC_BLESS").is_some();
    let mut failures = vec![];
    let cases = cases();
    assert!(cases.len() >= 25, "only {} UI cases", cases.len());
    for file in &cases {
        let (code, stderr) = dsc_check(file);
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        if stderr.contains("panicked") {
            failures.push(format!("{name}: dsc panicked\n{stderr}"));
        }
        let expected_path = file.with_extension("stderr");
        if bless {
            std::fs::write(&expected_path, &stderr).expect("writing expected output");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        let expected_code = if expected.lines().any(|line| line.starts_with("error")) { 1 } else { 0 };
        if code != Some(expected_code) {
            failures.push(format!("{name}: exit code {code:?}, expected {expected_code}\n{stderr}"));
        }
        if expected != stderr {
            failures.push(format!("{name}: output differs\n--- expected\n{expected}\n--- actual\n{stderr}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} UI case(s) failed (DSC_BLESS=1 to accept):\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}
