//! The e-graph language of fusion: the primitives the rules look at, the fused ops they
//! produce, leaves (arguments and constants) and `Opaque` for every other op of a function,
//! which fusion carries through unchanged. An `Opaque` symbol names the original node
//! (`#17`), whose op, shape and dtype [`super::translate::encode`] keeps in a side table. Ops
//! with attributes (a GEMM's transposes and FP8 recipe, a slice's range, a reshape's shape)
//! take an [`Attr`] leaf as their first child, which holds the op itself: equal ops on equal
//! inputs share an e-class, and the rules read and build attributes through it.

use crate::graph::ir::Op;
use egg::{define_language, Id, Symbol};

define_language! {
    pub enum Fx {
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "mul" = Mul([Id; 2]),
        "div" = Div([Id; 2]),
        "exp" = Exp(Id),
        "log" = Log(Id),
        "square" = Square(Id),
        "rsqrt" = Rsqrt(Id),
        "silu" = Silu(Id),
        "sigmoid" = Sigmoid(Id),
        "neg" = Neg(Id),
        "stop" = Stop(Id),
        // Reductions over the last axis, keeping it (as the model builder emits them).
        "sum_last" = SumLast(Id),
        "max_last" = MaxLast(Id),
        "transpose_last2" = TransposeLast2(Id),
        // The inverse of a permutation (the MoE's expert order).
        "invert_order" = InvertOrder(Id),
        // Routing's index ops: (attr, x), (x, idx), (attr, idx, g); other sums, (attr, x).
        "top_k" = TopK([Id; 2]),
        "take_along" = TakeAlong([Id; 2]),
        "put_along" = PutAlong([Id; 3]),
        "sum_axis" = SumAxis([Id; 2]),
        // Ops with attributes: (op attr args…).
        "matmul" = MatMul([Id; 3]),
        "reshape" = Reshape([Id; 2]),
        "slice" = Slice([Id; 2]),
        "concat" = Concat([Id; 3]),
        "sum_to" = SumTo([Id; 2]),
        "broadcast_to" = BroadcastTo([Id; 2]),
        // Fused ops.
        "rmsnorm" = RmsNorm([Id; 3]),
        "softmax" = Softmax(Id),
        "swiglu" = SwiGlu([Id; 2]),
        // Backward twins: (x, dy) → dx of softmax.
        "softmax_grad" = SoftmaxGrad([Id; 2]),
        // The loss: (x, labels) → (each row's cross-entropy, its max m, Σ e^(x − m)); its
        // backward, (x, labels, dy, m, z) → dx.
        "cross_entropy" = CrossEntropy([Id; 2]),
        "cross_entropy_grad" = CrossEntropyGrad([Id; 5]),
        // Fused ops with several results (a tuple), read with `get0`, `get1`, `get2`.
        "add_rmsnorm" = AddRmsNorm([Id; 4]),
        // (x, w, dy, eps) → (dx, dw); with an adjoint to add dx into, (x, w, dy, acc, eps);
        // (a, b, dy) → (da, db).
        "rmsnorm_grad" = RmsNormGrad([Id; 4]),
        "rmsnorm_grad_acc" = RmsNormGradAcc([Id; 5]),
        "swiglu_grad" = SwiGluGrad([Id; 3]),
        // (attr, a, b1, b2) → (a·b1, a·b2), the attribute that of the two GEMMs (a `matmul`'s
        // or a `scaled_matmul`'s).
        "concat_matmul" = ConcatMatMul([Id; 4]),
        // (attr, a1, b1, a2, b2) → a1·b1 + a2·b2.
        "concat_k_matmul" = ConcatKMatMul([Id; 5]),
        // (attr, a1, a2, b) → (a1·b, a2·b).
        "concat_rows_matmul" = ConcatRowsMatMul([Id; 4]),
        // The experts' GEMMs, (attr, xs, w, offsets); two of them sharing xs and offsets as
        // one, (attr, xs, w1, w2, offsets).
        "grouped_matmul" = GroupedMatMul([Id; 4]),
        // The MoE dispatch, (attr, x, order); fused with the quantisation of what it sends,
        // (quantize attr, permute attr, x, order).
        "permute" = Permute([Id; 3]),
        "permute_quantize" = PermuteQuantize([Id; 4]),
        "concat_grouped_matmul" = ConcatGroupedMatMul([Id; 5]),
        // A GEMM adding c in its epilogue, (attr, a, b, c); softmax(s·scale + mask),
        // (scale, s, mask).
        "matmul_add" = MatMulAdd([Id; 4]),
        "masked_softmax" = MaskedSoftmax([Id; 3]),
        // (nope, pe, cos, sin) → concat(nope, rope(pe)).
        "rope_concat" = RopeConcat([Id; 4]),
        // (top-k attr, top-keep attr, grouping reshape attr, scores, bias, scale) →
        // (chosen, gates).
        "route" = Route([Id; 6]),
        // FP8 made explicit: (attr, x) with a `Quantize` attribute; (attr, qa, qb) with a
        // `ScaledMatMul` one; and the producers that quantise what they write, with a
        // `Quantize` attribute: (attr, x, w, eps) and (attr, a, b).
        "quantize" = Quantize([Id; 2]),
        "scaled_matmul" = ScaledMatMul([Id; 3]),
        "rmsnorm_quantize" = RmsNormQuantize([Id; 4]),
        "swiglu_quantize" = SwiGluQuantize([Id; 3]),
        "get0" = Get0(Id),
        "get1" = Get1(Id),
        "get2" = Get2(Id),
        // A scalar constant, by its value's bits.
        Const(ConstBits),
        // An op's attributes: the op itself.
        Attr(Attr),
        Opaque(Symbol, Vec<Id>),
    }
}

/// A constant's f64 bits (so that equal constants share an e-class).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConstBits(pub u64);

impl ConstBits {
    pub fn value(self) -> f64 {
        f64::from_bits(self.0)
    }
}

impl std::fmt::Display for ConstBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.value())
    }
}

impl std::str::FromStr for ConstBits {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // Constants appear in patterns only as variables; parse numbers for completeness.
        s.parse::<f64>().map(|v| ConstBits(v.to_bits())).map_err(|e| e.to_string())
    }
}

/// An op with its attributes, interned as its JSON form (ops hold f64s, which are not `Eq`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attr(Symbol);

impl Attr {
    pub fn new(op: &Op) -> Self {
        Attr(Symbol::from(serde_json::to_string(op).expect("ops serialise")))
    }

    pub fn op(self) -> Op {
        serde_json::from_str(self.0.as_str()).expect("an attribute holds an op")
    }
}

impl std::fmt::Display for Attr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl std::str::FromStr for Attr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_str::<Op>(s).map(|op| Attr::new(&op)).map_err(|e| e.to_string())
    }
}
