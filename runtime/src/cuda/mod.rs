//! The CUDA backend's foundation, on cudarc (driver API, loaded at run time so that dsc builds
//! and its GPU tests skip on machines without CUDA): the device and its stream, a plan's PTX
//! modules loaded once, and the launch of a generated kernel on its buffers' addresses
//! ([`places`]: a call's arena placed by [`crate::memory`], a function's arguments
//! where its caller keeps them). A generated kernel takes each buffer as MLIR's memref descriptor
//! (allocated pointer, aligned pointer, offset, size, stride); `zeroed` kernels get their
//! outputs cleared first. The unsafe FFI stays inside cudarc; the one `unsafe` here is the
//! launch, whose argument list follows the kernel's signature in the plan.
//!
//! Library GEMMs run on cuBLAS, the FP8 ones on cuBLASLt's block-scaled path ([`gemm`],
//! [`scaled`]) or the compiler's generated GEMMs ([`generated`]); attention on the compiler's fused
//! kernels ([`attention`]); [`exec`] runs whole plan
//! functions (FP8 GEMMs in groups other than DeepSeek-V3's 128 on the host), [`resident`] keeps
//! the training state on the GPU ([`weights`]: its FP8 weights quantised once a step), [`nccl`]
//! joins data-parallel processes (step sums, ZeRO-1's collectives), [`stage`] runs a plan's
//! pipeline stages for the ranks of a parallel plan, and
//! [`graphs`] captures the training step's calls into CUDA graphs and replays them, and
//! [`profile`] times the kernels when asked.

pub mod attention;
pub mod exec;
pub mod gemm;
pub mod generated;
pub mod graphs;
pub mod nccl;
pub mod places;
pub mod profile;
pub mod resident;
pub mod scaled;
pub mod stage;
pub mod tensor_maps;
pub mod tune;
pub mod weights;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError, PushKernelArg};
use dsc_compiler::fuse::kernels::{Code, Kernel};
use dsc_compiler::graph::ir::{DType, Function};
use places::Places;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Why the GPU cannot be used.
#[derive(Debug)]
pub enum GpuError {
    /// No CUDA driver library on this machine.
    NoDriver,
    NoDevice,
    Driver(DriverError),
    /// A kernel's PTX could not be read.
    Ptx(PathBuf, std::io::Error),
    /// A kernel the GPU backend does not run yet, or a library call that failed.
    Unsupported(String),
    /// An error of a function's step (which kernel or call, in which function).
    At(String, Box<GpuError>),
    /// A file of the plan's directory that does not fit it (its tuning).
    Plan(String),
}

impl std::fmt::Display for GpuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuError::NoDriver => write!(f, "no CUDA driver (libcuda.so) on this machine"),
            GpuError::NoDevice => write!(f, "the CUDA driver sees no GPU"),
            GpuError::Driver(e) => write!(f, "CUDA driver: {e}"),
            GpuError::Unsupported(what) => write!(f, "not on the GPU: {what}"),
            GpuError::At(place, e) => write!(f, "{place}: {e}"),
            GpuError::Plan(why) => write!(f, "{why}"),
            GpuError::Ptx(path, e) => {
                write!(f, "cannot read `{}`: {e} (was the plan compiled with MLIR?)", path.display())
            }
        }
    }
}

impl std::error::Error for GpuError {}

impl From<DriverError> for GpuError {
    fn from(e: DriverError) -> Self {
        GpuError::Driver(e)
    }
}

/// A GPU and the stream everything of an executor runs on, in order: a stream of its own
/// (the legacy default stream cannot be captured into a CUDA graph), its buffers untracked by
/// cudarc's events (one stream needs none, and a captured call must record none).
pub struct Gpu {
    context: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// How many times data moved between the host and the device between kernels
    /// ([`places::read`], [`places::write`]): a call that moves none can be captured.
    transfers: AtomicU64,
}

impl Gpu {
    /// The first GPU.
    pub fn open() -> Result<Gpu, GpuError> {
        Gpu::open_on(0)
    }

    /// How many GPUs the driver sees (at least one).
    pub fn count() -> Result<usize, GpuError> {
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        match CudaContext::device_count()? {
            count if count < 1 => Err(GpuError::NoDevice),
            count => Ok(count as usize),
        }
    }

    /// The GPU with this ordinal (a process's `LOCAL_RANK` in a launched run).
    pub fn open_on(ordinal: usize) -> Result<Gpu, GpuError> {
        let count = Gpu::count()?;
        if ordinal >= count {
            return Err(GpuError::Unsupported(format!("GPU {ordinal}: the driver sees {count}")));
        }
        let context = CudaContext::new(ordinal)?;
        // SAFETY: every buffer of this context is used on the one stream made below, so no
        // event need order its uses.
        unsafe { context.disable_event_tracking() };
        let stream = context.new_stream()?;
        Ok(Gpu { context, stream, transfers: AtomicU64::new(0) })
    }

    /// How many times data has moved between the host and the device between kernels.
    pub fn transfers(&self) -> u64 {
        self.transfers.load(Ordering::Relaxed)
    }

    /// cuBLAS and cuBLASLt on this GPU's stream; with `tensor_cores`, cuBLAS's f32 products
    /// run on TF32 tensor cores (operands rounded to 10 mantissa bits, f32 accumulation).
    pub fn blas(&self, tensor_cores: bool) -> Result<gemm::Blas, GpuError> {
        let cublas = |e| GpuError::Unsupported(format!("cuBLAS: {e:?}"));
        let f32 = cudarc::cublas::CudaBlas::new(self.stream.clone()).map_err(cublas)?;
        if tensor_cores {
            let mode = cudarc::cublas::sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH;
            // SAFETY: the handle is live; the mode applies to its later calls.
            unsafe { cudarc::cublas::sys::cublasSetMathMode(*f32.handle(), mode) }.result().map_err(cublas)?;
        }
        Ok(gemm::Blas { f32, fp8: scaled::Lt::new(self)?, generated: Default::default() })
    }

    pub fn name(&self) -> Result<String, GpuError> {
        Ok(self.context.name()?)
    }

    /// Device memory not in use (what the default pool holds counts as used).
    pub fn free_bytes(&self) -> Result<u64, GpuError> {
        Ok(self.context.mem_get_info()?.0 as u64)
    }

    /// Waits for the stream, then hands the memory freed so far back to the device (buffers are
    /// freed in stream order into the default pool, which a large allocation cannot always
    /// reuse piecemeal).
    pub fn release_unused(&self) -> Result<(), GpuError> {
        use cudarc::driver::sys;
        self.stream.synchronize()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: the device ordinal is this context's; the pool handle is written by the call
        // and only passed back to the driver.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, self.context.cu_device()).result()?;
            sys::cuMemPoolTrimTo(pool, 0).result()?;
        }
        Ok(())
    }
}

/// Kernel `name` of the plan in `dir` (PTX in `dir/kernels/NAME.ptx`), loaded: its module
/// (kept alive with it) and function.
fn load_kernel(gpu: &Gpu, dir: &Path, name: &str) -> Result<(Arc<CudaModule>, CudaFunction), GpuError> {
    let path = dir.join("kernels").join(format!("{name}.ptx"));
    let ptx = std::fs::read_to_string(&path).map_err(|e| GpuError::Ptx(path, e))?;
    let module = gpu.context.load_module(cudarc::nvrtc::Ptx::from_src(ptx))?;
    let function = module.load_function(name)?;
    Ok((module, function))
}

/// A plan's generated kernels, each module loaded on first use.
pub struct Kernels {
    dir: PathBuf,
    loaded: HashMap<String, (Arc<CudaModule>, CudaFunction)>,
}

impl Kernels {
    /// The kernels of the plan in `dir` (PTX in `dir/kernels/NAME.ptx`).
    pub fn new(dir: &Path) -> Kernels {
        Kernels { dir: dir.to_path_buf(), loaded: HashMap::new() }
    }

    fn function(&mut self, gpu: &Gpu, name: &str) -> Result<&CudaFunction, GpuError> {
        if !self.loaded.contains_key(name) {
            let loaded = load_kernel(gpu, &self.dir, name)?;
            self.loaded.insert(name.to_string(), loaded);
        }
        Ok(&self.loaded[name].1)
    }

    /// Launches generated `kernel` (of `function`) on its buffers at `places`; `bytes(v)` is
    /// the size of value v's buffer.
    pub fn launch(
        &mut self,
        gpu: &Gpu,
        function: &Function,
        kernel: &Kernel,
        places: &Places,
        bytes: impl Fn(u32) -> usize,
    ) -> Result<(), GpuError> {
        let Code::Generated { grid, block, args, zeroed } = &kernel.code else {
            panic!("kernel {} is not generated", kernel.name)
        };
        if *zeroed {
            for &v in args.iter().filter(|v| !kernel.inputs.contains(v)) {
                places::zero(gpu, places.at(v), bytes(v))?;
            }
        }
        // The memref descriptor of every argument: base pointer twice, offset 0, size (in the
        // kernel's elements: bytes for FP8 buffers, the value's elements otherwise), stride 1.
        let elements = |v: u32| {
            let node = &function.nodes[v as usize];
            if node.dtype == DType::F8e4m3 {
                bytes(v)
            } else {
                node.shape.iter().product()
            }
        };
        let pointers: Vec<u64> = args.iter().map(|&v| places.at(v)).collect();
        let sizes: Vec<[i64; 3]> = args.iter().map(|&v| [0, elements(v) as i64, 1]).collect();
        let cuda_function = self.function(gpu, &kernel.name)?.clone();
        let mut launch = gpu.stream.launch_builder(&cuda_function);
        for (pointer, [offset, size, stride]) in pointers.iter().zip(&sizes) {
            launch.arg(pointer).arg(pointer).arg(offset).arg(size).arg(stride);
        }
        let config =
            cudarc::driver::LaunchConfig { grid_dim: (*grid, 1, 1), block_dim: (*block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments follow the kernel's signature (one memref descriptor per value
        // in `args`), each the address of a live buffer of the size the plan gives it.
        unsafe { launch.launch(config) }?;
        Ok(())
    }
}
