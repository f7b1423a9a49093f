//! The FP8 copies of a step's weights. Every micro-batch's gradient function quantises the
//! parameters its FP8 GEMMs read (in 128×128 blocks, and transposed for Dgrad), though they do
//! not change until the optimizer runs: [`WeightCache`] keeps each such quantisation, of a
//! parameter of the training state, in a buffer of its own, so that the step's first
//! micro-batch writes it there and the others (and the backward's recomputed forward) read it
//! instead of quantising again. The executor marks them stale when the parameters change.
//!
//! A kernel qualifies when it is one `quantize` node whose operand is an argument of its
//! function that is, through the calls that passed it, an unchanged parameter of the training
//! state ([`origins`]).

use super::{Gpu, GpuError};
use cudarc::driver::{CudaSlice, DevicePtr};
use dsc_compiler::fuse::kernels::{base, Kernel};
use dsc_compiler::graph::ir::{Function, Node, Op};
use std::collections::HashMap;

/// A parameter's index and how it is quantised (the node's op and its result's shape).
pub type Key = (usize, String, Vec<usize>);

#[derive(Default)]
pub struct WeightCache {
    entries: HashMap<Key, Entry>,
}

struct Entry {
    buffer: CudaSlice<u8>,
    /// Whether it holds the quantisation of the parameters as they are now.
    fresh: bool,
}

/// What the cache does for a kernel: the node whose value it keeps, where it keeps it, and
/// whether that value is already there (the kernel need not run).
pub struct Slot {
    pub node: u32,
    pub at: u64,
    pub fresh: bool,
}

impl WeightCache {
    /// Marks every kept quantisation out of date (the parameters changed).
    pub fn stale(&mut self) {
        self.entries.values_mut().for_each(|entry| entry.fresh = false);
    }

    /// Where `kernel` of `function` (whose arguments are the parameters `origins` says, where
    /// they are) keeps its result, if it quantises a parameter; the buffer is made at the first
    /// call (`bytes` long) and counts as fresh from this call on.
    pub fn slot(
        &mut self,
        gpu: &Gpu,
        function: &Function,
        kernel: &Kernel,
        origins: &[Option<usize>],
        bytes: impl Fn(u32) -> usize,
    ) -> Result<Option<Slot>, GpuError> {
        let Some((node, key)) = quantises_a_parameter(function, kernel, origins) else { return Ok(None) };
        let entry = match self.entries.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(Entry { buffer: gpu.stream.alloc_zeros(bytes(node))?, fresh: false })
            }
        };
        let (at, _sync) = entry.buffer.device_ptr(&gpu.stream);
        let fresh = std::mem::replace(&mut entry.fresh, true);
        Ok(Some(Slot { node, at, fresh }))
    }
}

/// The node of `kernel` (of `function`, whose arguments are the parameters `origins` says)
/// and what it makes, if it quantises a parameter: a kernel of one `quantize` node whose
/// operand is such an argument.
pub fn quantises_a_parameter(function: &Function, kernel: &Kernel, origins: &[Option<usize>]) -> Option<(u32, Key)> {
    let [node] = kernel.nodes[..] else { return None };
    let quantize: &Node = &function.nodes[node as usize];
    if !matches!(quantize.op, Op::Quantize { .. }) {
        return None;
    }
    let Op::Arg(a) = function.node(quantize.args[0]).op else { return None };
    let param = origins.get(a).copied().flatten()?;
    Some((node, (param, format!("{:?}", quantize.op), quantize.shape.clone())))
}

/// The parameters a call's arguments are: for each argument of the function called at `node`
/// of `caller`, the parameter its value is where the caller's own argument is one
/// (`caller_origins`).
pub fn origins(caller: &Function, node: &Node, caller_origins: &[Option<usize>]) -> Vec<Option<usize>> {
    node.args
        .iter()
        .map(|&a| match caller.node(base(caller, a)).op {
            Op::Arg(x) => caller_origins.get(x).copied().flatten(),
            _ => None,
        })
        .collect()
}
