//! Values the CPU backend computes with: row-major tensors of reals or of indices, FP8
//! matrices (codes and scales, as the explicit quantise ops of a fused plan write them), and
//! the tuples that calls and fused ops with several results return. Tensors are shared (`Arc`) so that passing one to a call or
//! keeping it for an output costs no copy.

use super::numerics::Quantized;
use super::real::Real;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<E> {
    pub shape: Vec<usize>,
    pub data: Vec<E>,
}

impl<E: Clone> Tensor<E> {
    pub fn new(shape: Vec<usize>, data: Vec<E>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor of shape {shape:?}");
        Tensor { shape, data }
    }

    pub fn scalar(x: E) -> Self {
        Tensor { shape: vec![], data: vec![x] }
    }

    pub fn filled(shape: Vec<usize>, x: E) -> Self {
        let n = shape.iter().product();
        Tensor { shape, data: vec![x; n] }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value<T> {
    Real(Arc<Tensor<T>>),
    Int(Arc<Tensor<i32>>),
    Quantized(Arc<Quantized>),
    Tuple(Vec<Value<T>>),
}

impl<T: Real> Value<T> {
    pub fn real(t: Tensor<T>) -> Self {
        Value::Real(Arc::new(t))
    }

    pub fn int(t: Tensor<i32>) -> Self {
        Value::Int(Arc::new(t))
    }

    pub fn as_real(&self) -> &Tensor<T> {
        match self {
            Value::Real(t) => t,
            other => panic!("expected a real tensor, found {}", other.kind()),
        }
    }

    pub fn as_int(&self) -> &Tensor<i32> {
        match self {
            Value::Int(t) => t,
            other => panic!("expected an index tensor, found {}", other.kind()),
        }
    }

    pub fn as_quantized(&self) -> &Quantized {
        match self {
            Value::Quantized(q) => q,
            other => panic!("expected an FP8 matrix, found {}", other.kind()),
        }
    }

    /// A scalar's value.
    pub fn scalar(&self) -> T {
        let t = self.as_real();
        assert_eq!(t.numel(), 1, "expected a scalar, found shape {:?}", t.shape);
        t.data[0]
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::Real(_) => "a real tensor",
            Value::Int(_) => "an index tensor",
            Value::Quantized(_) => "an FP8 matrix",
            Value::Tuple(_) => "a tuple",
        }
    }
}
