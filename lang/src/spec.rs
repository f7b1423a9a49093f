//! The resolved `Spec`: the one plain value every later stage reads. It is produced by
//! `decode` from a checked file, carries no spans and no syntax, and serialises with serde
//! (`dsc compile FILE --emit=spec`). Units are resolved: counts are integers, positions in a
//! schedule say whether they are steps or tokens, memory is in bytes.

use serde::{Deserialize, Serialize};

/// A whole training job: the model, its recipe, its precision policy and its parallel plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub model: Model,
    pub train: Train,
    pub precision: Precision,
    pub parallel: Parallel,
}

impl Spec {
    /// The settings (dotted paths, as `--set` names them) whose values differ in `other`.
    fn differing_settings(&self, other: &Spec) -> Vec<String> {
        let mut out = Vec::new();
        if let (Ok(a), Ok(b)) = (serde_json::to_value(self), serde_json::to_value(other)) {
            differences(&a, &b, String::new(), &mut out);
        }
        out
    }

    /// The differing settings in words for an error: "`a`, `b` differ" (six at most, then how
    /// many more).
    pub fn differences_in_words(&self, other: &Spec) -> String {
        let all = self.differing_settings(other);
        let shown: Vec<String> = all.iter().take(6).map(|p| format!("`{p}`")).collect();
        let more = all.len() - shown.len();
        let verb = if all.len() == 1 { "differs" } else { "differ" };
        let more = if more > 0 { format!(" and {more} more") } else { String::new() };
        format!("{} {verb}{more}", shown.join(", "))
    }
}

fn differences(a: &serde_json::Value, b: &serde_json::Value, path: String, out: &mut Vec<String>) {
    use serde_json::Value::{Array, Object};
    match (a, b) {
        (Object(x), Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = serde_json::Value::Null;
                let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                differences(x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), sub, out);
            }
        }
        (Array(x), Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                differences(u, v, format!("{path}.{i}"), out);
            }
        }
        _ if a != b => out.push(path),
        _ => {}
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub name: String,
    pub vocab: u64,
    pub hidden: u64,
    pub layers: u64,
    /// RMSNorm epsilon (the only normalisation DeepSeek-V3 uses).
    pub norm_eps: f64,
    /// Standard deviation of the normal init of every learnable matrix.
    pub init_std: f64,
    pub attention: Mla,
    /// FFN kind per half-open layer range; the ranges tile `0..layers` in order.
    pub ffn: Vec<FfnRange>,
    pub mtp: Option<Mtp>,
}

/// Multi-head latent attention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mla {
    pub heads: u64,
    pub q_rank: u64,
    pub kv_rank: u64,
    pub qk_nope_dim: u64,
    pub qk_rope_dim: u64,
    pub v_dim: u64,
    pub rope_theta: f64,
    pub yarn: Option<Yarn>,
}

impl Mla {
    /// Per-head query/key dimension: the no-position part plus the decoupled RoPE part.
    pub fn qk_dim(&self) -> u64 {
        self.qk_nope_dim + self.qk_rope_dim
    }
}

/// YaRN RoPE scaling used by the context-extension phases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Yarn {
    pub factor: f64,
    pub original_seq: u64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FfnRange {
    /// Half-open range of layer indices.
    pub layers: LayerRange,
    pub ffn: Ffn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRange {
    pub start: u64,
    pub end: u64,
}

impl LayerRange {
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn contains(&self, layer: u64) -> bool {
        (self.start..self.end).contains(&layer)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Ffn {
    /// SwiGLU MLP.
    Dense {
        intermediate: u64,
    },
    Moe(Moe),
}

/// DeepSeekMoE with auxiliary-loss-free balancing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Moe {
    pub shared_experts: u64,
    pub routed_experts: u64,
    pub top_k: u64,
    /// Intermediate size of each (shared or routed) SwiGLU expert.
    pub intermediate: u64,
    pub gating: Gating,
    /// Group-limited routing: experts split into `groups`; a token keeps its `keep_groups` best.
    pub groups: u64,
    pub keep_groups: u64,
    /// Gate weights are normalised over the chosen experts, then multiplied by this.
    pub routed_scale: f64,
    /// Speed γ of the selection-bias update `b += γ·sign(mean_load − load)`.
    pub bias_speed: Schedule,
    /// Weight α of the sequence-wise balance loss.
    pub balance_alpha: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gating {
    Sigmoid,
    Softmax,
}

/// Multi-token prediction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mtp {
    pub depth: u64,
    pub share_embedding: bool,
    pub share_head: bool,
    /// λ: the MTP loss weight.
    pub loss_weight: Schedule,
}

/// A piecewise-constant value: `first` until the first change, then each change's value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub first: f64,
    pub changes: Vec<Change>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub at: Position,
    pub value: f64,
}

impl Schedule {
    pub fn constant(value: f64) -> Self {
        Schedule { first: value, changes: Vec::new() }
    }
}

/// A point in training, counted in optimizer steps or in tokens seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    Steps(u64),
    Tokens(u64),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Train {
    /// Token budget of the main pre-training run.
    pub tokens: u64,
    pub seq_len: u64,
    /// Global batch, in sequences.
    pub batch: Batch,
    /// Sequences per micro-batch on one data-parallel rank.
    pub micro_batch: u64,
    pub seed: u64,
    pub optimizer: AdamW,
    pub grad_clip: f64,
    pub lr: Vec<LrPhase>,
    /// Per-parameter-group LR multipliers (groups absent here use 1).
    pub lr_scale: Vec<(ParamGroup, f64)>,
    pub data: Data,
    pub extend: Vec<ExtendPhase>,
}

impl Train {
    /// Global batch in sequences once `tokens` have been seen (a ramp is linear in tokens).
    pub fn batch_at(&self, tokens: f64) -> f64 {
        match self.batch {
            Batch::Constant { sequences } => sequences as f64,
            Batch::Ramp { from, to, over_tokens } => {
                let done = (tokens / over_tokens.max(1) as f64).clamp(0.0, 1.0);
                from as f64 + (to as f64 - from as f64) * done
            }
        }
    }

    /// Tokens seen after `steps` optimizer steps, following the batch ramp (in closed form:
    /// during a ramp d(tokens)/d(step) = seq_len · batch(tokens), an exponential).
    pub fn tokens_at_step(&self, steps: f64) -> f64 {
        let seq = self.seq_len as f64;
        match self.batch {
            Batch::Constant { sequences } => steps * sequences as f64 * seq,
            Batch::Ramp { from, to, over_tokens } => {
                let (from, to, over) = (from as f64, to as f64, over_tokens as f64);
                let k = (to - from) / over;
                let ramp_steps = if k == 0.0 { over / (from * seq) } else { (to / from).ln() / (k * seq) };
                if steps >= ramp_steps {
                    over + (steps - ramp_steps) * to * seq
                } else if k == 0.0 {
                    steps * from * seq
                } else {
                    from / k * ((k * seq * steps).exp() - 1.0)
                }
            }
        }
    }

    /// Optimizer steps taken by the time `tokens` have been seen: the inverse of
    /// [`Train::tokens_at_step`] (closed form, fractional).
    pub fn steps_at_tokens(&self, tokens: f64) -> f64 {
        let seq = self.seq_len as f64;
        match self.batch {
            Batch::Constant { sequences } => tokens / (sequences as f64 * seq),
            Batch::Ramp { from, to, over_tokens } => {
                let (from, to, over) = (from as f64, to as f64, over_tokens as f64);
                let k = (to - from) / over;
                let ramped = tokens.min(over);
                let ramp_steps = if k == 0.0 || ramped == 0.0 {
                    ramped / (from * seq)
                } else {
                    (k * ramped / from).ln_1p() / (k * seq)
                };
                ramp_steps + (tokens - ramped) / (to * seq)
            }
        }
    }

    /// A schedule position in tokens.
    pub fn tokens_at(&self, position: Position) -> f64 {
        match position {
            Position::Tokens(t) => t as f64,
            Position::Steps(s) => self.tokens_at_step(s as f64),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Batch {
    Constant {
        sequences: u64,
    },
    /// Linear ramp in tokens seen, from `from` to `to` sequences over `over_tokens`.
    Ramp {
        from: u64,
        to: u64,
        over_tokens: u64,
    },
}

impl Batch {
    pub fn initial(&self) -> u64 {
        match *self {
            Batch::Constant { sequences } => sequences,
            Batch::Ramp { from, .. } => from,
        }
    }
    pub fn last(&self) -> u64 {
        match *self {
            Batch::Constant { sequences } => sequences,
            Batch::Ramp { to, .. } => to,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Parameter groups exempt from weight decay.
    pub no_decay: Vec<ParamGroup>,
}

/// The kinds of parameters that decay and LR multipliers refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamGroup {
    Embedding,
    Head,
    Attention,
    DenseFfn,
    SharedExperts,
    RoutedExperts,
    Router,
    Norms,
    Mtp,
}

impl ParamGroup {
    pub const ALL: [ParamGroup; 9] = [
        ParamGroup::Embedding,
        ParamGroup::Head,
        ParamGroup::Attention,
        ParamGroup::DenseFfn,
        ParamGroup::SharedExperts,
        ParamGroup::RoutedExperts,
        ParamGroup::Router,
        ParamGroup::Norms,
        ParamGroup::Mtp,
    ];
}

/// One phase of the learning-rate schedule; it starts where the previous one ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrPhase {
    pub shape: LrShape,
    /// Where the phase ends; `None` for a last phase that runs to the end of the budget.
    pub end: Option<PhaseEnd>,
    /// LR at the end of the phase (for `constant`, its value throughout).
    pub to: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrShape {
    Linear,
    Cosine,
    Constant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseEnd {
    /// The phase lasts this long.
    For(Position),
    /// The phase ends at this absolute position.
    Until(Position),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Data {
    pub sources: Vec<Source>,
    /// Several documents per sequence, no cross-document attention mask.
    pub packing: bool,
    /// Fraction of documents rearranged as Fill-in-the-Middle (Prefix-Suffix-Middle).
    pub fim_rate: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// A folder of token files prepared by `dsc data prepare` (a path relative to the working
    /// directory).
    Files { path: String, weight: f64 },
    /// dsc's built-in synthetic corpus with learnable structure.
    Synthetic { weight: f64 },
}

impl Source {
    pub fn weight(&self) -> f64 {
        match *self {
            Source::Files { weight, .. } | Source::Synthetic { weight } => weight,
        }
    }
}

/// A long-context phase after pre-training (uses the model's YaRN settings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExtendPhase {
    pub seq_len: u64,
    pub batch: u64,
    pub lr: f64,
    pub steps: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    F64,
    F32,
    Bf16,
    E4m3,
}

impl Dtype {
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F64 => 8,
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
            Dtype::E4m3 => 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Precision {
    /// Operand type of the linear-layer GEMMs (Fprop, Dgrad, Wgrad).
    pub gemm: Dtype,
    /// Activation scaling tile (rows = tokens, cols = channels), e.g. 1×128.
    pub activation_tile: [u64; 2],
    /// Weight scaling block, e.g. 128×128.
    pub weight_block: [u64; 2],
    /// Tensor-core partial sums are promoted to FP32 every this many elements of K.
    pub promotion_interval: u64,
    /// Operators kept in BF16/FP32 whatever `gemm` says.
    pub high_precision: Vec<HighPrecisionOp>,
    pub master_weights: Dtype,
    pub grads: Dtype,
    pub adam_moments: Dtype,
    /// Type of the linear layers' inputs saved for the backward pass.
    pub saved_activations: Dtype,
    /// Type of the activations sent by the MoE dispatch all-to-all.
    pub dispatch: Dtype,
    /// Type of the MoE combine all-to-all.
    pub combine: Dtype,
    pub recompute: Vec<Recompute>,
    pub ema: Option<Ema>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HighPrecisionOp {
    Embedding,
    Head,
    Gating,
    Norms,
    Attention,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    /// RMSNorm outputs are recomputed from their inputs in the backward pass.
    Rmsnorm,
    /// MLA's up-projections (q_b, kv_b) are recomputed instead of stored.
    MlaUpProj,
    /// The SwiGLU input is cached and its output recomputed.
    Swiglu,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ema {
    pub decay: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Parallel {
    pub nodes: u64,
    pub gpus_per_node: u64,
    pub gpu: Gpu,
    pub pipeline: Pipeline,
    pub expert: ExpertParallel,
    pub data: DataParallel,
    /// Streaming multiprocessors reserved for communication kernels.
    pub comm_sms: u64,
}

impl Parallel {
    pub fn gpus(&self) -> u64 {
        self.nodes * self.gpus_per_node
    }
}

/// The accelerator the plan targets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub name: String,
    pub memory_bytes: u64,
    pub sms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub schedule: PipelineSchedule,
    pub stages: u64,
    /// Explicit stage contents; empty means "balance by the cost model".
    pub layout: Vec<Vec<StagePart>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineSchedule {
    #[serde(rename = "1f1b")]
    OneFOneB,
    Zb1p,
    Dualpipe,
}

/// What a pipeline stage holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StagePart {
    Embedding,
    Layers(LayerRange),
    Head,
    Mtp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpertParallel {
    /// EP size: the routed experts of a layer are spread over this many GPUs.
    pub size: u64,
    /// A token's routed experts may live on at most this many nodes.
    pub max_nodes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataParallel {
    pub size: u64,
    /// ZeRO stage: 0 (replicated optimizer) or 1 (sharded optimizer states).
    pub zero: u64,
}
