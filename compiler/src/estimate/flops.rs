//! Training FLOPs per token by the MFU convention: a forward pass costs 2 FLOPs per activated
//! GEMM weight (the output head included; embedding lookups, norms and biases are free) plus the
//! causal attention core, and training costs 3 forward passes (the backward is twice the forward);
//! recomputation is not counted.

use dsc_lang::{Mla, Model, StagePart};
use serde::Serialize;

use super::params::{self, Part};

/// Forward + backward = 3 forward passes.
const TRAINING_PASSES: u64 = 3;

/// Training FLOPs per token of the whole model, by kind; they sum to `dsc info`'s
/// `flops_per_token`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Flops {
    /// The sequence length the attention core is counted at.
    pub seq_len: u64,
    /// GEMMs of the main model (layers and output head).
    pub matmul: u64,
    /// The main model's attention core (QKᵀ and PV).
    pub attention: u64,
    /// All MTP depths, their GEMMs, attention and the shared head included.
    pub mtp: u64,
}

impl Flops {
    pub fn total(&self) -> u64 {
        self.matmul + self.attention + self.mtp
    }
}

pub fn per_token(model: &Model, seq_len: u64) -> Flops {
    Flops {
        seq_len,
        matmul: TRAINING_PASSES * gemm_forward(&params::main_model(model)),
        attention: TRAINING_PASSES * model.layers * attention_core_forward(&model.attention, seq_len),
        mtp: mtp_training(model, seq_len),
    }
}

/// Training FLOPs per token of what a pipeline stage can hold.
pub fn training(model: &Model, part: &StagePart, seq_len: u64) -> u64 {
    match part {
        StagePart::Embedding => 0,
        StagePart::Layers(range) => (range.start..range.end).map(|layer| layer_training(model, layer, seq_len)).sum(),
        StagePart::Head => TRAINING_PASSES * gemm_forward(&params::head(model)),
        StagePart::Mtp => mtp_training(model, seq_len),
    }
}

/// Training FLOPs per token of one layer at sequence length `seq_len`.
pub fn layer_training(model: &Model, layer: u64, seq_len: u64) -> u64 {
    let block = params::block(model, params::ffn_at(model, layer));
    TRAINING_PASSES * (gemm_forward(&block) + attention_core_forward(&model.attention, seq_len))
}

/// Forward FLOPs per token of a part's GEMMs.
fn gemm_forward(part: &Part) -> u64 {
    2 * part.activated_matmul
}

/// Forward FLOPs per token of one layer's causal attention core: QKᵀ (qk_dim) and PV (v_dim),
/// 2 FLOPs per multiply-add per head, over (S+1)/2 keys on average, i.e. 2·h·(qk+v)·(S+1)/2.
pub fn attention_core_forward(mla: &Mla, seq_len: u64) -> u64 {
    mla.heads * (mla.qk_dim() + mla.v_dim) * (seq_len + 1)
}

/// All MTP depths: each runs eh_proj, one block and the (shared) output head.
fn mtp_training(model: &Model, seq_len: u64) -> u64 {
    let Some(mtp) = &model.mtp else { return 0 };
    let depth_forward = gemm_forward(&(params::mtp_block(model) + params::head(model)))
        + attention_core_forward(&model.attention, seq_len);
    TRAINING_PASSES * mtp.depth * depth_forward
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use dsc_lang::LayerRange;

    #[test]
    fn tiny_dense_model_by_hand() {
        // d 4, vocab 10, h 2, q_rank 3, kv_rank 2, nope 2, rope 1 (qk 3), v 2, intermediate 5.
        // GEMM weights: q_a 4·3 = 12, q_b 3·2·3 = 18, kv_a 4·(2+1) = 12, kv_b 2·2·(2+2) = 16,
        // o 2·2·4 = 16 (attention 74); FFN 3·4·5 = 60; head 4·10 = 40: 174 in all, forward 348.
        // Attention core at S = 3: 2·h·(qk+v)·(S+1)/2 = 2·2·5·4/2 = 40. Forward 388, training 1164.
        let spec = testing::tiny_dense();
        let flops = per_token(&spec.model, spec.train.seq_len);
        assert_eq!(flops, Flops { seq_len: 3, matmul: 3 * 348, attention: 3 * 40, mtp: 0 });
        assert_eq!(flops.total(), 1164);
        assert_eq!(layer_training(&spec.model, 0, 3), 3 * (2 * (74 + 60) + 40));
    }

    #[test]
    fn tiny_moe_model_by_hand() {
        // As above with 1 shared + top-2 routed experts of 3·4·2 = 24 each and a 4·4 gate:
        // layer GEMMs 74 + 3·24 + 16 = 162, forward 2·162 + 40 = 364, training 1092.
        let spec = testing::tiny_moe();
        assert_eq!(layer_training(&spec.model, 0, 3), 1092);
    }

    #[test]
    fn stage_parts_add_up_to_the_whole() {
        let spec = testing::deepseek_v3();
        let model = &spec.model;
        let parts = [
            StagePart::Embedding,
            StagePart::Layers(LayerRange { start: 0, end: model.layers }),
            StagePart::Head,
            StagePart::Mtp,
        ];
        let sum: u64 = parts.iter().map(|part| training(model, part, 4096)).sum();
        assert_eq!(sum, per_token(model, 4096).total());
    }

    #[test]
    fn deepseek_v3_is_about_260_gflop_per_token() {
        let spec = testing::deepseek_v3();
        let flops = per_token(&spec.model, spec.train.seq_len);
        // 6 × ~36.6B GEMM weights, plus 3 × 61 × 128·320·4097 of attention, plus MTP.
        assert_eq!(flops.attention, 3 * 61 * 128 * 320 * 4097);
        assert!((240e9..270e9).contains(&(flops.total() as f64)), "{flops:?}");
    }
}
