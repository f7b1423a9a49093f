//! A pipeline stage of the training graph: the [`StageCompute`] a rank runs for a stage it
//! holds. What goes between stages is the stage graph's carry (the hidden state and the
//! embeddings the MTP modules read). The forward runs the stage's function and keeps its
//! input; the input gradient runs the generated backward (which recomputes the forward) and
//! keeps the weight gradients it also yields until the weight-gradient chunk adds them to the
//! accumulator, so a split backward costs one backward, not two. A [`StageRunner`] runs the
//! two functions: the CPU's interpreter ([`Interpreted`]: the stage's graph, or a compiled
//! plan's stage functions), or a GPU backend (`cuda::stage`). Under expert parallelism the
//! stage holds its share of the routed experts, and its MoE layers' all-to-alls reach the
//! rest of its group through an [`Exchange`] the runner holds; the members of a group run the
//! same chunks in the same order, so their exchanges meet.

use std::collections::HashMap;
use std::sync::Arc;

use dsc_compiler::graph::{Module, ParamInfo, StageTraining};
use dsc_compiler::parallel::schedule::Micro;
use dsc_compiler::plan::Plan;

use super::pipeline::{Sharing, StageCompute, StageReport};
use super::trainer::add_loads;
use crate::comm::CommError;
use crate::cpu::{run_exchanging, Exchange, Tensor, Value};

/// A micro-batch's tokens [micro_batch, seq_len + 1] and loss mask (same shape).
pub type MicroBatch = (Tensor<i32>, Tensor<f32>);

/// What runs a stage's forward and backward functions (`StageTraining`'s, as the stage's graph
/// or as a compiled plan holds them).
pub trait StageRunner {
    /// The module holding the stage's functions, and the indices there of its forward and its
    /// backward.
    fn functions(&self) -> (&Module, usize, usize);
    fn run(&mut self, f: usize, args: Vec<Value<f32>>) -> Result<Vec<Value<f32>>, CommError>;
}

/// Makes the runner of stage `stage` (of the spec's split) on rank `rank` (its id among the
/// plan's ranks), its all-to-alls going through `exchange`; a reason where it cannot.
pub type Runners =
    Arc<dyn Fn(usize, usize, Box<dyn Exchange + Send>) -> Result<Box<dyn StageRunner>, String> + Send + Sync>;

/// The stage's functions on the CPU's interpreter.
pub struct Interpreted {
    module: Arc<Module>,
    forward: usize,
    backward: usize,
    exchange: Box<dyn Exchange + Send>,
}

impl Interpreted {
    /// Functions `forward` and `backward` of `module`.
    pub fn new(module: Arc<Module>, forward: usize, backward: usize, exchange: Box<dyn Exchange + Send>) -> Self {
        Interpreted { module, forward, backward, exchange }
    }
}

impl StageRunner for Interpreted {
    fn functions(&self) -> (&Module, usize, usize) {
        (&self.module, self.forward, self.backward)
    }

    fn run(&mut self, f: usize, args: Vec<Value<f32>>) -> Result<Vec<Value<f32>>, CommError> {
        run_exchanging(&self.module, f, args, &*self.exchange)
    }
}

/// Runners interpreting `functions` on the CPU: per stage, its module and the indices of its
/// forward and backward there.
fn interpreted(functions: Vec<(Arc<Module>, usize, usize)>) -> Runners {
    Arc::new(move |_, stage, exchange| {
        let (module, forward, backward) = &functions[stage];
        Ok(Box::new(Interpreted::new(Arc::clone(module), *forward, *backward, exchange)))
    })
}

/// The runners of `stages` on the CPU: the interpreter on each stage graph's functions.
pub fn stage_graphs(stages: &[Arc<StageTraining>]) -> Runners {
    interpreted(stages.iter().map(|s| (Arc::new(s.graph.module.clone()), s.graph.forward, s.backward)).collect())
}

/// The runners of a compiled plan's stages on the CPU: the interpreter on the plan's stage
/// functions (as the GPU runs them).
pub fn plan_stages(plan: &Plan) -> Runners {
    let module = Arc::new(plan.module.clone());
    interpreted(plan.stages.iter().map(|s| (Arc::clone(&module), s.forward, s.backward)).collect())
}

pub struct GraphStage {
    runner: Box<dyn StageRunner>,
    /// Whether the stage holds the head (its forward returns the loss).
    last: bool,
    params: Vec<Tensor<f32>>,
    /// Each parameter's sharing.
    sharing: Vec<Sharing>,
    data: Box<dyn Fn(Micro) -> MicroBatch + Send>,
    /// λ, the MTP loss weight of this step.
    mtp_weight: f32,
    /// Per micro-batch in flight: its input (none on the first stage) and data.
    saved: HashMap<Micro, (Option<Tensor<f32>>, MicroBatch)>,
    /// Weight gradients computed with an input gradient, waiting for their chunk.
    due: HashMap<Micro, Vec<Tensor<f32>>>,
    gradient: Vec<Tensor<f32>>,
    /// What the forwards so far reported.
    report: StageReport,
}

impl StageReport {
    /// Adds the outputs of one forward of the stage (`last`: the stage with the head).
    fn add(&mut self, last: bool, outputs: &[Value<f32>]) {
        let balance = f64::from(outputs[1].scalar());
        self.balance_loss += balance;
        self.loss += balance;
        let mut loads = &outputs[2..];
        if last {
            self.loss += f64::from(outputs[0].scalar());
            self.main_loss += f64::from(outputs[2].scalar());
            self.mtp_loss += f64::from(outputs[3].scalar());
            loads = &outputs[4..];
        }
        add_loads(
            &mut self.loads,
            loads.iter().map(|load| load.as_real().data.iter().map(|&l| f64::from(l)).collect()),
        );
    }
}

impl GraphStage {
    /// The stage of `training` run by `runner`, with these parameters (in its order); `data`
    /// gives each micro-batch's tokens and loss mask; `mtp_weight` is the step's λ.
    pub fn new(
        training: &StageTraining,
        runner: Box<dyn StageRunner>,
        params: Vec<Tensor<f32>>,
        data: Box<dyn Fn(Micro) -> MicroBatch + Send>,
        mtp_weight: f32,
    ) -> Self {
        let gradient = zeros_like(&params);
        let sharing = training
            .graph
            .params
            .iter()
            .map(|p| if p.is_routed_expert() { Sharing::Experts } else { Sharing::Replicated })
            .collect();
        GraphStage {
            runner,
            last: training.graph.last,
            params,
            sharing,
            data,
            mtp_weight,
            saved: HashMap::new(),
            due: HashMap::new(),
            gradient,
            report: StageReport::default(),
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

    /// The tensors of `sharing` among `tensors` (the parameters or their gradients).
    fn shared<'a, T>(&'a self, tensors: &'a [T], sharing: Sharing) -> impl Iterator<Item = &'a T> {
        tensors.iter().zip(&self.sharing).filter(move |(_, s)| **s == sharing).map(|(t, _)| t)
    }
}

/// A rank's share of a whole-model parameter: all of it, or for a routed expert stack the
/// experts of member `member` of its expert-parallel group (`held`: the stage's parameter,
/// shaped for that share).
pub fn share_of(whole: &Tensor<f32>, held: &ParamInfo, member: usize) -> Tensor<f32> {
    let (len, share) = (held.numel(), if held.is_routed_expert() { member } else { 0 });
    Tensor::new(held.shape.clone(), whole.data[share * len..(share + 1) * len].to_vec())
}

fn zeros_like(tensors: &[Tensor<f32>]) -> Vec<Tensor<f32>> {
    tensors.iter().map(|t| Tensor::filled(t.shape.clone(), 0.0)).collect()
}

impl StageCompute for GraphStage {
    fn forward(&mut self, micro: Micro, input: Option<Vec<f32>>) -> Result<Vec<f32>, CommError> {
        let (module, forward, _) = self.runner.functions();
        let function = &module.functions[forward];
        let input = input.map(|data| {
            let (_, shape, _) = &function.args[self.params.len()];
            Tensor::new(shape.clone(), data)
        });
        let batch = (self.data)(micro);
        let args = self.args(&input, &batch);
        let outputs = self.runner.run(forward, args)?;
        let output = outputs[0].as_real().data.clone();
        self.report.add(self.last, &outputs);
        self.saved.insert(micro, (input, batch));
        Ok(output)
    }

    fn backward_input(&mut self, micro: Micro, output_gradient: Option<Vec<f32>>) -> Result<Vec<f32>, CommError> {
        let (input, batch) = self.saved.remove(&micro).expect("the forward ran first");
        let (module, forward, backward) = self.runner.functions();
        let forward = &module.functions[forward];
        let out_shape = forward.node(forward.outputs[0]).shape.clone();
        // The last stage's loss seeds the backward with 1.
        let d_out = output_gradient.unwrap_or_else(|| vec![1.0]);
        let mut args = self.args(&input, &batch);
        args.push(Value::real(Tensor::new(out_shape, d_out)));
        args.push(Value::real(Tensor::scalar(1.0)));
        // The loss parts and loads only report: no gradient flows back from them.
        for &reported in &forward.outputs[2..] {
            args.push(Value::real(Tensor::filled(forward.node(reported).shape.clone(), 0.0)));
        }
        let outputs = self.runner.run(backward, args)?;
        let params = self.params.len();
        let weights = outputs[..params].iter().map(|v| v.as_real().clone()).collect();
        self.due.insert(micro, weights);
        Ok(match input {
            Some(_) => outputs[params].as_real().data.clone(),
            None => Vec::new(),
        })
    }

    fn backward_weight(&mut self, micro: Micro) {
        let weights = self.due.remove(&micro).expect("the input gradient ran first");
        for (sum, add) in self.gradient.iter_mut().zip(weights) {
            sum.data.iter_mut().zip(add.data).for_each(|(s, a)| *s += a);
        }
    }

    fn params(&self, sharing: Sharing) -> Vec<f32> {
        self.shared(&self.params, sharing).flat_map(|t| t.data.iter().copied()).collect()
    }

    fn set_params(&mut self, sharing: Sharing, flat: &[f32]) {
        let mut offset = 0;
        for (tensor, _) in self.params.iter_mut().zip(&self.sharing).filter(|(_, s)| **s == sharing) {
            let len = tensor.numel();
            tensor.data.copy_from_slice(&flat[offset..offset + len]);
            offset += len;
        }
    }

    fn take_gradient(&mut self, sharing: Sharing) -> Vec<f32> {
        let flat = self.shared(&self.gradient, sharing).flat_map(|t| t.data.iter().copied()).collect();
        for (tensor, _) in self.gradient.iter_mut().zip(&self.sharing).filter(|(_, s)| **s == sharing) {
            tensor.data.fill(0.0);
        }
        flat
    }

    fn loss(&self) -> f64 {
        self.report.loss
    }

    fn take_report(&mut self) -> StageReport {
        std::mem::take(&mut self.report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{Comm, ExpertGroup, ThreadComm};
    use crate::cpu::run;
    use crate::train::init::init_params;
    use crate::train::pipeline::{run_step, HeldStages, Place, Replicas};
    use dsc_compiler::graph::model::LOSS_OUTPUTS;
    use dsc_compiler::graph::{Numerics, TrainingGraph};
    use dsc_compiler::parallel::check::check;
    use dsc_compiler::parallel::schedule::{Direction, Schedule};
    use dsc_compiler::parallel::split;
    use dsc_lang::{PipelineSchedule, Spec};
    use std::path::Path;
    use std::time::Duration;

    /// A parameter of a stage on a rank: (stage index, member of its expert-parallel group,
    /// name, value).
    type NamedParam = (usize, usize, String, Vec<f32>);

    /// λ of the test steps.
    const MTP_WEIGHT: f32 = 0.3;
    /// Micro-batches per replica and step.
    const MICRO_BATCHES: usize = 4;

    /// The tiny model (MTP included) with `layers` layers (the first dense, the rest MoE) split
    /// into two stages; sequences of 8 tokens, micro-batches of 2.
    fn tiny_two_stages(layers: u64) -> Spec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
        let mut spec = dsc_lang::load(&path, &[]).checked_spec().cloned().expect("the tiny model checks");
        spec.model.layers = layers;
        spec.model.ffn.last_mut().expect("an MoE range").layers.end = layers;
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

    /// One step of `kind` on 2 pipeline ranks × `replicas`: each rank's loss terms, and its
    /// stages' parameters after a step whose update sets them to the summed gradient.
    fn pipelined(
        spec: &Spec,
        kind: PipelineSchedule,
        replicas: Replicas,
        initial: &HashMap<String, Tensor<f32>>,
    ) -> Vec<(f64, Vec<NamedParam>)> {
        let stages: Vec<Arc<StageTraining>> = split(spec)
            .iter()
            .map(|stage| Arc::new(StageTraining::build(spec, Numerics::Exact, &stage.parts, replicas.expert_ranks)))
            .collect();
        let schedule = Schedule::generate(kind, 2, MICRO_BATCHES).expect("a valid size");
        check(&schedule).expect("checks");
        let comm: Arc<dyn Comm> = Arc::new(ThreadComm::new(Duration::from_secs(60)));
        let per_direction = schedule.micro_batches_per_direction();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..replicas.count)
                .flat_map(|replica| (0..2).map(move |pipeline_rank| Place { pipeline_rank, replica }))
                .map(|place| {
                    let (schedule, comm, stages) = (&schedule, &comm, &stages);
                    let member = place.replica % replicas.expert_ranks;
                    scope.spawn(move || {
                        let held = schedule.held(place.pipeline_rank).map(|(direction, stage)| {
                            let training = Arc::clone(&stages[stage]);
                            let params =
                                training.graph.params.iter().map(|p| share_of(&initial[&p.name], p, member)).collect();
                            let spec = spec.clone();
                            let data = move |micro: Micro| {
                                let offset = if micro.direction == Direction::Up { per_direction } else { 0 };
                                micro_batch(&spec, place.replica * MICRO_BATCHES + offset + micro.index)
                            };
                            let group = place.expert_group(schedule, replicas);
                            let me = place.id(schedule);
                            let exchange =
                                ExpertGroup::new(Arc::clone(comm), group, me, format!("stage {stage} experts"));
                            let module = Arc::new(training.graph.module.clone());
                            let (forward, backward) = (training.graph.forward, training.backward);
                            let runner = Box::new(Interpreted::new(module, forward, backward, Box::new(exchange)));
                            let stage: Box<dyn StageCompute> =
                                Box::new(GraphStage::new(&training, runner, params, Box::new(data), MTP_WEIGHT));
                            (direction, stage)
                        });
                        let mut held = HeldStages { stages: held.collect() };
                        let to_gradient = |_: Sharing, params: &mut [f32], gradient: &[f32], _: f64| {
                            params.copy_from_slice(gradient);
                        };
                        run_step(schedule, comm.as_ref(), place, replicas, &mut held, to_gradient)
                            .expect("no rank times out");
                        let mut out = Vec::new();
                        let mut loss = 0.0;
                        for (direction, stage) in &mut held.stages {
                            loss += stage.take_report().loss;
                            let index = direction.rank_of(place.pipeline_rank, schedule.ranks);
                            let mut flat = Sharing::ALL.map(|sharing| stage.params(sharing).into_iter());
                            for p in &stages[index].graph.params {
                                let sharing = if p.is_routed_expert() { 1 } else { 0 };
                                let value = flat[sharing].by_ref().take(p.numel()).collect();
                                out.push((index, member, p.name.clone(), value));
                            }
                        }
                        (loss, out)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("the rank ran")).collect()
        })
    }

    /// Every schedule on 2 pipeline ranks × `replicas` computes the loss and gradients of one
    /// rank running all the replicas' micro-batches.
    fn pipelined_equals_one_rank(layers: u64, replicas: Replicas) {
        let spec = tiny_two_stages(layers);
        let whole = TrainingGraph::build(&spec, Numerics::Exact);
        let all = init_params::<f32>(&whole.forward.params, spec.model.init_std, 7);
        let initial: HashMap<String, Tensor<f32>> =
            whole.forward.params.iter().map(|p| p.name.clone()).zip(all.iter().cloned()).collect();
        let (expected_loss, expected) = single_rank(&spec, &all, MICRO_BATCHES * replicas.count);
        for kind in [PipelineSchedule::OneFOneB, PipelineSchedule::Zb1p, PipelineSchedule::Dualpipe] {
            let ranks = pipelined(&spec, kind, replicas, &initial);
            let loss: f64 = ranks.iter().map(|(loss, _)| loss).sum();
            assert!(
                (loss - expected_loss).abs() <= 1e-5 * expected_loss.abs(),
                "{kind:?}: loss {loss} vs {expected_loss}"
            );
            let results: Vec<_> = ranks.into_iter().flat_map(|(_, params)| params).collect();
            let copies = if kind == PipelineSchedule::Dualpipe { 2 } else { 1 };
            assert_eq!(results.len(), whole.forward.params.len() * replicas.count * copies, "{kind:?}");
            let shares = results.iter().filter(|(_, _, name, got)| got.len() < expected[name].len()).count();
            // 3 stacks per MoE block (layers 1.. and the MTP block), on every replica (twice with
            // DualPipe).
            let moe_blocks = layers as usize;
            let split = if replicas.expert_ranks > 1 { 3 * moe_blocks * replicas.count * copies } else { 0 };
            assert_eq!(shares, split, "{kind:?}: the routed experts are split over the expert-parallel ranks");
            for (stage, member, name, got) in results {
                let whole = &expected[&name];
                // A routed expert stack holds its member's share of the experts.
                let share = if got.len() < whole.len() { member } else { 0 };
                let want = &whole[share * got.len()..][..got.len()];
                let norm = want.iter().map(|x| x * x).sum::<f32>().sqrt();
                let diff = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
                assert!(diff <= 1e-4 * norm + 1e-7, "{kind:?}: stage {stage} {name}: off by {diff} of {norm}");
            }
        }
    }

    #[test]
    fn pipelined_losses_and_gradients_equal_one_ranks() {
        pipelined_equals_one_rank(3, Replicas { count: 2, expert_ranks: 1 });
    }

    /// The check: 8 thread-ranks, PP 2 × EP 2 × 2 replicas of each expert, on a model
    /// with 3 MoE layers of 8 routed experts (and the MTP block's).
    #[test]
    fn expert_parallel_losses_and_gradients_equal_one_ranks() {
        pipelined_equals_one_rank(4, Replicas { count: 4, expert_ranks: 2 });
    }
}
