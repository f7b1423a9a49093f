//! The rewrite rules of fusion, one list. Each turns a pattern of primitives, in the form the
//! model builder and autodiff emit it, into a fused op the backends implement as one kernel;
//! the comment states the identity. Conditions are small helper functions. Every rule is
//! proven by the property tests in `runtime/tests/fusion.rs` (random inputs, CPU backend,
//! before and after).

use super::lang::Fx;
use super::FusionAnalysis;
use egg::{rewrite as rw, Id, Rewrite, Subst, Var};

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
        // stop(stop(x)) = stop(x): stopping gradients twice is stopping them once.
        rw!("stop-stop"; "(stop (stop ?x))" => "(stop ?x)"),
        // (xᵀ)ᵀ = x for a swap of the last two axes.
        rw!("transpose-transpose"; "(transpose_last2 (transpose_last2 ?x))" => "?x"),
    ]
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
