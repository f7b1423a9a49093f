//! Where the GPU's time goes, when asked (`dsc train --profile`; the machines it runs on have
//! no Nsight). Every kernel a plan function runs is bracketed by two timing events on the
//! stream; its category (the function and the op of the kernel's first node: `layer1.bwd
//! grouped_matmul`) gets the GPU time between them, the host time its launch took (for a
//! library GEMM: its calls into cuBLAS, and a grouped GEMM's offsets read back), and the
//! roofline estimate the plan made for it. The events are read when a top-level call ends
//! (one more synchronisation per call than without the profile). The first call of each kind
//! is the warm-up (PTX compiled, GEMM algorithms found): its time is reported alone and its
//! kernels are left out of the table. The report lists the categories by GPU time, with the
//! calls' host time: what the kernels do not cover of it is the stream waiting for the host.
//! It also times the gaps between one measured kernel's end and the next one's start (the
//! stream idle, waiting for the host, or running what is not measured), each named by what
//! follows it: the kernel's category, or the top-level call that ended before it. A gap after
//! a call holds the profile's own reading back of the call's events, which the report gives
//! beside them (without the profile the stream does not wait for it). Last, the costliest
//! kernels by name: a category's kernels apart (the five by-expert quantisations of a layer's
//! backward are one category, and were not alike).

use super::GpuError;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

/// Kernels measured, not yet read back.
struct Pending {
    category: String,
    kernel: Option<String>,
    start: Arc<CudaEvent>,
    end: Arc<CudaEvent>,
    host_s: f64,
    estimate_s: f64,
}

/// A gap between two measured kernels, not yet read back: `after`'s end to `before`'s start.
struct Gap {
    category: String,
    after: Arc<CudaEvent>,
    before: Arc<CudaEvent>,
}

#[derive(Clone, Copy, Default)]
struct Total {
    launches: usize,
    gpu_s: f64,
    host_s: f64,
    estimate_s: f64,
}

/// Top-level calls of one kind: how many after the first, their host time, and the first
/// one's (compiling the PTX, finding GEMM algorithms).
#[derive(Clone, Copy, Default)]
struct Calls {
    count: usize,
    host_s: f64,
    first_s: Option<f64>,
}

#[derive(Default)]
pub struct Profile {
    pending: Vec<Pending>,
    totals: BTreeMap<String, Total>,
    /// The plan's kernels by name (the executor's own passes are not kernels of the plan).
    kernels: BTreeMap<String, Total>,
    calls: BTreeMap<String, Calls>,
    gaps: Vec<Gap>,
    /// The gaps' count and GPU seconds by what follows them.
    gap_totals: BTreeMap<String, (usize, f64)>,
    /// The last measured kernel's end, which the next one's gap starts from.
    last_end: Option<Arc<CudaEvent>>,
    /// The top-level call that ended since the last measured kernel, if one did.
    ended_call: Option<String>,
    /// Host seconds spent reading the events back.
    readback_s: f64,
}

impl Profile {
    /// Runs `launch` (which enqueues work on `stream`), timing it as `category` and, where it
    /// is a kernel of the plan, as that kernel.
    pub fn measure<R>(
        &mut self,
        stream: &Arc<CudaStream>,
        category: String,
        kernel: Option<String>,
        estimate_s: f64,
        launch: impl FnOnce() -> Result<R, GpuError>,
    ) -> Result<R, GpuError> {
        let start = Arc::new(stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?);
        if let Some(after) = self.last_end.take() {
            let follows = match self.ended_call.take() {
                Some(call) => format!("after a call: {call}"),
                None => category.clone(),
            };
            self.gaps.push(Gap { category: follows, after, before: start.clone() });
        }
        let started = Instant::now();
        let result = launch()?;
        let host_s = started.elapsed().as_secs_f64();
        let end = Arc::new(stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?);
        self.last_end = Some(end.clone());
        self.pending.push(Pending { category, kernel, start, end, host_s, estimate_s });
        Ok(result)
    }

    /// Reads back what the kernels measured since the last time, and counts a top-level call
    /// of kind `call` that took `call_s` on the host (the first of its kind as the warm-up).
    pub fn settle(&mut self, call: &str, call_s: f64) -> Result<(), GpuError> {
        let started = Instant::now();
        let result = self.read_back(call, call_s);
        self.readback_s += started.elapsed().as_secs_f64();
        result
    }

    fn read_back(&mut self, call: &str, call_s: f64) -> Result<(), GpuError> {
        self.ended_call = Some(call.to_string());
        let calls = self.calls.entry(call.to_string()).or_default();
        if calls.first_s.is_none() {
            calls.first_s = Some(call_s);
            self.pending.clear();
            self.gaps.clear();
            return Ok(());
        }
        calls.count += 1;
        calls.host_s += call_s;
        for p in self.pending.drain(..) {
            let gpu_s = f64::from(p.start.elapsed_ms(&p.end)?) / 1e3;
            let one = Total { launches: 1, gpu_s, host_s: p.host_s, estimate_s: p.estimate_s };
            let total = self.totals.entry(p.category).or_default();
            *total = add(*total, &one);
            if let Some(kernel) = p.kernel {
                let total = self.kernels.entry(kernel).or_default();
                *total = add(*total, &one);
            }
        }
        for gap in self.gaps.drain(..) {
            let total = self.gap_totals.entry(gap.category).or_default();
            total.0 += 1;
            total.1 += f64::from(gap.after.elapsed_ms(&gap.before)?) / 1e3;
        }
        Ok(())
    }

    /// The table: per category (the `rows` costliest, then the rest together) launches, GPU
    /// time, its share, host time spent launching, the plan's estimate; then the totals, the
    /// calls, the gaps, and the `rows / 2` costliest kernels in the same columns.
    pub fn report(&self, rows: usize) -> String {
        let categories = by_gpu_time(&self.totals);
        let all = categories.iter().fold(Total::default(), |sum, (_, t)| add(sum, t));
        let rest = categories.iter().skip(rows).fold(Total::default(), |sum, (_, t)| add(sum, t));
        let line = |out: &mut String, name: &str, t: &Total| {
            let share = if all.gpu_s > 0.0 { t.gpu_s / all.gpu_s } else { 0.0 };
            let _ = writeln!(
                out,
                "{name:<44} {:>9} {:>11.2} {:>5.1}% {:>11.2} {:>12.2}",
                t.launches,
                t.gpu_s * 1e3,
                share * 1e2,
                t.host_s * 1e3,
                t.estimate_s * 1e3
            );
        };
        let head = |what: &str| {
            format!(
                "{what:<44} {:>9} {:>11} {:>6} {:>11} {:>12}\n",
                "launches", "GPU ms", "share", "launch ms", "roofline ms"
            )
        };
        let mut out = head("kernels (function, first op)");
        for (name, total) in categories.iter().take(rows) {
            line(&mut out, name, total);
        }
        if rest.launches > 0 {
            line(&mut out, &format!("({} other categories)", categories.len() - rows), &rest);
        }
        line(&mut out, "all kernels", &all);
        let host_s: f64 = self.calls.values().map(|c| c.host_s).sum();
        for (call, c) in &self.calls {
            let _ = writeln!(
                out,
                "{call}: {} calls after the first, {:.2} ms on the host (the first alone {:.2} ms)",
                c.count,
                c.host_s * 1e3,
                c.first_s.unwrap_or_default() * 1e3
            );
        }
        let covered = if host_s > 0.0 { all.gpu_s / host_s * 1e2 } else { 0.0 };
        let _ = writeln!(out, "the kernels' GPU time covers {covered:.1}% of the calls' host time");
        let mut gaps: Vec<(&String, &(usize, f64))> = self.gap_totals.iter().collect();
        gaps.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let (count, gap_s) = gaps.iter().fold((0, 0.0), |(n, s), (_, (m, t))| (n + m, s + t));
        let _ = writeln!(
            out,
            "gaps between the kernels (the stream idle or running what is not measured): {count}, {:.2} ms, {:.2} ms of it the \
             profile reading its events back after the calls; the largest by what follows them:",
            gap_s * 1e3,
            self.readback_s * 1e3
        );
        for (follows, (n, s)) in gaps.iter().take(rows.min(8)) {
            let _ = writeln!(out, "  {follows:<42} {n:>9} {:>11.2}", s * 1e3);
        }
        out.push_str(&head("the costliest kernels"));
        for (name, total) in by_gpu_time(&self.kernels).iter().take(rows / 2) {
            line(&mut out, name, total);
        }
        out
    }
}

/// `totals`, the costliest first.
fn by_gpu_time(totals: &BTreeMap<String, Total>) -> Vec<(&String, &Total)> {
    let mut by_time: Vec<(&String, &Total)> = totals.iter().collect();
    by_time.sort_by(|a, b| b.1.gpu_s.total_cmp(&a.1.gpu_s));
    by_time
}

fn add(sum: Total, t: &Total) -> Total {
    Total {
        launches: sum.launches + t.launches,
        gpu_s: sum.gpu_s + t.gpu_s,
        host_s: sum.host_s + t.host_s,
        estimate_s: sum.estimate_s + t.estimate_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_orders_categories_by_gpu_time_and_sums_the_rest() {
        let mut profile = Profile::default();
        for (name, gpu_s) in [("a", 1e-3), ("b", 3e-3), ("c", 2e-3), ("d", 0.5e-3)] {
            profile.totals.insert(name.into(), Total { launches: 2, gpu_s, host_s: 1e-4, estimate_s: 1e-3 });
        }
        profile.calls.insert("gradients".into(), Calls { count: 1, host_s: 10e-3, first_s: Some(20e-3) });
        for (follows, gap_s) in [("a", 0.1e-3), ("after a call: gradients", 0.4e-3), ("b", 0.2e-3)] {
            profile.gap_totals.insert(follows.into(), (3, gap_s));
        }
        profile.readback_s = 0.3e-3;
        for (name, gpu_s) in [("b_1", 2e-3), ("b_2", 1e-3), ("c_1", 2.5e-3)] {
            profile.kernels.insert(name.into(), Total { launches: 1, gpu_s, host_s: 1e-4, estimate_s: 1e-3 });
        }
        let report = profile.report(2);
        let lines: Vec<&str> = report.lines().collect();
        assert!(lines[1].starts_with("b ") && lines[2].starts_with("c "), "{report}");
        assert!(lines[3].starts_with("(2 other categories)") && lines[3].contains("1.50"), "{report}");
        assert!(lines[4].starts_with("all kernels") && lines[4].contains("6.50"), "{report}");
        assert!(lines[5].starts_with("gradients: 1 calls after the first, 10.00 ms"), "{report}");
        assert!(lines[6].contains("covers 65.0%"), "{report}");
        assert!(
            lines[7].starts_with("gaps between the kernels") && lines[7].contains(": 9, 0.70 ms, 0.30 ms of it"),
            "{report}"
        );
        assert!(lines[8].trim_start().starts_with("after a call: gradients") && lines[8].ends_with("0.40"), "{report}");
        assert!(lines[9].trim_start().starts_with("b "), "{report}");
        // The costliest kernels: rows / 2 of them, in the categories' columns.
        assert!(lines[10].starts_with("the costliest kernels") && lines[10].contains("roofline ms"), "{report}");
        assert!(lines[11].starts_with("c_1 ") && lines[11].contains("2.50") && lines.len() == 12, "{report}");
    }
}
