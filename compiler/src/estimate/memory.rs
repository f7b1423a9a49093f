//! Memory per GPU, one pipeline rank at a time: the weights, gradients and optimizer state of the
//! stages a rank holds (routed experts spread over the expert-parallel group, optimizer state
//! sharded by ZeRO-1), plus the activations the backward pass needs, per token as the precision
//! policy stores them, times the micro-batches the pipeline schedule keeps in flight.

use std::ops::Add;

use dsc_lang::{Dtype, Ffn, PipelineSchedule, Recompute, Spec, StagePart};
use serde::Serialize;

use super::params;
use crate::parallel::stages::{describe, Stage};

/// What one GPU of pipeline rank `stage` holds, in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RankMemory {
    /// The pipeline rank.
    pub stage: u64,
    /// The stages it holds, e.g. "embedding, layers 0..4".
    pub parts: String,
    /// Parameters on this GPU: its share of the routed experts, all the rest.
    pub params: u64,
    pub weights: u64,
    pub grads: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub in_flight_micro_batches: u64,
    /// weights + grads + optimizer + activations.
    pub bytes: u64,
    /// `bytes` is at most the GPU's memory.
    pub fits: bool,
}

/// Memory of every pipeline rank.
pub fn per_rank(spec: &Spec, stages: &[Stage]) -> Vec<RankMemory> {
    (0..stages.len()).map(|rank| rank_memory(spec, stages, rank)).collect()
}

fn rank_memory(spec: &Spec, stages: &[Stage], rank: usize) -> RankMemory {
    let held = held_stages(spec.parallel.pipeline.schedule, stages.len(), rank);
    // With DualPipe the rank holding the mirror stages holds the same parameters: ZeRO-1
    // shards their optimizer state over both ranks of every replica.
    let copies = held.len() as u64;
    let resident =
        held.iter().map(|&stage| Resident::of(spec, &stages[stage], copies)).fold(Resident::default(), Add::add);
    let in_flight = in_flight_micro_batches(spec.parallel.pipeline.schedule, stages.len(), rank);
    let per_micro_batch = held.iter().map(|&stage| activation_bytes(spec, &stages[stage])).max().unwrap_or(0);
    let activations = in_flight * per_micro_batch;
    let bytes = resident.weights + resident.grads + resident.optimizer + activations;
    RankMemory {
        stage: rank as u64,
        parts: held.iter().map(|&stage| describe(&stages[stage].parts)).collect::<Vec<_>>().join(" + "),
        params: resident.params,
        weights: resident.weights,
        grads: resident.grads,
        optimizer: resident.optimizer,
        activations,
        in_flight_micro_batches: in_flight,
        bytes,
        fits: bytes <= spec.parallel.gpu.memory_bytes,
    }
}

/// The stages rank `rank` holds: its own, and with DualPipe also the mirror one (the
/// reverse-direction copy of the model), so two copies of the parameters.
fn held_stages(schedule: PipelineSchedule, ranks: usize, rank: usize) -> Vec<usize> {
    match schedule {
        PipelineSchedule::OneFOneB | PipelineSchedule::Zb1p => vec![rank],
        PipelineSchedule::Dualpipe => vec![rank, ranks - 1 - rank],
    }
}

/// Micro-batches whose activations a rank keeps at its peak (the DualPipe paper's table, rank
/// by rank as the generated schedules have them; `parallel::simulate`'s tests compare): 1F1B
/// warms up with PP − rank forwards; ZB1P defers weight gradients, which need the activations,
/// so that every rank keeps PP; DualPipe keeps PP + 1 on every rank.
fn in_flight_micro_batches(schedule: PipelineSchedule, ranks: usize, rank: usize) -> u64 {
    match schedule {
        PipelineSchedule::OneFOneB => (ranks - rank) as u64,
        PipelineSchedule::Zb1p => ranks as u64,
        PipelineSchedule::Dualpipe => ranks as u64 + 1,
    }
}

/// Parameters of one stage on one GPU and the bytes they take.
#[derive(Clone, Copy, Debug, Default)]
struct Resident {
    params: u64,
    weights: u64,
    grads: u64,
    optimizer: u64,
}

impl Resident {
    /// Stage `stage` held by `copies` pipeline ranks of each replica.
    fn of(spec: &Spec, stage: &Stage, copies: u64) -> Resident {
        let parallel = &spec.parallel;
        let precision = &spec.precision;
        let all: params::Part = stage.parts.iter().map(|part| params::part(&spec.model, part)).sum();
        let routed = all.params.routed_experts.div_ceil(parallel.expert.size);
        let replicated = all.params.total() - all.params.routed_experts;
        let params = replicated + routed;
        // ZeRO-1 shards the optimizer state over the GPUs that hold the same parameters: all of
        // data parallelism for replicated ones, the expert-data-parallel group for experts,
        // each replica's copies (`parallel::schedule::Schedule::replica_peers`). (The spec's
        // `zero = 0` is only accepted where no parameter has two holders.)
        let (replicated_shards, routed_shards) =
            (parallel.data.size * copies, (parallel.data.size / parallel.expert.size).max(1) * copies);
        let optimizer_per_param = precision.master_weights.bytes() + 2 * precision.adam_moments.bytes();
        Resident {
            params,
            weights: params * compute_weight_bytes(precision.gemm),
            grads: params * precision.grads.bytes(),
            optimizer: optimizer_per_param * (replicated.div_ceil(replicated_shards) + routed.div_ceil(routed_shards)),
        }
    }
}

impl Add for Resident {
    type Output = Resident;
    fn add(self, other: Resident) -> Resident {
        Resident {
            params: self.params + other.params,
            weights: self.weights + other.weights,
            grads: self.grads + other.grads,
            optimizer: self.optimizer + other.optimizer,
        }
    }
}

/// The compute copy of the weights: BF16, or the GEMM type where that is wider.
fn compute_weight_bytes(gemm: Dtype) -> u64 {
    gemm.bytes().max(Dtype::Bf16.bytes())
}

/// Activation bytes one micro-batch leaves on a stage for its backward pass.
pub fn activation_bytes(spec: &Spec, stage: &Stage) -> u64 {
    let tokens = spec.train.micro_batch * spec.train.seq_len;
    tokens * stage.parts.iter().map(|part| saved_bytes_per_token(spec, part)).sum::<u64>()
}

/// Bytes per token a part saves for its backward pass.
pub fn saved_bytes_per_token(spec: &Spec, part: &StagePart) -> u64 {
    let saved = Saved::new(spec);
    match part {
        StagePart::Embedding => 0,
        StagePart::Layers(range) => {
            (range.start..range.end).map(|layer| saved.block(params::ffn_at(&spec.model, layer))).sum()
        }
        StagePart::Head => saved.head(),
        StagePart::Mtp => spec.model.mtp.as_ref().map_or(0, |mtp| mtp.depth * saved.mtp_depth()),
    }
}

const BF16: u64 = 2;
const F32: u64 = 4;

/// The per-token saved-activation rules of one spec's model and precision policy.
struct Saved<'a> {
    spec: &'a Spec,
    /// Bytes per element of the linear layers' saved inputs.
    s: u64,
}

impl<'a> Saved<'a> {
    fn new(spec: &'a Spec) -> Self {
        Saved { spec, s: spec.precision.saved_activations.bytes() }
    }

    fn recomputes(&self, what: Recompute) -> bool {
        self.spec.precision.recompute.contains(&what)
    }

    /// A normed block input, kept for the Wgrad of the GEMMs it feeds unless the RMSNorm is
    /// recomputed from the residual input in the backward pass.
    fn normed_input(&self) -> u64 {
        if self.recomputes(Recompute::Rmsnorm) {
            0
        } else {
            self.s * self.spec.model.hidden
        }
    }

    fn block(&self, ffn: &Ffn) -> u64 {
        self.attention() + self.ffn(ffn)
    }

    fn attention(&self) -> u64 {
        let d = self.spec.model.hidden;
        let mla = &self.spec.model.attention;
        let h = mla.heads;
        // Residual input x (the norm's backward and its recomputation).
        let residual = BF16 * d;
        // q latent and kv latent + rope key: the inputs of q_b / kv_b (and the rope key itself).
        let latents = self.s * (mla.q_rank + mla.kv_rank + mla.qk_rope_dim);
        // Up-projected q, and k_nope, v per head, for the attention core's backward, unless
        // q_b / kv_b are recomputed from the latents.
        let up_projected = if self.recomputes(Recompute::MlaUpProj) {
            0
        } else {
            BF16 * h * (mla.qk_dim() + mla.qk_nope_dim + mla.v_dim)
        };
        // Attention output for the core's backward, its copy as o_proj's input (o_proj Wgrad),
        // and the softmax log-sum-exp per head (the flash-attention backward recomputes P).
        let output = BF16 * h * mla.v_dim + self.s * h * mla.v_dim + F32 * h;
        residual + self.normed_input() + latents + up_projected + output
    }

    fn ffn(&self, ffn: &Ffn) -> u64 {
        let d = self.spec.model.hidden;
        // Residual input x.
        let residual = BF16 * d;
        let experts = match ffn {
            Ffn::Dense { intermediate } => self.expert(*intermediate),
            // Router scores in FP32 (sigmoid / softmax backward), then every expert the token
            // visits: its top-k routed ones and the shared ones.
            Ffn::Moe(moe) => {
                F32 * moe.routed_experts + (moe.top_k + moe.shared_experts) * self.expert(moe.intermediate)
            }
        };
        residual + self.normed_input() + experts
    }

    /// One SwiGLU MLP a token goes through.
    fn expert(&self, intermediate: u64) -> u64 {
        // Its input copy (gate/up Wgrad; after dispatch for a routed expert).
        let input = self.s * self.spec.model.hidden;
        // The SwiGLU input (gate and up outputs), for SwiGLU's backward; cached like the other
        // saved activations (FP8 in DeepSeek-V3's recipe).
        let swiglu_input = self.s * 2 * intermediate;
        // The SwiGLU output, down_proj's input, unless recomputed from the SwiGLU input.
        let swiglu_output = if self.recomputes(Recompute::Swiglu) { 0 } else { self.s * intermediate };
        input + swiglu_input + swiglu_output
    }

    /// The head input in BF16, and the log-sum-exp of the fused cross-entropy (not the logits).
    fn head(&self) -> u64 {
        BF16 * self.spec.model.hidden + F32
    }

    /// eh_proj's input (the two normed halves), one block, and the shared head.
    fn mtp_depth(&self) -> u64 {
        let model = &self.spec.model;
        self.s * 2 * model.hidden + self.block(params::mtp_ffn(model)) + self.head()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::stages::split;
    use crate::testing;
    use dsc_lang::LayerRange;

    #[test]
    fn deepseek_v3_layer_activations_by_hand() {
        // Saved E4M3 (1 B), rmsnorm, mla_up_proj and swiglu recomputed. Attention: x 2·7168,
        // latents 1536 + 512 + 64, output 2·128·128 + 128·128, log-sum-exp 4·128 = 66,112.
        // MoE FFN: x 2·7168, router 4·256, 9 experts × (7168 + 1·2·2048) = 116,736.
        let spec = testing::deepseek_v3();
        let layer = |i| StagePart::Layers(LayerRange { start: i, end: i + 1 });
        assert_eq!(saved_bytes_per_token(&spec, &layer(60)), 66_112 + 116_736);
        // Dense FFN: x 2·7168, one "expert" of 7168 + 1·2·18,432.
        assert_eq!(saved_bytes_per_token(&spec, &layer(0)), 66_112 + 14_336 + 44_032);
        assert_eq!(saved_bytes_per_token(&spec, &StagePart::Head), 14_340);
    }

    #[test]
    fn nothing_recomputed_saves_more() {
        let mut spec = testing::tiny_dense();
        spec.precision.saved_activations = Dtype::Bf16;
        let layer = StagePart::Layers(LayerRange { start: 0, end: 1 });
        let recomputed = saved_bytes_per_token(&spec, &layer);
        spec.precision.recompute.clear();
        // d 4, h 2, qk 3, nope 2, v 2, intermediate 5, s = 2: two normed inputs 2·(2·4),
        // q / k / v 2·2·(3+2+2) = 28, SwiGLU output 2·5.
        assert_eq!(saved_bytes_per_token(&spec, &layer), recomputed + 16 + 28 + 10);
    }

    #[test]
    fn one_f_one_b_keeps_fewer_micro_batches_on_later_ranks() {
        let mut spec = testing::deepseek_v3();
        spec.parallel.pipeline.schedule = PipelineSchedule::OneFOneB;
        let memory = per_rank(&spec, &split(&spec));
        let in_flight: Vec<u64> = memory.iter().map(|rank| rank.in_flight_micro_batches).collect();
        assert_eq!(in_flight, (1..=16).rev().collect::<Vec<u64>>());
    }

    #[test]
    fn dualpipe_holds_two_stages_per_rank() {
        let spec = testing::deepseek_v3();
        let stages = split(&spec);
        let memory = per_rank(&spec, &stages);
        assert!(memory.iter().all(|rank| rank.in_flight_micro_batches == 17));
        assert_eq!(memory[0].params, memory[15].params);
        assert_eq!(memory[0].parts, format!("{} + {}", describe(&stages[0].parts), describe(&stages[15].parts)));
    }

    #[test]
    fn tiny_dense_memory_by_hand() {
        // One GPU, no ZeRO, BF16 weights, F32 grads, F32 master + 2 BF16 moments (8 B).
        // Params: embedding 40, norms 4 + 4, attention 74 + 5, FFN 60, final norm 4, head 40.
        let spec = testing::tiny_dense();
        let memory = &per_rank(&spec, &split(&spec))[0];
        assert_eq!(memory.params, 231);
        assert_eq!((memory.weights, memory.grads, memory.optimizer), (462, 924, 1848));
        // Saved per token (E4M3, all recomputed): attention x 8, latents 3+2+1, output 2·2·2,
        // o_proj input 2·2, log-sum-exp 4·2 = 34; FFN x 8, input copy 4, SwiGLU input 1·2·5 = 22;
        // head 8 + 4. 3 tokens per micro-batch, 1 in flight.
        assert_eq!(memory.activations, 3 * (34 + 22 + 12));
        assert_eq!(memory.in_flight_micro_batches, 1);
        assert_eq!(memory.bytes, 462 + 924 + 1848 + 204);
        assert!(memory.fits);
    }
}
