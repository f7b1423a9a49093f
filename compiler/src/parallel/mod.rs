//! The parallel plan: how the model and its training step are spread over the cluster. The
//! split of the model into pipeline stages ([`stages`]); the per-rank instruction lists of a
//! step under 1F1B, ZB1P or DualPipe ([`schedule`]), what each compute chunk runs ([`chunks`]:
//! the MoE all-to-alls among its layers) and the schedule checker ([`check`]); running
//! them against the clock ([`execute`]) with a cost model of the cluster ([`cost`]) to report
//! step time, bubble and memory ([`simulate`]), drawn as an SVG timeline ([`timeline`]).

pub mod check;
pub mod chunks;
pub mod cost;
pub mod execute;
pub mod schedule;
pub mod simulate;
pub mod stages;
pub mod timeline;

pub use stages::{split, Stage};
