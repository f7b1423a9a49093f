//! The training state on the GPU: [`Resident`] for the [`Executor`]. The parameters live in
//! one device allocation, the learned ones where the plan's ZeRO-1 layout places them
//! ([`dsc_compiler::graph::zero::Zero`]: one after another, aligned) and the others after; the
//! learned parameters' gradient sums over the step's micro-batches in a second one laid out
//! alike; Adam's moments of this process's shard of that layout in two more (in the element
//! type the optimizer function reads them in: bf16 under the recipe's policy). A step moves
//! only its micro-batches, losses, loads and a few scalars (with the state on the host, a
//! step of the bench model moved and converted tens of GB).
//!
//! The gradient function reads the parameters in place (their FP8 copies made once a step:
//! [`super::weights`]); its gradients go into the sums: the first micro-batch's written
//! there (or copied), the next ones' added there by the GEMMs that make them where they can
//! (`exec`'s `adding`), else with cuBLAS `saxpy`. Where the
//! executor has joined data-parallel peers ([`Executor::join`]), NCCL reduce-scatters the sums
//! so that each process holds its shard of the total; its `snrm2` squared is the process's
//! part of the gradient norm (of the sum: the trainer scales it to the mean's, and the
//! optimizer the sum to the mean), and the process's optimizer function (over its shard's
//! pieces and the routing biases) reads the
//! state in place and writes its results over it (those the plan cannot write in place are
//! copied back: `memory::in_place`), and NCCL all-gathers the updated shards into
//! every process's parameters. Alone, the shard is the whole layout and the function the
//! model's optimizer. Where the device cannot hold the optimizer's arena beside the other
//! functions' arenas, it is freed after the update and the others before it, so that the step
//! peaks at the state plus the largest phase.

use super::exec::{encode, real_bytes, reals, Binding, Call, Executor, Input};
use super::nccl::Nccl;
use super::places;
use super::weights::WeightCache;
use super::{Gpu, GpuError};
use crate::cpu::{Tensor, Value};
use crate::train::backend::Moments;
use crate::train::Resident;
use cudarc::cublas::sys;
use cudarc::driver::{CudaSlice, DevicePtr};
use dsc_compiler::fuse::kernels::{base, packs};
use dsc_compiler::graph::ir::{Op, V};
use dsc_compiler::graph::zero::Member;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// Device memory left free beside the arenas for the libraries' workspaces.
const HEADROOM: u64 = 2 << 30;

/// The training state on the device.
pub struct DeviceState {
    /// Every parameter, parameter `i` from element `at[i]` on.
    params: CudaSlice<f32>,
    at: Vec<usize>,
    /// The learned parameters' gradient sums, where `params` holds the parameters (the
    /// layout's first elements).
    grads: CudaSlice<f32>,
    /// With peers, this process's shard of the layout: the gradient summed over the
    /// processes after the reduce-scatter, its updated parameters for the all-gather.
    shard: Option<CudaSlice<f32>>,
    /// Adam's (m, v) of the shard's elements, each at its place in the shard, `moment_bytes`
    /// bytes an element.
    moments: [CudaSlice<u8>; 2],
    moment_bytes: usize,
}

/// The device address of element `element` of `slice`.
fn address(gpu: &Gpu, slice: &CudaSlice<f32>, element: usize) -> u64 {
    bytes_address(gpu, slice, 4 * element)
}

/// The device address of byte `byte` of `slice`.
fn bytes_address<T>(gpu: &Gpu, slice: &CudaSlice<T>, byte: usize) -> u64 {
    let (at, _sync) = slice.device_ptr(&gpu.stream);
    at + byte as u64
}

fn blas(what: &str, e: impl std::fmt::Debug) -> GpuError {
    GpuError::Unsupported(format!("cuBLAS {what}: {e:?}"))
}

/// `n` as cuBLAS's element count.
fn count(n: usize) -> Result<i32, GpuError> {
    i32::try_from(n).map_err(|_| GpuError::Unsupported(format!("{n} elements in one cuBLAS call")))
}

impl Executor {
    /// Makes this executor one of the data-parallel processes `peers`: its training state
    /// is then its ZeRO-1 shard of the plan's layout, the gradients are summed over the
    /// processes and the updated parameters shared by NCCL.
    pub fn join(&mut self, peers: Rc<Nccl>) {
        self.peers = Some(peers);
    }

    /// This process's part of the plan's ZeRO-1 layout.
    fn member(&self) -> Result<&Member, GpuError> {
        let (zero, processes) = (&self.plan.zero, self.peers.as_ref().map_or(1, |p| p.world().size));
        if zero.members.len() != processes {
            return Err(GpuError::Unsupported(format!(
                "the plan shards the optimizer over {} data-parallel processes, and {processes} run: recompile it with `--set parallel.data.size={processes}`",
                zero.members.len()
            )));
        }
        Ok(&zero.members[self.peers.as_ref().map_or(0, |p| p.world().rank)])
    }

    /// Copies output `o` of `call` (of function `f`) to the `bytes` at address `to`, or adds
    /// it there (`add`).
    fn take_output(
        &mut self,
        f: usize,
        o: V,
        call: &Call,
        (to, bytes): (u64, usize),
        add: bool,
    ) -> Result<(), GpuError> {
        let function = &self.plan.module.functions[f];
        let b = base(function, o);
        if let Op::Const(c) = function.node(b).op {
            return match (c, add) {
                (0.0, true) => Ok(()),
                (0.0, false) => places::zero(&self.gpu, to, bytes),
                _ => Err(GpuError::Unsupported(format!("a constant {c} as a result of {}", function.name))),
            };
        }
        let (x, given) = (call.places(&self.gpu).at(b.0), self.bytes[f][&b.0]);
        if given != bytes {
            return Err(GpuError::Unsupported(format!("{given} bytes of a result of {} for {bytes}", function.name)));
        }
        match (add, x == to) {
            (false, true) => Ok(()), // an argument returned as it was: already there
            _ => self.move_bytes(&function.name.clone(), (x, to, bytes), add),
        }
    }

    fn state_mut(&mut self) -> Result<DeviceState, GpuError> {
        self.state.take().ok_or_else(|| GpuError::Unsupported("no training state handed over".into()))
    }

    fn load_state(&self, params: &[Value<f32>], moments: &[(Value<f32>, Value<f32>)]) -> Result<DeviceState, GpuError> {
        let (zero, member, info) = (&self.plan.zero, self.member()?, &self.plan.params);
        let (at, end) = zero.placement(info);
        let mut host = vec![0.0f32; end];
        for (&at, value) in at.iter().zip(params) {
            let data = &value.as_real().data;
            host[at..at + data.len()].copy_from_slice(data);
        }
        // The moments of the learned parameter of each run, in the runs' (the model's) order.
        let slot: HashMap<usize, usize> = zero.runs.iter().enumerate().map(|(i, run)| (run.param, i)).collect();
        let mut shard = [vec![0.0f32; zero.shard], vec![0.0f32; zero.shard]];
        for piece in &member.pieces {
            let (m, v) = &moments[slot[&piece.param]];
            for (to, from) in shard.iter_mut().zip([m, v]) {
                to[piece.at..piece.at + piece.len].copy_from_slice(&from.as_real().data[piece.start..][..piece.len]);
            }
        }
        let moment_bytes = self.plan.moment_bytes();
        let [m, v] = shard.map(|moment| real_bytes(&moment, moment_bytes == 2));
        let stream = &self.gpu.stream;
        Ok(DeviceState {
            params: stream.clone_htod(&host)?,
            at,
            grads: stream.alloc_zeros(zero.len())?,
            shard: self.peers.as_ref().map(|_| stream.alloc_zeros(zero.shard)).transpose()?,
            moments: [stream.clone_htod(&m)?, stream.clone_htod(&v)?],
            moment_bytes,
        })
    }

    fn gradients_into(
        &mut self,
        state: &mut DeviceState,
        f: usize,
        rest: &[Value<f32>],
        grads: usize,
        first: bool,
    ) -> Result<Vec<Value<f32>>, GpuError> {
        let plan = self.plan.clone();
        let info = &plan.params;
        let mut inputs: Vec<Input> = state
            .at
            .iter()
            .zip(info)
            .map(|(&at, p)| Input::Device(address(&self.gpu, &state.params, at), 4 * p.numel()))
            .collect();
        let arg_types = &plan.module.functions[f].args[info.len()..];
        for (value, (_, _, dtype)) in rest.iter().zip(arg_types) {
            inputs.push(self.staged(f, inputs.len(), &encode(value, packs(*dtype))?)?);
        }
        // The parameters come first and stay as they are until the update; the gradients
        // the calls yield go straight into the sums.
        let origins = (0..inputs.len()).map(|i| (i < info.len()).then_some(i)).collect();
        let gpu = &self.gpu;
        let delivered: HashMap<u32, u64> =
            self.delivered.iter().map(|(&part, &k)| (part, address(gpu, &state.grads, state.at[k - grads]))).collect();
        let call = self.invoke_step(f, &inputs, Binding { origins, delivered, add: !first, adding: HashSet::new() })?;
        let mut before = Vec::with_capacity(grads);
        let function = &plan.module.functions[f];
        for (i, &o) in function.outputs.iter().enumerate() {
            // Outputs past the gradients are the host trainer's to ignore too, and so are the
            // gradients of what is not learned (zeros) and those already in the sums.
            match i.checked_sub(grads) {
                _ if self.delivered.get(&base(function, o).0) == Some(&i) => {}
                None => before.push(self.output(f, o, &call)?),
                Some(p) if plan.params.get(p).is_some_and(|p| p.learned) => {
                    let to = (address(&self.gpu, &state.grads, state.at[p]), 4 * plan.params[p].numel());
                    self.take_output(f, o, &call, to, !first)?
                }
                Some(_) => {}
            }
        }
        self.spare[f] = Some(call.arena);
        Ok(before)
    }

    /// The summed gradient's elements this process updates: with peers its shard (after
    /// the reduce-scatter), alone the whole layout.
    fn shard_gradient<'s>(&self, state: &'s DeviceState) -> &'s CudaSlice<f32> {
        state.shard.as_ref().unwrap_or(&state.grads)
    }

    fn reduce(&mut self, state: &mut DeviceState) -> Result<f64, GpuError> {
        if let (Some(peers), Some(shard)) = (&self.peers, &mut state.shard) {
            peers.reduce_scatter(&state.grads, shard)?;
        }
        let gradient = self.shard_gradient(state);
        let mut norm = 0.0f32;
        let x = address(&self.gpu, gradient, 0);
        // SAFETY: x holds the slice's f32s, on the handle's stream; the result is written to
        // host memory (cuBLAS's default pointer mode) before the call returns.
        unsafe { sys::cublasSnrm2_v2(*self.blas.f32.handle(), count(gradient.len())?, x as *const f32, 1, &mut norm) }
            .result()
            .map_err(|e| blas("snrm2", e))?;
        Ok(f64::from(norm) * f64::from(norm))
    }

    fn update_state(
        &mut self,
        state: &mut DeviceState,
        biases: &[(usize, Value<f32>)],
        scalars: &[Value<f32>],
    ) -> Result<(), GpuError> {
        let member = self.member()?.clone();
        let f = member.function;
        let gpu = &self.gpu;
        let g = address(gpu, self.shard_gradient(state), 0);
        // Per piece, its parameter, gradient, m and v: (address, bytes).
        let places: Vec<[(u64, usize); 4]> = member
            .pieces
            .iter()
            .map(|piece| {
                let (bytes, width) = (4 * piece.len, state.moment_bytes);
                let moment = |slice| (bytes_address(gpu, slice, width * piece.at), width * piece.len);
                [
                    (address(gpu, &state.params, state.at[piece.param] + piece.start), bytes),
                    (g + 4 * piece.at as u64, bytes),
                    moment(&state.moments[0]),
                    moment(&state.moments[1]),
                ]
            })
            .collect();
        let mut inputs: Vec<Input> = places.iter().flatten().map(|&(at, bytes)| Input::Device(at, bytes)).collect();
        for (b, load) in biases {
            let bias = address(&self.gpu, &state.params, state.at[*b]);
            inputs.push(Input::Device(bias, 4 * self.plan.params[*b].numel()));
            inputs.push(self.staged(f, inputs.len(), &encode(load, false)?)?);
        }
        for value in scalars {
            inputs.push(self.staged(f, inputs.len(), &encode(value, false)?)?);
        }
        // Where the optimizer's arena fits beside the other functions' arenas all are kept
        // from step to step; where it does not, the others go first and its own after it.
        let kept = self.spare[f].is_some() || self.gpu.free_bytes()? >= self.layouts[f].peak + HEADROOM;
        if !kept {
            self.spare.iter_mut().for_each(|arena| *arena = None);
            self.gpu.release_unused()?;
        }
        let call = self.invoke_step(f, &inputs, Binding::none(inputs.len()))?;
        // The parameters change: their FP8 copies are out of date.
        if let Some(cache) = &mut self.weights {
            cache.stale();
        }
        let outputs = self.plan.module.functions[f].outputs.clone();
        let mut results = outputs.iter().copied();
        let mut next = || results.next().ok_or_else(|| GpuError::Unsupported("too few optimizer results".into()));
        for [param, _, m, v] in &places {
            for place in [param, m, v] {
                self.take_output(f, next()?, &call, *place, false)?;
            }
        }
        for (b, _) in biases {
            let place = (address(&self.gpu, &state.params, state.at[*b]), 4 * self.plan.params[*b].numel());
            self.take_output(f, next()?, &call, place, false)?;
        }
        if kept {
            self.spare[f] = Some(call.arena);
        } else {
            drop(call);
            self.gpu.release_unused()?;
        }
        // Every process's parameters from the updated shards.
        if let (Some(peers), Some(shard)) = (&self.peers, &mut state.shard) {
            let mine = address(&self.gpu, &state.params, self.plan.zero.shard * peers.world().rank);
            places::copy(&self.gpu, mine, address(&self.gpu, shard, 0), 4 * shard.len())?;
            peers.all_gather(shard, &mut state.params.slice_mut(..self.plan.zero.len()))?;
        }
        Ok(())
    }

    fn read_state(&self, state: &DeviceState) -> Result<(Vec<Value<f32>>, Moments<f32>), GpuError> {
        let host = self.gpu.stream.clone_dtoh(&state.params)?;
        let info = &self.plan.params;
        let params = info
            .iter()
            .zip(&state.at)
            .map(|(p, &at)| Value::real(Tensor::new(p.shape.clone(), host[at..at + p.numel()].to_vec())))
            .collect();
        // The whole layout's moments: with peers gathered from every process's shard.
        let width = state.moment_bytes;
        let gathered = state
            .moments
            .iter()
            .map(|shard| {
                let bytes = match &self.peers {
                    Some(peers) => {
                        let mut whole = self.gpu.stream.alloc_zeros::<u8>(width * self.plan.zero.len())?;
                        peers.all_gather(shard, &mut whole.slice_mut(..))?;
                        self.gpu.stream.clone_dtoh(&whole)?
                    }
                    None => self.gpu.stream.clone_dtoh(shard)?,
                };
                Ok(reals(&bytes, width == 2))
            })
            .collect::<Result<Vec<Vec<f32>>, GpuError>>()?;
        let moments = self
            .plan
            .zero
            .runs
            .iter()
            .map(|run| {
                let shape = &info[run.param].shape;
                let moment =
                    |whole: &[f32]| Value::real(Tensor::new(shape.clone(), whole[run.at..][..run.len].to_vec()));
                (moment(&gathered[0]), moment(&gathered[1]))
            })
            .collect();
        Ok((params, moments))
    }
}

impl Resident<f32> for Executor {
    fn load(&mut self, params: &[Value<f32>], moments: &[(Value<f32>, Value<f32>)]) -> Result<(), String> {
        self.state = Some(self.load_state(params, moments).map_err(|e| e.to_string())?);
        self.weights = Some(WeightCache::default());
        // The graphs captured on the old state's FP8 weights would write where they were.
        if let Some(graphs) = &mut self.graphs {
            graphs.forget();
        }
        Ok(())
    }

    fn gradients(
        &mut self,
        f: usize,
        rest: Vec<Value<f32>>,
        grads: usize,
        first: bool,
    ) -> Result<Vec<Value<f32>>, String> {
        let started = std::time::Instant::now();
        let mut state = self.state_mut().map_err(|e| e.to_string())?;
        let result = self.gradients_into(&mut state, f, &rest, grads, first);
        self.state = Some(state);
        let outputs = result.and_then(|outputs| {
            self.settle_profile("gradients of a micro-batch", started)?;
            Ok(outputs)
        });
        outputs.map_err(|e| e.to_string())
    }

    fn reduce_gradients(&mut self) -> Result<f64, String> {
        let started = std::time::Instant::now();
        let mut state = self.state_mut().map_err(|e| e.to_string())?;
        let result = self.reduce(&mut state);
        self.state = Some(state);
        let square_sum = result.and_then(|sum| {
            self.settle_profile("gradient reduction", started)?;
            Ok(sum)
        });
        square_sum.map_err(|e| e.to_string())
    }

    fn update(&mut self, biases: &[(usize, Value<f32>)], scalars: Vec<Value<f32>>) -> Result<(), String> {
        let started = std::time::Instant::now();
        let mut state = self.state_mut().map_err(|e| e.to_string())?;
        let result = self.update_state(&mut state, biases, &scalars);
        self.state = Some(state);
        result.and_then(|()| self.settle_profile("optimizer update", started)).map_err(|e| e.to_string())
    }

    fn state(&mut self) -> Result<(Vec<Value<f32>>, Moments<f32>), String> {
        let state = self.state.as_ref().ok_or("no training state handed over")?;
        self.read_state(state).map_err(|e| e.to_string())
    }
}
