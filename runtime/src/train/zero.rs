//! ZeRO-1's sharded optimizer state on the CPU backend's ranks. A rank's copy of one
//! sharing's parameters is a flat run of whole-model parameters (or, for the routed experts,
//! its share of them); the reduce-scatter hands it one contiguous shard of that run's
//! gradient. [`ShardOptimizer`] keeps AdamW's moments for the learned elements of that shard
//! only and updates them with the training graph's own optimizer function, built over the
//! shard's pieces of parameters ([`optimizer::build`]), so that clipping, bias correction,
//! weight decay, LR multipliers and the policy's moment type are the one-rank trainer's. The
//! routing biases are not learned: [`BiasUpdate`] moves them from the step's summed loads, on
//! the trainer. The moments come from the whole model's order and go back to it for a
//! checkpoint ([`ShardOptimizer::new`], [`ShardOptimizer::gather_into`]).

use std::ops::Range;

use dsc_compiler::graph::ir::Module;
use dsc_compiler::graph::{optimizer, Numerics, ParamInfo};
use dsc_lang::Spec;

use super::pipeline::Sharing;
use crate::cpu::{self, Real, Tensor, Value};

/// AdamW's two moments of every learned parameter of the whole model, in its order, flat.
pub type WholeMoments = Vec<[Vec<f32>; 2]>;

/// A run of one parameter's elements in a rank's copy of a sharing's parameters: the
/// parameter's index in the whole model's list and where the run starts in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub param: usize,
    pub start: usize,
    pub len: usize,
}

/// A learned parameter's elements within a shard: the run they come from, and where they
/// start in the shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    run: Run,
    at: usize,
}

/// The learned pieces of `shard` (a range of the flat copy that `runs` lay out), in order.
fn pieces(runs: &[Run], params: &[ParamInfo], shard: Range<usize>) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut offset = 0;
    for run in runs {
        let (from, to) = (offset.max(shard.start), (offset + run.len).min(shard.end));
        if from < to && params[run.param].learned {
            let run = Run { param: run.param, start: run.start + from - offset, len: to - from };
            pieces.push(Piece { run, at: from - shard.start });
        }
        offset += run.len;
    }
    pieces
}

/// One sharing's shard on a rank: the optimizer function over its learned pieces, and their
/// moments.
struct Shard {
    function: usize,
    pieces: Vec<Piece>,
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
                let infos: Vec<ParamInfo> = pieces
                    .iter()
                    .map(|piece| {
                        let Run { param, start, len } = piece.run;
                        let whole = &params[param];
                        ParamInfo {
                            name: format!("{}[{start}..{}]", whole.name, start + len),
                            shape: vec![len],
                            ..whole.clone()
                        }
                    })
                    .collect();
                let function = module.add(optimizer::build(&module, spec, &infos, &[], numerics));
                let moments = pieces
                    .iter()
                    .map(|piece| {
                        let Run { param, start, len } = piece.run;
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
    /// shard of their gradient summed over the step's micro-batches, scaled by `scale` to
    /// their mean; `scalars` are the optimizer function's (the LR, bias corrections, bias
    /// speed and the whole model's gradient norm).
    pub fn update(
        &mut self,
        sharing: Sharing,
        params: &mut [f32],
        gradient: &[f32],
        scale: f32,
        scalars: &[Value<f32>],
    ) {
        let shard = &mut self.shards[sharing as usize];
        if shard.pieces.is_empty() {
            return;
        }
        let mut args = Vec::with_capacity(4 * shard.pieces.len() + scalars.len());
        // The moments go in and their successors come back.
        for (piece, [m, v]) in shard.pieces.iter().zip(&mut shard.moments) {
            let range = piece.at..piece.at + piece.run.len;
            let flat = |data: Vec<f32>| Value::real(Tensor::new(vec![data.len()], data));
            args.push(flat(params[range.clone()].to_vec()));
            args.push(flat(gradient[range].iter().map(|g| g * scale).collect()));
            args.extend([flat(std::mem::take(m)), flat(std::mem::take(v))]);
        }
        args.extend(scalars.iter().cloned());
        let mut out = cpu::run(&self.module, shard.function, args).into_iter();
        for (piece, moments) in shard.pieces.iter().zip(&mut shard.moments) {
            let mut next = || out.next().expect("p', m' and v' per piece").as_real().data.clone();
            params[piece.at..piece.at + piece.run.len].copy_from_slice(&next());
            *moments = [next(), next()];
        }
    }

    /// How many elements' moments the rank keeps.
    pub fn held(&self) -> usize {
        self.shards.iter().flat_map(|shard| &shard.pieces).map(|piece| piece.run.len).sum()
    }

    /// Writes this rank's moments into `whole` (the whole model's, in its order).
    pub fn gather_into(&self, params: &[ParamInfo], whole: &mut WholeMoments) {
        let slots = learned_slots(params);
        for shard in &self.shards {
            for (piece, moments) in shard.pieces.iter().zip(&shard.moments) {
                let Run { param, start, len } = piece.run;
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
        let infos: Vec<ParamInfo> = biases.iter().map(|&b| params[b].clone()).collect();
        let mut module = Module::default();
        let indices: Vec<usize> = (0..infos.len()).collect();
        let function = module.add(optimizer::build(&module, spec, &infos, &indices, numerics));
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
    use crate::comm;
    use dsc_lang::ParamGroup;
    use proptest::prelude::*;

    fn param(name: &str, numel: usize, learned: bool) -> ParamInfo {
        ParamInfo { name: name.into(), shape: vec![numel], group: ParamGroup::Attention, learned, norm: false }
    }

    #[test]
    fn a_shard_holds_the_learned_pieces_it_overlaps() {
        let params = [param("a", 4, true), param("bias", 2, false), param("c", 6, true)];
        // A copy of a, bias, and the second half of c (an expert share): 4 + 2 + 3 elements.
        let runs = [
            Run { param: 0, start: 0, len: 4 },
            Run { param: 1, start: 0, len: 2 },
            Run { param: 2, start: 3, len: 3 },
        ];
        let piece = |param, start, len, at| Piece { run: Run { param, start, len }, at };
        assert_eq!(pieces(&runs, &params, 0..3), [piece(0, 0, 3, 0)]);
        assert_eq!(pieces(&runs, &params, 3..7), [piece(0, 3, 1, 0), piece(2, 3, 1, 3)], "the bias is not learned");
        assert_eq!(pieces(&runs, &params, 5..9), [piece(2, 3, 3, 1)]);
        assert_eq!(pieces(&runs, &params, 9..9), []);
    }

    proptest! {
        /// However a copy's runs and its group fall, the members' shards hold every learned
        /// element of the copy exactly once, and nothing else.
        #[test]
        fn the_members_shards_hold_each_learned_element_once(
            lens in prop::collection::vec((1usize..40, any::<bool>()), 1..8),
            offsets in prop::collection::vec(0usize..5, 8),
            members in 1usize..9,
        ) {
            let params: Vec<ParamInfo> = lens
                .iter()
                .enumerate()
                .map(|(i, &(len, learned))| param(&format!("p{i}"), len + offsets[i], learned))
                .collect();
            // Each run starts `offsets[i]` into its parameter (an expert share).
            let runs: Vec<Run> =
                lens.iter().enumerate().map(|(i, &(len, _))| Run { param: i, start: offsets[i], len }).collect();
            let total: usize = runs.iter().map(|run| run.len).sum();
            let mut held: Vec<Vec<usize>> = params.iter().map(|p| vec![0; p.numel()]).collect();
            for member in 0..members {
                let shard = comm::shard(total, members, member);
                for piece in pieces(&runs, &params, shard.clone()) {
                    prop_assert!(piece.at + piece.run.len <= shard.len());
                    for x in &mut held[piece.run.param][piece.run.start..piece.run.start + piece.run.len] {
                        *x += 1;
                    }
                }
            }
            for (i, (&(_, learned), counts)) in lens.iter().zip(&held).enumerate() {
                for (at, &count) in counts.iter().enumerate() {
                    let in_run = at >= offsets[i];
                    prop_assert_eq!(count, usize::from(learned && in_run), "p{} element {}", i, at);
                }
            }
        }
    }
}
