//! Whole plan functions on the GPU: [`Executor::run`] takes a function's arguments on the host,
//! runs its steps in plan order in one arena per call (placed by [`crate::memory`]), and returns
//! its outputs on the host. A function reads its arguments where they are (the training state in
//! place, its caller's buffers, host values uploaded for the call, or written into buffers kept for
//! them: the step's host inputs, [`Executor::staged`], and a callee's constant arguments;
//! [`super::places`]), and the optimizer writes the results that replace them over them where that
//! is safe ([`memory::in_place`]). The steps are the function's nodes in order: an argument is
//! bound to its place, a constant table written into its buffer, a call runs the callee in an arena
//! of its own (its kernels writing its results into the caller's part buffers, results it does not
//! compute copied there, or added into the state's gradient sums: [`memory::delivered`]), and a
//! kernel runs at its first node (a quantisation of a weight already made this step is read where
//! [`super::weights`] keeps it instead): generated kernels from their PTX, library GEMMs on cuBLAS
//! and cuBLASLt ([`gemm`]), attention on the fused kernels ([`super::attention`]; a plan expands
//! any attention they do not take), and what none covers (FP8 GEMMs outside 128-element groups; an
//! expert-parallel stage's all-to-alls, through the [`Exchange`] it was given) on the host through
//! the CPU reference's own op, its inputs downloaded (FP8 buffers decoded) and its outputs
//! uploaded. Values the plan packs as bf16 (Adam's moments under the policy) are converted where
//! they cross to and from the host. A function's arena is kept for its next call. [`Counts`] says
//! how many kernels took each path.

use super::attention::FusedAttention;
use super::generated::GeneratedGemms;
use super::places::{self, Places};
use super::profile::Profile;
use super::weights::{Slot, WeightCache};
use super::{gemm, Gpu, GpuError, Kernels};
use crate::cpu::exchange::{self, Alone, Exchange};
use crate::cpu::exec::eval;
use crate::cpu::numerics::{bf16_bits, e4m3_decode, e4m3_encode, from_bf16_bits, Quantized, Tiling};
use crate::cpu::{Tensor, Value};
use crate::memory::{self, Layout};
use crate::train::{Backend, Resident};
use cudarc::driver::{CudaSlice, DevicePtr};
use dsc_compiler::fuse::kernels::{base, packs, Code, Kernel};
use dsc_compiler::graph::ir::{DType, Function, Node, Op, V};
use dsc_compiler::mlir::fp8;
use dsc_compiler::plan::Plan;
use dsc_lang::Dtype;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// How many kernels ran on each path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Generated kernels launched from PTX.
    pub generated: usize,
    /// GEMMs on cuBLAS.
    pub library: usize,
    /// Attention and its backward on the compiler's fused kernels.
    pub attention: usize,
    /// Kernels run on the host (FP8 and grouped GEMMs, for now).
    pub host: usize,
    /// Calls replayed from CUDA graphs ([`super::graphs`]; their kernels are counted above).
    pub graphs: usize,
}

impl std::ops::Add for Counts {
    type Output = Counts;
    fn add(self, other: Counts) -> Counts {
        Counts {
            generated: self.generated + other.generated,
            library: self.library + other.library,
            attention: self.attention + other.attention,
            host: self.host + other.host,
            graphs: self.graphs + other.graphs,
        }
    }
}

/// A function's arena against the sum of its buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arena {
    pub function: String,
    pub peak_bytes: u64,
    pub total_bytes: u64,
}

pub struct Executor {
    pub(super) gpu: Gpu,
    pub(super) blas: gemm::Blas,
    pub(super) plan: Arc<Plan>,
    kernels: Kernels,
    /// The plan's fused attention kernels, where it carries them.
    pub(super) attention: Option<FusedAttention>,
    /// Per function, its arena's layout ([`memory::layouts`]: it holds no argument).
    pub(super) layouts: Vec<Arc<Layout>>,
    /// Per function, the results it writes over its arguments ([`memory::in_place`]).
    in_place: Vec<HashMap<usize, u32>>,
    /// The gradient function's results handed to the state: by call result, its output's
    /// index ([`memory::delivered`]).
    pub(super) delivered: HashMap<u32, usize>,
    /// Per function, the bytes of each value's buffer.
    pub(super) bytes: Vec<HashMap<u32, usize>>,
    /// Per function, the values stored as packed bf16 (the plan's).
    packed: Vec<HashSet<u32>>,
    pub(super) counts: Counts,
    /// Synchronise after every kernel, so that a fault names it.
    checked: bool,
    /// The step's calls captured as CUDA graphs, unless launched eagerly ([`super::graphs`]).
    pub(super) graphs: Option<super::graphs::Graphs>,
    /// By (function, argument), the device buffer its values from the host are written into
    /// for each call ([`Executor::staged`]).
    staging: HashMap<(usize, usize), CudaSlice<u8>>,
    /// Per function, the arena of its last call, kept for the next (every buffer is written
    /// before it is read within a call, and `zeroed` outputs are cleared at their kernel).
    pub(super) spare: Vec<Option<CudaSlice<u8>>>,
    /// The module's constant tables (causal masks, RoPE tables) on the device, each computed
    /// and uploaded at its first use and copied on the device into the arenas after that.
    tables: Vec<Option<CudaSlice<u8>>>,
    /// The training state, once a trainer hands it over ([`super::resident`]).
    pub(super) state: Option<super::resident::DeviceState>,
    /// The data-parallel processes it shares the state with ([`Executor::join`]).
    pub(super) peers: Option<std::rc::Rc<super::nccl::Nccl>>,
    /// The step's FP8 weights, while the training state is here ([`super::weights`]).
    pub(super) weights: Option<WeightCache>,
    /// Where the time goes, when asked ([`Executor::profiled`]).
    profile: Option<Profile>,
    /// Where the MoE all-to-alls of an expert-parallel stage go ([`Executor::exchanging`]).
    exchange: Box<dyn Exchange>,
    /// By (function, value), whether [`Executor::accumulates`] (asked once each).
    accumulating: HashMap<(usize, u32), bool>,
}

/// An argument of a call: bytes on the host (uploaded for the call), a device buffer (its
/// address and length), or a scalar constant (written into a buffer kept for the argument).
pub(super) enum Input {
    Host(Vec<u8>),
    Device(u64, usize),
    Scalar(f32),
}

impl Input {
    fn len(&self) -> usize {
        match self {
            Input::Host(bytes) => bytes.len(),
            Input::Device(_, len) => *len,
            Input::Scalar(_) => 4,
        }
    }
}

/// A function's call: its arena and the arena's layout, its arguments' places and the
/// uploads holding its host arguments (freed in stream order with the call).
pub(super) struct Call {
    pub(super) arena: CudaSlice<u8>,
    pub(super) layout: Arc<Layout>,
    pub(super) outside: HashMap<u32, u64>,
    pub(super) uploads: Vec<CudaSlice<u8>>,
    pub(super) binding: Binding,
}

/// What a call is bound to beyond its arguments: the parameter of the training state each
/// argument is, where it is one (for [`super::weights`]); and values placed outside its arena
/// (`delivered`, by node): the gradient function's results handed straight to the state
/// ([`memory::delivered`]: each call result's address there), added to what is there (`add`:
/// after a step's first micro-batch) or copied; a callee's results, written where its caller
/// stores them, or added there by the GEMMs that make them (`adding`: a gradient summed over
/// micro-batches in place, [`gemm::accumulates`]).
#[derive(Clone)]
pub(super) struct Binding {
    pub(super) origins: Vec<Option<usize>>,
    pub(super) delivered: HashMap<u32, u64>,
    pub(super) add: bool,
    pub(super) adding: HashSet<u32>,
}

impl Binding {
    /// Arguments of their own, results in the arena.
    pub(super) fn none(args: usize) -> Binding {
        Binding { origins: vec![None; args], delivered: HashMap::new(), add: false, adding: HashSet::new() }
    }
}

impl Call {
    /// Where the call's values are.
    pub(super) fn places<'a>(&'a self, gpu: &Gpu) -> Places<'a> {
        Places::with_outside(gpu, &self.arena, &self.layout, &self.outside)
    }
}

/// One step of a function.
#[derive(Clone, Copy)]
enum Step {
    Kernel(usize),
    /// An argument, a constant table or a call, at its node.
    Node(u32),
}

pub(super) fn words<T: Copy>(data: &[T], to_bytes: impl Fn(T) -> [u8; 4]) -> Vec<u8> {
    data.iter().flat_map(|&x| to_bytes(x)).collect()
}

/// A host value as the bytes of its device buffer (reals f32, or bf16 where the plan packs
/// them: `packed`; indices i32, FP8 matrices as [`fp8_bytes`]).
pub fn encode(value: &Value<f32>, packed: bool) -> Result<Vec<u8>, GpuError> {
    match value {
        Value::Real(t) => Ok(real_bytes(&t.data, packed)),
        Value::Int(t) => Ok(words(&t.data, i32::to_le_bytes)),
        Value::Quantized(q) => Ok(fp8_bytes(q)),
        Value::Tuple(_) => Err(GpuError::Unsupported("a tuple made on the host".into())),
    }
}

/// Reals as a device buffer's bytes: f32, or bf16 where `packed`.
pub(super) fn real_bytes(data: &[f32], packed: bool) -> Vec<u8> {
    if packed {
        data.iter().flat_map(|&x| bf16_bits(x).to_le_bytes()).collect()
    } else {
        words(data, f32::to_le_bytes)
    }
}

/// Reals from a device buffer's bytes: f32, or bf16 where `packed`.
pub(super) fn reals(bytes: &[u8], packed: bool) -> Vec<f32> {
    if packed {
        bytes.chunks(2).map(|c| from_bf16_bits(u16::from_le_bytes([c[0], c[1]]))).collect()
    } else {
        bytes.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
}

/// An FP8 matrix in the plan's buffer layout (compiler::mlir::fp8): E4M3 bytes row-major, then
/// from a 16-byte boundary one f32 scale per group in `fp8::scale_index`'s order.
pub fn fp8_bytes(q: &Quantized) -> Vec<u8> {
    let (row_groups, col_groups) = (q.m.div_ceil(q.tiling.rows), q.n.div_ceil(q.tiling.cols));
    let mut bytes: Vec<u8> = q.values.iter().map(|&v| e4m3_encode(v)).collect();
    let at = (q.m * q.n).next_multiple_of(16);
    bytes.resize(at + 4 * fp8::scale_count(q.tiling.rows, row_groups, col_groups), 0);
    for gi in 0..row_groups {
        for gj in 0..col_groups {
            let o = at + 4 * fp8::scale_index(q.tiling.rows, row_groups, col_groups, gi, gj);
            bytes[o..o + 4].copy_from_slice(&(q.scales[gi * col_groups + gj] as f32).to_le_bytes());
        }
    }
    bytes
}

/// A device buffer of `node` as a host value of `shape` (the node's, or a view's); `packed`:
/// the plan stores it as bf16.
pub fn decode(node: &Node, shape: &[usize], bytes: &[u8], packed: bool) -> Value<f32> {
    let word = |c: &[u8]| -> [u8; 4] { c.try_into().expect("4 bytes") };
    if let Some((rows, cols)) = fp8::tiling(&node.op) {
        // E4M3 bytes row-major, then from a 16-byte boundary one f32 scale per group in
        // compiler::mlir::fp8's order.
        let n = *node.shape.last().unwrap_or(&1);
        let m = node.shape.iter().product::<usize>() / n.max(1);
        let tiling = Tiling { rows, cols };
        let (row_groups, col_groups) = (m.div_ceil(rows), n.div_ceil(cols));
        let at = (m * n).next_multiple_of(16);
        let scale = |gi: usize, gj: usize| {
            let o = at + 4 * fp8::scale_index(rows, row_groups, col_groups, gi, gj);
            f64::from(f32::from_le_bytes(word(&bytes[o..o + 4])))
        };
        let scales =
            (0..row_groups).flat_map(|gi| (0..col_groups).map(move |gj| (gi, gj))).map(|(gi, gj)| scale(gi, gj));
        return Value::Quantized(std::sync::Arc::new(Quantized {
            values: bytes[..m * n].iter().map(|&b| e4m3_decode(b)).collect(),
            scales: scales.collect(),
            m,
            n,
            tiling,
        }));
    }
    let shape = shape.to_vec();
    match node.dtype {
        DType::I32 => Value::int(Tensor::new(shape, bytes.chunks(4).map(|c| i32::from_le_bytes(word(c))).collect())),
        _ => Value::real(Tensor::new(shape, reals(bytes, packed))),
    }
}

impl Executor {
    /// An executor of `plan` (compiled into `dir`, whose `kernels/` holds the PTX) on `gpu`.
    /// With `checked`, it synchronises after every kernel (slower; a fault names its kernel);
    /// without, it replays the training step's calls from CUDA graphs ([`super::graphs`]).
    /// Products of BF16 values (the head, the BF16 policy's linears, expanded attention's
    /// scores) run on BF16 tensor cores; the other f32 products of a lower-precision policy
    /// (the routers', expanded attention's others) on TF32 tensor cores, finer than the BF16
    /// the recipe allows them; an all-f32 policy keeps cuBLAS's exact f32 products. The plan
    /// may be shared (executors of one plan on several threads read one copy).
    pub fn new(plan: impl Into<Arc<Plan>>, dir: &Path, gpu: Gpu, checked: bool) -> Result<Executor, GpuError> {
        let plan: Arc<Plan> = plan.into();
        let mut blas = gpu.blas(plan.spec.precision.gemm != Dtype::F32)?;
        blas.generated = GeneratedGemms::load(&gpu, &plan, dir)?;
        let layouts = memory::layouts(&plan).into_iter().map(Arc::new).collect();
        let in_place = (0..plan.functions.len()).map(|f| memory::in_place(&plan, f)).collect();
        let delivered = memory::delivered(&plan, plan.grad);
        let bytes =
            plan.functions.iter().map(|pf| pf.buffers.iter().map(|b| (b.value, b.bytes as usize)).collect()).collect();
        let packed = plan.functions.iter().map(|pf| pf.packed_set()).collect();
        let kernels = Kernels::new(dir);
        let attention = FusedAttention::load(&gpu, &plan, dir)?;
        let spare = plan.functions.iter().map(|_| None).collect();
        let tables = plan.module.constants.iter().map(|_| None).collect();
        let counts = Counts::default();
        let graphs = (!checked).then(|| super::graphs::Graphs::new(&plan));
        Ok(Executor {
            gpu,
            blas,
            plan,
            kernels,
            attention,
            layouts,
            in_place,
            delivered,
            bytes,
            packed,
            counts,
            checked,
            graphs,
            staging: HashMap::new(),
            spare,
            tables,
            state: None,
            peers: None,
            weights: None,
            profile: None,
            exchange: Box::new(Alone),
            accumulating: HashMap::new(),
        })
    }

    /// Runs the MoE all-to-alls (`exchange_counts`, `dispatch`, `combine`) of the functions it
    /// runs through `exchange` from now on, on the host (the rows down, exchanged, up); returns
    /// the exchange they went through before.
    pub fn exchanging(&mut self, exchange: Box<dyn Exchange>) -> Box<dyn Exchange> {
        std::mem::replace(&mut self.exchange, exchange)
    }

    /// Runs cuBLAS's f32 products exactly (no TF32) whatever the policy, so that a plan's
    /// outputs can be held to the CPU reference at f32 precision.
    pub fn exact(mut self) -> Result<Self, GpuError> {
        let generated = std::mem::take(&mut self.blas.generated);
        self.blas = self.gpu.blas(false)?;
        self.blas.generated = generated;
        Ok(self)
    }

    /// Times every kernel and copy from now on ([`super::profile`]), each launched from the
    /// host (no CUDA graphs); `Backend::profile` reports them.
    pub fn profiled(mut self) -> Self {
        self.profile = Some(Profile::default());
        self.eager()
    }

    /// Launches every kernel from the host: no CUDA graphs.
    pub fn eager(mut self) -> Self {
        self.graphs = None;
        self
    }

    /// Host `bytes` for argument `a` of function `f`, written into the device buffer kept for
    /// it (made at its first call: the same one from call to call, as a captured graph needs).
    pub(super) fn staged(&mut self, f: usize, a: usize, bytes: &[u8]) -> Result<Input, GpuError> {
        let at = self.staging_buffer(f, a, bytes.len())?;
        places::write(&self.gpu, bytes, at)?;
        Ok(Input::Device(at, bytes.len()))
    }

    /// The address of the buffer of `bytes` kept for argument `a` of function `f`.
    fn staging_buffer(&mut self, f: usize, a: usize, bytes: usize) -> Result<u64, GpuError> {
        let buffer = match self.staging.entry((f, a)) {
            std::collections::hash_map::Entry::Occupied(kept) if kept.get().len() == bytes => kept.into_mut(),
            entry => {
                let buffer = self.gpu.stream.alloc_zeros::<u8>(bytes)?;
                entry.insert_entry(buffer).into_mut()
            }
        };
        Ok(buffer.device_ptr(&self.gpu.stream).0)
    }

    /// Runs `run`, timed as `category` (and as the plan's kernel `kernel`, if it is one) when
    /// profiled.
    fn timed<R>(
        &mut self,
        category: impl FnOnce(&Self) -> String,
        kernel: Option<&str>,
        estimate_s: f64,
        run: impl FnOnce(&mut Self) -> Result<R, GpuError>,
    ) -> Result<R, GpuError> {
        let Some(mut profile) = self.profile.take() else { return run(self) };
        let (stream, category) = (self.gpu.stream.clone(), category(self));
        let result = profile.measure(&stream, category, kernel.map(str::to_string), estimate_s, || run(self));
        self.profile = Some(profile);
        result
    }

    /// Ends a top-level call of kind `call` that began at `started`: reads back what the
    /// profile measured.
    pub(super) fn settle_profile(&mut self, call: &str, started: std::time::Instant) -> Result<(), GpuError> {
        match &mut self.profile {
            Some(profile) => profile.settle(call, started.elapsed().as_secs_f64()),
            None => Ok(()),
        }
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Each function's arena (the peak of its buffers placed by lifetime) and the sum of its
    /// buffers.
    pub fn arenas(&self) -> Vec<Arena> {
        self.plan
            .functions
            .iter()
            .zip(&self.layouts)
            .map(|(pf, l)| Arena { function: pf.name.clone(), peak_bytes: l.peak, total_bytes: l.total })
            .collect()
    }

    /// Runs function `f` on host arguments; its outputs on the host.
    pub fn run(&mut self, f: usize, args: &[Value<f32>]) -> Result<Vec<Value<f32>>, GpuError> {
        let plan = self.plan.clone();
        let function = &plan.module.functions[f];
        if args.len() != function.args.len() {
            let (name, want) = (&function.name, function.args.len());
            return Err(GpuError::Unsupported(format!("{name} takes {want} arguments, not {}", args.len())));
        }
        let started = std::time::Instant::now();
        let inputs = args
            .iter()
            .zip(&function.args)
            .map(|(a, (_, _, dtype))| encode(a, packs(*dtype)).map(Input::Host))
            .collect::<Result<Vec<_>, _>>()?;
        // Results the gradient hands to the state get buffers of their own here.
        let mut binding = Binding::none(inputs.len());
        let mut kept = Vec::new();
        if f == plan.grad {
            for &part in self.delivered.keys() {
                let buffer = self.gpu.stream.alloc_zeros::<u8>(self.bytes[f][&part])?;
                binding.delivered.insert(part, buffer.device_ptr(&self.gpu.stream).0);
                kept.push(buffer);
            }
        }
        let call = self.invoke(f, &inputs, binding)?;
        let outputs = function.outputs.iter().map(|&o| self.output(f, o, &call)).collect();
        self.spare[f] = Some(call.arena);
        self.settle_profile(&function.name, started)?;
        outputs
    }

    /// Output value `o` of `call` (of function `f`), on the host.
    pub(super) fn output(&self, f: usize, o: dsc_compiler::graph::ir::V, call: &Call) -> Result<Value<f32>, GpuError> {
        let function = &self.plan.module.functions[f];
        let node = function.node(o);
        let b = base(function, o);
        match function.node(b).op {
            Op::Const(c) => Ok(Value::real(Tensor::filled(node.shape.clone(), c as f32))),
            _ => {
                let bytes = places::read(&self.gpu, call.places(&self.gpu).at(b.0), self.bytes[f][&b.0])?;
                let stored = function.node(b);
                Ok(decode(stored, &node.shape, &bytes, packs(stored.dtype)))
            }
        }
    }

    /// Runs function `f` in an arena of its own (its last call's, or a new one), bound to
    /// `binding`.
    pub(super) fn invoke(&mut self, f: usize, args: &[Input], binding: Binding) -> Result<Call, GpuError> {
        let plan = self.plan.clone();
        let layout = self.layouts[f].clone();
        let function = &plan.module.functions[f];
        let pf = &plan.functions[f];
        let arena = match self.spare[f].take() {
            Some(arena) => arena,
            None => self.gpu.stream.alloc_zeros::<u8>(layout.peak.max(1) as usize)?,
        };
        let outside = binding.delivered.clone();
        let mut call = Call { arena, layout, outside, uploads: Vec::new(), binding };
        let mut steps: Vec<(u32, Step)> =
            pf.kernels.iter().enumerate().map(|(k, kernel)| (kernel.nodes[0], Step::Kernel(k))).collect();
        steps.extend(
            function
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| matches!(n.op, Op::Arg(_) | Op::Table(_) | Op::Call(_)))
                .map(|(i, _)| (i as u32, Step::Node(i as u32))),
        );
        steps.sort_by_key(|(node, _)| *node);
        let mut tables: HashSet<u32> = HashSet::new();
        let mut read_back = gemm::ReadBack::default();
        for (_, step) in steps {
            let at = |e: GpuError, what: &str| GpuError::At(format!("{}: {what}", function.name), Box::new(e));
            match step {
                Step::Node(i) => match function.nodes[i as usize].op {
                    Op::Arg(a) if self.bytes[f].contains_key(&i) => {
                        let (given, want) = (args[a].len(), self.bytes[f][&i]);
                        if given != want {
                            let e = GpuError::Unsupported(format!("{given} bytes for a buffer of {want}"));
                            return Err(at(e, &format!("argument {a}")));
                        }
                        let place = match &args[a] {
                            Input::Device(place, _) => *place,
                            Input::Host(bytes) => {
                                let upload = self.gpu.stream.clone_htod(bytes)?;
                                let place = upload.device_ptr(&self.gpu.stream).0;
                                call.uploads.push(upload);
                                place
                            }
                            Input::Scalar(x) => {
                                let place = self.staging_buffer(f, a, 4)?;
                                places::fill_words(&self.gpu, place, 1, x.to_bits())?;
                                place
                            }
                        };
                        call.outside.insert(i, place);
                        if let Some(&result) = self.in_place[f].get(&a) {
                            call.outside.insert(result, place);
                        }
                    }
                    Op::Table(_) => self.upload_table(f, i, &call.places(&self.gpu), &mut tables)?,
                    Op::Call(callee) => self
                        .call(f, i, callee, &call.places(&self.gpu), &call.binding)
                        .map_err(|e| at(e, &format!("call at %{i}")))?,
                    _ => {}
                },
                Step::Kernel(k) => {
                    let kernel = &pf.kernels[k];
                    // A parameter's quantisation already made this step is read where it is.
                    if let Some(cache) = &mut self.weights {
                        let bytes = &self.bytes[f];
                        if let Some(Slot { node, at, fresh }) =
                            cache.slot(&self.gpu, function, kernel, &call.binding.origins, |v| bytes[&v])?
                        {
                            call.outside.insert(node, at);
                            if fresh {
                                continue;
                            }
                        }
                    }
                    let places = call.places(&self.gpu);
                    for &v in &kernel.inputs {
                        if matches!(function.nodes[v as usize].op, Op::Table(_)) {
                            self.upload_table(f, v, &places, &mut tables)?;
                        }
                    }
                    let category = |this: &Self| format!("{} {}", this.plan.module.functions[f].name, kernel.ops[0]);
                    let adding = &call.binding.adding;
                    self.timed(category, Some(&kernel.name), kernel.seconds, |this| {
                        this.launch(f, kernel, &places, &mut read_back, adding)
                    })
                    .map_err(|e| at(e, &kernel.name))?;
                    if self.checked {
                        self.gpu.stream.synchronize().map_err(|e| at(e.into(), &kernel.name))?;
                    }
                }
            }
        }
        Ok(call)
    }

    /// Writes constant table node `v` into its buffer, once per call.
    fn upload_table(&mut self, f: usize, v: u32, places: &Places, done: &mut HashSet<u32>) -> Result<(), GpuError> {
        let Op::Table(t) = self.plan.module.functions[f].nodes[v as usize].op else { unreachable!("a table node") };
        if !done.insert(v) {
            return Ok(());
        }
        if self.tables[t].is_none() {
            let data: Vec<f32> = self.plan.module.constants[t].data().into_iter().map(|x| x as f32).collect();
            self.tables[t] = Some(self.gpu.stream.clone_htod(&words(&data, f32::to_le_bytes))?);
        }
        let (want, table) = (self.bytes[f][&v], self.tables[t].as_ref().expect("uploaded above"));
        if table.len() != want {
            return Err(GpuError::Unsupported(format!("table {t}: {} bytes for a buffer of {want}", table.len())));
        }
        let (from, _sync) = table.device_ptr(&self.gpu.stream);
        places::copy(&self.gpu, from, places.at(v), want)
    }

    /// Runs the call at node `i` of `f` (its values at `places`, bound to `binding`), and
    /// copies its results into the parts' buffers (or adds those `binding` delivers there).
    fn call(&mut self, f: usize, i: u32, callee: usize, places: &Places, binding: &Binding) -> Result<(), GpuError> {
        let plan = self.plan.clone();
        let function = &plan.module.functions[f];
        let node = &function.nodes[i as usize];
        let inputs: Vec<Input> = node
            .args
            .iter()
            .map(|&a| {
                let b = base(function, a);
                match function.node(b).op {
                    Op::Const(c) => Input::Scalar(c as f32),
                    _ => Input::Device(places.at(b.0), self.bytes[f][&b.0]),
                }
            })
            .collect();
        let origins = memory::weight_origins(function, node, &binding.origins);
        let called = &plan.module.functions[callee];
        // The parts of the call's result this function stores: its node, the callee's output
        // and its value, whether it is added into the state.
        let parts: Vec<(u32, usize, V, bool)> = (function.nodes.iter().enumerate())
            .filter_map(|(g, get)| match get.op {
                Op::Get(part) if get.args[0].0 == i && self.bytes[f].contains_key(&(g as u32)) => {
                    let g = g as u32;
                    let adds = binding.add && binding.delivered.contains_key(&g);
                    Some((g, part, base(called, called.outputs[part]), adds))
                }
                _ => None,
            })
            .collect();
        // The callee's kernels write its results straight into their part buffers (a part
        // lives from the call on, so it shares no bytes with the call's arguments), and its
        // GEMMs that can add theirs into the state's sums there; the rest (arguments passed
        // through, constants, other sums into the state) are copied, written or added after.
        let (mut delivered, mut adding) = (HashMap::new(), HashSet::new());
        for &(g, _, out, adds) in &parts {
            let computed = !matches!(called.node(out).op, Op::Const(_) | Op::Arg(_));
            if !computed || self.bytes[callee].get(&out.0) != self.bytes[f].get(&g) {
                continue;
            }
            if adds && self.accumulates(callee, out.0) {
                adding.insert(out.0);
            }
            if !adds || adding.contains(&out.0) {
                delivered.insert(out.0, places.at(g));
            }
        }
        let binding = Binding { origins, delivered, add: false, adding };
        let results = self.invoke(callee, &inputs, binding)?;
        for (g, part, out, adds) in parts {
            let (to, want) = (places.at(g), self.bytes[f][&g]);
            match called.node(out).op {
                Op::Const(c) if adds && c == 0.0 => {}
                Op::Const(c) if adds => {
                    return Err(GpuError::Unsupported(format!("a constant {c} added into the state")));
                }
                Op::Const(c) => places::fill_words(&self.gpu, to, want / 4, (c as f32).to_bits())?,
                _ => {
                    let given = self.bytes[callee][&out.0];
                    if given != want {
                        let name = &called.name;
                        return Err(GpuError::Unsupported(format!(
                            "result {part} of {name}: {given} bytes for {want}"
                        )));
                    }
                    let from = results.places(&self.gpu).at(out.0);
                    if !results.binding.adding.contains(&out.0) && (adds || from != to) {
                        self.move_bytes(&called.name, (from, to, want), adds)?;
                    }
                }
            }
        }
        self.spare[callee] = Some(results.arena);
        Ok(())
    }

    /// Copies the `bytes` at device address `from` to `to`, or with `add` adds their f32s into
    /// those there, in stream order; profiled as `what`'s result copy or add.
    pub(super) fn move_bytes(
        &mut self,
        what: &str,
        (from, to, bytes): (u64, u64, usize),
        add: bool,
    ) -> Result<(), GpuError> {
        let category = |_: &Self| format!("{what} result {}", if add { "add" } else { "copy" });
        self.timed(category, None, 0.0, |this| match add {
            true => this.add_into(from, to, bytes),
            false => places::copy(&this.gpu, from, to, bytes),
        })
    }

    /// Adds the f32s of the `bytes` at device address `from` into those at `to` (cuBLAS
    /// `saxpy`, in stream order).
    fn add_into(&self, from: u64, to: u64, bytes: usize) -> Result<(), GpuError> {
        let n = i32::try_from(bytes / 4)
            .map_err(|_| GpuError::Unsupported(format!("{} elements in one cuBLAS call", bytes / 4)))?;
        let one = 1.0f32;
        // SAFETY: both addresses hold bytes/4 f32s of live buffers, on the handle's stream.
        unsafe {
            cudarc::cublas::sys::cublasSaxpy_v2(
                *self.blas.f32.handle(),
                n,
                &one,
                from as *const f32,
                1,
                to as *mut f32,
                1,
            )
        }
        .result()
        .map_err(|e| GpuError::Unsupported(format!("cuBLAS saxpy: {e:?}")))
    }

    /// Whether value `v` of function `f` is made by a library GEMM that can add it to what
    /// its buffer holds ([`gemm::accumulates`]), and nothing in `f` reads it (which would read
    /// the sum).
    fn accumulates(&mut self, f: usize, v: u32) -> bool {
        if let Some(&known) = self.accumulating.get(&(f, v)) {
            return known;
        }
        let function = &self.plan.module.functions[f];
        let packed = &self.packed[f];
        let read = function.nodes.iter().any(|n| n.args.iter().any(|&a| base(function, a).0 == v));
        let accumulates = !read
            && self.plan.functions[f].kernels.iter().find(|k| k.outputs.contains(&v)).is_some_and(|k| {
                let attention = self.attention.as_ref().is_some_and(|a| a.runs(function, k, packed));
                matches!(k.code, Code::Library) && !attention && gemm::accumulates(function, k, packed)
            });
        self.accumulating.insert((f, v), accumulates);
        accumulates
    }

    /// Runs a kernel on its path: generated, library GEMM (adding to their buffers the
    /// results in `adding`), or on the host.
    fn launch(
        &mut self,
        f: usize,
        kernel: &Kernel,
        places: &Places,
        read_back: &mut gemm::ReadBack,
        adding: &HashSet<u32>,
    ) -> Result<(), GpuError> {
        let function = &self.plan.module.functions[f];
        match kernel.code {
            Code::Generated { .. } => {
                let bytes = &self.bytes[f];
                self.kernels.launch(&self.gpu, function, kernel, places, |v| bytes[&v])?;
                self.counts.generated += 1;
            }
            Code::Library if self.attention.as_ref().is_some_and(|a| a.runs(function, kernel, &self.packed[f])) => {
                let attention = self.attention.as_mut().expect("checked above");
                attention.run(&self.gpu, function, kernel, places)?;
                self.counts.attention += 1;
            }
            Code::Library if gemm::runs(function, kernel, &self.packed[f]) => {
                gemm::run(&self.gpu, &self.blas, function, &self.packed[f], kernel, places, read_back, adding)?;
                self.counts.library += 1;
            }
            _ => {
                self.on_host(f, kernel, places)?;
                self.counts.host += 1;
            }
        }
        Ok(())
    }

    /// Runs a kernel's nodes with the CPU reference's ops: inputs down, outputs up.
    fn on_host(&self, f: usize, kernel: &Kernel, places: &Places) -> Result<(), GpuError> {
        let function: &Function = &self.plan.module.functions[f];
        let packed = &self.packed[f];
        let mut local: HashMap<u32, Value<f32>> = HashMap::new();
        for &v in &kernel.nodes {
            let node = &function.nodes[v as usize];
            let mut inputs = Vec::with_capacity(node.args.len());
            for &a in &node.args {
                let b = base(function, a);
                let shape = &function.node(a).shape;
                let value = match (local.get(&b.0), &function.node(b).op) {
                    (Some(Value::Real(t)), _) => Value::real(Tensor::new(shape.clone(), t.data.clone())),
                    (Some(value), _) => value.clone(),
                    (None, Op::Const(c)) => Value::real(Tensor::new(shape.clone(), vec![*c as f32])),
                    (None, _) => {
                        let bytes = places::read(&self.gpu, places.at(b.0), self.bytes[f][&b.0])?;
                        decode(function.node(b), shape, &bytes, packed.contains(&b.0))
                    }
                };
                inputs.push(value);
            }
            let refs: Vec<&Value<f32>> = inputs.iter().collect();
            let value = if node.op.is_exchange() {
                exchange::eval(node, &refs, &*self.exchange).map_err(|e| GpuError::Unsupported(e.0))?
            } else {
                eval(&self.plan.module, node, &refs)
            };
            local.insert(v, value);
        }
        for &o in &kernel.outputs {
            let value = &local[&o];
            let stores: Vec<(u32, &Value<f32>)> = match value {
                Value::Tuple(items) => function
                    .nodes
                    .iter()
                    .enumerate()
                    .filter_map(|(g, n)| match n.op {
                        Op::Get(p) if n.args[0].0 == o => Some((g as u32, &items[p])),
                        _ => None,
                    })
                    .collect(),
                value => vec![(o, value)],
            };
            for (v, value) in stores {
                places::write(&self.gpu, &encode(value, packed.contains(&v))?, places.at(v))?;
            }
        }
        Ok(())
    }
}

impl Backend<f32> for Executor {
    fn run(&mut self, f: usize, args: Vec<Value<f32>>) -> Result<Vec<Value<f32>>, String> {
        Executor::run(self, f, &args).map_err(|e| e.to_string())
    }

    fn resident(&mut self) -> Option<&mut dyn Resident<f32>> {
        Some(self)
    }

    fn profile(&self) -> Option<String> {
        self.profile.as_ref().map(|p| p.report(30))
    }
}
