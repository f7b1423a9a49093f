//! The syntax tree of a spec file and its parser. Every node carries the [`Span`] it came
//! from so that decoding and checks can point at it. The tree is generic (entries, blocks,
//! values); the meaning of keys belongs to the decoder.

use crate::diagnostics::{Code, Diagnostic, FileId, Span};
use pest::Parser as _;
use pest_derive::Parser;

#[derive(Parser)]
#[grammar = "grammar.pest"]
struct Grammar;

/// Specs are short; anything larger is refused before parsing.
pub const MAX_SOURCE_BYTES: usize = 1 << 20;
/// Deeper nesting of `{`/`[` is refused before parsing (it protects the parser's stack).
pub const MAX_NESTING: usize = 32;

/// A block's entries (the file itself is one).
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub entries: Vec<Entry>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: Ident,
    pub value: Value,
    /// `key { ... }` rather than `key = ...`.
    pub opens_block: bool,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub kind: ValueKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ValueKind {
    Number(Number),
    String(String),
    /// A bare name: an enum variant, `true`/`false`, a parameter group…
    Name(String),
    Range(RangeLit),
    List(Vec<Value>),
    Block(Block),
    /// `name { ... }`.
    Tagged(Ident, Block),
    /// `first until AT then VALUE ...`: a piecewise-constant schedule.
    Changes(Box<Value>, Vec<ChangeLit>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChangeLit {
    pub at: Value,
    pub value: Value,
}

/// A numeric literal as written (`129_280`, `2.2e-4`, `14.8T`) and its unit word.
#[derive(Clone, Debug, PartialEq)]
pub struct Number {
    pub literal: String,
    pub unit: Option<Ident>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RangeLit {
    pub start: u64,
    pub end: u64,
    pub inclusive: bool,
}

/// Parses a whole file. On a syntax error returns the one diagnostic pest produced,
/// rephrased.
pub fn parse_file(file: FileId, src: &str) -> Result<Block, Diagnostic> {
    precheck(file, src)?;
    if src.trim().is_empty() {
        return Err(Diagnostic::error(Code::Input, "the spec is empty")
            .with_label(Span::new(file, 0, 0), "nothing here")
            .with_help(crate::diagnostics::SECTIONS_HELP));
    }
    let mut pairs = Grammar::parse(Rule::file, src).map_err(|e| syntax_error(file, src, e))?;
    let file_pair = pairs.next().expect("grammar: file");
    let span = Span::new(file, 0, src.len());
    let entries = file_pair
        .into_inner()
        .filter(|p| p.as_rule() == Rule::entry)
        .map(|p| build_entry(file, p))
        .collect::<Result<_, _>>()?;
    Ok(Block { entries, span })
}

/// Parses one value (the right-hand side of `--set key.path=value`).
pub fn parse_value(file: FileId, src: &str) -> Result<Value, Diagnostic> {
    precheck(file, src)?;
    let mut pairs = Grammar::parse(Rule::lone_value, src).map_err(|e| syntax_error(file, src, e))?;
    let lone = pairs.next().expect("grammar: lone_value");
    let value = lone.into_inner().next().expect("grammar: value");
    build_value(file, value)
}

type Pair<'a> = pest::iterators::Pair<'a, Rule>;

fn span_of(file: FileId, pair: &Pair) -> Span {
    let s = pair.as_span();
    Span::new(file, s.start(), s.end())
}

fn build_entry(file: FileId, pair: Pair) -> Result<Entry, Diagnostic> {
    let span = span_of(file, &pair);
    let mut inner = pair.into_inner();
    let key_pair = inner.next().expect("grammar: entry key");
    let key = Ident { name: key_pair.as_str().to_string(), span: span_of(file, &key_pair) };
    let rhs = inner.next().expect("grammar: entry value");
    let opens_block = rhs.as_rule() == Rule::block;
    let value = if opens_block {
        let block = build_block(file, rhs)?;
        Value { span: block.span, kind: ValueKind::Block(block) }
    } else {
        build_value(file, rhs)?
    };
    // pest's span of an entry also covers whitespace and comments after it; the entry ends
    // where its value does.
    let span = Span::new(file, span.start, value.span.end);
    Ok(Entry { key, value, opens_block, span })
}

fn build_block(file: FileId, pair: Pair) -> Result<Block, Diagnostic> {
    let span = span_of(file, &pair);
    let entries = pair.into_inner().map(|p| build_entry(file, p)).collect::<Result<_, _>>()?;
    Ok(Block { entries, span })
}

/// Builds a `value` (an atom and its `until … then …` changes).
fn build_value(file: FileId, pair: Pair) -> Result<Value, Diagnostic> {
    debug_assert_eq!(pair.as_rule(), Rule::value);
    let start = pair.as_span().start();
    let mut inner = pair.into_inner();
    let first = build_atom(file, inner.next().expect("grammar: atom"))?;
    let changes = inner
        .map(|change| {
            let mut parts = change.into_inner();
            let at = build_atom(file, parts.next().expect("grammar: until"))?;
            let value = build_atom(file, parts.next().expect("grammar: then"))?;
            Ok(ChangeLit { at, value })
        })
        .collect::<Result<Vec<_>, Diagnostic>>()?;
    let Some(last) = changes.last() else {
        return Ok(first);
    };
    // Like an entry's, the value ends at its last part, not after the comments that follow.
    let span = Span::new(file, start, last.value.span.end);
    Ok(Value { kind: ValueKind::Changes(Box::new(first), changes), span })
}

fn build_atom(file: FileId, pair: Pair) -> Result<Value, Diagnostic> {
    let span = span_of(file, &pair);
    let kind = match pair.as_rule() {
        Rule::tagged => {
            let mut inner = pair.into_inner();
            let tag = inner.next().expect("grammar: tag");
            let tag = Ident { name: tag.as_str().to_string(), span: span_of(file, &tag) };
            ValueKind::Tagged(tag, build_block(file, inner.next().expect("grammar: block"))?)
        }
        Rule::block => ValueKind::Block(build_block(file, pair)?),
        Rule::list => ValueKind::List(pair.into_inner().map(|p| build_value(file, p)).collect::<Result<_, _>>()?),
        Rule::range => {
            let mut inner = pair.into_inner();
            let bound = |p: Option<Pair>| -> Result<u64, Diagnostic> {
                let p = p.expect("grammar: range bound");
                let digits: String = p.as_str().chars().filter(|c| *c != '_').collect();
                digits.parse().map_err(|_| {
                    Diagnostic::error(Code::BadNumber, "range bound is too large")
                        .with_label(span_of(file, &p), "does not fit in 64 bits")
                })
            };
            let start = bound(inner.next())?;
            let inclusive = inner.next().expect("grammar: range op").as_str() == "..=";
            let end = bound(inner.next())?;
            ValueKind::Range(RangeLit { start, end, inclusive })
        }
        Rule::number => {
            let mut inner = pair.into_inner();
            let literal = inner.next().expect("grammar: literal").as_str().to_string();
            let unit = inner.next().map(|u| Ident { name: u.as_str().to_string(), span: span_of(file, &u) });
            ValueKind::Number(Number { literal, unit })
        }
        Rule::string => {
            let raw = pair.into_inner().next().expect("grammar: chars").as_str();
            ValueKind::String(unescape(raw).map_err(|bad| {
                Diagnostic::error(Code::Syntax, format!("unknown escape `\\{bad}` in string"))
                    .with_label(span, "in this string")
                    .with_help("the escapes are \\\", \\\\, \\n and \\t")
            })?)
        }
        Rule::name => ValueKind::Name(pair.as_str().to_string()),
        other => unreachable!("grammar: unexpected atom {other:?}"),
    };
    Ok(Value { kind, span })
}

fn unescape(raw: &str) -> Result<String, char> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('"') => out.push('"'),
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(other) => return Err(other),
            None => return Err(' '),
        }
    }
    Ok(out)
}

/// Turns pest's error into a diagnostic that says what was expected in words.
fn syntax_error(file: FileId, src: &str, e: pest::error::Error<Rule>) -> Diagnostic {
    let pos = match e.location {
        pest::error::InputLocation::Pos(p) => p,
        pest::error::InputLocation::Span((s, _)) => s,
    };
    let end = src[pos..].chars().next().map_or(pos, |c| pos + c.len_utf8());
    let expected = match &e.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => {
            let mut words: Vec<&str> = positives.iter().filter_map(|r| describe(*r)).collect();
            words.sort_unstable();
            words.dedup();
            words
        }
        pest::error::ErrorVariant::CustomError { .. } => vec![],
    };
    let found = match src[pos..].chars().next() {
        None => "end of file".to_string(),
        Some(c) if c.is_whitespace() => "whitespace".to_string(),
        Some(c) => format!("`{c}`"),
    };
    let message = if expected.is_empty() {
        format!("unexpected {found}")
    } else {
        format!("expected {}, found {found}", join_or(&expected))
    };
    let mut d = Diagnostic::error(Code::Syntax, message).with_label(Span::new(file, pos, end), "here");
    if src[..pos].matches('{').count() > src[..pos].matches('}').count() && found == "end of file" {
        d = d.with_help("a block is not closed: add the missing `}`");
    }
    if found == "`=`" {
        d = d.with_help("is the value of the key before this one missing?");
    }
    d
}

fn describe(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::entry | Rule::key => "a key",
        Rule::value
        | Rule::tagged
        | Rule::block
        | Rule::list
        | Rule::range
        | Rule::number
        | Rule::literal
        | Rule::string
        | Rule::name => "a value",
        Rule::EOI => "end of file",
        Rule::unit => "a unit",
        _ => return None,
    })
}

fn join_or(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

fn precheck(file: FileId, src: &str) -> Result<(), Diagnostic> {
    if src.len() > MAX_SOURCE_BYTES {
        return Err(Diagnostic::error(
            Code::Syntax,
            format!("the spec is {} bytes; specs are limited to {} bytes", src.len(), MAX_SOURCE_BYTES),
        )
        .with_label(Span::new(file, 0, 0), "file starts here")
        .with_help("is this the right file? a spec describes one training job in a few hundred lines"));
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut chars = src.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => in_string = !in_string,
            '\\' if in_string => {
                chars.next();
            }
            '/' if !in_string && chars.peek().map(|p| p.1) == Some('/') => {
                while chars.next_if(|p| p.1 != '\n').is_some() {}
            }
            '{' | '[' if !in_string => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(Diagnostic::error(Code::Syntax, format!("nesting deeper than {MAX_NESTING} levels"))
                        .with_label(Span::new(file, i, i + 1), "too deep here"));
                }
            }
            '}' | ']' if !in_string => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}
