//! The FP8 copies of a step's weights. Every micro-batch's gradient function quantises the
//! parameters its FP8 GEMMs read (in 128×128 blocks, and transposed for Dgrad), though they do
//! not change until the optimizer runs: [`WeightCache`] keeps each such quantisation, of a
//! parameter of the training state, in a buffer of its own, so that the step's first
//! micro-batch writes it there and the others read it
//! instead of quantising again. The executor marks them stale when the parameters change.
//!
//! A kernel qualifies when it is one `quantize` node whose operand is an argument of its
//! function that is, through the calls that passed it, an unchanged parameter of the training
//! state ([`crate::memory::quantises_a_parameter`], [`crate::memory::weight_origins`]).

use super::{Gpu, GpuError};
use crate::memory::{quantises_a_parameter, WeightKey};
use cudarc::driver::{CudaSlice, DevicePtr};
use dsc_compiler::fuse::kernels::Kernel;
use dsc_compiler::graph::ir::Function;
use std::collections::HashMap;

#[derive(Default)]
pub struct WeightCache {
    entries: HashMap<WeightKey, Entry>,
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

    /// The quantisations that hold the parameters as they are now.
    pub fn fresh(&self) -> Vec<WeightKey> {
        self.entries.iter().filter(|(_, entry)| entry.fresh).map(|(key, _)| key.clone()).collect()
    }

    /// Marks `keys` as holding the parameters as they are now (a CUDA graph wrote them).
    pub fn refresh(&mut self, keys: &[WeightKey]) {
        for key in keys {
            if let Some(entry) = self.entries.get_mut(key) {
                entry.fresh = true;
            }
        }
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
