//! The compiler's grouped FP8 GEMM (`compiler::mlir::gemm`, `Form::Grouped`) where a plan
//! carries it (`Plan::grouped_gemm`): the experts' FP8 products (Fprop and Dgrad) in one launch
//! per weight, each block finding its expert's rows from the row offsets on the device, so
//! that no grouped GEMM waits for the host (the cuBLASLt path reads the offsets back first:
//! `gemm::ReadBack`). Its operands are the plan's quantised buffers as they are.

use super::scaled::Fp8Operand;
use super::{Gpu, GpuError};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};
use dsc_compiler::mlir::gemm::{Tile, TILE_K};
use dsc_compiler::plan::Plan;
use std::path::Path;
use std::sync::Arc;

/// The loaded kernel and its tile.
pub struct GroupedGemm {
    function: CudaFunction,
    tile: Tile,
    _module: Arc<CudaModule>,
}

/// One launch: out [rows, n] (f32) = each expert's rows of `xs` [rows, k] times its weights'
/// (`weights` [experts, n, k], 128×128 blocks)ᵀ, the experts' row offsets (i32, experts + 1)
/// at `offsets` on the device.
pub struct GroupedProduct {
    pub xs: Fp8Operand,
    pub weights: Fp8Operand,
    pub out: u64,
    pub offsets: u64,
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    pub experts: usize,
}

impl GroupedGemm {
    /// The plan's grouped GEMM from `dir/kernels/NAME.ptx`, where the plan has one.
    pub fn load(gpu: &Gpu, plan: &Plan, dir: &Path) -> Result<Option<GroupedGemm>, GpuError> {
        let Some((name, tile)) = plan.grouped_gemm() else { return Ok(None) };
        let path = dir.join("kernels").join(format!("{name}.ptx"));
        let ptx = std::fs::read_to_string(&path).map_err(|e| GpuError::Ptx(path, e))?;
        let module = gpu.context.load_module(cudarc::nvrtc::Ptx::from_src(ptx))?;
        let function = module.load_function(name)?;
        let bytes = i32::try_from(tile.shared_bytes()).expect("a tile's shared memory fits an i32");
        function.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)?;
        Ok(Some(GroupedGemm { function, tile, _module: module }))
    }

    /// Whether products of this width and depth fit the kernel's tile.
    pub fn fits(&self, n: usize, k: usize) -> bool {
        n % self.tile.n as usize == 0 && k % TILE_K as usize == 0
    }

    pub fn run(&self, gpu: &Gpu, p: &GroupedProduct) -> Result<(), GpuError> {
        assert!(self.fits(p.n, p.k), "a product the tile does not fit");
        let narrow = |x: usize| u32::try_from(x).map_err(|_| GpuError::Unsupported(format!("{x} exceeds u32")));
        let (rows, n, k, experts) = (narrow(p.rows)?, narrow(p.n)?, narrow(p.k)?, narrow(p.experts)?);
        let blocks = narrow(p.rows.div_ceil(self.tile.m as usize) + p.experts)?;
        let config = LaunchConfig {
            grid_dim: (n / self.tile.n, blocks, 1),
            block_dim: (self.tile.threads(), 1, 1),
            shared_mem_bytes: self.tile.shared_bytes(),
        };
        let mut launch = gpu.stream.launch_builder(&self.function);
        launch.arg(&p.xs.data).arg(&p.weights.data).arg(&p.xs.scales).arg(&p.weights.scales).arg(&p.out);
        launch.arg(&rows).arg(&n).arg(&k).arg(&p.offsets).arg(&experts);
        // SAFETY: the arguments follow the kernel's signature (`gemm::fp8_gemm`, grouped: five
        // pointers, M, N, K, the offsets, E), each pointer the address of a live buffer of the
        // plan with the sizes given.
        unsafe { launch.launch(config) }?;
        Ok(())
    }
}
