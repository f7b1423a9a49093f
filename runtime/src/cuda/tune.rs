//! `dsc tune DIR`: each FP8 GEMM of a plan that the compiler's generated GEMMs can run (a
//! library GEMM kernel: a dense Fprop or Dgrad, or the MoE experts' products or weight
//! gradients: [`GemmSite`]) measured on this GPU on every candidate tile the plan carries and
//! on cuBLASLt (for the experts one product per expert), through the path the executor runs it
//! by ([`gemm::run`]), on operands of the kernel's shapes: random E4M3 values and scales, the
//! experts' rows split unevenly as routing splits them ([`uneven_offsets`]).
//! Each candidate's result (its outputs poisoned first) is held to cuBLASLt's on the same operands (the grouped sum's, which
//! cuBLASLt does not run, to the first tile's); the fastest right one is chosen
//! ([`dsc_compiler::plan::tuning`]).

use super::gemm::{self, GemmSite, ReadBack};
use super::generated::GeneratedGemms;
use super::places::{self, Places};
use super::{Gpu, GpuError};
use crate::memory::Layout;
use cudarc::driver::sys::CUevent_flags;
use dsc_compiler::fuse::kernels::{base, Code, Kernel};
use dsc_compiler::graph::ir::{Function, V};
use dsc_compiler::mlir::gemm::Form;
use dsc_compiler::plan::tuning::{Measured, TunedGemm, Tuning, LIBRARY};
use dsc_compiler::plan::Plan;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Byte alignment of each value in the measuring arena (TMA and cuBLASLt want 16 at least).
const ALIGN: u64 = 1024;

/// Measures every such GEMM of the plan in `dir` (the median of `repeats` timed launches
/// after a first one), telling `done` of each as it is chosen.
pub fn tune(
    plan: &Plan,
    dir: &Path,
    gpu: &Gpu,
    repeats: usize,
    mut done: impl FnMut(&TunedGemm),
) -> Result<Tuning, GpuError> {
    let mut blas = gpu.blas(true)?;
    blas.generated = GeneratedGemms::untuned(gpu, plan, dir)?;
    let mut gemms = Vec::new();
    for (function, pf) in plan.module.functions.iter().zip(&plan.functions) {
        let packed = pf.packed_set();
        let bytes: HashMap<u32, u64> = pf.buffers.iter().map(|b| (b.value, b.bytes)).collect();
        for kernel in pf.kernels.iter().filter(|k| k.code == Code::Library) {
            let Some(site) = GemmSite::of(function, kernel, &packed) else { continue };
            let operands = Operands::of(gpu, function, kernel, &bytes, &site)?;
            // What the chosen candidate takes (the median) and its result.
            let measure = |blas: &gemm::Blas| -> Result<_, GpuError> {
                let run = |blas: &gemm::Blas| {
                    let places = Places::arena(gpu, &operands.arena, &operands.layout);
                    gemm::run(gpu, blas, function, &packed, kernel, &places, &mut ReadBack::default(), &HashSet::new())
                };
                // Its outputs poisoned (NaN) first: a result not written is never right.
                operands.poison(gpu)?;
                run(blas)?;
                let result = operands.outputs(gpu)?;
                let mut micros = Vec::with_capacity(repeats);
                for _ in 0..repeats {
                    let start = gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                    run(blas)?;
                    let end = gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                    micros.push(f64::from(start.elapsed_ms(&end)?) * 1e3);
                }
                micros.sort_by(f64::total_cmp);
                Ok((micros[micros.len() / 2], result))
            };
            // cuBLASLt first where it runs the GEMM: the reference the tiles are held to (else
            // the first tile that fits is).
            let library = site.library.then_some(None);
            let candidates = library.into_iter().chain(blas.generated.candidates(site.form).into_iter().map(Some));
            let (mut measured, mut reference): (_, Option<Vec<f32>>) = (Vec::new(), None);
            for candidate in candidates {
                blas.generated.choose(gpu, &kernel.name, candidate.as_deref())?;
                let tile = blas.generated.for_kernel(&kernel.name, site.form);
                if candidate.is_some() && !tile.is_some_and(|g| site.fits(g)) {
                    continue;
                }
                let (micros, result) = measure(&blas)?;
                let error = reference.as_ref().map_or(0.0, |reference| relative_error(&result, reference));
                reference.get_or_insert(result);
                measured.push(Measured { candidate: candidate.unwrap_or_else(|| LIBRARY.into()), micros, error });
            }
            let Some(fastest) = TunedGemm::fastest(&measured) else { continue };
            let chosen = fastest.candidate.clone();
            blas.generated.choose(gpu, &kernel.name, (chosen != LIBRARY).then_some(chosen.as_str()))?;
            let tuned = TunedGemm { kernel: kernel.name.clone(), shape: site.shape, measured, chosen };
            done(&tuned);
            gemms.push(tuned);
        }
    }
    Ok(Tuning { gpu: gpu.name()?, gemms })
}

/// The buffers of one GEMM kernel: its operands (random bytes, the offsets uneven) and
/// outputs in one arena.
struct Operands {
    arena: cudarc::driver::CudaSlice<u8>,
    layout: Layout,
    /// The values it writes, with their bytes.
    written: Vec<(u32, usize)>,
}

impl Operands {
    fn of(
        gpu: &Gpu,
        function: &Function,
        kernel: &Kernel,
        bytes: &HashMap<u32, u64>,
        site: &GemmSite,
    ) -> Result<Operands, GpuError> {
        let node = &function.nodes[kernel.nodes[0] as usize];
        let read: HashSet<u32> = node.args.iter().map(|&a| base(function, a).0).collect();
        // A tuple's parts are the values written.
        let parts = |v: u32| (0..2).filter_map(move |i| function.part(V(v), i)).map(|p| p.0);
        let written: Vec<u32> = kernel.outputs.iter().flat_map(|&v| std::iter::once(v).chain(parts(v))).collect();
        let mut offsets = HashMap::new();
        let mut end = 0;
        for &v in read.iter().chain(&written) {
            if let Some(&size) = bytes.get(&v) {
                offsets.entry(v).or_insert_with(|| {
                    let at = end;
                    end = (end + size).next_multiple_of(ALIGN);
                    at
                });
            }
        }
        let arena = gpu.stream.clone_htod(&random_bytes(end as usize))?;
        let layout = Layout { offsets, peak: end, total: end };
        let places = Places::arena(gpu, &arena, &layout);
        if let Some(value) = site.offsets {
            // The Wgrad's tokens: as many as its capacity holds with each expert's rounded up to 128.
            let rows = match site.shape {
                [_, _, capacity, experts] if site.form == Form::Wgrad => capacity.saturating_sub(128 * experts),
                [rows, ..] => rows,
            };
            let offsets: Vec<u8> =
                uneven_offsets(rows, site.shape[3]).iter().flat_map(|&o| (o as i32).to_le_bytes()).collect();
            places::write(gpu, &offsets, places.at(value))?;
        }
        let written = written.into_iter().filter_map(|v| Some((v, *bytes.get(&v)? as usize))).collect();
        Ok(Operands { arena, layout, written })
    }

    /// Fills what the kernel writes with NaN.
    fn poison(&self, gpu: &Gpu) -> Result<(), GpuError> {
        let places = Places::arena(gpu, &self.arena, &self.layout);
        self.written.iter().try_for_each(|&(v, bytes)| places::fill(gpu, places.at(v), bytes, 0xFF))
    }

    /// What the kernel wrote, as f32 values.
    fn outputs(&self, gpu: &Gpu) -> Result<Vec<f32>, GpuError> {
        let places = Places::arena(gpu, &self.arena, &self.layout);
        let mut values = Vec::new();
        for &(v, bytes) in &self.written {
            let read = places::read(gpu, places.at(v), bytes)?;
            values.extend(read.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))));
        }
        Ok(values)
    }
}

/// The experts' row offsets (`experts + 1`) over `rows` rows, split unevenly: expert e's
/// share grows linearly from half the mean to one and a half times it (routing balanced by
/// the bias still leaves the busiest expert ~1.5–2.5 times the mean: benches/README.md).
pub fn uneven_offsets(rows: usize, experts: usize) -> Vec<usize> {
    let weight = |e: usize| 0.5 + e as f64 / (experts.max(2) - 1) as f64;
    let total: f64 = (0..experts).map(weight).sum();
    let mut offsets = vec![0];
    let mut sum = 0.0;
    for e in 0..experts {
        sum += weight(e);
        offsets.push(if e + 1 == experts { rows } else { (rows as f64 * sum / total) as usize });
    }
    offsets
}

/// Bytes of random values that are finite as E4M3 and as f32: every byte's bit 6 clear (no
/// E4M3 NaN, 0x7F or 0xFF; an f32's exponent below 2⁰·2), from a fixed seed, eight from each
/// xorshift step (the arenas are hundreds of MB).
fn random_bytes(len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut bytes: Vec<u8> = (0..len.div_ceil(8))
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state & 0xBFBF_BFBF_BFBF_BFBF).to_le_bytes()
        })
        .collect();
    bytes.truncate(len);
    bytes
}

/// ‖x − reference‖ / ‖reference‖.
fn relative_error(x: &[f32], reference: &[f32]) -> f64 {
    let (diff, norm) = x.iter().zip(reference).fold((0.0, 0.0), |(d, n), (&x, &r)| {
        let (x, r) = (f64::from(x), f64::from(r));
        (d + (x - r) * (x - r), n + r * r)
    });
    if x.len() != reference.len() || !diff.is_finite() {
        return f64::INFINITY;
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}
