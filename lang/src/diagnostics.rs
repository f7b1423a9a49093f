//! Diagnostics: source files and spans, error codes, and rendering in rustc's style
//! (`error[E0003]: message`, `--> file:line:col`, a labelled span, `help:`) or as one JSON
//! object per diagnostic for tools (`--error-format=json`).

use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label as CsLabel};
use codespan_reporting::files::{Files as _, SimpleFiles};
use codespan_reporting::term::{self, termcolor};
use serde::Serialize;

pub type FileId = usize;

/// Help for a file that lacks its sections.
pub const SECTIONS_HELP: &str =
    "a spec has the sections model, train, precision and parallel; models/deepseek-v3-tiny.dsc is a complete example";

/// A byte range in one source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: FileId,
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(file: FileId, start: usize, end: usize) -> Self {
        Span { file, start, end }
    }
}

/// The texts diagnostics point into: the spec file and any `--set` overrides.
#[derive(Default)]
pub struct Sources {
    files: SimpleFiles<String, String>,
}

impl Sources {
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> FileId {
        self.files.add(name.into(), text.into())
    }

    pub fn name(&self, file: FileId) -> &str {
        self.files.get(file).map(|f| f.name().as_str()).unwrap_or("<unknown>")
    }

    pub fn text(&self, file: FileId) -> &str {
        self.files.get(file).map(|f| f.source().as_str()).unwrap_or("")
    }

    /// One-based line and column of a byte offset.
    pub fn line_col(&self, file: FileId, offset: usize) -> (usize, usize) {
        match self.files.location(file, offset) {
            Ok(loc) => (loc.line_number, loc.column_number),
            Err(_) => (1, 1),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// Every kind of diagnostic dsc reports. The number is stable (`E0003`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Syntax = 1,
    Input = 2,
    UnknownKey = 3,
    MissingKey = 4,
    DuplicateKey = 5,
    WrongType = 6,
    BadNumber = 7,
    OutOfRange = 8,
    UnknownName = 9,
    Override = 10,
    Dimensions = 101,
    LayerRanges = 102,
    Routing = 103,
    GpuCount = 104,
    Pipeline = 105,
    ExpertParallel = 106,
    NodeLimit = 107,
    Schedule = 108,
    BatchSize = 109,
    ContextExtension = 110,
    PrecisionPolicy = 111,
    Memory = 112,
}

impl Code {
    pub fn as_str(self) -> String {
        format!("E{:04}", self as u32)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub span: Span,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: Code,
    pub message: String,
    /// The first label is the primary one.
    pub labels: Vec<Label>,
    pub help: Vec<String>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(code: Code, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    pub fn warning(code: Code, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, code, message)
    }

    fn new(severity: Severity, code: Code, message: impl Into<String>) -> Self {
        Diagnostic { severity, code, message: message.into(), labels: vec![], help: vec![], notes: vec![] }
    }

    pub fn with_label(mut self, span: Span, message: impl Into<String>) -> Self {
        self.labels.push(Label { span, message: message.into() });
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help.push(help.into());
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// Renders diagnostics as rustc does; `color` adds ANSI colours (for terminals).
pub fn render_text(sources: &Sources, diagnostics: &[Diagnostic], color: bool) -> String {
    let mut buffer = if color { termcolor::Buffer::ansi() } else { termcolor::Buffer::no_color() };
    let config = term::Config::default();
    for d in diagnostics {
        let severity = match d.severity {
            Severity::Error => codespan_reporting::diagnostic::Severity::Error,
            Severity::Warning => codespan_reporting::diagnostic::Severity::Warning,
        };
        let labels = d
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let label = if i == 0 { CsLabel::primary } else { CsLabel::secondary };
                label(l.span.file, l.span.start..l.span.end).with_message(&l.message)
            })
            .collect();
        let notes =
            d.help.iter().map(|h| format!("help: {h}")).chain(d.notes.iter().map(|n| format!("note: {n}"))).collect();
        let cs = CsDiagnostic::new(severity)
            .with_code(d.code.as_str())
            .with_message(&d.message)
            .with_labels(labels)
            .with_notes(notes);
        term::emit(&mut buffer, &config, &sources.files, &cs).expect("writing to a buffer");
    }
    String::from_utf8_lossy(buffer.as_slice()).into_owned()
}

#[derive(Serialize)]
struct JsonLabel<'a> {
    file: &'a str,
    line: usize,
    column: usize,
    end_line: usize,
    end_column: usize,
    message: &'a str,
}

#[derive(Serialize)]
struct JsonDiagnostic<'a> {
    severity: Severity,
    code: String,
    message: &'a str,
    file: Option<&'a str>,
    line: Option<usize>,
    column: Option<usize>,
    labels: Vec<JsonLabel<'a>>,
    help: &'a [String],
    notes: &'a [String],
}

/// One JSON object per line, per diagnostic; `file`/`line`/`column` are the primary label's.
pub fn render_json(sources: &Sources, diagnostics: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diagnostics {
        let labels: Vec<JsonLabel> = d
            .labels
            .iter()
            .map(|l| {
                let (line, column) = sources.line_col(l.span.file, l.span.start);
                let (end_line, end_column) = sources.line_col(l.span.file, l.span.end);
                JsonLabel { file: sources.name(l.span.file), line, column, end_line, end_column, message: &l.message }
            })
            .collect();
        let primary = labels.first();
        let json = JsonDiagnostic {
            severity: d.severity,
            code: d.code.as_str(),
            message: &d.message,
            file: primary.map(|l| l.file),
            line: primary.map(|l| l.line),
            column: primary.map(|l| l.column),
            labels,
            help: &d.help,
            notes: &d.notes,
        };
        out.push_str(&serde_json::to_string(&json).expect("diagnostics serialise"));
        out.push('\n');
    }
    out
}
