//! Between a graph function and the e-graph: [`encode`] adds each node as an e-node (ops the
//! rules do not look at become `Opaque`, and an opaque op repeated on the same inputs —
//! a second reshape of one value, say — is the same e-node, so the rules see shared inputs
//! as shared), and [`decode`] rebuilds a function from the chosen node of each class.

use super::analysis::{attr, attr_op, opaque_symbol, original_index, FusionAnalysis};
use super::lang::{ConstBits, Fx};
use crate::graph::ir::{Function, FunctionBuilder, Module, Op, V};
use egg::{EGraph, Id, Language};
use std::collections::HashMap;

/// Adds the nodes of `f` to `egraph`; returns the class of each node.
pub fn encode(egraph: &mut EGraph<Fx, FusionAnalysis>, f: &Function) -> Vec<Id> {
    let mut classes: Vec<Id> = Vec::with_capacity(f.nodes.len());
    // The first node with each (op, inputs), for opaque ops.
    let mut first: HashMap<(String, Vec<Id>), usize> = HashMap::new();
    for (i, node) in f.nodes.iter().enumerate() {
        let a: Vec<Id> = node.args.iter().map(|v| classes[v.index()]).collect();
        let enode = match &node.op {
            Op::Const(c) => Fx::Const(ConstBits(c.to_bits())),
            Op::Add => Fx::Add([a[0], a[1]]),
            Op::Sub => Fx::Sub([a[0], a[1]]),
            Op::Mul => Fx::Mul([a[0], a[1]]),
            Op::Div => Fx::Div([a[0], a[1]]),
            Op::Exp => Fx::Exp(a[0]),
            Op::Log => Fx::Log(a[0]),
            Op::Square => Fx::Square(a[0]),
            Op::Rsqrt => Fx::Rsqrt(a[0]),
            Op::Silu => Fx::Silu(a[0]),
            Op::Sigmoid => Fx::Sigmoid(a[0]),
            Op::Neg => Fx::Neg(a[0]),
            Op::StopGradient => Fx::Stop(a[0]),
            Op::InvertOrder => Fx::InvertOrder(a[0]),
            Op::Sum { axis, keep: true } if *axis + 1 == node.shape.len() => Fx::SumLast(a[0]),
            Op::Max { axis, keep: true } if *axis + 1 == node.shape.len() => Fx::MaxLast(a[0]),
            Op::Transpose(perm) if is_last_two_swap(perm) => Fx::TransposeLast2(a[0]),
            op @ Op::MatMul { .. } => Fx::MatMul([attr(egraph, op), a[0], a[1]]),
            op @ Op::Reshape(_) => Fx::Reshape([attr(egraph, op), a[0]]),
            op @ Op::Slice { .. } => Fx::Slice([attr(egraph, op), a[0]]),
            op @ Op::GroupedMatMul { .. } => Fx::GroupedMatMul([attr(egraph, op), a[0], a[1], a[2]]),
            op @ Op::Permute { .. } => Fx::Permute([attr(egraph, op), a[0], a[1]]),
            op @ Op::TopK { .. } => Fx::TopK([attr(egraph, op), a[0]]),
            Op::TakeAlong => Fx::TakeAlong([a[0], a[1]]),
            op @ Op::PutAlong { .. } => Fx::PutAlong([attr(egraph, op), a[0], a[1]]),
            op @ Op::Sum { .. } => Fx::SumAxis([attr(egraph, op), a[0]]),
            op @ Op::SumTo(_) => Fx::SumTo([attr(egraph, op), a[0]]),
            op @ Op::BroadcastTo(_) => Fx::BroadcastTo([attr(egraph, op), a[0]]),
            op @ Op::Concat { .. } if a.len() == 2 => Fx::Concat([attr(egraph, op), a[0], a[1]]),
            op => {
                let key = (serde_json::to_string(op).expect("ops serialise"), a.clone());
                Fx::Opaque(opaque_symbol(*first.entry(key).or_insert(i)), a)
            }
        };
        classes.push(egraph.add(enode));
    }
    classes
}

fn is_last_two_swap(perm: &[usize]) -> bool {
    let r = perm.len();
    r >= 2 && perm[..r - 2].iter().enumerate().all(|(i, &p)| p == i) && perm[r - 2] == r - 1 && perm[r - 1] == r - 2
}

/// Rebuilds `f` from the `chosen` node of each class reachable from `roots`.
pub fn decode(
    module: &Module,
    f: &Function,
    egraph: &EGraph<Fx, FusionAnalysis>,
    chosen: &HashMap<Id, Fx>,
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
        let node = &chosen[&class];
        if !children_done {
            stack.push((class, true));
            for &c in node.children().iter().rev() {
                let c = egraph.find(c);
                if !built.contains_key(&c) && !matches!(chosen[&c], Fx::Attr(_)) {
                    stack.push((c, false));
                }
            }
            continue;
        }
        let data = &egraph[class].data;
        let shape = data.shape.clone().expect("every class has a shape");
        let v = match node {
            Fx::Opaque(symbol, children) => {
                let original = &f.nodes[original_index(*symbol).expect("opaque symbol")];
                match original.op {
                    Op::Arg(i) => args[i],
                    _ => {
                        let children = children.iter().map(|c| built[&egraph.find(*c)]).collect();
                        b.push(original.op.clone(), children, original.shape.clone(), original.dtype)
                    }
                }
            }
            Fx::Const(c) => b.constant(c.value()),
            Fx::Attr(_) => unreachable!("attributes are not values"),
            _ => {
                let (op, inputs) = op_of(egraph, node);
                let children = inputs.iter().map(|c| built[&egraph.find(*c)]).collect();
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

/// The graph op of an e-node and the classes of its graph arguments (attributes and the
/// constants that become attributes dropped).
fn op_of<'a>(egraph: &EGraph<Fx, FusionAnalysis>, node: &'a Fx) -> (Op, &'a [Id]) {
    let data = |id: &Id| &egraph[*id].data;
    let children = node.children();
    match node {
        Fx::Add(_) => (Op::Add, children),
        Fx::Sub(_) => (Op::Sub, children),
        Fx::Mul(_) => (Op::Mul, children),
        Fx::Div(_) => (Op::Div, children),
        Fx::Exp(_) => (Op::Exp, children),
        Fx::Log(_) => (Op::Log, children),
        Fx::Square(_) => (Op::Square, children),
        Fx::Rsqrt(_) => (Op::Rsqrt, children),
        Fx::Silu(_) => (Op::Silu, children),
        Fx::Sigmoid(_) => (Op::Sigmoid, children),
        Fx::Neg(_) => (Op::Neg, children),
        Fx::InvertOrder(_) => (Op::InvertOrder, children),
        Fx::Stop(_) => (Op::StopGradient, children),
        Fx::SumLast(x) => (Op::Sum { axis: rank(data(x)) - 1, keep: true }, children),
        Fx::MaxLast(x) => (Op::Max { axis: rank(data(x)) - 1, keep: true }, children),
        Fx::TransposeLast2(x) => {
            let r = rank(data(x));
            let mut perm: Vec<usize> = (0..r).collect();
            perm.swap(r - 2, r - 1);
            (Op::Transpose(perm), children)
        }
        Fx::MatMul([attr, ..])
        | Fx::Reshape([attr, _])
        | Fx::Slice([attr, _])
        | Fx::Concat([attr, ..])
        | Fx::SumTo([attr, _])
        | Fx::BroadcastTo([attr, _])
        | Fx::Quantize([attr, _])
        | Fx::ScaledMatMul([attr, ..])
        | Fx::TopK([attr, _])
        | Fx::GroupedMatMul([attr, ..])
        | Fx::Permute([attr, ..])
        | Fx::PutAlong([attr, ..])
        | Fx::SumAxis([attr, _]) => (attr_op(egraph, *attr), &children[1..]),
        Fx::TakeAlong(_) => (Op::TakeAlong, children),
        Fx::RopeConcat(_) => (Op::RopeConcat, children),
        Fx::Route([k, keep, grouping, _, _, scale]) => {
            let (Op::TopK { k }, Op::TopK { k: keep }, Op::Reshape(grouped)) =
                (attr_op(egraph, *k), attr_op(egraph, *keep), attr_op(egraph, *grouping))
            else {
                unreachable!("route's attributes")
            };
            (Op::Route { groups: grouped[1], keep, k, scale: constant_of(egraph, *scale) }, &children[3..5])
        }
        Fx::RmsNorm([_, _, eps]) => (Op::RmsNorm { eps: constant_of(egraph, *eps) }, &children[..2]),
        Fx::Softmax(_) => (Op::Softmax, children),
        Fx::SwiGlu(_) => (Op::SwiGlu, children),
        Fx::AddRmsNorm([_, _, _, eps]) => (Op::AddRmsNorm { eps: constant_of(egraph, *eps) }, &children[..3]),
        Fx::RmsNormGrad([_, _, _, eps]) => (Op::RmsNormGrad { eps: constant_of(egraph, *eps) }, &children[..3]),
        Fx::RmsNormGradAcc([_, _, _, _, eps]) => (Op::RmsNormGrad { eps: constant_of(egraph, *eps) }, &children[..4]),
        Fx::SoftmaxGrad(_) => (Op::SoftmaxGrad, children),
        Fx::CrossEntropy(_) => (Op::CrossEntropy, children),
        Fx::CrossEntropyGrad(_) => (Op::CrossEntropyGrad, children),
        Fx::SwiGluGrad(_) => (Op::SwiGluGrad, children),
        Fx::ConcatMatMul([attr, ..]) => match attr_op(egraph, *attr) {
            Op::MatMul { ta, tb, fp8 } => (Op::ConcatMatMul { ta, tb, fp8 }, &children[1..]),
            Op::ScaledMatMul { promote } => (Op::ConcatScaledMatMul { promote }, &children[1..]),
            _ => unreachable!("a GEMM's attribute"),
        },
        Fx::PermuteQuantize([quantize, permute, ..]) => {
            let (Op::Quantize { cols, .. }, Op::Permute { k }) =
                (attr_op(egraph, *quantize), attr_op(egraph, *permute))
            else {
                unreachable!("permute_quantize's attributes")
            };
            (Op::PermuteQuantize { k, cols, gated: false }, &children[2..])
        }
        Fx::ConcatGroupedMatMul([attr, ..]) => {
            let Op::GroupedMatMul { tb, fp8 } = attr_op(egraph, *attr) else {
                unreachable!("a grouped GEMM's attribute")
            };
            (Op::ConcatGroupedMatMul { tb, fp8 }, &children[1..])
        }
        Fx::ConcatRowsMatMul([attr, ..]) => {
            let Op::MatMul { ta, tb, fp8 } = attr_op(egraph, *attr) else { unreachable!("a matmul's attribute") };
            (Op::ConcatRowsMatMul { ta, tb, fp8 }, &children[1..])
        }
        Fx::ConcatKMatMul([attr, ..]) => {
            let Op::MatMul { ta, tb, fp8 } = attr_op(egraph, *attr) else { unreachable!("a matmul's attribute") };
            (Op::ConcatKMatMul { ta, tb, fp8 }, &children[1..])
        }
        Fx::MatMulAdd([attr, ..]) => {
            let Op::MatMul { ta, tb, fp8 } = attr_op(egraph, *attr) else { unreachable!("a matmul's attribute") };
            (Op::MatMulAdd { ta, tb, fp8 }, &children[1..])
        }
        Fx::MaskedSoftmax([scale, ..]) => (Op::MaskedSoftmax { scale: constant_of(egraph, *scale) }, &children[1..]),
        Fx::RmsNormQuantize([attr, _, _, eps]) => {
            let Op::Quantize { cols, .. } = attr_op(egraph, *attr) else { unreachable!("a quantize attribute") };
            (Op::RmsNormQuantize { eps: constant_of(egraph, *eps), cols }, &children[1..3])
        }
        Fx::SwiGluQuantize([attr, ..]) => {
            let Op::Quantize { cols, .. } = attr_op(egraph, *attr) else { unreachable!("a quantize attribute") };
            (Op::SwiGluQuantize { cols }, &children[1..])
        }
        Fx::Get0(_) => (Op::Get(0), children),
        Fx::Get1(_) => (Op::Get(1), children),
        Fx::Get2(_) => (Op::Get(2), children),
        Fx::Const(_) | Fx::Attr(_) | Fx::Opaque(..) => unreachable!("leaves and opaque ops are decoded by the caller"),
    }
}

fn rank(data: &super::analysis::ClassData) -> usize {
    data.shape.as_ref().expect("shaped").len()
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
