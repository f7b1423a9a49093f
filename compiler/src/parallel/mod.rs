//! The parallel plan: how the model and its training step are spread over the cluster. For now
//! only the split of the model into pipeline stages ([`stages`]).

pub mod stages;

pub use stages::{split, Stage};
