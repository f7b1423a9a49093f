//! The training state on the GPU: [`Resident`] for the [`Executor`]. Every parameter, its
//! gradient sum over the step's micro-batches and the Adam moments live in device buffers of
//! their own, so that a step moves only its micro-batches, losses, loads and a few scalars
//! (with the state on the host, a step of the bench model moved and converted tens of GB).
//! The gradient function reads the parameters in place; its gradients are added into the
//! sums with cuBLAS (the first micro-batch's copied, the next ones `saxpy`), scaled by
//! 1/micro-batches before the update (`sscal`: the host trainer also sums, then scales); the
//! finiteness check sums `snrm2`s; the optimizer function reads the state in place too and
//! its results are copied back. Where the device cannot hold the optimizer's arena beside the
//! other functions' arenas, it is freed after the update and the others before it, so that
//! the step peaks at the state plus the largest phase.

use super::exec::{encode, words, Call, Executor, Input};
use super::places;
use super::{Gpu, GpuError};
use crate::cpu::{Tensor, Value};
use crate::train::backend::Moments;
use crate::train::Resident;
use cudarc::cublas::sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use dsc_compiler::fuse::kernels::base;
use dsc_compiler::graph::ir::{Op, V};

/// A real tensor on the device: its shape and its f32 elements.
pub struct Buffer {
    shape: Vec<usize>,
    data: CudaSlice<u8>,
}

impl Buffer {
    fn input(&self, gpu: &Gpu) -> Input {
        let (at, _sync) = self.data.device_ptr(&gpu.stream);
        Input::Device(at, self.data.len())
    }

    fn elements(&self) -> usize {
        self.data.len() / 4
    }
}

/// Device memory left free beside the arenas for the libraries' workspaces.
const HEADROOM: u64 = 2 << 30;

/// The parameters (the graph's order), their gradient sums, and the moments (m, v) of the
/// learned parameters in order.
pub struct DeviceState {
    params: Vec<Buffer>,
    grads: Vec<Buffer>,
    moments: Vec<(Buffer, Buffer)>,
}

impl Executor {
    fn upload(&self, value: &Value<f32>) -> Result<Buffer, GpuError> {
        let t = value.as_real();
        Ok(Buffer { shape: t.shape.clone(), data: self.gpu.stream.clone_htod(&words(&t.data, f32::to_le_bytes))? })
    }

    fn download(&self, buffer: &Buffer) -> Result<Value<f32>, GpuError> {
        let bytes = self.gpu.stream.clone_dtoh(&buffer.data)?;
        let data = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        Ok(Value::real(Tensor::new(buffer.shape.clone(), data)))
    }

    /// Copies output `o` of `call` (of function `f`) into `to`, or adds it there (`add`).
    fn take_output(&self, f: usize, o: V, call: &Call, to: &mut Buffer, add: bool) -> Result<(), GpuError> {
        let function = &self.plan.module.functions[f];
        let b = base(function, o);
        if let Op::Const(c) = function.node(b).op {
            return match (c, add) {
                (0.0, true) => Ok(()),
                (0.0, false) => Ok(self.gpu.stream.memset_zeros(&mut to.data)?),
                _ => Err(GpuError::Unsupported(format!("a constant {c} as a result of {}", function.name))),
            };
        }
        let (x, bytes) = (call.places(&self.gpu).at(b.0), self.bytes[f][&b.0]);
        if bytes != to.data.len() {
            return Err(GpuError::Unsupported(format!("{bytes} bytes of a result for {}", to.data.len())));
        }
        let n = to.elements() as i32;
        let (y, _y) = to.data.device_ptr_mut(&self.gpu.stream);
        match (add, x == y) {
            (false, true) => return Ok(()), // an argument returned as it was: already there
            (false, false) => return places::copy(&self.gpu, x, y, bytes),
            (true, _) => {}
        }
        let one = 1.0f32;
        // SAFETY: x and y hold n f32s each (their lengths checked above), on the handle's stream.
        unsafe { sys::cublasSaxpy_v2(*self.blas.f32.handle(), n, &one, x as *const f32, 1, y as *mut f32, 1) }
            .result()
            .map_err(|e| GpuError::Unsupported(format!("cuBLAS saxpy: {e:?}")))
    }

    fn state_mut(&mut self) -> Result<DeviceState, GpuError> {
        self.state.take().ok_or_else(|| GpuError::Unsupported("no training state handed over".into()))
    }

    fn gradients_into(
        &mut self,
        state: &mut DeviceState,
        f: usize,
        rest: &[Value<f32>],
        grads: usize,
        first: bool,
    ) -> Result<Vec<Value<f32>>, GpuError> {
        let mut inputs: Vec<Input> = state.params.iter().map(|p| p.input(&self.gpu)).collect();
        for value in rest {
            inputs.push(Input::Host(encode(value)?));
        }
        let call = self.invoke(f, &inputs)?;
        let outputs = self.plan.module.functions[f].outputs.clone();
        let mut before = Vec::with_capacity(grads);
        for (i, &o) in outputs.iter().enumerate() {
            // Outputs past the gradients are the host trainer's to ignore too.
            match i.checked_sub(grads) {
                None => before.push(self.output(f, o, &call)?),
                Some(p) if p < state.grads.len() => self.take_output(f, o, &call, &mut state.grads[p], !first)?,
                Some(_) => {}
            }
        }
        self.spare[f] = Some(call.arena);
        Ok(before)
    }

    fn update_state(
        &mut self,
        state: &mut DeviceState,
        f: usize,
        learned: &[usize],
        biases: &[(usize, Value<f32>)],
        scalars: &[Value<f32>],
        scale: f64,
    ) -> Result<(), GpuError> {
        let handle = *self.blas.f32.handle();
        let scale = scale as f32;
        for &i in learned {
            let n = state.grads[i].elements() as i32;
            let (x, _x) = state.grads[i].data.device_ptr_mut(&self.gpu.stream);
            // SAFETY: x holds n f32s, on the handle's stream.
            unsafe { sys::cublasSscal_v2(handle, n, &scale, x as *mut f32, 1) }
                .result()
                .map_err(|e| GpuError::Unsupported(format!("cuBLAS sscal: {e:?}")))?;
        }
        let mut inputs = Vec::new();
        for (k, &i) in learned.iter().enumerate() {
            let (m, v) = &state.moments[k];
            let gpu = &self.gpu;
            inputs.extend([state.params[i].input(gpu), state.grads[i].input(gpu), m.input(gpu), v.input(gpu)]);
        }
        for (b, load) in biases {
            inputs.extend([state.params[*b].input(&self.gpu), Input::Host(encode(load)?)]);
        }
        for value in scalars {
            inputs.push(Input::Host(encode(value)?));
        }
        // Where the optimizer's arena fits beside the other functions' arenas all are kept
        // from step to step; where it does not, the others go first and its own after it.
        let kept = self.spare[f].is_some() || self.gpu.free_bytes()? >= self.layouts[f].peak + HEADROOM;
        if !kept {
            self.spare.iter_mut().for_each(|arena| *arena = None);
            self.gpu.release_unused()?;
        }
        let call = self.invoke(f, &inputs)?;
        let outputs = self.plan.module.functions[f].outputs.clone();
        let mut results = outputs.iter().copied();
        let mut next = || results.next().ok_or_else(|| GpuError::Unsupported("too few optimizer results".into()));
        for (k, &i) in learned.iter().enumerate() {
            let (p, m, v) = (next()?, next()?, next()?);
            self.take_output(f, p, &call, &mut state.params[i], false)?;
            let (mb, vb) = &mut state.moments[k];
            self.take_output(f, m, &call, mb, false)?;
            self.take_output(f, v, &call, vb, false)?;
        }
        for (b, _) in biases {
            let o = next()?;
            self.take_output(f, o, &call, &mut state.params[*b], false)?;
        }
        if kept {
            self.spare[f] = Some(call.arena);
        } else {
            drop(call);
            self.gpu.release_unused()?;
        }
        Ok(())
    }
}

impl Resident<f32> for Executor {
    fn load(&mut self, params: &[Value<f32>], moments: &[(Value<f32>, Value<f32>)]) -> Result<(), String> {
        let state = (|| -> Result<DeviceState, GpuError> {
            let params = params.iter().map(|p| self.upload(p)).collect::<Result<Vec<_>, _>>()?;
            let grads = params
                .iter()
                .map(|p| Ok(Buffer { shape: p.shape.clone(), data: self.gpu.stream.alloc_zeros(p.data.len())? }))
                .collect::<Result<Vec<_>, GpuError>>()?;
            let moments = moments
                .iter()
                .map(|(m, v)| Ok((self.upload(m)?, self.upload(v)?)))
                .collect::<Result<Vec<_>, GpuError>>()?;
            Ok(DeviceState { params, grads, moments })
        })()
        .map_err(|e| e.to_string())?;
        self.state = Some(state);
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

    fn gradients_square_sum(&mut self) -> Result<f64, String> {
        let state = self.state.as_ref().ok_or("no training state handed over")?;
        let mut sum = 0.0;
        for g in &state.grads {
            let mut norm = 0.0f32;
            let (x, _x) = g.data.device_ptr(&self.gpu.stream);
            // SAFETY: x holds the buffer's f32s, on the handle's stream; the result is written
            // to host memory (cuBLAS's default pointer mode) before the call returns.
            unsafe { sys::cublasSnrm2_v2(*self.blas.f32.handle(), g.elements() as i32, x as *const f32, 1, &mut norm) }
                .result()
                .map_err(|e| format!("cuBLAS snrm2: {e:?}"))?;
            sum += f64::from(norm) * f64::from(norm);
        }
        Ok(sum)
    }

    fn update(
        &mut self,
        f: usize,
        learned: &[usize],
        biases: &[(usize, Value<f32>)],
        scalars: Vec<Value<f32>>,
        scale: f64,
    ) -> Result<(), String> {
        let started = std::time::Instant::now();
        let mut state = self.state_mut().map_err(|e| e.to_string())?;
        let result = self.update_state(&mut state, f, learned, biases, &scalars, scale);
        self.state = Some(state);
        result.and_then(|()| self.settle_profile("optimizer update", started)).map_err(|e| e.to_string())
    }

    fn state(&mut self) -> Result<(Vec<Value<f32>>, Moments<f32>), String> {
        let state = self.state.as_ref().ok_or("no training state handed over")?;
        let read = || -> Result<_, GpuError> {
            let params = state.params.iter().map(|p| self.download(p)).collect::<Result<Vec<_>, _>>()?;
            let moments = state
                .moments
                .iter()
                .map(|(m, v)| Ok((self.download(m)?, self.download(v)?)))
                .collect::<Result<Vec<_>, GpuError>>()?;
            Ok((params, moments))
        };
        read().map_err(|e| e.to_string())
    }
}
