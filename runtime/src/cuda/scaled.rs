//! FP8 block-scaled GEMMs on cuBLASLt: D [m, n] (f32, row-major) = A·Bᵀ for A [m, k] and
//! B [n, k] quantised K-major in the plan's FP8 buffer layout (`compiler::mlir::fp8`: E4M3
//! bytes row-major, then from a 16-byte boundary one f32 scale per group, M-major for 1×128
//! tiles and row-major over 128×128 blocks), A in 1×128 activation tiles and B in 128×128 weight
//! blocks (Fprop, Dgrad) or 1×128 tiles (Wgrad), partial sums promoted to FP32 by cuBLASLt.
//!
//! Row-major D = A·Bᵀ is column-major Dᵀ [n, m] = B·Aᵀ, so cuBLASLt's first operand is our B
//! (transposed, `T`) and its second our A (`N`): the only FP8 layout it runs ("TN"). Its
//! 1D-block scales (`VEC128_32F`) are read M-major and its 2D-block scales (`BLK128x128_32F`)
//! K-blocks fastest, which is the plan's layout for both (found on the H100 with PyTorch's
//! `scaled_mm`, which hands its scales to cuBLASLt as they are: `benches/fp8_gemm.py`).

use super::{Gpu, GpuError};
use cudarc::cublaslt::{result, sys};
use cudarc::driver::CudaSlice;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// The workspace cuBLASLt asks for on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// The scaling groups of an FP8 GEMM operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Groups {
    /// 1 × 128 along K.
    Tiles,
    /// 128 × 128.
    Blocks,
}

impl Groups {
    fn mode(self) -> sys::cublasLtMatmulMatrixScale_t {
        match self {
            Groups::Tiles => sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
            Groups::Blocks => sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
        }
    }
}

/// An FP8 operand on the device: its K-major E4M3 rows, `ld` bytes apart, and its scales (for
/// 1×128 tiles M-major, for 128×128 blocks K-blocks fastest, rows padded to 4).
#[derive(Clone, Copy, Debug)]
pub struct Fp8Operand {
    pub data: u64,
    pub scales: u64,
    pub ld: usize,
}

impl Fp8Operand {
    /// A whole [rows, k] FP8 buffer of the plan (`compiler::mlir::fp8`): E4M3 bytes, then the
    /// scales from a 16-byte boundary.
    pub fn buffer(at: u64, rows: usize, k: usize) -> Fp8Operand {
        Fp8Operand { data: at, scales: at + (rows * k).next_multiple_of(16) as u64, ld: k }
    }
}

/// One FP8 GEMM: D [m, n] (f32, row-major, at `d`) = A [m, k] · B [n, k]ᵀ, plus what D held
/// where it `accumulate`s.
pub struct ScaledGemm {
    pub a: Fp8Operand,
    pub b: Fp8Operand,
    pub d: u64,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub b_groups: Groups,
    pub accumulate: bool,
}

/// What an algorithm is chosen for: (m rounded up to a power of two, n, k, a's and b's
/// leading dimensions, b's scale groups).
type Shape = (usize, usize, usize, usize, usize, Groups);

/// A cuBLASLt handle, its workspace, and the algorithm its heuristic chose for each GEMM
/// shape so far (asked once per shape).
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    algorithms: Mutex<HashMap<Shape, sys::cublasLtMatmulAlgo_t>>,
}

impl Lt {
    pub fn new(gpu: &Gpu) -> Result<Lt, GpuError> {
        let handle = result::create_handle().map_err(lt)?;
        let workspace = gpu.stream.alloc_zeros::<u8>(WORKSPACE_BYTES)?;
        Ok(Lt { handle, workspace, algorithms: Mutex::new(HashMap::new()) })
    }

    /// Whether cuBLASLt's block-scaled path takes a GEMM of these sizes: K whole 128-element
    /// groups, rows of 16 bytes, and M a multiple of 4 (with M = 1 it answers "not supported").
    pub fn takes(m: usize, n: usize, k: usize) -> bool {
        k.is_multiple_of(128) && m.is_multiple_of(4) && n.is_multiple_of(16) && m > 0 && n > 0
    }

    /// Runs `g` on `gpu`'s stream.
    pub fn run(&self, gpu: &Gpu, g: &ScaledGemm) -> Result<(), GpuError> {
        if !Lt::takes(g.m, g.n, g.k) {
            return Err(GpuError::Unsupported(format!("an FP8 GEMM of m {}, n {}, k {} on cuBLASLt", g.m, g.n, g.k)));
        }
        let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
        let desc = Desc(
            result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(lt)?,
        );
        use sys::cublasLtMatmulDescAttributes_t as A;
        // cuBLASLt's A is our B, its B our A.
        desc.set(A::CUBLASLT_MATMUL_DESC_TRANSA, &(cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32))?;
        desc.set(A::CUBLASLT_MATMUL_DESC_TRANSB, &(cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N as i32))?;
        desc.set(A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &(g.b_groups.mode() as u32))?;
        desc.set(A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &(Groups::Tiles.mode() as u32))?;
        desc.set(A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &(g.b.scales as *const c_void))?;
        desc.set(A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &(g.a.scales as *const c_void))?;
        let e4m3 = sys::cudaDataType_t::CUDA_R_8F_E4M3;
        let lt_a = Layout::new(e4m3, k, n, g.b.ld as i64)?;
        let lt_b = Layout::new(e4m3, k, m, g.a.ld as i64)?;
        let lt_d = Layout::new(sys::cudaDataType_t::CUDA_R_32F, n, m, n as i64)?;
        let pref = Pref(result::create_matmul_pref().map_err(lt)?);
        let bytes = WORKSPACE_BYTES as u64;
        // SAFETY: the preference is live; the attribute is a u64 as cuBLASLt documents.
        unsafe {
            result::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes) as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
            .map_err(lt)?;
        }
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0 });
        let (workspace, _sync) = cudarc::driver::DevicePtr::device_ptr(&self.workspace, &gpu.stream);
        // SAFETY: the descriptors are live until the end of this function; the operands, scales
        // and result lie in the caller's arena at the addresses given, sized by m, n and k as
        // the plan's buffers are; cuBLASLt runs on the arena's stream.
        unsafe {
            // The experts' M changes every step: one heuristic query per shape with M rounded
            // up to a power of two; an algorithm the call refuses is asked for again exactly.
            let shape = (g.m.next_power_of_two(), g.n, g.k, g.a.ld, g.b.ld, g.b_groups);
            let heuristic = || {
                let h = result::get_matmul_algo_heuristic(self.handle, desc.0, lt_a.0, lt_b.0, lt_d.0, lt_d.0, pref.0)
                    .map_err(lt)?;
                self.algorithms.lock().expect("algorithms").insert(shape, h.algo);
                Ok::<_, GpuError>(h.algo)
            };
            let run = |algorithm: &sys::cublasLtMatmulAlgo_t| {
                result::matmul(
                    self.handle,
                    desc.0,
                    (&alpha) as *const f32 as *const c_void,
                    (&beta) as *const f32 as *const c_void,
                    g.b.data as *const c_void,
                    lt_a.0,
                    g.a.data as *const c_void,
                    lt_b.0,
                    g.d as *const c_void,
                    lt_d.0,
                    g.d as *mut c_void,
                    lt_d.0,
                    algorithm,
                    workspace as *mut c_void,
                    WORKSPACE_BYTES,
                    gpu.stream.cu_stream() as sys::cudaStream_t,
                )
            };
            let cached = self.algorithms.lock().expect("algorithms").get(&shape).copied();
            match cached {
                Some(algorithm) if run(&algorithm).is_ok() => Ok(()),
                _ => run(&heuristic()?).map_err(lt),
            }
        }
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `Lt::new` and is destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

fn lt(e: cudarc::cublaslt::result::CublasError) -> GpuError {
    GpuError::Unsupported(format!("cuBLASLt: {e:?}"))
}

/// A matmul descriptor, destroyed on drop.
struct Desc(sys::cublasLtMatmulDesc_t);

impl Desc {
    fn set<T>(&self, attribute: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<(), GpuError> {
        // SAFETY: the descriptor is live; `value` is the attribute's type, of its size.
        unsafe {
            result::set_matmul_desc_attribute(
                self.0,
                attribute,
                value as *const T as *const c_void,
                std::mem::size_of::<T>(),
            )
        }
        .map_err(lt)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_desc`, destroyed once.
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}

/// A matrix layout, destroyed on drop.
struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    fn new(dtype: sys::cudaDataType_t, rows: u64, cols: u64, ld: i64) -> Result<Layout, GpuError> {
        Ok(Layout(result::create_matrix_layout(dtype, rows, cols, ld).map_err(lt)?))
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `create_matrix_layout`, destroyed once.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}

/// A matmul preference, destroyed on drop.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_pref`, destroyed once.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}
