//! The plan: what `dsc compile -o DIR` writes and `dsc inspect DIR` and the backends read.
//! A directory with `plan.json` (versioned): the spec, the fused training graph, its kernels
//! per function with their ops, bytes, FLOPs and roofline time, the buffer table (size and
//! lifetime of every value), the fusion reports, and per-step totals fused and unfused; and
//! for every generated kernel its MLIR (`ir/NAME.mlir`) and PTX (`kernels/NAME.ptx`). Under a
//! pipeline of several stages or expert parallelism the module also holds each stage's forward
//! and backward ([`PlanStage`], functions named `stageI.…`), which the ranks run on GPUs.
//! `dsc tune DIR` adds `tuning.json` ([`tuning`]): the GEMM kernels measured fastest on a GPU.

use crate::fuse::cost::Profile;
use crate::fuse::kernels::{self, Code, Kernel, KernelKind};
use crate::fuse::{self, FunctionReport, Limits};
use crate::graph::ir::{Function, Module, Op};
use crate::graph::zero::Zero;
use crate::graph::{Numerics, ParamInfo, StageTraining, TrainingGraph};
use crate::mlir::{attention, emit, gemm};
use crate::parallel::split;
use dsc_lang::{Spec, StagePart};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

pub mod tuning;

/// Bumped whenever `plan.json` changes incompatibly.
pub const PLAN_VERSION: u32 = 5;
pub const PLAN_FILE: &str = "plan.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub version: u32,
    pub dsc_version: String,
    pub spec: Spec,
    /// The fused training graph (the same functions, in the same order, as the unfused one).
    pub module: Module,
    pub params: Vec<ParamInfo>,
    pub moe_biases: Vec<usize>,
    /// Function indices: one micro-batch's gradient, and the optimizer update.
    pub grad: usize,
    pub optimizer: usize,
    /// ZeRO-1's layout of data-parallel processes, with each one's optimizer function.
    pub zero: Zero,
    /// The pipeline's stages, where the spec's ranks run stages ([`has_stages`]; else none).
    pub stages: Vec<PlanStage>,
    pub functions: Vec<PlanFunction>,
    pub profile: Profile,
    pub summary: Summary,
}

/// One pipeline stage of the spec's plan (as `parallel::split` makes them), as a pipeline rank
/// holding it runs it: [`StageTraining`]'s functions, in the plan's module.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanStage {
    pub parts: Vec<StagePart>,
    /// `StageGraph::forward` and `StageTraining::backward`, as functions of the plan.
    pub forward: usize,
    pub backward: usize,
    /// The stage's parameters, named as in the whole model.
    pub params: Vec<ParamInfo>,
    pub first: bool,
    pub last: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanFunction {
    pub name: String,
    pub kernels: Vec<Kernel>,
    pub buffers: Vec<Buffer>,
    /// The values stored as packed bf16 ([`kernels::packed_bf16`]), in order.
    pub packed: Vec<u32>,
    pub fusion: FunctionReportRecord,
}

impl PlanFunction {
    /// [`PlanFunction::packed`] as a set.
    pub fn packed_set(&self) -> HashSet<u32> {
        self.packed.iter().copied().collect()
    }
}

/// A fusion report as stored (names as strings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FunctionReportRecord {
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub egraph_nodes: usize,
    pub iterations: usize,
    pub stop_reason: String,
    pub fused: Vec<(String, usize)>,
}

impl From<&FunctionReport> for FunctionReportRecord {
    fn from(r: &FunctionReport) -> Self {
        let mut fused: Vec<(String, usize)> = r.fused.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        fused.sort();
        FunctionReportRecord {
            nodes_before: r.nodes_before,
            nodes_after: r.nodes_after,
            egraph_nodes: r.egraph_nodes,
            iterations: r.iterations,
            stop_reason: r.stop_reason.clone(),
            fused,
        }
    }
}

/// A value's storage: its size and the nodes between which it lives (from the node that
/// writes it to its last reader).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub value: u32,
    pub bytes: u64,
    pub first: u32,
    pub last: u32,
}

/// One optimizer step of one data-parallel process (its micro-batches, then its update),
/// fused and unfused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub micro_batches_per_step: u64,
    pub launches_per_step: u64,
    pub launches_per_step_unfused: u64,
    pub bytes_per_step: u64,
    pub bytes_per_step_unfused: u64,
    pub seconds_per_step: f64,
    pub seconds_per_step_unfused: f64,
}

/// Compiles a checked spec into a plan.
pub fn compile(spec: &Spec, limits: Limits) -> Plan {
    let graph = TrainingGraph::build(spec, Numerics::Policy);
    let (unfused_module, stages) = with_stages(spec, graph.module());
    let profile = Profile::default();
    let (module, reports) = fuse::fuse_module(&expand_attention(&unfused_module), limits);
    let module = fuse::library::quantize_operands(&module);
    // Each function's kernels, and the values they store packed.
    let (fused, packed): (Vec<Vec<Kernel>>, Vec<HashSet<u32>>) = module
        .functions
        .iter()
        .map(|f| {
            let mut ks = kernels::kernels(f, &profile);
            let packed = kernels::packed_bf16(f, &ks);
            for k in &mut ks {
                k.code = match k.kind {
                    KernelKind::LibraryGemm | KernelKind::Attention => Code::Library,
                    KernelKind::Generated => match emit::emit(f, k, &packed) {
                        Ok(e) => Code::Generated { grid: e.grid, block: e.block, args: e.args, zeroed: e.zeroed },
                        Err(reason) => Code::NotGenerated { reason },
                    },
                };
            }
            (ks, packed)
        })
        .unzip();
    let unfused: Vec<Vec<Kernel>> = unfused_module.functions.iter().map(|f| kernels::unfused(f, &profile)).collect();
    let micro = spec.train.batch.last() / (spec.train.micro_batch * spec.parallel.data.size).max(1);
    // A data-parallel process updates its shard.
    let update = graph.zero.members[0].function;
    let step = |m: &Module, ks: &[Vec<Kernel>]| {
        let launches = micro * kernels::launches(m, graph.grad, ks) + kernels::launches(m, update, ks);
        let (gb, gs) = kernels::traffic(m, graph.grad, ks);
        let (ob, os) = kernels::traffic(m, update, ks);
        (launches, micro * gb + ob, micro as f64 * gs + os)
    };
    let (launches, bytes, seconds) = step(&module, &fused);
    let (launches_u, bytes_u, seconds_u) = step(&unfused_module, &unfused);
    let functions = module
        .functions
        .iter()
        .zip(fused.into_iter().zip(packed))
        .zip(&reports)
        .map(|((f, (kernels, packed)), report)| PlanFunction {
            name: f.name.clone(),
            buffers: buffers(f, &kernels, &packed),
            packed: {
                let mut packed: Vec<u32> = packed.into_iter().collect();
                packed.sort_unstable();
                packed
            },
            kernels,
            fusion: report.into(),
        })
        .collect();
    Plan {
        version: PLAN_VERSION,
        dsc_version: env!("CARGO_PKG_VERSION").to_string(),
        spec: spec.clone(),
        params: graph.forward.params.clone(),
        moe_biases: graph.forward.moe_biases.clone(),
        grad: graph.grad,
        optimizer: graph.optimizer,
        zero: graph.zero.clone(),
        stages,
        module,
        functions,
        profile,
        summary: Summary {
            micro_batches_per_step: micro,
            launches_per_step: launches,
            launches_per_step_unfused: launches_u,
            bytes_per_step: bytes,
            bytes_per_step_unfused: bytes_u,
            seconds_per_step: seconds,
            seconds_per_step_unfused: seconds_u,
        },
    }
}

/// Whether the ranks of `spec`'s parallel plan run pipeline stages (of a pipeline, or of expert
/// parallelism) rather than the whole model's gradient (data parallelism alone).
pub fn has_stages(spec: &Spec) -> bool {
    spec.parallel.pipeline.stages > 1 || spec.parallel.expert.size > 1
}

/// The training graph's `module` with the stages' functions added where the spec's ranks run
/// stages (each on a member of an expert-parallel group of the spec's size), and the stages.
fn with_stages(spec: &Spec, module: &Module) -> (Module, Vec<PlanStage>) {
    let mut module = module.clone();
    if !has_stages(spec) {
        return (module, Vec::new());
    }
    let expert_ranks = spec.parallel.expert.size as usize;
    let stages = split(spec)
        .into_iter()
        .map(|stage| {
            let StageTraining { graph, backward } =
                StageTraining::build(spec, Numerics::Policy, &stage.parts, expert_ranks);
            let at = module.absorb(graph.module, &format!("stage{}", stage.index));
            PlanStage {
                parts: stage.parts,
                forward: at[graph.forward],
                backward: at[backward],
                params: graph.params,
                first: graph.first,
                last: graph.last,
            }
        })
        .collect();
    (module, stages)
}

/// `module` with the attention that the fused kernels do not take (f32, or dims they lack)
/// expanded into primitives ([`fuse::expand`]), as a plan runs it.
pub fn expand_attention(module: &Module) -> Module {
    fuse::expand::attention(module, |f, node| attention::fused(f, node, &HashSet::new()).is_some())
}

/// Bytes of a value's buffer as the generated kernels address it: reals as f32 (a bf16 value
/// is rounded, not packed) except the `packed` ones (bf16, [`kernels::packed_bf16`]), indices
/// as i32, FP8 values as their bytes and scales.
fn storage_bytes(n: &crate::graph::ir::Node, packed: bool) -> u64 {
    let width = if packed { 2 } else { 4 };
    crate::mlir::fp8::storage_bytes(n).unwrap_or(n.shape.iter().product::<usize>() as u64 * width)
}

/// The buffer table: every value with storage (not views or bookkeeping) and its lifetime in
/// node positions, from its first write or read (a constant table is written at its first
/// use, which may come before its node) to its last read, widened to whole kernels: a kernel's nodes run together, so what it reads
/// lives until its last node and what it writes from its first; a value read through a view
/// (a reshape) lives as long as the view's readers.
fn buffers(f: &Function, kernels: &[Kernel], packed: &HashSet<u32>) -> Vec<Buffer> {
    let mut span: Vec<(u32, u32)> = (0..f.nodes.len() as u32).map(|i| (i, i)).collect();
    for k in kernels {
        let (lo, hi) = (*k.nodes.iter().min().unwrap_or(&0), *k.nodes.iter().max().unwrap_or(&0));
        for &n in &k.nodes {
            span[n as usize] = (lo, hi);
        }
    }
    let mut last: Vec<u32> = (0..f.nodes.len() as u32).collect();
    // A constant table may be read before its node (the backend writes it at its first use).
    let mut first = last.clone();
    for (i, node) in f.nodes.iter().enumerate() {
        for &a in &node.args {
            let b = kernels::base(f, a).index();
            last[b] = last[b].max(span[i].1);
            first[b] = first[b].min(span[i].0);
        }
    }
    for o in &f.outputs {
        last[kernels::base(f, *o).index()] = f.nodes.len() as u32;
    }
    f.nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            let view = matches!(n.op, Op::Reshape(_) | Op::StopGradient | Op::Call(_) | Op::Const(_));
            // A part of a tuple (a call's result, a fused op's) is stored here: the callee or
            // the fused kernel writes it.
            !view && n.dtype != crate::graph::ir::DType::Tuple
        })
        .map(|(i, n)| {
            // A tuple's part is written when the call or the fused op runs.
            let writer = if matches!(n.op, Op::Get(_)) { n.args[0].index() } else { i };
            let bytes = storage_bytes(n, packed.contains(&(i as u32)));
            Buffer { value: i as u32, bytes, first: span[writer].0.min(first[i]), last: last[i] }
        })
        .collect()
}

/// Removes the `*.EXT` files of `folder` that are not named in `names`: the kernels of an
/// earlier plan written to the same directory. Other files stay.
pub fn remove_stale<'a>(folder: &Path, ext: &str, names: impl Iterator<Item = &'a str>) -> std::io::Result<()> {
    let keep: HashSet<&str> = names.collect();
    for entry in std::fs::read_dir(folder)? {
        let path = entry?.path();
        let stem = path.file_stem().and_then(|s| s.to_str());
        if path.extension().is_some_and(|e| e == ext) && stem.is_some_and(|s| !keep.contains(s)) {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Why a plan directory cannot be read.
#[derive(Debug)]
pub enum PlanError {
    Io(std::io::Error, String),
    Format(String, String),
    Version(u32, String),
    /// Its `tuning.json` ([`tuning`]) is not one.
    Tuning(String, String),
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::Io(e, path) => write!(f, "cannot read `{path}`: {e} (is it a directory written by `dsc compile -o`?)"),
            PlanError::Format(e, path) => write!(f, "`{path}` is not a valid plan: {e} (recompile it with `dsc compile -o`)"),
            PlanError::Version(v, path) => write!(f, "`{path}` is a version {v} plan; this dsc reads version {PLAN_VERSION} (recompile it with `dsc compile -o`)"),
            PlanError::Tuning(e, path) => write!(f, "`{path}` is not a valid tuning: {e} (run `dsc tune` on the plan again, or delete the file)"),
        }
    }
}

impl std::error::Error for PlanError {}

impl Plan {
    /// Bytes of an element of Adam's moments as the optimizer functions take and return them:
    /// 2 where the policy keeps them in bf16 (packed: [`kernels::packed_bf16`]), else 4.
    pub fn moment_bytes(&self) -> usize {
        let optimizer = &self.module.functions[self.optimizer];
        let moment = optimizer.args.iter().find(|(name, _, _)| name.starts_with("m:"));
        if moment.is_some_and(|(_, _, dtype)| kernels::packs(*dtype)) {
            2
        } else {
            4
        }
    }

    /// The MLIR of every generated kernel, by kernel name.
    pub fn kernel_mlir(&self) -> Vec<(String, String)> {
        let mut kernels: Vec<(String, String)> = self
            .module
            .functions
            .iter()
            .zip(&self.functions)
            .flat_map(|(f, pf)| {
                let packed = pf.packed_set();
                pf.kernels.iter().filter(|k| matches!(k.code, Code::Generated { .. })).map(move |k| {
                    let mlir = emit::emit(f, k, &packed).expect("emitted when the plan was compiled").mlir;
                    (k.name.clone(), mlir)
                })
            })
            .collect();
        kernels.extend(self.carried_kernels());
        kernels
    }

    /// The compiler's hand-scheduled kernels the plan carries for its backend's launchers, each
    /// (name, MLIR): the experts' GEMMs ([`Plan::generated_gemms`]) and the fused attention
    /// ([`Plan::attention_heads`]).
    pub fn carried_kernels(&self) -> Vec<(String, String)> {
        let gemms = self
            .generated_gemms()
            .into_iter()
            .map(|(name, tile, form)| (name.clone(), gemm::fp8_gemm(&name, tile, form)));
        gemms.chain(self.attention_heads().map(attention::kernels).unwrap_or_default()).collect()
    }

    /// The head dims of the fused attention kernels the plan carries: its attention's that
    /// the kernels run ([`attention::fused`]; [`expand_attention`] expanded any other). A
    /// model's attention layers share their dims and storage.
    pub fn attention_heads(&self) -> Option<attention::Heads> {
        self.module.functions.iter().zip(&self.functions).find_map(|(f, pf)| {
            let kernel = pf.kernels.iter().find(|k| k.kind == KernelKind::Attention)?;
            attention::fused(f, &f.nodes[kernel.nodes[0] as usize], &pf.packed_set())
        })
    }

    /// The compiler's FP8 GEMMs the plan carries (name, tile, form): every candidate tile
    /// ([`gemm::candidates`]) of the dense product where it has dense FP8 products
    /// (`scaled_matmul` and its concatenated form), of the grouped product where it has experts'
    /// FP8 products (Fprop and Dgrad: `grouped_matmul` and its concatenated form, quantised),
    /// and of the Wgrad where it has `scaled_grouped_wgrad` (the experts' forms read their row
    /// offsets on the device).
    pub fn generated_gemms(&self) -> Vec<(String, gemm::Tile, gemm::Form)> {
        let has = |wanted: fn(&Op) -> bool| {
            self.module.functions.iter().zip(&self.functions).any(|(f, pf)| {
                pf.kernels.iter().any(|k| k.code == Code::Library && wanted(&f.nodes[k.nodes[0] as usize].op))
            })
        };
        let products = has(|op| {
            matches!(
                op,
                Op::GroupedMatMul { tb: true, fp8: Some(_) }
                    | Op::ConcatGroupedMatMul { tb: true, fp8: Some(_) }
                    | Op::ConcatKScaledGroupedMatMul { .. }
            )
        });
        let wgrads = has(|op| matches!(op, Op::ScaledGroupedWgrad { .. }));
        let dense = has(|op| {
            matches!(op, Op::ScaledMatMul { .. } | Op::ConcatScaledMatMul { .. } | Op::ConcatKScaledMatMul { .. })
        });
        [(dense, gemm::Form::Dense), (products, gemm::Form::Grouped), (wgrads, gemm::Form::Wgrad)]
            .into_iter()
            .filter(|&(carried, _)| carried)
            .flat_map(|(_, form)| gemm::candidates(form).iter().map(move |&tile| (tile.name(form), tile, form)))
            .collect()
    }

    /// Writes `plan.json` and `ir/NAME.mlir` for each generated kernel into `dir`, and removes
    /// the tuning of the plan that was there ([`tuning`]).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir.join("ir"))?;
        tuning::Tuning::remove(dir)?;
        let kernels = self.kernel_mlir();
        for (name, mlir) in &kernels {
            std::fs::write(dir.join("ir").join(format!("{name}.mlir")), mlir)?;
        }
        remove_stale(&dir.join("ir"), "mlir", kernels.iter().map(|(name, _)| name.as_str()))?;
        let path = dir.join(PLAN_FILE);
        let tmp = dir.join(format!("{PLAN_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, path)
    }

    pub fn read(dir: &Path) -> Result<Plan, PlanError> {
        let path = dir.join(PLAN_FILE);
        let shown = path.display().to_string();
        let bytes = std::fs::read(&path).map_err(|e| PlanError::Io(e, shown.clone()))?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| PlanError::Format(e.to_string(), shown.clone()))?;
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        if version != PLAN_VERSION {
            return Err(PlanError::Version(version, shown));
        }
        serde_json::from_value(value).map_err(|e| PlanError::Format(e.to_string(), shown))
    }

    /// The training graph the plan runs (for the backends).
    pub fn training_graph(&self) -> TrainingGraph {
        let forward = crate::graph::ForwardGraph {
            module: self.module.clone(),
            model: self.module.function("model").expect("a plan has the model function"),
            params: self.params.clone(),
            moe_biases: self.moe_biases.clone(),
            micro_batch: self.spec.train.micro_batch as usize,
            seq_len: self.spec.train.seq_len as usize,
        };
        TrainingGraph { forward, grad: self.grad, optimizer: self.optimizer, zero: self.zero.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::ir::{DType, V};
    use std::collections::HashMap;

    /// The tiny model's plan with `sets` overriding its spec.
    fn tiny_plan(sets: &[String]) -> Plan {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
        compile(dsc_lang::load(&path, sets).checked_spec().expect("the tiny spec checks"), Limits::default())
    }

    /// Whether generated kernel `k` of `f` (plan function `pf`) declares its argument `v` a
    /// buffer of element type `t`.
    fn declares(f: &Function, pf: &PlanFunction, k: &Kernel, v: u32, t: &str) -> bool {
        let Code::Generated { args, .. } = &k.code else { panic!("{}: {} is not generated", f.name, k.name) };
        let slot = args.iter().position(|&a| a == v).expect("an argument");
        emit::emit(f, k, &pf.packed_set()).expect("emitted").mlir.contains(&format!("%a{slot}: memref<?x{t}>"))
    }

    /// A plan of pipeline stages with expert parallelism holds each stage's forward and backward,
    /// named after it, and compiles the layer bodies the stages share once.
    #[test]
    fn a_staged_plan_holds_each_stage_and_shares_their_layers() {
        let sets = [
            "model.layers=4",
            "model.ffn.1.layers=1..4",
            "parallel.gpus_per_node=4",
            "parallel.pipeline=dualpipe { stages = 2 }",
            "parallel.data={ size = 2 }",
            "parallel.expert={ size = 2, max_nodes = 1 }",
            "train.batch=32",
        ];
        let plan = tiny_plan(&sets.map(String::from));
        assert_eq!(plan.stages.len(), 2);
        let name = |f: usize| plan.module.functions[f].name.as_str();
        for (i, stage) in plan.stages.iter().enumerate() {
            assert_eq!(
                (name(stage.forward), name(stage.backward)),
                (&*format!("stage{i}.stage"), &*format!("stage{i}.stage.vjp"))
            );
        }
        let callees = |f: usize| -> HashSet<usize> {
            plan.module.functions[f]
                .nodes
                .iter()
                .filter_map(|n| if let Op::Call(c) = n.op { Some(c) } else { None })
                .collect()
        };
        let (first, second) = (callees(plan.stages[0].forward), callees(plan.stages[1].forward));
        let shared: Vec<&str> = first.intersection(&second).map(|&f| name(f)).collect();
        assert!(shared.iter().any(|f| f.starts_with("stage0.layer")), "the stages' MoE layer is shared: {shared:?}");
        let mut names: Vec<&str> = plan.module.functions.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "every function once");
    }

    /// Every kernel of every shipped model is a library GEMM or generated, or an expert-parallel
    /// stage's all-to-all (which the backends run on the host through the group's transport):
    /// the backends never meet an op they cannot run.
    #[test]
    fn every_kernel_of_the_shipped_models_is_generated_or_a_library_gemm() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let mut checked = 0;
        for entry in std::fs::read_dir(&models).expect("models/") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "dsc") {
                continue;
            }
            let loaded = dsc_lang::load(&path, &[]);
            let spec = loaded.checked_spec().unwrap_or_else(|| panic!("{} checks", path.display()));
            let plan = compile(spec, Limits::default());
            for (f, pf) in plan.module.functions.iter().zip(&plan.functions) {
                for k in &pf.kernels {
                    match (&k.code, k.kind) {
                        (Code::Library, KernelKind::LibraryGemm | KernelKind::Attention)
                        | (Code::Generated { .. }, KernelKind::Generated) => {}
                        (Code::NotGenerated { .. }, _) if k.is_exchange(f) => {}
                        (code, _) => panic!("{}: {} kernel {}: {code:?}", path.display(), f.name, k.name),
                    }
                }
            }
            checked += 1;
        }
        assert!(checked >= 3, "the shipped models are found");
    }

    /// An FP8 plan with experts carries the dense and grouped GEMMs and the Wgrad, each in
    /// every candidate tile (their MLIR among its kernels'); an f32 one none.
    #[test]
    fn fp8_plans_carry_their_generated_gemms() {
        let f32 = ["precision.gemm=f32".to_string()];
        for (sets, carried) in [(&[][..], true), (&f32[..], false)] {
            let plan = tiny_plan(sets);
            let carries: Vec<String> = plan.generated_gemms().into_iter().map(|(name, _, _)| name).collect();
            let forms = if carried { vec![gemm::Form::Dense, gemm::Form::Grouped, gemm::Form::Wgrad] } else { vec![] };
            let want: Vec<String> =
                forms.into_iter().flat_map(|f| gemm::candidates(f).iter().map(move |t| t.name(f))).collect();
            assert_eq!(carries, want, "{sets:?}");
            let mlir = plan.kernel_mlir();
            assert!(want.iter().all(|w| mlir.iter().any(|(name, _)| name == w)), "{sets:?}");
        }
    }

    /// MLA's RoPE concatenations (of the query, and of the key, in each attention's forward
    /// and its recomputation) read their parts through the slices that cut them from the
    /// projections: the slices are in the concatenation's kernel, after it, and no kernel
    /// writes them.
    #[test]
    fn rope_concatenations_read_through_their_slices() {
        let plan = tiny_plan(&[]);
        let mut concatenations = 0;
        for (f, pf) in plan.module.functions.iter().zip(&plan.functions) {
            let op = |v: u32| &f.nodes[v as usize].op;
            let written: HashSet<u32> = pf.kernels.iter().flat_map(|k| k.outputs.iter().copied()).collect();
            for k in pf.kernels.iter().filter(|k| *op(k.nodes[0]) == Op::RopeConcat) {
                concatenations += 1;
                let parts = f.nodes[k.nodes[0] as usize].args.iter().map(|&a| kernels::base(f, a).0);
                let slices: Vec<u32> = parts.filter(|&v| matches!(op(v), Op::Slice { .. })).collect();
                assert!(!slices.is_empty(), "{} reads no slice", k.name);
                assert!(slices.iter().all(|v| k.nodes[1..].contains(v) && !written.contains(v)), "{}", k.name);
            }
        }
        assert!(concatenations >= 4, "{concatenations} RoPE concatenations");
    }

    /// A slice or pad that one fusing op alone reads (the RoPE parts cut from the attention's
    /// query and key gradients, the key and value gradients padded into one) is read through
    /// by that op's kernel: it is in the kernel, and no kernel writes it.
    #[test]
    fn slices_and_pads_read_by_one_op_are_read_through() {
        let plan = tiny_plan(&[]);
        let mut read_through = 0;
        for (f, pf) in plan.module.functions.iter().zip(&plan.functions) {
            let written: HashSet<u32> = pf.kernels.iter().flat_map(|k| k.outputs.iter().copied()).collect();
            let results: HashSet<u32> = f.outputs.iter().map(|&o| kernels::base(f, o).0).collect();
            let is_view = |j: usize| kernels::base(f, V(j as u32)).index() != j;
            for (i, node) in f.nodes.iter().enumerate() {
                if !matches!(node.op, Op::Slice { .. } | Op::PadSlice { .. }) || results.contains(&(i as u32)) {
                    continue;
                }
                let readers: Vec<usize> = (0..f.nodes.len())
                    .filter(|&j| !is_view(j) && f.nodes[j].args.iter().any(|&a| kernels::base(f, a).index() == i))
                    .collect();
                let [reader] = readers[..] else { continue };
                let op = &f.nodes[reader].op;
                let layout =
                    matches!(op, Op::Slice { .. } | Op::PadSlice { .. } | Op::Concat { .. } | Op::Transpose(_));
                if !(op.is_elementwise() || layout || *op == Op::RopeConcat) {
                    continue;
                }
                read_through += 1;
                let kernel = pf.kernels.iter().find(|k| k.nodes.contains(&(i as u32))).expect("in a kernel");
                assert!(kernel.nodes.contains(&(reader as u32)), "{}: %{i} outside %{reader}'s kernel", f.name);
                assert!(!written.contains(&(i as u32)), "{}: %{i} written", f.name);
            }
        }
        assert!(read_through >= 20, "{read_through} slices and pads read through");
    }

    /// RMSNorm's backward over DeepSeek-V3-bench's 2,048 columns keeps x and dy in registers
    /// between its passes (its residual gradient, read when writing, is not kept): x is loaded
    /// once a chunk of the row, 16 loads, not twice.
    #[test]
    fn rmsnorm_backward_reads_a_row_once() {
        let plan = tiny_plan(&["model.hidden=2048".to_string()]);
        let mut kernels = 0;
        for (f, pf) in plan.module.functions.iter().zip(&plan.functions) {
            let over_hidden = |k: &&Kernel| {
                let node = &f.nodes[k.nodes[0] as usize];
                node.op.name() == "rmsnorm_grad" && f.node(node.args[0]).shape.last() == Some(&2048)
            };
            for k in pf.kernels.iter().filter(over_hidden) {
                kernels += 1;
                let mlir = emit::emit(f, k, &pf.packed_set()).expect("emitted").mlir;
                assert_eq!(mlir.matches("vector.load %a0[").count(), 2048 / 128, "{}", k.name);
            }
        }
        assert!(kernels >= 2, "{kernels} RMSNorm backward kernels");
    }

    /// The loss's backward reads each row's max and sum from its forward (no reductions: one
    /// pass over the logits, not two) and writes the gradient of the BF16 head's logits packed, as the
    /// head's products read it (no f32 gradient stored, then cast).
    #[test]
    fn the_loss_backward_reads_the_forward_statistics_and_writes_bf16() {
        let plan = tiny_plan(&[]);
        let (f, pf) = (plan.module.functions.iter().zip(&plan.functions))
            .find(|(f, _)| f.name == "model.grad")
            .expect("the model's gradient function");
        let packed = pf.packed_set();
        let mut kernels = 0;
        for k in pf.kernels.iter().filter(|k| k.ops[0] == "cross_entropy_grad") {
            kernels += 1;
            let node = &f.nodes[k.nodes[0] as usize];
            for (arg, part) in [(3, 1), (4, 2)] {
                let stat = f.node(node.args[arg]);
                assert_eq!(stat.op, Op::Get(part), "{}: argument {arg}", k.name);
                assert_eq!(f.node(stat.args[0]).op, Op::CrossEntropy, "{}: argument {arg}", k.name);
            }
            let mlir = emit::emit(f, k, &packed).expect("emitted").mlir;
            assert!(!mlir.contains("gpu.shuffle"), "{}: the row's max and sum found again", k.name);
            let [_, cast] = k.nodes[..] else { panic!("{}: {:?}, not cast as it is written", k.name, k.ops) };
            assert!(packed.contains(&cast) && mlir.contains("memref<?xbf16>"), "{}: the gradient not packed", k.name);
        }
        assert_eq!(kernels, 2, "the main and MTP losses' backward kernels");
    }

    /// RoPE's backward (the gradient's products by the cos and sin tables, the negation of
    /// one, the transposes back to interleaved pairs) is computed in the kernel that
    /// concatenates the head's two halves of the gradient: none of its values is stored.
    #[test]
    fn the_rope_backward_folds_into_its_reader() {
        let plan = tiny_plan(&[]);
        let mut chains = 0;
        for (f, pf) in plan.module.functions.iter().zip(&plan.functions).filter(|(f, _)| f.name.ends_with(".bwd")) {
            let by_table = |n: &u32| {
                let node = &f.nodes[*n as usize];
                node.op == Op::Mul && node.args.iter().any(|a| matches!(f.node(kernels::base(f, *a)).op, Op::Table(_)))
            };
            for k in pf.kernels.iter().filter(|k| k.nodes.iter().any(by_table)) {
                let has = |op: &str| k.ops.iter().any(|o| o == op);
                assert!(has("neg") && has("transpose") && has("pad_slice"), "{}: {:?}", k.name, k.ops);
                chains += 1;
            }
        }
        assert!(chains >= 4, "{chains} RoPE backward kernels");
    }

    /// A value's row-wise quantisation (for its input gradient) and its transposed one (for a
    /// weight gradient) are one kernel, where the first ran, wherever one kernel can do both.
    #[test]
    fn a_values_two_quantisations_are_one_kernel() {
        let plan = tiny_plan(&[]);
        let mut pairs = 0;
        for (f, pf) in plan.module.functions.iter().zip(&plan.functions) {
            let quantize = |v: &u32| matches!(f.nodes[*v as usize].op, Op::Quantize { .. });
            let alone: Vec<u32> = (pf.kernels.iter())
                .filter_map(|k| match k.nodes[..] {
                    [v] if quantize(&v) => Some(v),
                    _ => None,
                })
                .collect();
            for k in pf.kernels.iter().filter(|k| k.nodes.iter().filter(|v| quantize(v)).count() == 2) {
                pairs += 1;
                let [rows, columns] = k.nodes[..] else { panic!("{}: {:?}", k.name, k.ops) };
                let (rows, columns) = (&f.nodes[rows as usize], &f.nodes[columns as usize]);
                assert!(crate::mlir::fp8::both_ways(rows, columns, f.node(rows.args[0])).is_some(), "{}", k.name);
                assert_eq!(kernels::base(f, rows.args[0]), kernels::base(f, columns.args[0]), "{}", k.name);
                assert!(matches!(k.code, Code::Generated { .. }), "{}", k.name);
            }
            // No pair left apart.
            for &c in &alone {
                for &r in &alone {
                    let (rows, columns) = (&f.nodes[r as usize], &f.nodes[c as usize]);
                    let same = kernels::base(f, rows.args[0]) == kernels::base(f, columns.args[0]);
                    let fits = crate::mlir::fp8::both_ways(rows, columns, f.node(rows.args[0])).is_some();
                    assert!(!(same && fits), "{}: %{r} and %{c} apart", f.name);
                }
            }
        }
        assert!(pairs >= 8, "{pairs} pairs");
    }

    /// The BF16 GEMMs' operands are stored packed, 2 bytes an element: under the FP8 policy the
    /// head's (forward, Dgrad, Wgrad: the hidden states, the weight and the cotangent of the
    /// logits), under the BF16 policy every linear layer's and expert's too; each a cast written
    /// by a kernel that computes by element and read only by library products whose factors are all packed.
    /// Under an f32 policy none is.
    #[test]
    fn bf16_gemm_operands_are_packed() {
        for (policy, least) in [("e4m3", 3), ("bf16", 20), ("f32", 0)] {
            let plan = tiny_plan(&[format!("precision.gemm={policy}")]);
            let mut count = 0;
            for (f, pf) in plan.module.functions.iter().zip(&plan.functions) {
                let packed = pf.packed_set();
                let factors: HashSet<u32> = (f.nodes.iter())
                    .flat_map(|n| kernels::product_factors(&n.op, &n.args))
                    .map(|&v| kernels::base(f, v).0)
                    .collect();
                let operands: Vec<u32> = pf.packed.iter().copied().filter(|v| factors.contains(v)).collect();
                count += operands.len();
                let bytes: HashMap<u32, u64> = pf.buffers.iter().map(|b| (b.value, b.bytes)).collect();
                for &v in &operands {
                    let elements = f.nodes[v as usize].shape.iter().product::<usize>() as u64;
                    assert_eq!(bytes[&v], 2 * elements, "{policy} {}: %{v}", f.name);
                    let writer = pf.kernels.iter().find(|k| k.outputs.contains(&v)).expect("written");
                    assert!(matches!(writer.code, Code::Generated { .. }), "{policy}: {} writes %{v}", writer.name);
                    assert!(kernels::writes_packed(f, writer), "{policy}: {} writes packed values", writer.name);
                }
                for (i, node) in f.nodes.iter().enumerate() {
                    if kernels::base(f, V(i as u32)).index() != i {
                        continue; // a view: its readers read the base
                    }
                    let factors = kernels::product_factors(&node.op, &node.args);
                    let reads = |v: &V| packed.contains(&kernels::base(f, *v).0);
                    let packed_factors = factors.iter().filter(|v| reads(v)).count();
                    assert!(packed_factors == 0 || packed_factors == factors.len(), "{policy} {}: %{i}", f.name);
                    // A product of casts to bf16 (the head's, and every linear layer's under
                    // bf16 GEMMs) reads them packed, whichever kernel computes the casts.
                    let cast = |v: &V| f.node(kernels::base(f, *v)).op == Op::Cast(DType::Bf16);
                    if !factors.is_empty() && factors.iter().all(cast) {
                        assert_eq!(packed_factors, factors.len(), "{policy} {}: %{i} reads casts unpacked", f.name);
                    }
                    let readers_of_operands =
                        node.args[factors.len()..].iter().filter(|v| operands.contains(&kernels::base(f, **v).0));
                    assert_eq!(readers_of_operands.count(), 0, "{policy} {}: %{i} reads a GEMM operand", f.name);
                }
            }
            assert!(count >= least && (least > 0 || count == 0), "{policy}: {count} packed GEMM operands");
        }
    }

    /// The experts' combine output, their down projection rounded to bf16, crosses from a
    /// layer's forward to its backward rounded and packed: `name.fwd` returns the cast (not the
    /// f32 product), written 2 bytes an element and read packed by the unpermute kernel (by
    /// index, declaring it `memref<?xbf16>`); `name.bwd` takes it as a packed bf16 argument,
    /// read by the gates' gradient, and casts nothing of its own to bf16 for it.
    #[test]
    fn the_experts_bf16_outputs_are_saved_rounded_and_packed() {
        let plan = tiny_plan(&[]);
        let function = |name: &str| {
            let i = plan.functions.iter().position(|pf| pf.name == name).expect(name);
            (&plan.module.functions[i], &plan.functions[i])
        };
        let (forward, fwd) = function("layer1.fwd");
        let saved: Vec<u32> = (forward.outputs.iter().zip(&forward.output_names))
            .filter(|(o, name)| name.starts_with("saved") && forward.node(**o).dtype == DType::Bf16)
            .map(|(o, _)| kernels::base(forward, *o).0)
            .collect();
        assert_eq!(saved.len(), 1, "{saved:?}");
        let combined = &forward.nodes[saved[0] as usize];
        assert_eq!(combined.op, Op::Cast(DType::Bf16));
        assert!(matches!(forward.node(combined.args[0]).op, Op::GroupedMatMul { .. }));
        assert!(fwd.packed.contains(&saved[0]));
        let bytes = fwd.buffers.iter().find(|b| b.value == saved[0]).expect("a buffer").bytes;
        assert_eq!(bytes, 2 * combined.shape.iter().product::<usize>() as u64);
        let unpermute = fwd.kernels.iter().find(|k| k.ops == ["unpermute"]).expect("the combine");
        assert!(declares(forward, fwd, unpermute, saved[0], "bf16"), "{}", unpermute.name);
        let (backward, bwd) = function("layer1.bwd");
        let arg = (backward.nodes.iter().enumerate())
            .find(|(_, n)| matches!(n.op, Op::Arg(a) if backward.args[a].0.starts_with("saved") && n.dtype == DType::Bf16))
            .map(|(i, _)| i as u32)
            .expect("the saved bf16 argument");
        assert!(bwd.packed.contains(&arg));
        let gates = bwd.kernels.iter().find(|k| k.ops == ["unpermute_grad_gates"]).expect("the gates' gradient");
        assert!(declares(backward, bwd, gates, arg, "bf16"), "{}", gates.name);
        let recast = |n: &crate::graph::ir::Node| n.op == Op::Cast(DType::Bf16) && n.shape == combined.shape;
        assert!(!backward.nodes.iter().any(recast), "the backward casts the combine's input again");
    }

    /// Under the policy's bf16 moments the optimizers (the model's and each data-parallel
    /// process's) take and return m and v packed, 2 bytes an element, and only their
    /// elementwise kernels touch them, declaring them `memref<?xbf16>`; under f32 moments
    /// they are not packed. Other functions pack, of what they take and return, only the bf16
    /// values a forward saves for its backward (`savedN`).
    #[test]
    fn bf16_moments_are_packed_between_steps() {
        let sets = |moments: &str| {
            let processes = ["parallel.gpus_per_node=2", "parallel.data.size=2"].map(String::from);
            [vec![format!("precision.adam_moments={moments}")], processes.to_vec()].concat()
        };
        for (policy, width) in [("bf16", 2), ("f32", 4)] {
            let plan = tiny_plan(&sets(policy));
            assert_eq!(plan.moment_bytes(), width);
            let optimizers: Vec<usize> =
                std::iter::once(plan.optimizer).chain(plan.zero.members.iter().map(|m| m.function)).collect();
            assert_eq!(optimizers.len(), 3);
            for (i, (f, pf)) in plan.module.functions.iter().zip(&plan.functions).enumerate() {
                // The state's packed values: arguments and results (BF16 GEMMs' operands have
                // their own test).
                let crossing: HashSet<u32> = (f.nodes.iter().enumerate())
                    .filter(|(_, n)| matches!(n.op, Op::Arg(_)))
                    .map(|(v, _)| v as u32)
                    .chain(f.outputs.iter().map(|&o| kernels::base(f, o).0))
                    .collect();
                let saved = |v: &u32| {
                    let named = match f.nodes[*v as usize].op {
                        Op::Arg(a) => Some(&f.args[a].0),
                        _ => f.outputs.iter().position(|o| kernels::base(f, *o).0 == *v).map(|k| &f.output_names[k]),
                    };
                    named.is_some_and(|name| name.starts_with("saved"))
                };
                let packed: HashSet<u32> =
                    pf.packed_set().intersection(&crossing).copied().filter(|v| !saved(v)).collect();
                if !optimizers.contains(&i) || width == 4 {
                    assert!(packed.is_empty(), "{policy}: {} packs {packed:?}", f.name);
                    continue;
                }
                // The optimizer's m and v, taken and returned.
                let moment = |name: &str| name.starts_with("m:") || name.starts_with("v:");
                let taken =
                    f.nodes.iter().enumerate().filter(|(_, n)| matches!(n.op, Op::Arg(a) if moment(&f.args[a].0)));
                let returned = f.outputs.iter().zip(&f.output_names).filter(|(_, name)| moment(name));
                let moments: Vec<u32> =
                    taken.map(|(v, _)| v as u32).chain(returned.map(|(&o, _)| kernels::base(f, o).0)).collect();
                assert!(!moments.is_empty());
                assert_eq!(packed, moments.iter().copied().collect(), "{}", f.name);
                let bytes: HashMap<u32, u64> = pf.buffers.iter().map(|b| (b.value, b.bytes)).collect();
                for &v in &moments {
                    let elements = f.nodes[v as usize].shape.iter().product::<usize>() as u64;
                    assert_eq!(bytes[&v], 2 * elements, "{}: %{v}", f.name);
                }
                for k in pf.kernels.iter().filter(|k| k.inputs.iter().chain(&k.outputs).any(|v| packed.contains(v))) {
                    for v in k.inputs.iter().chain(&k.outputs) {
                        let t = if packed.contains(v) { "bf16" } else { "f32" };
                        assert!(declares(f, pf, k, *v, t), "{}: %{v} not {t}", k.name);
                    }
                }
            }
        }
    }

    /// A BF16-attention plan whose head dims and length the fused kernels take carries their
    /// four kernels (its attention and backward kernels of their own); the tiny model's dims
    /// (24/16, length 64) and an f32 policy's attention carry none: their attention is expanded.
    #[test]
    fn plans_carry_the_fused_attention_where_it_runs() {
        let fitting =
            ["model.attention.qk_nope_dim=56", "model.attention.v_dim=64", "train.seq_len=128"].map(String::from);
        let f32 = [&fitting[..], &["precision.gemm=f32".to_string()]].concat();
        for (sets, carried) in [
            (&[][..], None),
            (&fitting[..], Some(attention::Heads { qk: 64, v: 64, bf16_inputs: true })),
            (&f32[..], None),
        ] {
            let plan = tiny_plan(sets);
            assert_eq!(plan.attention_heads(), carried, "{sets:?}");
            let kinds: Vec<&str> = plan
                .functions
                .iter()
                .flat_map(|pf| &pf.kernels)
                .filter(|k| k.kind == KernelKind::Attention)
                .map(|k| k.ops[0].as_str())
                .collect();
            let want_kinds: &[&str] = if carried.is_some() { &["attention", "attention_grad"] } else { &[] };
            let mut distinct = kinds.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct, want_kinds, "{sets:?}");
            let expanded = plan.module.functions.iter().flat_map(|f| &f.nodes).any(|n| n.op.name() == "masked_softmax");
            assert_eq!(expanded, carried.is_none(), "{sets:?}");
            let names: Vec<String> = plan.kernel_mlir().into_iter().map(|(name, _)| name).collect();
            let want = carried.map(attention::kernels).unwrap_or_default();
            assert!(want.iter().all(|(name, _)| names.contains(name)), "{sets:?}");
            assert_eq!(names.iter().filter(|n| n.starts_with("attention_")).count(), want.len(), "{sets:?}");
        }
    }
}
