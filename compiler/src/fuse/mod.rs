//! Fusion with e-graphs (egg). Each function of a training graph is encoded into an e-graph
//! ([`translate`]: the ops the rules look at as [`lang::Fx`] nodes, with their attributes as a
//! leaf child; every other op opaque, a repeated one shared), saturated with [`rules::rules`]
//! under node, iteration and time bounds (the report says which stopped it), and extracted
//! ([`extract`]) by the roofline cost of [`cost`] back into a graph function in which fused
//! ops replace their primitives. Before that, [`expand`] turns attention the fused kernels do
//! not take into primitives. [`library`] then hands the library's FP8 GEMMs their operands
//! quantised, and [`kernels`] groups the result into kernels.
//!
//! Fused ops with several results (the residual sum and its norm; dx and dw of a norm's
//! backward; the two products of GEMMs sharing an input; the routed experts and their gates;
//! the loss and its rows' max and sum, which its backward reads)
//! return a tuple, read with `get` — the IR's existing form for a call's results, so the
//! backends and the kernel accounting need no second mechanism. The alternatives were worse:
//! a norm op taking the two addends and the sum recomputed by its other reader keeps the
//! extra kernel and its traffic, and one op per result duplicates the shared work. A tuple
//! only pays when every result is read from it, which is why extraction is DAG-aware: it
//! minimises the cost of the whole DAG with each value counted once, and moves all readers of
//! a tuple together.
//!
//! The CPU kernels of the fused ops keep the rounding order of the primitives they replace,
//! so a fused plan trains bit-identically to the unfused graph (FP8 included), which the
//! plan test checks; the property tests check each rule on random shapes and values.

pub mod analysis;
pub mod cost;
pub mod expand;
pub mod extract;
pub mod kernels;
pub mod lang;
pub mod library;
pub mod rules;
pub mod translate;

use crate::graph::ir::{Function, Module};
pub use analysis::{attr_op, ClassData, FusionAnalysis};
use egg::{EGraph, Id, Runner};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// How saturation of one function went.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FunctionReport {
    pub function: String,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    pub iterations: usize,
    /// Why saturation stopped: "saturated", or the bound it hit.
    pub stop_reason: String,
    /// How often each fused op occurs in the result.
    pub fused: HashMap<&'static str, usize>,
}

/// Saturation bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub nodes: usize,
    pub iterations: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { nodes: 200_000, iterations: 16, time: Duration::from_secs(10) }
    }
}

/// Fuses every function of `module`; the result computes the same values. Extraction costs
/// are those of the default device profile.
pub fn fuse_module(module: &Module, limits: Limits) -> (Module, Vec<FunctionReport>) {
    fuse_module_for(module, limits, &cost::Profile::default())
}

/// `fuse_module` with extraction costs from `profile`.
pub fn fuse_module_for(module: &Module, limits: Limits, profile: &cost::Profile) -> (Module, Vec<FunctionReport>) {
    let mut fused = Module { functions: Vec::new(), constants: module.constants.clone() };
    let mut reports = Vec::new();
    for f in &module.functions {
        let (function, report) = fuse_function_for(module, f, limits, profile);
        fused.functions.push(function);
        reports.push(report);
    }
    (fused, reports)
}

/// Fuses one function (default device profile).
pub fn fuse_function(module: &Module, f: &Function, limits: Limits) -> (Function, FunctionReport) {
    fuse_function_for(module, f, limits, &cost::Profile::default())
}

/// Fuses one function, extraction costs from `profile`.
pub fn fuse_function_for(
    module: &Module,
    f: &Function,
    limits: Limits,
    profile: &cost::Profile,
) -> (Function, FunctionReport) {
    fuse_function_with(module, f, limits, |egraph, class, node| cost::node_seconds(egraph, class, node, profile))
}

/// Fuses one function, extraction costs from `cost(egraph, class, node)` (tests use it to
/// take a rewrite the roofline would not, to prove it).
pub fn fuse_function_with(
    module: &Module,
    f: &Function,
    limits: Limits,
    cost: impl Fn(&EGraph<lang::Fx, FusionAnalysis>, Id, &lang::Fx) -> f64,
) -> (Function, FunctionReport) {
    let mut egraph =
        EGraph::new(FusionAnalysis { originals: f.nodes.iter().map(|n| (n.shape.clone(), n.dtype)).collect() });
    let classes = translate::encode(&mut egraph, f);
    let roots: Vec<Id> = f.outputs.iter().map(|o| classes[o.index()]).collect();
    let runner = Runner::default()
        .with_egraph(egraph)
        .with_node_limit(limits.nodes)
        .with_iter_limit(limits.iterations)
        .with_time_limit(limits.time)
        .run(&rules::rules());
    let stop_reason = match &runner.stop_reason {
        Some(egg::StopReason::Saturated) => "saturated".to_string(),
        Some(egg::StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
        Some(egg::StopReason::NodeLimit(n)) => format!("node limit ({n})"),
        Some(egg::StopReason::TimeLimit(t)) => format!("time limit ({t:.1} s)"),
        Some(egg::StopReason::Other(s)) => s.clone(),
        None => "not run".to_string(),
    };
    let egraph = &runner.egraph;
    let extraction = extract::extract(egraph, &roots, |class, node| cost(egraph, class, node));
    let function = translate::decode(module, f, egraph, &extraction.chosen, &roots);
    let mut fused = HashMap::new();
    for node in &function.nodes {
        if node.op.is_fused() {
            *fused.entry(node.op.name()).or_default() += 1;
        }
    }
    let report = FunctionReport {
        function: f.name.clone(),
        nodes_before: f.nodes.len(),
        nodes_after: function.nodes.len(),
        egraph_nodes: egraph.total_number_of_nodes(),
        egraph_classes: egraph.number_of_classes(),
        iterations: runner.iterations.len(),
        stop_reason,
        fused,
    };
    (function, report)
}
