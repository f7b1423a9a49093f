//! The element types the CPU backend computes in: `f32` (training) and `f64` (checks).

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// A real number type the CPU backend can run a graph in.
pub trait Real:
    Copy
    + Debug
    + Default
    + PartialEq
    + PartialOrd
    + Send
    + Sync
    + Sum
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn is_finite(self) -> bool;
    /// C = A·B + β·C on strided matrices (`matrixmultiply`'s GEMM; threads over both cores).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[Self],
        a_strides: [isize; 2],
        b: &[Self],
        b_strides: [isize; 2],
        beta: Self,
        c: &mut [Self],
        c_strides: [isize; 2],
    );
}

macro_rules! impl_real {
    ($t:ty, $gemm:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            fn gemm(
                m: usize,
                k: usize,
                n: usize,
                a: &[Self],
                sa: [isize; 2],
                b: &[Self],
                sb: [isize; 2],
                beta: Self,
                c: &mut [Self],
                sc: [isize; 2],
            ) {
                assert!(
                    m * k <= a.len().max(1) && k * n <= b.len().max(1) && m * n <= c.len().max(1),
                    "gemm operand sizes"
                );
                // SAFETY: the strides address elements inside the slices (asserted sizes, strides
                // of a dense row-major or transposed matrix), and `c` does not alias `a` or `b`.
                unsafe {
                    $gemm(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        sa[0],
                        sa[1],
                        b.as_ptr(),
                        sb[0],
                        sb[1],
                        beta,
                        c.as_mut_ptr(),
                        sc[0],
                        sc[1],
                    );
                }
            }
        }
    };
}

impl_real!(f32, matrixmultiply::sgemm);
impl_real!(f64, matrixmultiply::dgemm);
