//! CUDA graphs of the training step's calls: the gradient function (one graph for a step's
//! first micro-batch, which writes the gradient sums and the step's FP8 weights, one for the
//! others, which add to the sums and read those weights) and the optimizer are each captured
//! once and replayed from then on, a launch each where there were thousands, with no gap
//! between kernels for the host to fill.
//!
//! A graph holds the addresses it was captured on, so it is replayed only on the same ones
//! ([`Signature`]: the call's arguments, the results it delivers, the arenas of its function
//! and of every function it calls, the fused attention's scratch; its host inputs are written
//! into buffers kept for them: [`Executor::staged`]). On other addresses the call runs
//! eagerly, and is captured at the next call that finds its addresses as the eager one left
//! them, where that eager call moved nothing between the host and the device between its
//! kernels. What a call makes at its first run (its arenas, the constant tables, the FP8
//! weights' buffers, the attention's scratch, the GEMMs' tensor maps) a later call on the same
//! addresses finds made, so nothing is allocated while capturing; the FP8 weights' buffers
//! live as long as the training state, and a new state drops every graph. A function whose
//! calls do move data to or from the host (kernels on the host, grouped GEMMs whose expert
//! offsets are read back) always runs eagerly: that is where the plan does not allow a graph.
//! Profiled and checked executors launch eagerly (their events and synchronisations go
//! between the kernels).

use super::exec::{Binding, Call, Counts, Executor, Input};
use super::GpuError;
use crate::memory::WeightKey;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, DevicePtr};
use dsc_compiler::graph::ir::Op;
use dsc_compiler::plan::Plan;
use std::collections::{BTreeSet, HashMap};

/// The graphs of an executor's calls, by call: (function, whether its results are added to
/// those of the step's earlier micro-batches).
pub struct Graphs {
    /// Per function, it and every function it calls, directly or through its callees.
    trees: Vec<Vec<usize>>,
    calls: HashMap<(usize, bool), Entry>,
}

/// The addresses a call's launches take.
#[derive(Clone, PartialEq, Eq, Debug)]
struct Signature {
    /// Its arguments' (`None`: uploaded for the call, a new buffer each time).
    inputs: Vec<Option<u64>>,
    /// Its results delivered outside its arena, by value.
    delivered: Vec<(u32, u64)>,
    /// The arenas of its function's tree, where they are kept.
    arenas: Vec<Option<u64>>,
    /// The fused attention's scratch memory.
    scratch: Option<u64>,
}

enum Entry {
    /// Ran eagerly on these addresses, moving nothing between the host and the device: the
    /// next call on them is captured.
    Steady(Signature),
    Captured(Captured),
    /// Its calls move data between the host and the device between kernels.
    Eager,
}

struct Captured {
    signature: Signature,
    graph: CudaGraph,
    /// The call's values outside its arena (arguments, FP8 weights), for reading its results.
    outside: HashMap<u32, u64>,
    /// What the graph launches, by path.
    counts: Counts,
    /// The FP8 weights it quantises.
    quantises: Vec<WeightKey>,
}

impl Graphs {
    pub fn new(plan: &Plan) -> Graphs {
        let functions = &plan.module.functions;
        let callees = |f: usize| {
            functions[f].nodes.iter().filter_map(|n| match n.op {
                Op::Call(callee) => Some(callee),
                _ => None,
            })
        };
        let trees = (0..functions.len())
            .map(|f| {
                let mut tree = BTreeSet::from([f]);
                let mut next = vec![f];
                while let Some(g) = next.pop() {
                    next.extend(callees(g).filter(|&c| tree.insert(c)));
                }
                tree.into_iter().collect()
            })
            .collect();
        Graphs { trees, calls: HashMap::new() }
    }

    /// Drops every graph (the buffers outside the calls' signatures, the FP8 weights', are
    /// made anew).
    pub fn forget(&mut self) {
        self.calls.clear();
    }
}

impl Executor {
    /// Runs function `f` as [`Executor::invoke`] does, from its CUDA graph where it has one
    /// for these addresses, capturing one where the last call on them showed it can.
    pub(super) fn invoke_step(&mut self, f: usize, args: &[Input], binding: Binding) -> Result<Call, GpuError> {
        let Some(graphs) = &self.graphs else { return self.invoke(f, args, binding) };
        let key = (f, binding.add);
        let signature = self.signature(f, args, &binding, self.spare[f].as_ref());
        match graphs.calls.get(&key) {
            Some(Entry::Captured(captured)) if captured.signature == signature => return self.replay(key, binding),
            Some(Entry::Steady(steady)) if *steady == signature && signature.inputs.iter().all(Option::is_some) => {
                return self.capture(key, args, binding, signature);
            }
            Some(Entry::Eager) => return self.invoke(f, args, binding),
            _ => {}
        }
        let transfers = self.gpu.transfers();
        let call = self.invoke(f, args, binding)?;
        let entry = if self.gpu.transfers() == transfers {
            Entry::Steady(self.signature(f, args, &call.binding, Some(&call.arena)))
        } else {
            let name = &self.plan.module.functions[f].name;
            tracing::info!("`{name}` runs without a CUDA graph: its calls move data between the host and the GPU");
            Entry::Eager
        };
        self.graphs.as_mut().expect("checked above").calls.insert(key, entry);
        Ok(call)
    }

    /// The addresses a call of `f` on `args` bound to `binding` takes, its own arena `arena`.
    fn signature(&self, f: usize, args: &[Input], binding: &Binding, arena: Option<&CudaSlice<u8>>) -> Signature {
        let graphs = self.graphs.as_ref().expect("asked only with graphs");
        let address = |arena: &CudaSlice<u8>| arena.device_ptr(&self.gpu.stream).0;
        let inputs = args
            .iter()
            .map(|a| match a {
                Input::Device(at, _) => Some(*at),
                Input::Host(_) | Input::Scalar(_) => None,
            })
            .collect();
        let mut delivered: Vec<(u32, u64)> = binding.delivered.iter().map(|(&v, &at)| (v, at)).collect();
        delivered.sort_unstable();
        let arenas = (graphs.trees[f].iter())
            .map(|&g| if g == f { arena } else { self.spare[g].as_ref() }.map(address))
            .collect();
        let scratch = self.attention.as_ref().and_then(|attention| attention.scratch(&self.gpu));
        Signature { inputs, delivered, arenas, scratch }
    }

    /// Captures the call of `f` (`key.0`) into a graph and launches it.
    fn capture(
        &mut self,
        key: (usize, bool),
        args: &[Input],
        binding: Binding,
        signature: Signature,
    ) -> Result<Call, GpuError> {
        // The graph's launches are counted apart, for its replays to add.
        let (f, counts) = (key.0, std::mem::take(&mut self.counts));
        let fresh = self.weights.as_ref().map(|cache| cache.fresh()).unwrap_or_default();
        let stream = self.gpu.stream.clone();
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let call = self.invoke(f, args, binding.clone());
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        let name = self.plan.module.functions[f].name.clone();
        let (call, graph) = match (call, graph) {
            (Ok(call), Ok(Some(graph))) => (call, graph),
            (call, graph) => {
                // Not expected of a call whose eager run moved nothing to or from the host:
                // it runs eagerly from now on, its FP8 weights made again.
                let why = match (&call, &graph) {
                    (Err(e), _) => e.to_string(),
                    (_, Err(e)) => e.to_string(),
                    _ => "nothing was captured".to_string(),
                };
                tracing::warn!("`{name}` could not be captured in a CUDA graph ({why}); it runs eagerly");
                if let Ok(call) = call {
                    self.spare[f] = Some(call.arena);
                }
                self.counts = counts;
                self.graphs.as_mut().expect("capturing").calls.insert(key, Entry::Eager);
                if let Some(cache) = &mut self.weights {
                    cache.stale();
                }
                return self.invoke(f, args, binding);
            }
        };
        graph.launch()?;
        let quantises = match &self.weights {
            Some(cache) => cache.fresh().into_iter().filter(|key| !fresh.contains(key)).collect(),
            None => Vec::new(),
        };
        tracing::info!("`{name}` captured in a CUDA graph (results added: {})", key.1);
        let launched = self.counts;
        self.counts = counts + launched;
        let (counts, outside) = (launched, call.outside.clone());
        let captured = Captured { signature, graph, outside, counts, quantises };
        self.graphs.as_mut().expect("capturing").calls.insert(key, Entry::Captured(captured));
        Ok(call)
    }

    /// Replays the graph captured for `key`.
    fn replay(&mut self, key: (usize, bool), binding: Binding) -> Result<Call, GpuError> {
        let Some(Entry::Captured(captured)) = self.graphs.as_ref().and_then(|g| g.calls.get(&key)) else {
            unreachable!("replayed only where captured")
        };
        captured.graph.launch()?;
        let (counts, outside, quantises) = (captured.counts, captured.outside.clone(), captured.quantises.clone());
        self.counts = self.counts + counts + Counts { graphs: 1, ..Counts::default() };
        if let Some(cache) = &mut self.weights {
            cache.refresh(&quantises);
        }
        let f = key.0;
        let arena = self.spare[f].take().expect("a graph is replayed on the arena it was captured on");
        Ok(Call { arena, layout: self.layouts[f].clone(), outside, uploads: Vec::new(), binding })
    }
}
