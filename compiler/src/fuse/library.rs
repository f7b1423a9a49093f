//! FP8 GEMMs for the library: cuBLASLt's block-scaled GEMM reads both operands already
//! quantised and K-major, and cannot quantise them itself. After extraction, every dense FP8
//! GEMM that still quantises inside (`matmul`, `matmul_add`, the concatenated forms, with an
//! FP8 recipe and matrix operands) becomes `quantize` kernels for its operands and
//! `scaled_matmul`s on them: op(a) quantised as [m, k] in the recipe's activation groups, op(b)ᵀ
//! as [n, k] in its weight groups (an operand quantised the same way twice is quantised once).
//! `matmul_add`'s epilogue comes out as the addition it fused (c + a·b), and `concat_k_matmul`
//! as one `concat_k_scaled_matmul` whose second product adds to the first's (no addition of
//! its own), so the function computes bit-identically what it did: the groups, scales and E4M3
//! values are the same whichever way round a group is read.
//!
//! The experts' grouped GEMMs in FP8 likewise: Fprop and Dgrad read their rows quantised in
//! 1×tile groups (as the dispatch may send them already) and each expert's weight K-major in
//! blocks (`quantize` of the [experts, n, k] weights, per expert transposed for Dgrad), and
//! become `grouped_matmul`s on them (`tb`); the Wgrad reads both operands `quantize_by_expert`
//! (along tokens, each expert on whole groups of its own) and becomes `scaled_grouped_wgrad`.
//! An operand that only Wgrads read and that is a permutation of rows or a SwiGLU is not
//! stored: the quantisation makes its rows as it reads them (`ExpertRows`); nor are the
//! combine's row gradients (`unpermute_grad_rows`) that only Wgrads and the experts' Dgrads
//! read: the Dgrad's rows are quantised as they are gathered (`permute_quantize`, gated).
//! The sum of two grouped products that only it reads (the Dgrads of the gate and up
//! projections) becomes one `concat_k_scaled_grouped_matmul`, which adds the second product to
//! the first as the addition did. Here too the groups are those the GEMMs quantised inside, so nothing changes
//! numerically.

use crate::graph::ir::{expert_capacity, DType, ExpertRows, Fp8Gemm, Function, Module, Node, Op, V};
use std::collections::{HashMap, HashSet};

/// `module` with every dense FP8 GEMM on quantised operands.
pub fn quantize_operands(module: &Module) -> Module {
    Module { functions: module.functions.iter().map(function).collect(), constants: module.constants.clone() }
}

/// How an operand is quantised: the value, its group's rows × cols, and whether transposed;
/// or, by expert, the value, the offsets and the group's length along tokens.
#[derive(PartialEq, Eq, Hash)]
enum QuantizeKey {
    Blocks(u32, usize, usize, bool),
    ByExpert(u32, u32, usize),
}

struct Rewrite<'f> {
    old: &'f Function,
    nodes: Vec<Node>,
    /// Each old node's value in the new function.
    map: Vec<V>,
    /// The parts of an old tuple-valued node replaced by separate nodes.
    parts: HashMap<u32, Vec<V>>,
    quantized: HashMap<QuantizeKey, V>,
    /// Old nodes that only the experts' FP8 Wgrads read, made where their quantisation by
    /// expert reads them ([`read_by_expert`]): they have no node of their own.
    read_through: HashSet<u32>,
    /// Old additions of two FP8 grouped products ([`summed_grouped_products`]), made as one
    /// `concat_k_scaled_grouped_matmul`; their products have no node of their own.
    sums: HashMap<u32, [u32; 2]>,
}

impl Rewrite<'_> {
    fn push(&mut self, op: Op, args: Vec<V>, shape: Vec<usize>, dtype: DType) -> V {
        self.nodes.push(Node { op, args, shape, dtype });
        V(self.nodes.len() as u32 - 1)
    }

    /// Old operand `x` (a matrix, or a stack of them) quantised in `rows` × `cols` groups of
    /// itself, or of its (each matrix's) transpose if `transpose`, its rows (along K) padded
    /// with zeros to whole groups: cuBLASLt takes K in whole 128s (MLA's K = 576 is 640). Row
    /// gradients read through ([`read_by_expert`]: only as grouped products' rows) are
    /// gathered, gated and quantised at once.
    fn quantize(&mut self, x: V, rows: usize, cols: usize, transpose: bool) -> V {
        if let Some(&q) = self.quantized.get(&QuantizeKey::Blocks(x.0, rows, cols, transpose)) {
            return q;
        }
        let node = self.old.node(x);
        let q = match node.op {
            Op::UnpermuteGradRows { k } if self.read_through.contains(&x.0) => {
                assert!(rows == 1 && !transpose, "row gradients read through are quantised as rows");
                let args = node.args.iter().map(|a| self.map[a.index()]).collect();
                let op = Op::PermuteQuantize { k, cols, gated: true };
                self.push(op, args, node.shape.clone(), DType::F8e4m3)
            }
            _ => {
                let mut shape = node.shape.clone();
                let rank = shape.len();
                if transpose {
                    shape.swap(rank - 2, rank - 1);
                }
                shape[rank - 1] = shape[rank - 1].next_multiple_of(cols);
                let op = Op::Quantize { rows, cols, transpose };
                self.push(op, vec![self.map[x.index()]], shape, DType::F8e4m3)
            }
        };
        self.quantized.insert(QuantizeKey::Blocks(x.0, rows, cols, transpose), q);
        q
    }

    /// Old operand `x` ([tokens, n], its rows grouped by expert at new `offsets`) quantised
    /// along tokens in groups of `tile`, each expert's rows padded to whole groups, transposed
    /// ([n, capacity]); once per operand (the gate's and up projection's Wgrads share x). An
    /// operand read through ([`read_by_expert`]) is made from its own operands as it is read.
    fn by_expert(&mut self, x: V, offsets: V, experts: usize, tile: usize) -> V {
        let key = QuantizeKey::ByExpert(x.0, offsets.0, tile);
        if let Some(&q) = self.quantized.get(&key) {
            return q;
        }
        let node = self.old.node(x);
        let shape = vec![node.shape[1], expert_capacity(node.shape[0], experts, tile)];
        let mapped = |k: usize| self.map[node.args[k].index()];
        let (rows, args) = match node.op {
            _ if !self.read_through.contains(&x.0) => (ExpertRows::Stored, vec![self.map[x.index()], offsets]),
            Op::Permute { k } => (ExpertRows::Permuted { k }, vec![mapped(0), offsets, mapped(1)]),
            Op::SwiGlu => (ExpertRows::SwiGlu, vec![mapped(0), offsets, mapped(1)]),
            Op::UnpermuteGradRows { k } => {
                (ExpertRows::UnpermutedGrad { k }, vec![mapped(0), offsets, mapped(1), mapped(2)])
            }
            _ => unreachable!("only permutations, SwiGLUs and row gradients are read through (`read_by_expert`)"),
        };
        let q = self.push(Op::QuantizeByExpert { experts, tile, rows }, args, shape, DType::F8e4m3);
        self.quantized.insert(key, q);
        q
    }

    /// op(a)·op(b) of old operands in FP8 as `scaled_matmul` of `shape`.
    fn product(&mut self, a: V, b: V, ta: bool, tb: bool, f: Fp8Gemm, shape: &[usize]) -> V {
        let (qa, qb) = self.operands(a, b, ta, tb, f);
        self.push(Op::ScaledMatMul { promote: f.promote }, vec![qa, qb], shape.to_vec(), DType::F32)
    }

    /// The operands of op(a)·op(b) in `f` quantised K-major: op(a) as [m, k] in its
    /// activation groups, op(b)ᵀ as [n, k] in its weight groups.
    fn operands(&mut self, a: V, b: V, ta: bool, tb: bool, f: Fp8Gemm) -> (V, V) {
        (self.quantize(a, f.a.outer, f.a.k, ta), self.quantize(b, f.b.outer, f.b.k, !tb))
    }

    /// The rows of a grouped GEMM quantised in `f`'s activation tiles (as they are when the
    /// dispatch sent them quantised).
    fn grouped_rows(&mut self, xs: V, f: Fp8Gemm) -> V {
        if self.old.node(xs).dtype == DType::F8e4m3 {
            self.map[xs.index()]
        } else {
            self.quantize(xs, 1, f.a.k, false)
        }
    }

    /// The experts' weights [experts, n, k] (`tb`) or [experts, k, n] quantised K-major in
    /// `f`'s weight blocks, or `None` where a block would straddle two experts.
    fn grouped_weights(&mut self, w: V, tb: bool, f: Fp8Gemm) -> Option<V> {
        whole_weight_blocks(&self.old.node(w).shape, tb, f).then(|| self.quantize(w, f.b.outer, f.b.k, !tb))
    }

    /// Whether old node `i` is a product that a sum of grouped products adds.
    fn summed(&self, i: u32) -> bool {
        self.sums.values().any(|products| products.contains(&i))
    }

    /// Old addition `add` of two FP8 grouped products as one GEMM on their quantised operands.
    fn sum_of_grouped_products(&mut self, add: u32, node: &Node) -> V {
        let mut args = Vec::new();
        let mut recipe = None;
        for p in self.sums[&add] {
            let product = self.old.node(V(p));
            let Op::GroupedMatMul { tb, fp8: Some(f) } = product.op else { unreachable!("a grouped FP8 product") };
            args.push(self.grouped_rows(product.args[0], f));
            args.push(self.grouped_weights(product.args[1], tb, f).expect("whole weight blocks (checked)"));
            recipe = Some(f);
        }
        let offsets = self.old.node(V(self.sums[&add][0])).args[2];
        args.push(self.map[offsets.index()]);
        let fp8 = recipe.expect("two products");
        self.push(Op::ConcatKScaledGroupedMatMul { fp8 }, args, node.shape.clone(), DType::F32)
    }

    fn add(&mut self, x: V, y: V, shape: &[usize]) -> V {
        self.push(Op::Add, vec![x, y], shape.to_vec(), DType::F32)
    }

    /// The shape of op(a)·op(b) for old operands.
    fn shape_of(&self, a: V, b: V, ta: bool, tb: bool) -> Vec<usize> {
        let (sa, sb) = (&self.old.node(a).shape, &self.old.node(b).shape);
        vec![if ta { sa[1] } else { sa[0] }, if tb { sb[0] } else { sb[1] }]
    }

    /// Whether the old values are real matrices (not quantised yet).
    fn operands_are_matrices(&self, values: &[V]) -> bool {
        values.iter().all(|&a| self.old.node(a).shape.len() == 2 && self.old.node(a).dtype != DType::F8e4m3)
    }

    /// The node's replacement, or `None` to copy it.
    fn replace(&mut self, i: usize, node: &Node) -> Option<V> {
        let matrices = self.operands_are_matrices(&node.args);
        let a = &node.args;
        match node.op {
            // Made where the Wgrads' quantisation reads it, or where the sum of two grouped
            // products adds them.
            _ if self.read_through.contains(&(i as u32)) || self.summed(i as u32) => Some(V(u32::MAX)),
            Op::MatMul { ta, tb, fp8: Some(f) } if matrices => Some(self.product(a[0], a[1], ta, tb, f, &node.shape)),
            // The addend may be the product's rows reshaped (a residual [batch, seq, n]).
            Op::MatMulAdd { ta, tb, fp8: Some(f) } if self.operands_are_matrices(&a[..2]) => {
                let shape = self.shape_of(a[0], a[1], ta, tb);
                let mut y = self.product(a[0], a[1], ta, tb, f, &shape);
                if shape != node.shape {
                    y = self.push(Op::Reshape(node.shape.clone()), vec![y], node.shape.clone(), DType::F32);
                }
                Some(self.add(self.map[a[2].index()], y, &node.shape))
            }
            // One GEMM whose second product adds to the first's, as the addition did.
            Op::ConcatKMatMul { ta, tb, fp8: Some(f) } if matrices => {
                let (qa1, qb1) = self.operands(a[0], a[1], ta, tb, f);
                let (qa2, qb2) = self.operands(a[2], a[3], ta, tb, f);
                let op = Op::ConcatKScaledMatMul { promote: f.promote };
                Some(self.push(op, vec![qa1, qb1, qa2, qb2], node.shape.clone(), DType::F32))
            }
            Op::ConcatRowsMatMul { ta, tb, fp8: Some(f) } if matrices => {
                let (s1, s2) = (self.shape_of(a[0], a[2], ta, tb), self.shape_of(a[1], a[2], ta, tb));
                let parts = vec![self.product(a[0], a[2], ta, tb, f, &s1), self.product(a[1], a[2], ta, tb, f, &s2)];
                self.parts.insert(i as u32, parts);
                // Only `get`s read a tuple: replaced by its parts, it has no value of its own.
                Some(V(u32::MAX))
            }
            Op::ConcatMatMul { ta, tb, fp8: Some(f) } if matrices => {
                let qa = self.quantize(a[0], f.a.outer, f.a.k, ta);
                let qb1 = self.quantize(a[1], f.b.outer, f.b.k, !tb);
                let qb2 = self.quantize(a[2], f.b.outer, f.b.k, !tb);
                let op = Op::ConcatScaledMatMul { promote: f.promote };
                Some(self.push(op, vec![qa, qb1, qb2], node.shape.clone(), node.dtype))
            }
            Op::GroupedMatMul { tb, fp8: Some(f) } if f.a.outer == 1 => {
                let qw = self.grouped_weights(a[1], tb, f)?;
                let qx = self.grouped_rows(a[0], f);
                let op = Op::GroupedMatMul { tb: true, fp8: Some(f) };
                Some(self.push(op, vec![qx, qw, self.map[a[2].index()]], node.shape.clone(), node.dtype))
            }
            Op::ConcatGroupedMatMul { tb, fp8: Some(f) } if f.a.outer == 1 => {
                let (qw1, qw2) = (self.grouped_weights(a[1], tb, f)?, self.grouped_weights(a[2], tb, f)?);
                let qx = self.grouped_rows(a[0], f);
                let op = Op::ConcatGroupedMatMul { tb: true, fp8: Some(f) };
                Some(self.push(op, vec![qx, qw1, qw2, self.map[a[3].index()]], node.shape.clone(), node.dtype))
            }
            Op::Add if self.sums.contains_key(&(i as u32)) => Some(self.sum_of_grouped_products(i as u32, node)),
            // dW[e] = g_eᵀ·x_e: both quantised along tokens, the gradient in the A tiles.
            Op::GroupedWgrad { experts, fp8: Some(f) } if by_expert(f) => {
                let offsets = self.map[a[2].index()];
                let (qg, qx) =
                    (self.by_expert(a[1], offsets, experts, f.a.k), self.by_expert(a[0], offsets, experts, f.a.k));
                let op = Op::ScaledGroupedWgrad { promote: f.promote };
                Some(self.push(op, vec![qg, qx, offsets], node.shape.clone(), node.dtype))
            }
            Op::Get(part) => self.parts.get(&a[0].0).map(|parts| parts[part]),
            _ => None,
        }
    }
}

/// Whether the experts' weights of `shape` ([experts, n, k] if `tb`, else [experts, k, n]) are
/// cut into whole weight blocks of `f` along n: none straddles two experts.
fn whole_weight_blocks(shape: &[usize], tb: bool, f: Fp8Gemm) -> bool {
    (if tb { shape[1] } else { shape[2] }).is_multiple_of(f.b.outer)
}

/// Whether an FP8 Wgrad of the experts quantises both operands by expert (one-row groups of
/// one length along tokens).
fn by_expert(f: Fp8Gemm) -> bool {
    f.a.outer == 1 && f.b.outer == 1 && f.a.k == f.b.k
}

/// Each node's readers, and whether it is one of the function's results.
struct Readers<'f> {
    of: Vec<Vec<&'f Node>>,
    outputs: HashSet<u32>,
}

impl<'f> Readers<'f> {
    fn of(f: &'f Function) -> Self {
        let mut of: Vec<Vec<&Node>> = vec![Vec::new(); f.nodes.len()];
        for node in &f.nodes {
            for a in &node.args {
                of[a.index()].push(node);
            }
        }
        Readers { of, outputs: f.outputs.iter().map(|o| o.0).collect() }
    }

    /// Whether node `i` is read, by nothing but nodes that `only` accepts, and is no result.
    fn only(&self, i: usize, only: impl Fn(&Node) -> bool) -> bool {
        !self.outputs.contains(&(i as u32)) && !self.of[i].is_empty() && self.of[i].iter().all(|r| only(r))
    }
}

/// The permutations (the dispatch's rows, recomputed for the Wgrad) and SwiGLUs (the down
/// projection's input) of `f` that only the experts' FP8 Wgrads read, as operands: their
/// quantisation by expert reads them through (`ExpertRows`), so they are never stored. So are
/// the combine's row gradients (the down projection's output gradient) that only those Wgrads
/// and FP8 grouped products read, as the products' rows in whole activation tiles: those
/// quantise them as they gather them.
fn read_by_expert(f: &Function, readers: &Readers) -> HashSet<u32> {
    let wgrad = |r: &Node| matches!(r.op, Op::GroupedWgrad { fp8: Some(f), .. } if by_expert(f));
    (f.nodes.iter().enumerate())
        .filter(|&(i, n)| match n.op {
            Op::Permute { .. } | Op::SwiGlu => readers.only(i, wgrad),
            Op::UnpermuteGradRows { .. } => readers.only(i, |r| {
                let d = *n.shape.last().unwrap_or(&0);
                // A product the rewrite quantises (`Rewrite::replace`: whole weight blocks),
                // reading it as its rows only.
                let whole_blocks =
                    |ws: &[V], tb: bool, g: Fp8Gemm| ws.iter().all(|&w| whole_weight_blocks(&f.node(w).shape, tb, g));
                let product = match r.op {
                    Op::GroupedMatMul { tb, fp8: Some(g) } => Some((g, tb, &r.args[1..2])),
                    Op::ConcatGroupedMatMul { tb, fp8: Some(g) } => Some((g, tb, &r.args[1..3])),
                    _ => None,
                };
                let rows_of_product = product
                    .is_some_and(|(g, tb, ws)| g.a.outer == 1 && d.is_multiple_of(g.a.k) && whole_blocks(ws, tb, g))
                    && r.args[0].index() == i
                    && !r.args[1..].contains(&V(i as u32));
                wgrad(r) || rows_of_product
            }),
            _ => false,
        })
        .map(|(i, _)| i as u32)
        .collect()
}

/// The additions of `f` whose two terms are FP8 grouped products of the same rows' experts
/// that nothing else reads (the Dgrads of the experts' gate and up projections), each with its
/// products: one GEMM computes the sum ([`Op::ConcatKScaledGroupedMatMul`]) where the
/// experts' kernel takes it (whole 128×128 weight blocks, an even N).
fn summed_grouped_products(f: &Function, readers: &Readers) -> HashMap<u32, [u32; 2]> {
    let product = |v: V| match f.node(v).op {
        Op::GroupedMatMul { tb, fp8: Some(g) } if g.a.outer == 1 => {
            let weights = &f.node(f.node(v).args[1]).shape;
            let n = if tb { weights[1] } else { weights[2] };
            (whole_weight_blocks(weights, tb, g) && n.is_multiple_of(2)).then_some(g)
        }
        _ => None,
    };
    (f.nodes.iter().enumerate())
        .filter_map(|(i, node)| {
            let (&[a, b], Op::Add) = (&node.args[..], &node.op) else { return None };
            let only_this = |v: V| readers.only(v.index(), |r| std::ptr::eq(r, node));
            let same = |x: V, y: V| f.node(x).shape == f.node(y).shape && f.node(x).args[2] == f.node(y).args[2];
            let fits = a != b
                && product(a).is_some()
                && product(a) == product(b)
                && same(a, b)
                && f.node(a).shape == node.shape
                && only_this(a)
                && only_this(b);
            fits.then_some((i as u32, [a.0, b.0]))
        })
        .collect()
}

fn function(f: &Function) -> Function {
    let readers = Readers::of(f);
    let mut rewrite = Rewrite {
        old: f,
        nodes: Vec::new(),
        map: Vec::new(),
        parts: HashMap::new(),
        quantized: HashMap::new(),
        read_through: read_by_expert(f, &readers),
        sums: summed_grouped_products(f, &readers),
    };
    for (i, node) in f.nodes.iter().enumerate() {
        let new = match rewrite.replace(i, node) {
            Some(v) => v,
            None => {
                let args = node.args.iter().map(|a| rewrite.map[a.index()]).collect();
                rewrite.push(node.op.clone(), args, node.shape.clone(), node.dtype)
            }
        };
        rewrite.map.push(new);
    }
    Function {
        name: f.name.clone(),
        args: f.args.clone(),
        outputs: f.outputs.iter().map(|o| rewrite.map[o.index()]).collect(),
        output_names: f.output_names.clone(),
        nodes: rewrite.nodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::ir::{FunctionBuilder, Tiling};

    fn recipe() -> Fp8Gemm {
        Fp8Gemm { a: Tiling { outer: 1, k: 128 }, b: Tiling { outer: 128, k: 128 }, promote: 128 }
    }

    fn ops(f: &Function) -> Vec<&'static str> {
        f.nodes.iter().map(|n| n.op.name()).collect()
    }

    /// Fprop and Dgrad of one weight: w quantised K-major each way; x, read by two products,
    /// quantised once; the products keep their shapes.
    #[test]
    fn products_read_their_operands_quantised_k_major() {
        let module = Module::default();
        let mut b = FunctionBuilder::new(&module, "f");
        let x = b.arg("x", vec![256, 384], DType::F32);
        let w = b.arg("w", vec![512, 384], DType::F32);
        let v = b.arg("v", vec![128, 384], DType::F32);
        let dy = b.arg("dy", vec![256, 512], DType::F32);
        let y = b.matmul(x, w, false, true, Some(recipe()));
        let z = b.matmul(x, v, false, true, Some(recipe()));
        let dx = b.matmul(dy, w, false, false, Some(recipe()));
        for (name, value) in [("y", y), ("z", z), ("dx", dx)] {
            b.output(name, value);
        }
        let f = b.finish();
        let g = function(&f);
        let quantizes: Vec<&Op> =
            g.nodes.iter().map(|n| &n.op).filter(|op| matches!(op, Op::Quantize { .. })).collect();
        assert_eq!(
            quantizes,
            [
                &Op::Quantize { rows: 1, cols: 128, transpose: false },
                &Op::Quantize { rows: 128, cols: 128, transpose: false },
                &Op::Quantize { rows: 128, cols: 128, transpose: false },
                &Op::Quantize { rows: 1, cols: 128, transpose: false },
                &Op::Quantize { rows: 128, cols: 128, transpose: true },
            ]
        );
        assert_eq!(ops(&g).iter().filter(|&&o| o == "scaled_matmul").count(), 3);
        for (o, old) in g.outputs.iter().zip(&f.outputs) {
            assert_eq!(g.node(*o).shape, f.node(*old).shape);
        }
        let transposed_w = g.nodes.iter().find(|n| n.op == Op::Quantize { rows: 128, cols: 128, transpose: true });
        assert_eq!(transposed_w.map(|n| n.shape.clone()), Some(vec![384, 512]));
    }

    /// The experts' Wgrads quantise their operands by expert, each once: the gate's and up
    /// projection's share x, a permutation of the tokens' rows that only they read, so its
    /// quantisation reads it through the order (no `permute` left); the down projection's
    /// input, a SwiGLU only it reads, is made as it is read; a SwiGLU that is also a result
    /// stays stored.
    #[test]
    fn wgrad_operands_are_quantised_by_expert_once_reading_through_their_makers() {
        let module = Module::default();
        let mut b = FunctionBuilder::new(&module, "f");
        let (rows, d, n) = (48, 64, 32);
        let tokens = b.arg("tokens", vec![8, d], DType::F32);
        let order = b.arg("order", vec![rows], DType::I32);
        let offsets = b.arg("offsets", vec![5], DType::I32);
        let (g1, g2) = (b.arg("g1", vec![rows, n], DType::F32), b.arg("g2", vec![rows, n], DType::F32));
        let (h1, h2) = (b.arg("h1", vec![rows, d], DType::F32), b.arg("h2", vec![rows, d], DType::F32));
        let x = b.push(Op::Permute { k: 6 }, vec![tokens, order], vec![rows, d], DType::F32);
        let read = b.push(Op::SwiGlu, vec![h1, h2], vec![rows, d], DType::F32);
        let kept = b.push(Op::SwiGlu, vec![h2, h1], vec![rows, d], DType::F32);
        let wgrad = Fp8Gemm { a: Tiling { outer: 1, k: 32 }, b: Tiling { outer: 1, k: 32 }, promote: 32 };
        let op = Op::GroupedWgrad { experts: 4, fp8: Some(wgrad) };
        let dw = [(x, g1), (x, g2), (read, g1), (kept, g2)]
            .map(|(x, g)| b.push(op.clone(), vec![x, g, offsets], vec![4, n, d], DType::F32));
        for (k, dw) in dw.into_iter().enumerate() {
            b.output(format!("dw{k}"), dw);
        }
        b.output("kept", kept);
        let g = function(&b.finish());
        assert!(!ops(&g).contains(&"permute"), "{:?}", ops(&g));
        assert_eq!(ops(&g).iter().filter(|&&o| o == "swiglu").count(), 1, "{:?}", ops(&g));
        let by_expert: Vec<(&ExpertRows, &[V])> = (g.nodes.iter())
            .filter_map(|n| match &n.op {
                Op::QuantizeByExpert { rows, .. } => Some((rows, &n.args[..])),
                _ => None,
            })
            .collect();
        let sources: Vec<&ExpertRows> = by_expert.iter().map(|(rows, _)| *rows).collect();
        let stored = ExpertRows::Stored;
        let (permuted, swiglu) = (ExpertRows::Permuted { k: 6 }, ExpertRows::SwiGlu);
        // g1, x (read once by two Wgrads), g2, the SwiGLU read through, the one kept.
        assert_eq!(sources, [&stored, &permuted, &stored, &swiglu, &stored]);
        assert_eq!(by_expert[1].1, [tokens, offsets, order]);
        assert_eq!(by_expert[3].1, [h1, offsets, h2]);
    }

    /// The combine's row gradients, read only by the down projection's Wgrad and Dgrad, are
    /// never stored: the Dgrad's rows are gathered, gated and quantised in one
    /// `permute_quantize`, the Wgrad's quantisation by expert makes them as it reads them. Row
    /// gradients that are also a result stay stored, and both read the stored ones.
    #[test]
    fn row_gradients_read_only_by_the_experts_gemms_are_made_where_they_are_quantised() {
        let module = Module::default();
        let mut b = FunctionBuilder::new(&module, "f");
        let (tokens, k, d, n, experts) = (8, 6, 64, 32, 4);
        let rows = tokens * k;
        let wgrad = Fp8Gemm { a: Tiling { outer: 1, k: 32 }, b: Tiling { outer: 1, k: 32 }, promote: 32 };
        let dgrad = Fp8Gemm { a: Tiling { outer: 1, k: 32 }, b: Tiling { outer: 32, k: 32 }, promote: 32 };
        let g = b.arg("g", vec![tokens, d], DType::F32);
        let order = b.arg("order", vec![rows], DType::I32);
        let gates = b.arg("gates", vec![tokens, k], DType::F32);
        let offsets = b.arg("offsets", vec![experts + 1], DType::I32);
        let h = b.arg("h", vec![rows, n], DType::F32);
        let w = b.arg("w", vec![experts, d, n], DType::F32);
        let row_gradients = |b: &mut FunctionBuilder| {
            b.push(Op::UnpermuteGradRows { k }, vec![g, order, gates], vec![rows, d], DType::F32)
        };
        let (read, kept) = (row_gradients(&mut b), row_gradients(&mut b));
        for (name, dy) in [("read", read), ("kept", kept)] {
            let dh = b.push(
                Op::GroupedMatMul { tb: false, fp8: Some(dgrad) },
                vec![dy, w, offsets],
                vec![rows, n],
                DType::F32,
            );
            let op = Op::GroupedWgrad { experts, fp8: Some(wgrad) };
            let dw = b.push(op, vec![h, dy, offsets], vec![experts, d, n], DType::F32);
            b.output(format!("dh_{name}"), dh);
            b.output(format!("dw_{name}"), dw);
        }
        b.output("kept", kept);
        let f = function(&b.finish());
        assert_eq!(ops(&f).iter().filter(|&&o| o == "unpermute_grad_rows").count(), 1, "{:?}", ops(&f));
        let gathered: Vec<&Node> = f.nodes.iter().filter(|n| matches!(n.op, Op::PermuteQuantize { .. })).collect();
        assert_eq!(gathered.len(), 1, "{:?}", ops(&f));
        assert_eq!(gathered[0].op, Op::PermuteQuantize { k, cols: 32, gated: true });
        assert_eq!((&gathered[0].args[..], &gathered[0].shape[..]), (&[g, order, gates][..], &[rows, d][..]));
        let read_through: Vec<&[V]> = (f.nodes.iter())
            .filter(|n| matches!(n.op, Op::QuantizeByExpert { rows: ExpertRows::UnpermutedGrad { k: 6 }, .. }))
            .map(|n| &n.args[..])
            .collect();
        assert_eq!(read_through, [&[g, offsets, order, gates][..]]);
    }

    /// The sum of two FP8 grouped products that only it reads (the experts' Dgrads of the
    /// gate and up projections) is one GEMM on their quantised operands, no product or
    /// addition left; where a product is read again (here, a result) the two stay products
    /// and the addition stays.
    #[test]
    fn summed_grouped_products_are_one_gemm_unless_read_apart() {
        for read_apart in [false, true] {
            let module = Module::default();
            let mut b = FunctionBuilder::new(&module, "f");
            let (rows, d, n) = (48, 256, 128);
            let offsets = b.arg("offsets", vec![5], DType::I32);
            let (dg, du) = (b.arg("dg", vec![rows, n], DType::F32), b.arg("du", vec![rows, n], DType::F32));
            let (wg, wu) = (b.arg("wg", vec![4, n, d], DType::F32), b.arg("wu", vec![4, n, d], DType::F32));
            let op = Op::GroupedMatMul { tb: false, fp8: Some(recipe()) };
            let [pg, pu] =
                [(dg, wg), (du, wu)].map(|(x, w)| b.push(op.clone(), vec![x, w, offsets], vec![rows, d], DType::F32));
            let dx = b.push(Op::Add, vec![pg, pu], vec![rows, d], DType::F32);
            b.output("dx", dx);
            if read_apart {
                b.output("pg", pg);
            }
            let g = function(&b.finish());
            let sum = g.node(g.outputs[0]);
            if read_apart {
                assert_eq!(sum.op, Op::Add, "{:?}", ops(&g));
                assert_eq!(ops(&g).iter().filter(|&&o| o == "grouped_matmul").count(), 2);
                continue;
            }
            assert_eq!(sum.op, Op::ConcatKScaledGroupedMatMul { fp8: recipe() }, "{:?}", ops(&g));
            assert!(!ops(&g).contains(&"grouped_matmul") && !ops(&g).contains(&"add"), "{:?}", ops(&g));
            let quantized = |k: usize| g.node(sum.args[k]).op.clone();
            let (rows_q, weights_q) = (
                Op::Quantize { rows: 1, cols: 128, transpose: false },
                Op::Quantize { rows: 128, cols: 128, transpose: true },
            );
            assert_eq!([0, 1, 2, 3].map(quantized), [rows_q.clone(), weights_q.clone(), rows_q, weights_q]);
            assert_eq!(sum.args[4], offsets);
        }
    }

    /// The fused forms come apart into what they fused: `matmul_add` into a product and an
    /// addition onto c; `concat_rows_matmul`'s two results into two products sharing the
    /// quantised b, its `get`s reading them.
    #[test]
    fn fused_forms_come_apart_with_their_readers() {
        let module = Module::default();
        let mut b = FunctionBuilder::new(&module, "f");
        let (g1, g2) = (b.arg("g1", vec![256, 128], DType::F32), b.arg("g2", vec![256, 256], DType::F32));
        let x = b.arg("x", vec![256, 384], DType::F32);
        let c = b.arg("c", vec![256, 384], DType::F32);
        let wgrad = Fp8Gemm { a: Tiling { outer: 1, k: 128 }, b: Tiling { outer: 1, k: 128 }, promote: 128 };
        let op = Op::ConcatRowsMatMul { ta: true, tb: false, fp8: Some(wgrad) };
        let both = b.push(op, vec![g1, g2, x], vec![], DType::F32);
        let (d1, d2) = (
            b.push(Op::Get(0), vec![both], vec![128, 384], DType::F32),
            b.push(Op::Get(1), vec![both], vec![256, 384], DType::F32),
        );
        let w = b.arg("w", vec![384, 384], DType::F32);
        let y = b.push(
            Op::MatMulAdd { ta: false, tb: true, fp8: Some(recipe()) },
            vec![x, w, c],
            vec![256, 384],
            DType::F32,
        );
        for (name, value) in [("d1", d1), ("d2", d2), ("y", y)] {
            b.output(name, value);
        }
        let f = b.finish();
        let g = function(&f);
        assert!(!ops(&g).contains(&"concat_rows_matmul") && !ops(&g).contains(&"matmul_add"), "{:?}", ops(&g));
        let [d1, d2, y] = [0, 1, 2].map(|o| g.node(g.outputs[o]));
        assert_eq!((d1.op.name(), d1.shape.clone()), ("scaled_matmul", vec![128, 384]));
        assert_eq!((d2.op.name(), d2.shape.clone()), ("scaled_matmul", vec![256, 384]));
        assert_eq!(d1.args[1], d2.args[1], "b quantised once for both");
        assert_eq!(g.node(d1.args[1]).op, Op::Quantize { rows: 1, cols: 128, transpose: true });
        assert_eq!(g.node(d1.args[0]).op, Op::Quantize { rows: 1, cols: 128, transpose: true });
        assert_eq!(y.op, Op::Add);
        assert_eq!(y.args[0], V(3), "c, then the product");
        assert_eq!(g.node(y.args[1]).op.name(), "scaled_matmul");
    }
}
