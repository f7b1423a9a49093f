//! The e-graph language of fusion: the primitives the rules look at, the fused ops they
//! produce, leaves (arguments and constants) and `Opaque` for every other op of a function,
//! which fusion carries through unchanged. An `Opaque` symbol names the original node
//! (`#17`), whose op, shape and dtype [`super::encode`] keeps in a side table.

use egg::{define_language, Id, Symbol};

define_language! {
    pub enum Fx {
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "mul" = Mul([Id; 2]),
        "div" = Div([Id; 2]),
        "exp" = Exp(Id),
        "square" = Square(Id),
        "rsqrt" = Rsqrt(Id),
        "silu" = Silu(Id),
        "stop" = Stop(Id),
        // Reductions over the last axis, keeping it (as the model builder emits them).
        "sum_last" = SumLast(Id),
        "max_last" = MaxLast(Id),
        "transpose_last2" = TransposeLast2(Id),
        // Fused ops.
        "rmsnorm" = RmsNorm([Id; 3]),
        "softmax" = Softmax(Id),
        "swiglu" = SwiGlu([Id; 2]),
        // A scalar constant, by its value's bits.
        Const(ConstBits),
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
