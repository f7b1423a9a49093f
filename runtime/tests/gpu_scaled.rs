//! On the GPU (skipped with the reason when there is none): the FP8 block-scaled GEMM on
//! cuBLASLt (`cuda::scaled`), D = A·Bᵀ on operands in the plan's FP8 buffer layout, against the
//! CPU reference's FP8 GEMM (`numerics::matmul_fp8`, the same E4M3 values and scales) and a
//! float64 product of the dequantised operands, for activation tiles × weight blocks (Fprop and
//! Dgrad) and tiles × tiles (Wgrad), K up to 7168, partial weight blocks, rows of weight
//! blocks that do not fill 16 bytes of scales: within DESIGN.md's FP8 bound, 1e-3.
#![cfg(feature = "cuda")]

use cudarc::driver::DevicePtr;
use dsc_compiler::plan::Plan;
use dsc_runtime::cpu::numerics::{e4m3_decode, matmul_fp8, quantize, Quantized, Tiling};
use dsc_runtime::cuda::exec::fp8_bytes;
use dsc_runtime::cuda::places::Places;
use dsc_runtime::cuda::scaled::{Fp8Operand, Groups, ScaledGemm};
use dsc_runtime::cuda::Gpu;
use dsc_runtime::rng::Rng;
use std::collections::HashSet;

fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    let diff: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (diff / norm).sqrt()
}

/// A·Bᵀ in float64 of the dequantised operands, A [m, k], B [n, k].
fn dequantised_product(a: &Quantized, b: &Quantized) -> Vec<f64> {
    let (da, db) = (a.dequantize(), b.dequantize());
    let k = a.n;
    (0..a.m * b.m)
        .map(|index| {
            let (i, j) = (index / b.m, index % b.m);
            (0..k).map(|kk| da[i * k + kk] * db[j * k + kk]).sum()
        })
        .collect()
}

#[test]
fn fp8_gemms_on_cublaslt_match_the_cpu_reference() {
    let gpu = match Gpu::open() {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let blas = gpu.blas(false).expect("cuBLAS and cuBLASLt");
    let mut rng = Rng::new(7);
    let mut worst: f64 = 0.0;
    for (m, n, k, b_groups) in
        // K = 768: six weight blocks a row, whose scales cuBLASLt reads padded to eight.
        [
            (256, 512, 1024, Groups::Blocks),
            (256, 512, 768, Groups::Blocks),
            (128, 2112, 7168, Groups::Blocks),
            (512, 384, 4096, Groups::Tiles),
            // Few rows, as an expert's piece may have (M a multiple of 4: cuBLASLt refuses M = 1).
            (4, 256, 256, Groups::Blocks),
            (12, 512, 384, Groups::Blocks),
            (16, 256, 1024, Groups::Tiles),
            (1540, 2048, 1024, Groups::Blocks),
        ]
    {
        let b_tiling = match b_groups {
            Groups::Tiles => Tiling::ACTIVATION,
            Groups::Blocks => Tiling::WEIGHT,
        };
        // Rows of different magnitudes, so that scales differ from group to group.
        let scaled = |rng: &mut Rng, rows: usize| -> Vec<f64> {
            rng.gaussians(rows * k)
                .into_iter()
                .enumerate()
                .map(|(i, x)| x * 2f64.powi((i / k % 7) as i32 - 3))
                .collect()
        };
        let a = quantize(&scaled(&mut rng, m), m, k, Tiling::ACTIVATION);
        let b = quantize(&scaled(&mut rng, n), n, k, b_tiling);
        let want: Vec<f64> = matmul_fp8(&a, &b.transposed(), 128);
        let exact = dequantised_product(&a, &b);
        let (bytes_a, bytes_b) = (fp8_bytes(&a), fp8_bytes(&b));
        let on_gpu = |bytes: &[u8]| gpu.stream.clone_htod(bytes).expect("upload");
        let (da, db) = (on_gpu(&bytes_a), on_gpu(&bytes_b));
        let dd = gpu.stream.clone_htod(&vec![f32::NAN; m * n]).expect("upload");
        {
            let ((pa, _sa), (pb, _sb), (pd, _sd)) =
                (da.device_ptr(&gpu.stream), db.device_ptr(&gpu.stream), dd.device_ptr(&gpu.stream));
            let (a, b) = (Fp8Operand::buffer(pa, m, k), Fp8Operand::buffer(pb, n, k));
            let g = ScaledGemm { a, b, d: pd, m, n, k, b_groups, accumulate: false };
            blas.fp8.run(&gpu, &g).expect("cuBLASLt FP8 GEMM");
        }
        let got: Vec<f64> = gpu.stream.clone_dtoh(&dd).expect("download").into_iter().map(f64::from).collect();
        let (vs_cpu, vs_f64) = (relative_error(&got, &want), relative_error(&got, &exact));
        println!("m {m} n {n} k {k} {b_groups:?}: vs CPU FP8 GEMM {vs_cpu:.2e}, vs f64 {vs_f64:.2e}");
        // DESIGN.md's bound for FP8 against the FP8-emulated reference: the tensor cores sum a
        // 128-element chunk in reduced precision, which the reference (exact products summed in
        // f32) does not model.
        assert!(vs_cpu <= 1e-3 && vs_f64 <= 1e-3, "m {m} n {n} k {k} {b_groups:?}: {vs_cpu:.2e} / {vs_f64:.2e}");
        worst = worst.max(vs_cpu);
    }
    println!("worst relative error against the CPU reference: {worst:.2e}");
}

/// A random FP8 matrix made directly (quantising Gaussians of the bench plan's sizes on the
/// CPU would take minutes): random non-NaN E4M3 codes, each group's scale 2^e·(1 + u) with e in
/// −4..4.
fn random_fp8(rng: &mut Rng, m: usize, n: usize, tiling: Tiling) -> Quantized {
    let values = (0..m * n)
        .map(|_| {
            let code = (rng.next_u64() & 0xFF) as u8;
            e4m3_decode(if code & 0x7F == 0x7F { code ^ 1 } else { code })
        })
        .collect();
    let groups = m.div_ceil(tiling.rows) * n.div_ceil(tiling.cols);
    let scales =
        (0..groups).map(|_| f64::from((2f64.powi(rng.below(9) as i32 - 4) * (1.0 + rng.uniform())) as f32)).collect();
    Quantized { values, scales, m, n, tiling }
}

/// The GPU and the bench plan (`DSC_TEST_PLAN_BENCH`, default `target/plan-bench`: `dsc compile
/// models/deepseek-v3-bench.dsc -o target/plan-bench`), or `None` with the reason printed.
fn gpu_and_bench_plan() -> Option<(Gpu, Plan, std::path::PathBuf)> {
    let gpu = Gpu::open().map_err(|e| eprintln!("skipped: {e}")).ok()?;
    let dir = std::env::var("DSC_TEST_PLAN_BENCH")
        .unwrap_or_else(|_| format!("{}/../target/plan-bench", env!("CARGO_MANIFEST_DIR")));
    let plan = Plan::read(std::path::Path::new(&dir));
    plan.map_err(|_| eprintln!("skipped: no compiled plan at {dir} (set DSC_TEST_PLAN_BENCH)"))
        .ok()
        .map(|plan| (gpu, plan, dir.into()))
}

/// Every FP8 GEMM of the bench plan (`DSC_TEST_PLAN_BENCH`, default `target/plan-bench`:
/// `dsc compile models/deepseek-v3-bench.dsc -o target/plan-bench`) that the CUDA backend puts
/// on cuBLASLt (each distinct form once: the layers repeat them), run through `gemm::run` on
/// its own buffers in the function's arena (random
/// operands quantised in the groups their producers write): the first rows of each result
/// (all of them would take the CPU minutes) match the CPU reference's FP8 GEMM within 1e-3.
/// This checks the library GEMM's wiring: which operand is which, the K-major layouts, the
/// scale groups, the parts of the concatenated form, the second product of the sum added to
/// the first's. Then each runs again adding to its results ([`adds_in_place`]).
#[test]
fn the_bench_plans_fp8_gemms_run_on_cublaslt() {
    use dsc_compiler::fuse::kernels::{base, Code};
    use dsc_compiler::graph::ir::{Op, V};
    use dsc_compiler::mlir::fp8;
    use dsc_runtime::cuda::gemm;
    let Some((gpu, plan, _)) = gpu_and_bench_plan() else { return };
    let blas = gpu.blas(false).expect("cuBLAS and cuBLASLt");
    let mut rng = Rng::new(11);
    let (mut checked, mut worst, mut added) = (0, 0.0f64, 0);
    let mut seen = std::collections::HashSet::new();
    const ROWS: usize = 16;
    for (function, pf) in plan.module.functions.iter().zip(&plan.functions) {
        let packed = pf.packed_set();
        let layout = dsc_runtime::memory::plan(&pf.buffers);
        let bytes: std::collections::HashMap<u32, usize> =
            pf.buffers.iter().map(|b| (b.value, b.bytes as usize)).collect();
        for kernel in &pf.kernels {
            let v = kernel.nodes[0];
            let node = &function.nodes[v as usize];
            let scaled = matches!(
                node.op,
                Op::ScaledMatMul { .. } | Op::ConcatScaledMatMul { .. } | Op::ConcatKScaledMatMul { .. }
            );
            if !matches!(kernel.code, Code::Library) || !scaled || !gemm::runs(function, kernel, &packed) {
                continue;
            }
            let operand = |&a: &V| (function.node(a).shape.clone(), fp8::tiling(&function.node(base(function, a)).op));
            if !seen.insert((node.op.name(), node.args.iter().map(operand).collect::<Vec<_>>())) {
                continue;
            }
            let mut arena = gpu.stream.alloc_zeros::<u8>(layout.peak as usize).expect("arena");
            let mut operands = Vec::new();
            for &a in &node.args {
                let b = base(function, a);
                let (rows, cols) = fp8::tiling(&function.node(b).op).expect("an FP8 operand");
                let shape = &function.node(a).shape;
                let q = random_fp8(&mut rng, shape[0], shape[1], Tiling { rows, cols });
                let at = layout.offsets[&b.0] as usize;
                let encoded = fp8_bytes(&q);
                assert_eq!(encoded.len(), bytes[&b.0], "{}: operand %{} buffer", kernel.name, b.0);
                gpu.stream.memcpy_htod(&encoded, &mut arena.slice_mut(at..at + encoded.len())).expect("upload");
                operands.push(q);
            }
            let places = Places::arena(&gpu, &arena, &layout);
            let run = |adding: &HashSet<u32>| {
                gemm::run(&gpu, &blas, function, &packed, kernel, &places, &mut Default::default(), adding)
                    .expect("the FP8 GEMM")
            };
            run(&HashSet::new());
            // The results: the node's value (a product, or the sum of two), or each part of the
            // concatenated form.
            let results: Vec<u32> = match node.op {
                Op::ScaledMatMul { .. } | Op::ConcatKScaledMatMul { .. } => vec![v],
                _ => (0..2).map(|part| function.part(V(v), part).expect("a read part").0).collect(),
            };
            let (Op::ScaledMatMul { promote }
            | Op::ConcatScaledMatMul { promote }
            | Op::ConcatKScaledMatMul { promote }) = node.op
            else {
                unreachable!()
            };
            let rows = ROWS.min(operands[0].m);
            let product =
                |a: usize, b: usize| matmul_fp8(&operands[a].rows(0..rows), &operands[b].transposed(), promote);
            for (part, &r) in results.iter().enumerate() {
                let want = match node.op {
                    // Each product rounded to f32, then their sum.
                    Op::ConcatKScaledMatMul { .. } => {
                        product(0, 1).iter().zip(product(2, 3)).map(|(x, y)| f64::from(*x as f32 + y as f32)).collect()
                    }
                    _ => product(0, 1 + part),
                };
                let at = layout.offsets[&r] as usize;
                let got = gpu.stream.clone_dtoh(&arena.slice(at..at + want.len() * 4)).expect("download");
                let got: Vec<f64> =
                    got.chunks(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes")))).collect();
                let error = relative_error(&got, &want);
                assert!(error <= 1e-3, "{} part {part}: {error:.2e}", kernel.name);
                worst = worst.max(error);
                checked += 1;
            }
            assert!(gemm::accumulates(function, kernel, &packed), "{} adds in place", kernel.name);
            added += adds_in_place(&gpu, &arena, &layout, function, &results, run);
        }
    }
    println!("{checked} FP8 GEMM results of the bench plan on cuBLASLt, worst relative error {worst:.2e}; {added} added in place");
    assert!(checked >= 10, "only {checked} FP8 GEMMs on cuBLASLt in the bench plan");
}

/// Random expert offsets over `rows` rows: sorted cuts, two experts empty, the last expert's
/// rows (almost surely) not a multiple of 16, so that its final rows go through the scratch
/// buffers.
fn random_offsets(rng: &mut Rng, rows: usize, experts: usize) -> Vec<i32> {
    let mut cuts: Vec<usize> = (0..experts - 1).map(|_| rng.below(rows + 1)).collect();
    cuts.sort_unstable();
    cuts[3] = cuts[2];
    cuts[4] = cuts[2];
    std::iter::once(0).chain(cuts).chain(std::iter::once(rows)).map(|o| o as i32).collect()
}

/// Every grouped FP8 GEMM form of the bench plan (Fprop, its concatenated gate and up form,
/// Dgrad, the gate's and up projection's Dgrads summed, and the Wgrad on `quantize_by_expert`
/// operands), each distinct form once, run
/// through `gemm::run` on random FP8 operands and random expert offsets (two experts empty, a
/// ragged last one): the first and last rows of the first, a middle and the last expert with
/// rows match the CPU reference's FP8 GEMM of those rows within 1e-3 (all of them would take
/// the CPU minutes); rows of the Wgrad's result likewise, and an empty expert's gradient is 0,
/// and the Wgrad run again adds to its result ([`adds_in_place`]). Twice: with cuBLASLt, one
/// product per expert (not the sum, which only the compiler's GEMM adds), and with the
/// compiler's expert GEMMs the plan carries (the offsets read on the device).
#[test]
fn the_bench_plans_grouped_fp8_gemms_run_on_the_gpu() {
    use dsc_runtime::cuda::generated::GeneratedGemms;
    let Some((gpu, plan, dir)) = gpu_and_bench_plan() else { return };
    let mut blas = gpu.blas(false).expect("cuBLAS and cuBLASLt");
    grouped_rows_match(&gpu, &plan, &blas, "cuBLASLt, one product per expert");
    blas.generated = GeneratedGemms::load(&gpu, &plan, &dir).expect("the plan's expert GEMMs load");
    use dsc_compiler::mlir::gemm::Form;
    let carried = [Form::Grouped, Form::Wgrad].iter().all(|&form| !blas.generated.candidates(form).is_empty());
    assert!(carried, "the bench plan carries the compiler's grouped FP8 GEMM and Wgrad");
    grouped_rows_match(&gpu, &plan, &blas, "the compiler's expert GEMMs");
}

/// The check of `the_bench_plans_grouped_fp8_gemms_run_on_the_gpu` with `blas`, on `path`.
fn grouped_rows_match(gpu: &Gpu, plan: &Plan, blas: &dsc_runtime::cuda::gemm::Blas, path: &str) {
    use dsc_compiler::fuse::kernels::{base, Code};
    use dsc_compiler::graph::ir::{Op, V};
    use dsc_compiler::mlir::fp8;
    use dsc_runtime::cuda::gemm;
    let mut rng = Rng::new(13);
    let (mut checked, mut worst, mut added) = (0, 0.0f64, 0);
    let mut seen = std::collections::HashSet::new();
    let read = |arena: &cudarc::driver::CudaSlice<u8>, at: usize, count: usize| -> Vec<f64> {
        let bytes = gpu.stream.clone_dtoh(&arena.slice(at..at + 4 * count)).expect("download");
        bytes.chunks(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes")))).collect()
    };
    for (function, pf) in plan.module.functions.iter().zip(&plan.functions) {
        let packed = pf.packed_set();
        let layout = dsc_runtime::memory::plan(&pf.buffers);
        for kernel in &pf.kernels {
            let v = kernel.nodes[0];
            let node = &function.nodes[v as usize];
            let grouped = matches!(
                node.op,
                Op::GroupedMatMul { fp8: Some(_), .. }
                    | Op::ConcatGroupedMatMul { fp8: Some(_), .. }
                    | Op::ScaledGroupedWgrad { .. }
                    | Op::ConcatKScaledGroupedMatMul { .. }
            );
            let sum = matches!(node.op, Op::ConcatKScaledGroupedMatMul { .. });
            if !matches!(kernel.code, Code::Library)
                || !grouped
                || (sum && blas.generated.candidates(dsc_compiler::mlir::gemm::Form::Grouped).is_empty())
            {
                continue;
            }
            assert!(gemm::runs(function, kernel, &packed), "{} runs on the GPU", kernel.name);
            let shapes: Vec<Vec<usize>> = node.args.iter().map(|&a| function.node(a).shape.clone()).collect();
            if !seen.insert((node.op.name(), shapes)) {
                continue;
            }
            let mut arena = gpu.stream.alloc_zeros::<u8>(layout.peak as usize).expect("arena");
            let offsets_value = base(function, *node.args.last().expect("offsets")).0;
            let experts = function.nodes[offsets_value as usize].shape[0] - 1;
            let mut operands = Vec::new();
            for &a in &node.args[..node.args.len() - 1] {
                let b = base(function, a);
                let (rows, cols) = fp8::tiling(&function.node(b).op).expect("an FP8 operand");
                let shape = &function.node(a).shape;
                let m = shape[..shape.len() - 1].iter().product();
                let q = random_fp8(&mut rng, m, *shape.last().expect("a matrix"), Tiling { rows, cols });
                let at = layout.offsets[&b.0] as usize;
                let encoded = fp8_bytes(&q);
                gpu.stream.memcpy_htod(&encoded, &mut arena.slice_mut(at..at + encoded.len())).expect("upload");
                operands.push(q);
            }
            // The rows the offsets cover: xs's rows, or the Wgrad's tokens (at most its capacity
            // less the padding).
            let rows = match node.op {
                Op::ScaledGroupedWgrad { .. } => operands[0].n - 127 * experts,
                _ => operands[0].m,
            };
            let offsets = random_offsets(&mut rng, rows, experts);
            let offsets_bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
            let at = layout.offsets[&offsets_value] as usize;
            gpu.stream.memcpy_htod(&offsets_bytes, &mut arena.slice_mut(at..at + offsets_bytes.len())).expect("upload");
            let places = Places::arena(gpu, &arena, &layout);
            let run = |adding: &HashSet<u32>| {
                gemm::run(gpu, blas, function, &packed, kernel, &places, &mut Default::default(), adding)
                    .expect("the grouped FP8 GEMM")
            };
            run(&HashSet::new());
            let with_rows: Vec<usize> = (0..experts).filter(|&e| offsets[e] < offsets[e + 1]).collect();
            let picked = [with_rows[0], with_rows[with_rows.len() / 2], with_rows[with_rows.len() - 1]];
            let mut compare = |got: Vec<f64>, want: Vec<f64>, what: String| {
                let error = relative_error(&got, &want);
                assert!(error <= 1e-3, "{} {what}: {error:.2e}", kernel.name);
                worst = worst.max(error);
                checked += 1;
            };
            match node.op {
                Op::ScaledGroupedWgrad { promote } => {
                    let (qg, qx) = (&operands[0], &operands[1]);
                    let (n, k) = (qg.m, qx.m);
                    let mut start = 0;
                    for e in 0..experts {
                        let columns = start..start + ((offsets[e + 1] - offsets[e]) as usize).next_multiple_of(128);
                        start = columns.end;
                        let out = layout.offsets[&v] as usize + 4 * e * n * k;
                        if columns.is_empty() {
                            assert!(read(&arena, out, n * k).iter().all(|&x| x == 0.0), "empty expert {e}: zero");
                            continue;
                        }
                        if !picked.contains(&e) {
                            continue;
                        }
                        let xe = qx.columns(columns.clone()).transposed();
                        for row in [0, n - 1] {
                            let want = matmul_fp8(&qg.rows(row..row + 1).columns(columns.clone()), &xe, promote);
                            compare(read(&arena, out + 4 * row * k, k), want, format!("expert {e} row {row}"));
                        }
                    }
                    assert!(gemm::accumulates(function, kernel, &packed), "{} adds in place", kernel.name);
                    added += adds_in_place(gpu, &arena, &layout, function, &[v], run);
                }
                // The first and second pairs' products of a row, added.
                Op::ConcatKScaledGroupedMatMul { fp8 } => {
                    let n = operands[1].m / experts;
                    for &e in &picked {
                        let (first, last) = (offsets[e] as usize, offsets[e + 1] as usize - 1);
                        for row in [first, last] {
                            let product = |x: &Quantized, w: &Quantized| {
                                matmul_fp8(&x.rows(row..row + 1), &w.rows(e * n..(e + 1) * n).transposed(), fp8.promote)
                            };
                            let (p1, p2) = (product(&operands[0], &operands[1]), product(&operands[2], &operands[3]));
                            let want = p1.iter().zip(&p2).map(|(a, b)| f64::from((a + b) as f32)).collect();
                            let got = read(&arena, layout.offsets[&v] as usize + 4 * row * n, n);
                            compare(got, want, format!("sum expert {e} row {row}"));
                        }
                    }
                }
                _ => {
                    let Some(f) = (match node.op {
                        Op::GroupedMatMul { fp8, .. } | Op::ConcatGroupedMatMul { fp8, .. } => fp8,
                        _ => None,
                    }) else {
                        unreachable!()
                    };
                    let results: Vec<u32> = match node.op {
                        Op::GroupedMatMul { .. } => vec![v],
                        _ => (0..2).map(|part| function.part(V(v), part).expect("a read part").0).collect(),
                    };
                    for (part, &r) in results.iter().enumerate() {
                        let w = &operands[1 + part];
                        let n = w.m / experts;
                        for &e in &picked {
                            let we = w.rows(e * n..(e + 1) * n).transposed();
                            let (first, last) = (offsets[e] as usize, offsets[e + 1] as usize - 1);
                            for row in
                                [first, first + 1, last - 1, last].into_iter().filter(|&r| r >= first && r <= last)
                            {
                                let want = matmul_fp8(&operands[0].rows(row..row + 1), &we, f.promote);
                                let got = read(&arena, layout.offsets[&r] as usize + 4 * row * n, n);
                                compare(got, want, format!("part {part} expert {e} row {row}"));
                            }
                        }
                    }
                }
            }
        }
    }
    println!(
        "{checked} rows of the bench plan's grouped FP8 GEMMs ({path}), worst relative error {worst:.2e}; {added} Wgrads added in place"
    );
    assert!(checked >= 30, "only {checked} rows of grouped FP8 GEMMs checked");
    assert!(added >= 1, "no Wgrad added in place");
}

/// Runs a GEMM again (`run`, given the values it adds to) adding its `results` (values of
/// `function` in `arena` at `layout`'s offsets) to what they hold, as a step's later
/// micro-batches add their weight gradients to the first's: each comes out twice what it was
/// (the same products added once, within f32 rounding should the library sum them in another
/// order when it adds). How many were checked.
fn adds_in_place(
    gpu: &Gpu,
    arena: &cudarc::driver::CudaSlice<u8>,
    layout: &dsc_runtime::memory::Layout,
    function: &dsc_compiler::graph::ir::Function,
    results: &[u32],
    run: impl FnOnce(&HashSet<u32>),
) -> usize {
    let read = |r: u32| {
        let (at, count) = (layout.offsets[&r] as usize, function.nodes[r as usize].shape.iter().product::<usize>());
        let bytes = gpu.stream.clone_dtoh(&arena.slice(at..at + 4 * count)).expect("download");
        bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect::<Vec<f32>>()
    };
    let before: Vec<Vec<f32>> = results.iter().map(|&r| read(r)).collect();
    run(&results.iter().copied().collect());
    for (&r, before) in results.iter().zip(&before) {
        let after: Vec<f64> = read(r).into_iter().map(f64::from).collect();
        let twice: Vec<f64> = before.iter().map(|&x| 2.0 * f64::from(x)).collect();
        let error = relative_error(&after, &twice);
        assert!(error <= 1e-6, "%{r}: {error:.2e} off twice what it held");
    }
    results.len()
}

/// The bench spec: from the checkout this test was built in, or, where that is not here (the
/// GPU machine runs the binary built elsewhere, from its copy's root), from the current
/// directory.
fn bench_spec() -> std::path::PathBuf {
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-bench.dsc");
    if built.exists() {
        built
    } else {
        std::path::PathBuf::from("models/deepseek-v3-bench.dsc")
    }
}

/// Without a GPU: every library GEMM of the bench plan (compiled here, without MLIR) runs on
/// the GPU backend, none on the host (MLA's K = 576 padded to 640, the attention output's
/// residual added after a reshape).
#[test]
fn every_library_gemm_of_the_bench_plan_runs_on_the_gpu() {
    use dsc_compiler::fuse::kernels::{Code, KernelKind};
    use dsc_runtime::cuda::gemm;
    let spec = dsc_lang::load(&bench_spec(), &[]).checked_spec().expect("the bench spec").clone();
    let plan = dsc_compiler::plan::compile(&spec, dsc_compiler::fuse::Limits::default());
    let (mut library, mut host) = (0, Vec::new());
    for (function, pf) in plan.module.functions.iter().zip(&plan.functions) {
        let packed = pf.packed_set();
        for kernel in pf.kernels.iter().filter(|k| matches!(k.code, Code::Library) && k.kind == KernelKind::LibraryGemm)
        {
            library += 1;
            if !gemm::runs(function, kernel, &packed) {
                host.push(kernel.name.clone());
            }
        }
    }
    assert!(host.is_empty(), "on the host: {host:?}");
    assert!(library > 50, "only {library} library GEMMs");
}

/// Without a GPU: `dsc tune`'s sites in the bench plan (compiled here) are its dense FP8 Fprop
/// and Dgrad products (over the tokens, K in 128-element blocks) and its experts' FP8 GEMMs, the Fprop and Dgrad products (grouped) and the weight
/// gradients, with their shapes; the offsets it measures the experts on split the rows
/// unevenly, every expert some.
#[test]
fn the_bench_plans_fp8_gemms_are_what_tuning_measures() {
    use dsc_compiler::mlir::gemm::Form;
    use dsc_runtime::cuda::gemm::GemmSite;
    use dsc_runtime::cuda::tune::uneven_offsets;
    let spec = dsc_lang::load(&bench_spec(), &[]).checked_spec().expect("the bench spec").clone();
    let plan = dsc_compiler::plan::compile(&spec, dsc_compiler::fuse::Limits::default());
    let moe = spec
        .model
        .ffn
        .iter()
        .find_map(|range| match &range.ffn {
            dsc_lang::Ffn::Moe(moe) => Some(moe),
            dsc_lang::Ffn::Dense { .. } => None,
        })
        .expect("routed experts");
    let (hidden, intermediate) = (spec.model.hidden as usize, moe.intermediate as usize);
    let experts = moe.routed_experts as usize;
    let rows = (spec.train.micro_batch * spec.train.seq_len) as usize * moe.top_k as usize;
    let mut sites = Vec::new();
    for (function, pf) in plan.module.functions.iter().zip(&plan.functions) {
        let packed = pf.packed_set();
        sites.extend(pf.kernels.iter().filter_map(|k| GemmSite::of(function, k, &packed)));
    }
    let tokens = (spec.train.micro_batch * spec.train.seq_len) as usize;
    let dense: Vec<&GemmSite> = sites.iter().filter(|s| s.form == Form::Dense).collect();
    assert!(dense.len() > 20, "{} dense sites", dense.len());
    for site in &dense {
        let [m, _, k, e] = site.shape;
        assert!(m == tokens && k.is_multiple_of(128) && e == 1 && site.offsets.is_none(), "{:?}", site.shape);
    }
    let grouped: Vec<[usize; 4]> = sites.iter().filter(|s| s.form == Form::Grouped).map(|s| s.shape).collect();
    let wgrads: Vec<[usize; 4]> = sites.iter().filter(|s| s.form == Form::Wgrad).map(|s| s.shape).collect();
    // Forward (and its recomputation): gate and up (a product each), then down; backward:
    // down's Dgrad, then gate's and up's summed.
    for shape in [[rows, intermediate, hidden, experts], [rows, hidden, intermediate, experts]] {
        assert_eq!(grouped.iter().filter(|&&s| s == shape).count(), 3, "{shape:?} in {grouped:?}");
    }
    assert_eq!(grouped.len(), 6, "{grouped:?}");
    assert_eq!(wgrads.len(), 3, "{wgrads:?}");
    for [m, n, capacity, e] in wgrads {
        assert!([(intermediate, hidden), (hidden, intermediate)].contains(&(m, n)), "{m}×{n}");
        assert!(capacity >= rows && capacity.is_multiple_of(128) && e == experts, "{capacity}");
    }
    let offsets = uneven_offsets(rows, experts);
    assert_eq!((offsets.len(), offsets[0], offsets[experts]), (experts + 1, 0, rows));
    let counts: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    let mean = rows as f64 / experts as f64;
    assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    let busiest = *counts.iter().max().unwrap() as f64 / mean;
    assert!((1.4..1.6).contains(&busiest), "the busiest expert has {busiest} times the mean");
}

/// `dsc tune` on the bench plan (`DSC_TEST_PLAN_BENCH`, with the PTX): every dense and expert
/// FP8 GEMM measured on cuBLASLt (but the grouped sum, which it cannot run) and on the tiles the
/// plan carries that fit it, every tile's result within `MAX_ERROR` of cuBLASLt's (the sum's:
/// the first tile's) on the same operands, the fastest chosen.
#[test]
fn tuning_measures_every_carried_tile_and_chooses_the_fastest() {
    use dsc_compiler::plan::tuning::{LIBRARY, MAX_ERROR};
    use dsc_runtime::cuda::tune;
    let Some((gpu, plan, dir)) = gpu_and_bench_plan() else { return };
    let tuning = tune::tune(&plan, &dir, &gpu, 3, |gemm| {
        let times: Vec<String> = gemm.measured.iter().map(|m| format!("{} {:.1} µs", m.candidate, m.micros)).collect();
        eprintln!("{}: {} -> {}", gemm.kernel, times.join(", "), gemm.chosen);
    })
    .expect("tuned");
    let experts = tuning.gemms.iter().filter(|g| g.kernel.contains("grouped")).count();
    assert!(experts >= 9 && tuning.gemms.len() > experts + 20, "{experts} of {} GEMMs", tuning.gemms.len());
    for gemm in &tuning.gemms {
        let library = gemm.measured.iter().filter(|m| m.candidate == LIBRARY).count();
        assert_eq!(library, usize::from(!gemm.kernel.contains("concat_k_scaled_grouped")), "{}", gemm.kernel);
        assert!(gemm.measured.len() > library, "{}: {:?}", gemm.kernel, gemm.measured);
        for m in &gemm.measured {
            assert!(m.error <= MAX_ERROR && m.micros > 0.0, "{}: {m:?}", gemm.kernel);
        }
        // The chosen one is as fast as the fastest right one.
        let fastest = gemm.measured.iter().filter(|m| m.error <= MAX_ERROR).map(|m| m.micros).fold(f64::MAX, f64::min);
        let chosen = gemm.measured.iter().find(|m| m.candidate == gemm.chosen).expect("the chosen one was measured");
        assert_eq!(chosen.micros, fastest, "{}", gemm.kernel);
    }
}
