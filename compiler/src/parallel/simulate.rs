//! The cluster simulator behind `dsc simulate`: generates and checks a spec's schedule, runs it
//! with the cost model ([`Costs::of`]) and reports one training step: its time, the pipeline
//! bubble, memory per GPU (activations from the schedule's peaks), the bytes of each MoE
//! all-to-all and the GPU-hours a trillion tokens take. [`Simulation`]'s serde form is the JSON
//! of `dsc simulate --format json`; its `Display` form is the table.

use std::fmt;

use dsc_lang::{PipelineSchedule, Spec};
use serde::Serialize;

use super::check::{self, CheckError};
use super::cost::{AllToAll, Cluster, Costs, StageTimes};
use super::execute::{self, Durations, Run};
use super::schedule::{GenerateError, Instruction, Schedule};
use super::stages::{self, describe, Stage};
use crate::estimate::report::{bytes_text, grouped};
use crate::estimate::{self, memory};

/// The busy and idle time of each rank in one run of a schedule.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timing {
    /// From the start to the end of the last compute chunk of any rank.
    pub pipeline_seconds: f64,
    /// To the end of the step's ZeRO collectives.
    pub step_seconds: f64,
    /// Per rank: time spent in compute chunks.
    pub busy_seconds: Vec<f64>,
    /// Per rank: `pipeline_seconds` − busy, the rank's share of the bubble.
    pub idle_seconds: Vec<f64>,
}

impl Timing {
    pub fn of(schedule: &Schedule, run: &Run) -> Timing {
        let is_compute = |rank: usize, index: usize| matches!(schedule.programs[rank][index], Instruction::Compute(_));
        let computes = |rank: usize| run.spans[rank].iter().filter(move |span| is_compute(rank, span.instruction));
        let pipeline_seconds = (0..schedule.ranks).flat_map(computes).map(|span| span.end).fold(0.0, f64::max);
        let step_seconds = run.spans.iter().flatten().map(|span| span.end).fold(0.0, f64::max);
        let busy_seconds: Vec<f64> =
            (0..schedule.ranks).map(|rank| computes(rank).map(|span| span.end - span.start).sum()).collect();
        let idle_seconds = busy_seconds.iter().map(|busy| pipeline_seconds - busy).collect();
        Timing { pipeline_seconds, step_seconds, busy_seconds, idle_seconds }
    }

    /// The pipeline bubble: the idle time of the most idle rank.
    pub fn bubble_seconds(&self) -> f64 {
        self.idle_seconds.iter().copied().fold(0.0, f64::max)
    }
}

/// Checks `schedule` and runs it with `durations`.
pub fn run(schedule: &Schedule, durations: &impl Durations) -> Result<(Run, Timing), SimulateError> {
    check::check(schedule).map_err(SimulateError::Check)?;
    let run = execute::run(schedule, durations)
        .map_err(|_| SimulateError::Check(CheckError("the schedule deadlocks with these durations".into())))?;
    let timing = Timing::of(schedule, &run);
    Ok((run, timing))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimulateError {
    /// No schedule of the spec's kind exists for its sizes.
    Generate(GenerateError),
    /// The generated schedule is wrong (a compiler bug).
    Check(CheckError),
}

impl fmt::Display for SimulateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimulateError::Generate(e) => write!(f, "{e}"),
            SimulateError::Check(e) => write!(f, "the generated schedule is wrong (a compiler bug): {e}"),
        }
    }
}

impl std::error::Error for SimulateError {}

/// One stage's chunk times.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageReport {
    pub stage: usize,
    pub parts: String,
    pub moe_layers: u64,
    pub times: StageTimes,
}

/// One pipeline rank's GPU memory at its peak, bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RankReport {
    pub rank: usize,
    pub parts: String,
    /// Copies of parameters: 2 with DualPipe (a stage of each direction).
    pub stages_held: usize,
    pub weights: u64,
    pub grads: u64,
    pub optimizer: u64,
    /// The schedule's peak of activations in flight.
    pub activations: u64,
    pub peak_micro_batches: usize,
    pub total: u64,
    pub fits: bool,
    pub idle_seconds: f64,
}

/// What one training step does on the cluster.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Simulation {
    pub model: String,
    pub schedule: PipelineSchedule,
    pub gpus: u64,
    pub nodes: u64,
    pub pipeline_ranks: usize,
    pub data_parallel: u64,
    pub expert_parallel: u64,
    /// Micro-batches per step on each pipeline (all directions).
    pub micro_batches: usize,
    pub tokens_per_step: u64,
    pub cluster: Cluster,
    pub stages: Vec<StageReport>,
    pub step_seconds: f64,
    pub pipeline_seconds: f64,
    /// The most idle rank's idle time (the pipeline bubble).
    pub bubble_seconds: f64,
    /// The idle time of all ranks together.
    pub bubble_total_seconds: f64,
    /// Idle time of all ranks over their time in the pipeline.
    pub bubble_fraction: f64,
    pub ranks: Vec<RankReport>,
    /// One MoE layer's dispatch and combine for one micro-batch, per GPU.
    pub dispatch: AllToAll,
    pub combine: AllToAll,
    /// All-to-all bytes per GPU per step, over IB and over NVLink.
    pub all_to_all_ib_bytes_per_step: f64,
    pub all_to_all_nvlink_bytes_per_step: f64,
    /// Activations or gradients between neighbouring stages, per micro-batch.
    pub stage_transfer_bytes: f64,
    /// Training FLOPs done per second over the GPUs' dense FP8 peak.
    pub model_flops_utilisation: f64,
    pub gpu_hours_per_trillion_tokens: f64,
}

/// The schedule of one step of `spec` once its batch ramp (if any) has ended.
pub fn schedule_of(spec: &Spec) -> Result<Schedule, GenerateError> {
    let micro_batches = estimate::info(spec).micro_batches_per_step as usize;
    Schedule::generate(spec.parallel.pipeline.schedule, stages::split(spec).len(), micro_batches)
}

/// The schedule, its run and the report for `spec` on `cluster`.
pub fn simulate(spec: &Spec, cluster: &Cluster) -> Result<(Schedule, Run, Simulation), SimulateError> {
    let info = estimate::info(spec);
    let stages = stages::split(spec);
    let parallel = &spec.parallel;
    let schedule = schedule_of(spec).map_err(SimulateError::Generate)?;
    let costs = Costs::of(spec, &stages, cluster);
    let (run, timing) = run(&schedule, &costs)?;
    let ranks = rank_reports(spec, &stages, &schedule, &timing);
    let moe_chunks: u64 = costs.moe_layers.iter().sum::<u64>() * schedule.micro_batches_per_direction() as u64;
    // Each MoE layer of each micro-batch: dispatch and combine forward, two combine-sized
    // all-to-alls backward; spread over the ranks of one pipeline.
    let per_gpu = |bytes: fn(&AllToAll) -> f64| {
        let per_layer = bytes(&costs.dispatch) + 3.0 * bytes(&costs.combine);
        moe_chunks as f64 * per_layer * schedule.directions().len() as f64 / schedule.ranks as f64
    };
    let tokens_per_step = info.tokens_per_step;
    let step = timing.step_seconds;
    let flops_per_second = info.flops_per_token as f64 * tokens_per_step as f64 / step;
    let gpus = parallel.gpus();
    let simulation = Simulation {
        model: spec.model.name.clone(),
        schedule: parallel.pipeline.schedule,
        gpus,
        nodes: parallel.nodes,
        pipeline_ranks: schedule.ranks,
        data_parallel: parallel.data.size,
        expert_parallel: parallel.expert.size,
        micro_batches: schedule.micro_batches,
        tokens_per_step,
        cluster: *cluster,
        stages: stages
            .iter()
            .zip(&costs.stages)
            .zip(&costs.moe_layers)
            .map(|((stage, &times), &moe_layers)| StageReport {
                stage: stage.index as usize,
                parts: describe(&stage.parts),
                moe_layers,
                times,
            })
            .collect(),
        step_seconds: step,
        pipeline_seconds: timing.pipeline_seconds,
        bubble_seconds: timing.bubble_seconds(),
        bubble_total_seconds: timing.idle_seconds.iter().sum(),
        bubble_fraction: timing.idle_seconds.iter().sum::<f64>() / (timing.pipeline_seconds * schedule.ranks as f64),
        ranks,
        dispatch: costs.dispatch,
        combine: costs.combine,
        all_to_all_ib_bytes_per_step: per_gpu(|a| a.ib_bytes),
        all_to_all_nvlink_bytes_per_step: per_gpu(|a| a.nvlink_bytes),
        stage_transfer_bytes: costs.transfer_bytes,
        model_flops_utilisation: flops_per_second / (gpus as f64 * cluster.device.fp8_flops),
        gpu_hours_per_trillion_tokens: step * gpus as f64 / 3600.0 * 1e12 / tokens_per_step as f64,
    };
    Ok((schedule, run, simulation))
}

fn rank_reports(spec: &Spec, stages: &[Stage], schedule: &Schedule, timing: &Timing) -> Vec<RankReport> {
    let resident = memory::per_rank(spec, stages);
    let per_micro: Vec<u64> = stages.iter().map(|stage| memory::activation_bytes(spec, stage)).collect();
    let activations = check::activation_peaks(schedule, |_, stage| per_micro[stage]);
    let in_flight = check::activation_peaks(schedule, |_, _| 1);
    (0..schedule.ranks)
        .map(|rank| {
            let r = &resident[rank];
            let total = r.weights + r.grads + r.optimizer + activations[rank];
            RankReport {
                rank,
                parts: r.parts.clone(),
                stages_held: schedule.held(rank).count(),
                weights: r.weights,
                grads: r.grads,
                optimizer: r.optimizer,
                activations: activations[rank],
                peak_micro_batches: in_flight[rank] as usize,
                total,
                fits: total <= spec.parallel.gpu.memory_bytes,
                idle_seconds: timing.idle_seconds[rank],
            }
        })
        .collect()
}

/// Width of the label column.
const LABEL: usize = 18;

fn schedule_name(schedule: PipelineSchedule) -> &'static str {
    match schedule {
        PipelineSchedule::OneFOneB => "1F1B",
        PipelineSchedule::Zb1p => "ZB1P",
        PipelineSchedule::Dualpipe => "DualPipe",
    }
}

fn milliseconds(seconds: f64) -> String {
    format!("{:.2}", seconds * 1e3)
}

fn bytes(bytes: f64) -> String {
    bytes_text(bytes.round() as u64)
}

impl fmt::Display for Simulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.cluster;
        writeln!(f, "{:LABEL$}{}", "model", self.model)?;
        writeln!(
            f,
            "{:LABEL$}{} GPUs ({} nodes × {}): {} PP {} × DP {}, EP {}",
            "plan",
            self.gpus,
            self.nodes,
            c.gpus_per_node,
            schedule_name(self.schedule),
            self.pipeline_ranks,
            self.data_parallel,
            self.expert_parallel
        )?;
        writeln!(
            f,
            "{:LABEL$}{}: {} TFLOP/s FP8, {} BF16, {} TB/s; NVLink {} GB/s, IB {} GB/s per GPU",
            "cluster",
            c.gpu,
            c.device.fp8_flops / 1e12,
            c.device.bf16_flops / 1e12,
            c.device.bandwidth / 1e12,
            c.nvlink.bytes_per_second / 1e9,
            c.ib.bytes_per_second / 1e9
        )?;
        writeln!(
            f,
            "{:LABEL$}{} micro-batches per pipeline, {} tokens",
            "step",
            self.micro_batches,
            grouped(self.tokens_per_step)
        )?;
        writeln!(
            f,
            "{:LABEL$}{:.3} s (pipeline {:.3} s, then ZeRO-1 {:.3} s)",
            "step time",
            self.step_seconds,
            self.pipeline_seconds,
            self.step_seconds - self.pipeline_seconds
        )?;
        writeln!(
            f,
            "{:LABEL$}{:.3} s on the most idle rank, {:.3} s over all {} ranks: {:.1}% of their pipeline time",
            "bubble",
            self.bubble_seconds,
            self.bubble_total_seconds,
            self.pipeline_ranks,
            100.0 * self.bubble_fraction
        )?;
        for (label, a) in [("dispatch", &self.dispatch), ("combine", &self.combine)] {
            writeln!(
                f,
                "{:LABEL$}{} IB + {} NVLink, {} ms per MoE layer and micro-batch",
                label,
                bytes(a.ib_bytes),
                bytes(a.nvlink_bytes),
                milliseconds(a.seconds)
            )?;
        }
        writeln!(
            f,
            "{:LABEL$}{} IB + {} NVLink per GPU per step (backward included)",
            "all-to-all",
            bytes(self.all_to_all_ib_bytes_per_step),
            bytes(self.all_to_all_nvlink_bytes_per_step)
        )?;
        writeln!(f, "{:LABEL$}{} per micro-batch", "stage transfer", bytes(self.stage_transfer_bytes))?;
        writeln!(f, "{:LABEL$}{:.1}% of the FP8 peak", "MFU", 100.0 * self.model_flops_utilisation)?;
        writeln!(
            f,
            "{:LABEL$}{} per trillion tokens",
            "GPU-hours",
            grouped(self.gpu_hours_per_trillion_tokens.round() as u64)
        )?;
        writeln!(
            f,
            "  {:>5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9}  parts",
            "stage", "moe", "F ms", "B ms", "W ms", "F a2a", "B a2a"
        )?;
        for s in &self.stages {
            let t = &s.times;
            writeln!(
                f,
                "  {:>5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
                s.stage,
                s.moe_layers,
                milliseconds(t.forward.total()),
                milliseconds(t.backward.total()),
                milliseconds(t.weight),
                milliseconds(t.forward.comm),
                milliseconds(t.backward.comm),
                s.parts
            )?;
        }
        writeln!(
            f,
            "  {:>5} {:>9} {:>9} {:>9} {:>14} {:>9}  {:11} {:>8}",
            "rank", "weights", "grads", "optimizer", "activations", "total", "", "idle s"
        )?;
        for r in &self.ranks {
            writeln!(
                f,
                "  {:>5} {:>9} {:>9} {:>9} {:>9} ×{:<3} {:>9}  {:11} {:>8.3}",
                r.rank,
                bytes_text(r.weights),
                bytes_text(r.grads),
                bytes_text(r.optimizer),
                bytes_text(r.activations),
                r.peak_micro_batches,
                bytes_text(r.total),
                if r.fits { "fits" } else { "does not fit" },
                r.idle_seconds
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::cost::Split;
    use crate::parallel::schedule::{Compute, Direction, Micro};
    use crate::testing;

    /// Chunk times as (forward compute, forward all-to-all, backward compute, backward
    /// all-to-all, weight gradient), in dyadic fractions so that every sum is exact.
    fn times(fc: f64, fm: f64, bc: f64, bm: f64, weight: f64) -> StageTimes {
        StageTimes { forward: Split { compute: fc, comm: fm }, backward: Split { compute: bc, comm: bm }, weight }
    }

    /// The simulated bubble of `kind` with equal stages and free transfers, and the F, B, W and
    /// F&B the cost model gives those chunks.
    fn simulated(kind: PipelineSchedule, ranks: usize, micro_batches: usize, stage: StageTimes) -> (f64, [f64; 4]) {
        let schedule = Schedule::generate(kind, ranks, micro_batches).expect("a valid size");
        let costs = Costs::uniform(ranks, stage);
        let (_, timing) = run(&schedule, &costs).expect("the schedule checks and runs");
        let micro = |index| Micro { direction: Direction::Down, index };
        let time = |chunk| costs.compute(0, &chunk);
        let fb = time(Compute::ForwardBackward { forward: micro(0), backward: micro(1) });
        let figures = [time(Compute::Forward(micro(0))), time(Compute::Backward(micro(0))), stage.weight, fb];
        (timing.bubble_seconds(), figures)
    }

    /// F, B, W of several ratios (B ≥ W; the all-to-all makes F&B shorter than F + B).
    const CHUNKS: [(f64, f64, f64, f64, f64); 5] = [
        (1.0, 0.0, 2.0, 0.0, 1.0),
        (2.0, 0.0, 3.0, 0.0, 1.0),
        (3.0, 2.0, 7.0, 4.0, 3.0),
        (0.5, 0.5, 1.5, 0.5, 0.5),
        (1.0, 0.25, 2.0, 1.0, 0.75),
    ];

    #[test]
    fn one_f_one_b_bubble_is_the_table_formula() {
        for ranks in [4, 8, 16] {
            for micro_batches in [ranks, 2 * ranks + 3] {
                for (fc, fm, bc, bm, w) in CHUNKS {
                    let (bubble, [f, b, _, _]) =
                        simulated(PipelineSchedule::OneFOneB, ranks, micro_batches, times(fc, fm, bc, bm, w));
                    assert_eq!(bubble, (ranks - 1) as f64 * (f + b), "PP {ranks}, {micro_batches} micro-batches");
                }
            }
        }
    }

    #[test]
    fn zb1p_bubble_is_the_table_formula() {
        for ranks in [4, 8, 16] {
            for micro_batches in [ranks, 2 * ranks + 3] {
                for (fc, fm, bc, bm, w) in CHUNKS {
                    let (bubble, [f, b, w, _]) =
                        simulated(PipelineSchedule::Zb1p, ranks, micro_batches, times(fc, fm, bc, bm, w));
                    let formula = (ranks - 1) as f64 * (f + b - 2.0 * w);
                    assert_eq!(bubble, formula, "PP {ranks}, {micro_batches} micro-batches, F {f} B {b} W {w}");
                }
            }
        }
    }

    /// The DualPipe figure's proportions: a forward as long as an input-gradient backward
    /// (F = B − W), and an overlapped pair no shorter than a backward (B ≤ F&B ≤ F + B). The
    /// bubble is that of the middle ranks, the most idle (ranks nearer the ends overlap more
    /// pairs).
    #[test]
    fn dualpipe_bubble_is_the_table_formula() {
        let chunks = [
            (1.0, 0.0, 2.0, 0.0, 1.0),   // F 1, B 2, W 1, F&B 3
            (2.0, 0.0, 3.0, 0.0, 1.0),   // F 2, B 3, W 1, F&B 5
            (0.5, 0.5, 1.5, 0.5, 1.0),   // F 1, B 2, W 1, F&B 2
            (0.75, 0.25, 1.5, 0.5, 1.0), // F 1, B 2, W 1, F&B 2.25
            (1.5, 0.5, 2.5, 1.5, 2.0),   // F 2, B 4, W 2, F&B 4
            (2.0, 1.0, 4.0, 1.0, 2.0),   // F 3, B 5, W 2, F&B 6
        ];
        for ranks in [4, 8, 16] {
            for micro_batches in [2 * ranks, 2 * ranks + 6, 6 * ranks] {
                for (fc, fm, bc, bm, w) in chunks {
                    let (bubble, [f, b, w, fb]) =
                        simulated(PipelineSchedule::Dualpipe, ranks, micro_batches, times(fc, fm, bc, bm, w));
                    assert_eq!(f, b - w);
                    let formula = (ranks / 2 - 1) as f64 * (fb + b - 3.0 * w);
                    assert_eq!(
                        bubble, formula,
                        "PP {ranks}, {micro_batches} micro-batches, F {f} B {b} W {w} F&B {fb}"
                    );
                }
            }
        }
    }

    /// The table's memory columns: parameter copies 1× (2× for DualPipe) and peak activations
    /// PP micro-batches (PP + 1 for DualPipe); and `dsc info`'s estimate keeps the same counts
    /// rank by rank.
    #[test]
    fn memory_multiples_are_the_table_figures() {
        for (kind, copies, peak) in
            [(PipelineSchedule::OneFOneB, 1, 0), (PipelineSchedule::Zb1p, 1, 0), (PipelineSchedule::Dualpipe, 2, 1)]
        {
            for ranks in [4, 8, 16] {
                let schedule = Schedule::generate(kind, ranks, 4 * ranks).expect("a valid size");
                let peaks = check::check(&schedule).expect("checks");
                assert_eq!(peaks.iter().max(), Some(&(ranks + peak)), "{kind:?} PP {ranks}");
                assert!((0..ranks).all(|rank| schedule.held(rank).count() == copies), "{kind:?} PP {ranks}");
                let mut spec = testing::deepseek_v3();
                spec.parallel.pipeline.schedule = kind;
                spec.parallel.pipeline.stages = ranks as u64;
                let estimated: Vec<usize> = memory::per_rank(&spec, &stages::split(&spec))
                    .iter()
                    .map(|rank| rank.in_flight_micro_batches as usize)
                    .collect();
                assert_eq!(estimated, peaks, "{kind:?} PP {ranks}");
            }
        }
    }

    #[test]
    fn deepseek_v3_step() {
        let spec = testing::deepseek_v3();
        let (schedule, run, simulation) = simulate(&spec, &Cluster::of(&spec.parallel)).expect("simulates");
        assert_eq!(schedule.ranks, 16);
        assert_eq!(simulation.micro_batches, 120);
        assert_eq!(run.spans.len(), 16);
        // Every rank holds two stages, keeps 17 micro-batches at its peak and fits in 80 GiB.
        assert!(simulation.ranks.iter().all(|rank| rank.stages_held == 2 && rank.peak_micro_batches == 17));
        assert!(simulation.ranks.iter().all(|rank| rank.fits), "{simulation}");
        // The step is the pipeline plus ZeRO-1; GPU-hours follow from it.
        assert!(simulation.step_seconds > simulation.pipeline_seconds);
        let hours = simulation.step_seconds * 2048.0 / 3600.0 * 1e12 / simulation.tokens_per_step as f64;
        assert!((simulation.gpu_hours_per_trillion_tokens - hours).abs() < 1e-6 * hours);
        // Node-limited dispatch: each token crosses IB to at most 4 nodes (3.5 remote on
        // average of 8), FP8 with one f32 scale per 128 channels; combine in BF16.
        let tokens = 4096.0;
        assert_eq!(simulation.dispatch.ib_bytes, tokens * 3.5 * (7168.0 + 56.0 * 4.0));
        assert_eq!(simulation.combine.ib_bytes, tokens * 3.5 * 7168.0 * 2.0);
        let json = serde_json::to_value(&simulation).expect("serialises");
        for key in ["step_seconds", "bubble_seconds", "bubble_fraction", "gpu_hours_per_trillion_tokens"] {
            assert!(json[key].is_f64(), "{key}");
        }
        assert_eq!(json["ranks"].as_array().map(Vec::len), Some(16));
    }

    /// The spec's GPU picks the cluster. DeepSeek-V3's plan crosses IB with every transfer
    /// (pipeline neighbours and ZeRO-1 groups span nodes; NVLink only forwards what IB brings
    /// to a node), so it takes as long on H100s as on H800s, and less on H200s (more memory
    /// bandwidth for the memory-bound kernels). On one node the H100's NVLink 4 shortens the
    /// all-to-alls.
    #[test]
    fn the_spec_gpu_picks_the_cluster() {
        let step = |gpu: &str, one_node: bool| {
            let mut spec = testing::deepseek_v3();
            spec.parallel.gpu.name = gpu.into();
            if one_node {
                let par = &mut spec.parallel;
                (par.nodes, par.pipeline.stages, par.data.size) = (1, 8, 1);
                (par.expert.size, par.expert.max_nodes) = (8, 1);
            }
            simulate(&spec, &Cluster::of(&spec.parallel)).expect("simulates").2
        };
        let (h800, h100, h200) = (step("h800", false), step("h100", false), step("h200", false));
        assert_eq!((h800.cluster.gpu, h100.cluster.gpu, h200.cluster.gpu), ("H800", "H100", "H200"));
        assert_eq!(h100.step_seconds, h800.step_seconds);
        assert!(h200.step_seconds < h100.step_seconds);
        assert!(h200.to_string().contains("H200: 1600 TFLOP/s FP8, 800 BF16, 4 TB/s; NVLink 450 GB/s"), "{h200}");
        let (h800, h100) = (step("h800", true), step("h100", true));
        assert_eq!(h100.dispatch.nvlink_bytes, h800.dispatch.nvlink_bytes);
        assert!(h100.dispatch.seconds < h800.dispatch.seconds, "{} {}", h100.dispatch.seconds, h800.dispatch.seconds);
        assert!(h100.step_seconds < h800.step_seconds);
    }
}
