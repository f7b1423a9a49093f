//! ZeRO-1's partition of the optimizer state. A rank's copy of the parameters it shares with
//! other ranks is laid out as one flat vector of [`Run`]s (whole parameters, or a rank's share
//! of a routed expert stack); each member of the sharing group updates one shard of that
//! vector: the learned [`pieces`] of its runs that fall in the shard, with the optimizer
//! function built over them ([`shard_optimizer`]), so that clipping, bias correction, weight
//! decay, LR multipliers and the policy's moment type are the whole model's.
//!
//! [`Zero`] is the layout of data-parallel processes (one per GPU, no pipeline or expert
//! parallelism): the learned parameters one after another, each at a multiple of [`ALIGN`]
//! elements (the kernels read them in place), cut into equal shards of a multiple of
//! [`ALIGN`] (NCCL's reduce-scatter and all-gather move equal parts), each with its optimizer
//! function in the training graph. The thread-ranks of a pipeline plan lay their copies out
//! without gaps and cut them with `comm::shard` (their collectives take unequal parts).

use super::ir::Module;
use super::model::{Numerics, ParamInfo};
use super::optimizer;
use dsc_lang::Spec;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Where data-parallel processes place each learned parameter and shard in the flat vector:
/// a multiple of 64 elements (256 bytes).
pub const ALIGN: usize = 64;

/// A run of one parameter's elements in a flat vector: the parameter's index in the whole
/// model's list, the run's first element in it, its length, and where it starts in the flat
/// vector (for a shard's piece: in the shard).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub param: usize,
    pub start: usize,
    pub len: usize,
    pub at: usize,
}

/// The learned pieces of `shard` (a range of the flat vector that `runs` lay out), in order,
/// each placed in the shard.
pub fn pieces(runs: &[Run], params: &[ParamInfo], shard: Range<usize>) -> Vec<Run> {
    runs.iter()
        .filter(|run| params[run.param].learned)
        .filter_map(|run| {
            let (from, to) = (run.at.max(shard.start), (run.at + run.len).min(shard.end));
            (from < to).then(|| Run {
                param: run.param,
                start: run.start + from - run.at,
                len: to - from,
                at: from - shard.start,
            })
        })
        .collect()
}

/// The optimizer function ([`optimizer::build`]) over `pieces` of the whole model's `params`
/// (each a flat parameter named `name[a..b]`), then the routing biases `biases` (indices into
/// `params`).
pub fn shard_optimizer(
    module: &Module,
    spec: &Spec,
    params: &[ParamInfo],
    pieces: &[Run],
    biases: &[usize],
    numerics: Numerics,
) -> super::Function {
    let mut infos: Vec<ParamInfo> = pieces
        .iter()
        .map(|piece| {
            let Run { param, start, len, .. } = *piece;
            let whole = &params[param];
            ParamInfo { name: format!("{}[{start}..{}]", whole.name, start + len), shape: vec![len], ..whole.clone() }
        })
        .collect();
    let at = infos.len();
    infos.extend(biases.iter().map(|&b| params[b].clone()));
    let indices: Vec<usize> = (at..infos.len()).collect();
    optimizer::build(module, spec, &infos, &indices, numerics)
}

/// The ZeRO-1 layout of data-parallel processes: the learned parameters' runs in the flat
/// vector (whole, in order, aligned), the shard length, and each member's optimizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Zero {
    pub runs: Vec<Run>,
    /// The flat vector is `members.len() × shard` elements long.
    pub shard: usize,
    pub members: Vec<Member>,
}

/// One process's part: its optimizer function (over its pieces, then every routing bias) and
/// its pieces, placed in its shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub function: usize,
    pub pieces: Vec<Run>,
}

impl Zero {
    /// The layout for `spec`'s plan: one member per data-parallel replica where the plan is
    /// data parallelism alone, each with a function added to `module`; else one member whose
    /// function is `whole`, the model's optimizer.
    pub fn build(
        module: &mut Module,
        spec: &Spec,
        (params, biases): (&[ParamInfo], &[usize]),
        numerics: Numerics,
        whole: usize,
    ) -> Zero {
        let mut runs = Vec::new();
        let mut end = 0;
        for (param, p) in params.iter().enumerate().filter(|(_, p)| p.learned) {
            runs.push(Run { param, start: 0, len: p.numel(), at: end });
            end = (end + p.numel()).next_multiple_of(ALIGN);
        }
        let par = &spec.parallel;
        let processes = par.pipeline.stages == 1 && par.expert.size == 1;
        let count = if processes { (par.data.size as usize).max(1) } else { 1 };
        let shard = end.div_ceil(count).next_multiple_of(ALIGN);
        let members = (0..count)
            .map(|member| {
                let pieces = pieces(&runs, params, member * shard..(member + 1) * shard);
                let function = if count == 1 {
                    whole
                } else {
                    let mut f = shard_optimizer(module, spec, params, &pieces, biases, numerics);
                    f.name = format!("adamw_shard{member}");
                    module.add(f)
                };
                Member { function, pieces }
            })
            .collect();
        Zero { runs, shard, members }
    }

    /// Where a process keeps each of `params` (the whole model's) in one allocation, in
    /// elements: the learned ones at their runs, the others after the layout, aligned; and the
    /// allocation's length.
    pub fn placement(&self, params: &[ParamInfo]) -> (Vec<usize>, usize) {
        let mut at = vec![0; params.len()];
        for run in &self.runs {
            at[run.param] = run.at;
        }
        let mut end = self.len();
        for (i, p) in params.iter().enumerate().filter(|(_, p)| !p.learned) {
            at[i] = end;
            end = (end + p.numel()).next_multiple_of(ALIGN);
        }
        (at, end)
    }

    /// The flat vector's length.
    pub fn len(&self) -> usize {
        self.members.len() * self.shard
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsc_lang::ParamGroup;
    use proptest::prelude::*;

    fn param(name: &str, numel: usize, learned: bool) -> ParamInfo {
        ParamInfo { name: name.into(), shape: vec![numel], group: ParamGroup::Attention, learned, norm: false }
    }

    fn contiguous(runs: &[(usize, usize, usize)]) -> Vec<Run> {
        let mut at = 0;
        runs.iter()
            .map(|&(param, start, len)| {
                at += len;
                Run { param, start, len, at: at - len }
            })
            .collect()
    }

    #[test]
    fn a_shard_holds_the_learned_pieces_it_overlaps() {
        let params = [param("a", 4, true), param("bias", 2, false), param("c", 6, true)];
        // A copy of a, bias, and the second half of c (an expert share): 4 + 2 + 3 elements.
        let runs = contiguous(&[(0, 0, 4), (1, 0, 2), (2, 3, 3)]);
        let piece = |param, start, len, at| Run { param, start, len, at };
        assert_eq!(pieces(&runs, &params, 0..3), [piece(0, 0, 3, 0)]);
        assert_eq!(pieces(&runs, &params, 3..7), [piece(0, 3, 1, 0), piece(2, 3, 1, 3)], "the bias is not learned");
        assert_eq!(pieces(&runs, &params, 5..9), [piece(2, 3, 3, 1)]);
        assert_eq!(pieces(&runs, &params, 9..9), []);
    }

    /// The processes' layout puts each learned parameter whole at a multiple of [`ALIGN`], cuts
    /// the vector into equal aligned shards, and places the other parameters after it.
    #[test]
    fn the_processes_layout_aligns_every_parameter_and_shard() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
        let mut spec = dsc_lang::load(&path, &[]).checked_spec().cloned().expect("the tiny model checks");
        (spec.parallel.gpus_per_node, spec.parallel.data.size, spec.parallel.data.zero) = (3, 3, 1);
        let graph = super::super::TrainingGraph::build(&spec, Numerics::Exact);
        let (params, zero) = (&graph.forward.params, &graph.zero);
        assert_eq!(zero.members.len(), 3);
        assert_eq!(zero.shard % ALIGN, 0);
        let (at, end) = zero.placement(params);
        let mut spans: Vec<(usize, usize)> = params.iter().zip(&at).map(|(p, &at)| (at, at + p.numel())).collect();
        assert!(at.iter().all(|at| at % ALIGN == 0));
        for (p, &(from, to)) in params.iter().zip(&spans) {
            assert_eq!(from < zero.len(), p.learned, "{} at {from}", p.name);
            assert!(to <= if p.learned { zero.len() } else { end }, "{} ends at {to}", p.name);
        }
        spans.sort_unstable();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "the parameters overlap");
        for member in &zero.members {
            assert!(member.pieces.iter().all(|piece| piece.at + piece.len <= zero.shard));
        }
    }

    proptest! {
        /// However a copy's runs fall (with gaps between them or not) and however many
        /// members share it, the members' shards hold every learned element of the copy
        /// exactly once, and nothing else.
        #[test]
        fn the_members_shards_hold_each_learned_element_once(
            lens in prop::collection::vec((1usize..40, any::<bool>(), 0usize..5, 0usize..3), 1..8),
            members in 1usize..9,
        ) {
            let params: Vec<ParamInfo> = lens
                .iter()
                .enumerate()
                .map(|(i, &(len, learned, offset, _))| param(&format!("p{i}"), len + offset, learned))
                .collect();
            // Each run starts `offset` into its parameter (an expert share), `gap` after the last.
            let mut end = 0;
            let runs: Vec<Run> = lens
                .iter()
                .enumerate()
                .map(|(i, &(len, _, offset, gap))| {
                    end += gap + len;
                    Run { param: i, start: offset, len, at: end - len }
                })
                .collect();
            let mut held: Vec<Vec<usize>> = params.iter().map(|p| vec![0; p.numel()]).collect();
            let shard = end.div_ceil(members);
            for member in 0..members {
                for piece in pieces(&runs, &params, member * shard..(member + 1) * shard) {
                    prop_assert!(piece.at + piece.len <= shard);
                    for x in &mut held[piece.param][piece.start..piece.start + piece.len] {
                        *x += 1;
                    }
                }
            }
            for (i, (&(_, learned, offset, _), counts)) in lens.iter().zip(&held).enumerate() {
                for (at, &count) in counts.iter().enumerate() {
                    prop_assert_eq!(count, usize::from(learned && at >= offset), "p{} element {}", i, at);
                }
            }
        }
    }
}
