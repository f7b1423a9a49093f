//! What the e-graph knows of each class: the shape and type of its value (the parts of a
//! tuple, for fused ops with several results), computed from the children as the graph
//! builder computes them, and for opaque ops from the original node's record.

use super::lang::{Attr, Fx};
use crate::fuse::kernels::dtype_bytes;
use crate::graph::ir::{broadcast_shape, matmul_shape, DType, Op, Shape};
use egg::{Analysis, DidMerge, EGraph, Id, Symbol};

#[derive(Clone, Debug, PartialEq)]
pub struct ClassData {
    pub shape: Option<Shape>,
    pub dtype: DType,
    /// The shape and type of each result of a tuple (empty for other values).
    pub parts: Vec<(Shape, DType)>,
}

impl ClassData {
    fn value(shape: Shape, dtype: DType) -> Self {
        ClassData { shape: Some(shape), dtype, parts: vec![] }
    }

    fn tuple(parts: Vec<(Shape, DType)>) -> Self {
        ClassData { shape: Some(vec![]), dtype: DType::Tuple, parts }
    }

    /// Elements of the value (a tuple: of its parts).
    pub fn numel(&self) -> f64 {
        match self.dtype {
            DType::Tuple => self.parts.iter().map(|(s, _)| s.iter().product::<usize>() as f64).sum(),
            _ => self.shape.as_ref().map_or(0.0, |s| s.iter().product::<usize>() as f64),
        }
    }

    /// Bytes the value occupies (a tuple: its parts).
    pub fn bytes(&self) -> f64 {
        let part = |s: &Shape, d: DType| s.iter().product::<usize>() as f64 * dtype_bytes(d) as f64;
        match self.dtype {
            DType::Tuple => self.parts.iter().map(|(s, d)| part(s, *d)).sum(),
            d => self.shape.as_ref().map_or(0.0, |s| part(s, d)),
        }
    }
}

#[derive(Default)]
pub struct FusionAnalysis {
    /// Shape and type of each original node, by index (for `Opaque("#i")`).
    pub originals: Vec<(Shape, DType)>,
}

/// The op an attribute class holds.
pub fn attr_op<N: Analysis<Fx>>(egraph: &EGraph<Fx, N>, class: Id) -> Op {
    egraph[class]
        .nodes
        .iter()
        .find_map(|n| match n {
            Fx::Attr(a) => Some(a.op()),
            _ => None,
        })
        .expect("an attribute class")
}

pub fn opaque_symbol(index: usize) -> Symbol {
    Symbol::from(format!("#{index}"))
}

pub fn original_index(symbol: Symbol) -> Option<usize> {
    symbol.as_str().strip_prefix('#')?.parse().ok()
}

impl Analysis<Fx> for FusionAnalysis {
    type Data = ClassData;

    fn make(egraph: &mut EGraph<Fx, Self>, enode: &Fx, _: Id) -> ClassData {
        let child = |id: &Id| egraph[*id].data.clone();
        let shape = |id: &Id| egraph[*id].data.shape.clone().expect("children are shaped");
        match enode {
            Fx::Opaque(symbol, _) => {
                let (shape, dtype) = original_index(*symbol)
                    .map(|i| egraph.analysis.originals[i].clone())
                    .expect("opaque nodes name an original node");
                ClassData::value(shape, dtype)
            }
            Fx::Const(_) => ClassData::value(vec![], DType::F32),
            Fx::Attr(_) => ClassData::value(vec![], DType::Tuple),
            Fx::Add([a, b]) | Fx::Sub([a, b]) | Fx::Mul([a, b]) | Fx::Div([a, b]) | Fx::SwiGlu([a, b]) => {
                broadcast(&child(a), &child(b))
            }
            Fx::Exp(x)
            | Fx::Log(x)
            | Fx::Square(x)
            | Fx::Rsqrt(x)
            | Fx::Silu(x)
            | Fx::Sigmoid(x)
            | Fx::Neg(x)
            | Fx::Stop(x)
            | Fx::InvertOrder(x)
            | Fx::Softmax(x)
            | Fx::SoftmaxGrad([_, x]) => child(x),
            Fx::CrossEntropyGrad([x, ..]) => child(x),
            Fx::CrossEntropy([x, labels]) => ClassData::tuple(vec![(shape(labels), child(x).dtype); 3]),
            Fx::RmsNorm([x, _, _]) => child(x),
            Fx::SumLast(x) | Fx::MaxLast(x) => {
                let mut d = child(x);
                if let Some(last) = d.shape.as_mut().and_then(|s| s.last_mut()) {
                    *last = 1;
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
            Fx::MatMul([attr, a, b]) => {
                let Op::MatMul { ta, tb, .. } = attr_op(egraph, *attr) else { unreachable!("a matmul's attribute") };
                ClassData::value(matmul_shape(&shape(a), &shape(b), ta, tb), DType::F32)
            }
            Fx::Reshape([attr, x]) => {
                let Op::Reshape(to) = attr_op(egraph, *attr) else { unreachable!("a reshape's attribute") };
                ClassData::value(to, child(x).dtype)
            }
            Fx::Slice([attr, x]) => {
                let Op::Slice { axis, start, end } = attr_op(egraph, *attr) else {
                    unreachable!("a slice's attribute")
                };
                let mut s = shape(x);
                s[axis] = end - start;
                ClassData::value(s, child(x).dtype)
            }
            Fx::SumTo([attr, x]) | Fx::BroadcastTo([attr, x]) => {
                let (Op::SumTo(to) | Op::BroadcastTo(to)) = attr_op(egraph, *attr) else {
                    unreachable!("a sum_to's or broadcast_to's attribute")
                };
                ClassData::value(to, child(x).dtype)
            }
            Fx::Concat([attr, a, b]) => {
                let Op::Concat { axis } = attr_op(egraph, *attr) else { unreachable!("a concat's attribute") };
                let mut s = shape(a);
                s[axis] += shape(b)[axis];
                ClassData::value(s, child(a).dtype)
            }
            Fx::AddRmsNorm([a, b, _, _]) => {
                let sum = broadcast(&child(a), &child(b));
                let part = (sum.shape.expect("shaped"), sum.dtype);
                ClassData::tuple(vec![part.clone(), part])
            }
            Fx::RmsNormGrad([x, w, dy, _]) | Fx::RmsNormGradAcc([x, w, dy, _, _]) => {
                let dtype = child(dy).dtype;
                ClassData::tuple(vec![(shape(x), dtype), (shape(w), dtype)])
            }
            Fx::SwiGluGrad([a, b, dy]) => {
                let dtype = child(dy).dtype;
                ClassData::tuple(vec![(shape(a), dtype), (shape(b), dtype)])
            }
            Fx::ConcatMatMul([attr, a, b1, b2]) => {
                let op = attr_op(egraph, *attr);
                let product = |b: &Id| (product_shape(&op, &shape(a), &shape(b)), DType::F32);
                ClassData::tuple(vec![product(b1), product(b2)])
            }
            Fx::TopK([attr, x]) => {
                let Op::TopK { k } = attr_op(egraph, *attr) else { unreachable!("a top_k's attribute") };
                let mut s = shape(x);
                *s.last_mut().expect("rank ≥ 1") = k;
                ClassData::value(s, DType::I32)
            }
            Fx::TakeAlong([x, idx]) => ClassData::value(shape(idx), child(x).dtype),
            Fx::PutAlong([attr, idx, g]) => {
                let Op::PutAlong { n } = attr_op(egraph, *attr) else { unreachable!("a put_along's attribute") };
                let mut s = shape(idx);
                *s.last_mut().expect("rank ≥ 1") = n;
                ClassData::value(s, child(g).dtype)
            }
            Fx::SumAxis([attr, x]) => {
                let Op::Sum { axis, keep } = attr_op(egraph, *attr) else { unreachable!("a sum's attribute") };
                let mut s = shape(x);
                if keep {
                    s[axis] = 1;
                } else {
                    s.remove(axis);
                }
                ClassData::value(s, child(x).dtype)
            }
            Fx::Route([k, _, _, scores, _, _]) => {
                let Op::TopK { k } = attr_op(egraph, *k) else { unreachable!("a top_k's attribute") };
                let tokens = shape(scores)[0];
                ClassData::tuple(vec![(vec![tokens, k], DType::I32), (vec![tokens, k], child(scores).dtype)])
            }
            Fx::MatMulAdd([_, _, _, c]) => child(c),
            Fx::RopeConcat([nope, pe, _, _]) => {
                let mut s = shape(nope);
                *s.last_mut().expect("rank ≥ 1") += shape(pe).last().copied().expect("rank ≥ 1");
                ClassData::value(s, child(nope).dtype)
            }
            Fx::MaskedSoftmax([_, s, mask]) => broadcast(&child(s), &child(mask)),
            Fx::GroupedMatMul([attr, xs, w, _]) => {
                let Op::GroupedMatMul { tb, .. } = attr_op(egraph, *attr) else {
                    unreachable!("a grouped GEMM's attribute")
                };
                ClassData::value(grouped_shape(tb, &shape(xs), &shape(w)), DType::F32)
            }
            Fx::Permute([_, x, order]) => ClassData::value(vec![shape(order)[0], shape(x)[1]], child(x).dtype),
            Fx::PermuteQuantize([_, _, x, order]) => {
                ClassData::value(vec![shape(order)[0], shape(x)[1]], DType::F8e4m3)
            }
            Fx::ConcatGroupedMatMul([attr, xs, w1, w2, _]) => {
                let Op::GroupedMatMul { tb, .. } = attr_op(egraph, *attr) else {
                    unreachable!("a grouped GEMM's attribute")
                };
                let product = |w: &Id| (grouped_shape(tb, &shape(xs), &shape(w)), DType::F32);
                ClassData::tuple(vec![product(w1), product(w2)])
            }
            Fx::ConcatRowsMatMul([attr, a1, a2, b]) => {
                let Op::MatMul { ta, tb, .. } = attr_op(egraph, *attr) else { unreachable!("a matmul's attribute") };
                let product = |a: &Id| (matmul_shape(&shape(a), &shape(b), ta, tb), DType::F32);
                ClassData::tuple(vec![product(a1), product(a2)])
            }
            Fx::ConcatKMatMul([attr, a1, b1, ..]) => {
                let Op::MatMul { ta, tb, .. } = attr_op(egraph, *attr) else { unreachable!("a matmul's attribute") };
                ClassData::value(matmul_shape(&shape(a1), &shape(b1), ta, tb), DType::F32)
            }
            Fx::ScaledMatMul([attr, a, b]) => {
                let op = attr_op(egraph, *attr);
                ClassData::value(product_shape(&op, &shape(a), &shape(b)), DType::F32)
            }
            Fx::Quantize([attr, x]) => {
                let Op::Quantize { transpose, .. } = attr_op(egraph, *attr) else {
                    unreachable!("a quantize attribute")
                };
                let s = shape(x);
                ClassData::value(if transpose { vec![s[1], s[0]] } else { s }, DType::F8e4m3)
            }
            Fx::RmsNormQuantize([_, x, _, _]) | Fx::SwiGluQuantize([_, x, _]) => {
                let s = shape(x);
                let n = *s.last().expect("rank ≥ 1");
                ClassData::value(vec![s.iter().product::<usize>() / n, n], DType::F8e4m3)
            }
            Fx::Get0(t) => part(&child(t), 0),
            Fx::Get1(t) => part(&child(t), 1),
            Fx::Get2(t) => part(&child(t), 2),
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

/// The shape of a GEMM's product: a `matmul`'s (with its transposes) or a `scaled_matmul`'s
/// (operands already laid out K-major, [m, k] and [n, k]).
fn product_shape(op: &Op, a: &[usize], b: &[usize]) -> Shape {
    match *op {
        Op::MatMul { ta, tb, .. } => matmul_shape(a, b, ta, tb),
        Op::ScaledMatMul { .. } => matmul_shape(a, b, false, true),
        _ => unreachable!("a GEMM's attribute"),
    }
}

/// The shape of a grouped GEMM's product: rows of xs by the experts' N.
fn grouped_shape(tb: bool, xs: &[usize], w: &[usize]) -> Shape {
    vec![xs[0], if tb { w[1] } else { w[2] }]
}

/// An elementwise result: the broadcast shape, the type of the non-scalar operand.
fn broadcast(a: &ClassData, b: &ClassData) -> ClassData {
    let shape = match (&a.shape, &b.shape) {
        (Some(x), Some(y)) => broadcast_shape(x, y),
        _ => panic!("elementwise operands are shaped"),
    };
    let dtype = if a.shape.as_ref().is_some_and(|s| s.is_empty()) { b.dtype } else { a.dtype };
    ClassData::value(shape, dtype)
}

fn part(tuple: &ClassData, i: usize) -> ClassData {
    let (shape, dtype) = tuple.parts[i].clone();
    ClassData::value(shape, dtype)
}

/// The attribute leaf of `op`.
pub fn attr(egraph: &mut EGraph<Fx, FusionAnalysis>, op: &Op) -> Id {
    egraph.add(Fx::Attr(Attr::new(op)))
}
