//! Device memory by lifetime: places a plan function's buffers (size, first and last node
//! that touch them) at offsets of one arena so that buffers alive at the same time never
//! overlap and the others reuse memory. Buffers are placed in the order they are written, each
//! at the lowest offset where it fits among the buffers still alive (first fit), at 256-byte
//! alignment. The arena's size (the peak) is reported against the sum of all buffers.
//! [`layouts`] places every function of a plan: an entry function (one no other function
//! calls) reads its arguments where its caller keeps them, so its arena holds none of them.
//! [`step_memory`] adds a training step's arenas up with the state the CUDA backend keeps.

use dsc_compiler::graph::ir::Op;
use dsc_compiler::plan::{Buffer, Plan};
use std::collections::HashMap;

/// Alignment of every buffer (cudaMalloc's, and enough for 16-byte vector accesses).
pub const ALIGN: u64 = 256;

/// Where each value lives in the arena.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub offsets: HashMap<u32, u64>,
    /// The arena's size: the most bytes alive at once, with the gaps first fit leaves.
    pub peak: u64,
    /// The sum of all buffers (what allocating each separately would take).
    pub total: u64,
}

/// Places `buffers` by lifetime.
pub fn plan(buffers: &[Buffer]) -> Layout {
    let mut order: Vec<&Buffer> = buffers.iter().collect();
    order.sort_by_key(|b| (b.first, b.value));
    // Alive: (offset, size, last), sorted by offset.
    let mut alive: Vec<(u64, u64, u32)> = Vec::new();
    let mut offsets = HashMap::new();
    let mut peak = 0;
    for b in order {
        // A buffer last read by node L is free for one first written after L.
        alive.retain(|&(_, _, last)| last >= b.first);
        let size = b.bytes.max(1).next_multiple_of(ALIGN);
        let mut at = 0;
        for &(offset, bytes, _) in &alive {
            if offset >= at + size {
                break;
            }
            at = at.max(offset + bytes);
        }
        let position = alive.partition_point(|&(offset, _, _)| offset < at);
        alive.insert(position, (at, size, b.last));
        offsets.insert(b.value, at);
        peak = peak.max(at + size);
    }
    let total = buffers.iter().map(|b| b.bytes.max(1).next_multiple_of(ALIGN)).sum();
    Layout { offsets, peak, total }
}

/// Whether each function of `compiled` is an entry: called by no other function.
pub fn entries(compiled: &Plan) -> Vec<bool> {
    let mut entry = vec![true; compiled.module.functions.len()];
    for node in compiled.module.functions.iter().flat_map(|f| &f.nodes) {
        if let Op::Call(callee) = node.op {
            entry[callee] = false;
        }
    }
    entry
}

/// The arena of every function of `compiled`, its arguments left out of an entry's.
pub fn layouts(compiled: &Plan) -> Vec<Layout> {
    let entries = entries(compiled);
    compiled
        .functions
        .iter()
        .zip(&compiled.module.functions)
        .zip(entries)
        .map(|((pf, function), entry)| {
            let held = |b: &&Buffer| !(entry && matches!(function.nodes[b.value as usize].op, Op::Arg(_)));
            plan(&pf.buffers.iter().filter(held).cloned().collect::<Vec<_>>())
        })
        .collect()
}

/// The GPU memory a training step of a plan takes on the CUDA backend, by what holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepMemory {
    /// The training state (`cuda::resident`), held throughout: every parameter and its
    /// gradient sum, and both Adam moments of the learned ones, in f32.
    pub state: u64,
    /// The arenas of the gradient function and of every function it calls, each kept for its
    /// next call (`cuda::exec`).
    pub gradients: u64,
    /// The optimizer's arena.
    pub optimizer: u64,
}

impl StepMemory {
    /// The least a step needs at once (CUDA's own context and cuBLAS's workspaces aside): the
    /// other arenas freed before the optimizer's and its own after it.
    pub fn peak(&self) -> u64 {
        self.state + self.gradients.max(self.optimizer)
    }

    /// What a step holds where the GPU has room for every arena, kept from step to step.
    pub fn kept(&self) -> u64 {
        self.state + self.gradients + self.optimizer
    }
}

/// What a training step of `plan` holds on the GPU (see [`StepMemory`]), its functions'
/// arenas at `layouts` ([`layouts`]).
pub fn step_memory(compiled: &Plan, layouts: &[Layout]) -> StepMemory {
    let state = compiled.params.iter().map(|p| 4 * p.numel() as u64 * if p.learned { 4 } else { 2 }).sum();
    let arena = |f: usize| layouts[f].peak;
    // The gradient function and the functions it calls, at any depth.
    let mut called = vec![compiled.grad];
    let mut next = 0;
    while next < called.len() {
        for node in &compiled.module.functions[called[next]].nodes {
            if let Op::Call(callee) = node.op {
                if !called.contains(&callee) {
                    called.push(callee);
                }
            }
        }
        next += 1;
    }
    StepMemory { state, gradients: called.into_iter().map(arena).sum(), optimizer: arena(compiled.optimizer) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn buffer(value: u32, bytes: u64, first: u32, last: u32) -> Buffer {
        Buffer { value, bytes, first, last }
    }

    #[test]
    fn entry_functions_keep_no_argument_in_their_arena() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
        let spec = dsc_lang::load(&path, &[]).checked_spec().expect("the tiny spec").clone();
        let compiled = dsc_compiler::plan::compile(&spec, dsc_compiler::fuse::Limits::default());
        let (entries, layouts) = (entries(&compiled), layouts(&compiled));
        let names: Vec<&str> =
            compiled.functions.iter().zip(&entries).filter(|(_, &e)| e).map(|(f, _)| f.name.as_str()).collect();
        assert_eq!(names, ["model", "model.grad", "adamw"]);
        for (f, function) in compiled.module.functions.iter().enumerate() {
            let args = compiled.functions[f]
                .buffers
                .iter()
                .filter(|b| matches!(function.nodes[b.value as usize].op, Op::Arg(_)));
            let held = args.filter(|b| layouts[f].offsets.contains_key(&b.value)).count();
            let all = plan(&compiled.functions[f].buffers);
            if entries[f] {
                assert_eq!(held, 0, "{}: an entry's arguments stay where they are", function.name);
                assert!(layouts[f].total < all.total, "{}", function.name);
            } else {
                assert_eq!(layouts[f], all, "{}: a called function's arena holds its arguments", function.name);
            }
        }
    }

    #[test]
    fn a_chain_reuses_memory() {
        // a → b → c → d, each read only by the next: two buffers alive at a time.
        let buffers: Vec<Buffer> = (0..4).map(|i| buffer(i, 1000, i, i + 1)).collect();
        let layout = plan(&buffers);
        assert_eq!(layout.total, 4 * 1024);
        assert_eq!(layout.peak, 2 * 1024);
    }

    proptest! {
        /// Buffers alive at the same node never overlap, and the peak is at most the sum.
        #[test]
        fn live_buffers_never_overlap(spans in prop::collection::vec((1u64..5000, 0u32..40, 0u32..10), 1..60)) {
            let buffers: Vec<Buffer> = spans
                .iter()
                .enumerate()
                .map(|(i, &(bytes, first, length))| buffer(i as u32, bytes, first, first + length))
                .collect();
            let layout = plan(&buffers);
            prop_assert!(layout.peak <= layout.total);
            for a in &buffers {
                for b in &buffers {
                    let together = a.value < b.value && a.first <= b.last && b.first <= a.last;
                    let (x, y) = (layout.offsets[&a.value], layout.offsets[&b.value]);
                    let apart = x + a.bytes <= y || y + b.bytes <= x;
                    prop_assert!(!together || apart, "{a:?} at {x} and {b:?} at {y} overlap");
                }
            }
        }
    }
}
