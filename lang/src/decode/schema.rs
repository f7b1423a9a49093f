//! The schema of a spec file: which keys each block has, their types and defaults, and how
//! they become the resolved [`Spec`]. This file is the reference for the language's keys.

use super::{decode_names, Bytes, Cx, Decode, Fields};
use crate::diagnostics::{Code, Diagnostic, Span};
use crate::spec::*;
use crate::syntax::{Block, Value, ValueKind};
use std::num::NonZeroU64;

/// Decodes a whole file (its top-level block).
pub fn decode_spec(cx: &mut Cx, file: &Block) -> Option<Spec> {
    let mut f = Fields::new(cx, file, "", Span::new(file.span.file, 0, 0));
    let model = f.req(cx, "model");
    let train = f.req(cx, "train");
    let precision = f.req(cx, "precision");
    let parallel = f.req(cx, "parallel");
    f.finish(cx);
    Some(Spec { model: model?, train: train?, precision: precision?, parallel: parallel? })
}

fn count(n: Option<NonZeroU64>) -> Option<u64> {
    n.map(NonZeroU64::get)
}

impl Decode for Model {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let mut f = cx.fields(v, path)?;
        let name = f.req(cx, "name");
        let vocab = count(f.req(cx, "vocab"));
        let hidden = count(f.req(cx, "hidden"));
        let layers = count(f.req(cx, "layers"));
        let norm_eps = f.req(cx, "norm").map(|RmsNorm(eps)| eps);
        let init_std = f.req(cx, "init").map(|NormalInit(std)| std);
        let attention = f.req(cx, "attention");
        let ffn = f.req(cx, "ffn");
        let mtp = f.opt(cx, "mtp");
        f.finish(cx);
        Some(Model {
            name: name?,
            vocab: vocab?,
            hidden: hidden?,
            layers: layers?,
            norm_eps: norm_eps?,
            init_std: init_std?,
            attention: attention?,
            ffn: ffn?,
            mtp: mtp?,
        })
    }
}

/// `norm = rmsnorm { eps = ... }`: the epsilon.
struct RmsNorm(f64);

impl Decode for RmsNorm {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let (_, mut f) = cx.tagged(v, path, &["rmsnorm"])?;
        let eps = f.req(cx, "eps");
        f.finish(cx);
        eps.map(RmsNorm)
    }
}

/// `init = normal { std = ... }`: the standard deviation.
struct NormalInit(f64);

impl Decode for NormalInit {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let (_, mut f) = cx.tagged(v, path, &["normal"])?;
        let std = f.req(cx, "std");
        f.finish(cx);
        std.map(NormalInit)
    }
}

impl Decode for Mla {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let (_, mut f) = cx.tagged(v, path, &["mla"])?;
        let heads = count(f.req(cx, "heads"));
        let q_rank = count(f.req(cx, "q_rank"));
        let kv_rank = count(f.req(cx, "kv_rank"));
        let qk_nope_dim = count(f.req(cx, "qk_nope_dim"));
        let qk_rope_dim = count(f.req(cx, "qk_rope_dim"));
        let v_dim = count(f.req(cx, "v_dim"));
        let rope_theta = f.req(cx, "rope_theta");
        let yarn = f.opt(cx, "yarn");
        f.finish(cx);
        Some(Mla {
            heads: heads?,
            q_rank: q_rank?,
            kv_rank: kv_rank?,
            qk_nope_dim: qk_nope_dim?,
            qk_rope_dim: qk_rope_dim?,
            v_dim: v_dim?,
            rope_theta: rope_theta?,
            yarn: yarn?,
        })
    }
}

impl Decode for Yarn {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let mut f = cx.fields(v, path)?;
        let factor = f.req(cx, "factor");
        let original_seq = count(f.req(cx, "original_seq"));
        let beta_fast = f.or(cx, "beta_fast", 32.0);
        let beta_slow = f.or(cx, "beta_slow", 1.0);
        let mscale = f.or(cx, "mscale", 1.0);
        let mscale_all_dim = f.or(cx, "mscale_all_dim", 1.0);
        f.finish(cx);
        Some(Yarn {
            factor: factor?,
            original_seq: original_seq?,
            beta_fast: beta_fast?,
            beta_slow: beta_slow?,
            mscale: mscale?,
            mscale_all_dim: mscale_all_dim?,
        })
    }
}

impl Decode for FfnRange {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let (kind, mut f) = cx.tagged(v, path, &["dense", "moe"])?;
        let layers = f.req(cx, "layers");
        let intermediate = count(f.req(cx, "intermediate"));
        let ffn = if kind == 0 {
            f.finish(cx);
            Ffn::Dense { intermediate: intermediate? }
        } else {
            let shared_experts = f.or(cx, "shared_experts", 0);
            let routed_experts = count(f.req(cx, "routed_experts"));
            let top_k = count(f.req(cx, "top_k"));
            let gating = f.req(cx, "gating");
            let groups = count(f.or(cx, "groups", NonZeroU64::MIN));
            let keep_groups = count(f.or(cx, "keep_groups", NonZeroU64::MIN));
            let routed_scale = f.or(cx, "routed_scale", 1.0);
            let bias_speed = f.req(cx, "bias_speed");
            let balance_alpha = f.or(cx, "balance_alpha", 0.0);
            f.finish(cx);
            Ffn::Moe(Moe {
                shared_experts: shared_experts?,
                routed_experts: routed_experts?,
                top_k: top_k?,
                intermediate: intermediate?,
                gating: gating?,
                groups: groups?,
                keep_groups: keep_groups?,
                routed_scale: routed_scale?,
                bias_speed: bias_speed?,
                balance_alpha: balance_alpha?,
            })
        };
        Some(FfnRange { layers: layers?, ffn })
    }
}

decode_names!(Gating { "sigmoid" => Gating::Sigmoid, "softmax" => Gating::Softmax });

/// What an MTP module may share with the main model.
#[derive(Clone, Copy, PartialEq)]
enum Shared {
    Embedding,
    Head,
}
decode_names!(Shared { "embedding" => Shared::Embedding, "head" => Shared::Head });

impl Decode for Mtp {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let mut f = cx.fields(v, path)?;
        let depth = count(f.req(cx, "depth"));
        let share: Option<Vec<Shared>> = f.or(cx, "share", vec![]);
        let loss_weight = f.req(cx, "loss_weight");
        f.finish(cx);
        let share = share?;
        Some(Mtp {
            depth: depth?,
            share_embedding: share.contains(&Shared::Embedding),
            share_head: share.contains(&Shared::Head),
            loss_weight: loss_weight?,
        })
    }
}

impl Decode for Schedule {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let ValueKind::Changes(first, changes) = &v.kind else {
            return cx.decode(v, path).map(Schedule::constant);
        };
        let first = cx.decode(first, &format!("{path}.first"));
        let changes: Vec<Option<Change>> = changes
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let at = cx.decode(&c.at, &format!("{path}.changes.{i}.at"));
                let value = cx.decode(&c.value, &format!("{path}.changes.{i}.value"));
                Some(Change { at: at?, value: value? })
            })
            .collect();
        Some(Schedule { first: first?, changes: changes.into_iter().collect::<Option<_>>()? })
    }
}

impl Decode for Train {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let mut f = cx.fields(v, path)?;
        let tokens = count(f.req(cx, "tokens"));
        let seq_len = count(f.req(cx, "seq_len"));
        let batch = f.req(cx, "batch");
        let micro_batch = count(f.or(cx, "micro_batch", NonZeroU64::MIN));
        let seed = f.or(cx, "seed", 0);
        let optimizer = f.req(cx, "optimizer");
        let grad_clip = f.req(cx, "grad_clip");
        let lr = f.req::<Vec<PhaseLit>>(cx, "lr").map(resolve_constant_phases);
        let lr_scale = f.or(cx, "lr_scale", LrScale(vec![]));
        let data = f.req(cx, "data");
        let extend = f.or(cx, "extend", vec![]);
        f.finish(cx);
        Some(Train {
            tokens: tokens?,
            seq_len: seq_len?,
            batch: batch?,
            micro_batch: micro_batch?,
            seed: seed?,
            optimizer: optimizer?,
            grad_clip: grad_clip?,
            lr: lr?,
            lr_scale: lr_scale?.0,
            data: data?,
            extend: extend?,
        })
    }
}

impl Decode for Batch {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        if let ValueKind::Number(_) = v.kind {
            return count(cx.decode(v, path)).map(|sequences| Batch::Constant { sequences });
        }
        let (_, mut f) = cx.tagged(v, path, &["ramp"])?;
        let from = count(f.req(cx, "from"));
        let to = count(f.req(cx, "to"));
        let over = f.req(cx, "over");
        f.finish(cx);
        Some(Batch::Ramp { from: from?, to: to?, over_tokens: over.map(|Tokens(t)| t)? })
    }
}

/// A length that must be given in tokens.
struct Tokens(u64);

impl Decode for Tokens {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        match Position::decode(v, cx, path)? {
            Position::Tokens(t) => Some(Tokens(t)),
            Position::Steps(_) => {
                cx.report(
                    Diagnostic::error(Code::BadNumber, "this length is measured in tokens")
                        .with_label(v.span, "steps here")
                        .with_help("a batch ramp's length in steps depends on the ramp itself: give it in tokens"),
                );
                None
            }
        }
    }
}

impl Decode for AdamW {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let (_, mut f) = cx.tagged(v, path, &["adamw"])?;
        let beta1 = f.req(cx, "beta1");
        let beta2 = f.req(cx, "beta2");
        let eps = f.or(cx, "eps", 1e-8);
        let weight_decay = f.req(cx, "weight_decay");
        let no_decay = f.or(cx, "no_decay", vec![ParamGroup::Norms]);
        f.finish(cx);
        Some(AdamW { beta1: beta1?, beta2: beta2?, eps: eps?, weight_decay: weight_decay?, no_decay: no_decay? })
    }
}

decode_names!(ParamGroup {
    "embedding" => ParamGroup::Embedding,
    "head" => ParamGroup::Head,
    "attention" => ParamGroup::Attention,
    "dense_ffn" => ParamGroup::DenseFfn,
    "shared_experts" => ParamGroup::SharedExperts,
    "routed_experts" => ParamGroup::RoutedExperts,
    "router" => ParamGroup::Router,
    "norms" => ParamGroup::Norms,
    "mtp" => ParamGroup::Mtp,
});

/// `lr_scale { group = multiplier ... }`: a block keyed by parameter group.
struct LrScale(Vec<(ParamGroup, f64)>);

impl Decode for LrScale {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let ValueKind::Block(block) = &v.kind else {
            return cx.wrong_type(v, "a block `{ group = multiplier ... }`");
        };
        // Checks duplicates; the keys themselves are parameter-group names.
        Fields::new(cx, block, path, v.span);
        let scales: Vec<Option<(ParamGroup, f64)>> = block
            .entries
            .iter()
            .map(|e| {
                let key = Value { kind: ValueKind::Name(e.key.name.clone()), span: e.key.span };
                let group = ParamGroup::decode(&key, cx, path);
                let scale = cx.decode(&e.value, &format!("{path}.{}", e.key.name));
                Some((group?, scale?))
            })
            .collect();
        scales.into_iter().collect::<Option<_>>().map(LrScale)
    }
}

/// An LR phase as written: a `constant` phase may leave out its value (`at`), keeping the
/// previous phase's.
struct PhaseLit {
    shape: LrShape,
    end: Option<PhaseEnd>,
    to: Option<f64>,
}

/// Gives each `constant` phase without `at` the value the previous phase ended at (0 first).
fn resolve_constant_phases(phases: Vec<PhaseLit>) -> Vec<LrPhase> {
    let mut previous = 0.0;
    phases
        .into_iter()
        .map(|p| {
            let to = p.to.unwrap_or(previous);
            previous = to;
            LrPhase { shape: p.shape, end: p.end, to }
        })
        .collect()
}

impl Decode for PhaseLit {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let (kind, mut f) = cx.tagged(v, path, &["linear", "cosine", "constant"])?;
        let shape = [LrShape::Linear, LrShape::Cosine, LrShape::Constant][kind];
        let for_ = f.opt(cx, "for");
        let until = f.opt(cx, "until");
        // A constant phase states its value with `at`; the others ramp `to` a value.
        let to = if shape == LrShape::Constant { f.opt(cx, "at") } else { f.req(cx, "to").map(Some) };
        f.finish(cx);
        let end = match (for_?, until?) {
            (Some(len), None) => Some(PhaseEnd::For(len)),
            (None, Some(at)) => Some(PhaseEnd::Until(at)),
            (None, None) => None,
            (Some(_), Some(_)) => {
                let span = cx.spans.get(&format!("{path}.until")).copied().unwrap_or(v.span);
                cx.report(
                    Diagnostic::error(Code::Schedule, "a phase has either `for` or `until`, not both")
                        .with_label(span, "remove this or `for`"),
                );
                return None;
            }
        };
        Some(PhaseLit { shape, end, to: to? })
    }
}

impl Decode for Data {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let mut f = cx.fields(v, path)?;
        let sources = f.req(cx, "sources");
        let packing = f.or(cx, "packing", true);
        let fim_rate = f.or(cx, "fim_rate", 0.0);
        f.finish(cx);
        Some(Data { sources: sources?, packing: packing?, fim_rate: fim_rate? })
    }
}

impl Decode for Source {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let (kind, mut f) = cx.tagged(v, path, &["files", "synthetic"])?;
        let path_ = if kind == 0 { f.req(cx, "path") } else { Some(String::new()) };
        let weight = f.or(cx, "weight", 1.0);
        f.finish(cx);
        Some(match kind {
            0 => Source::Files { path: path_?, weight: weight? },
            _ => Source::Synthetic { weight: weight? },
        })
    }
}

impl Decode for ExtendPhase {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let mut f = cx.fields(v, path)?;
        let seq_len = count(f.req(cx, "seq_len"));
        let batch = count(f.req(cx, "batch"));
        let lr = f.req(cx, "lr");
        let steps = count(f.req(cx, "steps"));
        f.finish(cx);
        Some(ExtendPhase { seq_len: seq_len?, batch: batch?, lr: lr?, steps: steps? })
    }
}

decode_names!(Dtype { "f64" => Dtype::F64, "f32" => Dtype::F32, "bf16" => Dtype::Bf16, "e4m3" => Dtype::E4m3 });

decode_names!(HighPrecisionOp {
    "embedding" => HighPrecisionOp::Embedding,
    "head" => HighPrecisionOp::Head,
    "gating" => HighPrecisionOp::Gating,
    "norms" => HighPrecisionOp::Norms,
    "attention" => HighPrecisionOp::Attention,
});

decode_names!(Recompute {
    "rmsnorm" => Recompute::Rmsnorm,
    "mla_up_proj" => Recompute::MlaUpProj,
    "swiglu" => Recompute::Swiglu,
});

impl Decode for Precision {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let mut f = cx.fields(v, path)?;
        let gemm = f.req(cx, "gemm");
        let activation_tile = f.req(cx, "activation_tile");
        let weight_block = f.req(cx, "weight_block");
        let promotion_interval = count(f.req(cx, "promotion_interval"));
        let high_precision = f.req(cx, "high_precision");
        let master_weights = f.req(cx, "master_weights");
        let grads = f.req(cx, "grads");
        let adam_moments = f.req(cx, "adam_moments");
        let saved_activations = f.req(cx, "saved_activations");
        let dispatch = f.req(cx, "dispatch");
        let combine = f.req(cx, "combine");
        let recompute = f.or(cx, "recompute", vec![]);
        let ema = f.opt(cx, "ema");
        f.finish(cx);
        Some(Precision {
            gemm: gemm?,
            activation_tile: activation_tile?,
            weight_block: weight_block?,
            promotion_interval: promotion_interval?,
            high_precision: high_precision?,
            master_weights: master_weights?,
            grads: grads?,
            adam_moments: adam_moments?,
            saved_activations: saved_activations?,
            dispatch: dispatch?,
            combine: combine?,
            recompute: recompute?,
            ema: ema?,
        })
    }
}

impl Decode for Ema {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let mut f = cx.fields(v, path)?;
        let decay = f.req(cx, "decay");
        f.finish(cx);
        Some(Ema { decay: decay? })
    }
}

impl Decode for Parallel {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let mut f = cx.fields(v, path)?;
        let nodes = count(f.or(cx, "nodes", NonZeroU64::MIN));
        let gpus_per_node = count(f.or(cx, "gpus_per_node", NonZeroU64::MIN));
        let gpu = f.req(cx, "gpu");
        let pipeline =
            f.or(cx, "pipeline", Pipeline { schedule: PipelineSchedule::OneFOneB, stages: 1, layout: vec![] });
        let expert = f.opt(cx, "expert");
        let data = f.opt(cx, "data");
        let comm_sms = f.or(cx, "comm_sms", 0);
        f.finish(cx);
        let (nodes, pipeline) = (nodes?, pipeline?);
        let gpus = nodes * gpus_per_node?;
        Some(Parallel {
            nodes,
            gpus_per_node: gpus_per_node?,
            gpu: gpu?,
            expert: expert?.unwrap_or(ExpertParallel { size: 1, max_nodes: nodes }),
            data: data?.unwrap_or(DataParallel { size: (gpus / pipeline.stages.max(1)).max(1), zero: 1 }),
            pipeline,
            comm_sms: comm_sms?,
        })
    }
}

/// The GPUs dsc knows: name, memory, streaming multiprocessors.
const GPUS: [(&str, u64, u64); 3] = [("h100", 80 << 30, 132), ("h800", 80 << 30, 132), ("h200", 141_000_000_000, 132)];

impl Decode for Gpu {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let names = GPUS.map(|g| g.0);
        let (kind, mut f) = cx.tagged(v, path, &names)?;
        let (name, memory, sms) = GPUS[kind];
        let memory_bytes = f.or(cx, "memory", Bytes(memory));
        f.finish(cx);
        Some(Gpu { name: name.to_string(), memory_bytes: memory_bytes?.0, sms })
    }
}

impl Decode for Pipeline {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let (kind, mut f) = cx.tagged(v, path, &["1f1b", "zb1p", "dualpipe"])?;
        let schedule = [PipelineSchedule::OneFOneB, PipelineSchedule::Zb1p, PipelineSchedule::Dualpipe][kind];
        let stages = f.opt::<NonZeroU64>(cx, "stages");
        let layout: Option<Vec<Vec<StagePart>>> = f.or(cx, "layout", vec![]);
        f.finish(cx);
        let (stages, layout) = (stages?, layout?);
        let stages = match (stages, layout.len()) {
            (Some(s), _) => s.get(),
            (None, n) if n > 0 => n as u64,
            (None, _) => {
                cx.report(
                    Diagnostic::error(Code::MissingKey, format!("missing `{path}.stages`"))
                        .with_label(v.span, "this needs `stages` or `layout`")
                        .with_help("add `stages = N`, or list each stage's layers in `layout`"),
                );
                return None;
            }
        };
        Some(Pipeline { schedule, stages, layout })
    }
}

impl Decode for StagePart {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        if let ValueKind::Range(_) = v.kind {
            return LayerRange::decode(v, cx, path).map(StagePart::Layers);
        }
        match &v.kind {
            ValueKind::Name(_) => {
                let i = cx.name(v, &["embedding", "head", "mtp"])?;
                Some([StagePart::Embedding, StagePart::Head, StagePart::Mtp][i])
            }
            _ => cx.wrong_type(v, "a layer range, `embedding`, `head` or `mtp`"),
        }
    }
}

impl Decode for ExpertParallel {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let mut f = cx.fields(v, path)?;
        let size = count(f.req(cx, "size"));
        let max_nodes = count(f.req(cx, "max_nodes"));
        f.finish(cx);
        Some(ExpertParallel { size: size?, max_nodes: max_nodes? })
    }
}

impl Decode for DataParallel {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let mut f = cx.fields(v, path)?;
        let size = count(f.req(cx, "size"));
        let zero = f.or(cx, "zero", 1);
        f.finish(cx);
        Some(DataParallel { size: size?, zero: zero? })
    }
}
