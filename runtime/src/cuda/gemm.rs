//! Library GEMMs of a plan: those the precision policy keeps out of FP8 on cuBLAS, in f32, or
//! in BF16 where both factors are BF16 values ([`Factors`]: read packed where the plan stores
//! them so, else from f32 storage; products f32): a product, a product added to a value (the
//! epilogue of `matmul_add`), and the concatenated forms (`concat_matmul`,
//! `concat_rows_matmul`, `concat_k_matmul`) as the products they stand for. Row-major
//! C = op(A)·op(B) is computed as column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, batched over equal leading
//! dimensions (a rank-2 operand is shared by every batch). The FP8 GEMMs on quantised operands
//! (`scaled_matmul`, `concat_scaled_matmul`, `concat_k_scaled_matmul`: its second product
//! accumulated on the first's) run on cuBLASLt's block-scaled path ([`super::scaled`])
//! where their groups are DeepSeek-V3's (1×128 tiles, 128×128 blocks), or, with weight blocks,
//! on the generated tile the plan's tuning chose ([`super::generated`], [`GemmSite`]).
//!
//! Grouped GEMMs of the MoE experts run, in FP8 where the plan carries them, on the compiler's
//! expert GEMMs ([`super::generated`]: one launch, the offsets read on the device); otherwise
//! as one product per expert, their row offsets read back from the device first: one
//! synchronisation per offsets value and call of a function ([`ReadBack`]), shared by the
//! grouped GEMMs over the same experts' rows. In FP8 (operands quantised by `fuse::library`):
//! Fprop and Dgrad take each expert's rows in place, its weight blocks in place, and its
//! slice of the M-major row scales copied into a scratch buffer (cuBLASLt takes no leading
//! dimension for scales), M rounded up to [`ROWS_ALIGN`] (cuBLASLt refuses other M): the rows
//! past an expert's own are the next experts', overwritten when their turn comes, except past
//! the last row, where the expert's final rows go through scratch buffers. The Wgrad takes
//! each expert's columns of its `quantize_by_expert` operands in place (whole 128-token
//! groups, the leading dimension the capacity).

use super::generated::{Addend, GeneratedGemms, TiledProduct};
use super::places::{self, Places};
use super::scaled::{Fp8Operand, Groups, Lt, ScaledGemm};
use super::{Gpu, GpuError};
use cudarc::cublas::sys::cublasComputeType_t as ComputeType;
use cudarc::cublas::{sys, CudaBlas};
use cudarc::driver::DevicePtr;
use dsc_compiler::fuse::kernels::{base, product_factors, Kernel};
use dsc_compiler::graph::ir::{matmul_shape, DType, Function, Node, Op, V};
use dsc_compiler::mlir::fp8;
use dsc_compiler::mlir::gemm::Form;
use std::collections::hash_map::{Entry, HashMap};
use std::collections::HashSet;
use std::ffi::c_void;

/// The GEMM libraries: cuBLAS for f32 products, cuBLASLt for the FP8 ones; and the
/// compiler's generated GEMMs where the plan carries them (the experts' FP8 products and weight
/// gradients run on them where their tiles fit, without reading the offsets back; dense FP8
/// products where the plan's tuning chose them).
pub struct Blas {
    pub f32: CudaBlas,
    pub fp8: Lt,
    pub generated: GeneratedGemms,
}

/// One batched product: C = op(A)·op(B), plus what C held when `accumulate`; or in FP8
/// (`b_groups` given) C = A·Bᵀ of quantised K-major operands.
#[derive(Clone, Copy)]
struct Product<'s> {
    a: (u32, &'s [usize]),
    b: (u32, &'s [usize]),
    c: u32,
    ta: bool,
    tb: bool,
    accumulate: bool,
    factors: Factors,
    b_groups: Option<Groups>,
}

/// A library GEMM as the products cuBLAS runs: the addend copied into the output first
/// (`matmul_add`), then each product.
struct Plan<'s> {
    addend: Option<(u32, u32)>,
    products: Vec<Product<'s>>,
}

/// A value of the arena and its shape.
type Operand<'s> = (u32, &'s [usize]);

/// A grouped GEMM of the MoE experts, over the row offsets in value `offsets` (read back
/// from the device at the first grouped GEMM of a call over them: [`ReadBack`]).
struct Grouped<'s> {
    xs: Operand<'s>,
    offsets: u32,
    kind: GroupedKind<'s>,
    factors: Factors,
}

/// How a library product's factors are held, and so how cuBLAS multiplies them.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Factors {
    /// f32 values: an f32 GEMM (on TF32 tensor cores where the handle allows them); also an
    /// FP8 product's, whose quantised operands cuBLASLt reads.
    F32,
    /// BF16 values stored as f32: a BF16 GEMM on f32 storage (`CUBLAS_COMPUTE_32F_FAST_16BF`;
    /// the values are already BF16, so the products are exact).
    Bf16Values,
    /// BF16 values stored packed ([`dsc_compiler::fuse::kernels::packed_bf16`]): a BF16 GEMM
    /// reading bf16 matrices.
    PackedBf16,
}

impl Factors {
    /// Of library product `node` of `function`, whose `packed` values are stored as bf16.
    fn of(function: &Function, node: &Node, packed: &HashSet<u32>) -> Factors {
        let factors = product_factors(&node.op, &node.args);
        if factors.is_empty() || factors.iter().any(|&a| function.node(a).dtype != DType::Bf16) {
            Factors::F32
        } else if factors.iter().all(|&a| packed.contains(&base(function, a).0)) {
            Factors::PackedBf16
        } else {
            Factors::Bf16Values
        }
    }

    /// Bytes of one element of a factor.
    fn width(self) -> u64 {
        if self == Factors::PackedBf16 {
            2
        } else {
            4
        }
    }
}

enum GroupedKind<'s> {
    /// Per expert e and each (weight, output): the expert's rows of xs times op(w[e]).
    Products { tb: bool, weights: Vec<(Operand<'s>, u32)> },
    /// The weight gradient out[e] = grad_eᵀ · xs_e over each expert's rows.
    Wgrad { grad: Operand<'s>, out: u32 },
    /// In FP8: per expert e and each (weight, output), the expert's rows of xs (1×128 tiles)
    /// times w[e]ᵀ (K-major, 128×128 blocks).
    ScaledProducts { weights: Vec<(Operand<'s>, u32)> },
    /// In FP8: out[e] = the expert's columns of grad times those of xs, transposed (both
    /// `quantize_by_expert`, 1×128 tiles along tokens).
    ScaledWgrad { grad: Operand<'s>, out: u32 },
    /// In FP8: per expert e, the expert's rows of xs times `weight[e]`ᵀ plus those of `plus`'s
    /// rows times its weight's (quantised as `ScaledProducts`' operands), into `out`.
    ScaledSum { weight: Operand<'s>, plus: (Operand<'s>, Operand<'s>), out: u32 },
}

impl GroupedKind<'_> {
    /// The form of the compiler's expert GEMMs that runs it, if one can.
    fn expert_form(&self) -> Option<Form> {
        match self {
            GroupedKind::ScaledProducts { .. } | GroupedKind::ScaledSum { .. } => Some(Form::Grouped),
            GroupedKind::ScaledWgrad { .. } => Some(Form::Wgrad),
            GroupedKind::Products { .. } | GroupedKind::Wgrad { .. } => None,
        }
    }
}

/// Expert row offsets read back from the device during one call of a function, by value: the
/// grouped GEMMs reading the same offsets wait for the device once (a value is written once
/// per call).
#[derive(Default)]
pub struct ReadBack(HashMap<u32, Vec<usize>>);

impl ReadBack {
    /// The offsets in value `v` (`bytes` long, at `places`), read back at their first use.
    fn offsets(&mut self, gpu: &Gpu, places: &Places, v: u32, bytes: usize) -> Result<&[usize], GpuError> {
        Ok(match self.0.entry(v) {
            Entry::Occupied(read) => read.into_mut(),
            Entry::Vacant(slot) => {
                let bytes = places::read(gpu, places.at(v), bytes)?;
                slot.insert(
                    bytes
                        .chunks(4)
                        .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")).max(0) as usize)
                        .collect(),
                )
            }
        })
    }
}

/// Runs grouped GEMM `g` (of plan kernel `name`) on the plan's expert GEMMs if they take it
/// (the FP8 products and weight gradients, where the tiles fit and its tuning did not choose
/// cuBLASLt); whether they did.
fn on_expert_gemms(
    gpu: &Gpu,
    generated: &GeneratedGemms,
    function: &Function,
    places: &Places,
    name: &str,
    g: &Grouped,
    adding: &HashSet<u32>,
) -> Result<bool, GpuError> {
    let offsets = places.at(g.offsets);
    let Some(form) = g.kind.expert_form() else { return Ok(false) };
    let Some(kernel) = generated.for_kernel(name, form) else { return Ok(false) };
    match &g.kind {
        GroupedKind::ScaledProducts { weights } => {
            let (rows, k) = (g.xs.1[0], g.xs.1[1]);
            if !weights.iter().all(|(w, _)| kernel.fits(rows, w.1[1], k)) {
                return Ok(false);
            }
            for &(w, out) in weights {
                let (count, n) = (w.1[0], w.1[1]);
                let a = Fp8Operand::buffer(places.at(g.xs.0), rows, k);
                let b = Fp8Operand::buffer(places.at(w.0), count * n, k);
                let (plus, accumulate) = (None, adding.contains(&out));
                let out = places.at(out);
                kernel.run(gpu, &TiledProduct { a, b, out, offsets, rows, n, k, experts: count, plus, accumulate })?;
            }
            Ok(true)
        }
        GroupedKind::ScaledSum { weight, plus: (xs2, weight2), out } => {
            let (rows, k, k2) = (g.xs.1[0], g.xs.1[1], xs2.1[1]);
            let (count, n) = (weight.1[0], weight.1[1]);
            if !kernel.fits(rows, n, k) || !kernel.fits(rows, n, k2) {
                return Ok(false);
            }
            let a = Fp8Operand::buffer(places.at(g.xs.0), rows, k);
            let b = Fp8Operand::buffer(places.at(weight.0), count * n, k);
            let plus = Addend {
                a: Fp8Operand::buffer(places.at(xs2.0), rows, k2),
                b: Fp8Operand::buffer(places.at(weight2.0), count * n, k2),
                k: k2,
            };
            let (plus, accumulate) = (Some(plus), adding.contains(out));
            let out = places.at(*out);
            kernel.run(gpu, &TiledProduct { a, b, out, offsets, rows, n, k, experts: count, plus, accumulate })?;
            Ok(true)
        }
        GroupedKind::ScaledWgrad { grad, out } => {
            let (rows, n, capacity) = (grad.1[0], g.xs.1[0], grad.1[1]);
            if !kernel.fits(rows, n, capacity) {
                return Ok(false);
            }
            let a = Fp8Operand::buffer(places.at(grad.0), rows, capacity);
            let b = Fp8Operand::buffer(places.at(g.xs.0), n, capacity);
            let (count, accumulate) = (function.nodes[*out as usize].shape[0], adding.contains(out));
            let (out, k, plus) = (places.at(*out), capacity, None);
            kernel.run(gpu, &TiledProduct { a, b, out, offsets, rows, n, k, experts: count, plus, accumulate })?;
            Ok(true)
        }
        GroupedKind::Products { .. } | GroupedKind::Wgrad { .. } => Ok(false),
    }
}

/// A library GEMM kernel that the compiler's generated GEMMs can run (`dsc tune` measures
/// them): a dense FP8 Fprop or Dgrad (128×128 weight blocks), or the MoE experts' FP8 products
/// or weight gradients. Its form, the shape (rows, N, K, experts, as
/// `dsc_compiler::plan::tuning::TunedGemm::shape`: the first product's), every product's
/// (rows, N, K), the value of the experts' row offsets, and whether cuBLASLt runs it too (not
/// the experts' sum).
pub struct GemmSite {
    pub form: Form,
    pub shape: [usize; 4],
    products: Vec<(usize, usize, usize)>,
    pub offsets: Option<u32>,
    pub library: bool,
}

impl GemmSite {
    /// Of library GEMM `kernel` (of `function`, whose `packed` values are stored as bf16), if
    /// it is one.
    pub fn of(function: &Function, kernel: &Kernel, packed: &HashSet<u32>) -> Option<GemmSite> {
        let g = match plan(function, kernel, packed)? {
            Work::Grouped(g) => g,
            Work::Products(plan) => {
                let blocks = plan.addend.is_none()
                    && !plan.products.is_empty()
                    && plan.products.iter().all(|p| p.b_groups == Some(Groups::Blocks));
                if !blocks {
                    return None;
                }
                let products: Vec<_> = plan.products.iter().map(|p| (p.a.1[0], p.b.1[0], p.a.1[1])).collect();
                let (m, n, k) = products[0];
                return Some(GemmSite {
                    form: Form::Dense,
                    shape: [m, n, k, 1],
                    products,
                    offsets: None,
                    library: true,
                });
            }
        };
        let (xs_rows, k) = (g.xs.1[0], g.xs.1[1]);
        let (shape, products) = match &g.kind {
            GroupedKind::ScaledProducts { weights } => {
                let products = weights.iter().map(|(w, _)| (xs_rows, w.1[1], k)).collect();
                ([xs_rows, weights[0].0 .1[1], k, weights[0].0 .1[0]], products)
            }
            GroupedKind::ScaledSum { weight, plus, .. } => (
                [xs_rows, weight.1[1], k, weight.1[0]],
                vec![(xs_rows, weight.1[1], k), (xs_rows, weight.1[1], plus.0 .1[1])],
            ),
            // The gradient's rows by the inputs' (xs: [n, capacity]).
            GroupedKind::ScaledWgrad { grad, out } => {
                let capacity = grad.1[1];
                let shape = [grad.1[0], xs_rows, capacity, function.nodes[*out as usize].shape[0]];
                (shape, vec![(grad.1[0], xs_rows, capacity)])
            }
            GroupedKind::Products { .. } | GroupedKind::Wgrad { .. } => return None,
        };
        let library = !matches!(g.kind, GroupedKind::ScaledSum { .. });
        Some(GemmSite { form: g.kind.expert_form()?, shape, products, offsets: Some(g.offsets), library })
    }

    /// Whether `gemm` takes it.
    pub fn fits(&self, gemm: &super::generated::GeneratedGemm) -> bool {
        self.products.iter().all(|&(rows, n, k)| gemm.fits(rows, n, k))
    }
}

/// The row granularity of an expert's FP8 product on cuBLASLt (see the module doc).
pub const ROWS_ALIGN: usize = 16;

/// How a library GEMM runs here.
enum Work<'s> {
    Products(Plan<'s>),
    Grouped(Grouped<'s>),
}

/// How library GEMM `kernel` (of `function`) runs here, or `None` for the ones not on the GPU
/// yet (FP8 GEMMs outside 128-element groups or of sizes cuBLASLt does not take).
fn plan<'s>(function: &'s Function, kernel: &Kernel, packed: &HashSet<u32>) -> Option<Work<'s>> {
    let v = kernel.nodes[0];
    let node = &function.nodes[v as usize];
    let base = |a: V| dsc_compiler::fuse::kernels::base(function, a).0;
    let arg = |k: usize| (base(node.args[k]), function.node(node.args[k]).shape.as_slice());
    let part = |i: usize| parts(function, v, i);
    let factors = Factors::of(function, node, packed);
    let f32 = |a: usize, b: usize, c: u32, ta: bool, tb: bool, accumulate: bool| Product {
        a: arg(a),
        b: arg(b),
        c,
        ta,
        tb,
        accumulate,
        factors,
        b_groups: None,
    };
    // An FP8 product where cuBLASLt's block-scaled path takes it.
    let fp8 = |a: usize, b: usize, c: u32| {
        let groups = |k: usize| fp8::tiling(&function.node(V(base(node.args[k]))).op);
        let b_groups = match (groups(a)?, groups(b)?) {
            ((1, 128), (1, 128)) => Groups::Tiles,
            ((1, 128), (128, 128)) => Groups::Blocks,
            _ => return None,
        };
        let (sa, sb) = (arg(a).1, arg(b).1);
        Lt::takes(sa[0], sb[0], sa[1]).then_some(Product {
            a: arg(a),
            b: arg(b),
            c,
            ta: false,
            tb: true,
            accumulate: false,
            factors,
            b_groups: Some(b_groups),
        })
    };
    let (addend, products) = match node.op {
        Op::MatMul { ta, tb, fp8: None } => (None, vec![f32(0, 1, v, ta, tb, false)]),
        // c + a·b: the product accumulated on the addend.
        Op::MatMulAdd { ta, tb, fp8: None } => (Some((base(node.args[2]), v)), vec![f32(0, 1, v, ta, tb, true)]),
        Op::ConcatKMatMul { ta, tb, fp8: None } => {
            (None, vec![f32(0, 1, v, ta, tb, false), f32(2, 3, v, ta, tb, true)])
        }
        Op::ConcatMatMul { ta, tb, fp8: None } => {
            (None, vec![f32(0, 1, part(0), ta, tb, false), f32(0, 2, part(1), ta, tb, false)])
        }
        Op::ConcatRowsMatMul { ta, tb, fp8: None } => {
            (None, vec![f32(0, 2, part(0), ta, tb, false), f32(1, 2, part(1), ta, tb, false)])
        }
        Op::ScaledMatMul { .. } => (None, vec![fp8(0, 1, v)?]),
        Op::ConcatScaledMatMul { .. } => (None, vec![fp8(0, 1, part(0))?, fp8(0, 2, part(1))?]),
        Op::ConcatKScaledMatMul { .. } => (None, vec![fp8(0, 1, v)?, Product { accumulate: true, ..fp8(2, 3, v)? }]),
        Op::GroupedMatMul { tb, fp8: None } => {
            let kind = GroupedKind::Products { tb, weights: vec![(arg(1), v)] };
            return Some(Work::Grouped(Grouped { xs: arg(0), offsets: arg(2).0, kind, factors }));
        }
        Op::ConcatGroupedMatMul { tb, fp8: None } => {
            let kind = GroupedKind::Products { tb, weights: vec![(arg(1), part(0)), (arg(2), part(1))] };
            return Some(Work::Grouped(Grouped { xs: arg(0), offsets: arg(3).0, kind, factors }));
        }
        Op::GroupedWgrad { fp8: None, .. } => {
            let kind = GroupedKind::Wgrad { grad: arg(1), out: v };
            return Some(Work::Grouped(Grouped { xs: arg(0), offsets: arg(2).0, kind, factors }));
        }
        Op::GroupedMatMul { tb: true, fp8: Some(_) } | Op::ConcatGroupedMatMul { tb: true, fp8: Some(_) } => {
            let groups = |k: usize| fp8::tiling(&function.node(V(base(node.args[k]))).op);
            let weights: Vec<(Operand, u32)> = match node.op {
                Op::GroupedMatMul { .. } => vec![(arg(1), v)],
                _ => vec![(arg(1), part(0)), (arg(2), part(1))],
            };
            let k = arg(0).1[1];
            let fits = groups(0) == Some((1, 128))
                && (1..=weights.len()).all(|w| groups(w) == Some((128, 128)))
                && weights.iter().all(|(w, _)| Lt::takes(ROWS_ALIGN, w.1[1], k));
            let kind = GroupedKind::ScaledProducts { weights };
            return fits.then_some(Work::Grouped(Grouped {
                xs: arg(0),
                offsets: arg(node.args.len() - 1).0,
                kind,
                factors,
            }));
        }
        Op::ConcatKScaledGroupedMatMul { .. } => {
            let groups = |k: usize| fp8::tiling(&function.node(V(base(node.args[k]))).op);
            let fits = [0, 2].iter().all(|&x| groups(x) == Some((1, 128)))
                && [1, 3].iter().all(|&w| groups(w) == Some((128, 128)));
            let kind = GroupedKind::ScaledSum { weight: arg(1), plus: (arg(2), arg(3)), out: v };
            return fits.then_some(Work::Grouped(Grouped { xs: arg(0), offsets: arg(4).0, kind, factors }));
        }
        Op::ScaledGroupedWgrad { .. } => {
            let tiles = |k: usize| fp8::tiling(&function.node(V(base(node.args[k]))).op) == Some((1, 128));
            let (n, k) = (arg(0).1[0], arg(1).1[0]);
            let fits = tiles(0) && tiles(1) && Lt::takes(n, k, 128);
            let kind = GroupedKind::ScaledWgrad { grad: arg(0), out: v };
            return fits.then_some(Work::Grouped(Grouped { xs: arg(1), offsets: arg(2).0, kind, factors }));
        }
        _ => return None,
    };
    Some(Work::Products(Plan { addend, products }))
}

/// Whether library GEMM `kernel` runs on the GPU yet.
pub fn runs(function: &Function, kernel: &Kernel, packed: &HashSet<u32>) -> bool {
    plan(function, kernel, packed).is_some()
}

/// Whether library GEMM `kernel` can add its results to what their buffers hold ([`run`]'s
/// `adding`) instead of storing over it: its products (not onto an addend of its own), or
/// the experts' weight gradients.
pub fn accumulates(function: &Function, kernel: &Kernel, packed: &HashSet<u32>) -> bool {
    match plan(function, kernel, packed) {
        Some(Work::Products(plan)) => plan.addend.is_none(),
        Some(Work::Grouped(g)) => matches!(g.kind, GroupedKind::Wgrad { .. } | GroupedKind::ScaledWgrad { .. }),
        None => false,
    }
}

/// Runs library GEMM `kernel` (of `function`, whose `packed` values are stored as bf16) on its
/// buffers at `places`, adding to what they hold the results in `adding` (where it
/// [`accumulates`]); a grouped GEMM takes its experts' row offsets from `read_back` (this
/// call's).
#[allow(clippy::too_many_arguments)]
pub fn run(
    gpu: &Gpu,
    blas: &Blas,
    function: &Function,
    packed: &HashSet<u32>,
    kernel: &Kernel,
    places: &Places,
    read_back: &mut ReadBack,
    adding: &HashSet<u32>,
) -> Result<(), GpuError> {
    let plan = match plan(function, kernel, packed) {
        Some(Work::Products(plan)) => plan,
        Some(Work::Grouped(g)) => {
            if on_expert_gemms(gpu, &blas.generated, function, places, &kernel.name, &g, adding)? {
                return Ok(());
            }
            let offsets = read_back.offsets(gpu, places, g.offsets, bytes_of(function, g.offsets))?;
            return grouped(gpu, blas, function, places, &g, offsets, adding);
        }
        None => {
            let op = function.nodes[kernel.nodes[0] as usize].op.name();
            return Err(GpuError::Unsupported(format!("`{op}` (FP8 outside 128-element groups or cuBLASLt's sizes)")));
        }
    };
    if let Some((from, to)) = plan.addend {
        assert!(!adding.contains(&to), "a product onto an addend of its own adds to nothing else");
        places::copy(gpu, places.at(from), places.at(to), bytes_of(function, to))?;
    }
    // A dense FP8 product with weight blocks runs on the generated tile its tuning chose.
    let generated = blas.generated.for_kernel(&kernel.name, Form::Dense);
    for p in &plan.products {
        let accumulate = p.accumulate || adding.contains(&p.c);
        match p.b_groups {
            None => product(&blas.f32, places, &Product { accumulate, ..*p })?,
            Some(b_groups) => {
                let (m, k, n) = (p.a.1[0], p.a.1[1], p.b.1[0]);
                let (a, b) = (Fp8Operand::buffer(places.at(p.a.0), m, k), Fp8Operand::buffer(places.at(p.b.0), n, k));
                match generated.filter(|g| b_groups == Groups::Blocks && g.fits(m, n, k)) {
                    Some(tiled) => {
                        let (out, offsets, experts, plus) = (places.at(p.c), 0, 1, None);
                        let product = TiledProduct { a, b, out, offsets, rows: m, n, k, experts, plus, accumulate };
                        tiled.run(gpu, &product)?
                    }
                    None => {
                        let d = places.at(p.c);
                        blas.fp8.run(gpu, &ScaledGemm { a, b, d, m, n, k, b_groups, accumulate })?
                    }
                }
            }
        }
    }
    Ok(())
}

/// The value holding part `i` of fused op `v`'s tuple.
fn parts(function: &Function, v: u32, i: usize) -> u32 {
    function.part(V(v), i).unwrap_or_else(|| panic!("part {i} of %{v} is read")).0
}

fn bytes_of(function: &Function, v: u32) -> usize {
    function.nodes[v as usize].shape.iter().product::<usize>() * 4
}

fn product(blas: &CudaBlas, places: &Places, p: &Product) -> Result<(), GpuError> {
    let (a_shape, b_shape) = (p.a.1, p.b.1);
    let c_shape = matmul_shape(a_shape, b_shape, p.ta, p.tb);
    let rank = c_shape.len();
    let (m, n) = (c_shape[rank - 2], c_shape[rank - 1]);
    let k = if p.ta { a_shape[a_shape.len() - 2] } else { a_shape[a_shape.len() - 1] };
    let stride =
        |shape: &[usize]| if shape.len() == 2 { 0 } else { (shape[shape.len() - 2] * shape[shape.len() - 1]) as i64 };
    let g = Sgemm {
        a: places.at(p.a.0),
        b: places.at(p.b.0),
        c: places.at(p.c),
        m,
        n,
        k,
        ta: p.ta,
        tb: p.tb,
        accumulate: p.accumulate,
        factors: p.factors,
        batch: c_shape[..rank - 2].iter().product(),
        strides: [stride(a_shape), stride(b_shape)],
    };
    // SAFETY: every pointer is its value's buffer (`places`), which holds the shapes used here
    // (checked by the plan's shapes).
    unsafe { sgemm(blas, &g) }
}

/// Runs a grouped GEMM over the experts' row `offsets`: one product per expert with rows (an
/// expert without rows has none; its weight gradient stays zero).
fn grouped(
    gpu: &Gpu,
    blas: &Blas,
    function: &Function,
    places: &Places,
    g: &Grouped,
    offsets: &[usize],
    adding: &HashSet<u32>,
) -> Result<(), GpuError> {
    // The weight gradients of experts without rows are zeros (or, adding, what is there).
    let accumulate = match g.kind {
        GroupedKind::Wgrad { out, .. } | GroupedKind::ScaledWgrad { out, .. } if !adding.contains(&out) => {
            places::zero(gpu, places.at(out), bytes_of(function, out))?;
            false
        }
        GroupedKind::Wgrad { .. } | GroupedKind::ScaledWgrad { .. } => true,
        _ => false,
    };
    match &g.kind {
        GroupedKind::ScaledProducts { weights } => return scaled_products(gpu, &blas.fp8, places, g, weights, offsets),
        GroupedKind::ScaledWgrad { grad, out } => {
            return scaled_wgrad(gpu, &blas.fp8, places, g, (*grad, *out), offsets, accumulate)
        }
        GroupedKind::ScaledSum { .. } => {
            return Err(GpuError::Unsupported(
                "the sum of two grouped FP8 products off the compiler's expert GEMM (the plan carries it)".into(),
            ))
        }
        _ => {}
    }
    // Factors of `g.factors`' width, products f32.
    let factor = |v: u32, elements: usize| places.at(v) + g.factors.width() * elements as u64;
    let product = |v: u32, elements: usize| places.at(v) + 4 * elements as u64;
    let k = g.xs.1[1];
    let experts = offsets.len().saturating_sub(1);
    for e in (0..experts).filter(|&e| offsets[e] < offsets[e + 1]) {
        let (first, rows) = (offsets[e], offsets[e + 1] - offsets[e]);
        let products: Vec<Sgemm> = match &g.kind {
            GroupedKind::Products { tb, weights } => weights
                .iter()
                .map(|&(w, out)| {
                    let n = if *tb { w.1[1] } else { w.1[2] };
                    let (a, b, c) = (factor(g.xs.0, first * k), factor(w.0, e * k * n), product(out, first * n));
                    Sgemm {
                        a,
                        b,
                        c,
                        m: rows,
                        n,
                        k,
                        ta: false,
                        tb: *tb,
                        accumulate: false,
                        factors: g.factors,
                        batch: 1,
                        strides: [0, 0],
                    }
                })
                .collect(),
            // out[e] [n, k] = grad_eᵀ [n, rows] · xs_e [rows, k].
            GroupedKind::Wgrad { grad, out } => {
                let n = grad.1[1];
                let (a, b, c) = (factor(grad.0, first * n), factor(g.xs.0, first * k), product(*out, e * n * k));
                vec![Sgemm {
                    a,
                    b,
                    c,
                    m: n,
                    n: k,
                    k: rows,
                    ta: true,
                    tb: false,
                    accumulate,
                    factors: g.factors,
                    batch: 1,
                    strides: [0, 0],
                }]
            }
            GroupedKind::ScaledProducts { .. } | GroupedKind::ScaledWgrad { .. } | GroupedKind::ScaledSum { .. } => {
                unreachable!("run above")
            }
        };
        for p in &products {
            // SAFETY: the offsets are the plan's expert offsets, within xs's (and grad's) rows
            // (the routing made them); weights and outputs are buffers of their shapes.
            unsafe { sgemm(&blas.f32, p)? };
        }
    }
    Ok(())
}

/// A run of an expert's rows as one FP8 product: `rows` rows from row `first`, computed as
/// `m` (≥ rows, a multiple of [`ROWS_ALIGN`]) rows, in place or through scratch buffers.
struct Piece {
    first: usize,
    rows: usize,
    m: usize,
    in_place: bool,
}

/// The pieces of the expert rows `first..first + rows` of xs's `total` rows.
fn pieces(first: usize, rows: usize, total: usize) -> Vec<Piece> {
    let m = rows.next_multiple_of(ROWS_ALIGN);
    if first + m <= total {
        return vec![Piece { first, rows, m, in_place: true }];
    }
    let whole = rows / ROWS_ALIGN * ROWS_ALIGN;
    let tail = Piece { first: first + whole, rows: rows - whole, m: ROWS_ALIGN, in_place: false };
    let head = Piece { first, rows: whole, m: whole, in_place: true };
    [head, tail].into_iter().filter(|p| p.rows > 0).collect()
}

/// FP8 Fprop or Dgrad of the experts: per expert and piece of its rows, its row scales copied
/// out, then a product per weight (see the module doc).
fn scaled_products(
    gpu: &Gpu,
    lt: &Lt,
    places: &Places,
    g: &Grouped,
    weights: &[(Operand, u32)],
    offsets: &[usize],
) -> Result<(), GpuError> {
    let (total, k) = (g.xs.1[0], g.xs.1[1]);
    let k_groups = k / 128;
    let widest = weights.iter().map(|(w, _)| w.1[1]).max().unwrap_or(0);
    // Scratch buffers, freed in stream order when dropped.
    let scales = gpu.stream.alloc_zeros::<u8>(4 * k_groups * (total + ROWS_ALIGN))?;
    let rows_scratch = gpu.stream.alloc_zeros::<u8>(ROWS_ALIGN * k)?;
    let out_scratch = gpu.stream.alloc_zeros::<u8>(4 * ROWS_ALIGN * widest)?;
    let xs = Fp8Operand::buffer(places.at(g.xs.0), total, k);
    let (scales_at, _s) = scales.device_ptr(&gpu.stream);
    let (rows_at, _r) = rows_scratch.device_ptr(&gpu.stream);
    let (out_at, _o) = out_scratch.device_ptr(&gpu.stream);
    for e in (0..offsets.len().saturating_sub(1)).filter(|&e| offsets[e] < offsets[e + 1]) {
        for p in pieces(offsets[e], offsets[e + 1] - offsets[e], total) {
            // The piece's row scales: k/128 runs of `rows` (M-major), `m` apart in the scratch.
            copy_2d(gpu, xs.scales + 4 * p.first as u64, 4 * total, scales_at, 4 * p.m, 4 * p.rows, k_groups)?;
            let data = if p.in_place {
                xs.data + (p.first * k) as u64
            } else {
                copy_2d(gpu, xs.data + (p.first * k) as u64, p.rows * k, rows_at, p.rows * k, p.rows * k, 1)?;
                rows_at
            };
            let a = Fp8Operand { data, scales: scales_at, ld: k };
            for &(w, out) in weights {
                let n = w.1[1];
                let w_all = Fp8Operand::buffer(places.at(w.0), w.1[0] * n, k);
                let block_rows = n / 128 * k_groups.next_multiple_of(4);
                let b = Fp8Operand {
                    data: w_all.data + (e * n * k) as u64,
                    scales: w_all.scales + 4 * (e * block_rows) as u64,
                    ld: k,
                };
                let d = if p.in_place { places.at(out) + (4 * p.first * n) as u64 } else { out_at };
                lt.run(gpu, &ScaledGemm { a, b, d, m: p.m, n, k, b_groups: Groups::Blocks, accumulate: false })?;
                if !p.in_place {
                    let bytes = 4 * p.rows * n;
                    copy_2d(gpu, out_at, bytes, places.at(out) + (4 * p.first * n) as u64, bytes, bytes, 1)?;
                }
            }
        }
    }
    Ok(())
}

/// FP8 Wgrad of the experts: out[e] = grad's columns of expert e times xs's, transposed, each
/// expert's columns starting where the previous one's whole 128-token groups ended.
fn scaled_wgrad(
    gpu: &Gpu,
    lt: &Lt,
    places: &Places,
    g: &Grouped,
    (grad, out): (Operand, u32),
    offsets: &[usize],
    accumulate: bool,
) -> Result<(), GpuError> {
    let (n, k, capacity) = (grad.1[0], g.xs.1[0], grad.1[1]);
    let (qg, qx) =
        (Fp8Operand::buffer(places.at(grad.0), n, capacity), Fp8Operand::buffer(places.at(g.xs.0), k, capacity));
    let columns = |q: Fp8Operand, rows: usize, start: usize| Fp8Operand {
        data: q.data + start as u64,
        scales: q.scales + 4 * (start / 128 * rows) as u64,
        ld: capacity,
    };
    let mut start = 0;
    for e in 0..offsets.len().saturating_sub(1) {
        let tokens = (offsets[e + 1] - offsets[e]).next_multiple_of(128);
        if tokens > 0 {
            let (a, b) = (columns(qg, n, start), columns(qx, k, start));
            let d = places.at(out) + (4 * e * n * k) as u64;
            lt.run(gpu, &ScaledGemm { a, b, d, m: n, n: k, k: tokens, b_groups: Groups::Tiles, accumulate })?;
        }
        start += tokens;
    }
    Ok(())
}

/// Copies `height` runs of `width` bytes, `src_pitch` apart from `src`, to `dst_pitch` apart
/// from `dst` (device addresses), on the stream (pitches at least `width`, as CUDA requires).
fn copy_2d(
    gpu: &Gpu,
    src: u64,
    src_pitch: usize,
    dst: u64,
    dst_pitch: usize,
    width: usize,
    height: usize,
) -> Result<(), GpuError> {
    use cudarc::driver::sys;
    let device = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
    let copy = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: device,
        srcHost: std::ptr::null(),
        srcDevice: src,
        srcArray: std::ptr::null_mut(),
        srcPitch: src_pitch,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: device,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: dst_pitch,
        WidthInBytes: width,
        Height: height,
    };
    // SAFETY: the copy describes ranges inside live device allocations, on this stream.
    unsafe { sys::cuMemcpy2DAsync_v2(&copy, gpu.stream.cu_stream()) }.result()?;
    Ok(())
}

/// A row-major f32 product C [m, n] = op(A)·op(B) (plus what C held when `accumulate`) on
/// device addresses, batched with the operands' strides in elements (0: shared); on BF16
/// tensor cores where its `factors` are BF16.
struct Sgemm {
    a: u64,
    b: u64,
    c: u64,
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    accumulate: bool,
    factors: Factors,
    batch: usize,
    strides: [i64; 2],
}

/// Runs `g` on cuBLAS as column-major Cᵀ [n, m] = op(B)ᵀ [n, k] · op(A)ᵀ [k, m]: B's rows are
/// n long unless transposed, A's are k long unless transposed.
///
/// # Safety
/// The addresses must hold the matrices `g` describes, on the handle's stream.
unsafe fn sgemm(blas: &CudaBlas, g: &Sgemm) -> Result<(), GpuError> {
    let op = |t: bool| if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
    let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0 });
    let (ldb, lda) = (if g.tb { g.k } else { g.n }, if g.ta { g.m } else { g.k });
    let (f32, bf16) = (sys::cudaDataType::CUDA_R_32F, sys::cudaDataType::CUDA_R_16BF);
    let (compute, factor) = match g.factors {
        Factors::F32 => (ComputeType::CUBLAS_COMPUTE_32F, f32),
        Factors::Bf16Values => (ComputeType::CUBLAS_COMPUTE_32F_FAST_16BF, f32),
        Factors::PackedBf16 => (ComputeType::CUBLAS_COMPUTE_32F, bf16),
    };
    cudarc::cublas::result::gemm_strided_batched_ex(
        *blas.handle(),
        op(g.tb),
        op(g.ta),
        g.n as i32,
        g.m as i32,
        g.k as i32,
        (&alpha as *const f32).cast(),
        g.b as *const c_void,
        factor,
        ldb as i32,
        g.strides[1],
        g.a as *const c_void,
        factor,
        lda as i32,
        g.strides[0],
        (&beta as *const f32).cast(),
        g.c as *mut c_void,
        f32,
        g.n as i32,
        (g.m * g.n) as i64,
        g.batch as i32,
        compute,
        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .map_err(|e| GpuError::Unsupported(format!("cuBLAS: {e:?}")))
}
