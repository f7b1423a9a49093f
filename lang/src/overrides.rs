//! Command-line overrides `--set key.path=value`: the value is parsed with the spec grammar
//! and put into the syntax tree before decoding, so it gets exactly the checks a value
//! written in the file gets, and its diagnostics point into the override itself.
//! Paths are dotted keys, with list indices as numbers: `model.ffn.1.top_k`.

use crate::diagnostics::{Code, Diagnostic, Sources, Span};
use crate::syntax::{self, Block, Entry, Ident, Value, ValueKind};

/// Applies one `key.path=value` override to `tree`.
pub fn apply(tree: &mut Block, sources: &mut Sources, text: &str) -> Result<(), Diagnostic> {
    let Some((path, value_text)) = text.split_once('=') else {
        return Err(Diagnostic::error(Code::Override, format!("`--set {text}` has no `=`"))
            .with_help("write `--set key.path=value`, e.g. `--set train.seq_len=2Ki`"));
    };
    let path = path.trim();
    let file = sources.add(format!("--set {path}"), value_text.to_string());
    let value = syntax::parse_value(file, value_text)?;
    let segments: Vec<&str> = path.split('.').collect();
    if segments.iter().any(|s| s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')) {
        return Err(Diagnostic::error(Code::Override, format!("`{path}` is not a key path"))
            .with_label(Span::new(file, 0, value_text.len()), "for this value")
            .with_help("a key path is keys and list indices joined by dots: `model.ffn.1.top_k`"));
    }
    set_in_block(tree, &segments, 0, value).map_err(|msg| {
        Diagnostic::error(Code::Override, format!("cannot set `{path}`: {msg}"))
            .with_label(Span::new(file, 0, value_text.len()), "this value")
    })
}

fn set_in_block(block: &mut Block, path: &[&str], depth: usize, value: Value) -> Result<(), String> {
    let key = path[depth];
    if key.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("`{}` is a block, not a list", path[..depth].join(".")));
    }
    let index = match block.entries.iter().position(|e| e.key.name == key) {
        Some(i) => i,
        None => {
            let span = value.span;
            let placeholder = Value { kind: ValueKind::Block(Block { entries: vec![], span }), span };
            let key = Ident { name: key.to_string(), span };
            block.entries.push(Entry { key, value: placeholder, opens_block: false, span });
            block.entries.len() - 1
        }
    };
    let entry = &mut block.entries[index];
    if depth + 1 == path.len() {
        entry.opens_block = matches!(value.kind, ValueKind::Block(_));
        entry.value = value;
        return Ok(());
    }
    set_in_value(&mut entry.value, path, depth + 1, value)
}

fn set_in_value(target: &mut Value, path: &[&str], depth: usize, value: Value) -> Result<(), String> {
    match &mut target.kind {
        ValueKind::Block(block) | ValueKind::Tagged(_, block) => set_in_block(block, path, depth, value),
        ValueKind::List(items) => {
            let len = items.len();
            let item =
                path[depth].parse::<usize>().ok().and_then(|i| items.get_mut(i)).ok_or_else(|| {
                    format!("`{}` is a list of {len}; index it with 0..{len}", path[..depth].join("."))
                })?;
            if depth + 1 == path.len() {
                *item = value;
                Ok(())
            } else {
                set_in_value(item, path, depth + 1, value)
            }
        }
        _ => Err(format!("`{}` is a single value, it has no `{}`", path[..depth].join("."), path[depth])),
    }
}
