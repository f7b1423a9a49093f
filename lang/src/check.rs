//! Semantic checks on a decoded [`Spec`]: values out of range, dimensions that do not fit,
//! layer ranges, routing, schedules, batch sizes, the precision policy and the parallel plan.
//! Each check points at the values involved through the decoder's span map and says how to
//! fix the problem. All checks run; all problems are reported.

use crate::decode::SpanMap;
use crate::diagnostics::{Code, Diagnostic, Span};
use crate::spec::*;

/// Every problem found in `spec` (errors and warnings).
pub fn check(spec: &Spec, spans: &SpanMap) -> Vec<Diagnostic> {
    let mut c = Checker { spec, spans, out: vec![] };
    c.value_ranges();
    c.ffn_ranges();
    c.attention();
    c.moe();
    c.schedules();
    c.batch();
    c.context_extension();
    c.precision();
    c.parallel();
    c.pipeline_layout();
    c.out
}

struct Checker<'a> {
    spec: &'a Spec,
    spans: &'a SpanMap,
    out: Vec<Diagnostic>,
}

impl Checker<'_> {
    /// The span of `path`, or of its nearest ancestor that was written in the file (a default
    /// value has no span of its own).
    fn at(&self, path: &str) -> Span {
        let mut p = path;
        loop {
            if let Some(span) = self.spans.get(p) {
                return *span;
            }
            match p.rfind('.') {
                Some(i) => p = &p[..i],
                None => return self.spans.values().next().copied().unwrap_or(Span::new(0, 0, 0)),
            }
        }
    }

    fn error(&mut self, code: Code, path: &str, message: String, label: String, help: &str) {
        let span = self.at(path);
        self.out.push(Diagnostic::error(code, message).with_label(span, label).with_help(help));
    }

    fn push(&mut self, d: Diagnostic) {
        self.out.push(d);
    }

    /// Reports `path` unless `ok(value)`; `rule` says what is required ("greater than 0").
    fn require(&mut self, path: &str, value: f64, ok: bool, rule: &str) {
        if !ok {
            self.error(
                Code::OutOfRange,
                path,
                format!("`{path}` must be {rule}"),
                format!("found {value}"),
                "change this value",
            );
        }
    }

    fn value_ranges(&mut self) {
        let s = self.spec;
        let positive = |x: f64| x > 0.0 && x.is_finite();
        let m = &s.model;
        self.require("model.norm.eps", m.norm_eps, positive(m.norm_eps), "greater than 0");
        self.require("model.init.std", m.init_std, positive(m.init_std), "greater than 0");
        self.require(
            "model.attention.rope_theta",
            m.attention.rope_theta,
            positive(m.attention.rope_theta),
            "greater than 0",
        );
        if let Some(y) = &m.attention.yarn {
            self.require(
                "model.attention.yarn.factor",
                y.factor,
                y.factor > 1.0 && y.factor.is_finite(),
                "greater than 1",
            );
            if y.beta_fast <= y.beta_slow {
                self.error(
                    Code::OutOfRange,
                    "model.attention.yarn.beta_fast",
                    "YaRN's `beta_fast` must be greater than `beta_slow`".into(),
                    format!("{} ≤ {}", y.beta_fast, y.beta_slow),
                    "DeepSeek-V3 uses beta_fast = 32, beta_slow = 1",
                );
            }
        }
        for (i, r) in m.ffn.iter().enumerate() {
            if let Ffn::Moe(moe) = &r.ffn {
                let p = format!("model.ffn.{i}");
                self.require(
                    &format!("{p}.routed_scale"),
                    moe.routed_scale,
                    positive(moe.routed_scale),
                    "greater than 0",
                );
                self.require(&format!("{p}.balance_alpha"), moe.balance_alpha, moe.balance_alpha >= 0.0, "at least 0");
                self.schedule_values(&format!("{p}.bias_speed"), &moe.bias_speed);
            }
        }
        if let Some(mtp) = &m.mtp {
            self.schedule_values("model.mtp.loss_weight", &mtp.loss_weight);
        }
        let t = &s.train;
        let o = &t.optimizer;
        self.require("train.optimizer.beta1", o.beta1, (0.0..1.0).contains(&o.beta1), "in [0, 1)");
        self.require("train.optimizer.beta2", o.beta2, (0.0..1.0).contains(&o.beta2), "in [0, 1)");
        self.require("train.optimizer.eps", o.eps, positive(o.eps), "greater than 0");
        self.require("train.optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0.0, "at least 0");
        self.require("train.grad_clip", t.grad_clip, positive(t.grad_clip), "greater than 0");
        for (i, p) in t.lr.iter().enumerate() {
            let key = if p.shape == LrShape::Constant { "at" } else { "to" };
            self.require(&format!("train.lr.{i}.{key}"), p.to, p.to >= 0.0 && p.to.is_finite(), "at least 0");
        }
        for (group, scale) in &t.lr_scale {
            let name = serde_json::to_value(group).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
            self.require(&format!("train.lr_scale.{name}"), *scale, *scale >= 0.0 && scale.is_finite(), "at least 0");
        }
        self.require("train.data.fim_rate", t.data.fim_rate, (0.0..=1.0).contains(&t.data.fim_rate), "in [0, 1]");
        for (i, src) in t.data.sources.iter().enumerate() {
            self.require(
                &format!("train.data.sources.{i}.weight"),
                src.weight(),
                positive(src.weight()),
                "greater than 0",
            );
        }
        if t.data.sources.is_empty() {
            self.error(
                Code::OutOfRange,
                "train.data.sources",
                "no data sources".into(),
                "empty list".into(),
                "add `files { path = \"...\" }` or `synthetic {}`",
            );
        }
        for (i, e) in t.extend.iter().enumerate() {
            self.require(&format!("train.extend.{i}.lr"), e.lr, e.lr >= 0.0 && e.lr.is_finite(), "at least 0");
        }
        if let Some(ema) = &s.precision.ema {
            self.require("precision.ema.decay", ema.decay, ema.decay > 0.0 && ema.decay < 1.0, "in (0, 1)");
        }
    }

    fn schedule_values(&mut self, path: &str, schedule: &Schedule) {
        let first = if schedule.changes.is_empty() { path.to_string() } else { format!("{path}.first") };
        self.require(&first, schedule.first, schedule.first >= 0.0 && schedule.first.is_finite(), "at least 0");
        for (i, c) in schedule.changes.iter().enumerate() {
            self.require(
                &format!("{path}.changes.{i}.value"),
                c.value,
                c.value >= 0.0 && c.value.is_finite(),
                "at least 0",
            );
        }
    }

    /// The FFN ranges must tile `0..layers` without overlap or gap.
    fn ffn_ranges(&mut self) {
        let layers = self.spec.model.layers;
        let mut order: Vec<usize> = (0..self.spec.model.ffn.len()).collect();
        order.sort_by_key(|&i| self.spec.model.ffn[i].layers.start);
        let mut next = 0u64;
        let mut previous: Option<usize> = None;
        for &i in &order {
            let r = self.spec.model.ffn[i].layers;
            let path = format!("model.ffn.{i}.layers");
            if r.end > layers {
                let d = Diagnostic::error(
                    Code::LayerRanges,
                    format!("layer range {}..{} goes past the last layer", r.start, r.end),
                )
                .with_label(self.at(&path), format!("the model has {layers} layers: 0..{layers}"))
                .with_label(self.at("model.layers"), "the layer count")
                .with_help("ranges are half-open: the last layer of `0..61` is 60");
                self.push(d);
            }
            if r.start < next {
                let mut d = Diagnostic::error(
                    Code::LayerRanges,
                    format!("layers {}..{} have two FFNs", r.start, next.min(r.end)),
                )
                .with_label(self.at(&path), "this range overlaps");
                if let Some(p) = previous {
                    d = d.with_label(self.at(&format!("model.ffn.{p}.layers")), "this one");
                }
                self.push(d.with_help("ranges are half-open: `0..3` then `3..61`"));
            } else if r.start > next {
                let d = Diagnostic::error(Code::LayerRanges, format!("layers {next}..{} have no FFN", r.start))
                    .with_label(self.at(&path), format!("this range starts at {}", r.start))
                    .with_help(format!("start this range at {next}, or add an FFN for layers {next}..{}", r.start));
                self.push(d);
            }
            next = next.max(r.end);
            previous = Some(i);
        }
        if next < layers && !self.spec.model.ffn.is_empty() {
            let last = previous.map_or("model.ffn".to_string(), |p| format!("model.ffn.{p}.layers"));
            let d = Diagnostic::error(Code::LayerRanges, format!("layers {next}..{layers} have no FFN"))
                .with_label(self.at(&last), format!("the ranges end at {next}"))
                .with_label(self.at("model.layers"), format!("the model has {layers} layers"))
                .with_help(format!("extend the last range to `..{layers}`, or set `layers = {next}`"));
            self.push(d);
        }
        if self.spec.model.ffn.is_empty() {
            self.error(
                Code::LayerRanges,
                "model.ffn",
                "no FFN is given".into(),
                "empty list".into(),
                "add `dense { layers = 0..N, intermediate = ... }`",
            );
        }
    }

    fn attention(&mut self) {
        let a = &self.spec.model.attention;
        if !a.qk_rope_dim.is_multiple_of(2) {
            self.error(
                Code::Dimensions,
                "model.attention.qk_rope_dim",
                format!("the RoPE dimension must be even, found {}", a.qk_rope_dim),
                "odd".into(),
                "RoPE rotates pairs of dimensions: use an even size such as 64",
            );
        }
    }

    fn moe(&mut self) {
        for (i, r) in self.spec.model.ffn.iter().enumerate() {
            let Ffn::Moe(m) = &r.ffn else { continue };
            let p = format!("model.ffn.{i}");
            if m.top_k > m.routed_experts {
                let d =
                    Diagnostic::error(Code::Routing, format!("top-{} of {} routed experts", m.top_k, m.routed_experts))
                        .with_label(self.at(&format!("{p}.top_k")), "more experts per token than there are")
                        .with_label(self.at(&format!("{p}.routed_experts")), "the routed experts")
                        .with_help("`top_k` must be at most `routed_experts`");
                self.push(d);
                continue;
            }
            if !m.routed_experts.is_multiple_of(m.groups) {
                let d = Diagnostic::error(
                    Code::Routing,
                    format!("{} groups do not divide {} experts", m.groups, m.routed_experts),
                )
                .with_label(self.at(&format!("{p}.groups")), "this does not divide the experts")
                .with_label(self.at(&format!("{p}.routed_experts")), "the routed experts")
                .with_help("choose `groups` that divides `routed_experts` (DeepSeek-V3: 256 experts, 8 groups)");
                self.push(d);
                continue;
            }
            if m.keep_groups > m.groups {
                let d = Diagnostic::error(Code::Routing, format!("keeps {} of {} groups", m.keep_groups, m.groups))
                    .with_label(self.at(&format!("{p}.keep_groups")), "more than there are")
                    .with_label(self.at(&format!("{p}.groups")), "the groups")
                    .with_help("`keep_groups` must be at most `groups`");
                self.push(d);
                continue;
            }
            let per_group = m.routed_experts / m.groups;
            if m.groups > 1 && per_group < 2 {
                self.error(
                    Code::Routing,
                    &format!("{p}.groups"),
                    format!("groups of {per_group} expert cannot be scored"),
                    "one expert per group".into(),
                    "a group's score is the sum of its two best experts: use at most routed_experts / 2 groups",
                );
            }
            if m.top_k > m.keep_groups * per_group {
                let d = Diagnostic::error(
                    Code::Routing,
                    format!(
                        "top-{} cannot be chosen from {} kept groups of {per_group} experts",
                        m.top_k, m.keep_groups
                    ),
                )
                .with_label(self.at(&format!("{p}.top_k")), "too many")
                .with_label(
                    self.at(&format!("{p}.keep_groups")),
                    format!("{} experts remain after group selection", m.keep_groups * per_group),
                )
                .with_help("keep more groups or lower `top_k`");
                self.push(d);
            }
        }
    }

    /// Schedule changes and LR phases: in order, and within the token budget.
    fn schedules(&mut self) {
        let t = &self.spec.train;
        let budget = t.tokens as f64;
        for (i, r) in self.spec.model.ffn.iter().enumerate() {
            if let Ffn::Moe(m) = &r.ffn {
                self.changes_in_order(&format!("model.ffn.{i}.bias_speed"), &m.bias_speed);
            }
        }
        if let Some(mtp) = &self.spec.model.mtp {
            self.changes_in_order("model.mtp.loss_weight", &mtp.loss_weight);
        }
        if t.lr.is_empty() {
            self.error(
                Code::Schedule,
                "train.lr",
                "the LR schedule has no phase".into(),
                "empty".into(),
                "add e.g. `constant { at = 3e-4 }`",
            );
            return;
        }
        let mut end = 0.0f64;
        for (i, phase) in t.lr.iter().enumerate() {
            let p = format!("train.lr.{i}");
            let last = i + 1 == t.lr.len();
            let phase_end = match phase.end {
                None if last => budget,
                None => {
                    self.error(
                        Code::Schedule,
                        &p,
                        "only the last LR phase may leave out its length".into(),
                        "this phase never ends".into(),
                        "add `for = N tokens` (or steps), or `until = ...`",
                    );
                    return;
                }
                Some(PhaseEnd::For(len)) => {
                    let start_steps = t.steps_at_tokens(end);
                    match len {
                        Position::Tokens(n) => end + n as f64,
                        Position::Steps(n) => t.tokens_at_step(start_steps + n as f64),
                    }
                }
                Some(PhaseEnd::Until(at)) => t.tokens_at(at),
            };
            let key = match phase.end {
                Some(PhaseEnd::Until(_)) => format!("{p}.until"),
                Some(PhaseEnd::For(_)) => format!("{p}.for"),
                None => p.clone(),
            };
            if phase_end <= end {
                self.error(
                    Code::Schedule,
                    &key,
                    format!("LR phase {i} ends at {} tokens, not after its start", tokens(phase_end)),
                    format!("the previous phase ends at {} tokens", tokens(end)),
                    "phases follow each other: each must end after the one before",
                );
                return;
            }
            if phase_end > budget * (1.0 + 1e-9) {
                let d = Diagnostic::error(
                    Code::Schedule,
                    format!("the LR schedule runs past the token budget ({} > {})", tokens(phase_end), tokens(budget)),
                )
                .with_label(self.at(&key), "ends after the budget")
                .with_label(self.at("train.tokens"), "the budget")
                .with_help("shorten the phases or raise `train.tokens`");
                self.push(d);
                return;
            }
            end = phase_end;
        }
        if end < budget * (1.0 - 1e-9) {
            let last = t.lr.len() - 1;
            let d = Diagnostic::error(
                Code::Schedule,
                format!("the LR schedule covers {} of the {}-token budget", tokens(end), tokens(budget)),
            )
            .with_label(self.at(&format!("train.lr.{last}")), "the last phase ends early")
            .with_label(self.at("train.tokens"), "the budget")
            .with_help("add a final phase, or leave out the last phase's `for`/`until` so it runs to the end");
            self.push(d);
        }
    }

    fn changes_in_order(&mut self, path: &str, schedule: &Schedule) {
        let t = &self.spec.train;
        let mut previous = 0.0;
        for (i, c) in schedule.changes.iter().enumerate() {
            let at = t.tokens_at(c.at);
            let p = format!("{path}.changes.{i}.at");
            if at <= previous {
                self.error(
                    Code::Schedule,
                    &p,
                    format!("this change of `{path}` is not after the one before"),
                    format!("at {} tokens", tokens(at)),
                    "list the changes in training order",
                );
            } else if at >= t.tokens as f64 {
                self.error(
                    Code::Schedule,
                    &p,
                    format!("this change of `{path}` comes after the token budget"),
                    format!("at {} tokens", tokens(at)),
                    "it would never take effect: move it before `train.tokens`",
                );
            }
            previous = at;
        }
    }

    fn batch(&mut self) {
        let t = &self.spec.train;
        let par = &self.spec.parallel;
        let per_step = par.data.size * t.micro_batch;
        if let Batch::Ramp { from, to, .. } = t.batch {
            if from > to {
                self.error(
                    Code::BatchSize,
                    "train.batch.from",
                    format!("the batch ramps down ({from} → {to})"),
                    "larger than `to`".into(),
                    "a ramp grows the batch: swap `from` and `to`",
                );
            }
        }
        let ends: &[(&str, u64)] = match t.batch {
            Batch::Constant { sequences } => &[("train.batch", sequences)],
            Batch::Ramp { from, to, .. } => &[("train.batch.from", from), ("train.batch.to", to)],
        };
        for &(path, batch) in ends {
            if !batch.is_multiple_of(per_step) {
                let d = Diagnostic::error(
                    Code::BatchSize,
                    format!("a batch of {batch} sequences does not split over the data-parallel ranks"),
                )
                .with_label(self.at(path), format!("not a multiple of {per_step}"))
                .with_label(
                    self.at("train.micro_batch"),
                    format!(
                        "{} × micro-batches of {}",
                        counted(par.data.size, "data-parallel rank", "data-parallel ranks"),
                        t.micro_batch
                    ),
                )
                .with_help(format!("use a multiple of data-parallel size × micro_batch = {per_step}"));
                self.push(d);
                continue;
            }
            let micro_batches = batch / per_step;
            let stages = par.pipeline.stages;
            let dualpipe = par.pipeline.schedule == PipelineSchedule::Dualpipe;
            if dualpipe && stages > 1 && micro_batches >= stages && micro_batches < 2 * stages {
                // DualPipe's schedule feeds both ends of the pipeline (as DeepSeek's own
                // implementation asserts, and dsc's generator requires). At a ramp's start only
                // the first steps are short of micro-batches: a warning (DeepSeek-V3's own
                // ramp starts at 24 micro-batches over 16 stages); for every step, an error.
                let ramp_start = path == "train.batch.from";
                let message = format!(
                    "DualPipe over {stages} stages needs at least {} micro-batches per step, {} has {micro_batches}",
                    2 * stages,
                    if ramp_start { "the batch ramp's first step" } else { "every step" }
                );
                let d = if ramp_start {
                    Diagnostic::warning(Code::Pipeline, message).with_note(format!(
                        "the steps before the batch reaches {} sequences have no DualPipe schedule",
                        2 * stages * per_step
                    ))
                } else {
                    Diagnostic::error(Code::Pipeline, message)
                };
                let d = d
                    .with_label(
                        self.at(path),
                        format!("{} per rank", counted(micro_batches, "micro-batch", "micro-batches")),
                    )
                    .with_label(self.at("parallel.pipeline"), format!("{stages} stages"))
                    .with_help(format!(
                        "{} {} sequences or more, lower `micro_batch`, or use fewer stages",
                        if ramp_start { "start the batch at" } else { "use a batch of" },
                        2 * stages * per_step
                    ));
                self.push(d);
            } else if stages > 1 && micro_batches < stages {
                let d = Diagnostic::error(
                    Code::Pipeline,
                    format!(
                        "{} per step cannot fill {stages} pipeline stages",
                        counted(micro_batches, "micro-batch", "micro-batches")
                    ),
                )
                .with_label(
                    self.at(path),
                    format!("{} per rank", counted(micro_batches, "micro-batch", "micro-batches")),
                )
                .with_label(self.at("parallel.pipeline"), format!("{stages} stages"))
                .with_help("raise the batch, lower `micro_batch`, or use fewer stages");
                self.push(d);
            } else if par.pipeline.schedule == PipelineSchedule::Dualpipe && !micro_batches.is_multiple_of(2) {
                let d = Diagnostic::error(
                    Code::Pipeline,
                    format!("DualPipe needs an even number of micro-batches, found {micro_batches}"),
                )
                .with_label(self.at(path), "gives an odd count per rank")
                .with_help("DualPipe feeds micro-batches from both ends in pairs: make their count even");
                self.push(d);
            }
        }
    }

    fn context_extension(&mut self) {
        let t = &self.spec.train;
        let yarn = &self.spec.model.attention.yarn;
        let mut seq = t.seq_len;
        for (i, phase) in t.extend.iter().enumerate() {
            let p = format!("train.extend.{i}");
            let Some(yarn) = yarn else {
                self.error(
                    Code::ContextExtension,
                    &p,
                    "context extension needs YaRN".into(),
                    "this phase extends the context".into(),
                    "add `yarn { factor = 40, original_seq = 4Ki }` to `model.attention`",
                );
                return;
            };
            if phase.seq_len <= seq {
                self.error(
                    Code::ContextExtension,
                    &format!("{p}.seq_len"),
                    format!("context extension to {} does not extend {seq}", phase.seq_len),
                    "not longer than before".into(),
                    "each phase must use a longer sequence than the one before",
                );
            }
            let reach = yarn.original_seq as f64 * yarn.factor;
            if phase.seq_len as f64 > reach {
                let d = Diagnostic::error(
                    Code::ContextExtension,
                    format!("sequence {} is beyond YaRN's reach of {}", phase.seq_len, reach),
                )
                .with_label(self.at(&format!("{p}.seq_len")), "too long")
                .with_label(
                    self.at("model.attention.yarn.factor"),
                    format!("original {} × factor {}", yarn.original_seq, yarn.factor),
                )
                .with_help("raise the YaRN factor or shorten the phase's sequence");
                self.push(d);
            }
            let dp = self.spec.parallel.data.size;
            if !phase.batch.is_multiple_of(dp) {
                let d = Diagnostic::warning(
                    Code::BatchSize,
                    format!("a batch of {} sequences splits unevenly over {dp} data-parallel ranks", phase.batch),
                )
                .with_label(self.at(&format!("{p}.batch")), format!("not a multiple of {dp}"))
                .with_note("ranks get different numbers of sequences; their gradients are weighted accordingly");
                self.push(d);
            }
            seq = phase.seq_len;
        }
    }

    fn precision(&mut self) {
        let pr = &self.spec.precision;
        let [tile_rows, tile_cols] = pr.activation_tile;
        if tile_rows != 1 {
            self.error(
                Code::PrecisionPolicy,
                "precision.activation_tile",
                format!("activation tiles are per token (1×N), found {tile_rows}×{tile_cols}"),
                "rows must be 1".into(),
                "use `[1, 128]` (DeepSeek-V3's 1×128 tiles)",
            );
        }
        let interval = pr.promotion_interval;
        if !interval.is_multiple_of(32) {
            self.error(
                Code::PrecisionPolicy,
                "precision.promotion_interval",
                format!("promotion every {interval} elements of K does not align with FP8 WGMMA instructions"),
                "not a multiple of 32".into(),
                "an FP8 WGMMA consumes 32 elements of K: use 128 (4 WGMMAs)",
            );
        }
        for (path, width) in [("precision.activation_tile", tile_cols), ("precision.weight_block", pr.weight_block[1])]
        {
            if !width.is_multiple_of(interval) {
                let d = Diagnostic::error(
                    Code::PrecisionPolicy,
                    format!("scales change every {width} elements of K but partial sums are promoted every {interval}"),
                )
                .with_label(self.at(path), format!("{width} is not a multiple of {interval}"))
                .with_label(self.at("precision.promotion_interval"), "promotion interval")
                .with_help(
                    "a scale must stay constant within one promotion interval: make the scaling width a multiple of it",
                );
                self.push(d);
            }
        }
        if pr.gemm == Dtype::E4m3 {
            let misfits: Vec<String> = self
                .gemm_inner_dims()
                .into_iter()
                .filter(|(_, k)| !k.is_multiple_of(tile_cols))
                .map(|(name, k)| format!("{name} ({k})"))
                .collect();
            if !misfits.is_empty() {
                let message = format!("the FP8 tile width {tile_cols} does not divide every GEMM's input size");
                let d = Diagnostic::error(Code::Dimensions, message)
                    .with_label(self.at("precision.activation_tile"), format!("does not divide {}", misfits.join(", ")))
                    .with_help(
                        "FP8 GEMMs scale each tile of K apart: choose a width that divides every GEMM's input size",
                    );
                self.push(d);
            }
        }
        for (path, dtype) in [
            ("precision.master_weights", pr.master_weights),
            ("precision.grads", pr.grads),
            ("precision.adam_moments", pr.adam_moments),
        ] {
            if dtype == Dtype::E4m3 {
                self.error(
                    Code::PrecisionPolicy,
                    path,
                    format!("`{path}` cannot be FP8"),
                    "e4m3 here".into(),
                    "FP8 is for GEMM operands and saved activations; keep this in f32 or bf16",
                );
            }
        }
        if pr.master_weights == Dtype::Bf16 {
            let d = Diagnostic::warning(Code::PrecisionPolicy, "BF16 master weights lose small updates")
                .with_label(self.at("precision.master_weights"), "bf16")
                .with_note("an update below 2⁻⁸ of a weight rounds away; DeepSeek-V3 keeps master weights in f32");
            self.push(d);
        }
    }

    /// The K (input) size of every linear layer's GEMM, named for diagnostics.
    fn gemm_inner_dims(&self) -> Vec<(String, u64)> {
        let m = &self.spec.model;
        let a = &m.attention;
        let mut dims = vec![
            ("the hidden size".to_string(), m.hidden),
            ("the q rank".to_string(), a.q_rank),
            ("the kv rank".to_string(), a.kv_rank),
            ("heads × v_dim".to_string(), a.heads * a.v_dim),
        ];
        for r in &m.ffn {
            let inter = match &r.ffn {
                Ffn::Dense { intermediate } | Ffn::Moe(Moe { intermediate, .. }) => *intermediate,
            };
            dims.push((format!("the FFN intermediate size of layers {}..{}", r.layers.start, r.layers.end), inter));
        }
        dims.dedup_by_key(|d| d.1);
        dims
    }

    fn parallel(&mut self) {
        let par = &self.spec.parallel;
        let pp = par.pipeline.stages;
        let dp = par.data.size;
        let gpus = par.gpus();
        if pp * dp != gpus {
            let d = Diagnostic::error(
                Code::GpuCount,
                format!("{pp} pipeline stages × {dp} data-parallel ranks = {} GPUs, but the plan has {gpus}", pp * dp),
            )
            .with_label(self.at("parallel.data.size"), format!("data-parallel size {dp}"))
            .with_label(self.at("parallel.pipeline"), format!("{pp} stages"))
            .with_label(
                self.at("parallel.nodes"),
                format!("{} × {} GPUs", counted(par.nodes, "node", "nodes"), par.gpus_per_node),
            )
            .with_help(if gpus.is_multiple_of(pp) {
                format!("set `data {{ size = {} }}`", gpus / pp)
            } else {
                format!("the stages must divide the {gpus} GPUs")
            });
            self.push(d);
        }
        if par.pipeline.schedule == PipelineSchedule::Dualpipe && !pp.is_multiple_of(2) {
            self.error(
                Code::Pipeline,
                "parallel.pipeline",
                format!("DualPipe needs an even number of stages, found {pp}"),
                "odd".into(),
                "DualPipe pairs stage i with stage PP−1−i: use an even count",
            );
        }
        let placeable = self.spec.model.layers;
        if pp > placeable {
            self.error(
                Code::Pipeline,
                "parallel.pipeline",
                format!("{pp} stages cannot split {placeable} layers"),
                "more stages than layers".into(),
                "use at most one stage per layer",
            );
        }
        // The schedules end every step with ZeRO-1's collectives: the optimizer state is
        // sharded wherever parameters have more than one holder (replicas, DualPipe's copies).
        let shared = par.data.size > 1 || par.pipeline.schedule == PipelineSchedule::Dualpipe;
        if par.data.zero > 1 || (par.data.zero == 0 && shared) {
            self.error(
                Code::OutOfRange,
                "parallel.data.zero",
                format!("ZeRO stage {} is not supported", par.data.zero),
                "dsc shards the optimizer state (ZeRO-1)".into(),
                "use `zero = 1` (or leave it out)",
            );
        }
        if par.comm_sms >= par.gpu.sms {
            self.error(
                Code::OutOfRange,
                "parallel.comm_sms",
                format!("{} SMs reserved for communication leave none for compute", par.comm_sms),
                format!("the {} has {} SMs", par.gpu.name, par.gpu.sms),
                "DeepSeek-V3 reserves 20 of 132",
            );
        }
        self.expert_parallel();
    }

    fn expert_parallel(&mut self) {
        let par = &self.spec.parallel;
        let ep = par.expert.size;
        if ep == 1 {
            return;
        }
        if !par.data.size.is_multiple_of(ep) {
            let d = Diagnostic::error(
                Code::ExpertParallel,
                format!("expert-parallel size {ep} does not divide the {} data-parallel ranks", par.data.size),
            )
            .with_label(self.at("parallel.expert.size"), "EP size")
            .with_label(self.at("parallel.data.size"), "data-parallel size")
            .with_help("expert parallelism spreads experts over data-parallel ranks: its size must divide theirs");
            self.push(d);
            return;
        }
        if ep > par.gpus_per_node && !ep.is_multiple_of(par.gpus_per_node) {
            self.error(
                Code::ExpertParallel,
                "parallel.expert.size",
                format!("expert-parallel size {ep} covers part of a node"),
                format!("not a multiple of {} GPUs per node", par.gpus_per_node),
                "an EP group larger than a node must span whole nodes",
            );
            return;
        }
        let ep_nodes = ep.div_ceil(par.gpus_per_node);
        for (i, r) in self.spec.model.ffn.iter().enumerate() {
            let Ffn::Moe(m) = &r.ffn else { continue };
            let p = format!("model.ffn.{i}");
            if !m.routed_experts.is_multiple_of(ep) {
                let d = Diagnostic::error(
                    Code::ExpertParallel,
                    format!("{} routed experts do not split over {ep} GPUs", m.routed_experts),
                )
                .with_label(self.at("parallel.expert.size"), "EP size")
                .with_label(self.at(&format!("{p}.routed_experts")), "routed experts")
                .with_help("the EP size must divide the number of routed experts");
                self.push(d);
                continue;
            }
            // Group-limited routing bounds the nodes a token reaches only when every group
            // lies within one node; otherwise only top-k bounds it.
            let aligned = m.groups.is_multiple_of(ep_nodes) && m.routed_experts.is_multiple_of(m.groups);
            let reach = if aligned { m.keep_groups.min(ep_nodes) } else { m.top_k.min(ep_nodes) };
            if reach > par.expert.max_nodes {
                let help = if aligned {
                    format!("set `keep_groups = {}` or raise `max_nodes`", par.expert.max_nodes)
                } else {
                    let most = par.expert.max_nodes;
                    format!(
                        "make `groups` a multiple of the {ep_nodes} nodes the experts span; set `keep_groups` ≤ {most}"
                    )
                };
                let d = Diagnostic::error(
                    Code::NodeLimit,
                    format!("a token may reach {reach} nodes, but `max_nodes` is {}", par.expert.max_nodes),
                )
                .with_label(self.at("parallel.expert.max_nodes"), "the limit")
                .with_label(
                    self.at(&format!("{p}.keep_groups")),
                    if aligned { "groups kept per token" } else { "groups do not map onto nodes" },
                )
                .with_help(help)
                .with_note(format!(
                    "the {} routed experts span {ep_nodes} nodes of {} GPUs",
                    m.routed_experts, par.gpus_per_node
                ));
                self.push(d);
            }
        }
    }

    /// An explicit layout lists each stage's parts; together they hold every layer once, in
    /// order, with the embedding first and the head (and MTP) last.
    fn pipeline_layout(&mut self) {
        let pipe = &self.spec.parallel.pipeline;
        if pipe.layout.is_empty() {
            return;
        }
        let path = "parallel.pipeline.layout";
        if pipe.layout.len() as u64 != pipe.stages {
            self.error(
                Code::Pipeline,
                path,
                format!("the layout has {} stages but `stages` is {}", pipe.layout.len(), pipe.stages),
                "stage count".into(),
                "give one list per stage, or leave out `stages`",
            );
            return;
        }
        let last = pipe.layout.len() - 1;
        let mut next_layer = 0u64;
        let mut seen = (false, false, false);
        for (s, stage) in pipe.layout.iter().enumerate() {
            let sp = format!("{path}.{s}");
            if stage.is_empty() {
                self.error(
                    Code::Pipeline,
                    &sp,
                    format!("stage {s} is empty"),
                    "no layers".into(),
                    "every stage needs at least one part",
                );
            }
            for (j, part) in stage.iter().enumerate() {
                let pp = format!("{sp}.{j}");
                match *part {
                    StagePart::Embedding => {
                        seen.0 = true;
                        if s != 0 || j != 0 {
                            self.error(
                                Code::Pipeline,
                                &pp,
                                "the embedding must open the first stage".into(),
                                "here".into(),
                                "move `embedding` to the start of the first stage",
                            );
                        }
                    }
                    StagePart::Layers(r) => {
                        if r.start != next_layer {
                            let what = if r.start < next_layer { "is placed twice" } else { "is missing" };
                            let d = Diagnostic::error(
                                Code::Pipeline,
                                format!("layer {} {what} in the layout", r.start.min(next_layer)),
                            )
                            .with_label(self.at(&pp), format!("expected a range starting at {next_layer}"))
                            .with_help("the stages' layer ranges must follow each other: 0..4, 4..8, ...");
                            self.push(d);
                        }
                        next_layer = r.end;
                    }
                    StagePart::Head => {
                        seen.1 = true;
                        if s != last {
                            self.error(
                                Code::Pipeline,
                                &pp,
                                "the head must be on the last stage".into(),
                                "here".into(),
                                "move `head` to the last stage",
                            );
                        }
                    }
                    StagePart::Mtp => {
                        seen.2 = true;
                        if s != last {
                            self.error(
                                Code::Pipeline,
                                &pp,
                                "the MTP modules must be on the last stage (they share the head)".into(),
                                "here".into(),
                                "move `mtp` to the last stage",
                            );
                        }
                    }
                }
            }
        }
        let layers = self.spec.model.layers;
        if next_layer != layers {
            self.error(
                Code::Pipeline,
                path,
                format!("the layout places layers 0..{next_layer}, but the model has {layers}"),
                "does not cover the model".into(),
                "make the last range end at the layer count",
            );
        }
        if !seen.0 || !seen.1 {
            self.error(
                Code::Pipeline,
                path,
                "the layout must place `embedding` and `head`".into(),
                "missing".into(),
                "start the first stage with `embedding` and end the last with `head`",
            );
        }
        if self.spec.model.mtp.is_some() != seen.2 {
            let msg = if seen.2 {
                "the layout places `mtp`, but the model has no MTP"
            } else {
                "the layout does not place `mtp`"
            };
            self.error(
                Code::Pipeline,
                path,
                msg.into(),
                "here".into(),
                "list `mtp` on the last stage exactly when the model has an `mtp` block",
            );
        }
    }
}

/// `1 node`, `2 nodes`.
fn counted(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A token count for messages: `14.8T`, `469B`, `2.1M`.
fn tokens(n: f64) -> String {
    for (div, suffix) in [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")] {
        if n >= div {
            let v = n / div;
            let s = format!("{v:.3}");
            return format!("{}{suffix}", s.trim_end_matches('0').trim_end_matches('.'));
        }
    }
    format!("{n:.0}")
}
