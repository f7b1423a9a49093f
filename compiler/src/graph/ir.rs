//! The tensor IR: a [`Module`] of [`Function`]s, each a list of single-result [`Node`]s in
//! topological order with static shapes and dtypes. A function can call another (`Call`
//! returns a tuple, `Get` projects from it), so a layer is built once and instanced per layer.
//!
//! The ops are primitives, with one exception that departs from DESIGN.md's "primitive ops
//! only": causal attention is one op (`Attention`, a tuple of its output and log-sum-exp) with
//! its own backward op (`AttentionGrad`). Differentiating its primitives would store the s×s
//! probabilities for the backward, and finding flash attention's backward again among
//! autodiff's products, softmax gradient and transposes is a fragile match of a whole subgraph;
//! as one op, the fused kernels run it and a plan expands it into primitives wherever they do
//! not (`fuse::expand`), so fusion and every backend still see primitives there.
//!
//! [`FunctionBuilder`] appends nodes and infers their shapes; a shape mismatch is a bug in
//! the builder (the spec was checked before), so it panics.

use serde::{Deserialize, Serialize};
use std::fmt;

pub type Shape = Vec<usize>;

/// Element types of graph values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F64,
    F32,
    Bf16,
    F8e4m3,
    I32,
    /// The result of a `Call`: a tuple, read with `Get`.
    Tuple,
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F8e4m3 => "f8e4m3",
            DType::I32 => "i32",
            DType::Tuple => "tuple",
        })
    }
}

/// A value: the result of the node with this index in its function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct V(pub u32);

impl V {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A scaling group for FP8 quantisation: `outer` rows (or columns) × `k` elements along K.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tiling {
    pub outer: usize,
    pub k: usize,
}

/// How a GEMM runs in FP8: each operand quantised to E4M3 per scaling group, partial sums
/// promoted to FP32 every `promote` elements of K.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fp8Gemm {
    pub a: Tiling,
    pub b: Tiling,
    pub promote: usize,
}

/// The precision of a linear layer's three GEMMs (its forward, Dgrad and Wgrad).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPrecision {
    /// FP32 operands and sums.
    F32,
    /// Operands rounded to BF16, sums in FP32 (a BF16 `MatMul`).
    Bf16,
    /// DeepSeek-V3's FP8 recipe.
    Fp8(Fp8Linear),
}

/// The FP8 recipe for the three GEMMs of a linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fp8Linear {
    /// Activation tile, e.g. 1×128.
    pub tile: usize,
    /// Weight block, e.g. 128×128.
    pub block: usize,
    pub promote: usize,
}

impl Fp8Linear {
    /// y = x·Wᵀ: activations per 1×tile along K, weights per block×block.
    pub fn fprop(self) -> Fp8Gemm {
        Fp8Gemm {
            a: Tiling { outer: 1, k: self.tile },
            b: Tiling { outer: self.block, k: self.block },
            promote: self.promote,
        }
    }
    /// dx = dy·W: the gradient per 1×tile along K, weights per block×block.
    pub fn dgrad(self) -> Fp8Gemm {
        self.fprop()
    }
    /// dW = dyᵀ·x: both operands per 1×tile along K, which is the token dimension.
    pub fn wgrad(self) -> Fp8Gemm {
        Fp8Gemm { a: Tiling { outer: 1, k: self.tile }, b: Tiling { outer: 1, k: self.tile }, promote: self.promote }
    }
}

/// Where a [`Op::QuantizeByExpert`] takes the rows it quantises: stored, or made as they are
/// read by the op that would otherwise have stored them for it alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertRows {
    /// (x [r, d], offsets): x's rows.
    #[default]
    Stored,
    /// (x [t, d], offsets, order [r]): `Permute { k }`'s, row i = x[order[i] / k].
    Permuted { k: usize },
    /// (a [r, d], offsets, b [r, d]): `SwiGlu`'s, silu(a)·b.
    SwiGlu,
    /// (g [t, d], offsets, order [r], gates [t·k]): `UnpermuteGradRows { k }`'s, row i =
    /// gates[order[i]] · g[order[i] / k].
    UnpermutedGrad { k: usize },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The function's argument with this index.
    Arg(usize),
    /// A scalar constant (shape `[]`, broadcast by the binary ops).
    Const(f64),
    /// A constant tensor of the module (`Module::constants`).
    Table(usize),
    Neg,
    Exp,
    Log,
    Sigmoid,
    Silu,
    Rsqrt,
    Sqrt,
    Square,
    /// −1, 0 or 1; no gradient.
    Sign,
    /// Elementwise with numpy broadcasting of trailing dimensions.
    Add,
    Sub,
    Mul,
    Div,
    /// Elementwise maximum; no gradient (the optimizer's clipping uses it).
    Maximum,
    /// Round to the target type (values stay in the backend's real type).
    Cast(DType),
    Sum {
        axis: usize,
        keep: bool,
    },
    /// No gradient (used for numerically stable softmax, where it cancels).
    Max {
        axis: usize,
        keep: bool,
    },
    /// Sums broadcast dimensions away: the transpose of broadcasting.
    SumTo(Shape),
    BroadcastTo(Shape),
    Reshape(Shape),
    Transpose(Vec<usize>),
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// Pads a slice back to `len` along `axis` with zeros: the transpose of `Slice`.
    PadSlice {
        axis: usize,
        start: usize,
        len: usize,
    },
    Concat {
        axis: usize,
    },
    /// Batched matrix product over equal leading dimensions, optionally in FP8; an F32 value.
    /// On two Bf16 operands it is a BF16 GEMM (products of BF16 values summed in FP32, on
    /// BF16 tensor cores), and its backward's two products are too: the cotangent is rounded
    /// to BF16 first (`autodiff`).
    MatMul {
        ta: bool,
        tb: bool,
        fp8: Option<Fp8Gemm>,
    },
    /// Rows of a table: (table [n, d], ids [...]) → [..., d].
    Gather,
    /// Scatter-add of rows: (ids [...], grad [..., d]) → [rows, d]. The transpose of `Gather`.
    ScatterRows {
        rows: usize,
    },
    /// Along the last axis: (x [..., n], idx [..., k]) → [..., k].
    TakeAlong,
    /// (idx [..., k], grad [..., k]) → [..., n]. The transpose of `TakeAlong`.
    PutAlong {
        n: usize,
    },
    /// Indices of the k largest along the last axis, largest first, ties to the lower index.
    TopK {
        k: usize,
    },
    /// Per row, how often each of `bins` values occurs: (idx [n, m]) → [n, bins] reals.
    Count {
        bins: usize,
    },
    /// Assignment order sorted stably by expert: (idx [t, k]) → [t·k] of flat assignment ids.
    SortByExpert {
        experts: usize,
    },
    /// Row offsets of each expert in that order: (idx [t, k]) → [experts + 1].
    ExpertOffsets {
        experts: usize,
    },
    /// Rows for the experts: (x `[t, d]`, order `[r]`) → `[r, d]`, row i = `x[order[i] / k]`.
    Permute {
        k: usize,
    },
    /// The transpose of `Permute`, as a gather: (grad `[r, d]`, positions `[r]`) → `[t, d]`,
    /// row t = `Σⱼ grad[positions[t·k + j]]` (j in order), `positions` the inverse of the
    /// permutation's order (`InvertOrder`).
    PermuteGrad {
        k: usize,
        tokens: usize,
    },
    /// The inverse of a permutation: (order `[r]`) → positions `[r]`, `positions[order[i]] = i`
    /// (where each assignment's row went).
    InvertOrder,
    /// Per expert e, rows `offsets[e]..offsets[e+1]` of xs times `w[e]` (transposed if `tb`):
    /// (xs [r, k], w [experts, k, n] or [experts, n, k], offsets) → [r, n]. In FP8, xs may
    /// come already quantised (an F8E4M3 value in 1×tile groups, from a fused dispatch), and
    /// after `fuse::library` both are: xs in 1×tile groups, w K-major ([experts, n, k], `tb`)
    /// in blocks that do not straddle experts.
    GroupedMatMul {
        tb: bool,
        fp8: Option<Fp8Gemm>,
    },
    /// Weight gradient of `GroupedMatMul`: (xs [r, k], grad [r, n], offsets) → [experts, n, k].
    GroupedWgrad {
        experts: usize,
        fp8: Option<Fp8Gemm>,
    },
    /// Weighted combine, as a gather: (ys `[r, d]`, positions `[r]`, gates `[t, k]`) → `[t, d]`,
    /// row t = `Σⱼ gates[t, j] · ys[positions[t·k + j]]` (j in order), `positions` the inverse
    /// of the dispatch's order (`InvertOrder`).
    Unpermute {
        k: usize,
    },
    /// d ys of `Unpermute`: (grad [t, d], order, gates) → [r, d].
    UnpermuteGradRows {
        k: usize,
    },
    /// d gates of `Unpermute`: (grad [t, d], ys, order) → [t, k].
    UnpermuteGradGates {
        k: usize,
    },
    /// Expert parallelism, the routed experts split evenly over the `ranks` members of a group
    /// (member j holds experts j·E/ranks ..): how many rows each member sends this one, per
    /// local expert: (offsets [E + 1] of this member's expert-sorted rows) → [ranks, E/ranks]
    /// i32. An all-to-all between the members.
    ExchangeCounts {
        ranks: usize,
    },
    /// The row offsets of the local experts in `Dispatch`'s output: (counts [ranks, E/ranks])
    /// → [E/ranks + 1].
    ReceivedOffsets,
    /// The all-to-all sending each member the rows for its experts: (xs [r, d], offsets
    /// [E + 1], counts [ranks, E/ranks]) → [ranks · r, d], sorted by local expert, then by
    /// sender; rows past the last offset (the buffer's spare capacity) are zero.
    Dispatch {
        ranks: usize,
    },
    /// The transpose of `Dispatch`, sending the rows back where they came from: (ys [ranks · r,
    /// d], offsets, counts) → [r, d].
    Combine {
        ranks: usize,
    },
    StopGradient,
    /// Causal attention on the heads of q, k [b, s, h, dqk] and v [b, s, h, dv] → the tuple
    /// (o [b, s, h, dv], lse [b, h, s]): o = softmax(scale·q·kᵀ + causal mask)·v per (batch,
    /// head) and each row's log-sum-exp of its scaled, masked scores (natural log), which the
    /// backward reads. With `bf16`, q, k and v are rounded to BF16 first (the recipe keeps
    /// attention in BF16; the GPU's fused kernels also round the probabilities, as tensor
    /// cores take them). Where those kernels take it (`compiler::mlir::attention`), the s×s
    /// scores are never stored; a plan expands any other into primitives (`fuse::expand`).
    Attention {
        scale: f64,
        bf16: bool,
    },
    /// The backward of `Attention`, (q, k, v, o, lse, do) → the tuple (dq, dk, dv), the
    /// probabilities recomputed from the log-sum-exp; the gradients pass the BF16 rounding
    /// straight through, as a cast's VJP does.
    AttentionGrad {
        scale: f64,
        bf16: bool,
    },
    /// Fused (by `fuse`): RMSNorm over the last axis, (x, w) → x·rsqrt(mean(x²) + eps)·w.
    RmsNorm {
        eps: f64,
    },
    /// Fused: softmax over the last axis.
    Softmax,
    /// Fused: SwiGLU's gate, (a, b) → silu(a)·b.
    SwiGlu,
    /// Fused: the residual add and the RMSNorm of its sum, (a, b, w) → the tuple
    /// (a + b, rmsnorm(a + b, w)); the residual stream reads the sum, the block the norm.
    AddRmsNorm {
        eps: f64,
    },
    /// Fused backward of `RmsNorm`: (x, w, dy[, acc]) → the tuple ([acc +] dx, dw), where
    /// `acc` is an adjoint of x to accumulate into.
    RmsNormGrad {
        eps: f64,
    },
    /// Fused backward of `Softmax`, recomputing it from its input: (x, dy) → dx =
    /// y·(dy − Σ dy·y) over the last axis, y = softmax(x).
    SoftmaxGrad,
    /// Fused backward of `SwiGlu`: (a, b, dy) → the tuple (da, db).
    SwiGluGrad,
    /// Fused: the cross-entropy of each row of logits against its label, (x [.., n], labels
    /// [.., 1] i32) → the tuple (log z − (x[label] − m), m, z), each [.., 1]: m the row's max,
    /// z = Σ_last e^(x − m) (the backward reads them).
    CrossEntropy,
    /// Fused backward of `CrossEntropy`: (x, labels, dy, m, z, each but x [.., 1]) →
    /// dx = (dy/z)·e^(x − m) − dy·onehot(label).
    CrossEntropyGrad,
    /// Fused: a GEMM whose epilogue adds c (a residual, or an adjoint accumulating), (a, b, c)
    /// → c + op(a)·op(b), the product read in c's shape.
    MatMulAdd {
        ta: bool,
        tb: bool,
        fp8: Option<Fp8Gemm>,
    },
    /// Fused: attention's softmax with its scale and mask folded in, (s, mask) →
    /// softmax(s·scale + mask) over the last axis (the mask broadcast).
    MaskedSoftmax {
        scale: f64,
    },
    /// Fused: RoPE on a head's position part, joined to the rest, (nope [.., n], pe [.., r],
    /// cos, sin) → concat(nope, rope(pe)) along the last axis, rope(pe) broadcast to nope's
    /// leading shape (the key's one RoPE part serves every head); rope as `model::rope`
    /// computes it on the interleaved pairs.
    RopeConcat,
    /// Fused: DeepSeek-V3's routing of each token, (scores `[t, e]`, bias `[e]`) → the tuple
    /// (chosen i32 [t, k], gates [t, k]): on the biased scores s + bias, a group's score is the
    /// sum of its two best, the `keep` best of the `groups` groups stay, the top `k` experts
    /// among them are chosen; the gates are their unbiased scores normalised to sum 1, times
    /// `scale`.
    Route {
        groups: usize,
        keep: usize,
        k: usize,
        scale: f64,
    },
    /// Made explicit by fusion: FP8 quantisation of a matrix x [r, c] (of xᵀ if `transpose`,
    /// the Wgrad operands' layout) in scaling groups of `rows` × `cols` of the result, each
    /// element an E4M3 value and each group a scale (as `Fp8Gemm`'s tilings): an F8E4M3 value.
    /// A stack of matrices is quantised matrix by matrix; where the result's rows are longer
    /// than x's (`fuse::library` pads K to whole groups), the rest is zero.
    Quantize {
        rows: usize,
        cols: usize,
        transpose: bool,
    },
    /// The FP8 GEMM on quantised operands, both K-major as FP8 tensor cores read them,
    /// (a [m, k], b [n, k]) → a·bᵀ [m, n] with partial sums promoted to FP32 every `promote`
    /// elements of K.
    ScaledMatMul {
        promote: usize,
    },
    /// Fused: RMSNorm and the FP8 quantisation of its result seen as [tokens, n] in 1×`cols`
    /// tiles, (x, w) → F8E4M3 [tokens, n].
    RmsNormQuantize {
        eps: f64,
        cols: usize,
    },
    /// Fused: SwiGLU's gate and the FP8 quantisation of its result seen as [tokens, n] in
    /// 1×`cols` tiles, (a, b) → F8E4M3 [tokens, n].
    SwiGluQuantize {
        cols: usize,
    },
    /// Fused: `ConcatMatMul` on quantised operands (K-major as `ScaledMatMul`'s), (a, b1, b2) →
    /// (a·b1ᵀ, a·b2ᵀ).
    ConcatScaledMatMul {
        promote: usize,
    },
    /// Fused: `ConcatKMatMul` on quantised operands (K-major as `ScaledMatMul`'s), (a1, b1,
    /// a2, b2) → a1·b1ᵀ + a2·b2ᵀ (each product rounded to f32, then their sum).
    ConcatKScaledMatMul {
        promote: usize,
    },
    /// Made explicit for the library: an operand of the experts' FP8 Wgrad quantised along
    /// tokens, (x [r, d], offsets [experts + 1]) → F8E4M3 [d, capacity] in 1×`tile` groups:
    /// expert e's rows of x, transposed, from column Σ_{e' < e} ⌈rows(e') / tile⌉·tile on (so
    /// that every expert starts a group and owns its groups), zero between the experts and
    /// past the last; `capacity` is [`expert_capacity`]. The rows x stands for may be computed
    /// as they are read ([`ExpertRows`]).
    QuantizeByExpert {
        experts: usize,
        tile: usize,
        #[serde(default)]
        rows: ExpertRows,
    },
    /// `GroupedWgrad` in FP8 on operands of `QuantizeByExpert`, (qg [n, capacity],
    /// qx [k, capacity], offsets) → [experts, n, k]: per expert, its columns of qg times the
    /// transpose of its columns of qx, partial sums promoted every `promote` tokens.
    ScaledGroupedWgrad {
        promote: usize,
    },
    /// The sum of two FP8 grouped products of the same rows' experts, (qx1, qw1, qx2, qw2,
    /// offsets) → [rows, n]: each pair as `GroupedMatMul { tb: true, fp8 }` on quantised
    /// operands computes it, the two products added (the experts' Dgrads of the gate and up
    /// projections, whose input is one): one GEMM whose second product is added to the first
    /// in its output, no sum of them stored apart.
    ConcatKScaledGroupedMatMul {
        fp8: Fp8Gemm,
    },
    /// Fused: two GEMMs sharing their second operand, (a1, a2, b) → the tuple (op(a1)·op(b),
    /// op(a2)·op(b)), as one GEMM over a1 and a2 concatenated along M (the Wgrads of GEMMs that
    /// share their input: [g1 | g2]ᵀ·x).
    ConcatRowsMatMul {
        ta: bool,
        tb: bool,
        fp8: Option<Fp8Gemm>,
    },
    /// Fused: the MoE dispatch and the FP8 quantisation of what it sends, (x [t, d], order) →
    /// F8E4M3 [t·k, d]: the rows of `Permute { k }` quantised in 1×`cols` tiles; `gated`,
    /// (x, order, gates [t·k]) → those of `UnpermuteGradRows { k }` (row i times
    /// gates[order[i]]: the combine's row gradients, as the experts' Dgrad reads them).
    PermuteQuantize {
        k: usize,
        cols: usize,
        #[serde(default)]
        gated: bool,
    },
    /// Fused: the sum of two GEMMs with the same recipe, (a1, b1, a2, b2) → op(a1)·op(b1) +
    /// op(a2)·op(b2): one GEMM over K concatenated ([a1 | a2]·[b1; b2], operands read in
    /// place) whose two segments' products are added in the epilogue, as the unfused sum adds
    /// them (the Dgrad of GEMMs that share their input).
    ConcatKMatMul {
        ta: bool,
        tb: bool,
        fp8: Option<Fp8Gemm>,
    },
    /// Fused: two grouped GEMMs of the same rows and offsets, (xs, w1, w2, offsets) → the tuple
    /// (`xs·w1[e]`, `xs·w2[e]`) per expert, as one grouped GEMM over the weights concatenated
    /// along N (the experts' gate and up projections).
    ConcatGroupedMatMul {
        tb: bool,
        fp8: Option<Fp8Gemm>,
    },
    /// Fused: two GEMMs sharing their first operand, (a, b1, b2) → the tuple
    /// (op(a)·op(b1), op(a)·op(b2)), as one GEMM over b1 and b2 concatenated along N (read in
    /// place, not copied): a is read (and, in FP8, quantised) once, one launch.
    ConcatMatMul {
        ta: bool,
        tb: bool,
        fp8: Option<Fp8Gemm>,
    },
    /// Calls another function of the module; the result is a tuple.
    Call(usize),
    /// Element of a tuple.
    Get(usize),
}

impl Op {
    /// Computed from the same element of each (broadcast) input.
    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            Op::Neg
                | Op::Exp
                | Op::Log
                | Op::Sigmoid
                | Op::Silu
                | Op::Rsqrt
                | Op::Sqrt
                | Op::Square
                | Op::Sign
                | Op::Add
                | Op::Sub
                | Op::Mul
                | Op::Div
                | Op::Maximum
                | Op::Cast(_)
                | Op::SwiGlu
        )
    }

    /// Works along the last axis row by row (a warp owns a row), or token by token (routing):
    /// a kernel of its own that loop fusion does not extend.
    pub fn works_along_rows(&self) -> bool {
        matches!(
            self,
            Op::Gather
                | Op::Permute { .. }
                | Op::UnpermuteGradRows { .. }
                | Op::RmsNorm { .. }
                | Op::Softmax
                | Op::MaskedSoftmax { .. }
                | Op::SoftmaxGrad
                | Op::CrossEntropy
                | Op::CrossEntropyGrad
                | Op::AddRmsNorm { .. }
                | Op::RmsNormGrad { .. }
                | Op::RmsNormQuantize { .. }
                | Op::SwiGluQuantize { .. }
                | Op::SwiGluGrad
                | Op::PermuteQuantize { .. }
                | Op::Route { .. }
        )
    }

    /// Exchanges counts or rows with the other members of an expert-parallel group (the
    /// backends run it on the host, through the group's transport).
    pub fn is_exchange(&self) -> bool {
        matches!(self, Op::ExchangeCounts { .. } | Op::ReceivedOffsets | Op::Dispatch { .. } | Op::Combine { .. })
    }

    /// Formed by fusion (`fuse`), never by the builder or autodiff.
    pub fn is_fused(&self) -> bool {
        matches!(
            self,
            Op::RmsNorm { .. }
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
                | Op::ConcatKScaledGroupedMatMul { .. }
        )
    }

    /// The name in the printed form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Arg(_) => "arg",
            Op::Const(_) => "const",
            Op::Table(_) => "table",
            Op::Neg => "neg",
            Op::Exp => "exp",
            Op::Log => "log",
            Op::Sigmoid => "sigmoid",
            Op::Silu => "silu",
            Op::Rsqrt => "rsqrt",
            Op::Sqrt => "sqrt",
            Op::Square => "square",
            Op::Sign => "sign",
            Op::Add => "add",
            Op::Sub => "sub",
            Op::Mul => "mul",
            Op::Div => "div",
            Op::Maximum => "maximum",
            Op::Cast(_) => "cast",
            Op::Sum { .. } => "sum",
            Op::Max { .. } => "max",
            Op::SumTo(_) => "sum_to",
            Op::BroadcastTo(_) => "broadcast_to",
            Op::Reshape(_) => "reshape",
            Op::Transpose(_) => "transpose",
            Op::Slice { .. } => "slice",
            Op::PadSlice { .. } => "pad_slice",
            Op::Concat { .. } => "concat",
            Op::MatMul { .. } => "matmul",
            Op::Gather => "gather",
            Op::ScatterRows { .. } => "scatter_rows",
            Op::TakeAlong => "take_along",
            Op::PutAlong { .. } => "put_along",
            Op::TopK { .. } => "top_k",
            Op::Count { .. } => "count",
            Op::SortByExpert { .. } => "sort_by_expert",
            Op::ExpertOffsets { .. } => "expert_offsets",
            Op::Permute { .. } => "permute",
            Op::PermuteGrad { .. } => "permute_grad",
            Op::GroupedMatMul { .. } => "grouped_matmul",
            Op::GroupedWgrad { .. } => "grouped_wgrad",
            Op::Unpermute { .. } => "unpermute",
            Op::InvertOrder => "invert_order",
            Op::UnpermuteGradRows { .. } => "unpermute_grad_rows",
            Op::UnpermuteGradGates { .. } => "unpermute_grad_gates",
            Op::ExchangeCounts { .. } => "exchange_counts",
            Op::ReceivedOffsets => "received_offsets",
            Op::Dispatch { .. } => "dispatch",
            Op::Combine { .. } => "combine",
            Op::StopGradient => "stop_gradient",
            Op::Attention { .. } => "attention",
            Op::AttentionGrad { .. } => "attention_grad",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::Softmax => "softmax",
            Op::SwiGlu => "swiglu",
            Op::AddRmsNorm { .. } => "add_rmsnorm",
            Op::RmsNormGrad { .. } => "rmsnorm_grad",
            Op::SoftmaxGrad => "softmax_grad",
            Op::CrossEntropy => "cross_entropy",
            Op::CrossEntropyGrad => "cross_entropy_grad",
            Op::SwiGluGrad => "swiglu_grad",
            Op::ConcatMatMul { .. } => "concat_matmul",
            Op::ConcatKMatMul { .. } => "concat_k_matmul",
            Op::ConcatRowsMatMul { .. } => "concat_rows_matmul",
            Op::PermuteQuantize { .. } => "permute_quantize",
            Op::ConcatGroupedMatMul { .. } => "concat_grouped_matmul",
            Op::MatMulAdd { .. } => "matmul_add",
            Op::MaskedSoftmax { .. } => "masked_softmax",
            Op::Route { .. } => "route",
            Op::RopeConcat => "rope_concat",
            Op::Quantize { .. } => "quantize",
            Op::ScaledMatMul { .. } => "scaled_matmul",
            Op::RmsNormQuantize { .. } => "rmsnorm_quantize",
            Op::SwiGluQuantize { .. } => "swiglu_quantize",
            Op::ConcatScaledMatMul { .. } => "concat_scaled_matmul",
            Op::ConcatKScaledMatMul { .. } => "concat_k_scaled_matmul",
            Op::QuantizeByExpert { .. } => "quantize_by_expert",
            Op::ScaledGroupedWgrad { .. } => "scaled_grouped_wgrad",
            Op::ConcatKScaledGroupedMatMul { .. } => "concat_k_scaled_grouped_matmul",
            Op::Call(_) => "call",
            Op::Get(_) => "get",
        }
    }
}

/// Columns of a `QuantizeByExpert` result for `rows` rows over `experts` experts: each
/// expert's rows rounded up to whole `tile`s fit (Σ ⌈rₑ/t⌉·t ≤ r + (t − 1)·experts, a multiple of t).
pub fn expert_capacity(rows: usize, experts: usize, tile: usize) -> usize {
    (rows + (tile - 1) * experts) / tile * tile
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub args: Vec<V>,
    pub shape: Shape,
    pub dtype: DType,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Function {
    pub name: String,
    /// Name, shape and dtype of each argument.
    pub args: Vec<(String, Shape, DType)>,
    pub nodes: Vec<Node>,
    pub outputs: Vec<V>,
    /// Names of the outputs (for printing and callers).
    pub output_names: Vec<String>,
}

impl Function {
    pub fn node(&self, v: V) -> &Node {
        &self.nodes[v.index()]
    }

    /// The `get` of part `i` of tuple `t` (a call's or a fused op's), if the function reads it.
    pub fn part(&self, t: V, i: usize) -> Option<V> {
        self.nodes.iter().position(|n| n.op == Op::Get(i) && n.args == [t]).map(|at| V(at as u32))
    }
}

/// A constant tensor, stored as the rule that generates it (a plan stays small, and a GPU
/// kernel can compute it from indices instead of reading it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Constant {
    pub name: String,
    pub shape: Shape,
    pub kind: ConstantKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConstantKind {
    /// [seq, seq]: 0 where the key is not after the query, −1e9 where it is.
    CausalMask,
    /// [seq, 2·pairs]: cos (or sin) of position × frequency, the pair frequencies repeated for
    /// the two halves, times `scale`.
    Rope { frequencies: Vec<f64>, scale: f64, sin: bool },
}

impl Constant {
    pub fn data(&self) -> Vec<f64> {
        match &self.kind {
            ConstantKind::CausalMask => {
                let seq = self.shape[0];
                (0..seq * seq).map(|i| if i % seq > i / seq { -1e9 } else { 0.0 }).collect()
            }
            ConstantKind::Rope { frequencies, scale, sin } => (0..self.shape[0])
                .flat_map(|pos| {
                    frequencies.iter().chain(frequencies).map(move |f| {
                        let angle = pos as f64 * f;
                        scale * if *sin { angle.sin() } else { angle.cos() }
                    })
                })
                .collect(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Module {
    pub functions: Vec<Function>,
    pub constants: Vec<Constant>,
}

impl Module {
    pub fn function(&self, name: &str) -> Option<usize> {
        self.functions.iter().position(|f| f.name == name)
    }

    /// Adds a function, returning its index.
    pub fn add(&mut self, f: Function) -> usize {
        self.functions.push(f);
        self.functions.len() - 1
    }

    pub fn add_constant(&mut self, name: impl Into<String>, shape: Shape, kind: ConstantKind) -> usize {
        self.constants.push(Constant { name: name.into(), shape, kind });
        self.constants.len() - 1
    }

    /// Appends `other`'s functions and constants, their calls and tables moved to the new
    /// indices. A constant equal to one here, or a function equal to one here but for its
    /// name (a layer body two modules share), is not added again: its uses go to the one
    /// here. The functions added are renamed `prefix.name`. Returns where each of `other`'s
    /// functions now is (a function calls only functions before it).
    pub fn absorb(&mut self, other: Module, prefix: &str) -> Vec<usize> {
        let tables: Vec<usize> = other
            .constants
            .into_iter()
            .map(|c| match self.constants.iter().position(|here| *here == c) {
                Some(here) => here,
                None => {
                    self.constants.push(c);
                    self.constants.len() - 1
                }
            })
            .collect();
        let mut at: Vec<usize> = Vec::with_capacity(other.functions.len());
        for mut f in other.functions {
            for node in &mut f.nodes {
                match &mut node.op {
                    Op::Call(callee) => *callee = at[*callee],
                    Op::Table(table) => *table = tables[*table],
                    _ => {}
                }
            }
            let same = |g: &Function| {
                (&g.args, &g.nodes, &g.outputs, &g.output_names) == (&f.args, &f.nodes, &f.outputs, &f.output_names)
            };
            let index = match self.functions.iter().position(same) {
                Some(here) => here,
                None => {
                    f.name = format!("{prefix}.{}", f.name);
                    self.add(f)
                }
            };
            at.push(index);
        }
        at
    }
}

/// The shape of op(a)·op(b) (batched over equal leading dimensions).
pub fn matmul_shape(sa: &[usize], sb: &[usize], ta: bool, tb: bool) -> Shape {
    let r = sa.len();
    assert!(r >= 2 && sb.len() == r && sa[..r - 2] == sb[..r - 2], "matmul {sa:?} × {sb:?}");
    let (m, ka) = if ta { (sa[r - 1], sa[r - 2]) } else { (sa[r - 2], sa[r - 1]) };
    let (kb, n) = if tb { (sb[r - 1], sb[r - 2]) } else { (sb[r - 2], sb[r - 1]) };
    assert_eq!(ka, kb, "matmul inner dimensions {sa:?} × {sb:?} (ta {ta}, tb {tb})");
    let mut shape = sa[..r - 2].to_vec();
    shape.extend([m, n]);
    shape
}

/// Appends nodes to a function, inferring shapes.
pub struct FunctionBuilder<'m> {
    pub module: &'m Module,
    f: Function,
}

/// Result shape of numpy-style broadcasting of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Shape {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
            let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
            assert!(da == db || da == 1 || db == 1, "cannot broadcast {a:?} with {b:?}");
            da.max(db)
        })
        .collect()
}

impl<'m> FunctionBuilder<'m> {
    pub fn new(module: &'m Module, name: impl Into<String>) -> Self {
        FunctionBuilder {
            module,
            f: Function { name: name.into(), args: vec![], nodes: vec![], outputs: vec![], output_names: vec![] },
        }
    }

    /// Goes on building `f` (its nodes, arguments and outputs kept).
    pub fn extend(module: &'m Module, f: Function) -> Self {
        FunctionBuilder { module, f }
    }

    pub fn shape(&self, v: V) -> &Shape {
        &self.f.nodes[v.index()].shape
    }

    pub fn dtype(&self, v: V) -> DType {
        self.f.nodes[v.index()].dtype
    }

    pub fn push(&mut self, op: Op, args: Vec<V>, shape: Shape, dtype: DType) -> V {
        self.f.nodes.push(Node { op, args, shape, dtype });
        V(self.f.nodes.len() as u32 - 1)
    }

    pub fn arg(&mut self, name: impl Into<String>, shape: Shape, dtype: DType) -> V {
        let index = self.f.args.len();
        self.f.args.push((name.into(), shape.clone(), dtype));
        self.push(Op::Arg(index), vec![], shape, dtype)
    }

    pub fn constant(&mut self, value: f64) -> V {
        self.push(Op::Const(value), vec![], vec![], DType::F32)
    }

    pub fn table(&mut self, index: usize) -> V {
        let shape = self.module.constants[index].shape.clone();
        self.push(Op::Table(index), vec![], shape, DType::F32)
    }

    /// A unary op that keeps the shape and dtype.
    pub fn unary(&mut self, op: Op, x: V) -> V {
        let (shape, dtype) = (self.shape(x).clone(), self.dtype(x));
        self.push(op, vec![x], shape, dtype)
    }

    pub fn binary(&mut self, op: Op, a: V, b: V) -> V {
        let shape = broadcast_shape(self.shape(a), self.shape(b));
        let dtype = if self.shape(a).is_empty() { self.dtype(b) } else { self.dtype(a) };
        self.push(op, vec![a, b], shape, dtype)
    }

    pub fn add(&mut self, a: V, b: V) -> V {
        self.binary(Op::Add, a, b)
    }
    pub fn sub(&mut self, a: V, b: V) -> V {
        self.binary(Op::Sub, a, b)
    }
    pub fn mul(&mut self, a: V, b: V) -> V {
        self.binary(Op::Mul, a, b)
    }
    pub fn div(&mut self, a: V, b: V) -> V {
        self.binary(Op::Div, a, b)
    }
    pub fn scale(&mut self, x: V, c: f64) -> V {
        let c = self.constant(c);
        self.mul(x, c)
    }

    pub fn cast(&mut self, x: V, to: DType) -> V {
        let shape = self.shape(x).clone();
        self.push(Op::Cast(to), vec![x], shape, to)
    }

    pub fn sum(&mut self, x: V, axis: usize, keep: bool) -> V {
        let shape = reduced(self.shape(x), axis, keep);
        let dtype = self.dtype(x);
        self.push(Op::Sum { axis, keep }, vec![x], shape, dtype)
    }

    pub fn max(&mut self, x: V, axis: usize, keep: bool) -> V {
        let shape = reduced(self.shape(x), axis, keep);
        let dtype = self.dtype(x);
        self.push(Op::Max { axis, keep }, vec![x], shape, dtype)
    }

    pub fn mean(&mut self, x: V, axis: usize, keep: bool) -> V {
        let n = self.shape(x)[axis] as f64;
        let s = self.sum(x, axis, keep);
        self.scale(s, 1.0 / n)
    }

    /// Sum of all elements, shape `[]`.
    pub fn sum_all(&mut self, x: V) -> V {
        let dtype = self.dtype(x);
        self.push(Op::SumTo(vec![]), vec![x], vec![], dtype)
    }

    pub fn sum_to(&mut self, x: V, shape: Shape) -> V {
        let dtype = self.dtype(x);
        self.push(Op::SumTo(shape.clone()), vec![x], shape, dtype)
    }

    pub fn broadcast_to(&mut self, x: V, shape: Shape) -> V {
        let dtype = self.dtype(x);
        self.push(Op::BroadcastTo(shape.clone()), vec![x], shape, dtype)
    }

    pub fn reshape(&mut self, x: V, shape: Shape) -> V {
        assert_eq!(self.shape(x).iter().product::<usize>(), shape.iter().product::<usize>(), "reshape size");
        let dtype = self.dtype(x);
        self.push(Op::Reshape(shape.clone()), vec![x], shape, dtype)
    }

    pub fn transpose(&mut self, x: V, perm: Vec<usize>) -> V {
        let shape = perm.iter().map(|&p| self.shape(x)[p]).collect();
        let dtype = self.dtype(x);
        self.push(Op::Transpose(perm), vec![x], shape, dtype)
    }

    pub fn slice(&mut self, x: V, axis: usize, start: usize, end: usize) -> V {
        let mut shape = self.shape(x).clone();
        assert!(start < end && end <= shape[axis], "slice {start}..{end} of {shape:?}");
        shape[axis] = end - start;
        let dtype = self.dtype(x);
        self.push(Op::Slice { axis, start, end }, vec![x], shape, dtype)
    }

    pub fn concat(&mut self, parts: Vec<V>, axis: usize) -> V {
        let mut shape = self.shape(parts[0]).clone();
        shape[axis] = parts.iter().map(|p| self.shape(*p)[axis]).sum();
        let dtype = self.dtype(parts[0]);
        self.push(Op::Concat { axis }, parts, shape, dtype)
    }

    pub fn matmul(&mut self, a: V, b: V, ta: bool, tb: bool, fp8: Option<Fp8Gemm>) -> V {
        let shape = matmul_shape(self.shape(a), self.shape(b), ta, tb);
        self.push(Op::MatMul { ta, tb, fp8 }, vec![a, b], shape, DType::F32)
    }

    /// A linear layer's operands x and w as its GEMMs in `precision` take them (rounded to
    /// BF16 for a BF16 GEMM), and the forward's FP8 recipe.
    pub fn gemm_operands(&mut self, x: V, w: V, precision: GemmPrecision) -> (V, V, Option<Fp8Gemm>) {
        match precision {
            GemmPrecision::F32 => (x, w, None),
            GemmPrecision::Bf16 => (self.cast(x, DType::Bf16), self.cast(w, DType::Bf16), None),
            GemmPrecision::Fp8(f) => (x, w, Some(f.fprop())),
        }
    }

    /// A linear layer in the HF convention: x [.., in] · Wᵀ with W [out, in].
    pub fn linear(&mut self, x: V, w: V, precision: GemmPrecision) -> V {
        let xs = self.shape(x).clone();
        let rows: usize = xs[..xs.len() - 1].iter().product();
        let flat = self.reshape(x, vec![rows, xs[xs.len() - 1]]);
        let (flat, w_operand, fp8) = self.gemm_operands(flat, w, precision);
        let y = self.matmul(flat, w_operand, false, true, fp8);
        let mut out = xs.clone();
        *out.last_mut().expect("rank ≥ 1") = self.shape(w)[0];
        self.reshape(y, out)
    }

    pub fn gather(&mut self, table: V, ids: V) -> V {
        let mut shape = self.shape(ids).clone();
        shape.push(self.shape(table)[1]);
        let dtype = self.dtype(table);
        self.push(Op::Gather, vec![table, ids], shape, dtype)
    }

    pub fn take_along(&mut self, x: V, idx: V) -> V {
        let shape = self.shape(idx).clone();
        let dtype = self.dtype(x);
        self.push(Op::TakeAlong, vec![x, idx], shape, dtype)
    }

    pub fn top_k(&mut self, x: V, k: usize) -> V {
        let mut shape = self.shape(x).clone();
        *shape.last_mut().expect("rank ≥ 1") = k;
        self.push(Op::TopK { k }, vec![x], shape, DType::I32)
    }

    pub fn stop_gradient(&mut self, x: V) -> V {
        self.unary(Op::StopGradient, x)
    }

    /// Causal attention of q, k [b, s, h, dqk] and v [b, s, h, dv] (`Op::Attention`): its
    /// output [b, s, h, dv] and the rows' log-sum-exp [b, h, s].
    pub fn attention(&mut self, q: V, k: V, v: V, scale: f64, bf16: bool) -> (V, V) {
        let qs = self.shape(q);
        assert_eq!(qs, self.shape(k), "attention's queries and keys");
        assert_eq!(qs[..3], self.shape(v)[..3], "attention's queries and values");
        let tuple = self.push(Op::Attention { scale, bf16 }, vec![q, k, v], vec![], DType::Tuple);
        (self.part(tuple, 0), self.part(tuple, 1))
    }

    /// Part `i` of tuple `t` (a call's result, or an op's with several results): its `get` node
    /// where the function has one, else a new one.
    pub fn part(&mut self, t: V, i: usize) -> V {
        if let Some(read) = self.f.part(t, i) {
            return read;
        }
        let node = self.f.node(t);
        let (shape, dtype) = match (&node.op, i) {
            (Op::Call(callee), _) => {
                let called = &self.module.functions[*callee];
                let output = called.node(called.outputs[i]);
                (output.shape.clone(), output.dtype)
            }
            (Op::Attention { .. }, 0) => (self.shape(node.args[2]).clone(), DType::F32),
            (Op::Attention { .. }, 1) => {
                let q = self.shape(node.args[0]);
                (vec![q[0], q[2], q[1]], DType::F32)
            }
            // dq, dk, dv: the shapes of q, k, v.
            (Op::AttentionGrad { .. }, 0..3) => (self.shape(node.args[i]).clone(), DType::F32),
            (op, _) => panic!("{} has no part {i}", op.name()),
        };
        self.push(Op::Get(i), vec![t], shape, dtype)
    }

    /// Calls `function` of the module and returns its outputs.
    pub fn call(&mut self, function: usize, args: Vec<V>) -> Vec<V> {
        let callee = &self.module.functions[function];
        assert_eq!(callee.args.len(), args.len(), "call of {} with {} arguments", callee.name, args.len());
        for (i, ((name, shape, _), a)) in callee.args.iter().zip(&args).enumerate() {
            assert_eq!(shape, self.shape(*a), "argument {i} ({name}) of {}", callee.name);
        }
        let outputs: Vec<(Shape, DType)> =
            callee.outputs.iter().map(|o| (callee.node(*o).shape.clone(), callee.node(*o).dtype)).collect();
        let call = self.push(Op::Call(function), args, vec![], DType::Tuple);
        outputs
            .into_iter()
            .enumerate()
            .map(|(i, (shape, dtype))| self.push(Op::Get(i), vec![call], shape, dtype))
            .collect()
    }

    pub fn output(&mut self, name: impl Into<String>, v: V) {
        self.f.outputs.push(v);
        self.f.output_names.push(name.into());
    }

    /// The function built so far.
    pub fn current(&self) -> &Function {
        &self.f
    }

    pub fn finish(self) -> Function {
        self.f
    }
}

fn reduced(shape: &[usize], axis: usize, keep: bool) -> Shape {
    let mut out = shape.to_vec();
    if keep {
        out[axis] = 1;
    } else {
        out.remove(axis);
    }
    out
}
