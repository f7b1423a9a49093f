//! The CPU backend's kernels other than elementwise arithmetic, grouped by what drives them.

pub mod attention;
pub mod grads;
pub mod index;
pub mod layout;
pub mod linalg;
pub mod rope;
pub mod rows;
