//! The compiler's FP8 GEMMs (`compiler::mlir::gemm`) where a plan carries them
//! (`Plan::generated_gemms`; each of the plan's GEMM kernels on the tile its tuning chose,
//! `dsc_compiler::plan::tuning`): the MoE experts' FP8 products (Fprop and Dgrad, form
//! `Grouped`) in one launch per weight, and their weight gradients (`Wgrad`) in one launch,
//! each block finding its expert's rows or tokens from the row offsets on the device, so that
//! no grouped GEMM waits for the host (the cuBLASLt path reads the offsets back first:
//! `gemm::ReadBack`); and dense Fprop and Dgrad products (`Dense`) where the tuning chose a
//! tile over cuBLASLt. Their operands are the plan's quantised buffers as they are, A and B
//! read through TMA tensor maps (`gemm::TensorMap`) encoded here once per buffer and shape.

use super::scaled::Fp8Operand;
use super::tensor_maps::{Mapped, TensorMaps};
use super::{Gpu, GpuError};
use cudarc::driver::sys::{self, CUfunction_attribute_enum};
use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};
use dsc_compiler::mlir::gemm::{Form, Tile, MAX_EXPERTS, TILE_K};
use dsc_compiler::plan::tuning::{Tuning, LIBRARY};
use dsc_compiler::plan::Plan;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A loaded kernel, its tile and form, the most blocks a launch needs (one per multiprocessor:
/// each block loops over its tiles), and the tensor maps its launches have passed.
pub struct GeneratedGemm {
    function: CudaFunction,
    tile: Tile,
    form: Form,
    multiprocessors: usize,
    maps: TensorMaps,
    _module: Arc<CudaModule>,
}

/// The plan's generated GEMMs: the candidates it carries ([`Plan::generated_gemms`]) loaded
/// so far, by name, and what each of its GEMM kernels runs: the choice of its tuning
/// ([`Tuning`]), else the experts' forms their first candidate and the dense form cuBLASLt
/// ([`GeneratedGemms::for_kernel`]).
#[derive(Default)]
pub struct GeneratedGemms {
    dir: PathBuf,
    multiprocessors: usize,
    carried: Vec<(String, Tile, Form)>,
    loaded: HashMap<String, GeneratedGemm>,
    /// The candidate (a name) or cuBLASLt (`None`) each tuned kernel of the plan runs.
    chosen: HashMap<String, Option<String>>,
}

impl GeneratedGemms {
    /// The plan's generated GEMMs (`dir/kernels/NAME.ptx`), as `dir/tuning.json` chose them.
    pub fn load(gpu: &Gpu, plan: &Plan, dir: &Path) -> Result<GeneratedGemms, GpuError> {
        let mut gemms = GeneratedGemms::untuned(gpu, plan, dir)?;
        let tuning = Tuning::read(dir).map_err(|e| GpuError::Plan(e.to_string()))?;
        if let Some(tuning) = tuning {
            for gemm in &tuning.gemms {
                let candidate = (gemm.chosen != LIBRARY).then_some(gemm.chosen.as_str());
                gemms.choose(gpu, &gemm.kernel, candidate).map_err(|e| match e {
                    GpuError::Plan(why) => GpuError::Plan(format!(
                        "{}/tuning.json: {why}: run `dsc tune {}` again",
                        dir.display(),
                        dir.display()
                    )),
                    e => e,
                })?;
            }
        }
        Ok(gemms)
    }

    /// The plan's generated GEMMs, untuned ([`GeneratedGemms::for_kernel`]).
    pub fn untuned(gpu: &Gpu, plan: &Plan, dir: &Path) -> Result<GeneratedGemms, GpuError> {
        let multiprocessors =
            gpu.context.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let carried = plan.generated_gemms();
        let mut gemms = GeneratedGemms {
            dir: dir.to_path_buf(),
            multiprocessors,
            carried,
            loaded: HashMap::new(),
            chosen: HashMap::new(),
        };
        let firsts: Vec<String> =
            [Form::Grouped, Form::Wgrad].iter().filter_map(|&f| gemms.first(f)).map(str::to_string).collect();
        for name in firsts {
            gemms.load_one(gpu, &name)?;
        }
        Ok(gemms)
    }

    /// The names of the candidates of `form` the plan carries.
    pub fn candidates(&self, form: Form) -> Vec<String> {
        self.carried.iter().filter(|(_, _, f)| *f == form).map(|(name, _, _)| name.clone()).collect()
    }

    /// The first candidate of `form` (what an untuned kernel of the experts' forms runs).
    fn first(&self, form: Form) -> Option<&str> {
        self.carried.iter().find(|(_, _, f)| *f == form).map(|(name, _, _)| name.as_str())
    }

    /// Runs the plan's GEMM kernel `kernel` on `candidate` (a name the plan carries), or on
    /// cuBLASLt (`None`), from now on.
    pub fn choose(&mut self, gpu: &Gpu, kernel: &str, candidate: Option<&str>) -> Result<(), GpuError> {
        if let Some(name) = candidate {
            self.load_one(gpu, name)?;
        }
        self.chosen.insert(kernel.to_string(), candidate.map(str::to_string));
        Ok(())
    }

    /// What the plan's GEMM kernel `kernel` of `form` runs on: a generated kernel, or
    /// cuBLASLt (`None`). Untuned, the experts' forms run their first tile, the dense form
    /// cuBLASLt.
    pub fn for_kernel(&self, kernel: &str, form: Form) -> Option<&GeneratedGemm> {
        let name = match self.chosen.get(kernel) {
            Some(chosen) => chosen.as_deref(),
            None if form == Form::Dense => None,
            None => self.first(form),
        };
        name.map(|name| &self.loaded[name])
    }

    fn load_one(&mut self, gpu: &Gpu, name: &str) -> Result<(), GpuError> {
        if self.loaded.contains_key(name) {
            return Ok(());
        }
        let Some(&(_, tile, form)) = self.carried.iter().find(|(carried, _, _)| carried == name) else {
            return Err(GpuError::Plan(format!("the plan carries no kernel `{name}`")));
        };
        let (module, function) = super::load_kernel(gpu, &self.dir, name)?;
        let bytes = i32::try_from(tile.shared_bytes(form)).expect("a tile's shared memory fits an i32");
        function.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)?;
        let multiprocessors = self.multiprocessors;
        let gemm =
            GeneratedGemm { function, tile, form, multiprocessors, maps: TensorMaps::default(), _module: module };
        self.loaded.insert(name.to_string(), gemm);
        Ok(())
    }
}

/// One launch. Dense: out [rows, n] = `a` [rows, k] times `b` [n, k] (128×128 blocks)ᵀ (one
/// expert; no offsets). Grouped: out [rows, n] = each expert's rows of `a` [rows, k] times its
/// weights' (`b` [experts, n, k], 128×128 blocks)ᵀ, plus `plus`'s product where there is one.
/// Wgrad: out [experts, rows, n] = per expert, its token columns of `a` [rows, k] times those
/// of `b` [n, k], transposed (1×128 tiles; k the capacity). The experts' row offsets (i32,
/// experts + 1) at `offsets` on the device.
pub struct TiledProduct {
    pub a: Fp8Operand,
    pub b: Fp8Operand,
    pub out: u64,
    pub offsets: u64,
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    pub experts: usize,
    pub plus: Option<Addend>,
    /// Whether the products add to what `out` holds (else they are stored over it).
    pub accumulate: bool,
}

/// A grouped product's second pair of operands, its product added to the first's: `a` [rows,
/// k] and `b` [experts, n, k], quantised as the first pair.
pub struct Addend {
    pub a: Fp8Operand,
    pub b: Fp8Operand,
    pub k: usize,
}

impl GeneratedGemm {
    /// Whether a product of `rows` × `n` over `k` fits the tile (the grouped form takes any
    /// number of rows: the experts' last blocks are partial, and any even n: blocks past it store
    /// nothing; the dense form's n a multiple of 4, for C's tensor map, which stores nothing past
    /// it either; the Wgrad form reads every column's scale of its blocks, so its n is a
    /// multiple of theirs).
    pub fn fits(&self, rows: usize, n: usize, k: usize) -> bool {
        let (rows_fit, n_fits) = match self.form {
            Form::Grouped => (true, n.is_multiple_of(2)),
            // C's tensor map: its rows' bytes a multiple of 16.
            Form::Dense => (rows.is_multiple_of(self.tile.m as usize), n.is_multiple_of(4)),
            Form::Wgrad => (
                rows.is_multiple_of(self.tile.m as usize),
                n.is_multiple_of((self.tile.n * self.tile.cluster) as usize),
            ),
        };
        rows_fit && n_fits && k.is_multiple_of(TILE_K as usize)
    }

    pub fn run(&self, gpu: &Gpu, p: &TiledProduct) -> Result<(), GpuError> {
        assert!(self.fits(p.rows, p.n, p.k), "a product the tile does not fit");
        assert!(
            p.plus.as_ref().is_none_or(|plus| self.form == Form::Grouped && self.fits(p.rows, p.n, plus.k)),
            "a second product only the grouped form adds, fitting the tile"
        );
        let narrow = |x: usize| u32::try_from(x).map_err(|_| GpuError::Unsupported(format!("{x} exceeds u32")));
        let (rows, n, k, experts) = (narrow(p.rows)?, narrow(p.n)?, narrow(p.k)?, narrow(p.experts)?);
        if self.form != Form::Dense && experts > MAX_EXPERTS {
            return Err(GpuError::Unsupported(format!(
                "{} experts in one grouped FP8 GEMM or weight gradient: the generated kernel takes at most {} (spread the \
                 experts over more expert-parallel ranks)",
                p.experts,
                MAX_EXPERTS
            )));
        }
        // The tiles of C (`gemm::Form`), shared out by the blocks (a cluster of blocks takes
        // neighbouring tiles along N).
        let (tile_m, cluster) = (self.tile.m as usize, self.tile.cluster as usize);
        let units = p.n.div_ceil(self.tile.n as usize * cluster)
            * match self.form {
                Form::Grouped => p.rows.div_ceil(tile_m) + p.experts,
                _ => p.rows / tile_m * p.experts,
            };
        let config = LaunchConfig {
            grid_dim: (narrow(units.clamp(1, self.multiprocessors / cluster) * cluster)?, 1, 1),
            block_dim: (self.tile.threads(), 1, 1),
            shared_mem_bytes: self.tile.shared_bytes(self.form),
        };
        // A's rows, and B's: all experts' weights (Grouped) or the tokens' columns (Wgrad).
        let b_rows = if self.form == Form::Grouped { p.experts * p.n } else { p.n };
        let (a_box, b_box) = self.tile.boxes();
        let a_map = self.maps.at(gpu, p.a.data, p.rows, p.k, Mapped::Operand(a_box))?;
        let b_map = self.maps.at(gpu, p.b.data, b_rows, p.k, Mapped::Operand(b_box))?;
        // The dense and Wgrad forms store C through its tensor map (`gemm::fp8_gemm`).
        let out = match self.form {
            Form::Dense => self.maps.at(gpu, p.out, p.rows, p.n, Mapped::Output(1))?,
            Form::Wgrad => self.maps.at(gpu, p.out, p.rows, p.n, Mapped::Output(p.experts))?,
            Form::Grouped => p.out,
        };
        let mut launch = gpu.stream.launch_builder(&self.function);
        launch.arg(&a_map).arg(&b_map).arg(&p.a.scales).arg(&p.b.scales).arg(&out);
        let accumulate = u32::from(p.accumulate);
        launch.arg(&rows).arg(&n).arg(&k).arg(&accumulate);
        if self.form != Form::Dense {
            launch.arg(&p.offsets).arg(&experts);
        }
        // The grouped form's second pair (the first again, over no K, where there is none).
        let second = match &p.plus {
            Some(plus) => {
                let a_map = self.maps.at(gpu, plus.a.data, p.rows, plus.k, Mapped::Operand(a_box))?;
                let b_map = self.maps.at(gpu, plus.b.data, b_rows, plus.k, Mapped::Operand(b_box))?;
                (a_map, b_map, plus.a.scales, plus.b.scales, narrow(plus.k)?)
            }
            None => (a_map, b_map, p.a.scales, p.b.scales, 0),
        };
        if self.form == Form::Grouped {
            launch.arg(&second.0).arg(&second.1).arg(&second.2).arg(&second.3).arg(&second.4);
        }
        // SAFETY: the arguments follow the kernel's signature (`gemm::fp8_gemm`: the operands'
        // tensor maps, three pointers (C a tensor map too, but in the grouped form), M, N, K,
        // whether to accumulate, but for the dense form the offsets and E, and the grouped
        // form's second pair's maps, scales and K), each map of a live buffer of the plan and
        // each pointer the address of one, with the sizes given.
        unsafe { launch.launch(config) }?;
        Ok(())
    }
}
