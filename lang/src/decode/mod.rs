//! Typed decoding of the syntax tree: the [`Decode`] trait for leaf types (numbers with
//! suffixes and units, names, ranges, lists, schedules) and [`Fields`], which reads a block's
//! entries by key and reports unknown keys ("did you mean"), missing and duplicate keys. Every
//! decoded value's span is recorded under its dotted path (`model.ffn.1.top_k`) in a
//! [`SpanMap`] so that later checks can point at it. Decoding never stops at the first
//! error: it reports all of them and yields `None` where a value is unusable.

mod number;
pub mod schema;

use crate::diagnostics::{Code, Diagnostic, Span};
use crate::syntax::{Block, Entry, Value, ValueKind};
use crate::{LayerRange, Position};
use std::collections::BTreeMap;
use std::num::NonZeroU64;

pub use number::Decimal;

/// Where each decoded value came from, by dotted path.
pub type SpanMap = BTreeMap<String, Span>;

/// The decoding context: diagnostics so far and the spans of decoded values.
#[derive(Default)]
pub struct Cx {
    pub diagnostics: Vec<Diagnostic>,
    pub spans: SpanMap,
}

impl Cx {
    /// Decodes `v` as a `T`, recording its span under `path` (for a block, only its opening
    /// `tag {`, so that a diagnostic about it does not underline the whole block).
    pub fn decode<T: Decode>(&mut self, v: &Value, path: &str) -> Option<T> {
        let span = match &v.kind {
            ValueKind::Tagged(_, b) | ValueKind::Block(b) => Span::new(v.span.file, v.span.start, b.span.start + 1),
            _ => v.span,
        };
        self.spans.insert(path.to_string(), span);
        T::decode(v, self, path)
    }

    pub fn report(&mut self, d: Diagnostic) {
        self.diagnostics.push(d);
    }

    /// Reports that `v` is not what was expected; always `None`.
    pub fn wrong_type<T>(&mut self, v: &Value, expected: &str) -> Option<T> {
        let mut d = Diagnostic::error(Code::WrongType, format!("expected {expected}, found {}", describe(v)))
            .with_label(v.span, format!("expected {expected}"));
        if let ValueKind::Name(n) = &v.kind {
            if n.starts_with(|c: char| c.is_ascii_digit()) {
                d = d.with_help(
                    "numbers take the suffixes K, M, B, T (powers of 1000) and Ki, Mi (powers of \
                     1024); a unit is a separate word: `80 GB`, `2K steps`",
                );
            }
        }
        self.report(d);
        None
    }

    /// The entries of a plain `{ ... }` block, anchored at `anchor` for "missing key" errors.
    pub fn fields<'a>(&mut self, v: &'a Value, path: &str) -> Option<Fields<'a>> {
        match &v.kind {
            ValueKind::Block(block) => Some(Fields::new(self, block, path, first_line(v.span, block))),
            _ => self.wrong_type(v, "a `{ ... }` block"),
        }
    }

    /// A tagged block `tag { ... }` (or a bare `tag` meaning an empty block): which of `tags`
    /// it is, and its fields.
    pub fn tagged<'a>(&mut self, v: &'a Value, path: &str, tags: &[&'static str]) -> Option<(usize, Fields<'a>)> {
        static EMPTY: Block = Block { entries: Vec::new(), span: Span { file: 0, start: 0, end: 0 } };
        let (tag, tag_span, block) = match &v.kind {
            ValueKind::Tagged(tag, block) => (tag.name.as_str(), tag.span, block),
            ValueKind::Name(name) => (name.as_str(), v.span, &EMPTY),
            _ => {
                let expected = format!("{} {{ ... }}", one_of(tags));
                return self.wrong_type(v, &expected);
            }
        };
        let Some(index) = tags.iter().position(|t| *t == tag) else {
            self.unknown_name(tag, tag_span, tags);
            return None;
        };
        self.spans.insert(format!("{path}.kind"), tag_span);
        Some((index, Fields::new(self, block, path, tag_span)))
    }

    /// A bare name that must be one of `names`.
    pub fn name(&mut self, v: &Value, names: &[&'static str]) -> Option<usize> {
        let ValueKind::Name(name) = &v.kind else {
            return self.wrong_type(v, &one_of(names));
        };
        let found = names.iter().position(|n| n == name);
        if found.is_none() {
            self.unknown_name(name, v.span, names);
        }
        found
    }

    fn unknown_name(&mut self, name: &str, span: Span, names: &[&'static str]) {
        let mut d = Diagnostic::error(Code::UnknownName, format!("unknown name `{name}`"))
            .with_label(span, format!("expected {}", one_of(names)));
        if let Some(s) = did_you_mean(name, names) {
            d = d.with_help(format!("did you mean `{s}`?"));
        }
        self.report(d);
    }

    fn number(&mut self, v: &Value, allowed_units: &[&str]) -> Option<(Decimal, Option<String>)> {
        let ValueKind::Number(n) = &v.kind else {
            return self.wrong_type(v, "a number");
        };
        let decimal = match Decimal::parse(&n.literal) {
            Ok(d) => d,
            Err(msg) => {
                self.report(Diagnostic::error(Code::BadNumber, msg).with_label(v.span, "this number"));
                return None;
            }
        };
        let unit = n.unit.as_ref().map(|u| u.name.clone());
        match (&unit, allowed_units) {
            (None, _) => Some((decimal, None)),
            (Some(u), allowed) if allowed.contains(&u.as_str()) => Some((decimal, unit)),
            (Some(u), []) => {
                let span = n.unit.as_ref().map_or(v.span, |u| u.span);
                self.report(
                    Diagnostic::error(Code::BadNumber, format!("unexpected unit `{u}`"))
                        .with_label(span, "this value takes a plain number")
                        .with_help("remove the unit"),
                );
                None
            }
            (Some(u), allowed) => {
                let span = n.unit.as_ref().map_or(v.span, |u| u.span);
                self.report(
                    Diagnostic::error(Code::BadNumber, format!("unit `{u}` does not fit here"))
                        .with_label(span, format!("expected {}", one_of(allowed))),
                );
                None
            }
        }
    }

    fn whole(&mut self, v: &Value, d: Decimal) -> Option<u64> {
        match d.to_u64() {
            Ok(n) => Some(n),
            Err(msg) => {
                self.report(Diagnostic::error(Code::BadNumber, msg).with_label(v.span, "this number"));
                None
            }
        }
    }
}

/// A value that can be read from the syntax tree.
pub trait Decode: Sized {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self>;
}

/// The entries of one block, read by key.
pub struct Fields<'a> {
    block: &'a Block,
    path: String,
    /// Where "missing key" errors point: the key or tag that opened the block.
    anchor: Span,
    used: Vec<bool>,
    known: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    /// Also reports keys given twice.
    pub fn new(cx: &mut Cx, block: &'a Block, path: &str, anchor: Span) -> Self {
        for (i, e) in block.entries.iter().enumerate() {
            if let Some(first) = block.entries[..i].iter().find(|p| p.key.name == e.key.name) {
                cx.report(
                    Diagnostic::error(Code::DuplicateKey, format!("`{}` is given twice", e.key.name))
                        .with_label(e.key.span, "given again here")
                        .with_label(first.key.span, "first given here")
                        .with_help("remove one of them"),
                );
            }
        }
        Fields { block, path: path.to_string(), anchor, used: vec![false; block.entries.len()], known: vec![] }
    }

    pub fn path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The first entry for `key`; later ones were reported as duplicates and count as used.
    fn find(&mut self, key: &'static str) -> Option<&'a Entry> {
        self.known.push(key);
        let mut first = None;
        for (i, e) in self.block.entries.iter().enumerate().filter(|(_, e)| e.key.name == key) {
            self.used[i] = true;
            first.get_or_insert(e);
        }
        first
    }

    /// A required key.
    pub fn req<T: Decode>(&mut self, cx: &mut Cx, key: &'static str) -> Option<T> {
        match self.find(key) {
            Some(e) => cx.decode(&e.value, &self.path(key)),
            None => {
                let whole = if self.path.is_empty() { key.to_string() } else { self.path(key) };
                cx.report(
                    Diagnostic::error(Code::MissingKey, format!("missing `{whole}`"))
                        .with_label(self.anchor, format!("this needs `{key}`"))
                        .with_help(format!("add `{key} = ...`")),
                );
                None
            }
        }
    }

    /// An optional key: `Some(None)` when absent, `None` when present but wrong.
    pub fn opt<T: Decode>(&mut self, cx: &mut Cx, key: &'static str) -> Option<Option<T>> {
        match self.find(key) {
            Some(e) => cx.decode(&e.value, &self.path(key)).map(Some),
            None => Some(None),
        }
    }

    /// An optional key with a default.
    pub fn or<T: Decode>(&mut self, cx: &mut Cx, key: &'static str, default: T) -> Option<T> {
        self.opt(cx, key).map(|v| v.unwrap_or(default))
    }

    /// The raw value of a key, for decoders that need more than one type.
    pub fn raw(&mut self, key: &'static str) -> Option<&'a Value> {
        self.find(key).map(|e| &e.value)
    }

    /// Reports every key that no `req`/`opt`/`or`/`raw` asked for.
    pub fn finish(self, cx: &mut Cx) {
        for (e, used) in self.block.entries.iter().zip(&self.used) {
            if *used {
                continue;
            }
            let where_ =
                if self.path.is_empty() { "at the top level".to_string() } else { format!("in `{}`", self.path) };
            let mut d = Diagnostic::error(Code::UnknownKey, format!("unknown key `{}` {where_}", e.key.name))
                .with_label(e.key.span, "unknown key");
            d = match did_you_mean(&e.key.name, &self.known) {
                Some(s) => d.with_help(format!("did you mean `{s}`?")),
                None => d.with_help(format!("the keys here are {}", one_of(&self.known))),
            };
            cx.report(d);
        }
    }
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.as_slice() {
        [] => "nothing".into(),
        [one] => one.clone(),
        [init @ .., last] => format!("one of {} or {last}", init.join(", ")),
    }
}

fn describe(v: &Value) -> String {
    match &v.kind {
        ValueKind::Number(n) => match &n.unit {
            Some(u) => format!("`{} {}`", n.literal, u.name),
            None => format!("the number `{}`", n.literal),
        },
        ValueKind::String(s) => format!("the string {s:?}"),
        ValueKind::Name(n) => format!("the name `{n}`"),
        ValueKind::Range(_) => "a range".into(),
        ValueKind::List(_) => "a list".into(),
        ValueKind::Block(_) => "a block".into(),
        ValueKind::Tagged(t, _) => format!("a `{} {{ ... }}` block", t.name),
        ValueKind::Changes(..) => "a schedule (`... until ... then ...`)".into(),
    }
}

/// A block's first line, for pointing at it without underlining all of it.
fn first_line(span: Span, block: &Block) -> Span {
    let end = block.entries.first().map_or(span.end, |e| e.span.start.max(span.start + 1));
    Span::new(span.file, span.start, end.min(span.start + 1))
}

impl Decode for u64 {
    fn decode(v: &Value, cx: &mut Cx, _: &str) -> Option<Self> {
        let (d, _) = cx.number(v, &[])?;
        cx.whole(v, d)
    }
}

impl Decode for NonZeroU64 {
    fn decode(v: &Value, cx: &mut Cx, _: &str) -> Option<Self> {
        let (d, _) = cx.number(v, &[])?;
        let n = cx.whole(v, d)?;
        let nz = NonZeroU64::new(n);
        if nz.is_none() {
            cx.report(Diagnostic::error(Code::OutOfRange, "this must be at least 1").with_label(v.span, "found 0"));
        }
        nz
    }
}

impl Decode for f64 {
    fn decode(v: &Value, cx: &mut Cx, _: &str) -> Option<Self> {
        let (d, _) = cx.number(v, &[])?;
        Some(d.to_f64())
    }
}

impl Decode for bool {
    fn decode(v: &Value, cx: &mut Cx, _: &str) -> Option<Self> {
        cx.name(v, &["true", "false"]).map(|i| i == 0)
    }
}

impl Decode for String {
    fn decode(v: &Value, cx: &mut Cx, _: &str) -> Option<Self> {
        match &v.kind {
            ValueKind::String(s) => Some(s.clone()),
            _ => cx.wrong_type(v, "a string"),
        }
    }
}

impl Decode for Position {
    fn decode(v: &Value, cx: &mut Cx, _: &str) -> Option<Self> {
        let (d, unit) = cx.number(v, &["steps", "tokens"])?;
        let n = cx.whole(v, d)?;
        match unit.as_deref() {
            Some("steps") => Some(Position::Steps(n)),
            Some("tokens") => Some(Position::Tokens(n)),
            _ => {
                cx.report(
                    Diagnostic::error(Code::BadNumber, "a position in training needs a unit")
                        .with_label(v.span, "steps or tokens?")
                        .with_help(format!("write `{} steps` or `{} tokens`", literal(v), literal(v))),
                );
                None
            }
        }
    }
}

/// A memory size: a number with `GB`, `GiB` or `TB`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bytes(pub u64);

impl Decode for Bytes {
    fn decode(v: &Value, cx: &mut Cx, _: &str) -> Option<Self> {
        let (d, unit) = cx.number(v, &["GB", "GiB", "TB"])?;
        let scale: u64 = match unit.as_deref() {
            Some("GB") => 1_000_000_000,
            Some("GiB") => 1 << 30,
            Some("TB") => 1_000_000_000_000,
            _ => {
                cx.report(
                    Diagnostic::error(Code::BadNumber, "a memory size needs a unit")
                        .with_label(v.span, "GB, GiB or TB?")
                        .with_help(format!("write `{} GB`", literal(v))),
                );
                return None;
            }
        };
        match d.times(scale).and_then(|d| d.to_u64()) {
            Ok(n) => Some(Bytes(n)),
            Err(msg) => {
                cx.report(Diagnostic::error(Code::BadNumber, msg).with_label(v.span, "this size"));
                None
            }
        }
    }
}

impl Decode for LayerRange {
    fn decode(v: &Value, cx: &mut Cx, _: &str) -> Option<Self> {
        let ValueKind::Range(r) = &v.kind else {
            return cx.wrong_type(v, "a layer range like `0..3`");
        };
        let end = if r.inclusive { r.end.checked_add(1) } else { Some(r.end) };
        match end {
            Some(end) if end > r.start => Some(LayerRange { start: r.start, end }),
            _ => {
                cx.report(
                    Diagnostic::error(Code::LayerRanges, "empty layer range")
                        .with_label(v.span, "this range holds no layer")
                        .with_help("ranges are half-open: `0..3` is layers 0, 1 and 2"),
                );
                None
            }
        }
    }
}

impl<T: Decode> Decode for Vec<T> {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let ValueKind::List(items) = &v.kind else {
            return cx.wrong_type(v, "a list `[...]`");
        };
        let decoded: Vec<Option<T>> =
            items.iter().enumerate().map(|(i, item)| cx.decode(item, &format!("{path}.{i}"))).collect();
        decoded.into_iter().collect()
    }
}

impl Decode for [u64; 2] {
    fn decode(v: &Value, cx: &mut Cx, path: &str) -> Option<Self> {
        let items: Vec<NonZeroU64> = Vec::decode(v, cx, path)?;
        match items.as_slice() {
            [a, b] => Some([a.get(), b.get()]),
            _ => cx.wrong_type(v, "a pair `[rows, cols]`"),
        }
    }
}

fn literal(v: &Value) -> &str {
    match &v.kind {
        ValueKind::Number(n) => &n.literal,
        _ => "N",
    }
}

/// Implements [`Decode`] for a fieldless enum spelled as bare names.
macro_rules! decode_names {
    ($ty:ty { $($name:literal => $variant:expr),+ $(,)? }) => {
        impl $crate::decode::Decode for $ty {
            fn decode(v: &$crate::syntax::Value, cx: &mut $crate::decode::Cx, _: &str) -> Option<Self> {
                cx.name(v, &[$($name),+]).map(|i| [$($variant),+][i])
            }
        }
    };
}
pub(crate) use decode_names;
