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
            "{:LABEL$}{} TFLOP/s FP8, {} BF16; NVLink {} GB/s, IB {} GB/s per GPU",
            "cluster",
            c.device.fp8_flops / 1e12,
            c.device.bf16_flops / 1e12,
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
            "{:LABEL$}{:.3} s on the most idle rank; {:.1}% of all ranks' pipeline time",
            "bubble",
            self.bubble_seconds,
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
