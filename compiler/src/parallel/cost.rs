//! The cost model the simulator runs a schedule with. A [`Cluster`] holds the figures of the
//! machines (the GPU's roofline [`Profile`], NVLink and InfiniBand bandwidth and latency, for
//! the spec's GPU: [`Cluster::of`]). From it and a spec,
//! [`Costs::of`] derives, per stage and micro-batch ([`super::chunks`] says what a chunk runs), the forward, backward and weight-gradient
//! times (training FLOPs at the compute roof of the SMs left after `comm_sms`; FP8 GEMMs, BF16
//! attention core and head) and the MoE all-to-alls of each chunk (node-limited: a token crosses
//! IB once to each remote node it reaches, to the GPU with its local index, then NVLink takes it
//! to its experts' GPUs), the transfer of activations between stages, and the ZeRO-1 end of the
//! step (ring reduce-scatter of gradients, sharded AdamW, ring all-gather of parameters).

use dsc_lang::{Dtype, Ffn, HighPrecisionOp, Spec, StagePart};
use serde::Serialize;

use super::chunks;
use super::execute::Durations;
use super::schedule::{Compute, Direction, Instruction, Micro, Tensor};
use super::stages::Stage;
use crate::estimate::{flops, params};
use crate::fuse::cost::Profile;

/// A point-to-point link: bytes per second each way, per GPU, and latency in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Link {
    pub bytes_per_second: f64,
    pub latency: f64,
}

impl Link {
    fn seconds(&self, bytes: f64) -> f64 {
        if bytes == 0.0 {
            0.0
        } else {
            self.latency + bytes / self.bytes_per_second
        }
    }
}

/// The machines a plan runs on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Cluster {
    /// The GPU's name, as the spec's `parallel.gpu` gives it.
    pub gpu: &'static str,
    pub gpus_per_node: u64,
    /// The GPU's roofline figures.
    pub device: Profile,
    pub nvlink: Link,
    /// One InfiniBand NIC per GPU.
    pub ib: Link,
}

impl Cluster {
    /// Nodes of `parallel`'s GPUs: H800s as DeepSeek-V3's cluster (NVLink 160 GB/s, the
    /// export part's), H100s and H200s with NVLink 4 (450 GB/s each way); one 400 Gb/s IB NIC
    /// (50 GB/s) per GPU. H800 and H100 compute and memory alike (the default [`Profile`]); the
    /// H200 the same compute with the memory bandwidth a copy reaches on one (4.07 TB/s, read
    /// and written, measured on the device machine: `benches/results/bench-kernels-*.json`).
    pub fn of(parallel: &dsc_lang::Parallel) -> Cluster {
        let ib = Link { bytes_per_second: 50e9, latency: 5e-6 };
        let nvlink = |bytes_per_second| Link { bytes_per_second, latency: 3e-6 };
        let (gpu, nvlink, device) = match parallel.gpu.name.as_str() {
            "h800" => ("H800", nvlink(160e9), Profile::default()),
            "h200" => ("H200", nvlink(450e9), Profile { bandwidth: 4.0e12, ..Profile::default() }),
            _ => ("H100", nvlink(450e9), Profile::default()),
        };
        Cluster { gpu, gpus_per_node: parallel.gpus_per_node, device, nvlink, ib }
    }
}

/// Computation and all-to-all time of a chunk, seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Split {
    pub compute: f64,
    pub comm: f64,
}

impl Split {
    pub fn total(&self) -> f64 {
        self.compute + self.comm
    }
}

/// One micro-batch's chunks on one stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StageTimes {
    pub forward: Split,
    /// The whole backward (input and weight gradients).
    pub backward: Split,
    /// The weight-gradient part of `backward.compute`.
    pub weight: f64,
}

/// Bytes one GPU sends in one all-to-all of one MoE layer for one micro-batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct AllToAll {
    /// Over InfiniBand, once per remote node a token reaches.
    pub ib_bytes: f64,
    /// Over NVLink inside the target nodes, to the experts' GPUs.
    pub nvlink_bytes: f64,
    pub seconds: f64,
}

/// Everything a schedule's instructions cost.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Costs {
    /// Per stage (of one direction; DualPipe's two copies cost the same).
    pub stages: Vec<StageTimes>,
    /// A stage's activation or gradient to its neighbour.
    pub transfer_seconds: f64,
    pub transfer_bytes: f64,
    pub dispatch: AllToAll,
    pub combine: AllToAll,
    /// MoE layers (the MTP block's included) per stage.
    pub moe_layers: Vec<u64>,
    /// Per pipeline rank: ZeRO-1 reduce-scatter, optimizer step and all-gather.
    pub reduce_scatter: Vec<f64>,
    pub optimizer_step: Vec<f64>,
    pub all_gather: Vec<f64>,
}

impl Costs {
    /// Equal stages with the given chunk times and free transfers and step end: the
    /// assumptions of the bubble formulas.
    pub fn uniform(stages: usize, times: StageTimes) -> Costs {
        Costs {
            stages: vec![times; stages],
            transfer_seconds: 0.0,
            transfer_bytes: 0.0,
            dispatch: AllToAll::default(),
            combine: AllToAll::default(),
            moe_layers: vec![0; stages],
            reduce_scatter: vec![0.0; stages],
            optimizer_step: vec![0.0; stages],
            all_gather: vec![0.0; stages],
        }
    }

    /// The costs of `spec`'s plan on `cluster`, its model split into `stages`.
    pub fn of(spec: &Spec, stages: &[Stage], cluster: &Cluster) -> Costs {
        let model = ModelCosts::new(spec, cluster);
        let (dispatch, combine) = model.all_to_alls();
        let moe_layers: Vec<u64> = stages.iter().map(|stage| chunks::moe_layers(&spec.model, stage)).collect();
        let times = stages
            .iter()
            .zip(&moe_layers)
            .map(|(stage, &layers)| {
                // The backward's all-to-alls carry gradients in the combine type both ways.
                let layers = layers as f64;
                model.stage_times(stage, layers * (dispatch.seconds + combine.seconds), layers * 2.0 * combine.seconds)
            })
            .collect();
        let transfer_bytes = model.tokens * (spec.model.hidden * Dtype::Bf16.bytes()) as f64;
        // The pipeline is the outermost dimension: a stage's data-parallel GPUs fill whole nodes,
        // so neighbouring stages talk over IB unless a stage takes less than a node.
        let pipeline_link = if spec.parallel.data.size >= cluster.gpus_per_node { cluster.ib } else { cluster.nvlink };
        let ranks = stages.len();
        let step_end: Vec<[f64; 3]> = (0..ranks).map(|rank| model.step_end(stages, rank)).collect();
        Costs {
            stages: times,
            transfer_seconds: pipeline_link.seconds(transfer_bytes),
            transfer_bytes,
            dispatch,
            combine,
            moe_layers,
            reduce_scatter: step_end.iter().map(|times| times[0]).collect(),
            optimizer_step: step_end.iter().map(|times| times[1]).collect(),
            all_gather: step_end.iter().map(|times| times[2]).collect(),
        }
    }

    fn stage(&self, rank: usize, micro: Micro) -> &StageTimes {
        &self.stages[micro.direction.rank_of(rank, self.stages.len())]
    }
}

impl Durations for Costs {
    fn compute(&self, rank: usize, chunk: &Compute) -> f64 {
        match *chunk {
            Compute::Forward(micro) => self.stage(rank, micro).forward.total(),
            Compute::Backward(micro) => self.stage(rank, micro).backward.total(),
            Compute::BackwardInput(micro) => {
                let stage = self.stage(rank, micro);
                stage.backward.total() - stage.weight
            }
            Compute::BackwardWeight(micro) => self.stage(rank, micro).weight,
            // Each chunk's all-to-all runs while the other computes: the pair takes the longer
            // of the two sums.
            Compute::ForwardBackward { forward, backward } => {
                let (forward, backward) = (self.stage(rank, forward).forward, self.stage(rank, backward).backward);
                (forward.compute + backward.compute).max(forward.comm + backward.comm)
            }
        }
    }

    fn transfer(&self, _: usize, _: usize, _: &Tensor) -> f64 {
        self.transfer_seconds
    }

    fn step_end(&self, rank: usize, instruction: &Instruction) -> f64 {
        match instruction {
            Instruction::ReduceScatterGrads => self.reduce_scatter[rank],
            Instruction::OptimizerStep => self.optimizer_step[rank],
            Instruction::AllGatherParams => self.all_gather[rank],
            _ => 0.0,
        }
    }
}

/// Forward FLOPs per token of a stage by the unit that runs them.
#[derive(Clone, Copy, Debug, Default)]
struct ForwardFlops {
    /// Linear layers in the GEMM type of the precision policy.
    gemm: f64,
    /// Linear layers kept in BF16 (the output head, where the policy says so).
    bf16_gemm: f64,
    /// The attention core (BF16).
    attention: f64,
}

/// A spec's figures the per-stage costs are made of.
struct ModelCosts<'a> {
    spec: &'a Spec,
    cluster: &'a Cluster,
    /// Tokens per micro-batch.
    tokens: f64,
    /// FLOP/s of the SMs left for computation.
    gemm_rate: f64,
    bf16_rate: f64,
}

impl<'a> ModelCosts<'a> {
    fn new(spec: &'a Spec, cluster: &'a Cluster) -> Self {
        let gpu = &spec.parallel.gpu;
        let compute_share = (gpu.sms - spec.parallel.comm_sms) as f64 / gpu.sms as f64;
        let gemm_peak = match spec.precision.gemm {
            Dtype::E4m3 => cluster.device.fp8_flops,
            _ => cluster.device.bf16_flops,
        };
        ModelCosts {
            spec,
            cluster,
            tokens: (spec.train.micro_batch * spec.train.seq_len) as f64,
            gemm_rate: gemm_peak * compute_share,
            bf16_rate: cluster.device.bf16_flops * compute_share,
        }
    }

    fn forward_flops(&self, stage: &Stage) -> ForwardFlops {
        let model = &self.spec.model;
        let seq = self.spec.train.seq_len;
        let attention = flops::attention_core_forward(&model.attention, seq) as f64;
        let head = flops::training(model, &StagePart::Head, seq) as f64 / 3.0;
        let head_in_bf16 = self.spec.precision.high_precision.contains(&HighPrecisionOp::Head);
        let mut total = ForwardFlops::default();
        let add_head = |total: &mut ForwardFlops, heads: f64| {
            if head_in_bf16 {
                total.bf16_gemm += heads * head;
            } else {
                total.gemm += heads * head;
            }
        };
        for part in &stage.parts {
            let forward = flops::training(model, part, seq) as f64 / 3.0;
            match part {
                StagePart::Embedding => {}
                StagePart::Layers(range) => {
                    let cores = range.len() as f64 * attention;
                    total.attention += cores;
                    total.gemm += forward - cores;
                }
                StagePart::Head => add_head(&mut total, 1.0),
                StagePart::Mtp => {
                    let depth = model.mtp.as_ref().map_or(0, |mtp| mtp.depth) as f64;
                    total.attention += depth * attention;
                    total.gemm += forward - depth * (attention + head);
                    add_head(&mut total, depth);
                }
            }
        }
        total
    }

    /// A stage's chunk times, given the all-to-all time of its forward and of its backward.
    fn stage_times(&self, stage: &Stage, forward_comm: f64, backward_comm: f64) -> StageTimes {
        let flops = self.forward_flops(stage);
        let weight = self.tokens * (flops.gemm / self.gemm_rate + flops.bf16_gemm / self.bf16_rate);
        let forward = weight + self.tokens * flops.attention / self.bf16_rate;
        // The backward is twice the forward: input and weight gradients of each GEMM, and the
        // attention core's backward by the same convention.
        StageTimes {
            forward: Split { compute: forward, comm: forward_comm },
            backward: Split { compute: 2.0 * forward, comm: backward_comm },
            weight,
        }
    }

    /// The dispatch and combine of one MoE layer for one micro-batch on one GPU.
    fn all_to_alls(&self) -> (AllToAll, AllToAll) {
        let parallel = &self.spec.parallel;
        let ep = parallel.expert.size;
        let Some(Ffn::Moe(moe)) = self.spec.model.ffn.iter().map(|range| &range.ffn).find(|f| matches!(f, Ffn::Moe(_)))
        else {
            return (AllToAll::default(), AllToAll::default());
        };
        if ep <= 1 {
            return (AllToAll::default(), AllToAll::default());
        }
        let gpus_per_node = self.cluster.gpus_per_node.min(ep);
        let ep_nodes = ep.div_ceil(gpus_per_node);
        // The nodes a token reaches, of which all but its own (if among them) are remote.
        let reach = parallel.expert.max_nodes.min(ep_nodes).min(moe.top_k) as f64;
        let ib_copies = reach * (ep_nodes - 1) as f64 / ep_nodes as f64;
        // Inside a node, each expert's GPU but the one IB delivered to.
        let nvlink_copies = moe.top_k as f64 * (gpus_per_node - 1) as f64 / gpus_per_node as f64;
        let hidden = self.spec.model.hidden;
        let precision = &self.spec.precision;
        let scales = if precision.dispatch == Dtype::E4m3 {
            hidden.div_ceil(precision.activation_tile[1]) * Dtype::F32.bytes()
        } else {
            0
        };
        let all_to_all = |bytes_per_token: u64| {
            let bytes = self.tokens * bytes_per_token as f64;
            let (ib_bytes, nvlink_bytes) = (bytes * ib_copies, bytes * nvlink_copies);
            // NVLink forwards what IB delivers as it arrives: the slower of the two paths.
            let seconds = self.cluster.ib.seconds(ib_bytes).max(self.cluster.nvlink.seconds(nvlink_bytes));
            AllToAll { ib_bytes, nvlink_bytes, seconds }
        };
        (all_to_all(hidden * precision.dispatch.bytes() + scales), all_to_all(hidden * precision.combine.bytes()))
    }

    /// ZeRO-1's reduce-scatter, AdamW step and all-gather on pipeline rank `rank`, seconds.
    /// The gradients of replicated parameters are summed over every data-parallel replica and
    /// every copy (two with DualPipe), those of routed experts over the replicas of their EP
    /// shard; each is a ring over its group.
    fn step_end(&self, stages: &[Stage], rank: usize) -> [f64; 3] {
        let parallel = &self.spec.parallel;
        let precision = &self.spec.precision;
        let dualpipe = parallel.pipeline.schedule == dsc_lang::PipelineSchedule::Dualpipe;
        let copies: &[Direction] = if dualpipe { &[Direction::Down, Direction::Up] } else { &[Direction::Down] };
        let (mut replicated, mut routed) = (0u64, 0u64);
        for direction in copies {
            let stage = &stages[direction.rank_of(rank, stages.len())];
            let part: params::Part = stage.parts.iter().map(|part| params::part(&self.spec.model, part)).sum();
            replicated += part.params.total() - part.params.routed_experts;
            routed += part.params.routed_experts.div_ceil(parallel.expert.size);
        }
        let copies = copies.len() as u64;
        let groups = [
            (replicated, parallel.data.size * copies),
            (routed, (parallel.data.size / parallel.expert.size).max(1) * copies),
        ];
        let link = if parallel.gpus() > self.cluster.gpus_per_node { self.cluster.ib } else { self.cluster.nvlink };
        let ring = |bytes_per_param: u64| -> f64 {
            groups
                .iter()
                .filter(|(_, members)| *members > 1)
                .map(|&(params, members)| {
                    let steps = (members - 1) as f64;
                    let bytes = (params * bytes_per_param) as f64 * steps / members as f64;
                    steps * link.latency + bytes / link.bytes_per_second
                })
                .sum()
        };
        let shard: f64 = groups.iter().map(|&(params, members)| params as f64 / members as f64).sum();
        // AdamW reads the gradient, master weight and both moments, writes the last three and the
        // compute copy of the weight.
        let moments = 2 * precision.adam_moments.bytes();
        let bytes_per_param = precision.grads.bytes() + 2 * (precision.master_weights.bytes() + moments) + 2;
        let optimizer = shard * bytes_per_param as f64 / self.cluster.device.bandwidth;
        [ring(precision.grads.bytes()), optimizer, ring(Dtype::Bf16.bytes())]
    }
}
