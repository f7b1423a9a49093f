//! Reverse-mode automatic differentiation of graph functions. Each primitive has one VJP rule
//! ([`vjp_rule`]); the backward graph is generated from them, never written per layer. A call
//! is differentiated by splitting its callee (once per callee, so an instanced layer has one
//! backward function too): `name.fwd` is the callee returning, after its outputs, the values
//! its reverse pass reads that are costly to compute again (products, attention, calls,
//! exchanges between ranks, and the routing and expert order: few bytes, but kernels bound by
//! latency; such a value rounded to bf16 is kept rounded), and `name.bwd` takes them and
//! recomputes the rest (norms, activations, casts and quantisations) before running the
//! reverse pass. The values are the forward's own, so the gradients are those of a full
//! recomputation.
//! Attention (a tuple of its output and log-sum-exp) is differentiated where its tuple is,
//! as a call is: its output's adjoint becomes `attention_grad`'s argument.
//! Discrete ops (top-k, counting, sorting, sign, max) pass no gradient.

use super::ir::{DType, Fp8Gemm, Function, FunctionBuilder, Module, Node, Op, Shape, Tiling, V};
use std::collections::{BTreeSet, HashMap};

/// Where the reverse pass starts.
enum Seed {
    /// The VJP function takes one cotangent argument per output: `name.vjp(args…, d_outputs…)
    /// -> (d_args…)`.
    Cotangents,
    /// The gradient of output `0` (a scalar loss): `name.grad(args…) -> (outputs…, d_args…)`.
    Loss,
}

/// Adds `name.vjp` for function `f` (and the two halves of every function it calls), returning
/// its index: it runs `f`'s forward and then its reverse pass. Its outputs are the gradients
/// of `f`'s real-valued arguments, in order.
pub fn vjp(module: &mut Module, f: usize) -> usize {
    build(module, f, Seed::Cotangents)
}

/// Adds `name.grad` for function `f`, whose output 0 is a scalar loss: it returns `f`'s
/// outputs followed by the gradients of `f`'s real-valued arguments.
pub fn grad(module: &mut Module, f: usize) -> usize {
    build(module, f, Seed::Loss)
}

fn build(module: &mut Module, f: usize, seed: Seed) -> usize {
    let suffix = match seed {
        Seed::Cotangents => "vjp",
        Seed::Loss => "grad",
    };
    let name = format!("{}.{suffix}", module.functions[f].name);
    if let Some(existing) = module.function(&name) {
        return existing;
    }
    let (function, _) = differentiate(module, f, seed, name);
    module.add(function.function)
}

/// A callee split for differentiation (see the module doc).
#[derive(Clone, Copy)]
struct Split {
    forward: usize,
    backward: usize,
    /// The callee's own outputs (`name.fwd`'s first ones; the saved values follow).
    outputs: usize,
}

/// Splits function `f` into `name.fwd` and `name.bwd` (once).
fn split(module: &mut Module, f: usize) -> Split {
    let name = module.functions[f].name.clone();
    let outputs = module.functions[f].outputs.len();
    if let (Some(forward), Some(backward)) =
        (module.function(&format!("{name}.fwd")), module.function(&format!("{name}.bwd")))
    {
        return Split { forward, backward, outputs };
    }
    let (whole, copied) = differentiate(module, f, Seed::Cotangents, format!("{name}.bwd"));
    let forward_end = whole.forward_end;
    let whole = whole.function;
    let original = &module.functions[f];
    let keep = Residuals::find(&whole, forward_end);
    // `name.fwd`: the callee, then the saved values (a tuple's part through a `get`).
    let mut renamed = original.clone();
    renamed.name = format!("{name}.fwd");
    let mut b = FunctionBuilder::extend(module, renamed);
    // `whole`'s forward nodes are copies of `original`'s.
    let origin: HashMap<V, u32> = copied.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
    for (k, value) in keep.saved.iter().enumerate() {
        let node = V(origin[&value.node]);
        let v = match value.part {
            None => node,
            Some(i) => b.part(node, i),
        };
        b.output(format!("saved{k}"), v);
    }
    let forward = b.finish();
    let backward = keep.backward(&whole, forward_end, original.args.len());
    let forward = module.add(forward);
    let backward = module.add(backward);
    Split { forward, backward, outputs }
}

/// A value of the forward part that `name.bwd` takes instead of computing: a node, or part `i`
/// of a tuple node.
#[derive(Clone, Copy)]
struct Saved {
    node: V,
    part: Option<usize>,
    /// The node that reads it: the value itself, or the `get` of the part.
    of: V,
}

/// What `name.bwd` keeps of a differentiated function's forward part (nodes before
/// `forward_end`): the values it takes (`saved`) and the nodes it recomputes.
struct Residuals {
    saved: Vec<Saved>,
    recomputed: BTreeSet<usize>,
}

impl Residuals {
    fn find(whole: &Function, forward_end: usize) -> Self {
        let costly = |op: &Op| {
            matches!(
                op,
                Op::MatMul { .. }
                    | Op::GroupedMatMul { .. }
                    | Op::Attention { .. }
                    | Op::Call(_)
                    | Op::ExchangeCounts { .. }
                    | Op::ReceivedOffsets
                    | Op::Dispatch { .. }
                    | Op::Combine { .. }
                    | Op::TopK { .. }
                    | Op::SortByExpert { .. }
                    | Op::ExpertOffsets { .. }
                    | Op::Count { .. }
            )
        };
        let mut saved: Vec<Saved> = Vec::new();
        let mut recomputed = BTreeSet::new();
        let mut needed: Vec<(V, V)> = Vec::new();
        for (i, node) in whole.nodes.iter().enumerate().skip(forward_end) {
            needed.extend(node.args.iter().filter(|a| a.index() < forward_end).map(|&a| (a, V(i as u32))));
        }
        while let Some((v, reader)) = needed.pop() {
            let node = whole.node(v);
            let kept = match node.op {
                Op::Arg(_) => continue,
                // A tuple read by the reverse pass: the part its `get` takes.
                _ if node.dtype == DType::Tuple => match whole.node(reader).op {
                    Op::Get(i) => costly(&node.op).then_some(Saved { node: v, part: Some(i), of: reader }),
                    _ => panic!("a tuple read by {}", whole.node(reader).op.name()),
                },
                Op::Get(i) if costly(&whole.node(node.args[0]).op) => {
                    Some(Saved { node: node.args[0], part: Some(i), of: v })
                }
                // A costly value rounded to bf16 (the experts' outputs for the combine): the
                // rounded value, half the bytes, and no cast to recompute.
                Op::Cast(DType::Bf16) if costly(&whole.node(node.args[0]).op) => {
                    Some(Saved { node: v, part: None, of: v })
                }
                _ => costly(&node.op).then_some(Saved { node: v, part: None, of: v }),
            };
            match kept {
                Some(value) => {
                    if !saved.iter().any(|s| s.node == value.node && s.part == value.part) {
                        saved.push(value);
                    }
                }
                None => {
                    if recomputed.insert(v.index()) {
                        needed.extend(node.args.iter().map(|&a| (a, v)));
                    }
                }
            }
        }
        saved.sort_by_key(|s| (s.node, s.part));
        Residuals { saved, recomputed }
    }

    /// `name.bwd(args…, saved…, d_outputs…)`: `whole` without the forward nodes it neither
    /// recomputes nor takes.
    fn backward(&self, whole: &Function, forward_end: usize, arity: usize) -> Function {
        let mut f = Function {
            name: whole.name.clone(),
            args: whole.args[..arity].to_vec(),
            nodes: Vec::new(),
            outputs: Vec::new(),
            output_names: whole.output_names.clone(),
        };
        let mut map: HashMap<V, V> = HashMap::new();
        let push = |f: &mut Function, node: Node| {
            f.nodes.push(node);
            V(f.nodes.len() as u32 - 1)
        };
        for (i, node) in whole.nodes.iter().enumerate().take(arity) {
            map.insert(V(i as u32), push(&mut f, node.clone()));
        }
        let mut parts: HashMap<(V, usize), V> = HashMap::new();
        for (k, s) in self.saved.iter().enumerate() {
            let of = whole.node(s.of);
            f.args.push((format!("saved{k}"), of.shape.clone(), of.dtype));
            let arg =
                push(&mut f, Node { op: Op::Arg(arity + k), args: vec![], shape: of.shape.clone(), dtype: of.dtype });
            match s.part {
                None => {
                    map.insert(s.node, arg);
                }
                Some(i) => {
                    parts.insert((s.node, i), arg);
                }
            }
        }
        for (i, node) in whole.nodes.iter().enumerate().skip(arity) {
            let v = V(i as u32);
            if map.contains_key(&v) {
                continue;
            }
            let mapped = match node.op {
                // A part of a saved tuple.
                Op::Get(p) if parts.contains_key(&(node.args[0], p)) => parts[&(node.args[0], p)],
                _ if i < forward_end && !self.recomputed.contains(&i) => continue,
                // A cotangent: after the saved values.
                Op::Arg(a) => {
                    f.args.push(whole.args[a].clone());
                    push(&mut f, Node { op: Op::Arg(a + self.saved.len()), ..node.clone() })
                }
                _ => {
                    let args = node.args.iter().map(|a| map[a]).collect();
                    push(&mut f, Node { args, ..node.clone() })
                }
            };
            map.insert(v, mapped);
        }
        f.outputs = whole.outputs.iter().map(|o| map[o]).collect();
        f
    }
}

/// A function differentiating another, and where its copy of the other's forward ends.
struct Differentiated {
    function: Function,
    /// The nodes before are the arguments and the copied forward nodes.
    forward_end: usize,
}

/// The function differentiating `f` (named `name`, not yet added), and the copy of each of
/// `f`'s nodes in it.
fn differentiate(module: &mut Module, f: usize, seed: Seed, name: String) -> (Differentiated, Vec<V>) {
    // Callees are split first, so that calls can refer to their halves.
    let mut splits = HashMap::new();
    for node in &module.functions[f].nodes.clone() {
        if let Op::Call(callee) = node.op {
            splits.entry(callee).or_insert_with(|| split(module, callee));
        }
    }
    let forward = module.functions[f].clone();
    let mut b = FunctionBuilder::new(module, name);
    let args: Vec<V> = forward.args.iter().map(|(n, s, d)| b.arg(n.clone(), s.clone(), *d)).collect();
    // Copy the forward pass, each call of a split callee calling its forward half.
    let mut map: Vec<V> = Vec::with_capacity(forward.nodes.len());
    for node in &forward.nodes {
        let v = match node.op {
            Op::Arg(i) => args[i],
            _ => {
                let node_args = node.args.iter().map(|a| map[a.index()]).collect();
                let op = match node.op {
                    Op::Call(callee) => Op::Call(splits[&callee].forward),
                    ref op => op.clone(),
                };
                b.push(op, node_args, node.shape.clone(), node.dtype)
            }
        };
        map.push(v);
    }
    let forward_end = b.current().nodes.len();
    let outputs: Vec<V> = forward.outputs.iter().map(|o| map[o.index()]).collect();
    let mut adjoints = Adjoints::default();
    match seed {
        Seed::Cotangents => {
            for (o, name) in outputs.iter().zip(&forward.output_names) {
                let (shape, dtype) = (b.shape(*o).clone(), b.dtype(*o));
                let d = b.arg(format!("d_{name}"), shape, dtype);
                adjoints.add(&mut b, *o, d);
            }
        }
        Seed::Loss => {
            assert!(b.shape(outputs[0]).is_empty(), "the loss must be a scalar");
            let one = b.constant(1.0);
            adjoints.add(&mut b, outputs[0], one);
            for (o, name) in outputs.iter().zip(&forward.output_names) {
                b.output(name.clone(), *o);
            }
        }
    }
    // The reverse pass over the copied forward nodes.
    let copied: Vec<V> = map.clone();
    for &v in copied.iter().rev() {
        let node = b.current().node(v).clone();
        match node.op {
            // The arguments' adjoints are read after the loop.
            Op::Arg(_) => {}
            Op::Get(i) => {
                if let Some(g) = adjoints.take(v) {
                    adjoints.tuple_part(node.args[0], i, g);
                }
            }
            Op::Attention { scale, bf16 } => {
                // Only the output carries a gradient: the log-sum-exp is for the backward.
                let Some(parts) = adjoints.tuples.remove(&v) else { continue };
                assert!(!parts.contains_key(&1), "attention's log-sum-exp is not differentiable");
                let Some(&d_o) = parts.get(&0) else { continue };
                let [q, k, values] = [node.args[0], node.args[1], node.args[2]];
                let (o, lse) = (b.part(v, 0), b.part(v, 1));
                let op = Op::AttentionGrad { scale, bf16 };
                let grads = b.push(op, vec![q, k, values, o, lse, d_o], vec![], DType::Tuple);
                for (i, arg) in [q, k, values].into_iter().enumerate() {
                    let g = b.part(grads, i);
                    adjoints.add(&mut b, arg, g);
                }
            }
            Op::Call(callee) => {
                let Some(parts) = adjoints.tuples.remove(&v) else { continue };
                let split = *splits.values().find(|s| s.forward == callee).expect("a split callee");
                let callee_fn = &b.module.functions[callee];
                let outs: Vec<Shape> =
                    callee_fn.outputs[..split.outputs].iter().map(|o| callee_fn.node(*o).shape.clone()).collect();
                let returned = callee_fn.outputs.len();
                let real_args: Vec<usize> =
                    (0..node.args.len()).filter(|&i| b.dtype(node.args[i]) != DType::I32).collect();
                let mut call_args = node.args.clone();
                // The saved values, then the cotangents.
                call_args.extend((split.outputs..returned).map(|i| b.part(v, i)));
                for (i, shape) in outs.iter().enumerate() {
                    let d = match parts.get(&i) {
                        Some(d) => *d,
                        None => zeros(&mut b, shape.clone()),
                    };
                    call_args.push(d);
                }
                let grads = b.call(split.backward, call_args);
                for (g, &arg) in grads.into_iter().zip(&real_args) {
                    adjoints.add(&mut b, node.args[arg], g);
                }
            }
            _ => {
                let Some(g) = adjoints.take(v) else { continue };
                for (arg, contribution) in vjp_rule(&mut b, v, g) {
                    adjoints.add(&mut b, arg, contribution);
                }
            }
        }
    }
    for (i, (name, shape, dtype)) in forward.args.iter().enumerate() {
        if *dtype == DType::I32 {
            continue;
        }
        let g = match adjoints.take(args[i]) {
            Some(g) => g,
            None => zeros(&mut b, shape.clone()),
        };
        b.output(format!("d_{name}"), g);
    }
    (Differentiated { function: b.finish(), forward_end }, map)
}

/// Accumulated adjoints of values, and of the parts of call results.
#[derive(Default)]
struct Adjoints {
    of: HashMap<V, V>,
    tuples: HashMap<V, HashMap<usize, V>>,
}

impl Adjoints {
    fn add(&mut self, b: &mut FunctionBuilder, v: V, g: V) {
        if b.dtype(v) == DType::I32 {
            return;
        }
        assert_eq!(b.shape(v), b.shape(g), "adjoint shape of {v:?}");
        let total = match self.of.get(&v) {
            Some(&previous) => b.add(previous, g),
            None => g,
        };
        self.of.insert(v, total);
    }

    fn take(&mut self, v: V) -> Option<V> {
        self.of.remove(&v)
    }

    fn tuple_part(&mut self, call: V, index: usize, g: V) {
        self.tuples.entry(call).or_default().insert(index, g);
    }
}

fn zeros(b: &mut FunctionBuilder, shape: Shape) -> V {
    let zero = b.constant(0.0);
    b.broadcast_to(zero, shape)
}

/// `g` reduced to the shape of `x` (undoing broadcasting).
fn reduce_like(b: &mut FunctionBuilder, g: V, x: V) -> V {
    if b.shape(g) == b.shape(x) {
        g
    } else {
        let shape = b.shape(x).clone();
        b.sum_to(g, shape)
    }
}

/// The VJP of one primitive: for output `y` with adjoint `g`, the contributions to its
/// arguments' adjoints.
pub fn vjp_rule(b: &mut FunctionBuilder, y: V, g: V) -> Vec<(V, V)> {
    let node = b.current().node(y).clone();
    let a = &node.args;
    match &node.op {
        Op::Arg(_) | Op::Const(_) | Op::Table(_) => vec![],
        Op::Sign | Op::Max { .. } | Op::Maximum | Op::TopK { .. } | Op::Count { .. } | Op::SortByExpert { .. } => {
            vec![]
        }
        Op::ExpertOffsets { .. }
        | Op::ExchangeCounts { .. }
        | Op::ReceivedOffsets
        | Op::InvertOrder
        | Op::StopGradient => vec![],
        Op::Neg => vec![(a[0], b.unary(Op::Neg, g))],
        Op::Exp => vec![(a[0], b.mul(g, y))],
        Op::Log => vec![(a[0], b.div(g, a[0]))],
        Op::Sigmoid => {
            // σ' = σ(1 − σ)
            let one = b.constant(1.0);
            let one_minus = b.sub(one, y);
            let d = b.mul(y, one_minus);
            vec![(a[0], b.mul(g, d))]
        }
        Op::Silu => {
            // (x σ(x))' = σ(x)(1 + x(1 − σ(x)))
            let s = b.unary(Op::Sigmoid, a[0]);
            let one = b.constant(1.0);
            let one_minus = b.sub(one, s);
            let x_one_minus = b.mul(a[0], one_minus);
            let inner = b.add(one, x_one_minus);
            let d = b.mul(s, inner);
            vec![(a[0], b.mul(g, d))]
        }
        Op::Rsqrt => {
            // (x^−½)' = −½ x^−½ / x
            let ratio = b.div(y, a[0]);
            let d = b.scale(ratio, -0.5);
            vec![(a[0], b.mul(g, d))]
        }
        Op::Sqrt => {
            // (√x)' = ½ / √x
            let half = b.scale(g, 0.5);
            vec![(a[0], b.div(half, y))]
        }
        Op::Square => {
            let two_x = b.scale(a[0], 2.0);
            vec![(a[0], b.mul(g, two_x))]
        }
        Op::Add => {
            let (da, db) = (reduce_like(b, g, a[0]), reduce_like(b, g, a[1]));
            vec![(a[0], da), (a[1], db)]
        }
        Op::Sub => {
            let neg = b.unary(Op::Neg, g);
            let (da, db) = (reduce_like(b, g, a[0]), reduce_like(b, neg, a[1]));
            vec![(a[0], da), (a[1], db)]
        }
        Op::Mul => {
            let ga = b.mul(g, a[1]);
            let gb = b.mul(g, a[0]);
            let (da, db) = (reduce_like(b, ga, a[0]), reduce_like(b, gb, a[1]));
            vec![(a[0], da), (a[1], db)]
        }
        Op::Div => {
            // d(a/b) = da/b − a/b² db = (da − y db)/b
            let ga = b.div(g, a[1]);
            let gy = b.mul(ga, y);
            let gb = b.unary(Op::Neg, gy);
            let (da, db) = (reduce_like(b, ga, a[0]), reduce_like(b, gb, a[1]));
            vec![(a[0], da), (a[1], db)]
        }
        Op::Cast(_) => vec![(a[0], g)],
        Op::Sum { axis, keep } => {
            let mut kept = b.shape(a[0]).clone();
            kept[*axis] = 1;
            let g = if *keep { g } else { b.reshape(g, kept) };
            let shape = b.shape(a[0]).clone();
            vec![(a[0], b.broadcast_to(g, shape))]
        }
        Op::SumTo(_) => {
            let shape = b.shape(a[0]).clone();
            vec![(a[0], b.broadcast_to(g, shape))]
        }
        Op::BroadcastTo(_) => vec![(a[0], reduce_like(b, g, a[0]))],
        Op::Reshape(_) => {
            let shape = b.shape(a[0]).clone();
            vec![(a[0], b.reshape(g, shape))]
        }
        Op::Transpose(perm) => {
            let mut inverse = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inverse[p] = i;
            }
            vec![(a[0], b.transpose(g, inverse))]
        }
        Op::Slice { axis, start, .. } => {
            let len = b.shape(a[0])[*axis];
            let shape = b.shape(a[0]).clone();
            vec![(a[0], b.push(Op::PadSlice { axis: *axis, start: *start, len }, vec![g], shape, node.dtype))]
        }
        Op::PadSlice { axis, start, .. } => {
            let end = start + b.shape(a[0])[*axis];
            vec![(a[0], b.slice(g, *axis, *start, end))]
        }
        Op::Concat { axis } => {
            let mut offset = 0;
            a.iter()
                .map(|&part| {
                    let size = b.shape(part)[*axis];
                    let d = b.slice(g, *axis, offset, offset + size);
                    offset += size;
                    (part, d)
                })
                .collect()
        }
        Op::MatMul { ta, tb, fp8 } => matmul_vjp(b, a[0], a[1], g, *ta, *tb, *fp8),
        Op::Gather => {
            let rows = b.shape(a[0])[0];
            let shape = b.shape(a[0]).clone();
            vec![(a[0], b.push(Op::ScatterRows { rows }, vec![a[1], g], shape, node.dtype))]
        }
        Op::TakeAlong => {
            let shape = b.shape(a[0]).clone();
            let n = *shape.last().expect("rank ≥ 1");
            vec![(a[0], b.push(Op::PutAlong { n }, vec![a[1], g], shape, node.dtype))]
        }
        Op::Permute { k } => {
            let shape = b.shape(a[0]).clone();
            let order_shape = b.shape(a[1]).clone();
            let positions = b.push(Op::InvertOrder, vec![a[1]], order_shape, DType::I32);
            let op = Op::PermuteGrad { k: *k, tokens: shape[0] };
            vec![(a[0], b.push(op, vec![g, positions], shape, node.dtype))]
        }
        Op::GroupedMatMul { tb, fp8 } => {
            assert!(*tb, "grouped GEMMs keep expert weights as [experts, out, in]");
            let (xs, w, offsets) = (a[0], a[1], a[2]);
            let experts = b.shape(w)[0];
            let dgrad = fp8.map(|f| Fp8Gemm { a: Tiling { outer: 1, k: f.a.k }, ..f });
            let wgrad =
                fp8.map(|f| Fp8Gemm { a: Tiling { outer: 1, k: f.a.k }, b: Tiling { outer: 1, k: f.a.k }, ..f });
            let g = product_cotangent(b, xs, w, g);
            let xs_shape = b.shape(xs).clone();
            let w_shape = b.shape(w).clone();
            let dxs = b.push(Op::GroupedMatMul { tb: false, fp8: dgrad }, vec![g, w, offsets], xs_shape, node.dtype);
            let dw = b.push(Op::GroupedWgrad { experts, fp8: wgrad }, vec![xs, g, offsets], w_shape, node.dtype);
            vec![(xs, dxs), (w, dw)]
        }
        Op::Unpermute { k } => {
            let (ys, positions, gates) = (a[0], a[1], a[2]);
            let positions_shape = b.shape(positions).clone();
            let order = b.push(Op::InvertOrder, vec![positions], positions_shape, DType::I32);
            let ys_shape = b.shape(ys).clone();
            let gates_shape = b.shape(gates).clone();
            let dys = b.push(Op::UnpermuteGradRows { k: *k }, vec![g, order, gates], ys_shape, node.dtype);
            let dgates = b.push(Op::UnpermuteGradGates { k: *k }, vec![g, ys, order], gates_shape, node.dtype);
            vec![(ys, dys), (gates, dgates)]
        }
        // Dispatch and combine are each other's transposes.
        Op::Dispatch { ranks } => {
            let shape = b.shape(a[0]).clone();
            vec![(a[0], b.push(Op::Combine { ranks: *ranks }, vec![g, a[1], a[2]], shape, node.dtype))]
        }
        Op::Combine { ranks } => {
            let shape = b.shape(a[0]).clone();
            vec![(a[0], b.push(Op::Dispatch { ranks: *ranks }, vec![g, a[1], a[2]], shape, node.dtype))]
        }
        op @ (Op::ScatterRows { .. }
        | Op::PutAlong { .. }
        | Op::PermuteGrad { .. }
        | Op::GroupedWgrad { .. }
        | Op::UnpermuteGradRows { .. }
        | Op::UnpermuteGradGates { .. }) => panic!("{} appears only in backward passes", op.name()),
        Op::Call(_) | Op::Get(_) | Op::Attention { .. } => {
            unreachable!("ops with several results are differentiated by the caller")
        }
        op @ Op::AttentionGrad { .. } => panic!("{} appears only in backward passes", op.name()),
        op @ (Op::RmsNorm { .. }
        | Op::Softmax
        | Op::SwiGlu
        | Op::AddRmsNorm { .. }
        | Op::RmsNormGrad { .. }
        | Op::SoftmaxGrad
        | Op::SwiGluGrad
        | Op::CrossEntropy
        | Op::CrossEntropyGrad
        | Op::ConcatMatMul { .. }
        | Op::ConcatKMatMul { .. }
        | Op::ConcatRowsMatMul { .. }
        | Op::PermuteQuantize { .. }
        | Op::ConcatGroupedMatMul { .. }
        | Op::MatMulAdd { .. }
        | Op::MaskedSoftmax { .. }
        | Op::Route { .. }
        | Op::RopeConcat
        | Op::Quantize { .. }
        | Op::ScaledMatMul { .. }
        | Op::RmsNormQuantize { .. }
        | Op::SwiGluQuantize { .. }
        | Op::ConcatScaledMatMul { .. }
        | Op::ConcatKScaledMatMul { .. }
        | Op::QuantizeByExpert { .. }
        | Op::ScaledGroupedWgrad { .. }
        | Op::ConcatKScaledGroupedMatMul { .. }) => {
            panic!("{} is formed by fusion, after autodiff", op.name())
        }
    }
}

/// The cotangent that a product's backward multiplies: rounded to BF16 where both operands
/// are BF16 values, so that a BF16 GEMM's Dgrad and Wgrad are BF16 GEMMs too (as the recipe
/// keeps the head's backward in BF16); the gradients they produce stay F32.
fn product_cotangent(b: &mut FunctionBuilder, x: V, w: V, g: V) -> V {
    let bf16 = |v: V, b: &FunctionBuilder| b.dtype(v) == DType::Bf16;
    if bf16(x, b) && bf16(w, b) && !bf16(g, b) {
        b.cast(g, DType::Bf16)
    } else {
        g
    }
}

/// C = op(A)·op(B). For an FP8 linear layer (A = x, B = W used transposed) the gradients are
/// FP8 GEMMs too: Dgrad with the forward's tilings, Wgrad with 1×tile groups along the
/// tokens on both sides.
fn matmul_vjp(b: &mut FunctionBuilder, x: V, w: V, g: V, ta: bool, tb: bool, fp8: Option<Fp8Gemm>) -> Vec<(V, V)> {
    let (dgrad, wgrad) = match fp8 {
        None => (None, None),
        Some(f) => {
            assert!(!ta && tb, "only linear-layer GEMMs (x·Wᵀ) run in FP8");
            let token_tile = Tiling { outer: 1, k: f.a.k };
            (Some(f), Some(Fp8Gemm { a: token_tile, b: token_tile, promote: f.promote }))
        }
    };
    let g = product_cotangent(b, x, w, g);
    let dx = if ta { b.matmul(w, g, tb, true, dgrad) } else { b.matmul(g, w, false, !tb, dgrad) };
    let dw = if tb { b.matmul(g, x, true, ta, wgrad) } else { b.matmul(x, g, !ta, false, wgrad) };
    vec![(x, dx), (w, dw)]
}
