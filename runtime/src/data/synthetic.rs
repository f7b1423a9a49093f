//! dsc's built-in synthetic corpus (`synthetic {}` in a spec's data sources): an endless stream
//! of made-up documents whose structure a small model can learn, so that training can run, and
//! its falling loss be judged, without any data files. It is not language. The text comes from
//! a fixed random order-2 Markov chain over the vocabulary: each token `b` has 8 candidate
//! successors, and the token before it, `a`, ranks 4 of them, drawn with probabilities
//! 0.55 / 0.25 / 0.13 / 0.07. So the next token is spread over the whole vocabulary given no
//! context, over 8 tokens given one, and carries about 1.13 nats given two. Now and then a
//! document repeats a span of 8 to 16 of its last 48 tokens, which only attention can predict.
//! After each token a document ends with probability 1/256 (documents are never empty); token 0
//! is `<|eos|>` and separates documents, which are packed back to back ([`Batch`]).
//! Everything follows from the seed: the chain is drawn from it at construction, and the stream
//! continues from the corpus's own generator (`crate::rng`).

use super::batch::Batch;
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::ops::RangeInclusive;

/// The end-of-document token.
pub const EOS: u32 = 0;

/// Candidate successors of each token.
const CANDIDATES: usize = 8;
/// Probabilities of the candidates a two-token context ranks first, second, ….
const RANK_PROBABILITIES: [f64; 4] = [0.55, 0.25, 0.13, 0.07];
/// Probability that a document ends after any of its tokens.
const END_PROBABILITY: f64 = 1.0 / 256.0;
/// Probability that a copy span starts at a token (once a document has `COPY_LENGTH.end()`).
const COPY_PROBABILITY: f64 = 1.0 / 128.0;
const COPY_LENGTH: RangeInclusive<usize> = 8..=16;
/// A copy repeats tokens from this many last tokens of its document.
const COPY_WINDOW: usize = 48;

/// The synthetic token stream; an endless iterator of token ids.
#[derive(Clone, Debug)]
pub struct SyntheticCorpus {
    /// Candidate successors of each token (never `EOS`).
    candidates: Vec<[u32; CANDIDATES]>,
    /// Keys the hash that ranks `candidates[b]` for each context `(a, b)`.
    rank_key: u64,
    rng: Rng,
    /// The current document so far, which copies read from; empty right after an `EOS`.
    document: Vec<u32>,
    copy: Option<CopySpan>,
    /// The last two tokens of the stream (`EOS` before the first).
    context: [u32; 2],
}

/// Where a corpus's stream stands: everything its seed does not determine. A corpus built
/// from the same vocabulary and seed and given this position continues the stream exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticPosition {
    rng: u64,
    document: Vec<u32>,
    copy: Option<CopySpan>,
    context: [u32; 2],
}

/// The rest of a copy span: the next token comes from `document[from]`, `left` more to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CopySpan {
    from: usize,
    left: usize,
}

/// What the next token is.
enum Event {
    End,
    Copy,
    Chain,
}

impl SyntheticCorpus {
    /// The corpus over token ids `0..vocab` (0 is `EOS`), drawn from `seed`.
    ///
    /// # Panics
    /// If the vocabulary has fewer than 9 tokens or does not fit in `u32`.
    pub fn new(vocab: usize, seed: u64) -> Self {
        assert!(vocab > CANDIDATES, "the synthetic corpus needs a vocabulary of more than {CANDIDATES} tokens");
        assert!(u32::try_from(vocab).is_ok(), "a vocabulary of {vocab} tokens does not fit in u32 ids");
        let mut rng = Rng::new(seed);
        let candidates = (0..vocab).map(|_| draw_candidates(vocab, &mut rng)).collect();
        let rank_key = rng.next_u64();
        SyntheticCorpus { candidates, rank_key, rng, document: Vec::new(), copy: None, context: [EOS; 2] }
    }

    /// Where the stream stands.
    pub fn position(&self) -> SyntheticPosition {
        SyntheticPosition {
            rng: self.rng.state(),
            document: self.document.clone(),
            copy: self.copy,
            context: self.context,
        }
    }

    /// Continues the stream of `SyntheticCorpus::new(vocab, seed)` from `position`; an error if
    /// the position cannot be one of that corpus's.
    pub fn resume(vocab: usize, seed: u64, position: SyntheticPosition) -> Result<Self, String> {
        let in_vocab = |t: &u32| (*t as usize) < vocab;
        // A copy reads `document[from]`, and each copied token extends the document.
        let copy_fits = position.copy.is_none_or(|c| c.left > 0 && c.from < position.document.len());
        if !position.document.iter().chain(&position.context).all(in_vocab) || !copy_fits {
            return Err("the synthetic corpus position does not fit this vocabulary".into());
        }
        let mut corpus = SyntheticCorpus::new(vocab, seed);
        corpus.rng = Rng::new(position.rng);
        corpus.document = position.document;
        corpus.copy = position.copy;
        corpus.context = position.context;
        Ok(corpus)
    }

    /// The next document: its tokens up to the `EOS` that ends it (which is consumed).
    pub fn next_document(&mut self) -> Vec<u32> {
        self.by_ref().take_while(|&t| t != EOS).collect()
    }

    /// The next `sequences` rows of `seq_len + 1` tokens of the stream.
    pub fn batch(&mut self, sequences: usize, seq_len: usize) -> Batch {
        Batch::pack(sequences, seq_len, self.map(|t| (t, true)))
    }

    /// The entropy rate, in nats per token, of the Markov chain that writes the documents (the
    /// end-of-document decisions included): the loss of a model that knows the chain exactly.
    /// About 1.148 nats whatever the vocabulary, against ln 512 ≈ 6.24 for the tiny model's.
    /// Copy spans are left out: they trade chain tokens for tokens predictable from the earlier
    /// occurrence, at the price of not knowing where a copy starts, what it copies and how long
    /// it is. Counting those choices, the best loss on the stream is about 0.015 nats lower.
    pub fn entropy_floor(&self) -> f64 {
        let ranked = entropy(&RANK_PROBABILITIES);
        let p = END_PROBABILITY;
        let inside_document = entropy(&[p, 1.0 - p]) + (1.0 - p) * ranked;
        // A fraction p/(1 + p) of the tokens are EOS, and the token after one never is.
        let after_eos = p / (1.0 + p);
        after_eos * ranked + (1.0 - after_eos) * inside_document
    }

    fn next_token(&mut self) -> u32 {
        let token = match self.copy.take() {
            Some(copy) => self.copied(copy),
            None => match self.event() {
                Event::End => EOS,
                Event::Copy => {
                    let copy = self.draw_copy();
                    self.copied(copy)
                }
                Event::Chain => self.successor(),
            },
        };
        self.append(token);
        token
    }

    fn event(&mut self) -> Event {
        if self.document.is_empty() {
            return Event::Chain;
        }
        let u = self.rng.uniform();
        if u < END_PROBABILITY {
            Event::End
        } else if u < END_PROBABILITY + COPY_PROBABILITY && self.document.len() >= *COPY_LENGTH.end() {
            Event::Copy
        } else {
            Event::Chain
        }
    }

    fn draw_copy(&mut self) -> CopySpan {
        let len = self.document.len();
        let left = COPY_LENGTH.start() + self.rng.below(COPY_LENGTH.end() - COPY_LENGTH.start() + 1);
        let earliest = len.saturating_sub(COPY_WINDOW);
        let from = earliest + self.rng.below(len - left - earliest + 1);
        CopySpan { from, left }
    }

    /// The next token of a copy span, keeping the rest of the span for later.
    fn copied(&mut self, copy: CopySpan) -> u32 {
        if copy.left > 1 {
            self.copy = Some(CopySpan { from: copy.from + 1, left: copy.left - 1 });
        }
        self.document[copy.from]
    }

    /// A token drawn from the chain's successors of the current context.
    fn successor(&mut self) -> u32 {
        let mut u = self.rng.uniform();
        let rank = RANK_PROBABILITIES
            .iter()
            .position(|&p| {
                u -= p;
                u < 0.0
            })
            .unwrap_or(RANK_PROBABILITIES.len() - 1);
        self.ranked_candidate(self.context, rank)
    }

    /// The candidate that context `[a, b]` ranks `rank`-th among `b`'s: the first ranks of a
    /// Fisher–Yates shuffle driven by a hash of the context.
    fn ranked_candidate(&self, [a, b]: [u32; 2], rank: usize) -> u32 {
        let mut order = self.candidates[b as usize];
        let mut hash = Rng::new(self.rank_key ^ (u64::from(a) << 32 | u64::from(b)));
        for i in 0..=rank {
            let j = i + hash.below(CANDIDATES - i);
            order.swap(i, j);
        }
        order[rank]
    }

    fn append(&mut self, token: u32) {
        if token == EOS {
            self.document.clear();
        } else {
            self.document.push(token);
        }
        self.context = [self.context[1], token];
    }
}

impl Iterator for SyntheticCorpus {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        Some(self.next_token())
    }
}

/// `CANDIDATES` distinct tokens other than `EOS`.
fn draw_candidates(vocab: usize, rng: &mut Rng) -> [u32; CANDIDATES] {
    let mut chosen = [EOS; CANDIDATES];
    let mut count = 0;
    while count < CANDIDATES {
        let token = 1 + rng.below(vocab - 1) as u32;
        if !chosen[..count].contains(&token) {
            chosen[count] = token;
            count += 1;
        }
    }
    chosen
}

/// Entropy in nats of a probability distribution.
fn entropy(probabilities: &[f64]) -> f64 {
    probabilities.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const VOCAB: usize = 512;

    fn sample(seed: u64, tokens: usize) -> Vec<u32> {
        SyntheticCorpus::new(VOCAB, seed).take(tokens).collect()
    }

    /// Empirical entropy (nats) of a token given the `order` tokens before it.
    fn conditional_entropy(tokens: &[u32], order: usize) -> f64 {
        let mut contexts: HashMap<&[u32], u64> = HashMap::new();
        let mut continuations: HashMap<&[u32], u64> = HashMap::new();
        for window in tokens.windows(order + 1) {
            *contexts.entry(&window[..order]).or_default() += 1;
            *continuations.entry(window).or_default() += 1;
        }
        let total = (tokens.len() - order) as f64;
        continuations
            .iter()
            .map(|(window, &n)| {
                let context = contexts[&window[..order]] as f64;
                n as f64 / total * (context / n as f64).ln()
            })
            .sum()
    }

    #[test]
    fn the_same_seed_gives_the_same_stream_and_another_seed_another() {
        assert_eq!(sample(7, 10_000), sample(7, 10_000));
        assert_ne!(sample(7, 10_000), sample(8, 10_000));
    }

    #[test]
    fn a_resumed_corpus_continues_the_stream() {
        let mut corpus = SyntheticCorpus::new(VOCAB, 5);
        corpus.by_ref().take(1234).for_each(drop);
        let resumed = SyntheticCorpus::resume(VOCAB, 5, corpus.position()).expect("a valid position");
        assert_eq!(corpus.take(5000).collect::<Vec<_>>(), resumed.take(5000).collect::<Vec<_>>());
        let mut bad = SyntheticCorpus::new(VOCAB, 5).position();
        bad.context = [VOCAB as u32, 0];
        assert!(SyntheticCorpus::resume(VOCAB, 5, bad).is_err());
    }

    #[test]
    fn documents_end_at_eos() {
        let mut corpus = SyntheticCorpus::new(VOCAB, 9);
        let stream = sample(9, 3000);
        let mut rebuilt = Vec::new();
        while rebuilt.len() < 3000 {
            let document = corpus.next_document();
            assert!(!document.is_empty() && !document.contains(&EOS));
            rebuilt.extend(document);
            rebuilt.push(EOS);
        }
        assert_eq!(rebuilt[..3000], stream[..]);
    }

    #[test]
    fn batches_continue_the_stream() {
        let mut corpus = SyntheticCorpus::new(VOCAB, 3);
        let first = corpus.batch(2, 5);
        let second = corpus.batch(1, 5);
        assert_eq!((first.sequences, first.seq_len, first.tokens.len()), (2, 5, 12));
        let stream = sample(3, 18);
        assert_eq!([first.tokens, second.tokens].concat(), stream);
    }

    #[test]
    fn tokens_are_in_the_vocabulary_and_documents_are_separated_by_single_eos() {
        let tokens = sample(1, 200_000);
        assert!(tokens.iter().all(|&t| (t as usize) < VOCAB));
        let documents = tokens.iter().filter(|&&t| t == EOS).count();
        // 1/256 of the chain's tokens end a document: ~780 in 200k tokens (fewer with copies).
        assert!((400..1200).contains(&documents), "{documents} documents");
        assert!(!tokens.windows(2).any(|w| w == [EOS, EOS]), "an empty document");
    }

    #[test]
    fn documents_repeat_spans_of_their_recent_text() {
        let tokens = sample(2, 100_000);
        let repeats = (COPY_WINDOW..tokens.len() - 8)
            .filter(|&i| {
                let span = &tokens[i..i + 8];
                !span.contains(&EOS) && tokens[i - COPY_WINDOW..i + 7].windows(8).any(|w| w == span)
            })
            .count();
        // About one copy per 140 tokens, each repeating 1 to 9 windows of 8 tokens.
        assert!(repeats > 1000, "{repeats} repeated 8-token windows");
    }

    #[test]
    fn two_tokens_of_context_leave_about_the_entropy_floor() {
        let corpus = SyntheticCorpus::new(VOCAB, 11);
        let floor = corpus.entropy_floor();
        assert!((floor - 1.148).abs() < 1e-3, "floor {floor}");
        let tokens: Vec<u32> = corpus.take(1_000_000).collect();
        let given_two = conditional_entropy(&tokens, 2);
        let given_one = conditional_entropy(&tokens, 1);
        let given_none = conditional_entropy(&tokens, 0);
        eprintln!("H(next) {given_none:.3}, given 1 {given_one:.3}, given 2 {given_two:.3}, floor {floor:.3}");
        assert!((given_two - floor).abs() < 0.05, "H(next | two tokens) = {given_two}, floor {floor}");
        assert!(given_one < (CANDIDATES as f64).ln() + 0.1, "H(next | one token) = {given_one}");
        assert!(given_none > (VOCAB as f64).ln() - 0.5, "H(next) = {given_none}");
    }
}
