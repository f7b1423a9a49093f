//! Where training is and what the recipe prescribes there. [`Progress`] counts optimizer steps
//! and tokens; from it and the spec's [`Train`] come the global batch of the next step
//! ([`batch_sequences`]), the learning rate ([`lr_at`]) and the value of any piecewise-constant
//! [`Schedule`], such as the bias-update speed γ or the MTP weight λ ([`scheduled`]). A position
//! is compared in the unit it is written in: steps with [`Progress::step`], tokens with
//! [`Progress::tokens`]. Only where an LR phase's start and end are in different units is the
//! start converted, with the spec's closed-form relation between steps and tokens
//! ([`Train::tokens_at_step`] and its inverse here), the relation the checker validates phases
//! with; it ignores the rounding of a ramped batch to whole micro-batches.

use dsc_lang::{Batch, LrPhase, LrShape, PhaseEnd, Position, Schedule, Train};
use std::f64::consts::PI;

/// How far training has come: optimizer steps done and tokens seen before the next step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub step: u64,
    pub tokens: u64,
}

impl Progress {
    /// Whether training has reached `position`, compared in the position's own unit.
    pub fn reached(self, position: Position) -> bool {
        match position {
            Position::Steps(steps) => self.step >= steps,
            Position::Tokens(tokens) => self.tokens >= tokens,
        }
    }

    /// This progress counted in `unit`.
    fn count(self, unit: Unit) -> f64 {
        match unit {
            Unit::Steps => self.step as f64,
            Unit::Tokens => self.tokens as f64,
        }
    }
}

/// The global batch, in sequences, of the step that starts after `tokens` tokens: the spec's
/// constant batch, or its ramp `from + (to − from) · tokens / over` (linear in tokens, as
/// [`Train::batch_at`]) rounded down to a multiple of `granularity` (data-parallel size ×
/// micro-batch) and kept within `from..=to`. Exact integer arithmetic.
pub fn batch_sequences(train: &Train, granularity: u64, tokens: u64) -> u64 {
    match train.batch {
        Batch::Constant { sequences } => sequences,
        Batch::Ramp { from, to, over_tokens } => {
            let over = over_tokens.max(1);
            let grown = u128::from(to.saturating_sub(from)) * u128::from(tokens.min(over)) / u128::from(over);
            let batch = u128::from(from) + grown;
            let granularity = u128::from(granularity.max(1));
            let rounded = u64::try_from(batch / granularity * granularity).unwrap_or(u64::MAX);
            rounded.max(from).min(to)
        }
    }
}

/// The learning rate at `at`. The phases of `train.lr` follow each other: the first starts at
/// step 0 with LR 0, each later one where the previous ended and at the LR it ended at, and an
/// open last phase runs to the token budget. Inside a phase the LR follows its shape over the
/// fraction of the phase done, measured in the unit of the phase's end (tokens for an open
/// phase); past the last phase it stays at that phase's value.
pub fn lr_at(train: &Train, at: Progress) -> f64 {
    let mut start = Point::from(Position::Steps(0));
    let mut lr = 0.0;
    for phase in &train.lr {
        let span = Span::of_phase(train, phase, start);
        if !span.ended(at) {
            return shaped(phase.shape, lr, phase.to, span.fraction(at));
        }
        start = span.end_point();
        lr = phase.to;
    }
    lr
}

/// The value of a piecewise-constant schedule at `at`: that of the last change reached, or
/// `first` before any.
pub fn scheduled(schedule: &Schedule, at: Progress) -> f64 {
    schedule.changes.iter().rev().find(|change| at.reached(change.at)).map_or(schedule.first, |change| change.value)
}

/// The LR between `from` and `to` after `fraction` (in [0, 1]) of a phase of this shape.
fn shaped(shape: LrShape, from: f64, to: f64, fraction: f64) -> f64 {
    match shape {
        LrShape::Linear => from + (to - from) * fraction,
        LrShape::Cosine => to + (from - to) * (1.0 + (PI * fraction).cos()) / 2.0,
        LrShape::Constant => to,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Steps,
    Tokens,
}

/// A point of training in one unit; fractional where it was converted from the other unit or
/// lies a fractional length after such a point.
#[derive(Clone, Copy, Debug)]
struct Point {
    unit: Unit,
    count: f64,
}

impl From<Position> for Point {
    fn from(position: Position) -> Self {
        match position {
            Position::Steps(steps) => Point { unit: Unit::Steps, count: steps as f64 },
            Position::Tokens(tokens) => Point { unit: Unit::Tokens, count: tokens as f64 },
        }
    }
}

impl Point {
    /// This point counted in `unit`.
    fn count_in(self, unit: Unit, train: &Train) -> f64 {
        match (self.unit, unit) {
            (Unit::Steps, Unit::Tokens) => train.tokens_at_step(self.count),
            (Unit::Tokens, Unit::Steps) => train.steps_at_tokens(self.count),
            _ => self.count,
        }
    }
}

/// One LR phase as a start and an end counted in the same unit.
#[derive(Clone, Copy, Debug)]
struct Span {
    unit: Unit,
    start: f64,
    end: f64,
}

impl Span {
    /// The span of `phase` when it starts at `start`; a `For` length counts from `start`
    /// converted to the length's unit.
    fn of_phase(train: &Train, phase: &LrPhase, start: Point) -> Span {
        let (end, relative) = match phase.end {
            Some(PhaseEnd::Until(end)) => (Point::from(end), false),
            Some(PhaseEnd::For(length)) => (Point::from(length), true),
            None => (Point::from(Position::Tokens(train.tokens)), false),
        };
        let start = start.count_in(end.unit, train);
        let end_count = if relative { start + end.count } else { end.count };
        Span { unit: end.unit, start, end: end_count }
    }

    fn ended(self, at: Progress) -> bool {
        at.count(self.unit) >= self.end
    }

    /// The fraction of the span done at `at`, in [0, 1] (1 for an empty span).
    fn fraction(self, at: Progress) -> f64 {
        if self.end <= self.start {
            return 1.0;
        }
        ((at.count(self.unit) - self.start) / (self.end - self.start)).clamp(0.0, 1.0)
    }

    fn end_point(self) -> Point {
        Point { unit: self.unit, count: self.end }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsc_lang::{Change, Spec};
    use std::path::Path;

    fn spec(file: &str) -> Spec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models").join(file);
        let loaded = dsc_lang::load(&path, &[]);
        loaded.checked_spec().unwrap_or_else(|| panic!("{file} does not check")).clone()
    }

    fn at_tokens(train: &Train, tokens: f64) -> Progress {
        Progress { step: train.steps_at_tokens(tokens).floor() as u64, tokens: tokens as u64 }
    }

    fn at_step(train: &Train, step: u64) -> Progress {
        Progress { step, tokens: train.tokens_at_step(step as f64).round() as u64 }
    }

    fn assert_close(actual: f64, expected: f64, relative: f64) {
        assert!(
            (actual - expected).abs() <= relative * expected.abs(),
            "{actual:e} is not within {relative:e} (relative) of {expected:e}"
        );
    }

    fn moe_bias_speed(spec: &Spec) -> &Schedule {
        spec.model
            .ffn
            .iter()
            .find_map(|range| match &range.ffn {
                dsc_lang::Ffn::Moe(moe) => Some(&moe.bias_speed),
                dsc_lang::Ffn::Dense { .. } => None,
            })
            .expect("a MoE layer range")
    }

    #[test]
    fn v3_warms_up_over_2k_steps_in_steps() {
        let train = spec("deepseek-v3.dsc").train;
        assert_eq!(lr_at(&train, at_step(&train, 0)), 0.0);
        assert_close(lr_at(&train, at_step(&train, 1000)), 1.1e-4, 1e-12);
        assert_close(lr_at(&train, at_step(&train, 1999)), 2.2e-4 * 1999.0 / 2000.0, 1e-12);
        assert_eq!(lr_at(&train, at_step(&train, 2000)), 2.2e-4);
    }

    #[test]
    fn v3_holds_then_decays_in_tokens() {
        let train = spec("deepseek-v3.dsc").train;
        assert_eq!(lr_at(&train, at_tokens(&train, 5e12)), 2.2e-4);
        assert_eq!(lr_at(&train, at_tokens(&train, 10e12 - 1.0)), 2.2e-4);
        assert_eq!(lr_at(&train, at_tokens(&train, 10e12)), 2.2e-4);
        assert_close(lr_at(&train, at_tokens(&train, 10e12 + 2.15e12)), (2.2e-4 + 2.2e-5) / 2.0, 1e-12);
        let quarter = 2.2e-5 + (2.2e-4 - 2.2e-5) * (1.0 + (PI / 4.0).cos()) / 2.0;
        assert_close(lr_at(&train, at_tokens(&train, 10e12 + 1.075e12)), quarter, 1e-12);
        assert_close(lr_at(&train, at_tokens(&train, 14.3e12)), 2.2e-5, 1e-12);
        assert_eq!(lr_at(&train, at_tokens(&train, 14.5e12)), 2.2e-5);
        assert_eq!(lr_at(&train, at_tokens(&train, 14.633e12 - 1.0)), 2.2e-5);
        assert_eq!(lr_at(&train, at_tokens(&train, 14.633e12)), 7.3e-6);
        assert_eq!(lr_at(&train, at_tokens(&train, 14.7e12)), 7.3e-6);
        assert_eq!(lr_at(&train, at_tokens(&train, 14.8e12)), 7.3e-6);
        assert_eq!(lr_at(&train, at_tokens(&train, 20e12)), 7.3e-6);
    }

    #[test]
    fn v3_schedules_change_at_their_token_positions() {
        let spec = spec("deepseek-v3.dsc");
        let train = &spec.train;
        let bias_speed = moe_bias_speed(&spec);
        assert_eq!(scheduled(bias_speed, at_tokens(train, 0.0)), 0.001);
        assert_eq!(scheduled(bias_speed, at_tokens(train, 14.3e12 - 1.0)), 0.001);
        assert_eq!(scheduled(bias_speed, at_tokens(train, 14.3e12)), 0.0);
        assert_eq!(scheduled(bias_speed, at_tokens(train, 14.8e12)), 0.0);
        let mtp_weight = &spec.model.mtp.as_ref().expect("V3 has MTP").loss_weight;
        assert_eq!(scheduled(mtp_weight, at_tokens(train, 0.0)), 0.3);
        assert_eq!(scheduled(mtp_weight, at_tokens(train, 10e12 - 1.0)), 0.3);
        assert_eq!(scheduled(mtp_weight, at_tokens(train, 10e12)), 0.1);
    }

    #[test]
    fn scheduled_compares_each_change_in_its_own_unit() {
        let schedule = Schedule {
            first: 1.0,
            changes: vec![
                Change { at: Position::Steps(10), value: 2.0 },
                Change { at: Position::Tokens(5000), value: 3.0 },
            ],
        };
        assert_eq!(scheduled(&schedule, Progress { step: 9, tokens: 4000 }), 1.0);
        assert_eq!(scheduled(&schedule, Progress { step: 10, tokens: 4000 }), 2.0);
        assert_eq!(scheduled(&schedule, Progress { step: 11, tokens: 5000 }), 3.0);
        assert_eq!(scheduled(&Schedule::constant(0.5), Progress { step: 7, tokens: 7 }), 0.5);
    }

    #[test]
    fn v3_batch_ramps_linearly_in_tokens_by_whole_data_parallel_steps() {
        let spec = spec("deepseek-v3.dsc");
        let granularity = spec.parallel.data.size * spec.train.micro_batch;
        assert_eq!(granularity, 128);
        let batch = |tokens: u64| batch_sequences(&spec.train, granularity, tokens);
        assert_eq!(batch(0), 3072);
        assert_eq!(batch(234_500_000_000), 9216);
        assert_eq!(batch(469_000_000_000), 15360);
        assert_eq!(batch(14_800_000_000_000), 15360);
        // 3072 + 12288 · 100/469 = 5692.04…, rounded down to a multiple of 128.
        assert_eq!(batch(100_000_000_000), 5632);
        let mut previous = 0;
        for tokens in (0..=500_000_000_000u64).step_by(1_000_000_000) {
            let b = batch(tokens);
            assert!(b.is_multiple_of(granularity) && (3072..=15360).contains(&b) && b >= previous, "{b} at {tokens}");
            previous = b;
        }
    }

    #[test]
    fn constant_batch_is_the_spec_batch() {
        let train = spec("deepseek-v3-tiny.dsc").train;
        assert_eq!(batch_sequences(&train, 4, 0), 8);
        assert_eq!(batch_sequences(&train, 4, 1 << 40), 8);
    }

    #[test]
    fn tiny_warms_up_in_steps_then_decays_in_tokens() {
        let train = spec("deepseek-v3-tiny.dsc").train;
        let lr = |step: u64| lr_at(&train, Progress { step, tokens: step * 512 });
        assert_eq!(lr(0), 0.0);
        assert_close(lr(10), 1.5e-3, 1e-12);
        assert_close(lr(19), 3e-3 * 19.0 / 20.0, 1e-12);
        assert_eq!(lr(20), 3e-3);
        let end_of_warmup = 20.0 * 512.0;
        let cosine = |tokens: f64| 3e-4 + 2.7e-3 * (1.0 + (PI * (tokens - end_of_warmup) / 92_160.0).cos()) / 2.0;
        assert_close(lr(21), cosine(21.0 * 512.0), 1e-12);
        assert_close(lr(110), 1.65e-3, 1e-12);
        assert_close(lr(199), cosine(199.0 * 512.0), 1e-12);
        assert_eq!(lr(200), 3e-4);
        assert_eq!(lr(250), 3e-4);
    }

    #[test]
    fn a_phase_in_steps_after_a_phase_in_tokens_starts_at_the_converted_step() {
        // 100 tokens per step: the linear phase ends at 1050 tokens = step 10.5, and the
        // cosine phase runs 10 steps from there.
        let mut train = spec("deepseek-v3-tiny.dsc").train;
        train.seq_len = 25;
        train.batch = Batch::Constant { sequences: 4 };
        train.tokens = 3000;
        train.lr = vec![
            LrPhase { shape: LrShape::Linear, end: Some(PhaseEnd::For(Position::Tokens(1050))), to: 1.0 },
            LrPhase { shape: LrShape::Cosine, end: Some(PhaseEnd::For(Position::Steps(10))), to: 0.0 },
            LrPhase { shape: LrShape::Constant, end: None, to: 0.25 },
        ];
        let lr = |step: u64| lr_at(&train, Progress { step, tokens: step * 100 });
        assert_close(lr(5), 500.0 / 1050.0, 1e-12);
        assert_close(lr(10), 1000.0 / 1050.0, 1e-12);
        assert_close(lr(11), (1.0 + (PI * 0.05).cos()) / 2.0, 1e-12);
        assert_close(lr(15), (1.0 + (PI * 0.45).cos()) / 2.0, 1e-12);
        assert_close(lr(20), (1.0 + (PI * 0.95).cos()) / 2.0, 1e-12);
        assert_eq!(lr(21), 0.25);
        assert_eq!(lr(40), 0.25);
    }

    #[test]
    fn steps_at_tokens_inverts_tokens_at_step() {
        for file in ["deepseek-v3.dsc", "deepseek-v3-tiny.dsc"] {
            let train = spec(file).train;
            for steps in [0.0, 1.0, 2000.0, 30_000.0, 500_000.0] {
                let back = train.steps_at_tokens(train.tokens_at_step(steps));
                assert!((back - steps).abs() <= 1e-9 * steps.max(1.0), "{file}: {steps} steps came back as {back}");
            }
        }
    }
}
