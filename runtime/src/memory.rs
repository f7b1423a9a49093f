//! Device memory by lifetime: places a plan function's buffers (size, first and last node
//! that touch them) at offsets of one arena so that buffers alive at the same time never
//! overlap and the others reuse memory. Buffers are placed in the order they are written, each
//! at the lowest offset where it fits among the buffers still alive (first fit), at 256-byte
//! alignment. The arena's size (the peak) is reported against the sum of all buffers.
//! [`layouts`] places every function of a plan: a function reads its arguments where its
//! caller keeps them (the training state, the caller's arena), so its arena holds none of
//! them; an optimizer function writes its results over the arguments they replace where that is safe
//! ([`in_place`]), and the gradient function hands the gradients its calls yield straight to
//! the state ([`delivered`]), so their arenas hold none of those either; what a generated
//! kernel computes for itself alone stays in its registers. [`step_memory`] adds a training
//! step's arenas up with the state the CUDA backend keeps, and the FP8 copies of the weights
//! it keeps for a step ([`quantises_a_parameter`]).

use dsc_compiler::fuse::kernels::{base, Code, Kernel};
use dsc_compiler::graph::ir::{Function, Node, Op, V};
use dsc_compiler::plan::{Buffer, Plan};
use std::collections::{HashMap, HashSet};

/// Alignment of every buffer (cudaMalloc's, and enough for 16-byte vector accesses).
pub const ALIGN: u64 = 256;

/// Where each value lives in the arena.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub offsets: HashMap<u32, u64>,
    /// The arena's size: the most bytes alive at once, with the gaps first fit leaves.
    pub peak: u64,
    /// The sum of all buffers (what allocating each separately would take).
    pub total: u64,
}

/// Places `buffers` by lifetime.
pub fn plan(buffers: &[Buffer]) -> Layout {
    let mut order: Vec<&Buffer> = buffers.iter().collect();
    order.sort_by_key(|b| (b.first, b.value));
    // Alive: (offset, size, last), sorted by offset.
    let mut alive: Vec<(u64, u64, u32)> = Vec::new();
    let mut offsets = HashMap::new();
    let mut peak = 0;
    for b in order {
        // A buffer last read by node L is free for one first written after L.
        alive.retain(|&(_, _, last)| last >= b.first);
        let size = b.bytes.max(1).next_multiple_of(ALIGN);
        let mut at = 0;
        for &(offset, bytes, _) in &alive {
            if offset >= at + size {
                break;
            }
            at = at.max(offset + bytes);
        }
        let position = alive.partition_point(|&(offset, _, _)| offset < at);
        alive.insert(position, (at, size, b.last));
        offsets.insert(b.value, at);
        peak = peak.max(at + size);
    }
    let total = buffers.iter().map(|b| b.bytes.max(1).next_multiple_of(ALIGN)).sum();
    Layout { offsets, peak, total }
}

/// The arena of every function of `compiled`: the values its kernels write for others (what a
/// generated kernel computes for itself alone stays in its registers), its arguments left out
/// (read where the caller keeps them), the results an optimizer writes in place
/// ([`in_place`]) and the gradients the gradient function hands to the state ([`delivered`]).
pub fn layouts(compiled: &Plan) -> Vec<Layout> {
    compiled
        .functions
        .iter()
        .zip(&compiled.module.functions)
        .enumerate()
        .map(|(f, (pf, function))| {
            let mut over_arguments: Vec<u32> = in_place(compiled, f).into_values().collect();
            over_arguments.extend(delivered(compiled, f).into_keys());
            // What a generated kernel computes and no one else reads stays in its registers.
            let registers: HashSet<u32> = pf
                .kernels
                .iter()
                .filter_map(|k| match &k.code {
                    Code::Generated { args, .. } => {
                        Some(k.nodes.iter().filter(|n| !k.outputs.contains(n) && !args.contains(n)))
                    }
                    _ => None,
                })
                .flatten()
                .copied()
                .collect();
            let held = |b: &&Buffer| {
                let argument = matches!(function.nodes[b.value as usize].op, Op::Arg(_));
                !registers.contains(&b.value) && !argument && !over_arguments.contains(&b.value)
            };
            plan(&pf.buffers.iter().filter(held).cloned().collect::<Vec<_>>())
        })
        .collect()
}

/// The parameter gradients that the gradient function of `compiled` (function `f`, if it is)
/// hands straight to the training state: by the call result (a `get` of a call) that is one,
/// the index of its output. A result qualifies where it is a learned parameter's gradient,
/// the only output it is, and nothing in the function reads it: the backend copies (or, after
/// a step's first micro-batch, adds) it from the callee into the state's gradient sum, and
/// the function's arena holds no place for it.
pub fn delivered(compiled: &Plan, f: usize) -> HashMap<u32, usize> {
    if f != compiled.grad {
        return HashMap::new();
    }
    let function = &compiled.module.functions[f];
    let grads_at = dsc_compiler::graph::model::LOSS_OUTPUTS + compiled.moe_biases.len();
    let mut read: HashMap<u32, usize> = HashMap::new();
    for node in &function.nodes {
        for &a in &node.args {
            *read.entry(base(function, a).0).or_default() += 1;
        }
    }
    let mut outputs: HashMap<u32, usize> = HashMap::new();
    for &o in &function.outputs {
        *outputs.entry(base(function, o).0).or_default() += 1;
    }
    let mut delivered = HashMap::new();
    for (k, &o) in function.outputs.iter().enumerate() {
        let part = base(function, o);
        let learned = k.checked_sub(grads_at).and_then(|p| compiled.params.get(p)).is_some_and(|p| p.learned);
        let node = function.node(part);
        let of_a_call = matches!(node.op, Op::Get(_)) && matches!(function.node(node.args[0]).op, Op::Call(_));
        if learned && of_a_call && outputs[&part.0] == 1 && !read.contains_key(&part.0) {
            delivered.insert(part.0, k);
        }
    }
    delivered
}

/// The results that function `f` of `compiled`, where it is an optimizer (the model's, or a
/// data-parallel process's), writes over the argument they replace, which has the result's
/// name (`param:…`, `m:…`, `v:…`, `bias:…`): by argument index, the result's value. A result
/// qualifies where the generated kernel writing it is the last to read the argument and works
/// element by element over one flat index (elementwise ops on values of the result's length or
/// scalars, nothing added into a cleared output), so that every element of the argument is
/// read before the same thread writes the same element of the result.
pub fn in_place(compiled: &Plan, f: usize) -> HashMap<usize, u32> {
    let optimizers = std::iter::once(compiled.optimizer).chain(compiled.zero.members.iter().map(|m| m.function));
    if !optimizers.into_iter().any(|o| o == f) {
        return HashMap::new();
    }
    let function = &compiled.module.functions[f];
    let kernels = &compiled.functions[f].kernels;
    let bytes: HashMap<u32, u64> = compiled.functions[f].buffers.iter().map(|b| (b.value, b.bytes)).collect();
    // Per value, the kernel writing it and the last kernel reading it (kernels run in order).
    let mut writer = HashMap::new();
    let mut last_reader: HashMap<u32, usize> = HashMap::new();
    for (k, kernel) in kernels.iter().enumerate() {
        writer.extend(kernel.nodes.iter().map(|&n| (n, k)));
        for &input in &kernel.inputs {
            let read = base(function, V(input)).0;
            last_reader.entry(read).and_modify(|last| *last = (*last).max(k)).or_insert(k);
        }
    }
    let argument: HashMap<&str, usize> =
        function.args.iter().enumerate().map(|(a, (name, _, _))| (name.as_str(), a)).collect();
    let arg_node: HashMap<usize, u32> = function
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match n.op {
            Op::Arg(a) => Some((a, i as u32)),
            _ => None,
        })
        .collect();
    let mut replaced = HashMap::new();
    for (&o, name) in function.outputs.iter().zip(&function.output_names) {
        let Some(&a) = argument.get(name.as_str()) else { continue };
        let Some(&arg) = arg_node.get(&a) else { continue };
        let result = base(function, o);
        let Some(&k) = writer.get(&result.0) else { continue };
        let kernel = &kernels[k];
        let shape = &function.node(result).shape;
        let elements = |shape: &[usize]| shape.iter().product::<usize>();
        // A kernel of elementwise ops over one flat index (several parameters of as many
        // elements may share it).
        let elementwise = kernel.nodes.iter().all(|&n| {
            let node = &function.nodes[n as usize];
            node.op.is_elementwise() && [elements(shape), 1].contains(&elements(&node.shape))
        });
        let generated = matches!(kernel.code, Code::Generated { zeroed: false, .. });
        let last = last_reader.get(&arg).is_none_or(|&last| last <= k);
        let same_size = bytes.get(&arg) == bytes.get(&result.0) && &function.nodes[arg as usize].shape == shape;
        if elementwise && generated && last && same_size {
            replaced.insert(a, result.0);
        }
    }
    replaced
}

/// The GPU memory a training step of a plan takes on the CUDA backend, by what holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepMemory {
    /// The training state (`cuda::resident`), held throughout: every parameter and the gradient
    /// sums of the learned ones in f32, Adam's moments of a process's ZeRO-1 shard of them in
    /// the policy's type (with data-parallel processes, the shard's summed gradient too).
    pub state: u64,
    /// The step's FP8 copies of the weights (`cuda::weights`), held throughout.
    pub weights: u64,
    /// The arenas of the gradient function and of every function it calls, each kept for its
    /// next call (`cuda::exec`).
    pub gradients: u64,
    /// The optimizer's arena.
    pub optimizer: u64,
}

impl StepMemory {
    /// The least a step needs at once (CUDA's own context and cuBLAS's workspaces aside): the
    /// other arenas freed before the optimizer's and its own after it.
    pub fn peak(&self) -> u64 {
        self.state + self.weights + self.gradients.max(self.optimizer)
    }

    /// What a step holds where the GPU has room for every arena, kept from step to step.
    pub fn kept(&self) -> u64 {
        self.state + self.weights + self.gradients + self.optimizer
    }
}

/// What a training step of `plan` holds on the GPU of one process (see [`StepMemory`]), its
/// functions' arenas at `layouts` ([`layouts`]).
pub fn step_memory(compiled: &Plan, layouts: &[Layout]) -> StepMemory {
    let zero = &compiled.zero;
    let (_, params) = zero.placement(&compiled.params);
    // Parameters and gradient sums in f32, the moments of the shard in their own type, and
    // with peers the shard's summed gradient.
    let moments = 2 * compiled.moment_bytes() * zero.shard;
    let shard_gradient = if zero.members.len() > 1 { 4 * zero.shard } else { 0 };
    let state = (4 * (params + zero.len()) + moments + shard_gradient) as u64;
    let arena = |f: usize| layouts[f].peak;
    // The gradient function and the functions it calls, at any depth, with the parameters'
    // FP8 copies they make.
    let origins: Vec<Option<usize>> = (0..compiled.module.functions[compiled.grad].args.len())
        .map(|a| (a < compiled.params.len()).then_some(a))
        .collect();
    let mut called = vec![(compiled.grad, origins)];
    let mut copies: HashMap<WeightKey, u64> = HashMap::new();
    let mut next = 0;
    while next < called.len() {
        let (f, origins) = called[next].clone();
        let function = &compiled.module.functions[f];
        for kernel in &compiled.functions[f].kernels {
            if let Some((node, key)) = quantises_a_parameter(function, kernel, &origins) {
                let bytes = compiled.functions[f].buffers.iter().find(|b| b.value == node).map_or(0, |b| b.bytes);
                copies.insert(key, bytes.next_multiple_of(ALIGN));
            }
        }
        for node in &function.nodes {
            if let Op::Call(callee) = node.op {
                called.push((callee, weight_origins(function, node, &origins)));
            }
        }
        next += 1;
    }
    let mut gradients: Vec<usize> = called.iter().map(|(f, _)| *f).collect();
    gradients.sort_unstable();
    gradients.dedup();
    StepMemory {
        state,
        weights: copies.values().sum(),
        gradients: gradients.into_iter().map(arena).sum(),
        optimizer: arena(zero.members[0].function),
    }
}

/// A parameter's index and how it is quantised (the node's op and its result's shape).
pub type WeightKey = (usize, String, Vec<usize>);

/// The node of `kernel` (of `function`, whose arguments are the parameters `origins` says)
/// and what it makes, if it quantises a parameter: a kernel of one `quantize` node whose
/// operand is such an argument. The CUDA backend keeps what these make for a whole step
/// (`cuda::weights`).
pub fn quantises_a_parameter(
    function: &Function,
    kernel: &Kernel,
    origins: &[Option<usize>],
) -> Option<(u32, WeightKey)> {
    let [node] = kernel.nodes[..] else { return None };
    let quantize = &function.nodes[node as usize];
    if !matches!(quantize.op, Op::Quantize { .. }) {
        return None;
    }
    let Op::Arg(a) = function.node(quantize.args[0]).op else { return None };
    let param = origins.get(a).copied().flatten()?;
    Some((node, (param, format!("{:?}", quantize.op), quantize.shape.clone())))
}

/// The parameters a call's arguments are: for each argument of the function called at `node`
/// of `caller`, the parameter its value is where the caller's own argument is one
/// (`caller_origins`).
pub fn weight_origins(caller: &Function, node: &Node, caller_origins: &[Option<usize>]) -> Vec<Option<usize>> {
    node.args
        .iter()
        .map(|&a| match caller.node(base(caller, a)).op {
            Op::Arg(x) => caller_origins.get(x).copied().flatten(),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn buffer(value: u32, bytes: u64, first: u32, last: u32) -> Buffer {
        Buffer { value, bytes, first, last }
    }

    #[test]
    fn no_function_keeps_an_argument_in_its_arena() {
        let compiled = tiny_plan();
        let layouts = layouts(&compiled);
        for (f, function) in compiled.module.functions.iter().enumerate() {
            let args: Vec<&Buffer> = compiled.functions[f]
                .buffers
                .iter()
                .filter(|b| matches!(function.nodes[b.value as usize].op, Op::Arg(_)))
                .collect();
            let held = args.iter().filter(|b| layouts[f].offsets.contains_key(&b.value)).count();
            let all = plan(&compiled.functions[f].buffers);
            assert_eq!(held, 0, "{}: its arguments stay where the caller keeps them", function.name);
            assert!(layouts[f].total < all.total, "{}", function.name);
            // Whatever a kernel, a call or the caller reads from another has a place.
            for kernel in &compiled.functions[f].kernels {
                let read = kernel.inputs.iter().chain(&kernel.outputs);
                let stored = |v: &&u32| function.nodes[**v as usize].dtype != dsc_compiler::graph::ir::DType::Tuple;
                let placed = |v: &u32| layouts[f].offsets.contains_key(v) || args.iter().any(|b| b.value == *v);
                let in_place: Vec<u32> = in_place(&compiled, f).into_values().collect();
                for v in read.filter(stored) {
                    let base = base(function, V(*v)).0;
                    let is_view = base != *v;
                    assert!(
                        is_view
                            || placed(v)
                            || in_place.contains(v)
                            || matches!(function.nodes[*v as usize].op, Op::Const(_)),
                        "{}: value {v} of {}",
                        function.name,
                        kernel.name
                    );
                }
            }
        }
    }

    fn tiny_plan() -> Plan {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
        let spec = dsc_lang::load(&path, &[]).checked_spec().expect("the tiny spec").clone();
        dsc_compiler::plan::compile(&spec, dsc_compiler::fuse::Limits::default())
    }

    /// The kernels whose results the CUDA backend keeps for the whole step are exactly the
    /// quantisations of the weights: walking the tiny FP8 plan's gradient function as the
    /// executor calls it (the training state's parameters first, then into every call), every
    /// `quantize` in weight blocks qualifies and no activation's (1×k tiles of values made per
    /// micro-batch) does; a micro-batch meets each kept one once (the layers' backward halves
    /// take their forward products rather than recompute them), and only the step's first
    /// micro-batch quantises at all; the memory estimate counts each copy once.
    #[test]
    fn the_quantisations_kept_for_a_step_are_the_weights() {
        fn walk(plan: &Plan, f: usize, origins: &[Option<usize>], kept: &mut Vec<(u32, usize, WeightKey)>) {
            let function = &plan.module.functions[f];
            for kernel in &plan.functions[f].kernels {
                let quantize = match function.nodes[kernel.nodes[0] as usize].op {
                    Op::Quantize { rows, .. } if kernel.nodes.len() == 1 => Some(rows),
                    _ => None,
                };
                let qualifies = quantises_a_parameter(function, kernel, origins);
                assert_eq!(qualifies.is_some(), quantize.is_some_and(|rows| rows > 1), "{}", kernel.name);
                kept.extend(qualifies.map(|(node, key)| (node, f, key)));
            }
            for node in &function.nodes {
                if let Op::Call(callee) = node.op {
                    walk(plan, callee, &weight_origins(function, node, origins), kept);
                }
            }
        }
        let plan = tiny_plan();
        let args = plan.module.functions[plan.grad].args.len();
        let origins: Vec<Option<usize>> = (0..args).map(|i| (i < plan.params.len()).then_some(i)).collect();
        let mut kept = Vec::new();
        walk(&plan, plan.grad, &origins, &mut kept);
        let mut copies: HashMap<&WeightKey, u64> = HashMap::new();
        for (node, f, key) in &kept {
            let bytes = plan.functions[*f].buffers.iter().find(|b| b.value == *node).expect("a buffer").bytes;
            copies.insert(key, bytes.next_multiple_of(ALIGN));
        }
        assert_eq!((kept.len(), copies.len()), (84, 84));
        let layouts = layouts(&plan);
        assert_eq!(step_memory(&plan, &layouts).weights, copies.values().sum::<u64>());
    }

    /// The optimizer writes every parameter and moment over its argument: its arena holds
    /// none of them (only the routing biases' update, whose mean over the loads reads them
    /// whole), against all of them before.
    #[test]
    fn the_optimizer_updates_the_state_in_place() {
        let compiled = tiny_plan();
        let f = compiled.optimizer;
        let function = &compiled.module.functions[f];
        let replaced = in_place(&compiled, f);
        let learned = compiled.params.iter().filter(|p| p.learned).count();
        let names: Vec<&str> = replaced.keys().map(|&a| function.args[a].0.as_str()).collect();
        for what in ["param:", "m:", "v:"] {
            assert_eq!(names.iter().filter(|n| n.starts_with(what)).count(), learned, "{what}");
        }
        assert!(replaced.iter().all(|(&a, &result)| function
            .output_names
            .iter()
            .zip(&function.outputs)
            .any(|(name, &o)| *name == function.args[a].0 && base(function, o).0 == result)));
        let all = plan(
            &compiled.functions[f]
                .buffers
                .iter()
                .filter(|b| !matches!(function.nodes[b.value as usize].op, Op::Arg(_)))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let layout = &layouts(&compiled)[f];
        eprintln!("optimizer arena {} bytes, {} with its results apart", layout.peak, all.peak);
        assert!(layout.peak * 10 < all.peak, "{} vs {}", layout.peak, all.peak);
        assert!(in_place(&compiled, compiled.grad).is_empty());
    }

    /// Where a value is during a call: an argument read where the caller keeps it, bytes of
    /// the arena, or the training state.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Place {
        Argument(usize),
        Arena(u64, u64),
        /// A gradient sum of the training state, by the value handed to it.
        State(u32),
    }

    impl Place {
        fn overlaps(self, other: Place) -> bool {
            match (self, other) {
                (Place::Argument(a), Place::Argument(b)) => a == b,
                (Place::Arena(a, x), Place::Arena(b, y)) => a < b + y && b < a + x,
                (Place::State(a), Place::State(b)) => a == b,
                _ => false,
            }
        }
    }

    /// Runs function `f` of `compiled` symbolically as the CUDA backend does (its steps in
    /// node order: arguments, tables and calls at their nodes, kernels at their first), with
    /// every value at the place `layouts` and [`in_place`] give it: each write clobbers what
    /// overlaps it, and every read (a kernel's inputs, a call's arguments, the results at the
    /// end) must find the value it wants still there. Fails with what was lost.
    fn check_places(compiled: &Plan, f: usize, layout: &Layout) -> Result<(), String> {
        let function = &compiled.functions[f];
        let module_function = &compiled.module.functions[f];
        let replaced: HashMap<u32, usize> = in_place(compiled, f).into_iter().map(|(a, v)| (v, a)).collect();
        let delivered = delivered(compiled, f);
        let bytes: HashMap<u32, u64> = function.buffers.iter().map(|b| (b.value, b.bytes)).collect();
        let place = |v: u32| -> Option<Place> {
            match module_function.nodes[v as usize].op {
                Op::Arg(a) => Some(Place::Argument(a)),
                Op::Const(_) => None,
                _ if delivered.contains_key(&v) => Some(Place::State(v)),
                _ => match (replaced.get(&v), layout.offsets.get(&v)) {
                    (Some(&a), _) => Some(Place::Argument(a)),
                    (_, Some(&at)) => Some(Place::Arena(at, bytes[&v].max(1))),
                    _ => None,
                },
            }
        };
        let mut memory: Vec<(Place, u32)> = Vec::new();
        let write = |memory: &mut Vec<(Place, u32)>, v: u32| -> Result<(), String> {
            let at = place(v).ok_or_else(|| format!("value {v} is written but has no place"))?;
            memory.retain(|&(other, _)| !other.overlaps(at));
            memory.push((at, v));
            Ok(())
        };
        let read = |memory: &Vec<(Place, u32)>, v: u32, by: &str| -> Result<(), String> {
            let v = base(module_function, V(v)).0;
            match place(v) {
                None if matches!(module_function.nodes[v as usize].op, Op::Const(_)) => Ok(()),
                None => Err(format!("{by} reads value {v}, which has no place")),
                Some(at) if memory.contains(&(at, v)) => Ok(()),
                Some(at) => Err(format!("{by} reads value {v} at {at:?}, overwritten by then")),
            }
        };
        // A tuple-valued node is stored as its parts.
        let stored = |v: u32| -> Vec<u32> {
            match module_function.nodes[v as usize].dtype {
                dsc_compiler::graph::ir::DType::Tuple => (0..module_function.nodes.len() as u32)
                    .filter(|&g| {
                        let get = &module_function.nodes[g as usize];
                        matches!(get.op, Op::Get(_)) && get.args == [V(v)]
                    })
                    .collect(),
                _ => vec![v],
            }
        };
        let mut steps: Vec<(u32, Option<usize>)> =
            function.kernels.iter().enumerate().map(|(k, kernel)| (kernel.nodes[0], Some(k))).collect();
        steps.extend(
            module_function
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| matches!(n.op, Op::Arg(_) | Op::Table(_) | Op::Call(_)))
                .map(|(i, _)| (i as u32, None)),
        );
        steps.sort_by_key(|&(node, _)| node);
        // The tables and arguments written so far.
        let mut tables = std::collections::HashSet::new();
        for (node, kernel) in steps {
            match kernel {
                Some(k) => {
                    let kernel = &function.kernels[k];
                    for &input in &kernel.inputs {
                        // A constant table is written at its first use.
                        if matches!(module_function.nodes[input as usize].op, Op::Table(_)) && tables.insert(input) {
                            write(&mut memory, input)?;
                        }
                        read(&memory, input, &kernel.name)?;
                    }
                    for &output in &kernel.outputs {
                        for v in stored(output) {
                            write(&mut memory, v)?;
                        }
                    }
                }
                None => {
                    let n = &module_function.nodes[node as usize];
                    if let Op::Call(_) = n.op {
                        for &arg in &n.args {
                            read(&memory, arg.0, &format!("the call at %{node}"))?;
                        }
                        for v in stored(node) {
                            write(&mut memory, v)?;
                        }
                    } else if bytes.contains_key(&node) && tables.insert(node) {
                        write(&mut memory, node)?;
                    }
                }
            }
        }
        for &o in &module_function.outputs {
            read(&memory, o.0, "the function's results")?;
        }
        Ok(())
    }

    /// Every value of every function of the tiny and bench plans (one process, and two
    /// data-parallel processes with their shards' optimizers) is where its readers look for
    /// it: no buffer the memory plan shares, no result written over an argument and nothing a
    /// kernel keeps in registers is read after it is gone.
    #[test]
    fn every_value_is_in_place_when_it_is_read() {
        let synthetic = ["train.data.sources=[synthetic { weight = 1 }]", "train.data.fim_rate=0"];
        let processes = ["parallel.gpus_per_node=2", "parallel.data.size=2"];
        for (model, overrides) in [
            ("tiny", vec![]),
            ("tiny", processes.to_vec()),
            ("bench", synthetic.to_vec()),
            ("bench", [&synthetic[..], &processes[..]].concat()),
        ] {
            let path =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../models/deepseek-v3-{model}.dsc"));
            let overrides: Vec<String> = overrides.into_iter().map(String::from).collect();
            let spec = dsc_lang::load(&path, &overrides).checked_spec().expect("the spec checks").clone();
            let compiled = dsc_compiler::plan::compile(&spec, dsc_compiler::fuse::Limits::default());
            let layouts = layouts(&compiled);
            for (f, pf) in compiled.functions.iter().enumerate() {
                if let Err(lost) = check_places(&compiled, f, &layouts[f]) {
                    panic!("{}: {lost}", pf.name);
                }
                // Every buffer lives from before its first reader to after its last (a table
                // read before its node too).
                let function = &compiled.module.functions[f];
                for kernel in &pf.kernels {
                    for &input in &kernel.inputs {
                        let Some(b) = pf.buffers.iter().find(|b| b.value == base(function, V(input)).0) else {
                            continue;
                        };
                        let (lo, hi) = (kernel.nodes[0], *kernel.nodes.iter().max().expect("a node"));
                        assert!(
                            b.first <= lo && hi <= b.last,
                            "{}: {b:?} read by {} at {lo}..{hi}",
                            pf.name,
                            kernel.name
                        );
                    }
                }
            }
        }
    }

    /// The gradient function hands most parameter gradients straight to the state (those its
    /// layers' calls yield), and its arena shrinks by them.
    #[test]
    fn the_gradients_go_straight_to_the_state() {
        let compiled = tiny_plan();
        let f = compiled.grad;
        let function = &compiled.module.functions[f];
        let handed = delivered(&compiled, f);
        let grads_at = dsc_compiler::graph::model::LOSS_OUTPUTS + compiled.moe_biases.len();
        let learned = compiled.params.iter().filter(|p| p.learned).count();
        assert!(handed.len() * 10 >= learned * 8, "{} of {learned}", handed.len());
        for (&part, &k) in &handed {
            assert!(compiled.params[k - grads_at].learned);
            assert_eq!(base(function, function.outputs[k]).0, part);
        }
        let kept = |b: &&Buffer| !matches!(function.nodes[b.value as usize].op, Op::Arg(_));
        let before = plan(&compiled.functions[f].buffers.iter().filter(kept).cloned().collect::<Vec<_>>());
        let after = &layouts(&compiled)[f];
        assert!(after.peak < before.peak, "{} vs {}", after.peak, before.peak);
    }

    #[test]
    fn a_chain_reuses_memory() {
        // a → b → c → d, each read only by the next: two buffers alive at a time.
        let buffers: Vec<Buffer> = (0..4).map(|i| buffer(i, 1000, i, i + 1)).collect();
        let layout = plan(&buffers);
        assert_eq!(layout.total, 4 * 1024);
        assert_eq!(layout.peak, 2 * 1024);
    }

    proptest! {
        /// Buffers alive at the same node never overlap, and the peak is at most the sum.
        #[test]
        fn live_buffers_never_overlap(spans in prop::collection::vec((1u64..5000, 0u32..40, 0u32..10), 1..60)) {
            let buffers: Vec<Buffer> = spans
                .iter()
                .enumerate()
                .map(|(i, &(bytes, first, length))| buffer(i as u32, bytes, first, first + length))
                .collect();
            let layout = plan(&buffers);
            prop_assert!(layout.peak <= layout.total);
            for a in &buffers {
                for b in &buffers {
                    let together = a.value < b.value && a.first <= b.last && b.first <= a.last;
                    let (x, y) = (layout.offsets[&a.value], layout.offsets[&b.value]);
                    let apart = x + a.bytes <= y || y + b.bytes <= x;
                    prop_assert!(!together || apart, "{a:?} at {x} and {b:?} at {y} overlap");
                }
            }
        }
    }
}
