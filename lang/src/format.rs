//! The canonical text of a spec (`dsc fmt`): two-space indentation, `=` aligned within runs
//! of one-line entries, small blocks and lists on one line when they fit in 100 columns,
//! comments and single blank lines kept where they were. Formatting is idempotent and the
//! result parses back to the same tree.

use crate::syntax::{Block, Entry, Value, ValueKind};

const WIDTH: usize = 100;
const INDENT: &str = "  ";

/// A `//` comment in the source.
struct Comment {
    start: usize,
    text: String,
    /// Nothing but whitespace precedes it on its line.
    own_line: bool,
}

/// Formats a parsed file; `src` is the text it was parsed from (for comments and blank lines).
pub fn format_file(tree: &Block, src: &str) -> String {
    let mut p = Printer { src, comments: comments(src), next: 0, out: String::new() };
    p.entries(&tree.entries, 0, src.len());
    let mut out = p.out.trim_end().to_string();
    out.push('\n');
    out
}

fn comments(src: &str) -> Vec<Comment> {
    let mut found = vec![];
    let bytes = src.as_bytes();
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => {
                let end = src[i..].find('\n').map_or(src.len(), |n| i + n);
                let line_start = src[..i].rfind('\n').map_or(0, |n| n + 1);
                let own_line = src[line_start..i].trim().is_empty();
                found.push(Comment { start: i, text: src[i..end].trim_end().to_string(), own_line });
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

struct Printer<'a> {
    src: &'a str,
    comments: Vec<Comment>,
    /// The first comment not yet printed.
    next: usize,
    out: String,
}

impl Printer<'_> {
    fn has_comments(&self, start: usize, end: usize) -> bool {
        self.comments[self.next..].iter().any(|c| c.start >= start && c.start < end)
    }

    fn indent(&mut self, depth: usize) {
        for _ in 0..depth {
            self.out.push_str(INDENT);
        }
    }

    /// Prints the comments before `offset` on their own lines, keeping a blank line before
    /// each where the source had one; `last_end` is where the previous item ended.
    fn leading_comments(&mut self, offset: usize, depth: usize, last_end: &mut Option<usize>) {
        while let Some(c) = self.comments.get(self.next).filter(|c| c.start < offset) {
            let (start, text) = (c.start, c.text.clone());
            self.blank_line_if_any(*last_end, start);
            self.indent(depth);
            self.out.push_str(&text);
            self.out.push('\n');
            self.next += 1;
            *last_end = Some(start + text.len());
        }
    }

    /// Keeps one blank line where the source has at least one between `from` and `to`.
    fn blank_line_if_any(&mut self, from: Option<usize>, to: usize) {
        if self.blank_between(from, to) {
            self.out.push('\n');
        }
    }

    /// Prints a comment that follows `end` on the same line.
    fn trailing_comment(&mut self, end: usize) {
        if let Some(c) = self.comments.get(self.next) {
            if !c.own_line && !self.src[end..c.start].contains('\n') {
                self.out.push(' ');
                self.out.push_str(&c.text.clone());
                self.next += 1;
            }
        }
    }

    fn entries(&mut self, entries: &[Entry], depth: usize, block_end: usize) {
        let mut run_width: Option<usize> = None;
        let mut last_end: Option<usize> = None;
        for (i, e) in entries.iter().enumerate() {
            let before = last_end;
            self.leading_comments(e.span.start, depth, &mut last_end);
            self.blank_line_if_any(last_end, e.span.start);
            if last_end != before || self.blank_between(last_end, e.span.start) || run_width.is_none() {
                run_width = Some(self.run_width(&entries[i..], depth));
            }
            self.indent(depth);
            let one_line = self.entry(e, depth, run_width.unwrap_or(0));
            self.trailing_comment(e.span.end);
            self.out.push('\n');
            if !one_line {
                run_width = None;
            }
            last_end = Some(e.span.end);
        }
        self.leading_comments(block_end, depth, &mut last_end);
    }

    fn blank_between(&self, from: Option<usize>, to: usize) -> bool {
        from.is_some_and(|from| self.src[from..to].matches('\n').count() >= 2)
    }

    /// The key width to align `=` to over the run of one-line entries starting here.
    fn run_width(&self, entries: &[Entry], depth: usize) -> usize {
        let mut width = 0;
        let mut previous_end: Option<usize> = None;
        for e in entries {
            let interrupted = previous_end.is_some_and(|end| {
                self.blank_between(Some(end), e.span.start)
                    || self.comments[self.next..].iter().any(|c| c.own_line && c.start >= end && c.start < e.span.start)
            });
            if interrupted || !self.fits_inline(&e.value, depth, e.key.name.len() + 3) || is_plain_block(e) {
                break;
            }
            width = width.max(e.key.name.len());
            previous_end = Some(e.span.end);
        }
        width
    }

    /// Prints `key = value` or `key { ... }`; returns whether it took one line.
    fn entry(&mut self, e: &Entry, depth: usize, align: usize) -> bool {
        self.out.push_str(&e.key.name);
        if let ValueKind::Block(block) = &e.value.kind {
            self.out.push(' ');
            return self.block(block, depth, e.key.name.len() + 1);
        }
        let inline = self.fits_inline(&e.value, depth, align.max(e.key.name.len()) + 3);
        if inline {
            for _ in e.key.name.len()..align {
                self.out.push(' ');
            }
        }
        self.out.push_str(" = ");
        let used = if inline { align.max(e.key.name.len()) + 3 } else { e.key.name.len() + 3 };
        self.value(&e.value, depth, used) && inline
    }

    /// Prints a value that starts `used` columns into its line; returns whether it took one
    /// line.
    fn value(&mut self, v: &Value, depth: usize, used: usize) -> bool {
        if self.fits_inline(v, depth, used) {
            self.out.push_str(&inline(v));
            return true;
        }
        match &v.kind {
            ValueKind::Tagged(tag, block) => {
                self.out.push_str(&tag.name);
                self.out.push(' ');
                self.block(block, depth, used + tag.name.len() + 1)
            }
            ValueKind::Block(block) => self.block(block, depth, used),
            ValueKind::List(items) => {
                self.out.push_str("[\n");
                let mut last_end = None;
                for item in items {
                    self.leading_comments(item.span.start, depth + 1, &mut last_end);
                    self.indent(depth + 1);
                    self.value(item, depth + 1, 1);
                    self.out.push(',');
                    self.trailing_comment(item.span.end);
                    self.out.push('\n');
                    last_end = Some(item.span.end);
                }
                self.leading_comments(v.span.end, depth + 1, &mut last_end);
                self.indent(depth);
                self.out.push(']');
                false
            }
            _ => {
                self.out.push_str(&inline(v));
                true
            }
        }
    }

    /// Prints `{ ... }` starting `used` columns into its line; returns whether it took one
    /// line.
    fn block(&mut self, block: &Block, depth: usize, used: usize) -> bool {
        let wrapped = Value { kind: ValueKind::Block(block.clone()), span: block.span };
        if self.fits_inline(&wrapped, depth, used) {
            self.out.push_str(&inline(&wrapped));
            return true;
        }
        self.out.push('{');
        self.trailing_comment(block.span.start + 1);
        self.out.push('\n');
        self.entries(&block.entries, depth + 1, block.span.end);
        self.indent(depth);
        self.out.push('}');
        false
    }

    /// Whether `v` can be printed on one line after `used` columns at this depth.
    fn fits_inline(&self, v: &Value, depth: usize, used: usize) -> bool {
        if self.has_comments(v.span.start, v.span.end) || !flat(v) {
            return false;
        }
        depth * INDENT.len() + used + inline(v).len() <= WIDTH
    }
}

fn is_plain_block(e: &Entry) -> bool {
    matches!(e.value.kind, ValueKind::Block(_))
}

/// A value may share a line unless it has a block inside a block.
fn flat(v: &Value) -> bool {
    block_depth(v) <= 1
}

fn block_depth(v: &Value) -> usize {
    let deepest = |values: &mut dyn Iterator<Item = &Value>| values.map(block_depth).max().unwrap_or(0);
    match &v.kind {
        ValueKind::Block(b) | ValueKind::Tagged(_, b) => 1 + deepest(&mut b.entries.iter().map(|e| &e.value)),
        ValueKind::List(items) => deepest(&mut items.iter()),
        ValueKind::Changes(first, changes) => {
            deepest(&mut std::iter::once(&**first).chain(changes.iter().map(|c| &c.value)))
        }
        _ => 0,
    }
}

/// The one-line text of a value.
fn inline(v: &Value) -> String {
    match &v.kind {
        ValueKind::Number(n) => match &n.unit {
            Some(u) => format!("{} {}", n.literal, u.name),
            None => n.literal.clone(),
        },
        ValueKind::String(s) => {
            let escaped = s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n").replace('\t', "\\t");
            format!("\"{escaped}\"")
        }
        ValueKind::Name(n) => n.clone(),
        ValueKind::Range(r) => format!("{}{}{}", r.start, if r.inclusive { "..=" } else { ".." }, r.end),
        ValueKind::List(items) => format!("[{}]", items.iter().map(inline).collect::<Vec<_>>().join(", ")),
        ValueKind::Block(b) => inline_block(b),
        ValueKind::Tagged(tag, b) => format!("{} {}", tag.name, inline_block(b)),
        ValueKind::Changes(first, changes) => {
            let mut s = inline(first);
            for c in changes {
                s.push_str(&format!(" until {} then {}", inline(&c.at), inline(&c.value)));
            }
            s
        }
    }
}

fn inline_block(b: &Block) -> String {
    if b.entries.is_empty() {
        return "{}".into();
    }
    let entries: Vec<String> = b
        .entries
        .iter()
        .map(|e| match &e.value.kind {
            ValueKind::Block(inner) => format!("{} {}", e.key.name, inline_block(inner)),
            _ => format!("{} = {}", e.key.name, inline(&e.value)),
        })
        .collect();
    format!("{{ {} }}", entries.join(", "))
}
