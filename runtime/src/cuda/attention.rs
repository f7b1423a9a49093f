//! The compiler's fused attention (`compiler::mlir::attention`) where a plan carries it
//! (`Plan::attention_heads`): `attention` on its forward kernel, `attention_grad` on its two
//! backward passes (dq, which also writes each row's D = Σ dO∘O, then dk and dv), on the plan's
//! buffers as they are. What the plan stores nowhere (an unread part, such as the log-sum-exp
//! of a forward that is not differentiated, D, and the packed BF16 copy of dO that the dq pass
//! writes for the key pass where they stream) goes to scratch memory kept here.

use super::places::Places;
use super::tensor_maps::{Mapped, TensorMaps};
use super::{Gpu, GpuError};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use dsc_compiler::fuse::kernels::{base, Kernel};
use dsc_compiler::graph::ir::{Function, Op, V};
use dsc_compiler::mlir::attention::{self, kernel_name, Heads, Pass, BLOCK_ROWS};
use dsc_compiler::plan::Plan;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

/// A loaded kernel and the dynamic shared memory its blocks take.
struct Loaded {
    function: CudaFunction,
    shared: u32,
    _module: Arc<CudaModule>,
}

/// The plan's three attention kernels (forward, then the backward passes in launch order).
pub struct FusedAttention {
    heads: Heads,
    forward: Loaded,
    backward: [Loaded; 2],
    scratch: Option<CudaSlice<u8>>,
    /// The tensor maps of Q, K and V (and dO's copy) for the kernels that stream them
    /// (`Heads::streams`: on packed inputs).
    maps: TensorMaps,
}

impl FusedAttention {
    /// The plan's attention kernels from `dir/kernels/NAME.ptx`, if it carries them.
    pub fn load(gpu: &Gpu, plan: &Plan, dir: &Path) -> Result<Option<FusedAttention>, GpuError> {
        let Some(heads) = plan.attention_heads() else { return Ok(None) };
        let load = |pass: Option<Pass>| -> Result<Loaded, GpuError> {
            let (module, function) = super::load_kernel(gpu, dir, &kernel_name(heads, pass))?;
            let shared = heads.launch_shared_bytes(pass);
            let bytes = i32::try_from(shared).expect("a block's shared memory fits an i32");
            function
                .set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)?;
            Ok(Loaded { function, shared, _module: module })
        };
        Ok(Some(FusedAttention {
            heads,
            forward: load(None)?,
            backward: [load(Some(Pass::Query))?, load(Some(Pass::Key))?],
            scratch: None,
            maps: TensorMaps::default(),
        }))
    }

    /// Whether `kernel` (of `function`, whose `packed` values are stored as bf16) is attention
    /// or its backward that these kernels run.
    /// Where its scratch memory is (it grows where a call needs more: a CUDA graph captured on
    /// the old one is replayed no more).
    pub fn scratch(&self, gpu: &Gpu) -> Option<u64> {
        self.scratch.as_ref().map(|scratch| scratch.device_ptr(&gpu.stream).0)
    }

    pub fn runs(&self, function: &Function, kernel: &Kernel, packed: &HashSet<u32>) -> bool {
        attention::fused(function, &function.nodes[kernel.nodes[0] as usize], packed) == Some(self.heads)
    }

    /// Runs `kernel` (one that [`Self::runs`]) on its buffers at `places`.
    pub fn run(&mut self, gpu: &Gpu, function: &Function, kernel: &Kernel, places: &Places) -> Result<(), GpuError> {
        let at = kernel.nodes[0];
        let node = &function.nodes[at as usize];
        let (forward, scale) = match node.op {
            Op::Attention { scale, .. } => (true, scale as f32),
            Op::AttentionGrad { scale, .. } => (false, scale as f32),
            _ => unreachable!("`runs` said attention"),
        };
        let q = &function.node(node.args[0]).shape;
        let (batch, seq, heads) = (q[0], q[1], q[2]);
        let narrow = |x: usize| u32::try_from(x).map_err(|_| GpuError::Unsupported(format!("{x} exceeds u32")));
        let (seq_arg, heads_arg) = (narrow(seq)?, narrow(heads)?);
        let config = |loaded: &Loaded, threads: u32| -> Result<LaunchConfig, GpuError> {
            Ok(LaunchConfig {
                grid_dim: (narrow(seq / BLOCK_ROWS as usize)?, narrow(batch * heads)?, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: loaded.shared,
            })
        };
        // The kernels take the backward's operands as Q, K, V, O, dO, LSE.
        let order: &[usize] = if forward { &[0, 1, 2] } else { &[0, 1, 2, 3, 5, 4] };
        let inputs: Vec<u64> = order.iter().map(|&i| places.at(base(function, node.args[i]).0)).collect();
        // Each part's buffer, or a scratch region after D ([b, h, s] f32) and dO's packed copy
        // (where the passes stream) for a part no one reads.
        let row_bytes = batch * heads * seq * 4;
        let copy_bytes =
            if !forward && self.heads.streams() { batch * seq * heads * self.heads.v as usize * 2 } else { 0 };
        // The parts: o and lse, or dq, dk and dv.
        let part_count = if forward { 2 } else { 3 };
        let stored: Vec<Option<u32>> = (0..part_count).map(|i| function.part(V(at), i).map(|g| g.0)).collect();
        let part_bytes = |i: usize| match (forward, i) {
            (true, 1) => row_bytes,
            (true, _) => function.node(node.args[2]).shape.iter().product::<usize>() * 4,
            (false, i) => function.node(node.args[i]).shape.iter().product::<usize>() * 4,
        };
        let scratch_bytes =
            row_bytes + copy_bytes + (0..part_count).filter(|&i| stored[i].is_none()).map(part_bytes).sum::<usize>();
        if self.scratch.as_ref().is_none_or(|s| s.len() < scratch_bytes) {
            self.scratch = Some(gpu.stream.alloc_zeros::<u8>(scratch_bytes)?);
        }
        let (scratch, _sync) = self.scratch.as_ref().expect("allocated above").device_ptr(&gpu.stream);
        let delta = scratch;
        let do_copy = scratch + row_bytes as u64;
        let mut spare = do_copy + copy_bytes as u64;
        let parts: Vec<u64> = (0..part_count)
            .map(|i| match stored[i] {
                Some(g) => places.at(g),
                None => {
                    let place = spare;
                    spare += part_bytes(i) as u64;
                    place
                }
            })
            .collect();
        // Q, K and V (and in the backward dO's copy) as [B·S, H·D] BF16 tensors, for the
        // kernels that stream them.
        let (dims, encoded) = (self.heads, &self.maps);
        let maps_for = |pass: Option<Pass>| -> Result<Vec<u64>, GpuError> {
            if !dims.streams() {
                return Ok(Vec::new());
            }
            let mut tensors = vec![(inputs[0], dims.qk), (inputs[1], dims.qk), (inputs[2], dims.v)];
            if pass.is_some() {
                tensors.push((do_copy, dims.v));
            }
            (tensors.into_iter())
                .map(|(at, width)| encoded.at(gpu, at, batch * seq, heads * width as usize, Mapped::Heads))
                .collect()
        };
        if forward {
            let mut launch = gpu.stream.launch_builder(&self.forward.function);
            for pointer in inputs.iter().chain(&parts) {
                launch.arg(pointer);
            }
            launch.arg(&seq_arg).arg(&heads_arg).arg(&scale);
            let maps = maps_for(None)?;
            for map in &maps {
                launch.arg(map);
            }
            // SAFETY: the arguments follow `attention_forward`'s signature (Q, K, V, O, LSE
            // pointers to live buffers of the shapes the node gives, S, H, the scale, and where
            // it streams, the maps of Q, K and V: live on the device in `self.maps`), S a
            // multiple of the block's rows (`runs`).
            unsafe { launch.launch(config(&self.forward, self.heads.threads())?) }?;
        } else {
            // dQ from the query pass, dK and dV from the key pass.
            for ((loaded, pass), grads) in self.backward.iter().zip(Pass::ALL).zip([&parts[..1], &parts[1..]]) {
                let mut launch = gpu.stream.launch_builder(&loaded.function);
                for pointer in inputs.iter().chain([&delta]).chain(grads) {
                    launch.arg(pointer);
                }
                launch.arg(&seq_arg).arg(&heads_arg).arg(&scale);
                let maps = maps_for(Some(pass))?;
                for map in &maps {
                    launch.arg(map);
                }
                // SAFETY: the arguments follow `attention_backward`'s signature (Q, K, V, O, dO,
                // LSE, D, the gradients it writes: pointers to live buffers of the node's shapes; S, H, the
                // scale; where the pass streams, the maps of Q, K, V and dO's copy in scratch,
                // live in `self.maps`); the query pass writes D and dO's copy before the key pass
                // reads them.
                unsafe { launch.launch(config(loaded, self.heads.threads())?) }?;
            }
        }
        Ok(())
    }
}
