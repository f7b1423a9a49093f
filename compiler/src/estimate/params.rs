//! Exact parameter counts, tensor by tensor as in the Hugging Face DeepSeek-V3 checkpoint. Every
//! part of the model (embedding, a layer, the head, an MTP module) is a [`Part`]: its parameters
//! by component ([`Components`]), how many of them one token uses, and how many of those are GEMM
//! weights (what the FLOP count multiplies by). The selection bias `e_score_correction_bias` is in
//! the checkpoint, so it is counted (in the router) although it is not learned by the optimizer.

use std::iter::Sum;
use std::ops::Add;

use dsc_lang::{Ffn, LayerRange, Mla, Model, Moe, StagePart};
use serde::Serialize;

/// Parameter counts by component (the kinds of [`dsc_lang::ParamGroup`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Components {
    pub embedding: u64,
    /// The output projection (the final norm before it is in `norms`).
    pub head: u64,
    /// MLA's projections and its q / kv latent RMSNorms.
    pub attention: u64,
    pub dense_ffn: u64,
    pub shared_experts: u64,
    pub routed_experts: u64,
    /// The gate matrix and the selection bias.
    pub router: u64,
    /// The layers' input and post-attention RMSNorms and the final norm.
    pub norms: u64,
    /// Tensors only an MTP module has: enorm, hnorm, eh_proj and shared_head.norm. Always zero in
    /// the main model, whose report lists the MTP total apart, so it is not serialised.
    #[serde(skip)]
    pub mtp: u64,
}

impl Components {
    pub fn total(&self) -> u64 {
        self.embedding
            + self.head
            + self.attention
            + self.dense_ffn
            + self.shared_experts
            + self.routed_experts
            + self.router
            + self.norms
            + self.mtp
    }
}

impl Add for Components {
    type Output = Components;
    fn add(self, other: Components) -> Components {
        Components {
            embedding: self.embedding + other.embedding,
            head: self.head + other.head,
            attention: self.attention + other.attention,
            dense_ffn: self.dense_ffn + other.dense_ffn,
            shared_experts: self.shared_experts + other.shared_experts,
            routed_experts: self.routed_experts + other.routed_experts,
            router: self.router + other.router,
            norms: self.norms + other.norms,
            mtp: self.mtp + other.mtp,
        }
    }
}

/// The parameters of a part of the model and the subsets one token uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Part {
    pub params: Components,
    /// Parameters one token uses: all but the routed experts it is not sent to.
    pub activated: u64,
    /// Activated parameters that are GEMM weights: not the embedding lookup, norms or biases.
    pub activated_matmul: u64,
}

impl Part {
    /// GEMM weights every token multiplies by.
    fn gemm(params: Components) -> Part {
        Part { params, activated: params.total(), activated_matmul: params.total() }
    }

    /// Parameters every token uses outside a GEMM: embedding rows, norm scales, biases.
    fn non_gemm(params: Components) -> Part {
        Part { params, activated: params.total(), activated_matmul: 0 }
    }
}

impl Add for Part {
    type Output = Part;
    fn add(self, other: Part) -> Part {
        Part {
            params: self.params + other.params,
            activated: self.activated + other.activated,
            activated_matmul: self.activated_matmul + other.activated_matmul,
        }
    }
}

impl Sum for Part {
    fn sum<I: Iterator<Item = Part>>(parts: I) -> Part {
        parts.fold(Part::default(), Add::add)
    }
}

/// The main model's counts as `dsc info` reports them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    /// Main model, embedding and head included, MTP apart.
    pub total: u64,
    /// Main-model parameters one token uses.
    pub activated: u64,
    /// All MTP modules, with their own embedding / head only where those are not shared.
    pub mtp: u64,
    /// The main model by component; sums to `total`.
    #[serde(flatten)]
    pub components: Components,
}

pub fn counts(model: &Model) -> ParamCounts {
    let main = main_model(model);
    ParamCounts {
        total: main.params.total(),
        activated: main.activated,
        mtp: mtp(model).params.total(),
        components: main.params,
    }
}

/// The FFN of a layer (the spec's ranges tile all layers).
pub fn ffn_at(model: &Model, layer: u64) -> &Ffn {
    model
        .ffn
        .iter()
        .find(|range| range.layers.contains(layer))
        .map(|range| &range.ffn)
        .unwrap_or_else(|| panic!("no FFN range covers layer {layer}"))
}

/// The FFN an MTP module's block has: that of the model's last layer.
pub fn mtp_ffn(model: &Model) -> &Ffn {
    ffn_at(model, model.layers - 1)
}

/// The parameters of what a pipeline stage can hold.
pub fn part(model: &Model, part: &StagePart) -> Part {
    match part {
        StagePart::Embedding => embedding(model),
        StagePart::Layers(range) => layers(model, *range),
        StagePart::Head => head(model),
        StagePart::Mtp => mtp(model),
    }
}

/// Embedding, all layers and head.
pub fn main_model(model: &Model) -> Part {
    embedding(model) + layers(model, LayerRange { start: 0, end: model.layers }) + head(model)
}

/// `embed_tokens`: one row per vocabulary entry.
pub fn embedding(model: &Model) -> Part {
    Part::non_gemm(Components { embedding: model.vocab * model.hidden, ..Components::default() })
}

/// The final RMSNorm and the (untied) output projection `lm_head`.
pub fn head(model: &Model) -> Part {
    rmsnorm(model.hidden) + output_projection(model)
}

fn output_projection(model: &Model) -> Part {
    Part::gemm(Components { head: model.hidden * model.vocab, ..Components::default() })
}

fn rmsnorm(dim: u64) -> Part {
    Part::non_gemm(Components { norms: dim, ..Components::default() })
}

fn layers(model: &Model, range: LayerRange) -> Part {
    (range.start..range.end).map(|layer| block(model, ffn_at(model, layer))).sum()
}

/// One Transformer block: input RMSNorm, MLA, post-attention RMSNorm, FFN.
pub fn block(model: &Model, ffn: &Ffn) -> Part {
    let d = model.hidden;
    rmsnorm(d) + attention(&model.attention, d) + rmsnorm(d) + self::ffn(ffn, d)
}

/// MLA: q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj.
fn attention(mla: &Mla, d: u64) -> Part {
    let h = mla.heads;
    let projections = d * mla.q_rank
        + mla.q_rank * h * mla.qk_dim()
        + d * (mla.kv_rank + mla.qk_rope_dim)
        + mla.kv_rank * h * (mla.qk_nope_dim + mla.v_dim)
        + h * mla.v_dim * d;
    let latent_norms = mla.q_rank + mla.kv_rank;
    Part::gemm(Components { attention: projections, ..Components::default() })
        + Part::non_gemm(Components { attention: latent_norms, ..Components::default() })
}

/// gate_proj, up_proj and down_proj of one SwiGLU MLP.
fn swiglu(d: u64, intermediate: u64) -> u64 {
    3 * d * intermediate
}

fn ffn(ffn: &Ffn, d: u64) -> Part {
    match ffn {
        Ffn::Dense { intermediate } => {
            Part::gemm(Components { dense_ffn: swiglu(d, *intermediate), ..Components::default() })
        }
        Ffn::Moe(moe) => self::moe(moe, d),
    }
}

/// Shared experts, routed experts (a token uses `top_k` of them), the gate and the bias.
fn moe(moe: &Moe, d: u64) -> Part {
    let expert = swiglu(d, moe.intermediate);
    let shared = Components { shared_experts: moe.shared_experts * expert, ..Components::default() };
    let gate = Components { router: moe.routed_experts * d, ..Components::default() };
    let bias = Components { router: moe.routed_experts, ..Components::default() };
    let routed = Part {
        params: Components { routed_experts: moe.routed_experts * expert, ..Components::default() },
        activated: moe.top_k * expert,
        activated_matmul: moe.top_k * expert,
    };
    Part::gemm(shared) + Part::gemm(gate) + Part::non_gemm(bias) + routed
}

/// What every MTP depth has whatever it shares: enorm, hnorm, eh_proj (2d → d), one block with
/// the last layer's FFN, and shared_head.norm.
pub fn mtp_block(model: &Model) -> Part {
    let d = model.hidden;
    let norms = Components { mtp: 3 * d, ..Components::default() };
    let eh_proj = Components { mtp: 2 * d * d, ..Components::default() };
    Part::non_gemm(norms) + Part::gemm(eh_proj) + block(model, mtp_ffn(model))
}

/// All MTP depths, each with its own embedding / output projection where it does not share them.
pub fn mtp(model: &Model) -> Part {
    let Some(mtp) = &model.mtp else {
        return Part::default();
    };
    let own_embedding = if mtp.share_embedding { Part::default() } else { embedding(model) };
    let own_head = if mtp.share_head { Part::default() } else { output_projection(model) };
    (0..mtp.depth).map(|_| mtp_block(model) + own_embedding + own_head).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn deepseek_v3_has_its_published_size() {
        let counts = counts(&testing::deepseek_v3().model);
        assert_eq!(counts.total, 671_026_419_200);
        assert_eq!(counts.mtp, 11_610_068_224);
        assert!((36_500_000_000..=38_500_000_000).contains(&counts.activated), "{}", counts.activated);
    }

    #[test]
    fn components_sum_to_the_total() {
        let counts = counts(&testing::deepseek_v3().model);
        assert_eq!(counts.components.total(), counts.total);
        assert_eq!(counts.components.mtp, 0);
    }

    #[test]
    fn deepseek_v3_components() {
        let c = counts(&testing::deepseek_v3().model).components;
        assert_eq!(c.embedding, 129_280 * 7168);
        assert_eq!(c.head, 7168 * 129_280);
        // 7168·1536 + 1536 + 1536·128·192 + 7168·576 + 512 + 512·128·256 + 128·128·7168 per layer.
        assert_eq!(c.attention, 61 * 187_107_328);
        assert_eq!(c.dense_ffn, 3 * 3 * 7168 * 18_432);
        assert_eq!(c.shared_experts, 58 * 3 * 7168 * 2048);
        assert_eq!(c.routed_experts, 58 * 256 * 3 * 7168 * 2048);
        assert_eq!(c.router, 58 * (256 * 7168 + 256));
        assert_eq!(c.norms, (2 * 61 + 1) * 7168);
    }

    #[test]
    fn unshared_mtp_brings_its_own_embedding_and_head() {
        let mut model = testing::deepseek_v3().model;
        let shared = mtp(&model).params.total();
        let mtp = model.mtp.as_mut().unwrap();
        mtp.share_embedding = false;
        mtp.share_head = false;
        mtp.depth = 2;
        assert_eq!(self::mtp(&model).params.total(), 2 * (shared + 2 * 129_280 * 7168));
    }

    #[test]
    fn a_token_activates_top_k_and_shared_experts() {
        // d 4, one MoE layer of 1 shared + 4 routed experts (intermediate 2), top 2.
        let model = testing::tiny_moe().model;
        let layer = block(&model, ffn_at(&model, 0));
        let expert = 3 * 4 * 2;
        let router = 4 * 4 + 4;
        let unrouted = layer.params.total() - 4 * expert;
        assert_eq!(layer.activated, unrouted + 2 * expert);
        // GEMM weights: everything but the two RMSNorms (4 each), the latent norms and the bias.
        let norms = 2 * 4 + model.attention.q_rank + model.attention.kv_rank + 4;
        assert_eq!(layer.activated_matmul, layer.activated - norms);
        assert_eq!(layer.params.router, router);
    }
}
