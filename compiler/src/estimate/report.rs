//! The human form of [`Info`]: a short report with aligned columns, counts with SI-style
//! suffixes next to their exact value, memory in binary units, and the pipeline ranks that do not fit
//! in GPU memory marked.

use std::fmt;

use super::memory::RankMemory;
use super::Info;

/// Width of the label column.
const LABEL: usize = 17;

impl fmt::Display for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        let c = &p.components;
        writeln!(f, "{:LABEL$}{}", "model", self.model)?;
        param_row(f, "params", p.total, "main model, embedding and head included")?;
        for (label, count) in [
            ("activated", p.activated),
            ("mtp", p.mtp),
            ("embedding", c.embedding),
            ("head", c.head),
            ("attention", c.attention),
            ("dense ffn", c.dense_ffn),
            ("shared experts", c.shared_experts),
            ("routed experts", c.routed_experts),
            ("router", c.router),
            ("norms", c.norms),
        ] {
            param_row(f, &format!("  {label}"), count, "")?;
        }
        let fl = &self.flops;
        writeln!(
            f,
            "{:LABEL$}{} at seq {} (matmul {}, attention {}, mtp {})",
            "flops per token",
            flop(self.flops_per_token),
            fl.seq_len,
            flop(fl.matmul),
            flop(fl.attention),
            flop(fl.mtp)
        )?;
        writeln!(
            f,
            "{:LABEL$}{} (initial {})",
            "tokens per step",
            grouped(self.tokens_per_step),
            grouped(self.tokens_per_step_initial)
        )?;
        writeln!(
            f,
            "{:LABEL$}{} per step per data-parallel rank (initial {})",
            "micro-batches", self.micro_batches_per_step, self.micro_batches_per_step_initial
        )?;
        writeln!(f, "{:LABEL$}{} per GPU", "memory", bytes_text(self.gpu_memory))?;
        writeln!(
            f,
            "  {:>4} {:>8} {:>9} {:>9} {:>9} {:>14} {:>9}  {:23} parts",
            "rank", "params", "weights", "grads", "optimizer", "activations", "total", "",
        )?;
        self.memory.iter().try_for_each(|rank| memory_row(f, rank, self.gpu_memory))
    }
}

fn param_row(f: &mut fmt::Formatter<'_>, label: &str, count: u64, note: &str) -> fmt::Result {
    let row = format!("{label:LABEL$}{:>8}  {:>15}  {note}", scaled(count, COUNT), grouped(count));
    writeln!(f, "{}", row.trim_end())
}

fn memory_row(f: &mut fmt::Formatter<'_>, rank: &RankMemory, gpu_memory: u64) -> fmt::Result {
    let status = if rank.fits { "fits".to_string() } else { format!("does not fit ({})", bytes_text(gpu_memory)) };
    writeln!(
        f,
        "  {:>4} {:>8} {:>9} {:>9} {:>9} {:>9} ×{:<3} {:>9}  {status:23} {}",
        rank.stage,
        scaled(rank.params, COUNT),
        bytes_text(rank.weights),
        bytes_text(rank.grads),
        bytes_text(rank.optimizer),
        bytes_text(rank.activations),
        rank.in_flight_micro_batches,
        bytes_text(rank.bytes),
        rank.parts
    )
}

/// Suffixes of successive powers of 1000 for parameter counts.
const COUNT: &[&str] = &["", "K", "M", "B", "T"];
/// SI prefixes of successive powers of 1000 for FLOPs.
const FLOP: &[&str] = &["", "k", "M", "G", "T", "P"];

/// `n` with two decimals in the largest power of 1000 not above it, e.g. "671.03B".
fn scaled(n: u64, suffixes: &[&str]) -> String {
    let mut value = n as f64;
    let mut suffix = 0;
    while value >= 1000.0 && suffix + 1 < suffixes.len() {
        value /= 1000.0;
        suffix += 1;
    }
    if suffix == 0 {
        n.to_string()
    } else {
        format!("{value:.2}{}", suffixes[suffix])
    }
}

/// FLOPs, e.g. "2.43 GFLOP".
fn flop(n: u64) -> String {
    let scaled = scaled(n, FLOP);
    let (number, prefix) = scaled.split_at(scaled.trim_end_matches(char::is_alphabetic).len());
    format!("{number} {prefix}FLOP")
}

/// `n` with thousands separators, e.g. "671,026,419,200".
pub(crate) fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let groups: Vec<&str> =
        digits.as_bytes().rchunks(3).rev().map(|group| std::str::from_utf8(group).expect("ASCII digits")).collect();
    groups.join(",")
}

/// Bytes with a binary unit and one decimal, e.g. "80.0 GiB", "12.5 KiB".
pub(crate) fn bytes_text(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let power = (1..units.len()).rev().find(|&p| bytes >= 1u64 << (10 * p)).unwrap_or(0);
    if power == 0 {
        return format!("{bytes} B");
    }
    format!("{:.1} {}", bytes as f64 / (1u64 << (10 * power)) as f64, units[power])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::info;
    use crate::testing;

    #[test]
    fn number_formats() {
        assert_eq!(scaled(671_026_419_200, COUNT), "671.03B");
        assert_eq!(scaled(999, COUNT), "999");
        assert_eq!(grouped(671_026_419_200), "671,026,419,200");
        assert_eq!(grouped(100), "100");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(flop(2_430_000_000), "2.43 GFLOP");
        assert_eq!(flop(12), "12 FLOP");
        assert_eq!(bytes_text(80 << 30), "80.0 GiB");
        assert_eq!(bytes_text(1536), "1.5 KiB");
        assert_eq!(bytes_text(12), "12 B");
    }

    #[test]
    fn deepseek_v3_report() {
        let report = info(&testing::deepseek_v3()).to_string();
        assert!(report.contains("671.03B  671,026,419,200"), "{report}");
        assert!(report.lines().count() <= 40, "{report}");
    }
}
