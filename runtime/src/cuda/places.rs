//! Where a plan function's values live during one call, as device addresses: in the call's
//! arena at the memory plan's offsets ([`crate::memory`]), except the function's arguments,
//! which are read where the caller keeps them (the training state, the caller's buffers,
//! inputs uploaded for the call). Kernels, GEMMs and copies take their operands' addresses
//! from [`Places`]; the copies between addresses are here.

use super::{Gpu, GpuError};
use crate::memory::Layout;
use cudarc::driver::{result, CudaSlice, DevicePtr};
use std::collections::HashMap;

/// The device addresses of one call's values.
pub struct Places<'a> {
    arena: u64,
    layout: &'a Layout,
    /// Arguments read where the caller keeps them, by value.
    outside: Option<&'a HashMap<u32, u64>>,
}

impl<'a> Places<'a> {
    /// Every value in `arena`, at `layout`'s offsets.
    pub fn arena(gpu: &Gpu, arena: &CudaSlice<u8>, layout: &'a Layout) -> Places<'a> {
        let (at, _sync) = arena.device_ptr(&gpu.stream);
        Places { arena: at, layout, outside: None }
    }

    /// The values in `arena` at `layout`'s offsets, but those `outside` at its addresses.
    pub fn with_outside(
        gpu: &Gpu,
        arena: &CudaSlice<u8>,
        layout: &'a Layout,
        outside: &'a HashMap<u32, u64>,
    ) -> Places<'a> {
        Places { outside: Some(outside), ..Places::arena(gpu, arena, layout) }
    }

    /// The device address of value `v`'s buffer.
    pub fn at(&self, v: u32) -> u64 {
        match self.outside.and_then(|outside| outside.get(&v)) {
            Some(&at) => at,
            None => self.arena + self.layout.offsets.get(&v).unwrap_or_else(|| panic!("value {v} has no buffer")),
        }
    }
}

/// Copies `bytes` bytes from device address `from` to `to`, in stream order.
pub fn copy(gpu: &Gpu, from: u64, to: u64, bytes: usize) -> Result<(), GpuError> {
    // SAFETY: both ranges are buffers of live allocations (an arena, the state, an upload), of
    // at least `bytes` bytes; the copy is ordered on the stream that uses them.
    unsafe { result::memcpy_dtod_async(to, from, bytes, gpu.stream.cu_stream()) }?;
    Ok(())
}

/// Zeroes `bytes` bytes at device address `at`, in stream order.
pub fn zero(gpu: &Gpu, at: u64, bytes: usize) -> Result<(), GpuError> {
    fill(gpu, at, bytes, 0)
}

/// Sets `bytes` bytes at device address `at` to `byte`, in stream order.
pub fn fill(gpu: &Gpu, at: u64, bytes: usize, byte: u8) -> Result<(), GpuError> {
    // SAFETY: as for `copy`.
    unsafe { result::memset_d8_async(at, byte, bytes, gpu.stream.cu_stream()) }?;
    Ok(())
}

/// Sets `count` 4-byte words at device address `at` to `word` (an f32's bits), in stream order.
pub fn fill_words(gpu: &Gpu, at: u64, count: usize, word: u32) -> Result<(), GpuError> {
    // SAFETY: as for `copy`.
    unsafe { cudarc::driver::sys::cuMemsetD32Async(at, word, count, gpu.stream.cu_stream()) }.result()?;
    Ok(())
}

/// Writes host `bytes` at device address `at`, in stream order (the bytes are staged before
/// this returns).
pub fn write(gpu: &Gpu, bytes: &[u8], at: u64) -> Result<(), GpuError> {
    gpu.transfers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: as for `copy`; pageable host memory is copied out before the call returns.
    unsafe { result::memcpy_htod_async(at, bytes, gpu.stream.cu_stream()) }?;
    Ok(())
}

/// Reads `bytes` bytes at device address `at` back to the host, after the work before it.
pub fn read(gpu: &Gpu, at: u64, bytes: usize) -> Result<Vec<u8>, GpuError> {
    gpu.transfers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut host = vec![0u8; bytes];
    // SAFETY: as for `copy`; the stream is synchronised before the host reads `host`.
    unsafe { result::memcpy_dtoh_async(&mut host, at, gpu.stream.cu_stream()) }?;
    gpu.stream.synchronize()?;
    Ok(host)
}
