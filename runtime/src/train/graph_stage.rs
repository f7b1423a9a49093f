//! A pipeline stage of the training graph on the CPU backend: the [`StageCompute`] a
//! thread-rank runs for a stage it holds. What goes between stages is the stage graph's carry
//! (the hidden state and the embeddings the MTP modules read). The forward runs the stage's
//! function and keeps its input; the input gradient runs the generated backward (which
//! recomputes the forward) and
//! keeps the weight gradients it also yields until the weight-gradient chunk adds them to the
//! accumulator, so a split backward costs one backward on the CPU, not two.

use std::collections::HashMap;
use std::sync::Arc;

use dsc_compiler::graph::StageTraining;
use dsc_compiler::parallel::schedule::Micro;

use super::pipeline::StageCompute;
use crate::cpu::{run, Tensor, Value};

/// A micro-batch's tokens [micro_batch, seq_len + 1] and loss mask (same shape).
pub type MicroBatch = (Tensor<i32>, Tensor<f32>);

pub struct GraphStage {
    training: Arc<StageTraining>,
    params: Vec<Tensor<f32>>,
    data: Box<dyn Fn(Micro) -> MicroBatch + Send>,
    /// λ, the MTP loss weight of this step.
    mtp_weight: f32,
    /// Per micro-batch in flight: its input (none on the first stage) and data.
    saved: HashMap<Micro, (Option<Tensor<f32>>, MicroBatch)>,
    /// Weight gradients computed with an input gradient, waiting for their chunk.
    due: HashMap<Micro, Vec<Tensor<f32>>>,
    gradient: Vec<Tensor<f32>>,
    /// The loss terms of the forwards so far: the last stage's loss, every stage's balance loss.
    loss: f64,
}

impl GraphStage {
    /// The stage of `training` with these parameters (in its order); `data` gives each
    /// micro-batch's tokens and loss mask; `mtp_weight` is the step's λ.
    pub fn new(
        training: Arc<StageTraining>,
        params: Vec<Tensor<f32>>,
        data: Box<dyn Fn(Micro) -> MicroBatch + Send>,
        mtp_weight: f32,
    ) -> Self {
        let gradient = zeros_like(&params);
        GraphStage {
            training,
            params,
            data,
            mtp_weight,
            saved: HashMap::new(),
            due: HashMap::new(),
            gradient,
            loss: 0.0,
        }
    }

    /// The function arguments: parameters, the input carry if any, tokens, loss mask, λ.
    fn args(&self, input: &Option<Tensor<f32>>, (tokens, mask): &MicroBatch) -> Vec<Value<f32>> {
        let mut args: Vec<Value<f32>> = self.params.iter().cloned().map(Value::real).collect();
        args.extend(input.iter().cloned().map(Value::real));
        args.push(Value::int(tokens.clone()));
        args.push(Value::real(mask.clone()));
        args.push(Value::real(Tensor::scalar(self.mtp_weight)));
        args
    }
}

fn zeros_like(tensors: &[Tensor<f32>]) -> Vec<Tensor<f32>> {
    tensors.iter().map(|t| Tensor::filled(t.shape.clone(), 0.0)).collect()
}

impl StageCompute for GraphStage {
    fn forward(&mut self, micro: Micro, input: Option<Vec<f32>>) -> Vec<f32> {
        let graph = &self.training.graph;
        let function = &graph.module.functions[graph.forward];
        let input = input.map(|data| {
            let (_, shape, _) = &function.args[self.params.len()];
            Tensor::new(shape.clone(), data)
        });
        let batch = (self.data)(micro);
        let outputs = run(&graph.module, graph.forward, self.args(&input, &batch));
        let output = outputs[0].as_real().data.clone();
        if graph.last {
            self.loss += f64::from(output[0]);
        }
        self.loss += f64::from(outputs[1].scalar());
        self.saved.insert(micro, (input, batch));
        output
    }

    fn backward_input(&mut self, micro: Micro, output_gradient: Option<Vec<f32>>) -> Vec<f32> {
        let (input, batch) = self.saved.remove(&micro).expect("the forward ran first");
        let training = &self.training;
        let module = &training.graph.module;
        let forward = &module.functions[training.graph.forward];
        let out_shape = forward.node(forward.outputs[0]).shape.clone();
        // The last stage's loss seeds the backward with 1.
        let d_out = output_gradient.unwrap_or_else(|| vec![1.0]);
        let mut args = self.args(&input, &batch);
        args.push(Value::real(Tensor::new(out_shape, d_out)));
        args.push(Value::real(Tensor::scalar(1.0)));
        let outputs = run(module, training.backward, args);
        let params = self.params.len();
        let weights = outputs[..params].iter().map(|v| v.as_real().clone()).collect();
        self.due.insert(micro, weights);
        match input {
            Some(_) => outputs[params].as_real().data.clone(),
            None => Vec::new(),
        }
    }

    fn backward_weight(&mut self, micro: Micro) {
        let weights = self.due.remove(&micro).expect("the input gradient ran first");
        for (sum, add) in self.gradient.iter_mut().zip(weights) {
            sum.data.iter_mut().zip(add.data).for_each(|(s, a)| *s += a);
        }
    }

    fn params(&self) -> Vec<f32> {
        self.params.iter().flat_map(|t| t.data.iter().copied()).collect()
    }

    fn set_params(&mut self, flat: &[f32]) {
        let mut offset = 0;
        for tensor in &mut self.params {
            let len = tensor.numel();
            tensor.data.copy_from_slice(&flat[offset..offset + len]);
            offset += len;
        }
    }

    fn take_gradient(&mut self) -> Vec<f32> {
        let zeros = zeros_like(&self.gradient);
        std::mem::replace(&mut self.gradient, zeros).into_iter().flat_map(|t| t.data).collect()
    }

    fn take_loss(&mut self) -> f64 {
        std::mem::take(&mut self.loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::ThreadComm;
    use crate::train::init::init_params;
    use crate::train::pipeline::{run_step, HeldStages, Place};
    use dsc_compiler::graph::model::LOSS_OUTPUTS;
    use dsc_compiler::graph::{Numerics, TrainingGraph};
    use dsc_compiler::parallel::check::check;
    use dsc_compiler::parallel::schedule::{Direction, Schedule};
    use dsc_compiler::parallel::split;
    use dsc_lang::{PipelineSchedule, Spec};
    use std::path::Path;
    use std::time::Duration;

    /// A parameter of a stage: (stage index, name, value).
    type NamedParam = (usize, String, Vec<f32>);

    /// λ of the test steps.
    const MTP_WEIGHT: f32 = 0.3;

    /// The tiny model (MTP included) split into two stages; sequences of 8 tokens, micro-batches
    /// of 2.
    fn tiny_two_stages() -> Spec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
        let mut spec = dsc_lang::load(&path, &[]).checked_spec().cloned().expect("the tiny model checks");
        spec.train.seq_len = 8;
        spec.train.micro_batch = 2;
        spec.parallel.pipeline.stages = 2;
        spec
    }

    /// Micro-batch `global`'s tokens and loss mask.
    fn micro_batch(spec: &Spec, global: usize) -> MicroBatch {
        let depth = spec.model.mtp.as_ref().map_or(0, |mtp| mtp.depth as usize);
        let (rows, width) = (spec.train.micro_batch as usize, spec.train.seq_len as usize + depth + 1);
        let vocab = spec.model.vocab as usize;
        let tokens = (0..rows * width).map(|i| ((global * 31 + i * 7 + i * i) % vocab) as i32).collect();
        (Tensor::new(vec![rows, width], tokens), Tensor::filled(vec![rows, width], 1.0))
    }

    /// The whole model's loss and gradient (by parameter name) summed over `micro_batches`, on
    /// one rank.
    fn single_rank(spec: &Spec, params: &[Tensor<f32>], micro_batches: usize) -> (f64, HashMap<String, Vec<f32>>) {
        let graph = TrainingGraph::build(spec, Numerics::Exact);
        let info = &graph.forward.params;
        let mut sums: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.numel()]).collect();
        let mut loss = 0.0;
        for global in 0..micro_batches {
            let (tokens, mask) = micro_batch(spec, global);
            let mut args: Vec<Value<f32>> = params.iter().cloned().map(Value::real).collect();
            args.extend([Value::int(tokens), Value::real(mask), Value::real(Tensor::scalar(MTP_WEIGHT))]);
            let outputs = run(graph.module(), graph.grad, args);
            loss += f64::from(outputs[0].scalar());
            let first = LOSS_OUTPUTS + graph.forward.moe_biases.len();
            for (sum, gradient) in sums.iter_mut().zip(&outputs[first..first + info.len()]) {
                sum.iter_mut().zip(&gradient.as_real().data).for_each(|(s, g)| *s += g);
            }
        }
        (loss, info.iter().map(|p| p.name.clone()).zip(sums).collect())
    }

    #[test]
    fn pipelined_losses_and_gradients_equal_one_ranks() {
        let spec = tiny_two_stages();
        let whole = TrainingGraph::build(&spec, Numerics::Exact);
        let initial: HashMap<String, Tensor<f32>> = whole
            .forward
            .params
            .iter()
            .map(|p| p.name.clone())
            .zip(init_params::<f32>(&whole.forward.params, spec.model.init_std, 7))
            .collect();
        let stages: Vec<Arc<StageTraining>> = split(&spec)
            .iter()
            .map(|stage| Arc::new(StageTraining::build(&spec, Numerics::Exact, &stage.parts)))
            .collect();
        let replicas = 2;
        for kind in [PipelineSchedule::OneFOneB, PipelineSchedule::Zb1p, PipelineSchedule::Dualpipe] {
            let micro_batches = 4;
            let all: Vec<Tensor<f32>> = whole.forward.params.iter().map(|p| initial[&p.name].clone()).collect();
            let (expected_loss, expected) = single_rank(&spec, &all, micro_batches * replicas);
            let schedule = Schedule::generate(kind, 2, micro_batches).expect("a valid size");
            check(&schedule).expect("checks");
            let comm = ThreadComm::new(Duration::from_secs(60));
            let per_direction = schedule.micro_batches_per_direction();
            // Each rank's loss terms, and its stages after the step, whose update sets the
            // parameters to the summed gradient: (stage index, parameter name, value).
            let ranks: Vec<(f64, Vec<NamedParam>)> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..replicas)
                    .flat_map(|replica| (0..2).map(move |pipeline_rank| Place { pipeline_rank, replica }))
                    .map(|place| {
                        let (schedule, comm, spec, stages, initial) = (&schedule, &comm, &spec, &stages, &initial);
                        scope.spawn(move || {
                            let held = schedule.held(place.pipeline_rank).map(|(direction, stage)| {
                                let training = Arc::clone(&stages[stage]);
                                let params = training.graph.params.iter().map(|p| initial[&p.name].clone()).collect();
                                let spec = spec.clone();
                                let data = move |micro: Micro| {
                                    let offset = if micro.direction == Direction::Up { per_direction } else { 0 };
                                    micro_batch(&spec, place.replica * micro_batches + offset + micro.index)
                                };
                                let stage: Box<dyn StageCompute> =
                                    Box::new(GraphStage::new(training, params, Box::new(data), MTP_WEIGHT));
                                (direction, stage)
                            });
                            let mut held = HeldStages { stages: held.collect() };
                            let to_gradient = |params: &mut [f32], gradient: &[f32]| params.copy_from_slice(gradient);
                            run_step(schedule, comm, place, replicas, &mut held, to_gradient)
                                .expect("no rank times out");
                            let ranks = schedule.ranks;
                            let mut out = Vec::new();
                            let mut loss = 0.0;
                            for (direction, stage) in &mut held.stages {
                                loss += stage.take_loss();
                                let index = direction.rank_of(place.pipeline_rank, ranks);
                                let flat = stage.params();
                                let mut offset = 0;
                                for p in &stages[index].graph.params {
                                    out.push((index, p.name.clone(), flat[offset..offset + p.numel()].to_vec()));
                                    offset += p.numel();
                                }
                            }
                            (loss, out)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("the rank ran")).collect()
            });
            let loss: f64 = ranks.iter().map(|(loss, _)| loss).sum();
            assert!(
                (loss - expected_loss).abs() <= 1e-5 * expected_loss.abs(),
                "{kind:?}: loss {loss} vs {expected_loss}"
            );
            let results: Vec<_> = ranks.into_iter().flat_map(|(_, params)| params).collect();
            let copies = if kind == PipelineSchedule::Dualpipe { 2 } else { 1 };
            let names: usize = stages.iter().map(|s| s.graph.params.len()).sum();
            assert_eq!(results.len(), names * replicas * copies, "{kind:?}");
            assert_eq!(names, whole.forward.params.len(), "the stages hold every parameter once");
            for (stage, name, got) in results {
                let want = &expected[&name];
                let norm = want.iter().map(|x| x * x).sum::<f32>().sqrt();
                let diff = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
                assert!(diff <= 1e-4 * norm + 1e-7, "{kind:?}: stage {stage} {name}: off by {diff} of {norm}");
            }
        }
    }
}
