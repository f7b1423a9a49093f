//! What one compute chunk of a stage runs, in order: the embedding; per Transformer block its
//! attention, then either its dense FFN or the MoE sequence dispatch all-to-all → experts →
//! combine all-to-all; the head; and per MTP depth its projection, block and the shared head.
//! A backward chunk runs the same phases in reverse, its all-to-alls carrying gradients. The
//! cost model counts the all-to-alls from here, and `dsc compile --emit=schedule` prints it.

use std::fmt;

use dsc_lang::{Ffn, Model, StagePart};

use super::stages::Stage;
use crate::estimate::params;

/// A Transformer block: a layer of the main model, or the block of an MTP depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    Layer(u64),
    Mtp(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Embedding,
    Attention(Block),
    DenseFfn(Block),
    /// Each token to the GPUs of its routed experts: over IB once per remote node it reaches,
    /// then over NVLink inside the node.
    Dispatch(Block),
    Experts(Block),
    /// The experts' outputs back to their tokens, the way they came.
    Combine(Block),
    Head,
    /// An MTP depth's projection of [hidden; embedding of the next token].
    MtpProjection(u64),
}

/// The phases of a forward chunk of `stage`.
pub fn forward_phases(model: &Model, stage: &Stage) -> Vec<Phase> {
    let mut phases = Vec::new();
    let block = |phases: &mut Vec<Phase>, block: Block, ffn: &Ffn| {
        phases.push(Phase::Attention(block));
        match ffn {
            Ffn::Dense { .. } => phases.push(Phase::DenseFfn(block)),
            Ffn::Moe(_) => {
                phases.extend([Phase::Dispatch(block), Phase::Experts(block), Phase::Combine(block)]);
            }
        }
    };
    for part in &stage.parts {
        match part {
            StagePart::Embedding => phases.push(Phase::Embedding),
            StagePart::Layers(range) => {
                for layer in range.start..range.end {
                    block(&mut phases, Block::Layer(layer), params::ffn_at(model, layer));
                }
            }
            StagePart::Head => phases.push(Phase::Head),
            StagePart::Mtp => {
                for depth in 0..model.mtp.as_ref().map_or(0, |mtp| mtp.depth) {
                    phases.push(Phase::MtpProjection(depth));
                    block(&mut phases, Block::Mtp(depth), params::mtp_ffn(model));
                    phases.push(Phase::Head);
                }
            }
        }
    }
    phases
}

/// The MoE layers of a stage: one dispatch and one combine per forward chunk each.
pub fn moe_layers(model: &Model, stage: &Stage) -> u64 {
    forward_phases(model, stage).iter().filter(|phase| matches!(phase, Phase::Dispatch(_))).count() as u64
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Block::Layer(layer) => write!(f, "layer {layer}"),
            Block::Mtp(depth) => write!(f, "mtp {depth}"),
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Embedding => write!(f, "embedding"),
            Phase::Attention(block) => write!(f, "{block} attention"),
            Phase::DenseFfn(block) => write!(f, "{block} dense ffn"),
            Phase::Dispatch(block) => write!(f, "{block} dispatch all-to-all"),
            Phase::Experts(block) => write!(f, "{block} experts"),
            Phase::Combine(block) => write!(f, "{block} combine all-to-all"),
            Phase::Head => write!(f, "head"),
            Phase::MtpProjection(depth) => write!(f, "mtp {depth} projection"),
        }
    }
}

/// Each stage's forward chunk, one line per stage, e.g. "stage 1: layer 4 attention, layer 4
/// dispatch all-to-all, …".
pub fn describe(model: &Model, stages: &[Stage]) -> String {
    stages
        .iter()
        .map(|stage| {
            let phases: Vec<String> = forward_phases(model, stage).iter().map(Phase::to_string).collect();
            format!("stage {} forward chunk: {}\n", stage.index, phases.join(", "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::stages::split;
    use crate::testing;

    #[test]
    fn deepseek_v3_chunks() {
        let spec = testing::deepseek_v3();
        let stages = split(&spec);
        // Stage 0: embedding, three dense layers, one MoE layer.
        let first: Vec<String> = forward_phases(&spec.model, &stages[0]).iter().map(Phase::to_string).collect();
        assert_eq!(first[..3], ["embedding", "layer 0 attention", "layer 0 dense ffn"]);
        assert_eq!(
            first[first.len() - 4..],
            ["layer 3 attention", "layer 3 dispatch all-to-all", "layer 3 experts", "layer 3 combine all-to-all"]
        );
        let moe: Vec<u64> = stages.iter().map(|stage| moe_layers(&spec.model, stage)).collect();
        // 58 MoE layers and the MoE block of the one MTP depth.
        assert_eq!(moe.iter().sum::<u64>(), 58 + 1);
        assert_eq!((moe[0], moe[1], moe[15]), (1, 4, 2));
        let last = forward_phases(&spec.model, &stages[15]);
        assert_eq!(last.iter().filter(|phase| **phase == Phase::Head).count(), 2, "the main head and MTP's");
        let all_to_alls = last.iter().filter(|phase| matches!(phase, Phase::Dispatch(_) | Phase::Combine(_)));
        assert_eq!(all_to_alls.count(), 4);
    }
}
