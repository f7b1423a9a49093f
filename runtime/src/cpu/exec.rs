//! The interpreter: runs a graph function node by node, in `T` = f32 or f64, freeing each
//! value after its last use. Calls run the callee recursively. Elementwise arithmetic lives
//! here; the other kernels are in [`super::kernels`], the ops that exchange rows with other
//! ranks in [`super::exchange`].

use super::exchange::{self, Alone, Exchange};
use super::kernels::{attention, grads, index, layout, linalg, rope, rows};
use super::numerics::{matmul_fp8, quantize, round_bf16, round_e4m3, Tiling};
use super::real::Real;
use super::value::{Tensor, Value};
use crate::comm::CommError;
use dsc_compiler::graph::ir::{broadcast_shape, matmul_shape, DType, ExpertRows, Function, Module, Node, Op};
use std::borrow::Cow;
use std::sync::Arc;

/// Runs function `f` of `module` on `args`, returning its outputs. The graph must not exchange
/// rows with other ranks (one built for a single rank never does).
pub fn run<T: Real>(module: &Module, f: usize, args: Vec<Value<T>>) -> Vec<Value<T>> {
    run_exchanging(module, f, args, &Alone).unwrap_or_else(|error| panic!("{error}"))
}

/// Runs function `f` of `module` on `args`, its all-to-alls going through `exchange`.
pub fn run_exchanging<T: Real>(
    module: &Module,
    f: usize,
    args: Vec<Value<T>>,
    exchange: &dyn Exchange,
) -> Result<Vec<Value<T>>, CommError> {
    interpret(module, f, args, exchange, &mut |_, _, _| {})
}

/// [`run`], showing `observe` every value computed (function, node, value), in the callees too.
pub fn run_observed<T: Real>(
    module: &Module,
    f: usize,
    args: Vec<Value<T>>,
    observe: &mut dyn FnMut(usize, usize, &Value<T>),
) -> Vec<Value<T>> {
    interpret(module, f, args, &Alone, observe).unwrap_or_else(|error| panic!("{error}"))
}

fn interpret<T: Real>(
    module: &Module,
    f: usize,
    args: Vec<Value<T>>,
    exchange: &dyn Exchange,
    observe: &mut dyn FnMut(usize, usize, &Value<T>),
) -> Result<Vec<Value<T>>, CommError> {
    let function = &module.functions[f];
    assert_eq!(args.len(), function.args.len(), "{} takes {} arguments", function.name, function.args.len());
    let last_use = last_uses(function);
    let mut values: Vec<Option<Value<T>>> = vec![None; function.nodes.len()];
    let mut args: Vec<Option<Value<T>>> = args.into_iter().map(Some).collect();
    for (i, node) in function.nodes.iter().enumerate() {
        let value = match node.op {
            Op::Arg(a) => {
                let value = args[a].take().expect("each argument is read once");
                match (&value, node.dtype) {
                    // A bf16 argument holds bf16 values (the GPU keeps it packed).
                    (Value::Real(x), DType::Bf16) => map(node, x, |x| round(x, DType::Bf16)),
                    _ => value,
                }
            }
            _ => {
                let inputs: Vec<&Value<T>> = node
                    .args
                    .iter()
                    .map(|a| values[a.index()].as_ref().expect("value computed and not yet freed"))
                    .collect();
                match node.op {
                    Op::Call(callee) => {
                        let args = inputs.iter().map(|x| (*x).clone()).collect();
                        Value::Tuple(interpret(module, callee, args, exchange, observe)?)
                    }
                    ref op if op.is_exchange() => exchange::eval(node, &inputs, exchange)?,
                    _ => eval(module, node, &inputs),
                }
            }
        };
        observe(f, i, &value);
        values[i] = Some(value);
        for a in &node.args {
            if last_use[a.index()] == i {
                values[a.index()] = None;
            }
        }
    }
    Ok(function.outputs.iter().map(|o| values[o.index()].clone().expect("outputs are kept")).collect())
}

/// For each node, the index of the last node that reads it (`usize::MAX` for outputs).
fn last_uses(f: &Function) -> Vec<usize> {
    let mut last = vec![0usize; f.nodes.len()];
    for (i, node) in f.nodes.iter().enumerate() {
        for a in &node.args {
            last[a.index()] = i;
        }
    }
    for o in &f.outputs {
        last[o.index()] = usize::MAX;
    }
    last
}

fn real<T: Real>(shape: &[usize], data: Vec<T>) -> Value<T> {
    Value::real(Tensor::new(shape.to_vec(), data))
}

fn int<T: Real>(shape: &[usize], data: Vec<i32>) -> Value<T> {
    Value::int(Tensor::new(shape.to_vec(), data))
}

fn map<T: Real>(node: &Node, x: &Tensor<T>, f: impl Fn(T) -> T) -> Value<T> {
    real(&node.shape, x.data.iter().map(|&v| f(v)).collect())
}

fn zip<T: Real>(node: &Node, a: &Tensor<T>, b: &Tensor<T>, f: impl Fn(T, T) -> T) -> Value<T> {
    Value::real(broadcast_zip(&node.shape, a, b, f))
}

/// `f` of `a` and `b` broadcast to `shape`.
fn broadcast_zip<T: Real>(shape: &[usize], a: &Tensor<T>, b: &Tensor<T>, f: impl Fn(T, T) -> T) -> Tensor<T> {
    if a.shape == b.shape {
        return Tensor::new(shape.to_vec(), a.data.iter().zip(&b.data).map(|(&x, &y)| f(x, y)).collect());
    }
    let mut out = Vec::with_capacity(shape.iter().product());
    layout::for_each_broadcast(shape, &[&a.shape, &b.shape], |_, off| out.push(f(a.data[off[0]], b.data[off[1]])));
    Tensor::new(shape.to_vec(), out)
}

/// Rounds to `to`'s precision (the values stay in `T`).
fn round<T: Real>(x: T, to: DType) -> T {
    match to {
        DType::Bf16 => T::from_f64(round_bf16(x.to_f64())),
        DType::F8e4m3 => T::from_f64(round_e4m3(x.to_f64())),
        DType::F32 => T::from_f64(x.to_f64() as f32 as f64),
        DType::F64 | DType::I32 | DType::Tuple => x,
    }
}

/// The product of a GEMM over concatenated weights as the pair of its parts: columns before
/// and from `at` along the last axis.
fn split_last<T: Real>(y: Tensor<T>, at: usize) -> Value<T> {
    let axis = y.shape.len() - 1;
    split(y, axis, at)
}

/// The product of a GEMM over concatenated first operands as the pair of its parts: rows
/// before and from `at`.
fn split_rows<T: Real>(y: Tensor<T>, at: usize) -> Value<T> {
    let axis = y.shape.len() - 2;
    split(y, axis, at)
}

/// `y` cut along `axis` at `at`, as a pair.
fn split<T: Real>(y: Tensor<T>, axis: usize, at: usize) -> Value<T> {
    let part = |start: usize, end: usize| {
        let mut shape = y.shape.clone();
        shape[axis] = end - start;
        Tensor::new(shape, layout::slice(&y.data, &y.shape, axis, start, end))
    };
    pair(part(0, at), part(at, y.shape[axis]))
}

/// The rows of a grouped GEMM: a real [r, cols] tensor or an FP8 matrix.
fn rows_of<T: Real>(xs: &Value<T>) -> linalg::Rows<'_, T> {
    match xs {
        Value::Quantized(q) => linalg::Rows::Quantized(q),
        _ => {
            let t = xs.as_real();
            linalg::Rows::Real { data: &t.data, cols: *t.shape.last().expect("rank 2") }
        }
    }
}

/// The experts' matrices of a grouped GEMM, real or quantised, over `offsets`' experts.
fn weights_of<'v, T: Real>(w: &'v Value<T>, offsets: &[i32]) -> linalg::Weights<'v, T> {
    match w {
        Value::Quantized(q) => linalg::Weights::Quantized { q, experts: offsets.len() - 1 },
        _ => {
            let t = w.as_real();
            linalg::Weights::Real { data: &t.data, shape: &t.shape }
        }
    }
}

/// How many rows a grouped GEMM's rows hold.
fn node_rows<T: Real>(xs: &Value<T>) -> usize {
    match xs {
        Value::Quantized(q) => q.m,
        _ => xs.as_real().shape[0],
    }
}

/// a·bᵀ of quantised K-major operands (`scaled_matmul`'s), each element rounded to T.
fn scaled_product<T: Real>(a: &Value<T>, b: &Value<T>, promote: usize) -> Vec<T> {
    matmul_fp8(a.as_quantized(), &b.as_quantized().transposed(), promote).into_iter().map(T::from_f64).collect()
}

/// The two results of a fused op.
fn pair<T: Real>(first: Tensor<T>, second: Tensor<T>) -> Value<T> {
    Value::Tuple(vec![Value::real(first), Value::real(second)])
}

fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// SwiGLU's gate, silu(a)·b.
fn swiglu<T: Real>(a: T, b: T) -> T {
    a * sigmoid(a) * b
}

/// A row-major [m, n] matrix quantised to FP8 in `tiling` groups.
fn quantized<T: Real>(data: &[T], m: usize, n: usize, tiling: Tiling) -> Value<T> {
    Value::Quantized(Arc::new(quantize(data, m, n, tiling)))
}

/// Evaluates one node on its arguments' values (also the CUDA backend's host fallback).
pub fn eval<T: Real>(module: &Module, node: &Node, v: &[&Value<T>]) -> Value<T> {
    let r = |i: usize| v[i].as_real();
    let ix = |i: usize| v[i].as_int();
    let last = |shape: &[usize]| *shape.last().expect("rank ≥ 1");
    match &node.op {
        Op::Arg(_) => unreachable!("arguments are bound by `run`"),
        Op::Const(c) => real(&[], vec![T::from_f64(*c)]),
        Op::Table(i) => {
            let c = &module.constants[*i];
            real(&c.shape, c.data().into_iter().map(T::from_f64).collect())
        }
        Op::Neg => map(node, r(0), |x| -x),
        Op::Exp => map(node, r(0), T::exp),
        Op::Log => map(node, r(0), T::ln),
        Op::Sigmoid => map(node, r(0), sigmoid),
        Op::Silu => map(node, r(0), |x| x * sigmoid(x)),
        Op::Rsqrt => map(node, r(0), |x| T::ONE / x.sqrt()),
        Op::Sqrt => map(node, r(0), T::sqrt),
        Op::Square => map(node, r(0), |x| x * x),
        Op::Sign => map(node, r(0), |x| {
            if x > T::ZERO {
                T::ONE
            } else if x < T::ZERO {
                -T::ONE
            } else {
                T::ZERO
            }
        }),
        Op::StopGradient => v[0].clone(),
        Op::Add => zip(node, r(0), r(1), |a, b| a + b),
        Op::Sub => zip(node, r(0), r(1), |a, b| a - b),
        Op::Mul => zip(node, r(0), r(1), |a, b| a * b),
        Op::Div => zip(node, r(0), r(1), |a, b| a / b),
        Op::Maximum => zip(node, r(0), r(1), T::max),
        Op::Cast(to) => map(node, r(0), |x| round(x, *to)),
        Op::Sum { axis, .. } => {
            real(&node.shape, layout::reduce(&r(0).data, &r(0).shape, *axis, T::ZERO, |a, b| a + b))
        }
        Op::Max { axis, .. } => {
            let lowest = T::from_f64(f64::NEG_INFINITY);
            real(&node.shape, layout::reduce(&r(0).data, &r(0).shape, *axis, lowest, T::max))
        }
        Op::SumTo(shape) => real(shape, layout::sum_to(&r(0).data, &r(0).shape, shape)),
        Op::BroadcastTo(shape) => match v[0] {
            Value::Int(t) => int(shape, layout::broadcast_to(&t.data, &t.shape, shape)),
            _ => real(shape, layout::broadcast_to(&r(0).data, &r(0).shape, shape)),
        },
        Op::Reshape(shape) => match v[0] {
            Value::Int(t) => int(shape, t.data.clone()),
            _ => real(shape, r(0).data.clone()),
        },
        Op::Transpose(perm) => real(&node.shape, layout::transpose(&r(0).data, &r(0).shape, perm)),
        Op::Slice { axis, start, end } => match v[0] {
            Value::Int(t) => int(&node.shape, layout::slice(&t.data, &t.shape, *axis, *start, *end)),
            _ => real(&node.shape, layout::slice(&r(0).data, &r(0).shape, *axis, *start, *end)),
        },
        Op::PadSlice { axis, start, len } => {
            real(&node.shape, layout::pad_slice(&r(0).data, &r(0).shape, *axis, *start, *len))
        }
        Op::Concat { axis } => {
            let parts: Vec<(&[T], &[usize])> = (0..v.len()).map(|i| (&r(i).data[..], &r(i).shape[..])).collect();
            real(&node.shape, layout::concat(&parts, *axis))
        }
        Op::MatMul { ta, tb, fp8 } => {
            real(&node.shape, linalg::batched_matmul(&r(0).data, &r(0).shape, &r(1).data, &r(1).shape, *ta, *tb, *fp8))
        }
        Op::Gather => real(&node.shape, index::gather(&r(0).data, r(0).shape[1], &ix(1).data)),
        Op::ScatterRows { rows } => {
            real(&node.shape, index::scatter_rows(&ix(0).data, &r(1).data, *rows, last(&node.shape)))
        }
        Op::TakeAlong => {
            real(&node.shape, index::take_along(&r(0).data, last(&r(0).shape), &ix(1).data, last(&ix(1).shape)))
        }
        Op::PutAlong { n } => real(&node.shape, index::put_along(&ix(0).data, last(&ix(0).shape), &r(1).data, *n)),
        Op::TopK { k } => int(&node.shape, index::top_k(&r(0).data, last(&r(0).shape), *k)),
        Op::Count { bins } => real(&node.shape, index::count(&ix(0).data, last(&ix(0).shape), *bins)),
        Op::SortByExpert { .. } => int(&node.shape, index::sort_by_expert(&ix(0).data)),
        Op::ExpertOffsets { experts } => int(&node.shape, index::expert_offsets(&ix(0).data, *experts)),
        Op::InvertOrder => int(&node.shape, index::invert_order(&ix(0).data)),
        Op::Permute { k } => real(&node.shape, index::permute(&r(0).data, last(&r(0).shape), &ix(1).data, *k)),
        Op::PermuteGrad { k, tokens } => {
            real(&node.shape, index::permute_grad(&r(0).data, last(&r(0).shape), &ix(1).data, *k, *tokens))
        }
        Op::GroupedMatMul { tb, fp8 } => {
            let offsets = &ix(2).data;
            real(&node.shape, linalg::grouped_matmul(rows_of(v[0]), weights_of(v[1], offsets), offsets, *tb, *fp8))
        }
        // The two products as `grouped_matmul` computes each, added as `add` would.
        Op::ConcatKScaledGroupedMatMul { fp8 } => {
            let offsets = &ix(4).data;
            let product = |x: &Value<T>, w: &Value<T>| {
                linalg::grouped_matmul(rows_of(x), weights_of(w, offsets), offsets, true, Some(*fp8))
            };
            let sum = product(v[0], v[1]).into_iter().zip(product(v[2], v[3])).map(|(a, b)| a + b).collect();
            real(&node.shape, sum)
        }
        Op::ScaledGroupedWgrad { promote } => {
            let out = linalg::scaled_grouped_wgrad(v[0].as_quantized(), v[1].as_quantized(), &ix(2).data, *promote);
            real(&node.shape, out.into_iter().map(T::from_f64).collect())
        }
        Op::QuantizeByExpert { tile, rows, .. } => {
            let (d, capacity) = (node.shape[0], node.shape[1]);
            let x: Cow<[T]> = match rows {
                ExpertRows::Stored => Cow::Borrowed(&r(0).data),
                ExpertRows::Permuted { k } => Cow::Owned(index::permute(&r(0).data, d, &ix(2).data, *k)),
                ExpertRows::UnpermutedGrad { k } => {
                    Cow::Owned(index::unpermute_grad_rows(&r(0).data, d, &ix(2).data, &r(3).data, *k))
                }
                ExpertRows::SwiGlu => {
                    Cow::Owned(r(0).data.iter().zip(&r(2).data).map(|(&a, &b)| swiglu(a, b)).collect())
                }
            };
            Value::Quantized(Arc::new(linalg::quantize_by_expert(&x, d, &ix(1).data, *tile, capacity)))
        }
        Op::GroupedWgrad { experts, fp8 } => {
            let out = linalg::grouped_wgrad(
                &r(0).data,
                last(&r(0).shape),
                &r(1).data,
                last(&r(1).shape),
                &ix(2).data,
                *experts,
                *fp8,
            );
            real(&node.shape, out)
        }
        Op::Unpermute { k } => {
            real(&node.shape, index::unpermute(&r(0).data, last(&r(0).shape), &ix(1).data, &r(2).data, *k))
        }
        Op::UnpermuteGradRows { k } => {
            real(&node.shape, index::unpermute_grad_rows(&r(0).data, last(&r(0).shape), &ix(1).data, &r(2).data, *k))
        }
        Op::UnpermuteGradGates { k } => {
            let tokens = r(0).shape[0];
            real(
                &node.shape,
                index::unpermute_grad_gates(&r(0).data, last(&r(0).shape), &r(1).data, &ix(2).data, *k, tokens),
            )
        }
        Op::RmsNorm { eps } => {
            real(&node.shape, rows::rms_norm(&r(0).data, last(&r(0).shape), &r(1).data, T::from_f64(*eps)))
        }
        Op::Softmax => real(&node.shape, rows::softmax(&r(0).data, last(&r(0).shape))),
        Op::SwiGlu => zip(node, r(0), r(1), swiglu),
        Op::AddRmsNorm { eps } => {
            let sum = broadcast_zip(&broadcast_shape(&r(0).shape, &r(1).shape), r(0), r(1), |a, b| a + b);
            let normed = rows::rms_norm(&sum.data, last(&sum.shape), &r(2).data, T::from_f64(*eps));
            let normed = Tensor::new(sum.shape.clone(), normed);
            pair(sum, normed)
        }
        Op::RmsNormGrad { eps } => {
            let (x, w) = (r(0), r(1));
            let acc = (v.len() == 4).then(|| &r(3).data[..]);
            let (dx, dw) = grads::rms_norm_grad(&x.data, last(&x.shape), &w.data, &r(2).data, acc, T::from_f64(*eps));
            pair(Tensor::new(x.shape.clone(), dx), Tensor::new(w.shape.clone(), dw))
        }
        Op::SoftmaxGrad => real(&node.shape, grads::softmax_grad(&r(0).data, last(&r(0).shape), &r(1).data)),
        Op::CrossEntropy => {
            let (nll, maxima, sums) = grads::cross_entropy(&r(0).data, last(&r(0).shape), &ix(1).data);
            let shape = &ix(1).shape;
            let row_value = |data| Value::real(Tensor::new(shape.clone(), data));
            Value::Tuple(vec![row_value(nll), row_value(maxima), row_value(sums)])
        }
        Op::CrossEntropyGrad => {
            let (x, dy, maxima, sums) = (&r(0).data, &r(2).data, &r(3).data, &r(4).data);
            real(&node.shape, grads::cross_entropy_grad(x, last(&r(0).shape), &ix(1).data, dy, maxima, sums))
        }
        Op::ConcatMatMul { ta, tb, fp8 } => {
            let (a, b1, b2) = (r(0), r(1), r(2));
            let rank = b1.shape.len();
            let n_axis = if *tb { rank - 2 } else { rank - 1 };
            let b = layout::concat(&[(&b1.data, &b1.shape), (&b2.data, &b2.shape)], n_axis);
            let mut b_shape = b1.shape.clone();
            b_shape[n_axis] += b2.shape[n_axis];
            let y = linalg::batched_matmul(&a.data, &a.shape, &b, &b_shape, *ta, *tb, *fp8);
            split_last(Tensor::new(matmul_shape(&a.shape, &b_shape, *ta, *tb), y), b1.shape[n_axis])
        }
        // The two products of the fused form, each as `grouped_matmul` computes it.
        Op::ConcatGroupedMatMul { tb, fp8 } => {
            let offsets = &ix(3).data;
            let product = |w: &Value<T>| {
                let y = linalg::grouped_matmul(rows_of(v[0]), weights_of(w, offsets), offsets, *tb, *fp8);
                let rows = node_rows(v[0]);
                Tensor::new(vec![rows, y.len() / rows.max(1)], y)
            };
            pair(product(v[1]), product(v[2]))
        }
        Op::ConcatRowsMatMul { ta, tb, fp8 } => {
            let (a1, a2, b) = (r(0), r(1), r(2));
            let rank = a1.shape.len();
            let m_axis = if *ta { rank - 1 } else { rank - 2 };
            let a = layout::concat(&[(&a1.data, &a1.shape), (&a2.data, &a2.shape)], m_axis);
            let mut a_shape = a1.shape.clone();
            a_shape[m_axis] += a2.shape[m_axis];
            let y = linalg::batched_matmul(&a, &a_shape, &b.data, &b.shape, *ta, *tb, *fp8);
            split_rows(Tensor::new(matmul_shape(&a_shape, &b.shape, *ta, *tb), y), a1.shape[m_axis])
        }
        Op::ConcatKMatMul { ta, tb, fp8 } => {
            let product = |a: &Tensor<T>, b: &Tensor<T>| {
                linalg::batched_matmul(&a.data, &a.shape, &b.data, &b.shape, *ta, *tb, *fp8)
            };
            let (y1, y2) = (product(r(0), r(1)), product(r(2), r(3)));
            real(&node.shape, y1.into_iter().zip(y2).map(|(a, b)| a + b).collect())
        }
        Op::MatMulAdd { ta, tb, fp8 } => {
            let (a, b, c) = (r(0), r(1), r(2));
            let product = linalg::batched_matmul(&a.data, &a.shape, &b.data, &b.shape, *ta, *tb, *fp8);
            real(&c.shape, c.data.iter().zip(product).map(|(&c, y)| c + y).collect())
        }
        Op::MaskedSoftmax { scale } => {
            let (s, mask) = (r(0), r(1));
            let scale = T::from_f64(*scale);
            let logits = broadcast_zip(&node.shape, s, mask, |s, m| s * scale + m);
            real(&node.shape, rows::softmax(&logits.data, last(&node.shape)))
        }
        Op::PermuteQuantize { k, cols, gated } => {
            let (x, order) = (r(0), &ix(1).data);
            let d = last(&x.shape);
            let rows = if *gated {
                index::unpermute_grad_rows(&x.data, d, order, &r(2).data, *k)
            } else {
                index::permute(&x.data, d, order, *k)
            };
            quantized(&rows, order.len(), d, Tiling { rows: 1, cols: *cols })
        }
        Op::RopeConcat => Value::real(rope::rope_concat(r(0), r(1), r(2), r(3))),
        Op::Attention { scale, bf16 } => {
            let (o, lse) = attention::attention(r(0), r(1), r(2), T::from_f64(*scale), *bf16);
            Value::Tuple(vec![Value::real(o), Value::real(lse)])
        }
        Op::AttentionGrad { scale, bf16 } => {
            let grads = attention::attention_grad(r(0), r(1), r(2), r(3), r(4), r(5), T::from_f64(*scale), *bf16);
            Value::Tuple(grads.into_iter().map(Value::real).collect())
        }
        Op::Route { groups, keep, k, scale } => {
            let (scores, bias) = (r(0), r(1));
            let (chosen, gates) = index::route(&scores.data, &bias.data, *groups, *keep, *k, T::from_f64(*scale));
            let shape = vec![scores.shape[0], *k];
            Value::Tuple(vec![int(&shape, chosen), real(&shape, gates)])
        }
        // A stack of matrices is quantised as one [batch·m, n] matrix (`fuse::library` makes
        // sure no group straddles two); rows shorter than the result's are padded with zeros.
        Op::Quantize { rows, cols, transpose } => {
            let x = r(0);
            let rank = x.shape.len();
            let data = if *transpose {
                let mut axes: Vec<usize> = (0..rank).collect();
                axes.swap(rank - 2, rank - 1);
                layout::transpose(&x.data, &x.shape, &axes)
            } else {
                x.data.clone()
            };
            let width = if *transpose { x.shape[rank - 2] } else { x.shape[rank - 1] };
            let n = *node.shape.last().expect("a matrix");
            let padded: Vec<T> = data
                .chunks(width)
                .flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(T::ZERO, n - width)))
                .collect();
            quantized(&padded, padded.len() / n, n, Tiling { rows: *rows, cols: *cols })
        }
        Op::ScaledMatMul { promote } => real(&node.shape, scaled_product(v[0], v[1], *promote)),
        Op::ConcatKScaledMatMul { promote } => {
            let (y1, y2) = (scaled_product(v[0], v[1], *promote), scaled_product(v[2], v[3], *promote));
            real(&node.shape, y1.into_iter().zip(y2).map(|(a, b)| a + b).collect())
        }
        Op::ConcatScaledMatMul { promote } => {
            let product = |b: &Value<T>| {
                Tensor::new(vec![v[0].as_quantized().m, b.as_quantized().m], scaled_product(v[0], b, *promote))
            };
            pair(product(v[1]), product(v[2]))
        }
        Op::RmsNormQuantize { eps, cols } => {
            let n = last(&r(0).shape);
            let normed = rows::rms_norm(&r(0).data, n, &r(1).data, T::from_f64(*eps));
            quantized(&normed, normed.len() / n, n, Tiling { rows: 1, cols: *cols })
        }
        Op::SwiGluQuantize { cols } => {
            let n = last(&r(0).shape);
            let gated = broadcast_zip(&r(0).shape, r(0), r(1), swiglu);
            quantized(&gated.data, gated.data.len() / n, n, Tiling { rows: 1, cols: *cols })
        }
        Op::SwiGluGrad => {
            let (da, db) = grads::swiglu_grad(&r(0).data, &r(1).data, &r(2).data);
            pair(Tensor::new(r(0).shape.clone(), da), Tensor::new(r(1).shape.clone(), db))
        }
        Op::Call(_) | Op::ExchangeCounts { .. } | Op::ReceivedOffsets | Op::Dispatch { .. } | Op::Combine { .. } => {
            unreachable!("`interpret` runs calls and exchanges")
        }
        Op::Get(i) => match v[0] {
            Value::Tuple(items) => items[*i].clone(),
            _ => panic!("get from a non-tuple"),
        },
    }
}
