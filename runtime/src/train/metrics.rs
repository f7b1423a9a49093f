//! Training metrics as JSON Lines: one [`StepMetrics`] object per optimizer step, written and
//! flushed line by line by [`MetricsWriter`], so that a run can be followed or plotted while it
//! trains and a crash loses at most the line being written. Also the expert-load summaries the
//! step reports ([`load_balance`], [`expert_load`]) and the process's memory
//! ([`resident_memory`]).

use serde::Serialize;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

/// What one optimizer step reports. Losses are in nats per token; a value that is not finite
/// (a diverged loss) is written as `null`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepMetrics {
    /// Optimizer steps done, this one included (a skipped step does not count).
    pub step: u64,
    /// The loss or a gradient was not finite: the step changed no parameter.
    pub skipped: bool,
    /// Next-token cross-entropy of the main model.
    pub loss: f64,
    /// Multi-token-prediction cross-entropy, mean over depths, before weighting by
    /// `mtp_weight` (0 without MTP).
    pub mtp_loss: f64,
    /// Sequence-wise balance loss as added to the total loss (α included).
    pub balance_loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens seen, this step's included.
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// Training FLOP/s achieved: `tokens_per_s` times the model's training FLOPs per token.
    pub flops_per_s: f64,
    /// Model FLOPs utilisation: `flops_per_s` over the device's peak. `None` (JSON `null`) on
    /// the CPU backend, which has no meaningful peak; GPU backends report it.
    pub mfu: Option<f64>,
    /// Resident memory of the process in bytes, where the OS tells it (Linux).
    pub memory_bytes: Option<u64>,
    /// [`ExpertLoad::max`]: the worst layer's routed-expert imbalance (max load / mean load).
    pub expert_load_max: f64,
    /// [`ExpertLoad::mean`]: the imbalance averaged over MoE layers.
    pub expert_load_mean: f64,
    /// λ, the MTP loss weight in force.
    pub mtp_weight: f64,
    /// γ, the speed of the selection-bias update in force.
    pub bias_speed: f64,
}

/// Appends [`StepMetrics`] to a JSONL file, one flushed line each.
pub struct MetricsWriter {
    out: BufWriter<File>,
}

impl MetricsWriter {
    /// Creates (or truncates) the file at `path`.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        Ok(MetricsWriter { out: BufWriter::new(File::create(path)?) })
    }

    /// Continues the file at `path` for a run resumed after `step` optimizer steps: lines of
    /// later steps (written after that checkpoint, before the run stopped) are dropped, so that
    /// every step appears once; then lines are added after the rest.
    pub fn resume(path: impl AsRef<Path>, step: u64) -> io::Result<Self> {
        let path = path.as_ref();
        if path.exists() {
            let text = std::fs::read_to_string(path)?;
            let kept: String = text
                .lines()
                .filter(|line| {
                    let at = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|m| m["step"].as_u64());
                    at.is_none_or(|at| at <= step)
                })
                .map(|line| format!("{line}\n"))
                .collect();
            let tmp = path.with_extension("jsonl.tmp");
            std::fs::write(&tmp, kept)?;
            std::fs::rename(&tmp, path)?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(MetricsWriter { out: BufWriter::new(file) })
    }

    pub fn write(&mut self, metrics: &StepMetrics) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, metrics)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

/// The resident set size of this process, from `/proc/self/statm` (Linux; `None` elsewhere).
pub fn resident_memory() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Imbalance of one MoE layer's routed experts: the most loaded expert's token count over the
/// mean count. 1 when perfectly balanced, the number of experts when one takes every token;
/// 1 also when no token was routed (nothing is imbalanced).
pub fn load_balance(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let max = counts.iter().copied().max().unwrap_or(0);
    if total == 0 {
        return 1.0;
    }
    max as f64 * counts.len() as f64 / total as f64
}

/// [`load_balance`] summarised over the MoE layers of a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertLoad {
    /// The worst layer's imbalance.
    pub max: f64,
    /// The mean over layers of their imbalance (the mean load over the mean load would be 1).
    pub mean: f64,
}

/// The imbalance of each layer's per-expert token counts, summarised; 1 and 1 without MoE
/// layers.
pub fn expert_load(per_layer: &[Vec<u64>]) -> ExpertLoad {
    if per_layer.is_empty() {
        return ExpertLoad { max: 1.0, mean: 1.0 };
    }
    let balances: Vec<f64> = per_layer.iter().map(|counts| load_balance(counts)).collect();
    ExpertLoad {
        max: balances.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        mean: balances.iter().sum::<f64>() / balances.len() as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::fs;
    use std::path::PathBuf;

    fn metrics(step: u64, loss: f64) -> StepMetrics {
        StepMetrics {
            step,
            skipped: false,
            loss,
            mtp_loss: 6.5,
            balance_loss: 1.2e-5,
            lr: 3e-3,
            grad_norm: 0.75,
            tokens: step * 512,
            tokens_per_s: 1234.5,
            flops_per_s: 2.5e9,
            mfu: None,
            memory_bytes: Some(1 << 20),
            expert_load_max: 1.5,
            expert_load_mean: 1.25,
            mtp_weight: 0.3,
            bias_speed: 0.001,
        }
    }

    fn scratch_file(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("dsc-metrics-{}-{name}.jsonl", std::process::id()))
    }

    #[test]
    fn each_step_is_one_json_line() {
        let path = scratch_file("round-trip");
        let mut writer = MetricsWriter::create(&path).expect("create the metrics file");
        writer.write(&metrics(1, 6.25)).expect("write step 1");
        writer.write(&metrics(2, f64::NAN)).expect("write step 2");
        let text = fs::read_to_string(&path).expect("read the metrics back");
        fs::remove_file(&path).expect("remove the metrics file");
        let lines: Vec<Value> =
            text.lines().map(|line| serde_json::from_str(line).expect("a JSON object per line")).collect();
        assert_eq!(
            lines[0],
            json!({
                "step": 1, "skipped": false, "loss": 6.25, "mtp_loss": 6.5, "balance_loss": 1.2e-5, "lr": 3e-3,
                "grad_norm": 0.75, "tokens": 512, "tokens_per_s": 1234.5, "flops_per_s": 2.5e9, "mfu": null,
                "memory_bytes": 1048576, "expert_load_max": 1.5,
                "expert_load_mean": 1.25, "mtp_weight": 0.3, "bias_speed": 0.001
            })
        );
        assert_eq!((lines.len(), &lines[1]["step"], &lines[1]["loss"]), (2, &json!(2), &Value::Null));
    }

    #[test]
    fn a_resumed_file_keeps_the_steps_up_to_the_checkpoint() {
        let path = scratch_file("resume");
        let mut writer = MetricsWriter::create(&path).expect("create");
        for step in 1..=5 {
            writer.write(&metrics(step, 6.0)).expect("write");
        }
        drop(writer);
        let mut writer = MetricsWriter::resume(&path, 3).expect("resume");
        writer.write(&metrics(4, 5.0)).expect("write");
        drop(writer);
        let steps: Vec<(u64, f64)> = fs::read_to_string(&path)
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("JSON"))
            .map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap()))
            .collect();
        fs::remove_file(&path).expect("remove");
        assert_eq!(steps, [(1, 6.0), (2, 6.0), (3, 6.0), (4, 5.0)]);
    }

    #[test]
    fn resident_memory_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            let bytes = resident_memory().expect("statm");
            assert!(bytes > 1 << 20, "{bytes} bytes resident");
        }
    }

    #[test]
    fn load_balance_is_max_over_mean() {
        assert_eq!(load_balance(&[5, 5, 5, 5]), 1.0);
        assert_eq!(load_balance(&[8, 0, 0, 0]), 4.0);
        assert_eq!(load_balance(&[3, 1]), 1.5);
        assert_eq!(load_balance(&[0, 0, 0]), 1.0);
        assert_eq!(load_balance(&[]), 1.0);
    }

    #[test]
    fn expert_load_summarises_layers() {
        let load = expert_load(&[vec![5, 5, 5, 5], vec![8, 0, 0, 0], vec![3, 1, 2, 2]]);
        assert_eq!(load, ExpertLoad { max: 4.0, mean: (1.0 + 4.0 + 1.5) / 3.0 });
        assert_eq!(expert_load(&[]), ExpertLoad { max: 1.0, mean: 1.0 });
    }
}
