//! The model builder: a [`Spec`] becomes the forward graph of one micro-batch of DeepSeek-V3
//! training (SPEC.md): embedding; pre-norm blocks with RMSNorm; MLA with low-rank q and kv and
//! a decoupled RoPE key shared by the heads; causal attention over packed documents; dense
//! SwiGLU layers; DeepSeekMoE (sigmoid scores, selection bias, group-limited top-k, normalised
//! gate weights × routed scale, shared experts, sequence-wise balance loss); the MTP modules
//! sharing the embedding and head; final norm, head and cross-entropy. Each distinct layer
//! kind is one function, called once per layer (and by the MTP blocks). Parameters carry
//! their Hugging Face DeepSeek-V3 names. YaRN applies when the spec's sequence is longer than
//! YaRN's original one (the context-extension phases: `--set train.seq_len=32Ki`).

use super::ir::{ConstantKind, DType, Fp8Linear, FunctionBuilder, GemmPrecision, Module, Op, V};
use dsc_lang::{Dtype, Ffn, HighPrecisionOp, Moe, ParamGroup, Spec, StagePart, Yarn};

/// How the graph computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Numerics {
    /// The spec's precision policy: FP8 GEMMs, BF16 where it says BF16.
    Policy,
    /// No low-precision rounding at all (for gradient checks in f64, and the f32 baseline).
    Exact,
}

/// A parameter (or a non-learned buffer such as the routing bias) of the model.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ParamInfo {
    /// The Hugging Face DeepSeek-V3 name; stacked routed experts use `experts.*`.
    pub name: String,
    pub shape: Vec<usize>,
    pub group: ParamGroup,
    /// Updated by the optimizer (false for the routing bias, updated by load balancing).
    pub learned: bool,
    /// Initialised as a norm scale (ones) rather than from the normal init.
    pub norm: bool,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether it stacks routed experts (split over an expert-parallel group).
    pub fn is_routed_expert(&self) -> bool {
        self.name.contains(".mlp.experts.")
    }
}

/// The forward graph of one micro-batch.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardGraph {
    pub module: Module,
    /// The function `model(params…, tokens, loss_mask, mtp_weight) -> (loss, main_loss,
    /// mtp_loss, balance_loss, load per MoE layer…)`; `tokens` is [micro_batch, seq_len +
    /// mtp_depth + 1], `loss_mask` the same shape in f32: 1 where a token counts as a label
    /// (everywhere in pre-training, on the responses in SFT), 0 elsewhere. Each loss is the mean
    /// over the labels that count.
    pub model: usize,
    pub params: Vec<ParamInfo>,
    /// Per MoE layer (main layers first, then MTP blocks): the index of its routing bias in
    /// `params`; the model's outputs from index 4 on are their expert loads, in this order.
    pub moe_biases: Vec<usize>,
    pub micro_batch: usize,
    pub seq_len: usize,
}

/// Number of leading outputs of `model` before the per-layer expert loads.
pub const LOSS_OUTPUTS: usize = 4;

pub fn build(spec: &Spec, numerics: Numerics) -> ForwardGraph {
    build_with(spec, numerics, Head::Loss)
}

/// The inference graph: `model(params…, tokens [batch, seq]) -> logits [batch · seq, vocab]`
/// of the main model (the MTP modules' parameters are arguments, unused), for `dsc forward`
/// and the Hugging Face parity check.
pub fn build_logits(spec: &Spec, numerics: Numerics) -> ForwardGraph {
    build_with(spec, numerics, Head::Logits)
}

/// What the model function returns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Head {
    /// The training losses and expert loads.
    Loss,
    /// The main model's logits.
    Logits,
}

/// What every forward graph starts with: the module with its constant tables and one function
/// per distinct FFN of the layer ranges (their indices in `layer_fns`).
struct Prelude {
    module: Module,
    cfg: Config,
    layer_fns: Vec<usize>,
}

fn prelude(spec: &Spec, numerics: Numerics, expert_ranks: usize) -> Prelude {
    let mut module = Module::default();
    let cfg = Config::new(spec, numerics, expert_ranks);
    let (frequencies, scale) = (rope_frequencies(spec), rope_scale(spec));
    let rope = |sin| ConstantKind::Rope { frequencies: frequencies.clone(), scale, sin };
    let cos = module.add_constant("rope_cos", vec![cfg.seq, cfg.rope], rope(false));
    let sin = module.add_constant("rope_sin", vec![cfg.seq, cfg.rope], rope(true));
    let tables = Tables { cos, sin };
    let mut layer_fns = Vec::new();
    for (i, range) in spec.model.ffn.iter().enumerate() {
        let f = layer_function(&module, &cfg, &tables, &range.ffn, &format!("layer{i}"));
        layer_fns.push(module.add(f));
    }
    Prelude { module, cfg, layer_fns }
}

fn build_with(spec: &Spec, numerics: Numerics, output: Head) -> ForwardGraph {
    let Prelude { mut module, cfg, layer_fns } = prelude(spec, numerics, 1);
    let mut params = Vec::new();
    let mut moe_biases = Vec::new();
    let model = 'model: {
        let mut b = FunctionBuilder::new(&module, "model");
        let m = &spec.model;
        let d = cfg.hidden;
        let embed =
            param(&mut b, &mut params, "model.embed_tokens.weight", vec![cfg.vocab, d], ParamGroup::Embedding, false);
        let mut layer_params = Vec::new();
        for layer in 0..m.layers as usize {
            let range = spec.model.ffn.iter().position(|r| r.layers.contains(layer as u64)).expect("checked ranges");
            let ps = layer_params_of(
                &mut b,
                &mut params,
                &cfg,
                &spec.model.ffn[range].ffn,
                &format!("model.layers.{layer}"),
                ParamGroup::Attention,
            );
            if let Some(bias) = ps.bias {
                moe_biases.push(bias);
            }
            layer_params.push((range, ps.values));
        }
        let final_norm = param(&mut b, &mut params, "model.norm.weight", vec![d], ParamGroup::Norms, true);
        let head = param(&mut b, &mut params, "lm_head.weight", vec![cfg.vocab, d], ParamGroup::Head, false);
        // MTP modules: their own norms, projection and block; embedding and head shared.
        let depth = m.mtp.as_ref().map_or(0, |mtp| mtp.depth as usize);
        let last_range = spec.model.ffn.len() - 1;
        let mtp_params = mtp_params_of(&mut b, &mut params, &mut moe_biases, spec, &cfg);
        let width = if output == Head::Logits { cfg.seq } else { cfg.seq + depth + 1 };
        let tokens = b.arg("tokens", vec![cfg.batch, width], DType::I32);
        let loss_mask = (output == Head::Loss).then(|| b.arg("loss_mask", vec![cfg.batch, width], DType::F32));
        // Main model.
        let input_ids = b.slice(tokens, 1, 0, cfg.seq);
        let mut h = b.gather(embed, input_ids);
        let mut balance = b.constant(0.0);
        let mut loads = Vec::new();
        for (range, values) in &layer_params {
            let mut args = vec![h];
            args.extend(values);
            let out = b.call(layer_fns[*range], args);
            h = out[0];
            if out.len() == 3 {
                balance = b.add(balance, out[1]);
                loads.push(out[2]);
            }
        }
        if output == Head::Logits {
            let logits = head_logits(&mut b, &cfg, h, final_norm, head);
            b.output("logits", logits);
            break 'model b.finish();
        }
        let loss_mask = loss_mask.expect("a loss graph has a loss mask");
        let labels = b.slice(tokens, 1, 1, cfg.seq + 1);
        let counted = b.slice(loss_mask, 1, 1, cfg.seq + 1);
        let main_loss = head_loss(&mut b, &cfg, h, final_norm, head, labels, counted);
        let mut moe_terms = MoeTerms { balance, loads };
        let embedded = |b: &mut FunctionBuilder, k: usize| {
            let ids = b.slice(tokens, 1, k, cfg.seq + k);
            b.gather(embed, ids)
        };
        let mtp = Mtp { cfg: &cfg, layer_fn: layer_fns[last_range], params: &mtp_params, head, tokens, loss_mask };
        let mtp_loss = mtp.loss(&mut b, h, embedded, &mut moe_terms);
        let MoeTerms { balance, loads } = moe_terms;
        let mtp_weight = b.arg("mtp_weight", vec![], DType::F32);
        let weighted = b.mul(mtp_weight, mtp_loss);
        let main_and_mtp = b.add(main_loss, weighted);
        let loss = b.add(main_and_mtp, balance);
        b.output("loss", loss);
        b.output("main_loss", main_loss);
        b.output("mtp_loss", mtp_loss);
        b.output("balance_loss", balance);
        for (i, load) in loads.into_iter().enumerate() {
            b.output(format!("load{i}"), load);
        }
        b.finish()
    };
    let model = module.add(model);
    ForwardGraph { module, model, params, moe_biases, micro_batch: cfg.batch, seq_len: cfg.seq }
}

/// One MTP depth's own parameters: enorm, hnorm, eh_proj, its block's, and its head norm.
type MtpParams = (V, V, V, Vec<V>, V);

/// Declares the MTP modules' parameters (pushing their routing biases to `moe_biases`).
fn mtp_params_of(
    b: &mut FunctionBuilder,
    params: &mut Vec<ParamInfo>,
    moe_biases: &mut Vec<usize>,
    spec: &Spec,
    cfg: &Config,
) -> Vec<MtpParams> {
    let m = &spec.model;
    let d = cfg.hidden;
    let depth = m.mtp.as_ref().map_or(0, |mtp| mtp.depth as usize);
    let last_range = spec.model.ffn.len() - 1;
    (0..depth)
        .map(|k| {
            let prefix = format!("model.layers.{}", m.layers as usize + k);
            let enorm = param(b, params, &format!("{prefix}.enorm.weight"), vec![d], ParamGroup::Mtp, true);
            let hnorm = param(b, params, &format!("{prefix}.hnorm.weight"), vec![d], ParamGroup::Mtp, true);
            let eh_proj = param(b, params, &format!("{prefix}.eh_proj.weight"), vec![d, 2 * d], ParamGroup::Mtp, false);
            let ps = layer_params_of(b, params, cfg, &spec.model.ffn[last_range].ffn, &prefix, ParamGroup::Mtp);
            if let Some(bias) = ps.bias {
                moe_biases.push(bias);
            }
            let norm = param(b, params, &format!("{prefix}.shared_head.norm.weight"), vec![d], ParamGroup::Mtp, true);
            (enorm, hnorm, eh_proj, ps.values, norm)
        })
        .collect()
}

/// The MoE layers' balance-loss sum and expert loads, as the blocks add them.
struct MoeTerms {
    balance: V,
    loads: Vec<V>,
}

/// The MTP modules on top of the main model: what they need besides the hidden state.
struct Mtp<'a> {
    cfg: &'a Config,
    /// The function of their blocks (the last layer range's FFN).
    layer_fn: usize,
    params: &'a [MtpParams],
    head: V,
    tokens: V,
    loss_mask: V,
}

impl Mtp<'_> {
    /// Their mean loss (0 without MTP): depth k predicts token i + k + 1 from h^{k−1} and
    /// `embedded(k)`, the embedding of token i + k. Their blocks' MoE terms go to `moe`.
    fn loss(
        &self,
        b: &mut FunctionBuilder,
        mut h: V,
        mut embedded: impl FnMut(&mut FunctionBuilder, usize) -> V,
        moe: &mut MoeTerms,
    ) -> V {
        let cfg = self.cfg;
        let mut total = b.constant(0.0);
        for (k, (enorm, hnorm, eh_proj, values, norm)) in self.params.iter().enumerate() {
            let k = k + 1;
            let emb = embedded(b, k);
            let e = rms_norm(b, emb, *enorm, cfg.eps);
            let hn = rms_norm(b, h, *hnorm, cfg.eps);
            let cat = b.concat(vec![e, hn], 2);
            let projected = b.linear(cat, *eh_proj, cfg.linear);
            let mut args = vec![projected];
            args.extend(values);
            let out = b.call(self.layer_fn, args);
            h = out[0];
            if out.len() == 3 {
                moe.balance = b.add(moe.balance, out[1]);
                moe.loads.push(out[2]);
            }
            let labels = b.slice(self.tokens, 1, k + 1, cfg.seq + k + 1);
            let counted = b.slice(self.loss_mask, 1, k + 1, cfg.seq + k + 1);
            let loss = head_loss(b, cfg, h, *norm, self.head, labels, counted);
            total = b.add(total, loss);
        }
        let depth = self.params.len();
        if depth > 0 {
            b.scale(total, 1.0 / depth as f64)
        } else {
            total
        }
    }
}

/// The forward graph of one pipeline stage.
#[derive(Clone, Debug, PartialEq)]
pub struct StageGraph {
    pub module: Module,
    /// `stage(params…, [carry], tokens, loss_mask, mtp_weight) -> (carry' | loss, balance_loss,
    /// [main_loss, mtp_loss], load…)`: the last stage reports its loss's two parts too, and
    /// every stage the expert load of each of its MoE blocks (layers, then MTP's), in model order.
    /// The carry [micro_batch, seq_len, hidden · (1 + mtp_depth)] is the hidden state followed
    /// by the embeddings of the tokens each MTP depth reads (the first stage makes it from
    /// `tokens`; the MTP modules on the last stage use those embeddings, so the embedding table
    /// stays on the first stage and its gradient comes back with the carry's). The last stage
    /// returns the loss of the main model and MTP rather than a carry; `balance_loss` sums the
    /// stage's MoE terms (the model's loss is the last stage's loss plus every stage's balance
    /// loss). `tokens` and `loss_mask` are [micro_batch, seq_len + mtp_depth + 1].
    pub forward: usize,
    /// The stage's parameters, named as in the whole model.
    pub params: Vec<ParamInfo>,
    pub first: bool,
    pub last: bool,
}

/// The forward graph of the stage holding `parts` (contiguous, in model order), on one rank of
/// an expert-parallel group of `expert_ranks`: its MoE layers hold that share of the routed
/// experts and exchange the tokens with the group's other members (1: all experts, no
/// exchange).
pub fn build_stage(spec: &Spec, numerics: Numerics, parts: &[StagePart], expert_ranks: usize) -> StageGraph {
    let Prelude { mut module, cfg, layer_fns } = prelude(spec, numerics, expert_ranks);
    let (first, last) = (parts.contains(&StagePart::Embedding), parts.contains(&StagePart::Head));
    let depth = spec.model.mtp.as_ref().map_or(0, |mtp| mtp.depth as usize);
    let mut params = Vec::new();
    let mut b = FunctionBuilder::new(&module, "stage");
    let d = cfg.hidden;
    let embed = first.then(|| {
        param(&mut b, &mut params, "model.embed_tokens.weight", vec![cfg.vocab, d], ParamGroup::Embedding, false)
    });
    let mut layer_params = Vec::new();
    for part in parts {
        let StagePart::Layers(layers) = part else { continue };
        for layer in layers.start..layers.end {
            let range = spec.model.ffn.iter().position(|r| r.layers.contains(layer)).expect("checked ranges");
            let prefix = format!("model.layers.{layer}");
            let ffn = &spec.model.ffn[range].ffn;
            let ps = layer_params_of(&mut b, &mut params, &cfg, ffn, &prefix, ParamGroup::Attention);
            layer_params.push((range, ps.values));
        }
    }
    let head = last.then(|| {
        let norm = param(&mut b, &mut params, "model.norm.weight", vec![d], ParamGroup::Norms, true);
        (norm, param(&mut b, &mut params, "lm_head.weight", vec![cfg.vocab, d], ParamGroup::Head, false))
    });
    let mtp_params = if parts.contains(&StagePart::Mtp) {
        mtp_params_of(&mut b, &mut params, &mut Vec::new(), spec, &cfg)
    } else {
        Vec::new()
    };
    let carry_in = (!first).then(|| b.arg("carry", vec![cfg.batch, cfg.seq, d * (1 + depth)], DType::F32));
    let tokens = b.arg("tokens", vec![cfg.batch, cfg.seq + depth + 1], DType::I32);
    let loss_mask = b.arg("loss_mask", vec![cfg.batch, cfg.seq + depth + 1], DType::F32);
    let mtp_weight = b.arg("mtp_weight", vec![], DType::F32);
    // The hidden state and the embeddings of the tokens MTP depths 1..=depth read.
    let (mut h, embedded): (V, Vec<V>) = match (embed, carry_in) {
        (Some(embed), _) => {
            let mut lookups = (0..=depth).map(|k| {
                let ids = b.slice(tokens, 1, k, cfg.seq + k);
                b.gather(embed, ids)
            });
            let h = lookups.next().expect("the hidden state");
            (h, lookups.collect())
        }
        (None, Some(carry)) => {
            let h = b.slice(carry, 2, 0, d);
            (h, (1..=depth).map(|k| b.slice(carry, 2, k * d, (k + 1) * d)).collect())
        }
        (None, None) => unreachable!("a stage without the embedding takes the carry"),
    };
    let mut moe = MoeTerms { balance: b.constant(0.0), loads: Vec::new() };
    for (range, values) in layer_params {
        let mut args = vec![h];
        args.extend(values);
        let out = b.call(layer_fns[range], args);
        h = out[0];
        if out.len() == 3 {
            moe.balance = b.add(moe.balance, out[1]);
            moe.loads.push(out[2]);
        }
    }
    let mut parts = Vec::new();
    match head {
        Some((norm, head)) => {
            let labels = b.slice(tokens, 1, 1, cfg.seq + 1);
            let counted = b.slice(loss_mask, 1, 1, cfg.seq + 1);
            let main_loss = head_loss(&mut b, &cfg, h, norm, head, labels, counted);
            let last_range = spec.model.ffn.len() - 1;
            let mtp = Mtp { cfg: &cfg, layer_fn: layer_fns[last_range], params: &mtp_params, head, tokens, loss_mask };
            let mtp_loss = mtp.loss(&mut b, h, |_, k| embedded[k - 1], &mut moe);
            let weighted = b.mul(mtp_weight, mtp_loss);
            let loss = b.add(main_loss, weighted);
            b.output("loss", loss);
            parts = vec![("main_loss", main_loss), ("mtp_loss", mtp_loss)];
        }
        None => {
            let mut carry = vec![h];
            carry.extend(embedded);
            let carry = if carry.len() == 1 { h } else { b.concat(carry, 2) };
            b.output("carry", carry);
        }
    }
    b.output("balance_loss", moe.balance);
    for (name, part) in parts {
        b.output(name, part);
    }
    for load in moe.loads {
        b.output("load", load);
    }
    let forward = module.add(b.finish());
    StageGraph { module, forward, params, first, last }
}

/// Sizes and numerics the builder needs, read once from the spec.
struct Config {
    vocab: usize,
    hidden: usize,
    batch: usize,
    seq: usize,
    eps: f64,
    heads: usize,
    q_rank: usize,
    kv_rank: usize,
    nope: usize,
    rope: usize,
    v: usize,
    softmax_scale: f64,
    /// The linear layers' GEMMs (the experts' too).
    linear: GemmPrecision,
    /// The head's: in BF16 where the recipe keeps it in high precision.
    head: GemmPrecision,
    /// Attention kept in BF16 (its inputs and output rounded to BF16).
    attention_bf16: bool,
    /// The MoE combine in BF16.
    combine_bf16: bool,
    /// The members of an expert-parallel group, each holding 1/`expert_ranks` of the routed
    /// experts.
    expert_ranks: usize,
}

impl Config {
    fn new(spec: &Spec, numerics: Numerics, expert_ranks: usize) -> Self {
        let a = &spec.model.attention;
        let p = &spec.precision;
        let policy = numerics == Numerics::Policy;
        let linear = match p.gemm {
            _ if !policy => GemmPrecision::F32,
            Dtype::E4m3 => GemmPrecision::Fp8(Fp8Linear {
                tile: p.activation_tile[1] as usize,
                block: p.weight_block[0] as usize,
                promote: p.promotion_interval as usize,
            }),
            Dtype::Bf16 => GemmPrecision::Bf16,
            Dtype::F32 | Dtype::F64 => GemmPrecision::F32,
        };
        let head = match linear {
            GemmPrecision::Fp8(_) if p.high_precision.contains(&HighPrecisionOp::Head) => GemmPrecision::Bf16,
            other => other,
        };
        Config {
            vocab: spec.model.vocab as usize,
            hidden: spec.model.hidden as usize,
            batch: spec.train.micro_batch as usize,
            seq: spec.train.seq_len as usize,
            eps: spec.model.norm_eps,
            heads: a.heads as usize,
            q_rank: a.q_rank as usize,
            kv_rank: a.kv_rank as usize,
            nope: a.qk_nope_dim as usize,
            rope: a.qk_rope_dim as usize,
            v: a.v_dim as usize,
            softmax_scale: softmax_scale(spec),
            linear,
            head,
            attention_bf16: policy && p.gemm != Dtype::F32 && p.high_precision.contains(&HighPrecisionOp::Attention),
            combine_bf16: policy && p.combine == Dtype::Bf16,
            expert_ranks,
        }
    }
}

struct Tables {
    cos: usize,
    sin: usize,
}

fn param(
    b: &mut FunctionBuilder,
    params: &mut Vec<ParamInfo>,
    name: &str,
    shape: Vec<usize>,
    group: ParamGroup,
    norm: bool,
) -> V {
    params.push(ParamInfo { name: name.to_string(), shape: shape.clone(), group, learned: true, norm });
    b.arg(name, shape, DType::F32)
}

/// The parameters of one layer, in the order its function takes them.
struct LayerParams {
    values: Vec<V>,
    /// Index in the parameter list of the routing bias, for an MoE layer.
    bias: Option<usize>,
}

/// The parameter shapes of a layer, in its function's argument order, with their names
/// relative to the layer (`self_attn.q_a_proj.weight`) and whether they are norm scales.
fn layer_param_shapes(c: &Config, ffn: &Ffn) -> Vec<(&'static str, Vec<usize>, ParamGroup, bool)> {
    let (d, h) = (c.hidden, c.heads);
    let mut shapes = vec![
        ("input_layernorm.weight", vec![d], ParamGroup::Norms, true),
        ("self_attn.q_a_proj.weight", vec![c.q_rank, d], ParamGroup::Attention, false),
        ("self_attn.q_a_layernorm.weight", vec![c.q_rank], ParamGroup::Attention, true),
        ("self_attn.q_b_proj.weight", vec![h * (c.nope + c.rope), c.q_rank], ParamGroup::Attention, false),
        ("self_attn.kv_a_proj_with_mqa.weight", vec![c.kv_rank + c.rope, d], ParamGroup::Attention, false),
        ("self_attn.kv_a_layernorm.weight", vec![c.kv_rank], ParamGroup::Attention, true),
        ("self_attn.kv_b_proj.weight", vec![h * (c.nope + c.v), c.kv_rank], ParamGroup::Attention, false),
        ("self_attn.o_proj.weight", vec![d, h * c.v], ParamGroup::Attention, false),
        ("post_attention_layernorm.weight", vec![d], ParamGroup::Norms, true),
    ];
    match ffn {
        Ffn::Dense { intermediate } => {
            let i = *intermediate as usize;
            shapes.push(("mlp.gate_proj.weight", vec![i, d], ParamGroup::DenseFfn, false));
            shapes.push(("mlp.up_proj.weight", vec![i, d], ParamGroup::DenseFfn, false));
            shapes.push(("mlp.down_proj.weight", vec![d, i], ParamGroup::DenseFfn, false));
        }
        Ffn::Moe(m) => {
            let (e, i) = (m.routed_experts as usize, m.intermediate as usize);
            let held = e / c.expert_ranks;
            shapes.push(("mlp.gate.weight", vec![e, d], ParamGroup::Router, false));
            shapes.push(("mlp.gate.e_score_correction_bias", vec![e], ParamGroup::Router, false));
            shapes.push(("mlp.experts.gate_proj.weight", vec![held, i, d], ParamGroup::RoutedExperts, false));
            shapes.push(("mlp.experts.up_proj.weight", vec![held, i, d], ParamGroup::RoutedExperts, false));
            shapes.push(("mlp.experts.down_proj.weight", vec![held, d, i], ParamGroup::RoutedExperts, false));
            if m.shared_experts > 0 {
                let s = i * m.shared_experts as usize;
                shapes.push(("mlp.shared_experts.gate_proj.weight", vec![s, d], ParamGroup::SharedExperts, false));
                shapes.push(("mlp.shared_experts.up_proj.weight", vec![s, d], ParamGroup::SharedExperts, false));
                shapes.push(("mlp.shared_experts.down_proj.weight", vec![d, s], ParamGroup::SharedExperts, false));
            }
        }
    }
    shapes
}

fn layer_params_of(
    b: &mut FunctionBuilder,
    params: &mut Vec<ParamInfo>,
    c: &Config,
    ffn: &Ffn,
    prefix: &str,
    attention_group: ParamGroup,
) -> LayerParams {
    let mut bias = None;
    let values = layer_param_shapes(c, ffn)
        .into_iter()
        .map(|(name, shape, group, norm)| {
            // An MTP block's parameters all belong to the MTP group.
            let group = if attention_group == ParamGroup::Mtp { ParamGroup::Mtp } else { group };
            let v = param(b, params, &format!("{prefix}.{name}"), shape, group, norm);
            if name.ends_with("e_score_correction_bias") {
                params.last_mut().expect("just pushed").learned = false;
                bias = Some(params.len() - 1);
            }
            v
        })
        .collect();
    LayerParams { values, bias }
}

/// `layer(h, params…) -> (h', [balance_loss, load])`: one pre-norm transformer block.
fn layer_function(module: &Module, c: &Config, t: &Tables, ffn: &Ffn, name: &str) -> super::ir::Function {
    let mut b = FunctionBuilder::new(module, name);
    let h = b.arg("h", vec![c.batch, c.seq, c.hidden], DType::F32);
    let p: Vec<V> = layer_param_shapes(c, ffn).into_iter().map(|(n, s, _, _)| b.arg(n, s, DType::F32)).collect();
    let x = rms_norm(&mut b, h, p[0], c.eps);
    let attn = attention(&mut b, c, t, x, &p[1..8]);
    let h = b.add(h, attn);
    let x = rms_norm(&mut b, h, p[8], c.eps);
    match ffn {
        Ffn::Dense { .. } => {
            let y = swiglu(&mut b, c, x, p[9], p[10], p[11]);
            let out = b.add(h, y);
            b.output("h", out);
        }
        Ffn::Moe(m) => {
            let (y, balance, load) = moe(&mut b, c, m, x, &p[9..]);
            let out = b.add(h, y);
            b.output("h", out);
            b.output("balance_loss", balance);
            b.output("load", load);
        }
    }
    b.finish()
}

/// RMSNorm over the last axis: x · rsqrt(mean(x²) + eps) · w.
pub fn rms_norm(b: &mut FunctionBuilder, x: V, w: V, eps: f64) -> V {
    let last = b.shape(x).len() - 1;
    let sq = b.unary(Op::Square, x);
    let ms = b.mean(sq, last, true);
    let eps = b.constant(eps);
    let var = b.add(ms, eps);
    let inv = b.unary(Op::Rsqrt, var);
    let normed = b.mul(x, inv);
    b.mul(normed, w)
}

/// Multi-head latent attention on normalised x [batch, seq, hidden]; `p` = q_a, q_a_norm,
/// q_b, kv_a, kv_a_norm, kv_b, o_proj.
fn attention(b: &mut FunctionBuilder, c: &Config, t: &Tables, x: V, p: &[V]) -> V {
    let (bs, s, h) = (c.batch, c.seq, c.heads);
    let dq = c.nope + c.rope;
    let q_latent = b.linear(x, p[0], c.linear);
    let q_latent = rms_norm(b, q_latent, p[1], c.eps);
    let q = b.linear(q_latent, p[2], c.linear);
    let q = b.reshape(q, vec![bs, s, h, dq]);
    let q_nope = b.slice(q, 3, 0, c.nope);
    let q_pe = b.slice(q, 3, c.nope, dq);
    let kv = b.linear(x, p[3], c.linear);
    let kv_latent = b.slice(kv, 2, 0, c.kv_rank);
    let k_pe = b.slice(kv, 2, c.kv_rank, c.kv_rank + c.rope);
    let kv_latent = rms_norm(b, kv_latent, p[4], c.eps);
    let kv = b.linear(kv_latent, p[5], c.linear);
    let kv = b.reshape(kv, vec![bs, s, h, c.nope + c.v]);
    let k_nope = b.slice(kv, 3, 0, c.nope);
    let v = b.slice(kv, 3, c.nope, c.nope + c.v);
    // Decoupled RoPE: one key of `rope` dims shared by all heads.
    let q_pe = rope(b, q_pe, t.cos, t.sin);
    let k_pe = b.reshape(k_pe, vec![bs, s, 1, c.rope]);
    let k_pe = rope(b, k_pe, t.cos, t.sin);
    let k_pe = b.broadcast_to(k_pe, vec![bs, s, h, c.rope]);
    let q = b.concat(vec![q_nope, q_pe], 3);
    let k = b.concat(vec![k_nope, k_pe], 3);
    // In BF16 attention its inputs are rounded where they are made (stored in half the bytes
    // for the kernels that stage them).
    let [q, k, v] = [q, k, v].map(|x| if c.attention_bf16 { b.cast(x, DType::Bf16) } else { x });
    let (o, _lse) = b.attention(q, k, v, c.softmax_scale, c.attention_bf16);
    let o = if c.attention_bf16 { b.cast(o, DType::Bf16) } else { o };
    let o = b.reshape(o, vec![bs, s, h * c.v]);
    b.linear(o, p[6], c.linear)
}

/// RoPE in DeepSeek-V3's layout on x [batch, seq, heads, rope]: the interleaved pairs are
/// first gathered into halves, then rotated: x·cos + rotate_half(x)·sin, with the module's
/// [seq, rope] tables `cos` and `sin`.
pub fn rope(b: &mut FunctionBuilder, x: V, cos: usize, sin: usize) -> V {
    let shape = b.shape(x).clone();
    let (seq, rope) = (shape[1], shape[3]);
    let half = rope / 2;
    let mut pairs = shape.clone();
    pairs.pop();
    pairs.extend([half, 2]);
    let x = b.reshape(x, pairs);
    let x = b.transpose(x, vec![0, 1, 2, 4, 3]);
    let x = b.reshape(x, shape.clone());
    let x1 = b.slice(x, 3, 0, half);
    let x2 = b.slice(x, 3, half, rope);
    let neg_x2 = b.unary(Op::Neg, x2);
    let rotated = b.concat(vec![neg_x2, x1], 3);
    let cos = b.table(cos);
    let cos = b.reshape(cos, vec![seq, 1, rope]);
    let sin = b.table(sin);
    let sin = b.reshape(sin, vec![seq, 1, rope]);
    let a = b.mul(x, cos);
    let r = b.mul(rotated, sin);
    b.add(a, r)
}

/// Softmax over the last axis, stabilised by the (gradient-free) row maximum.
pub fn softmax(b: &mut FunctionBuilder, x: V) -> V {
    let last = b.shape(x).len() - 1;
    let m = b.max(x, last, true);
    let m = b.stop_gradient(m);
    let shifted = b.sub(x, m);
    let e = b.unary(Op::Exp, shifted);
    let z = b.sum(e, last, true);
    b.div(e, z)
}

/// SwiGLU MLP: down(silu(gate(x)) · up(x)).
fn swiglu(b: &mut FunctionBuilder, c: &Config, x: V, gate: V, up: V, down: V) -> V {
    let g = b.linear(x, gate, c.linear);
    let u = b.linear(x, up, c.linear);
    let hidden = swiglu_gate(b, g, u);
    b.linear(hidden, down, c.linear)
}

/// SwiGLU's gate: silu(g) · u.
pub fn swiglu_gate(b: &mut FunctionBuilder, g: V, u: V) -> V {
    let a = b.unary(Op::Silu, g);
    b.mul(a, u)
}

/// DeepSeekMoE on normalised x [batch, seq, hidden]; `p` = gate, bias, experts' gate, up and
/// down, then the shared experts' gate, up and down. Returns (output, balance loss, load).
fn moe(b: &mut FunctionBuilder, c: &Config, m: &Moe, x: V, p: &[V]) -> (V, V, V) {
    let (tokens, d) = (c.batch * c.seq, c.hidden);
    let (e, k) = (m.routed_experts as usize, m.top_k as usize);
    let flat = b.reshape(x, vec![tokens, d]);
    let logits = b.matmul(flat, p[0], false, true, None);
    let scores = match m.gating {
        dsc_lang::Gating::Sigmoid => b.unary(Op::Sigmoid, logits),
        dsc_lang::Gating::Softmax => softmax(b, logits),
    };
    let chosen = route(b, m, scores, p[1], tokens);
    let gates = gate_weights(b, m, scores, chosen);
    // Dispatch to the experts in expert order, run them as grouped GEMMs, combine.
    let order = b.push(Op::SortByExpert { experts: e }, vec![chosen], vec![tokens * k], DType::I32);
    let offsets = b.push(Op::ExpertOffsets { experts: e }, vec![chosen], vec![e + 1], DType::I32);
    let xs = b.push(Op::Permute { k }, vec![flat, order], vec![tokens * k, d], DType::F32);
    let ys = experts(b, c, m, xs, offsets, &p[2..5]);
    let ys = if c.combine_bf16 { b.cast(ys, DType::Bf16) } else { ys };
    let positions = b.push(Op::InvertOrder, vec![order], vec![tokens * k], DType::I32);
    let routed = b.push(Op::Unpermute { k }, vec![ys, positions, gates], vec![tokens, d], DType::F32);
    let out = if m.shared_experts > 0 {
        let shared = swiglu(b, c, flat, p[5], p[6], p[7]);
        b.add(routed, shared)
    } else {
        routed
    };
    let out = b.reshape(out, vec![c.batch, c.seq, d]);
    let (balance, load) = balance_loss(b, m, c.batch, c.seq, scores, chosen);
    (out, balance, load)
}

/// The routed experts on their rows `xs` [r, d] (sorted by expert at `offsets`), as grouped
/// SwiGLU GEMMs with `w` = their gate, up and down weights. Under expert parallelism the rows
/// go to the group member holding their expert and come back: the all-to-all dispatch and
/// combine around the GEMMs.
fn experts(b: &mut FunctionBuilder, c: &Config, m: &Moe, xs: V, offsets: V, w: &[V]) -> V {
    let (ranks, rows, d) = (c.expert_ranks, b.shape(xs)[0], c.hidden);
    let held = m.routed_experts as usize / ranks;
    let (local, local_offsets, counts) = if ranks > 1 {
        let counts = b.push(Op::ExchangeCounts { ranks }, vec![offsets], vec![ranks, held], DType::I32);
        let local_offsets = b.push(Op::ReceivedOffsets, vec![counts], vec![held + 1], DType::I32);
        let local = b.push(Op::Dispatch { ranks }, vec![xs, offsets, counts], vec![ranks * rows, d], DType::F32);
        (local, local_offsets, Some(counts))
    } else {
        (xs, offsets, None)
    };
    let local_rows = b.shape(local)[0];
    let inter = m.intermediate as usize;
    let grouped = |b: &mut FunctionBuilder, x: V, w: V, n: usize| {
        let (x, w, fp8) = b.gemm_operands(x, w, c.linear);
        b.push(Op::GroupedMatMul { tb: true, fp8 }, vec![x, w, local_offsets], vec![local_rows, n], DType::F32)
    };
    let g = grouped(b, local, w[0], inter);
    let u = grouped(b, local, w[1], inter);
    let hidden = swiglu_gate(b, g, u);
    let ys = grouped(b, hidden, w[2], d);
    match counts {
        Some(counts) => b.push(Op::Combine { ranks }, vec![ys, offsets, counts], vec![rows, d], DType::F32),
        None => ys,
    }
}

/// Gate weights: the unbiased scores of the chosen experts, normalised to sum 1, times the
/// routed scale.
pub fn gate_weights(b: &mut FunctionBuilder, m: &Moe, scores: V, chosen: V) -> V {
    let picked = b.take_along(scores, chosen);
    let total = b.sum(picked, 1, true);
    let normalised = b.div(picked, total);
    b.scale(normalised, m.routed_scale)
}

/// Group-limited top-k on biased scores: a group's score is the sum of its two best biased
/// scores; the `keep_groups` best groups stay; the top-k experts among them are chosen. The
/// bias affects the choice only; no gradient passes through it.
pub fn route(b: &mut FunctionBuilder, m: &Moe, scores: V, bias: V, tokens: usize) -> V {
    let (e, groups, keep) = (m.routed_experts as usize, m.groups as usize, m.keep_groups as usize);
    let biased = b.add(scores, bias);
    let biased = b.stop_gradient(biased);
    let candidates = if groups > 1 && keep < groups {
        let per_group = e / groups;
        let grouped = b.reshape(biased, vec![tokens, groups, per_group]);
        let best_two = b.top_k(grouped, 2);
        let best_two = b.take_along(grouped, best_two);
        let group_scores = b.sum(best_two, 2, false);
        let kept = b.top_k(group_scores, keep);
        let one = b.constant(1.0);
        let ones = b.broadcast_to(one, vec![tokens, keep]);
        let group_mask = b.push(Op::PutAlong { n: groups }, vec![kept, ones], vec![tokens, groups], DType::F32);
        let group_mask = b.reshape(group_mask, vec![tokens, groups, 1]);
        let mask = b.broadcast_to(group_mask, vec![tokens, groups, per_group]);
        let mask = b.reshape(mask, vec![tokens, e]);
        // Experts of dropped groups sink below any real score.
        let one = b.constant(1.0);
        let dropped = b.sub(one, mask);
        let penalty = b.scale(dropped, 1e30);
        b.sub(biased, penalty)
    } else {
        biased
    };
    b.top_k(candidates, m.top_k as usize)
}

/// Sequence-wise balance loss α Σᵢ fᵢ Pᵢ averaged over the sequences, with
/// fᵢ = E/(K·T) · (tokens choosing i) and Pᵢ = mean over tokens of the scores normalised over
/// all experts; and the expert load (tokens per expert) of the micro-batch. `scores` and
/// `chosen` are [batch · seq, experts] and [batch · seq, top_k].
pub fn balance_loss(b: &mut FunctionBuilder, m: &Moe, batch: usize, seq: usize, scores: V, chosen: V) -> (V, V) {
    let (e, k, s) = (m.routed_experts as usize, m.top_k as usize, seq);
    let per_sequence = b.reshape(chosen, vec![batch, s * k]);
    let counts = b.push(Op::Count { bins: e }, vec![per_sequence], vec![batch, e], DType::F32);
    let load = b.sum(counts, 0, false);
    let f = b.scale(counts, e as f64 / (k * s) as f64);
    let scores = b.reshape(scores, vec![batch, s, e]);
    let total = b.sum(scores, 2, true);
    let normalised = b.div(scores, total);
    let p = b.mean(normalised, 1, false);
    let fp = b.mul(f, p);
    let per_seq = b.sum(fp, 1, false);
    let mean = b.mean(per_seq, 0, false);
    (b.scale(mean, m.balance_alpha), load)
}

/// RMSNorm and the head (in BF16 or FP32): logits [batch · seq, vocab].
fn head_logits(b: &mut FunctionBuilder, c: &Config, h: V, norm: V, head: V) -> V {
    let x = rms_norm(b, h, norm, c.eps);
    let flat = b.reshape(x, vec![c.batch * c.seq, c.hidden]);
    b.linear(flat, head, c.head)
}

/// The logits and the mean cross-entropy against the `labels` whose `mask` is 1 (0 when none
/// is).
fn head_loss(b: &mut FunctionBuilder, c: &Config, h: V, norm: V, head: V, labels: V, mask: V) -> V {
    let tokens = c.batch * c.seq;
    let logits = head_logits(b, c, h, norm, head);
    let labels = b.reshape(labels, vec![tokens, 1]);
    let nll = cross_entropy(b, logits, labels);
    let mask = b.reshape(mask, vec![tokens, 1]);
    let counted = b.mul(nll, mask);
    let total = b.sum_all(counted);
    let count = b.sum_all(mask);
    let one = b.constant(1.0);
    let count = b.binary(Op::Maximum, count, one);
    b.div(total, count)
}

/// Each row's cross-entropy against its label, [rows, 1] from logits [rows, n] and labels
/// [rows, 1]: log Σ e^(x − m) − (x[label] − m), m the row's max (a constant to the gradient).
pub fn cross_entropy(b: &mut FunctionBuilder, logits: V, labels: V) -> V {
    let m = b.max(logits, 1, true);
    let m = b.stop_gradient(m);
    let shifted = b.sub(logits, m);
    let e = b.unary(Op::Exp, shifted);
    let z = b.sum(e, 1, true);
    let log_z = b.unary(Op::Log, z);
    let picked = b.take_along(shifted, labels);
    b.sub(log_z, picked)
}

/// YaRN's settings when it applies: in context extension, when the sequence is longer than
/// the one the model was pre-trained at.
fn active_yarn(spec: &Spec) -> Option<&Yarn> {
    spec.model.attention.yarn.as_ref().filter(|y| spec.train.seq_len > y.original_seq)
}

/// YaRN's attention temperature: 0.1·m·ln(factor) + 1 (1 when not extending).
fn yarn_mscale(factor: f64, m: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m * factor.ln() + 1.0
    }
}

/// The rotary frequencies of the `rope / 2` pairs: θ^(−2i/rope), or under YaRN a blend that
/// keeps the high frequencies (more than `beta_fast` rotations over the original length),
/// divides the low ones (fewer than `beta_slow`) by the factor, and ramps linearly between.
pub fn rope_frequencies(spec: &Spec) -> Vec<f64> {
    let a = &spec.model.attention;
    let rope = a.qk_rope_dim as f64;
    let extrapolated: Vec<f64> =
        (0..a.qk_rope_dim as usize / 2).map(|i| a.rope_theta.powf(-(2.0 * i as f64) / rope)).collect();
    let Some(y) = active_yarn(spec) else { return extrapolated };
    // The pair index at which a frequency makes `rotations` turns over the original length.
    let pair_for = |rotations: f64| {
        rope * (y.original_seq as f64 / (rotations * std::f64::consts::TAU)).ln() / (2.0 * a.rope_theta.ln())
    };
    let low = pair_for(y.beta_fast).floor().max(0.0);
    let high = pair_for(y.beta_slow).ceil().min(rope - 1.0);
    let high = if high == low { high + 0.001 } else { high };
    extrapolated
        .iter()
        .enumerate()
        .map(|(i, &f)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            f / y.factor * ramp + f * (1.0 - ramp)
        })
        .collect()
}

/// The softmax scale 1/√(qk dim), times YaRN's mscale² when extending.
fn softmax_scale(spec: &Spec) -> f64 {
    let a = &spec.model.attention;
    let base = 1.0 / ((a.qk_nope_dim + a.qk_rope_dim) as f64).sqrt();
    active_yarn(spec).map_or(base, |y| base * yarn_mscale(y.factor, y.mscale_all_dim).powi(2))
}

/// YaRN's scaling of the cos/sin tables (the mscale ratio), 1 when not extending.
fn rope_scale(spec: &Spec) -> f64 {
    active_yarn(spec).map_or(1.0, |y| yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(overrides: &[&str]) -> Spec {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3.dsc");
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        dsc_lang::load(&path, &overrides).checked_spec().cloned().expect("V3 checks")
    }

    #[test]
    fn yarn_applies_only_when_extending() {
        let base = v3(&[]);
        let extended = v3(&["train.seq_len=32Ki", "train.extend=[]"]);
        let plain = rope_frequencies(&base);
        let yarn = rope_frequencies(&extended);
        // θ = 10000 over 64 dims: pair i turns at 10000^(−i/32).
        assert_eq!(plain[1], 10000f64.powf(-1.0 / 32.0));
        // Correction range for factor 40, original 4096, β 32 / 1: pairs 10 (⌊10.3⌋) to 23
        // (⌈22.6⌉). Below it the frequencies stay, above it they are divided by 40.
        assert_eq!(yarn[..11], plain[..11]);
        for i in 23..32 {
            assert!((yarn[i] - plain[i] / 40.0).abs() < 1e-18 * plain[i].max(1.0), "pair {i}");
        }
        let ramp = (16.0 - 10.0) / (23.0 - 10.0);
        assert!((yarn[16] - (plain[16] / 40.0 * ramp + plain[16] * (1.0 - ramp))).abs() < 1e-15);
        // The softmax scale gains mscale² = (0.1·ln 40 + 1)².
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((softmax_scale(&extended) - m * m / 192f64.sqrt()).abs() < 1e-15);
        assert_eq!(softmax_scale(&base), 1.0 / 192f64.sqrt());
    }
}
