//! Property tests of the front end on mutated specs: whatever the mutation, loading returns
//! (no panic, no hang) with either a spec or diagnostics; a mutant that still checks cleanly
//! formats idempotently and formats back to the same `Spec`; overrides at random paths never
//! panic either.

use dsc_lang::format::format_file;
use dsc_lang::{load_str, Spec};
use proptest::prelude::*;
use std::time::{Duration, Instant};

const MODELS: [&str; 3] = [
    include_str!("../../models/deepseek-v3.dsc"),
    include_str!("../../models/deepseek-v3-bench.dsc"),
    include_str!("../../models/deepseek-v3-tiny.dsc"),
];

/// Fragments that stress the grammar and the decoder.
const FRAGMENTS: [&str; 28] = [
    "{",
    "}",
    "[",
    "]",
    "=",
    ",",
    "..",
    "..=",
    "\"",
    "//",
    "\n",
    " ",
    "until",
    "then",
    "1e309",
    "18446744073709551616",
    "-1",
    "0",
    "2.5",
    "4Ki",
    "1f1b",
    "moe { }",
    "x = 1",
    "\\",
    "layers = 0..0",
    "\u{1F600}",
    "NaN",
    "steps",
];

#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, fragment: usize },
    Replace { at: usize, len: usize, fragment: usize },
    Duplicate { at: usize, len: usize },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = 0usize..4000;
    let len = 1usize..40;
    let fragment = 0..FRAGMENTS.len();
    prop_oneof![
        (at.clone(), len.clone()).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (at.clone(), fragment.clone()).prop_map(|(at, fragment)| Mutation::Insert { at, fragment }),
        (at.clone(), len.clone(), fragment).prop_map(|(at, len, fragment)| Mutation::Replace { at, len, fragment }),
        (at.clone(), len).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
        at.prop_map(|at| Mutation::Truncate { at }),
    ]
}

/// The nearest character boundary at or before `i`.
fn boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(text: &str, m: &Mutation) -> String {
    let cut =
        |at: usize, len: usize| (boundary(text, at % (text.len() + 1)), boundary(text, at % (text.len() + 1) + len));
    match *m {
        Mutation::Delete { at, len } => {
            let (a, b) = cut(at, len);
            format!("{}{}", &text[..a], &text[b..])
        }
        Mutation::Insert { at, fragment } => {
            let (a, _) = cut(at, 0);
            format!("{}{}{}", &text[..a], FRAGMENTS[fragment], &text[a..])
        }
        Mutation::Replace { at, len, fragment } => {
            let (a, b) = cut(at, len);
            format!("{}{}{}", &text[..a], FRAGMENTS[fragment], &text[b..])
        }
        Mutation::Duplicate { at, len } => {
            let (a, b) = cut(at, len);
            format!("{}{}{}", &text[..b], &text[a..b], &text[b..])
        }
        Mutation::Truncate { at } => text[..cut(at, 0).0].to_string(),
    }
}

/// Loads a text; if it checks cleanly, formats it and proves the round trip.
fn load_and_round_trip(text: &str) -> Result<Option<Spec>, TestCaseError> {
    let started = Instant::now();
    let loaded = load_str("mutant.dsc", text, &[]);
    prop_assert!(started.elapsed() < Duration::from_secs(5), "loading took {:?}", started.elapsed());
    let Some(spec) = loaded.checked_spec().cloned() else {
        prop_assert!(loaded.has_errors() || loaded.spec.is_none());
        return Ok(None);
    };
    let tree = loaded.syntax.as_ref().expect("a spec has a tree");
    let formatted = format_file(tree, text);
    let again = load_str("formatted.dsc", &formatted, &[]);
    prop_assert_eq!(again.checked_spec(), Some(&spec), "formatting changed the spec:\n{}", formatted);
    let twice = format_file(again.syntax.as_ref().expect("tree"), &formatted);
    prop_assert_eq!(&twice, &formatted, "formatting is not idempotent");
    Ok(Some(spec))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutated_specs_never_panic(model in 0..MODELS.len(), mutations in prop::collection::vec(mutation(), 1..4)) {
        let text = mutations.iter().fold(MODELS[model].to_string(), |t, m| apply(&t, m));
        load_and_round_trip(&text)?;
    }

    #[test]
    fn random_overrides_never_panic(
        path in "[a-z_]{1,12}(\\.([a-z_]{1,12}|[0-9]))*",
        value in prop::sample::select(FRAGMENTS.to_vec()),
    ) {
        let loaded = load_str("tiny.dsc", MODELS[2], &[format!("{path}={value}")]);
        prop_assert!(loaded.spec.is_some() || !loaded.diagnostics.is_empty());
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        load_and_round_trip(&text)?;
    }
}

#[test]
fn shipped_models_round_trip_through_fmt() {
    for text in MODELS {
        assert!(load_and_round_trip(text).expect("round trip").is_some());
    }
}
