//! The dsc spec language: grammar, syntax tree with spans, decoding into the resolved
//! [`Spec`], semantic checks and diagnostics. [`load`] runs the whole front end on a file.

pub mod check;
pub mod decode;
pub mod diagnostics;
pub mod format;
pub mod overrides;
pub mod spec;
pub mod syntax;

pub use spec::*;

use decode::SpanMap;
use diagnostics::{Code, Diagnostic, Sources};
use std::path::Path;

/// A spec file after the front end: its sources, tree, resolved spec (when it decoded) and
/// every diagnostic found on the way.
pub struct Loaded {
    pub sources: Sources,
    pub syntax: Option<syntax::Block>,
    pub spec: Option<Spec>,
    /// Where each value of `spec` came from, by dotted path.
    pub spans: SpanMap,
    pub diagnostics: Vec<Diagnostic>,
}

impl Loaded {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    /// The spec, if there were no errors.
    pub fn checked_spec(&self) -> Option<&Spec> {
        self.spec.as_ref().filter(|_| !self.has_errors())
    }
}

/// Reads, parses, applies `--set key.path=value` overrides, decodes and checks a spec file.
pub fn load(path: &Path, overrides: &[String]) -> Loaded {
    let name = path.display().to_string();
    let mut loaded =
        Loaded { sources: Sources::default(), syntax: None, spec: None, spans: SpanMap::new(), diagnostics: vec![] };
    let text = match read_source(path) {
        Ok(text) => text,
        Err(d) => {
            loaded.diagnostics.push(*d);
            return loaded;
        }
    };
    load_text(loaded, &name, text, overrides)
}

/// [`load`] for text that is already in memory (`name` is shown in diagnostics).
pub fn load_str(name: &str, text: &str, overrides: &[String]) -> Loaded {
    let loaded =
        Loaded { sources: Sources::default(), syntax: None, spec: None, spans: SpanMap::new(), diagnostics: vec![] };
    load_text(loaded, name, text.to_string(), overrides)
}

fn load_text(mut loaded: Loaded, name: &str, text: String, overrides: &[String]) -> Loaded {
    let file = loaded.sources.add(name, text);
    let mut tree = match syntax::parse_file(file, loaded.sources.text(file)) {
        Ok(tree) => tree,
        Err(d) => {
            loaded.diagnostics.push(d);
            return loaded;
        }
    };
    for o in overrides {
        if let Err(d) = overrides::apply(&mut tree, &mut loaded.sources, o) {
            loaded.diagnostics.push(d);
        }
    }
    if !loaded.diagnostics.is_empty() {
        loaded.syntax = Some(tree);
        return loaded;
    }
    let mut cx = decode::Cx::default();
    let spec = decode::schema::decode_spec(&mut cx, &tree);
    loaded.diagnostics.extend(cx.diagnostics);
    loaded.spans = cx.spans;
    if let Some(spec) = &spec {
        if loaded.diagnostics.is_empty() {
            loaded.diagnostics.extend(check::check(spec, &loaded.spans));
        }
    }
    loaded.spec = spec;
    loaded.syntax = Some(tree);
    loaded
}

/// Reads a spec file, turning every way that can fail into a diagnostic.
fn read_source(path: &Path) -> Result<String, Box<Diagnostic>> {
    let fail = |msg: String, help: &str| Box::new(Diagnostic::error(Code::Input, msg).with_help(help));
    let shown = path.display();
    if path.is_dir() {
        return Err(fail(
            format!("`{shown}` is a directory, not a spec file"),
            "pass a `.dsc` file, e.g. models/deepseek-v3-tiny.dsc",
        ));
    }
    let meta = std::fs::metadata(path)
        .map_err(|e| fail(format!("cannot read `{shown}`: {e}"), "check the path; the shipped specs are in models/"))?;
    if meta.len() > syntax::MAX_SOURCE_BYTES as u64 {
        return Err(fail(
            format!("`{shown}` is {} bytes; specs are limited to {} bytes", meta.len(), syntax::MAX_SOURCE_BYTES),
            "is this the right file? a spec describes one training job in a few hundred lines",
        ));
    }
    let bytes =
        std::fs::read(path).map_err(|e| fail(format!("cannot read `{shown}`: {e}"), "check the file's permissions"))?;
    String::from_utf8(bytes).map_err(|e| {
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = good.iter().filter(|b| **b == b'\n').count() + 1;
        let column = good.iter().rev().take_while(|b| **b != b'\n').count() + 1;
        fail(
            format!("`{shown}` is not UTF-8 text (invalid byte at line {line}, column {column})"),
            "a spec is a text file; is this a binary or a checkpoint?",
        )
    })
}
