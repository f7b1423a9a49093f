//! Closed-form estimates of a spec, computed without building a graph: exact parameter counts
//! ([`params`]), training FLOPs per token ([`flops`]), tokens per step, and memory per GPU for
//! each pipeline rank ([`memory`]). [`Info`] gathers them; its serde form is the JSON contract of
//! `dsc info --format json` and its `Display` form is the human report.

pub mod flops;
pub mod memory;
pub mod params;
pub(crate) mod report;

use dsc_lang::Spec;
use serde::Serialize;

use crate::parallel::stages;
use flops::Flops;
use memory::RankMemory;
use params::ParamCounts;

/// Everything `dsc info` reports about a spec.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Info {
    pub model: String,
    pub params: ParamCounts,
    /// Training FLOPs per token, main model and MTP, at `train.seq_len`.
    pub flops_per_token: u64,
    pub flops: Flops,
    /// Tokens per optimizer step once the batch ramp (if any) has ended.
    pub tokens_per_step: u64,
    /// Tokens per optimizer step at the start of training.
    pub tokens_per_step_initial: u64,
    /// Micro-batches per step on each data-parallel rank, after the ramp.
    pub micro_batches_per_step: u64,
    pub micro_batches_per_step_initial: u64,
    /// One entry per pipeline rank.
    pub memory: Vec<RankMemory>,
    /// Memory of one GPU, in bytes.
    pub gpu_memory: u64,
}

pub fn info(spec: &Spec) -> Info {
    let flops = flops::per_token(&spec.model, spec.train.seq_len);
    let batch = &spec.train.batch;
    Info {
        model: spec.model.name.clone(),
        params: params::counts(&spec.model),
        flops_per_token: flops.total(),
        flops,
        tokens_per_step: batch.last() * spec.train.seq_len,
        tokens_per_step_initial: batch.initial() * spec.train.seq_len,
        micro_batches_per_step: micro_batches_per_step(spec, batch.last()),
        micro_batches_per_step_initial: micro_batches_per_step(spec, batch.initial()),
        memory: memory::per_rank(spec, &stages::split(spec)),
        gpu_memory: spec.parallel.gpu.memory_bytes,
    }
}

/// Micro-batches one data-parallel rank runs for a global batch of `sequences` (a last,
/// partial micro-batch counts as one).
fn micro_batches_per_step(spec: &Spec, sequences: u64) -> u64 {
    sequences.div_ceil(spec.parallel.data.size * spec.train.micro_batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn deepseek_v3_steps() {
        let info = info(&testing::deepseek_v3());
        assert_eq!(info.tokens_per_step, 15_360 * 4096);
        assert_eq!(info.tokens_per_step_initial, 3072 * 4096);
        assert_eq!(info.micro_batches_per_step, 120);
        assert_eq!(info.micro_batches_per_step_initial, 24);
        assert_eq!(info.gpu_memory, 80 << 30);
        assert_eq!(info.memory.len(), 16);
    }

    #[test]
    fn json_contract() {
        let json = serde_json::to_value(info(&testing::deepseek_v3())).unwrap();
        assert_eq!(json["model"], "deepseek-v3");
        assert_eq!(json["params"]["total"], 671_026_419_200u64);
        assert_eq!(json["params"]["mtp"], 11_610_068_224u64);
        for key in [
            "activated",
            "embedding",
            "head",
            "attention",
            "dense_ffn",
            "shared_experts",
            "routed_experts",
            "router",
            "norms",
        ] {
            assert!(json["params"][key].is_u64(), "params.{key}");
        }
        assert!(json["flops_per_token"].is_number());
        for key in ["tokens_per_step", "tokens_per_step_initial", "micro_batches_per_step", "gpu_memory"] {
            assert!(json[key].is_u64(), "{key}");
        }
        let rank = &json["memory"][0];
        assert_eq!(rank["stage"], 0);
        for key in ["params", "weights", "grads", "optimizer", "activations", "in_flight_micro_batches", "bytes"] {
            assert!(rank[key].is_u64(), "memory[0].{key}");
        }
        assert!(rank["parts"].is_string() && rank["fits"].is_boolean());
    }
}
