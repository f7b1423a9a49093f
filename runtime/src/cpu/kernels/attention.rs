//! Causal attention and its backward (`attention`, `attention_grad`) from their definitions,
//! row by row with the scores of one query row at a time: the reference the GPU's fused
//! kernels (`compiler::mlir::attention`) are held to. Tensors are [batch, seq, heads, dim];
//! the log-sum-exp [batch, heads, seq].

use crate::cpu::numerics::round_bf16;
use crate::cpu::real::Real;
use crate::cpu::value::Tensor;

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

/// The operand as the products read it: rounded to BF16 with `bf16`.
fn operand<T: Real>(x: &Tensor<T>, bf16: bool) -> Vec<T> {
    if bf16 {
        x.data.iter().map(|&v| T::from_f64(round_bf16(v.to_f64()))).collect()
    } else {
        x.data.clone()
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
    use super::*;
    use crate::cpu::run;
    use crate::cpu::value::Value;
    use dsc_compiler::graph::ir::{DType, FunctionBuilder, Module, Op};
    use dsc_compiler::graph::model::softmax;

    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| 2.0 * rng.uniform() - 1.0).collect()
    }

    /// The op agrees with attention composed of the graph's primitives ([b, h, s, d] products,
    /// an additive causal mask, softmax), and its log-sum-exp with the scores' own.
    #[test]
    fn attention_is_its_composition_of_primitives() {
        let (batch, seq, heads, dqk, dv, scale) = (2, 6, 3, 5, 4, 0.6);
        let mut module = Module::default();
        let mut b = FunctionBuilder::new(&module, "composed");
        let q = b.arg("q", vec![batch, seq, heads, dqk], DType::F64);
        let k = b.arg("k", vec![batch, seq, heads, dqk], DType::F64);
        let v = b.arg("v", vec![batch, seq, heads, dv], DType::F64);
        let mask = b.arg("mask", vec![seq, seq], DType::F64);
        let (o, lse) = b.attention(q, k, v, scale, false);
        let [qt, kt, vt] = [q, k, v].map(|x| b.transpose(x, vec![0, 2, 1, 3]));
        let scores = b.matmul(qt, kt, false, true, None);
        let scores = b.scale(scores, scale);
        let scores = b.add(scores, mask);
        let probs = softmax(&mut b, scores);
        let composed = b.matmul(probs, vt, false, false, None);
        let composed = b.transpose(composed, vec![0, 2, 1, 3]);
        let exp = b.unary(Op::Exp, scores);
        let z = b.sum(exp, 3, false);
        let composed_lse = b.unary(Op::Log, z);
        for (name, x) in [("o", o), ("composed", composed), ("lse", lse), ("composed_lse", composed_lse)] {
            b.output(name, x);
        }
        let f = module.add(b.finish());
        let tensor =
            |shape: Vec<usize>, seed| Value::real(Tensor::new(shape.clone(), values(shape.iter().product(), seed)));
        let mask = (0..seq * seq).map(|i| if i % seq > i / seq { -1e30 } else { 0.0 }).collect();
        let out = run(
            &module,
            f,
            vec![
                tensor(vec![batch, seq, heads, dqk], 1),
                tensor(vec![batch, seq, heads, dqk], 2),
                tensor(vec![batch, seq, heads, dv], 3),
                Value::real(Tensor::new(vec![seq, seq], mask)),
            ],
        );
        for (got, want) in [(&out[0], &out[1]), (&out[2], &out[3])] {
            let (got, want) = (&got.as_real().data, &want.as_real().data);
            assert_eq!(got.len(), want.len());
            let worst = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-12, "off by {worst:e}");
        }
    }
}
