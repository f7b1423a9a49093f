//! TMA tensor maps for the generated kernels' launches, encoded once per buffer and shape and
//! kept on the device: the FP8 GEMMs' operands and outputs (`generated`) and the fused
//! attention's BF16 inputs (`attention`).

use super::{Gpu, GpuError};
use cudarc::driver::sys;
use cudarc::driver::{CudaSlice, DevicePtr};
use dsc_compiler::mlir::attention::MAP_BOX;
use dsc_compiler::mlir::gemm::{TensorMap, STORE_COLUMNS, TILE_K, TILE_M};
use std::collections::HashMap;
use std::sync::Mutex;

/// Tensor maps on the device by what they encode: the plan's buffers keep their places from
/// call to call, so each is encoded and uploaded once, and a map found here is right for
/// whatever buffer now lies at its address.
#[derive(Default)]
pub struct TensorMaps(Mutex<HashMap<Encoded, CudaSlice<u8>>>);

/// What a tensor map encodes: the tensor's address, rows and columns, and what it is of.
type Encoded = (u64, usize, usize, Mapped);

/// What a tensor map is of: an E4M3 operand read in its [`TensorMap`]'s boxes (128 bytes of
/// K × its rows); C of the dense and Wgrad forms, f32, in `layers` (the Wgrad's experts; 1) of
/// [rows, columns], written in boxes of `gemm::STORE_COLUMNS` × `gemm::TILE_M` of a layer; or
/// the attention's packed BF16 Q, K or V or copy of dO ([B·S, H·D]) in boxes of `attention::MAP_BOX`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mapped {
    Operand(TensorMap),
    Output(usize),
    Heads,
}

impl TensorMaps {
    /// The device address of the map of the row-major [rows, columns] tensor (or [layers,
    /// rows, columns]) at `data` (`mapped` says of what).
    pub fn at(&self, gpu: &Gpu, data: u64, rows: usize, columns: usize, mapped: Mapped) -> Result<u64, GpuError> {
        use sys::CUtensorMapDataType::{
            CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 as BF16, CU_TENSOR_MAP_DATA_TYPE_FLOAT32 as F32,
            CU_TENSOR_MAP_DATA_TYPE_UINT8 as U8,
        };
        let mut maps = self.0.lock().expect("no launch panicked holding the tensor maps");
        let key = (data, rows, columns, mapped);
        if let std::collections::hash_map::Entry::Vacant(slot) = maps.entry(key) {
            let mut encoded = sys::CUtensorMap { opaque: [0; 16] };
            let (kind, rank, bytes, layers, boxes) = match mapped {
                Mapped::Operand(map) => (U8, 2, 1, 1, [TILE_K, map.rows, 1]),
                Mapped::Output(layers) => (F32, 3, 4, layers, [STORE_COLUMNS, TILE_M, 1]),
                Mapped::Heads => (BF16, 2, 2, 1, [MAP_BOX[0], MAP_BOX[1], 1]),
            };
            let dims = [columns, rows, layers].map(|d| d as u64);
            let strides = [columns * bytes, rows * columns * bytes].map(|s| s as u64);
            let steps = [1u32; 3];
            // SAFETY: `encoded` is a CUtensorMap (64-byte aligned by its type) and every array
            // has at least the rank's length (strides one less); the driver only writes `encoded`.
            unsafe {
                sys::cuTensorMapEncodeTiled(
                    &mut encoded,
                    kind,
                    rank,
                    data as *mut std::ffi::c_void,
                    dims.as_ptr(),
                    strides.as_ptr(),
                    boxes.as_ptr(),
                    steps.as_ptr(),
                    sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                    sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                    sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                    sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
                )
            }
            .result()?;
            let bytes: Vec<u8> = encoded.opaque.iter().flat_map(|w| w.to_le_bytes()).collect();
            slot.insert(gpu.stream.clone_htod(&bytes)?);
        }
        let (at, _sync) = maps[&key].device_ptr(&gpu.stream);
        Ok(at)
    }
}
