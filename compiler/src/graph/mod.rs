//! The training graph of one step: the tensor IR ([`ir`]), the model builder ([`model`]),
//! reverse-mode autodiff ([`autodiff`]), the optimizer ([`optimizer`]), ZeRO-1's partition of
//! it ([`zero`]) and the printed form ([`mod@print`]). [`TrainingGraph::build`] assembles the
//! functions a step runs: the gradient of one micro-batch, and the optimizer update (of the
//! whole model, and of each data-parallel process's shard); [`StageTraining::build`] the forward
//! and backward of one pipeline stage.

pub mod autodiff;
pub mod ir;
pub mod model;
pub mod optimizer;
pub mod print;
pub mod zero;

use dsc_lang::Spec;
pub use ir::{DType, Function, Module, Op, V};
pub use model::{ForwardGraph, Numerics, ParamInfo, StageGraph};
use serde::Serialize;
use std::collections::BTreeMap;

/// Everything one training step runs.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingGraph {
    pub forward: ForwardGraph,
    /// `model.grad(params…, tokens, loss_mask, mtp_weight) -> (loss, main_loss, mtp_loss, balance_loss,
    /// loads…, d_params…)`: one micro-batch's losses and gradients (buffers included, as
    /// zeros).
    pub grad: usize,
    /// The optimizer update (see [`optimizer::build`]).
    pub optimizer: usize,
    /// ZeRO-1's layout of data-parallel processes, with each one's optimizer.
    pub zero: zero::Zero,
}

impl TrainingGraph {
    pub fn build(spec: &Spec, numerics: Numerics) -> Self {
        let mut forward = model::build(spec, numerics);
        let grad = autodiff::grad(&mut forward.module, forward.model);
        let optimizer = optimizer::build(&forward.module, spec, &forward.params, &forward.moe_biases, numerics);
        let optimizer = forward.module.add(optimizer);
        let sharing = (forward.params.as_slice(), forward.moe_biases.as_slice());
        let zero = zero::Zero::build(&mut forward.module, spec, sharing, numerics, optimizer);
        TrainingGraph { forward, grad, optimizer, zero }
    }

    pub fn module(&self) -> &Module {
        &self.forward.module
    }

    /// Op counts per phase and the parameter count (`--emit=graph-stats`).
    pub fn stats(&self) -> GraphStats {
        let module = self.module();
        let mut stats = GraphStats {
            params: self.forward.params.iter().map(|p| p.numel() as u64).sum(),
            learned_params: self.forward.params.iter().filter(|p| p.learned).map(|p| p.numel() as u64).sum(),
            functions: module.functions.len(),
            ..GraphStats::default()
        };
        for f in &module.functions {
            let phase = if f.name == "adamw" {
                &mut stats.optimizer
            } else if [".vjp", ".grad", ".bwd"].iter().any(|s| f.name.ends_with(s)) {
                &mut stats.backward
            } else {
                &mut stats.forward
            };
            for node in &f.nodes {
                if !matches!(node.op, Op::Arg(_) | Op::Get(_)) {
                    *phase.entry(node.op.name()).or_default() += 1;
                }
            }
        }
        stats
    }
}

/// One pipeline stage's forward function and its generated backward: what a pipeline rank
/// runs for the stage it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct StageTraining {
    pub graph: StageGraph,
    /// `stage.vjp(params…, [carry], tokens, loss_mask, mtp_weight, d_out, d_balance_loss, d_…)
    /// -> (d_params…, [d_carry], d_loss_mask, d_mtp_weight)`, `d_out` being the gradient of the
    /// carry out (or 1 for the last stage's loss), then one cotangent per reported output (0:
    /// the loss parts and loads only report).
    pub backward: usize,
}

impl StageTraining {
    /// The stage holding `parts` on a member of an expert-parallel group of `expert_ranks`
    /// (see [`model::build_stage`]).
    pub fn build(spec: &Spec, numerics: Numerics, parts: &[dsc_lang::StagePart], expert_ranks: usize) -> Self {
        let mut graph = model::build_stage(spec, numerics, parts, expert_ranks);
        let backward = autodiff::vjp(&mut graph.module, graph.forward);
        StageTraining { graph, backward }
    }
}

/// What `dsc compile --emit=graph-stats` prints. Counts are per function body (a layer
/// function called 58 times counts once).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GraphStats {
    /// All parameter elements, routing biases included (equals `dsc info`'s total + MTP).
    pub params: u64,
    pub learned_params: u64,
    pub functions: usize,
    pub forward: BTreeMap<&'static str, usize>,
    pub backward: BTreeMap<&'static str, usize>,
    pub optimizer: BTreeMap<&'static str, usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate;

    fn load(name: &str) -> Spec {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models").join(name);
        dsc_lang::load(&path, &[]).checked_spec().cloned().expect("shipped spec checks")
    }

    #[test]
    fn graph_parameters_equal_dsc_info() {
        for name in ["deepseek-v3-tiny.dsc", "deepseek-v3-bench.dsc", "deepseek-v3.dsc"] {
            let spec = load(name);
            let graph = TrainingGraph::build(&spec, Numerics::Policy);
            let info = estimate::info(&spec);
            let stats = graph.stats();
            assert_eq!(stats.params, info.params.total + info.params.mtp, "{name}");
            // Each distinct layer kind is built once: DeepSeek-V3 has 2 layer functions, not 61.
            let layer_fns = graph
                .module()
                .functions
                .iter()
                .filter(|f| f.name.starts_with("layer") && !f.name.contains('.'))
                .count();
            assert_eq!(layer_fns, spec.model.ffn.len(), "{name}");
        }
    }
}
