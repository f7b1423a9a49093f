//! The rewrite rules of fusion, one list. Each turns a pattern of primitives, in the form the
//! model builder and autodiff emit it, into a fused op the backends implement as one kernel;
//! the comment states the identity. Conditions are small helper functions. Every rule is
//! proven by the property tests in `runtime/tests/fusion.rs` (random inputs, CPU backend,
//! before and after).

use super::analysis::attr;
use super::lang::Fx;
use super::{attr_op, FusionAnalysis};
use crate::graph::ir::{matmul_shape, DType, Op};
use egg::{rewrite as rw, Applier, Id, MultiPattern, PatternAst, Rewrite, SearchMatches, Subst, Symbol, Var};

type EGraph = egg::EGraph<Fx, FusionAnalysis>;

pub fn rules() -> Vec<Rewrite<Fx, FusionAnalysis>> {
    vec![
        // x · rsqrt(Σ_last(x²) · (1/n) + ε) · w  =  rmsnorm(x, w, ε), when the constant is 1/n
        // for n = the last dimension of x.
        rw!("rmsnorm"; "(mul (mul ?x (rsqrt (add (mul (sum_last (square ?x)) ?inv_n) ?eps))) ?w)"
            => "(rmsnorm ?x ?w ?eps)" if is_inverse_of_last_dim("?inv_n", "?x")),
        // exp(x − stop(max_last x)) / Σ_last exp(x − stop(max_last x))  =  softmax(x)
        rw!("softmax"; "(div (exp (sub ?x (stop (max_last ?x)))) (sum_last (exp (sub ?x (stop (max_last ?x))))))"
            => "(softmax ?x)"),
        // silu(a) · b  =  swiglu(a, b)
        rw!("swiglu"; "(mul (silu ?a) ?b)" => "(swiglu ?a ?b)"),
        // s = a + b; n = rmsnorm(s, w)  ⇒  (s, n) = add_rmsnorm(a, b, w): one pass reads a, b
        // and w and writes both, the sum for the residual stream and the norm for the block.
        multi(
            "add-rmsnorm",
            "?n = (rmsnorm ?s ?w ?eps), ?s = (add ?a ?b)",
            "?t = (add_rmsnorm ?a ?b ?w ?eps), ?s = (get0 ?t), ?n = (get1 ?t)",
        ),
        // op(x)·op(w1) and op(x)·op(w2) with the same transposes and recipe  =  the two halves
        // along N of op(x)·op([w1 | w2]): one GEMM reads (and quantises) x once (MLA's q_a and
        // kv_a; an MLP's gate and up). In FP8 when w1's N is a whole number of weight blocks,
        // so every scaling group stays what it was.
        multi_if(
            "concat-gemms",
            "?y1 = (matmul ?attr ?x ?w1), ?y2 = (matmul ?attr ?x ?w2)",
            "?t = (concat_matmul ?attr ?x ?w1 ?w2), ?y1 = (get0 ?t), ?y2 = (get1 ?t)",
            Box::new(concatenable("?attr", "?w1", "?w2")),
        ),
        // The same on operands already quantised (FP8 made explicit, below): their groups are
        // fixed, so any N will do.
        multi_if(
            "concat-scaled-gemms",
            "?y1 = (scaled_matmul ?attr ?x ?w1), ?y2 = (scaled_matmul ?attr ?x ?w2)",
            "?t = (concat_matmul ?attr ?x ?w1 ?w2), ?y1 = (get0 ?t), ?y2 = (get1 ?t)",
            Box::new(concatenable("?attr", "?w1", "?w2")),
        ),
        // The experts' gate and up projections: two grouped GEMMs of the same rows, offsets and
        // recipe are one over [w1 | w2] along N, on the same conditions.
        multi_if(
            "concat-grouped-gemms",
            "?y1 = (grouped_matmul ?attr ?xs ?w1 ?offsets), ?y2 = (grouped_matmul ?attr ?xs ?w2 ?offsets)",
            "?t = (concat_grouped_matmul ?attr ?xs ?w1 ?w2 ?offsets), ?y1 = (get0 ?t), ?y2 = (get1 ?t)",
            Box::new(concatenable("?attr", "?w1", "?w2")),
        ),
        // Their backward twins: the Wgrads op(g1)·op(x) and op(g2)·op(x) share x, and are the
        // two halves along M of op([g1 | g2])·op(x) (in FP8 when g1's M is a whole number of
        // the activation tiles' rows, so every group stays what it was);
        multi_if(
            "concat-rows-gemms",
            "?y1 = (matmul ?attr ?a1 ?b), ?y2 = (matmul ?attr ?a2 ?b)",
            "?t = (concat_rows_matmul ?attr ?a1 ?a2 ?b), ?y1 = (get0 ?t), ?y2 = (get1 ?t)",
            Box::new(stackable("?attr", "?a1", "?a2")),
        ),
        // and the Dgrad sum op(a1)·op(b1) + op(a2)·op(b2) of GEMMs with one
        // recipe is one GEMM over K concatenated, its two products added in the epilogue.
        rw!("concat-k-gemms"; "(add (matmul ?attr ?a1 ?b1) (matmul ?attr ?a2 ?b2))"
            => "(concat_k_matmul ?attr ?a1 ?b1 ?a2 ?b2)" if equal_products("?attr", ["?a1", "?b1", "?a2", "?b2"])),
        rw!("concat-k-gemms-reshaped"; "(add (reshape ?r (matmul ?attr ?a1 ?b1)) (reshape ?r (matmul ?attr ?a2 ?b2)))"
            => "(reshape ?r (concat_k_matmul ?attr ?a1 ?b1 ?a2 ?b2))" if equal_products("?attr", ["?a1", "?b1", "?a2", "?b2"])),
        // FP8 made explicit: an FP8 GEMM op(a)·op(b) quantises each operand as used (a
        // transposed one, as Wgrad's, transposed while quantising) in its tiling and multiplies
        // the codes; that is scaled_matmul(quantize(a), quantize(b)), bit for bit. Alone it
        // costs two more launches; it pays where a producer quantises what it writes:
        rw!("fp8-gemm-explicit"; "(matmul ?attr ?a ?b)" => { ExplicitFp8::new("?attr", "?a", "?b") }),
        // quantize(rmsnorm(x, w)) seen as [tokens, n] in 1×c tiles, a tile within a row  =
        // rmsnorm_quantize(x, w): the norm's kernel writes FP8 codes and scales.
        rw!("rmsnorm-quantize"; "(quantize ?q (reshape ?r (rmsnorm ?x ?w ?eps)))"
            => "(rmsnorm_quantize ?q ?x ?w ?eps)" if quantises_rows_of("?q", "?r", "?x")),
        // quantize(swiglu(a, b)) likewise  =  swiglu_quantize(a, b).
        rw!("swiglu-quantize"; "(quantize ?q (reshape ?r (swiglu ?a ?b)))"
            => "(swiglu_quantize ?q ?a ?b)" if quantises_rows_of("?q", "?r", "?a")),
        // The same on rows already two-dimensional (the experts' rows, quantised for the
        // down projection).
        rw!("swiglu-quantize-rows"; "(quantize ?q (swiglu ?a ?b))"
            => "(swiglu_quantize ?q ?a ?b)" if quantises_rows("?q")),
        // The experts' FP8 GEMMs likewise take their rows quantised (one-row tiles, so each
        // expert's rows are whole groups)...
        rw!("grouped-fp8-explicit"; "(grouped_matmul ?attr ?xs ?w ?offsets)" => { QuantizedRows::new("?attr", "?xs", "?w", "?offsets") }),
        // ...and quantize(permute(x)) = permute_quantize(x): rows are quantised on their own,
        // so the dispatch can quantise as it copies (and send FP8).
        rw!("permute-quantize"; "(quantize ?q (permute ?p ?x ?order))"
            => "(permute_quantize ?q ?p ?x ?order)" if quantises_rows("?q")),
        // Backward twins: the VJPs autodiff emits for the primitives of RMSNorm, softmax and
        // SwiGLU, recognised as one fused op each.
        //
        // RMSNorm, y = x·r·w with r = (Σx²/n + ε)^(−½) per row and dy = g:
        //   dw = Σ_rows g·x·r
        //   dx = (g·w)·r + 2x · (1/n) · (−½ r/(Σx²/n + ε)) · Σ_row (g·w)·x
        // emitted as the direct term plus the term through r, each added to x's adjoint (`acc`)
        // when x has other readers (the fused op then adds it, in the same order).
        multi_if(
            "rmsnorm-grad",
            &format!("{RMSNORM_VJP}, ?dx = (add ?direct ?through_r)"),
            "?t = (rmsnorm_grad ?x ?w ?g ?eps), ?dx = (get0 ?t), ?dw = (get1 ?t)",
            Box::new(is_inverse_of_last_dim("?inv_n", "?x")),
        ),
        multi_if(
            "rmsnorm-grad-accumulated",
            &format!("{RMSNORM_VJP}, ?dx = (add (add ?acc ?direct) ?through_r)"),
            "?t = (rmsnorm_grad_acc ?x ?w ?g ?acc ?eps), ?dx = (get0 ?t), ?dw = (get1 ?t)",
            Box::new(is_inverse_of_last_dim("?inv_n", "?x")),
        ),
        // Softmax, y = e/z with e = exp(x − max), z = Σ_last e (recomputed from x):
        //   dx = (g/z − Σ_last (g/z)·y)·e = y·(g − Σ_last g·y)
        multi(
            "softmax-grad",
            "?e = (exp (sub ?x (stop (max_last ?x)))), ?z = (sum_last ?e), ?y = (div ?e ?z),
             ?dx = (mul (add (div ?g ?z) (broadcast_to ?to (sum_to ?from (neg (mul (div ?g ?z) ?y))))) ?e)",
            "?dx = (softmax_grad ?x ?g)",
        ),
        // The loss: with m = stop(max_last x), s = x − m, e = eˢ and z = Σ_last e, each row's
        // cross-entropy log z − s[label] is one pass over the logits (the max, z and the
        // label's logit found together), which also writes m and z; its VJP for a row
        // cotangent g,
        //   dx = (g/z)·e + put_along(label, −g) = (g/z)·e − g·onehot(label),
        // is then one more pass: two over the logits instead of the eight the primitives take
        // (three if the backward recomputed m and z), and no [rows, n] value kept between the
        // forward and the backward. Where the forward is not in the function, m and z are
        // computed from their primitives.
        multi(
            "cross-entropy",
            "?m = (stop (max_last ?x)), ?s = (sub ?x ?m), ?z = (sum_last (exp ?s)),
             ?nll = (sub (log ?z) (take_along ?s ?labels))",
            "?t = (cross_entropy ?x ?labels), ?nll = (get0 ?t), ?m = (get1 ?t), ?z = (get2 ?t)",
        ),
        multi(
            "cross-entropy-grad",
            "?m = (stop (max_last ?x)), ?e = (exp (sub ?x ?m)), ?z = (sum_last ?e),
             ?dx = (add (put_along ?n ?labels (neg ?g)) (mul (broadcast_to ?to (div ?g ?z)) ?e))",
            "?dx = (cross_entropy_grad ?x ?labels ?g ?m ?z)",
        ),
        // SwiGLU, y = silu(a)·b with σ = sigmoid(a):
        //   db = g·silu(a),  da = (g·b)·σ·(1 + a·(1 − σ))
        multi(
            "swiglu-grad",
            "?db = (mul ?g (silu ?a)),
             ?da = (mul (mul ?g ?b) (mul (sigmoid ?a) (add 1 (mul ?a (sub 1 (sigmoid ?a))))))",
            "?t = (swiglu_grad ?a ?b ?g), ?da = (get0 ?t), ?db = (get1 ?t)",
        ),
        // GEMM epilogues: c + op(a)·op(b) (read in c's shape) is one GEMM that adds c as it
        // stores: the residual adds of the forward, and the backward's adjoints accumulating
        // Dgrad products.
        rw!("gemm-residual-add"; "(add ?c (matmul ?attr ?a ?b))"
            => "(matmul_add ?attr ?a ?b ?c)" if same_shape("?c", "?a", "?b", "?attr")),
        rw!("gemm-residual-add-reshaped"; "(add ?c (reshape ?r (matmul ?attr ?a ?b)))"
            => "(matmul_add ?attr ?a ?b ?c)" if reshapes_to_shape_of("?r", "?c")),
        // softmax(s·scale + mask) with a scalar scale (attention's 1/√d, times YaRN's mscale²)
        // = masked_softmax(s, mask): the scaling and the mask join the softmax's one pass.
        rw!("softmax-scale-mask"; "(softmax (add (mul ?s ?scale) ?mask))"
            => "(masked_softmax ?scale ?s ?mask)" if is_scalar_constant("?scale") if broadcasts_into("?mask", "?s")),
        // Routing as the model builder emits it (biased scores, group scores from the two best
        // of each group, the kept groups as a mask, dropped experts sunk by 1e30, top-k; the
        // gates as the chosen unbiased scores normalised and scaled)  =  route(scores, bias).
        multi_if(
            "route",
            &format!(
                "{ROUTING}, ?gates = (mul (div (take_along ?s ?chosen) (sum_last (take_along ?s ?chosen))) ?scale)"
            ),
            "?t = (route ?k ?keep ?grouping ?s ?bias ?scale), ?chosen = (get0 ?t), ?gates = (get1 ?t)",
            Box::new(takes_top_two("?two")),
        ),
        // RoPE as `model::rope` emits it (interleaved pairs de-interleaved by reshape,
        // transpose, reshape; x·cos + [−x_hi, x_lo]·sin) and the concatenation of a head's
        // parts  =  rope_concat(nope, pe, cos, sin): one pass writes the whole head; the key's
        // RoPE part, shared by the heads, is broadcast in it.
        multi_if(
            "rope-concat",
            &format!("{ROPE}, ?head = (concat ?cat ?nope ?rope)"),
            "?head = (rope_concat ?nope ?pe ?cos ?sin)",
            Box::new(is_rope_layout()),
        ),
        multi_if(
            "rope-concat-broadcast",
            &format!("{ROPE}, ?head = (concat ?cat ?nope (broadcast_to ?spread ?rope))"),
            "?head = (rope_concat ?nope ?pe ?cos ?sin)",
            Box::new(is_rope_layout()),
        ),
        // op(xᵀ) = op'(x): a transposed operand of a GEMM is its transpose flag flipped (also
        // in FP8, which quantises the operand as used either way).
        rw!("transpose-into-gemm-a"; "(matmul ?attr (transpose_last2 ?a) ?b)" => { FoldTranspose::new("?attr", "?a", "?b", false) }),
        rw!("transpose-into-gemm-b"; "(matmul ?attr ?a (transpose_last2 ?b))" => { FoldTranspose::new("?attr", "?a", "?b", true) }),
        // (The MoE's weighted combine needs no rule: `unpermute` already is the gather of each
        // token's expert rows times their gates, summed, in one kernel.)
        // reshape(reshape(x)) = reshape(x); a reshape to the shape x has is x.
        rw!("reshape-reshape"; "(reshape ?s2 (reshape ?s1 ?x))" => "(reshape ?s2 ?x)"),
        rw!("reshape-identity"; "(reshape ?s ?x)" => "?x" if reshapes_to_shape_of("?s", "?x")),
        // stop(stop(x)) = stop(x): stopping gradients twice is stopping them once.
        rw!("stop-stop"; "(stop (stop ?x))" => "(stop ?x)"),
        // (xᵀ)ᵀ = x for a swap of the last two axes.
        rw!("transpose-transpose"; "(transpose_last2 (transpose_last2 ?x))" => "?x"),
        // The combine's VJP reads the expert order back from its inverse.
        rw!("invert-invert"; "(invert_order (invert_order ?x))" => "?x"),
    ]
}

/// RoPE on the interleaved pairs of `pe`, as `model::rope` emits it.
const ROPE: &str = "?x = (reshape ?interleaved (transpose_last2 (reshape ?pairs ?pe))),
    ?rope = (add (mul ?x ?cos) (mul (concat ?halves (neg (slice ?hi ?x)) (slice ?lo ?x)) ?sin))";

/// Group-limited top-k on biased scores, as `model::route` emits it.
const ROUTING: &str = "?biased = (stop (add ?s ?bias)), ?grouped = (reshape ?grouping ?biased),
    ?group_scores = (sum_axis ?sum (take_along ?grouped (top_k ?two ?grouped))),
    ?mask = (reshape ?flat (broadcast_to ?spread (reshape ?per_group
        (put_along ?n (top_k ?keep ?group_scores) (broadcast_to ?ones 1))))),
    ?chosen = (top_k ?k (sub ?biased (mul (sub 1 ?mask) 1e30)))";

/// RMSNorm's forward (r = rsqrt(var)) and the VJP terms autodiff emits for it (see the rule).
const RMSNORM_VJP: &str = "?var = (add (mul (sum_last (square ?x)) ?inv_n) ?eps), ?r = (rsqrt ?var),
    ?gw = (mul ?g ?w), ?direct = (mul ?gw ?r),
    ?through_r = (mul (broadcast_to ?to (mul (mul (sum_to ?from (mul ?gw ?x)) (mul (div ?r ?var) -0.5)) ?inv_n))
                      (mul ?x 2)),
    ?dw = (sum_to ?rows (mul ?g (mul ?x ?r)))";

/// Two GEMMs with attribute `attr` and second operands `w1` and `w2` can run as one over
/// [w1 | w2]: the weights differ (and are taken in one order), and in FP8 w1 ends on a
/// weight-block boundary along N.
fn concatenable(attr: &str, w1: &str, w2: &str) -> impl Fn(&mut EGraph, Id, &Subst) -> bool {
    let [attr, w1, w2]: [Var; 3] = [attr, w1, w2].map(|v| v.parse().expect("variable"));
    move |egraph, _, subst| {
        let (w1, w2) = (egraph.find(subst[w1]), egraph.find(subst[w2]));
        if w1 >= w2 {
            return false;
        }
        match attr_op(egraph, subst[attr]) {
            Op::MatMul { tb, fp8, .. } | Op::GroupedMatMul { tb, fp8 } => {
                let shape = egraph[w1].data.shape.as_ref().expect("shaped");
                let n = shape[shape.len() - if tb { 2 } else { 1 }];
                fp8.is_none_or(|f| n % f.b.outer == 0)
            }
            // Already quantised: the groups are what they are.
            _ => true,
        }
    }
}

/// `q` quantises in per-row tiles (1 × c, not transposed) the matrix that reshape `r` makes of
/// `x` keeping its last axis: each tile lies within a row of x.
fn quantises_rows_of(q: &str, r: &str, x: &str) -> impl Fn(&mut EGraph, Id, &Subst) -> bool {
    let [q, r, x]: [Var; 3] = [q, r, x].map(|v| v.parse().expect("variable"));
    move |egraph, _, subst| {
        let Op::Quantize { rows: 1, transpose: false, .. } = attr_op(egraph, subst[q]) else { return false };
        let Op::Reshape(to) = attr_op(egraph, subst[r]) else { return false };
        let last = egraph[subst[x]].data.shape.as_ref().and_then(|s| s.last().copied());
        to.len() == 2 && to.last().copied() == last
    }
}

/// Two GEMMs with attribute `attr` and first operands `a1` and `a2` can run as one over
/// [a1 | a2] along M: the operands differ (and are taken in one order), and in FP8 a1's M
/// is a whole number of the activation groups' rows.
fn stackable(attr: &str, a1: &str, a2: &str) -> impl Fn(&mut EGraph, Id, &Subst) -> bool {
    let [attr, a1, a2]: [Var; 3] = [attr, a1, a2].map(|v| v.parse().expect("variable"));
    move |egraph, _, subst| {
        let (a1, a2) = (egraph.find(subst[a1]), egraph.find(subst[a2]));
        let Op::MatMul { ta, fp8, .. } = attr_op(egraph, subst[attr]) else { return false };
        let shape = egraph[a1].data.shape.as_ref().expect("shaped");
        let m = shape[shape.len() - if ta { 1 } else { 2 }];
        a1 < a2 && fp8.is_none_or(|f| m % f.a.outer == 0)
    }
}

/// `q` quantises in one-row tiles, not transposed.
fn quantises_rows(q: &str) -> impl Fn(&mut EGraph, Id, &Subst) -> bool {
    let q: Var = q.parse().expect("variable");
    move |egraph, _, subst| matches!(attr_op(egraph, subst[q]), Op::Quantize { rows: 1, transpose: false, .. })
}

/// A grouped FP8 GEMM on its rows quantised in the GEMM's one-row activation tiles.
struct QuantizedRows {
    vars: [Var; 4],
}

impl QuantizedRows {
    fn new(attr: &str, xs: &str, w: &str, offsets: &str) -> Self {
        QuantizedRows { vars: [attr, xs, w, offsets].map(|v| v.parse().expect("variable")) }
    }
}

impl Applier<Fx, FusionAnalysis> for QuantizedRows {
    fn apply_one(
        &self,
        egraph: &mut EGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<Fx>>,
        _: Symbol,
    ) -> Vec<Id> {
        let [attr_var, xs, w, offsets] = self.vars.map(|v| subst[v]);
        let Op::GroupedMatMul { fp8: Some(f), .. } = attr_op(egraph, attr_var) else { return vec![] };
        if f.a.outer != 1 || egraph[xs].data.dtype == DType::F8e4m3 {
            return vec![];
        }
        let op = attr(egraph, &Op::Quantize { rows: 1, cols: f.a.k, transpose: false });
        let rows = egraph.add(Fx::Quantize([op, xs]));
        let product = egraph.add(Fx::GroupedMatMul([attr_var, rows, w, offsets]));
        if egraph.union(eclass, product) {
            vec![product]
        } else {
            vec![]
        }
    }
}

/// The GEMM with the transpose of its first (or second) operand folded into its flag.
struct FoldTranspose {
    attr: Var,
    a: Var,
    b: Var,
    second: bool,
}

impl FoldTranspose {
    fn new(attr: &str, a: &str, b: &str, second: bool) -> Self {
        let [attr, a, b] = [attr, a, b].map(|v| v.parse().expect("variable"));
        FoldTranspose { attr, a, b, second }
    }
}

impl Applier<Fx, FusionAnalysis> for FoldTranspose {
    fn apply_one(
        &self,
        egraph: &mut EGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<Fx>>,
        _: Symbol,
    ) -> Vec<Id> {
        let Op::MatMul { ta, tb, fp8 } = attr_op(egraph, subst[self.attr]) else { return vec![] };
        let (ta, tb) = if self.second { (ta, !tb) } else { (!ta, tb) };
        let op = attr(egraph, &Op::MatMul { ta, tb, fp8 });
        let product = egraph.add(Fx::MatMul([op, subst[self.a], subst[self.b]]));
        if egraph.union(eclass, product) {
            vec![product]
        } else {
            vec![]
        }
    }
}

/// Rewrites an FP8 GEMM of matrices into quantised operands and a scaled GEMM.
struct ExplicitFp8 {
    attr: Var,
    a: Var,
    b: Var,
}

impl ExplicitFp8 {
    fn new(attr: &str, a: &str, b: &str) -> Self {
        let [attr, a, b] = [attr, a, b].map(|v| v.parse().expect("variable"));
        ExplicitFp8 { attr, a, b }
    }
}

impl Applier<Fx, FusionAnalysis> for ExplicitFp8 {
    fn apply_one(
        &self,
        egraph: &mut EGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<Fx>>,
        _: Symbol,
    ) -> Vec<Id> {
        let Op::MatMul { ta, tb, fp8: Some(f) } = attr_op(egraph, subst[self.attr]) else { return vec![] };
        let rank = egraph[subst[self.a]].data.shape.as_ref().map_or(0, Vec::len);
        if rank != 2 {
            return vec![];
        }
        let mut quantize = |operand: Id, rows: usize, cols: usize, transpose: bool| {
            let op = attr(egraph, &Op::Quantize { rows, cols, transpose });
            egraph.add(Fx::Quantize([op, operand]))
        };
        let qa = quantize(subst[self.a], f.a.outer, f.a.k, ta);
        // Both operands K-major, as FP8 tensor cores (and cuBLASLt) read them: b as op(b)ᵀ.
        let qb = quantize(subst[self.b], f.b.outer, f.b.k, !tb);
        let op = attr(egraph, &Op::ScaledMatMul { promote: f.promote });
        let product = egraph.add(Fx::ScaledMatMul([op, qa, qb]));
        if egraph.union(eclass, product) {
            vec![product]
        } else {
            vec![]
        }
    }
}

/// The product op(a)·op(b) with attribute `attr` has the shape of `c`.
fn same_shape(c: &str, a: &str, b: &str, attr: &str) -> impl Fn(&mut EGraph, Id, &Subst) -> bool {
    let [c, a, b, attr]: [Var; 4] = [c, a, b, attr].map(|v| v.parse().expect("variable"));
    move |egraph, _, subst| {
        let Op::MatMul { ta, tb, .. } = attr_op(egraph, subst[attr]) else { return false };
        let shape = |v: Var| egraph[subst[v]].data.shape.clone().expect("shaped");
        matmul_shape(&shape(a), &shape(b), ta, tb) == shape(c)
    }
}

/// The two products op(a1)·op(b1) and op(a2)·op(b2) with attribute `attr` have one shape.
fn equal_products(attr: &str, operands: [&str; 4]) -> impl Fn(&mut EGraph, Id, &Subst) -> bool {
    let attr: Var = attr.parse().expect("variable");
    let [a1, b1, a2, b2]: [Var; 4] = operands.map(|v| v.parse().expect("variable"));
    move |egraph, _, subst| {
        let Op::MatMul { ta, tb, .. } = attr_op(egraph, subst[attr]) else { return false };
        let shape = |v: Var| egraph[subst[v]].data.shape.clone().expect("shaped");
        matmul_shape(&shape(a1), &shape(b1), ta, tb) == matmul_shape(&shape(a2), &shape(b2), ta, tb)
    }
}

/// Reshape `r` makes the shape `x` has.
fn reshapes_to_shape_of(r: &str, x: &str) -> impl Fn(&mut EGraph, Id, &Subst) -> bool {
    let [r, x]: [Var; 2] = [r, x].map(|v| v.parse().expect("variable"));
    move |egraph, _, subst| {
        let Op::Reshape(to) = attr_op(egraph, subst[r]) else { return false };
        egraph[subst[x]].data.shape.as_ref() == Some(&to)
    }
}

/// The RoPE pattern's attributes are those of `model::rope` on pe's last axis (r values):
/// pairs [.., r/2, 2] back to pe's shape, halves [r/2, r) and [0, r/2), concatenations along
/// the last axis.
fn is_rope_layout() -> impl Fn(&mut EGraph, Id, &Subst) -> bool {
    let var = |v: &str| -> Var { v.parse().expect("variable") };
    let [pe, pairs, interleaved, hi, lo, halves, cat] =
        ["?pe", "?pairs", "?interleaved", "?hi", "?lo", "?halves", "?cat"].map(var);
    move |egraph, _, subst| {
        let Some(shape) = egraph[subst[pe]].data.shape.clone() else { return false };
        let (last, r) = (shape.len() - 1, shape[shape.len() - 1]);
        let half = r / 2;
        let mut paired = shape[..last].to_vec();
        paired.extend([half, 2]);
        let op = |v: Var| attr_op(egraph, subst[v]);
        let concat_last = |op: Op, rank: usize| matches!(op, Op::Concat { axis } if axis + 1 == rank);
        op(pairs) == Op::Reshape(paired)
            && op(interleaved) == Op::Reshape(shape.clone())
            && op(hi) == Op::Slice { axis: last, start: half, end: r }
            && op(lo) == Op::Slice { axis: last, start: 0, end: half }
            && concat_last(op(halves), shape.len())
            && concat_last(op(cat), shape.len())
    }
}

/// `top` is a top-2 (a group's score is the sum of its two best).
fn takes_top_two(top: &str) -> impl Fn(&mut EGraph, Id, &Subst) -> bool {
    let top: Var = top.parse().expect("variable");
    move |egraph, _, subst| attr_op(egraph, subst[top]) == Op::TopK { k: 2 }
}

/// `c` is a scalar constant.
fn is_scalar_constant(c: &str) -> impl Fn(&mut EGraph, Id, &Subst) -> bool {
    let c: Var = c.parse().expect("variable");
    move |egraph, _, subst| egraph[subst[c]].nodes.iter().any(|n| matches!(n, Fx::Const(_)))
}

/// `mask` broadcasts into the shape of `x` (the sum has x's shape).
fn broadcasts_into(mask: &str, x: &str) -> impl Fn(&mut EGraph, Id, &Subst) -> bool {
    let [mask, x]: [Var; 2] = [mask, x].map(|v| v.parse().expect("variable"));
    move |egraph, _, subst| {
        let (Some(m), Some(s)) = (&egraph[subst[mask]].data.shape, &egraph[subst[x]].data.shape) else { return false };
        m.len() <= s.len() && m.iter().rev().zip(s.iter().rev()).all(|(a, b)| a == b || *a == 1)
    }
}

/// `inv_n` is the constant 1/n with n the last dimension of `x`.
fn is_inverse_of_last_dim(inv_n: &str, x: &str) -> impl Fn(&mut EGraph, Id, &Subst) -> bool {
    let (inv_n, x): (Var, Var) = (inv_n.parse().expect("variable"), x.parse().expect("variable"));
    move |egraph, _, subst| {
        let Some(n) = egraph[subst[x]].data.shape.as_ref().and_then(|s| s.last().copied()) else { return false };
        egraph[subst[inv_n]].nodes.iter().any(|node| match node {
            Fx::Const(c) => (c.value() - 1.0 / n as f64).abs() <= 1e-12 / n as f64,
            _ => false,
        })
    }
}

/// A condition on a match.
type Condition = Box<dyn Fn(&mut EGraph, Id, &Subst) -> bool + Send + Sync>;

/// A rewrite of several classes at once: the left side binds each `?class = (pattern)`, the
/// right side adds each pattern and merges it into the class its variable names. The left
/// side is searched in order, a pattern whose class is not yet bound by scanning every class:
/// the most selective pattern goes first.
fn multi(name: &str, lhs: &str, rhs: &str) -> Rewrite<Fx, FusionAnalysis> {
    multi_if(name, lhs, rhs, Box::new(|_, _, _| true))
}

/// `multi` where `condition` holds.
fn multi_if(name: &str, lhs: &str, rhs: &str, condition: Condition) -> Rewrite<Fx, FusionAnalysis> {
    let parse = |s: &str| s.parse::<MultiPattern<Fx>>().unwrap_or_else(|e| panic!("rule {name}: {e}"));
    Rewrite::new(name, parse(lhs), Changes { rhs: parse(rhs), condition })
        .unwrap_or_else(|e| panic!("rule {name}: {e}"))
}

/// Applies a multi-pattern where its condition holds and reports only what changed: egg's
/// multi-pattern applier reports every match, even one that adds nothing new, which would
/// keep the runner from ever seeing saturation.
struct Changes {
    rhs: MultiPattern<Fx>,
    condition: Condition,
}

impl Applier<Fx, FusionAnalysis> for Changes {
    fn apply_one(
        &self,
        egraph: &mut EGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<Fx>>,
        rule: Symbol,
    ) -> Vec<Id> {
        if !(self.condition)(egraph, eclass, subst) {
            return vec![];
        }
        let before = (egraph.total_size(), egraph.number_of_classes());
        let matches = SearchMatches { eclass, substs: vec![subst.clone()], ast: None };
        let ids = self.rhs.apply_matches(egraph, &[matches], rule);
        if (egraph.total_size(), egraph.number_of_classes()) == before {
            vec![]
        } else {
            ids
        }
    }

    fn vars(&self) -> Vec<Var> {
        Applier::<Fx, FusionAnalysis>::vars(&self.rhs)
    }
}
