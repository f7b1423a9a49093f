//! Attention the fused kernels do not take, expanded into primitives before fusion: an f32
//! policy's (the kernels round to BF16), or head dims and lengths they lack
//! (`mlir::attention::fused`). The expansion computes what the op defines, per (batch,
//! head) in [b, h, s, d] layout with an additive causal mask (a constant table): the forward
//! softmax(scale·q·kᵀ + mask)·v and its log-sum-exp max + ln Σ exp(s − max); the backward
//! from the saved log-sum-exp, p = exp(s − lse), dv = pᵀ·dO, ds = scale·p∘(dO·vᵀ − Σ dO∘o),
//! dq = ds·k, dk = dsᵀ·q. Fusion then makes its usual kernels of them (the masked softmax, the
//! GEMMs), which every backend runs.

use crate::graph::ir::{ConstantKind, DType, Function, FunctionBuilder, Module, Node, Op, V};
use std::collections::HashMap;

/// `module` with every attention op for which `fused(function, node)` is false expanded.
pub fn attention(module: &Module, fused: impl Fn(&Function, &Node) -> bool) -> Module {
    let mut expanded = module.clone();
    let mut masks = HashMap::new();
    for f in &module.functions {
        for node in &f.nodes {
            if let Op::Attention { .. } | Op::AttentionGrad { .. } = node.op {
                if !fused(f, node) {
                    let seq = f.node(node.args[0]).shape[1];
                    masks.entry(seq).or_insert_with(|| {
                        expanded.add_constant(format!("causal_mask_{seq}"), vec![seq, seq], ConstantKind::CausalMask)
                    });
                }
            }
        }
    }
    if masks.is_empty() {
        return expanded;
    }
    let functions = module.functions.iter().map(|f| expand_function(&expanded, f, &fused, &masks)).collect();
    expanded.functions = functions;
    expanded
}

fn expand_function(
    module: &Module,
    f: &Function,
    fused: &impl Fn(&Function, &Node) -> bool,
    masks: &HashMap<usize, usize>,
) -> Function {
    let mut b = FunctionBuilder::new(module, f.name.clone());
    // Each node's value; none for an expanded tuple, whose readers take its parts.
    let mut map: Vec<Option<V>> = Vec::with_capacity(f.nodes.len());
    // The parts of each expanded tuple, by the tuple's node.
    let mut parts: HashMap<usize, Vec<V>> = HashMap::new();
    for (i, node) in f.nodes.iter().enumerate() {
        let args: Vec<V> = node.args.iter().filter_map(|a| map[a.index()]).collect();
        let v = match &node.op {
            Op::Arg(a) => {
                let (name, shape, dtype) = &f.args[*a];
                Some(b.arg(name.clone(), shape.clone(), *dtype))
            }
            Op::Get(p) if parts.contains_key(&node.args[0].index()) => Some(parts[&node.args[0].index()][*p]),
            Op::Attention { scale, bf16 } | Op::AttentionGrad { scale, bf16 } if !fused(f, node) => {
                let mask = masks[&f.node(node.args[0]).shape[1]];
                let expansion = Expansion { scale: *scale, bf16: *bf16, mask };
                let results = match node.op {
                    Op::Attention { .. } => expansion.forward(&mut b, &args).to_vec(),
                    _ => expansion.backward(&mut b, &args).to_vec(),
                };
                parts.insert(i, results);
                None
            }
            _ => Some(b.push(node.op.clone(), args, node.shape.clone(), node.dtype)),
        };
        map.push(v);
    }
    for (o, name) in f.outputs.iter().zip(&f.output_names) {
        b.output(name.clone(), map[o.index()].expect("outputs are values, not tuples"));
    }
    b.finish()
}

/// An attention op's attributes and the mask table of its length.
struct Expansion {
    scale: f64,
    bf16: bool,
    mask: usize,
}

impl Expansion {
    /// q, k, v in [b, h, s, d], rounded to BF16 where the op says.
    fn operands(&self, b: &mut FunctionBuilder, args: &[V]) -> [V; 3] {
        [args[0], args[1], args[2]].map(|x| {
            let x = if self.bf16 { b.cast(x, DType::Bf16) } else { x };
            b.transpose(x, vec![0, 2, 1, 3])
        })
    }

    /// scale·q·kᵀ + mask, [b, h, s, s].
    fn scores(&self, b: &mut FunctionBuilder, q: V, k: V) -> V {
        let s = b.matmul(q, k, false, true, None);
        let s = b.scale(s, self.scale);
        let mask = b.table(self.mask);
        b.add(s, mask)
    }

    /// (o, lse) from (q, k, v).
    fn forward(&self, b: &mut FunctionBuilder, args: &[V]) -> [V; 2] {
        let [q, k, v] = self.operands(b, args);
        let s = self.scores(b, q, k);
        let m = b.max(s, 3, true);
        let m = b.stop_gradient(m);
        let shifted = b.sub(s, m);
        let e = b.unary(Op::Exp, shifted);
        let z = b.sum(e, 3, true);
        let p = b.div(e, z);
        let o = b.matmul(p, v, false, false, None);
        let o = b.transpose(o, vec![0, 2, 1, 3]);
        let log_z = b.unary(Op::Log, z);
        let lse = b.add(m, log_z);
        let rows = b.shape(lse)[..3].to_vec();
        [o, b.reshape(lse, rows)]
    }

    /// (dq, dk, dv) from (q, k, v, o, lse, dO).
    fn backward(&self, b: &mut FunctionBuilder, args: &[V]) -> [V; 3] {
        let [q, k, v] = self.operands(b, args);
        let [o, d_o] = [args[3], args[5]].map(|x| b.transpose(x, vec![0, 2, 1, 3]));
        let s = self.scores(b, q, k);
        let mut column = b.shape(args[4]).clone();
        column.push(1);
        let lse = b.reshape(args[4], column);
        let shifted = b.sub(s, lse);
        let p = b.unary(Op::Exp, shifted);
        let dv = b.matmul(p, d_o, true, false, None);
        let dp = b.matmul(d_o, v, false, true, None);
        let d_o_o = b.mul(d_o, o);
        let rows = b.sum(d_o_o, 3, true);
        let centred = b.sub(dp, rows);
        let ds = b.mul(p, centred);
        let ds = b.scale(ds, self.scale);
        let dq = b.matmul(ds, k, false, false, None);
        let dk = b.matmul(ds, q, true, false, None);
        [dq, dk, dv].map(|x| b.transpose(x, vec![0, 2, 1, 3]))
    }
}
