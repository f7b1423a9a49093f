//! Library GEMMs of a plan: those the precision policy keeps out of FP8 on cuBLAS (values
//! stored as f32, as every buffer of a plan): a product, a product added to a value (the
//! epilogue of `matmul_add`), and the concatenated forms (`concat_matmul`,
//! `concat_rows_matmul`, `concat_k_matmul`) as the products they stand for. Row-major
//! C = op(A)·op(B) is computed as column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, batched over equal leading
//! dimensions (a rank-2 operand is shared by every batch). The FP8 GEMMs on quantised operands
//! (`scaled_matmul`, `concat_scaled_matmul`) run on cuBLASLt's block-scaled path ([`scaled`])
//! where their groups are DeepSeek-V3's (1×128 tiles, 128×128 blocks); grouped GEMMs are not
//! here yet.

use super::scaled::{Groups, Lt, ScaledGemm};
use super::{Gpu, GpuError};
use crate::memory::Layout;
use cudarc::cublas::{sys, CudaBlas};
use cudarc::driver::{CudaSlice, DevicePtr};
use dsc_compiler::fuse::kernels::Kernel;
use dsc_compiler::graph::ir::{matmul_shape, Function, Op, V};
use dsc_compiler::mlir::fp8;

/// The GEMM libraries: cuBLAS for f32 products, cuBLASLt for the FP8 ones.
pub struct Blas {
    pub f32: CudaBlas,
    pub fp8: Lt,
}

/// One batched product: C = op(A)·op(B), plus what C held when `accumulate`; or in FP8
/// (`b_groups` given) C = A·Bᵀ of quantised K-major operands.
struct Product<'s> {
    a: (u32, &'s [usize]),
    b: (u32, &'s [usize]),
    c: u32,
    ta: bool,
    tb: bool,
    accumulate: bool,
    b_groups: Option<Groups>,
}

/// A library GEMM as the products cuBLAS runs: the addend copied into the output first
/// (`matmul_add`), then each product.
struct Plan<'s> {
    addend: Option<(u32, u32)>,
    products: Vec<Product<'s>>,
}

/// How library GEMM `kernel` (of `function`) runs here, or `None` for the ones not on the GPU
/// yet (FP8 and grouped GEMMs).
fn plan<'s>(function: &'s Function, kernel: &Kernel) -> Option<Plan<'s>> {
    let v = kernel.nodes[0];
    let node = &function.nodes[v as usize];
    let base = |a: V| dsc_compiler::fuse::kernels::base(function, a).0;
    let arg = |k: usize| (base(node.args[k]), function.node(node.args[k]).shape.as_slice());
    let part = |i: usize| parts(function, v, i);
    let f32 = |a: usize, b: usize, c: u32, ta: bool, tb: bool, accumulate: bool| Product {
        a: arg(a),
        b: arg(b),
        c,
        ta,
        tb,
        accumulate,
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
        _ => return None,
    };
    Some(Plan { addend, products })
}

/// Whether library GEMM `kernel` runs on the GPU yet.
pub fn runs(function: &Function, kernel: &Kernel) -> bool {
    plan(function, kernel).is_some()
}

/// Runs library GEMM `kernel` (of `function`) on its buffers in `arena`.
pub fn run(
    gpu: &Gpu,
    blas: &Blas,
    function: &Function,
    kernel: &Kernel,
    arena: &mut CudaSlice<u8>,
    layout: &Layout,
) -> Result<(), GpuError> {
    let Some(plan) = plan(function, kernel) else {
        let op = function.nodes[kernel.nodes[0] as usize].op.name();
        return Err(GpuError::Unsupported(format!("`{op}` (FP8 and grouped GEMMs are not on the GPU yet)")));
    };
    if let Some((from, to)) = plan.addend {
        copy(gpu, arena, layout, from, to, bytes_of(function, to))?;
    }
    for p in &plan.products {
        match p.b_groups {
            None => product(gpu, &blas.f32, arena, layout, p)?,
            Some(b_groups) => {
                let (base, _sync) = arena.device_ptr(&gpu.stream);
                let at = |v: u32| base + layout.offsets[&v];
                let (m, k, n) = (p.a.1[0], p.a.1[1], p.b.1[0]);
                let g = ScaledGemm { a: at(p.a.0), b: at(p.b.0), d: at(p.c), m, n, k, b_groups };
                blas.fp8.run(gpu, &g)?;
            }
        }
    }
    Ok(())
}

/// The value holding part `i` of fused op `v`'s tuple.
fn parts(function: &Function, v: u32, i: usize) -> u32 {
    function
        .nodes
        .iter()
        .position(|n| n.op == Op::Get(i) && n.args[0].0 == v)
        .unwrap_or_else(|| panic!("part {i} of %{v} is read")) as u32
}

fn bytes_of(function: &Function, v: u32) -> usize {
    function.nodes[v as usize].shape.iter().product::<usize>() * 4
}

fn copy(
    gpu: &Gpu,
    arena: &mut CudaSlice<u8>,
    layout: &Layout,
    from: u32,
    to: u32,
    bytes: usize,
) -> Result<(), GpuError> {
    let (src, dst) = (layout.offsets[&from] as usize, layout.offsets[&to] as usize);
    let staged = gpu.stream.clone_dtod(&arena.slice(src..src + bytes))?;
    gpu.stream.memcpy_dtod(&staged, &mut arena.slice_mut(dst..dst + bytes))?;
    Ok(())
}

fn product(gpu: &Gpu, blas: &CudaBlas, arena: &CudaSlice<u8>, layout: &Layout, p: &Product) -> Result<(), GpuError> {
    let (a_shape, b_shape) = (p.a.1, p.b.1);
    let c_shape = matmul_shape(a_shape, b_shape, p.ta, p.tb);
    let rank = c_shape.len();
    let (m, n) = (c_shape[rank - 2], c_shape[rank - 1]);
    let k = if p.ta { a_shape[a_shape.len() - 2] } else { a_shape[a_shape.len() - 1] };
    let batch: usize = c_shape[..rank - 2].iter().product();
    let stride =
        |shape: &[usize]| if shape.len() == 2 { 0 } else { (shape[shape.len() - 2] * shape[shape.len() - 1]) as i64 };
    let op = |t: bool| if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
    let (base, _sync) = arena.device_ptr(&gpu.stream);
    let at = |v: u32| base + layout.offsets[&v];
    let (alpha, beta) = (1.0f32, if p.accumulate { 1.0f32 } else { 0.0 });
    // Column-major Cᵀ [n, m] = op(B)ᵀ [n, k] · op(A)ᵀ [k, m]: B's rows are n long unless
    // transposed, A's are k long unless transposed.
    let (ldb, lda) = (if p.tb { k } else { n }, if p.ta { m } else { k });
    // SAFETY: every pointer is inside the arena, at the offset the memory plan gives the value,
    // whose buffer holds the shapes used here (checked by the plan's shapes); cuBLAS runs on
    // the arena's stream.
    unsafe {
        cudarc::cublas::result::sgemm_strided_batched(
            *blas.handle(),
            op(p.tb),
            op(p.ta),
            n as i32,
            m as i32,
            k as i32,
            &alpha,
            at(p.b.0) as *const f32,
            ldb as i32,
            stride(b_shape),
            at(p.a.0) as *const f32,
            lda as i32,
            stride(a_shape),
            &beta,
            at(p.c) as *mut f32,
            n as i32,
            (m * n) as i64,
            batch as i32,
        )
    }
    .map_err(|e| GpuError::Unsupported(format!("cuBLAS: {e:?}")))
}
