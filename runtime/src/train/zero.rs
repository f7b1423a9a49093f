//! ZeRO-1's sharded optimizer state on the CPU backend's ranks. A rank's copy of one
//! sharing's parameters is a flat vector of runs of whole-model parameters (or, for the routed
//! experts, its share of them), without gaps; the reduce-scatter hands it one contiguous shard
//! of its gradient. [`ShardOptimizer`] keeps AdamW's moments for the learned elements of that
//! shard only and updates them with the training graph's own optimizer function, built over
//! the shard's pieces of parameters ([`shard_optimizer`]), so that clipping, bias correction,
//! weight decay, LR multipliers and the policy's moment type are the one-rank trainer's. The
//! routing biases are not learned: [`BiasUpdate`] moves them from the step's summed loads, on
//! the trainer. The moments come from the whole model's order and go back to it for a
//! checkpoint ([`ShardOptimizer::new`], [`ShardOptimizer::gather_into`]).

use std::ops::Range;

use dsc_compiler::graph::ir::Module;
use dsc_compiler::graph::zero::{pieces, shard_optimizer, Run};
use dsc_compiler::graph::{Numerics, ParamInfo};
use dsc_lang::Spec;

use super::pipeline::Sharing;
use crate::cpu::{self, Real, Tensor, Value};

/// AdamW's two moments of every learned parameter of the whole model, in its order, flat.
pub type WholeMoments = Vec<[Vec<f32>; 2]>;

/// One sharing's shard on a rank: the optimizer function over its learned pieces, and their
/// moments.
struct Shard {
    function: usize,
    pieces: Vec<Run>,
    moments: Vec<[Vec<f32>; 2]>,
}

/// A rank's optimizer: one shard per sharing.
pub struct ShardOptimizer {
    module: Module,
    shards: Vec<Shard>,
}

impl ShardOptimizer {
    /// The optimizer of the shards `shards[sharing]` of the copies laid out by
    /// `runs[sharing]`, for `spec`'s model whose parameters are `params` (the whole model's),
    /// computing with `numerics`; the moments are taken from `moments`.
    pub fn new(
        spec: &Spec,
        numerics: Numerics,
        params: &[ParamInfo],
        runs: &[Vec<Run>; 2],
        shards: [Range<usize>; 2],
        moments: &WholeMoments,
    ) -> Self {
        let slots = learned_slots(params);
        let mut module = Module::default();
        let shards = runs
            .iter()
            .zip(shards)
            .map(|(runs, shard)| {
                let pieces = pieces(runs, params, shard);
                let function = module.add(shard_optimizer(&module, spec, params, &pieces, &[], numerics));
                let moments = pieces
                    .iter()
                    .map(|piece| {
                        let Run { param, start, len, .. } = *piece;
                        moments[slots[param].expect("a piece is learned")]
                            .clone()
                            .map(|m| m[start..start + len].to_vec())
                    })
                    .collect();
                Shard { function, pieces, moments }
            })
            .collect();
        ShardOptimizer { module, shards }
    }

    /// Updates `params`, this rank's shard of one sharing's parameters, from `gradient`, the
    /// shard of their gradient summed over the step's micro-batches; `scalars` are the
    /// optimizer function's (the LR, bias corrections, bias speed, the whole model's gradient
    /// norm and the factor from the sum to the mean).
    pub fn update(&mut self, sharing: Sharing, params: &mut [f32], gradient: &[f32], scalars: &[Value<f32>]) {
        let shard = &mut self.shards[sharing as usize];
        if shard.pieces.is_empty() {
            return;
        }
        let mut args = Vec::with_capacity(4 * shard.pieces.len() + scalars.len());
        // The moments go in and their successors come back.
        for (piece, [m, v]) in shard.pieces.iter().zip(&mut shard.moments) {
            let range = piece.at..piece.at + piece.len;
            let flat = |data: Vec<f32>| Value::real(Tensor::new(vec![data.len()], data));
            args.push(flat(params[range.clone()].to_vec()));
            args.push(flat(gradient[range].to_vec()));
            args.extend([flat(std::mem::take(m)), flat(std::mem::take(v))]);
        }
        args.extend(scalars.iter().cloned());
        let mut out = cpu::run(&self.module, shard.function, args).into_iter();
        for (piece, moments) in shard.pieces.iter().zip(&mut shard.moments) {
            let mut next = || out.next().expect("p', m' and v' per piece").as_real().data.clone();
            params[piece.at..piece.at + piece.len].copy_from_slice(&next());
            *moments = [next(), next()];
        }
    }

    /// How many elements' moments the rank keeps.
    pub fn held(&self) -> usize {
        self.shards.iter().flat_map(|shard| &shard.pieces).map(|piece| piece.len).sum()
    }

    /// Writes this rank's moments into `whole` (the whole model's, in its order).
    pub fn gather_into(&self, params: &[ParamInfo], whole: &mut WholeMoments) {
        let slots = learned_slots(params);
        for shard in &self.shards {
            for (piece, moments) in shard.pieces.iter().zip(&shard.moments) {
                let Run { param, start, len, .. } = *piece;
                let slot = &mut whole[slots[param].expect("a piece is learned")];
                for (to, from) in slot.iter_mut().zip(moments) {
                    to[start..start + len].copy_from_slice(from);
                }
            }
        }
    }
}

/// Each parameter's index among the learned ones (the moments' order), if learned.
fn learned_slots(params: &[ParamInfo]) -> Vec<Option<usize>> {
    let mut next = 0;
    params
        .iter()
        .map(|p| {
            p.learned.then(|| {
                next += 1;
                next - 1
            })
        })
        .collect()
}

/// The routing biases' update, `b += γ·sign(mean load − load)`: the optimizer function over
/// the biases alone.
pub struct BiasUpdate {
    module: Module,
    function: usize,
    /// The biases' indices in the whole model's parameters.
    biases: Vec<usize>,
}

impl BiasUpdate {
    /// For the biases `biases` (indices into `params`, the whole model's).
    pub fn new(spec: &Spec, numerics: Numerics, params: &[ParamInfo], biases: &[usize]) -> Self {
        let mut module = Module::default();
        let function = module.add(shard_optimizer(&module, spec, params, &[], biases, numerics));
        BiasUpdate { module, function, biases: biases.to_vec() }
    }

    /// Moves the biases among `params` from `loads` (tokens per expert, per bias); `scalars`
    /// as [`ShardOptimizer::update`]'s.
    pub fn apply<T: Real>(&self, params: &mut [Value<T>], loads: &[Vec<f64>], scalars: Vec<Value<T>>) {
        let mut args = Vec::with_capacity(2 * self.biases.len() + scalars.len());
        for (&b, load) in self.biases.iter().zip(loads) {
            let shape = params[b].as_real().shape.clone();
            args.push(params[b].clone());
            args.push(Value::real(Tensor::new(shape, load.iter().map(|&x| T::from_f64(x)).collect())));
        }
        args.extend(scalars);
        for (&b, bias) in self.biases.iter().zip(cpu::run(&self.module, self.function, args)) {
            params[b] = bias;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use dsc_compiler::graph::TrainingGraph;
    use std::path::Path;

    /// The tiny model on `processes` data-parallel processes (no pipeline or expert
    /// parallelism).
    fn tiny_on_processes(processes: u64) -> Spec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
        let mut spec = dsc_lang::load(&path, &[]).checked_spec().cloned().expect("the tiny model checks");
        let par = &mut spec.parallel;
        (par.nodes, par.gpus_per_node, par.pipeline.stages, par.expert.size) = (1, processes, 1, 1);
        (par.data.size, par.data.zero) = (processes, 1);
        spec
    }

    /// The data-parallel processes' optimizer functions, each over the pieces of its shard,
    /// update every learned element exactly as the whole model's optimizer does (to the bit:
    /// the update is elementwise once the gradient norm is given), and every process moves
    /// the routing biases alike.
    #[test]
    fn the_processes_shards_update_what_the_whole_optimizer_does() {
        for numerics in [Numerics::Exact, Numerics::Policy] {
            let spec = tiny_on_processes(3);
            let graph = TrainingGraph::build(&spec, numerics);
            let (params, biases, zero) = (&graph.forward.params, &graph.forward.moe_biases, &graph.zero);
            assert_eq!(zero.members.len(), 3);
            assert!(zero.members.iter().all(|m| m.function != graph.optimizer));
            let mut rng = Rng::new(5);
            let mut random = |len: usize, positive: bool| -> Vec<f32> {
                (0..len).map(|_| rng.gaussian() as f32).map(|x| if positive { x * x } else { x }).collect()
            };
            // Per parameter: its value, gradient, m and v (moments of the learned ones only).
            let state: Vec<[Vec<f32>; 4]> = params
                .iter()
                .map(|p| {
                    [
                        random(p.numel(), false),
                        random(p.numel(), false),
                        random(p.numel(), false),
                        random(p.numel(), true),
                    ]
                })
                .collect();
            let loads: Vec<Vec<f32>> = biases.iter().map(|&b| random(params[b].numel(), true)).collect();
            let value = |shape: Vec<usize>, data: &[f32]| Value::real(Tensor::new(shape, data.to_vec()));
            let scalars: Vec<Value<f32>> = [3e-4, 0.1, 0.001, 1e-3, 5.0, 0.25].map(|x| value(vec![], &[x])).to_vec();
            let bias_args = biases.iter().zip(&loads).flat_map(|(&b, load)| {
                let shape = params[b].shape.clone();
                [value(shape.clone(), &state[b][0]), value(shape, load)]
            });
            let mut args: Vec<Value<f32>> = Vec::new();
            for (p, s) in params.iter().zip(&state).filter(|(p, _)| p.learned) {
                args.extend(s.iter().map(|data| value(p.shape.clone(), data)));
            }
            args.extend(bias_args.clone());
            args.extend(scalars.clone());
            let whole = cpu::run(graph.module(), graph.optimizer, args);
            // The whole optimizer's results, per learned parameter [p', m', v'], then biases.
            let mut out = whole.iter().map(|v| v.as_real().data.clone());
            let learned: Vec<[Vec<f32>; 3]> = params
                .iter()
                .filter(|p| p.learned)
                .map(|_| [(); 3].map(|()| out.next().expect("p', m', v'")))
                .collect();
            let moved: Vec<Vec<f32>> = out.collect();
            let slot = |param: usize| params[..param].iter().filter(|p| p.learned).count();
            let mut covered: Vec<Vec<u32>> = params.iter().map(|p| vec![0; p.numel()]).collect();
            for member in &zero.members {
                let mut args: Vec<Value<f32>> = Vec::new();
                for piece in &member.pieces {
                    let range = piece.start..piece.start + piece.len;
                    args.extend(state[piece.param].iter().map(|data| value(vec![piece.len], &data[range.clone()])));
                }
                args.extend(bias_args.clone());
                args.extend(scalars.clone());
                let mut out =
                    cpu::run(graph.module(), member.function, args).into_iter().map(|v| v.as_real().data.clone());
                for piece in &member.pieces {
                    let range = piece.start..piece.start + piece.len;
                    for (what, expected) in ["p'", "m'", "v'"].iter().zip(&learned[slot(piece.param)]) {
                        let got = out.next().expect("p', m', v' per piece");
                        assert!(got == expected[range.clone()], "{what} of {} {range:?}", params[piece.param].name);
                    }
                    covered[piece.param][range].iter_mut().for_each(|count| *count += 1);
                }
                assert_eq!(out.collect::<Vec<_>>(), moved, "the routing biases");
            }
            for (p, covered) in params.iter().zip(covered) {
                assert!(covered.iter().all(|&count| count == u32::from(p.learned)), "{} is updated once", p.name);
            }
        }
    }
}
