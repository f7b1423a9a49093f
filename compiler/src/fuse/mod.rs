//! Fusion with e-graphs (egg). Each function of a training graph is encoded into an e-graph
//! ([`lang::Fx`]; ops the rules do not look at are opaque), saturated with [`rules::rules`]
//! under node, iteration and time bounds, and extracted by a roofline cost ([`cost`]) back
//! into a graph function in which fused ops (RMSNorm, softmax, SwiGLU) replace their
//! primitives. [`kernels`] then groups the result into kernels. The extraction picks, per
//! e-class, the cheapest node by tree cost; totals are reported over the DAG (each value once).

pub mod cost;
pub mod kernels;
pub mod lang;
pub mod rules;

use crate::graph::ir::{DType, Function, FunctionBuilder, Module, Node, Op, Shape, V};
use egg::{Analysis, DidMerge, EGraph, Extractor, Id, Language, Runner, Symbol};
use lang::{ConstBits, Fx};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// What the e-graph knows of each class: the shape and type of its value.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassData {
    pub shape: Option<Shape>,
    pub dtype: DType,
}

/// Shapes and types, computed from the children (and, for opaque ops, from the original
/// node's record).
#[derive(Default)]
pub struct FusionAnalysis {
    /// Shape and type of each original node, by index (for `Opaque("#i")`).
    pub originals: Vec<(Shape, DType)>,
}

impl Analysis<Fx> for FusionAnalysis {
    type Data = ClassData;

    fn make(egraph: &mut EGraph<Fx, Self>, enode: &Fx, _: Id) -> ClassData {
        let child = |id: &Id| egraph[*id].data.clone();
        let same = |id: &Id| child(id);
        match enode {
            Fx::Opaque(symbol, _) => {
                let (shape, dtype) = original_index(*symbol)
                    .map(|i| egraph.analysis.originals[i].clone())
                    .expect("opaque nodes name an original node");
                ClassData { shape: Some(shape), dtype }
            }
            Fx::Const(_) => ClassData { shape: Some(vec![]), dtype: DType::F32 },
            Fx::Add([a, b]) | Fx::Sub([a, b]) | Fx::Mul([a, b]) | Fx::Div([a, b]) | Fx::SwiGlu([a, b]) => {
                let (a, b) = (child(a), child(b));
                let shape = match (&a.shape, &b.shape) {
                    (Some(x), Some(y)) => Some(crate::graph::ir::broadcast_shape(x, y)),
                    _ => None,
                };
                let dtype = if a.shape.as_ref().is_some_and(|s| s.is_empty()) { b.dtype } else { a.dtype };
                ClassData { shape, dtype }
            }
            Fx::Exp(x) | Fx::Square(x) | Fx::Rsqrt(x) | Fx::Silu(x) | Fx::Stop(x) | Fx::Softmax(x) => same(x),
            Fx::RmsNorm([x, _, _]) => same(x),
            Fx::SumLast(x) | Fx::MaxLast(x) => {
                let mut d = child(x);
                if let Some(s) = d.shape.as_mut() {
                    if let Some(last) = s.last_mut() {
                        *last = 1;
                    }
                }
                d
            }
            Fx::TransposeLast2(x) => {
                let mut d = child(x);
                if let Some(s) = d.shape.as_mut() {
                    let r = s.len();
                    s.swap(r - 2, r - 1);
                }
                d
            }
        }
    }

    fn merge(&mut self, a: &mut ClassData, b: ClassData) -> DidMerge {
        if a.shape.is_none() && b.shape.is_some() {
            *a = b;
            return DidMerge(true, false);
        }
        DidMerge(false, a.shape != b.shape)
    }
}

fn opaque_symbol(index: usize) -> Symbol {
    Symbol::from(format!("#{index}"))
}

fn original_index(symbol: Symbol) -> Option<usize> {
    symbol.as_str().strip_prefix('#')?.parse().ok()
}

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

/// Fuses every function of `module`; the result computes the same values.
pub fn fuse_module(module: &Module, limits: Limits) -> (Module, Vec<FunctionReport>) {
    let mut fused = Module { functions: Vec::new(), constants: module.constants.clone() };
    let mut reports = Vec::new();
    for f in &module.functions {
        let (function, report) = fuse_function(module, f, limits);
        fused.functions.push(function);
        reports.push(report);
    }
    (fused, reports)
}

/// Fuses one function.
pub fn fuse_function(module: &Module, f: &Function, limits: Limits) -> (Function, FunctionReport) {
    let mut egraph =
        EGraph::new(FusionAnalysis { originals: f.nodes.iter().map(|n| (n.shape.clone(), n.dtype)).collect() });
    let classes: Vec<Id> = (0..f.nodes.len()).fold(Vec::new(), |mut classes, i| {
        let enode = encode(&f.nodes[i], i, &classes);
        classes.push(egraph.add(enode));
        classes
    });
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
    let extractor = Extractor::new(egraph, cost::RooflineCost { egraph, profile: cost::Profile::default() });
    let function = decode(module, f, egraph, &extractor, &roots);
    let mut fused = HashMap::new();
    for node in &function.nodes {
        if matches!(node.op, Op::RmsNorm { .. } | Op::Softmax | Op::SwiGlu) {
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

/// The e-node of original node `i`.
fn encode(node: &Node, i: usize, classes: &[Id]) -> Fx {
    let a: Vec<Id> = node.args.iter().map(|v| classes[v.index()]).collect();
    match &node.op {
        Op::Const(c) => Fx::Const(ConstBits(c.to_bits())),
        Op::Add => Fx::Add([a[0], a[1]]),
        Op::Sub => Fx::Sub([a[0], a[1]]),
        Op::Mul => Fx::Mul([a[0], a[1]]),
        Op::Div => Fx::Div([a[0], a[1]]),
        Op::Exp => Fx::Exp(a[0]),
        Op::Square => Fx::Square(a[0]),
        Op::Rsqrt => Fx::Rsqrt(a[0]),
        Op::Silu => Fx::Silu(a[0]),
        Op::StopGradient => Fx::Stop(a[0]),
        Op::Sum { axis, keep: true } if *axis + 1 == node.shape.len() => Fx::SumLast(a[0]),
        Op::Max { axis, keep: true } if *axis + 1 == node.shape.len() => Fx::MaxLast(a[0]),
        Op::Transpose(perm) if is_last_two_swap(perm) => Fx::TransposeLast2(a[0]),
        _ => Fx::Opaque(opaque_symbol(i), a),
    }
}

fn is_last_two_swap(perm: &[usize]) -> bool {
    let r = perm.len();
    r >= 2 && perm[..r - 2].iter().enumerate().all(|(i, &p)| p == i) && perm[r - 2] == r - 1 && perm[r - 1] == r - 2
}

/// Rebuilds a function from the best node of each class reachable from the outputs.
fn decode(
    module: &Module,
    f: &Function,
    egraph: &EGraph<Fx, FusionAnalysis>,
    extractor: &Extractor<cost::RooflineCost, Fx, FusionAnalysis>,
    roots: &[Id],
) -> Function {
    let mut b = FunctionBuilder::new(module, f.name.clone());
    let args: Vec<V> = f.args.iter().map(|(n, s, d)| b.arg(n.clone(), s.clone(), *d)).collect();
    let mut built: HashMap<Id, V> = HashMap::new();
    // Iterative post-order over the chosen nodes.
    let mut stack: Vec<(Id, bool)> = roots.iter().rev().map(|&r| (egraph.find(r), false)).collect();
    while let Some((class, children_done)) = stack.pop() {
        if built.contains_key(&class) {
            continue;
        }
        let node = extractor.find_best_node(class);
        if !children_done {
            stack.push((class, true));
            for &c in node.children().iter().rev() {
                let c = egraph.find(c);
                if !built.contains_key(&c) {
                    stack.push((c, false));
                }
            }
            continue;
        }
        let children: Vec<V> = node.children().iter().map(|c| built[&egraph.find(*c)]).collect();
        let data = &egraph[class].data;
        let shape = data.shape.clone().expect("every class has a shape");
        let v = match node {
            Fx::Opaque(symbol, _) => {
                let original = &f.nodes[original_index(*symbol).expect("opaque symbol")];
                match original.op {
                    Op::Arg(i) => args[i],
                    _ => b.push(original.op.clone(), children, original.shape.clone(), original.dtype),
                }
            }
            Fx::Const(c) => b.constant(c.value()),
            _ => {
                let op = match node {
                    Fx::Add(_) => Op::Add,
                    Fx::Sub(_) => Op::Sub,
                    Fx::Mul(_) => Op::Mul,
                    Fx::Div(_) => Op::Div,
                    Fx::Exp(_) => Op::Exp,
                    Fx::Square(_) => Op::Square,
                    Fx::Rsqrt(_) => Op::Rsqrt,
                    Fx::Silu(_) => Op::Silu,
                    Fx::Stop(_) => Op::StopGradient,
                    Fx::SumLast(_) => Op::Sum { axis: shape.len() - 1, keep: true },
                    Fx::MaxLast(_) => Op::Max { axis: shape.len() - 1, keep: true },
                    Fx::TransposeLast2(_) => {
                        let r = shape.len();
                        let mut perm: Vec<usize> = (0..r).collect();
                        perm.swap(r - 2, r - 1);
                        Op::Transpose(perm)
                    }
                    Fx::RmsNorm([_, _, eps]) => Op::RmsNorm { eps: constant_of(egraph, *eps) },
                    Fx::Softmax(_) => Op::Softmax,
                    Fx::SwiGlu(_) => Op::SwiGlu,
                    Fx::Opaque(..) | Fx::Const(_) => unreachable!("handled above"),
                };
                // RMSNorm's ε is an attribute, not an argument.
                let children = if let Fx::RmsNorm(_) = node { children[..2].to_vec() } else { children };
                b.push(op, children, shape, data.dtype)
            }
        };
        built.insert(class, v);
    }
    for (root, name) in roots.iter().zip(&f.output_names) {
        b.output(name.clone(), built[&egraph.find(*root)]);
    }
    b.finish()
}

fn constant_of(egraph: &EGraph<Fx, FusionAnalysis>, class: Id) -> f64 {
    egraph[class]
        .nodes
        .iter()
        .find_map(|n| match n {
            Fx::Const(c) => Some(c.value()),
            _ => None,
        })
        .expect("the rule matched a constant")
}
