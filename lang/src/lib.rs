//! The dsc spec language: grammar, syntax tree with spans, decoding into the resolved
//! [`Spec`], semantic checks and diagnostics.

pub mod spec;

pub use spec::*;
