//! Causal attention and its backward (`attention`, `attention_grad`) from their definitions,
//! row by row with the scores of one query row at a time: the reference the GPU's fused
//! kernels (`compiler::mlir::attention`) are held to. Tensors are [batch, seq, heads, dim];
//! the log-sum-exp [batch, heads, seq].

use crate::cpu::numerics::round_bf16;
use crate::cpu::real::Real;
use crate::cpu::value::Tensor;
use std::borrow::Cow;

/// A [batch, seq, heads, dim] tensor's dims and its element (b, s, h, 0)'s offset.
struct Heads {
    batch: usize,
    seq: usize,
    heads: usize,
}

impl Heads {
    fn of(x: &Tensor<impl Clone>) -> Heads {
        Heads { batch: x.shape[0], seq: x.shape[1], heads: x.shape[2] }
    }

    fn at(&self, b: usize, s: usize, h: usize, dim: usize) -> usize {
        ((b * self.seq + s) * self.heads + h) * dim
    }

    fn lse_at(&self, b: usize, h: usize, s: usize) -> usize {
        (b * self.heads + h) * self.seq + s
    }

    /// Every (batch, head, query row).
    fn rows(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.batch).flat_map(move |b| (0..self.heads).flat_map(move |h| (0..self.seq).map(move |i| (b, h, i))))
    }
}

fn dim(x: &Tensor<impl Clone>) -> usize {
    *x.shape.last().expect("rank 4")
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

/// The operand as the products read it: rounded to BF16 with `bf16`, else as it is.
fn operand<T: Real>(x: &Tensor<T>, bf16: bool) -> Cow<'_, [T]> {
    if bf16 {
        Cow::Owned(x.data.iter().map(|&v| T::from_f64(round_bf16(v.to_f64()))).collect())
    } else {
        Cow::Borrowed(&x.data)
    }
}

/// Row i's scaled scores against keys 0..=i of its (batch, head).
fn scores<T: Real>(g: &Heads, q: &[T], k: &[T], d: usize, (b, h, i): (usize, usize, usize), scale: T) -> Vec<T> {
    let qi = &q[g.at(b, i, h, d)..][..d];
    (0..=i).map(|j| scale * dot(qi, &k[g.at(b, j, h, d)..][..d])).collect()
}

/// (o, lse) of softmax(scale·q·kᵀ + causal mask)·v.
pub fn attention<T: Real>(q: &Tensor<T>, k: &Tensor<T>, v: &Tensor<T>, scale: T, bf16: bool) -> (Tensor<T>, Tensor<T>) {
    let g = Heads::of(q);
    let (dqk, dv) = (dim(q), dim(v));
    let (q_r, k_r, v_r) = (operand(q, bf16), operand(k, bf16), operand(v, bf16));
    let mut o = vec![T::ZERO; v.data.len()];
    let mut lse = vec![T::ZERO; g.batch * g.heads * g.seq];
    for row @ (b, h, i) in g.rows() {
        let s = scores(&g, &q_r, &k_r, dqk, row, scale);
        let m = s.iter().copied().fold(s[0], T::max);
        let e: Vec<T> = s.iter().map(|&x| (x - m).exp()).collect();
        let z: T = e.iter().copied().sum();
        lse[g.lse_at(b, h, i)] = m + z.ln();
        let out = &mut o[g.at(b, i, h, dv)..][..dv];
        for (j, &ej) in e.iter().enumerate() {
            let p = ej / z;
            for (y, &x) in out.iter_mut().zip(&v_r[g.at(b, j, h, dv)..][..dv]) {
                *y += p * x;
            }
        }
    }
    (Tensor::new(v.shape.clone(), o), Tensor::new(vec![g.batch, g.heads, g.seq], lse))
}

/// (dq, dk, dv) of `attention` given its o and lse and the output's adjoint `d_o`: with
/// p = exp(s − lse) and D = Σ d_o∘o per row, ds = p∘(d_o·vᵀ − D); dq = scale·ds·k,
/// dk = scale·dsᵀ·q, dv = pᵀ·d_o.
#[allow(clippy::too_many_arguments)]
pub fn attention_grad<T: Real>(
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
    o: &Tensor<T>,
    lse: &Tensor<T>,
    d_o: &Tensor<T>,
    scale: T,
    bf16: bool,
) -> [Tensor<T>; 3] {
    let g = Heads::of(q);
    let (dqk, dv) = (dim(q), dim(v));
    let (q_r, k_r, v_r) = (operand(q, bf16), operand(k, bf16), operand(v, bf16));
    let (mut dq, mut dk, mut dvs) =
        (vec![T::ZERO; q.data.len()], vec![T::ZERO; k.data.len()], vec![T::ZERO; v.data.len()]);
    for row @ (b, h, i) in g.rows() {
        let s = scores(&g, &q_r, &k_r, dqk, row, scale);
        let at_v = g.at(b, i, h, dv);
        let (grad, out) = (&d_o.data[at_v..][..dv], &o.data[at_v..][..dv]);
        let delta = dot(grad, out);
        let l = lse.data[g.lse_at(b, h, i)];
        let at_q = g.at(b, i, h, dqk);
        for (j, &sj) in s.iter().enumerate() {
            let p = (sj - l).exp();
            let (kj, vj) = (g.at(b, j, h, dqk), g.at(b, j, h, dv));
            let ds = p * (dot(grad, &v_r[vj..][..dv]) - delta) * scale;
            for c in 0..dqk {
                dq[at_q + c] += ds * k_r[kj + c];
                dk[kj + c] += ds * q_r[at_q + c];
            }
            for c in 0..dv {
                dvs[vj + c] += p * grad[c];
            }
        }
    }
    [Tensor::new(q.shape.clone(), dq), Tensor::new(k.shape.clone(), dk), Tensor::new(v.shape.clone(), dvs)]
}

#[cfg(test)]
mod tests {
    use crate::cpu::run;
    use crate::cpu::value::{Tensor, Value};
    use dsc_compiler::fuse::expand;
    use dsc_compiler::graph::autodiff;
    use dsc_compiler::graph::ir::{DType, FunctionBuilder, Module};

    /// The op and its backward agree with their expansion into primitives (`fuse::expand`: [b,
    /// h, s, d] products, an additive causal mask, softmax), with and without BF16 operands, on
    /// several shapes (one position; values wider than queries): output, log-sum-exp and the
    /// gradients of Σ w∘o.
    #[test]
    fn attention_is_its_expansion_into_primitives() {
        let shapes = [(2, 6, 3, 5, 4), (1, 1, 1, 1, 1), (1, 7, 2, 3, 6)];
        for ((batch, seq, heads, dqk, dv), bf16) in shapes.into_iter().flat_map(|s| [(s, false), (s, true)]) {
            let mut module = Module::default();
            let mut b = FunctionBuilder::new(&module, "attend");
            let q = b.arg("q", vec![batch, seq, heads, dqk], DType::F64);
            let k = b.arg("k", vec![batch, seq, heads, dqk], DType::F64);
            let v = b.arg("v", vec![batch, seq, heads, dv], DType::F64);
            let w = b.arg("w", vec![batch, seq, heads, dv], DType::F64);
            let (o, lse) = b.attention(q, k, v, 0.6, bf16);
            let weighted = b.mul(o, w);
            let loss = b.sum_all(weighted);
            b.output("loss", loss);
            b.output("o", o);
            b.output("lse", lse);
            let f = module.add(b.finish());
            let grad = autodiff::grad(&mut module, f);
            let expanded = expand::attention(&module, |_, _| false);
            assert!(expanded.functions.iter().flat_map(|f| &f.nodes).all(|n| !n.op.name().starts_with("attention")));
            let mut rng = crate::rng::Rng::new(7);
            let mut tensor = |d: usize| {
                let shape = vec![batch, seq, heads, d];
                let data = (0..shape.iter().product()).map(|_| 4.0 * rng.uniform() - 2.0).collect();
                Value::real(Tensor::new(shape, data))
            };
            let args = vec![tensor(dqk), tensor(dqk), tensor(dv), tensor(dv)];
            let (op, composed) = (run(&module, grad, args.clone()), run(&expanded, grad, args));
            assert_eq!(op.len(), 3 + 4);
            for (i, (got, want)) in op.iter().zip(&composed).enumerate() {
                let (got, want) = (&got.as_real().data, &want.as_real().data);
                let worst = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(worst < 1e-12, "{batch}×{seq}×{heads}×{dqk}/{dv} bf16 {bf16}: output {i} off by {worst:e}");
            }
        }
    }
}
