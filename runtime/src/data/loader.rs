//! The training data loader: the spec's `train.data` made into one stream of packed rows per
//! data-parallel rank. Each rank draws documents, picking the source of each at random by the
//! sources' weights; rearranges a `fim_rate` fraction of them as Fill-in-the-Middle in
//! Prefix-Suffix-Middle form (`<|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle`,
//! cut at two uniform token positions; SFT examples are never rearranged); ends each with
//! `<|eos|>`; and packs them back to back into rows (no cross-document mask, SPEC.md), each
//! token with its loss flag (false on SFT prompts). A prepared source is read in a fresh seeded
//! permutation each epoch, rank `r` of `R` taking every `R`-th document of it from the `r`-th,
//! so ranks never share a document and no document repeats within an epoch. The synthetic
//! source gives rank 0 the stream of `SyntheticCorpus::new(vocab, seed)` and the other ranks
//! streams of their own. [`Position`] is everything needed to continue exactly (checkpoints).

use super::batch::Batch;
use super::synthetic::{SyntheticCorpus, SyntheticPosition, EOS};
use super::tokens::{Specials, TokenFile};
use crate::rng::Rng;
use dsc_lang::{Source, Spec};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

/// Streams of the generators of a rank (`Rng::derive`), apart from the synthetic corpus.
const MIX_STREAM: u64 = 0x6d69_7800;
const FIM_STREAM: u64 = 0x6669_6d00;
const EPOCH_STREAM: u64 = 0x6570_6f63;

pub struct DataLoader {
    ranks: Vec<RankStream>,
}

/// Where a loader stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    ranks: Vec<RankPosition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RankPosition {
    mix: u64,
    fim: u64,
    /// Tokens of the current document not yet packed into a row, with their loss flags.
    pending: Vec<(u32, bool)>,
    sources: Vec<SourcePosition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SourcePosition {
    Synthetic(SyntheticPosition),
    /// The `next`-th document of this rank's share of epoch `epoch` of a source of
    /// `documents` documents.
    Files {
        epoch: u64,
        next: u64,
        documents: u64,
    },
}

struct RankStream {
    sources: Vec<SourceStream>,
    weights: Vec<f64>,
    mix: Rng,
    fim: Rng,
    fim_rate: f64,
    specials: Specials,
    pending: VecDeque<(u32, bool)>,
}

enum SourceStream {
    Synthetic(SyntheticCorpus),
    Files(FileStream),
}

struct FileStream {
    file: Arc<TokenFile>,
    seed: u64,
    rank: usize,
    ranks: usize,
    epoch: u64,
    /// This rank's documents of the current epoch, in order.
    order: Vec<u32>,
    next: usize,
}

impl FileStream {
    fn new(file: Arc<TokenFile>, seed: u64, rank: usize, ranks: usize, epoch: u64, next: usize) -> Self {
        let order = shard(file.documents(), seed, epoch, rank, ranks);
        FileStream { file, seed, rank, ranks, epoch, order, next }
    }

    fn next_document(&mut self) -> (Vec<u32>, Option<Vec<bool>>) {
        if self.next >= self.order.len() {
            self.epoch += 1;
            self.order = shard(self.file.documents(), self.seed, self.epoch, self.rank, self.ranks);
            self.next = 0;
        }
        let document = self.file.document(self.order[self.next] as usize);
        self.next += 1;
        document
    }
}

/// Rank `rank`'s documents of an epoch: every `ranks`-th of a seeded permutation.
fn shard(documents: usize, seed: u64, epoch: u64, rank: usize, ranks: usize) -> Vec<u32> {
    let mut rng = Rng::derive(seed, EPOCH_STREAM ^ epoch.wrapping_mul(0x9E37_79B9));
    let mut order: Vec<u32> = (0..documents as u32).collect();
    for i in (1..documents).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order.into_iter().skip(rank).step_by(ranks).collect()
}

impl SourceStream {
    /// The next document's tokens and, for SFT data, their loss flags.
    fn next_document(&mut self) -> (Vec<u32>, Option<Vec<bool>>) {
        match self {
            SourceStream::Synthetic(corpus) => (corpus.next_document(), None),
            SourceStream::Files(files) => files.next_document(),
        }
    }

    fn position(&self) -> SourcePosition {
        match self {
            SourceStream::Synthetic(corpus) => SourcePosition::Synthetic(corpus.position()),
            SourceStream::Files(f) => {
                SourcePosition::Files { epoch: f.epoch, next: f.next as u64, documents: f.file.documents() as u64 }
            }
        }
    }
}

impl RankStream {
    fn next_document(&mut self) {
        let source = if self.sources.len() == 1 { 0 } else { pick(&self.weights, self.mix.uniform()) };
        match self.sources[source].next_document() {
            (document, Some(mask)) => self.pending.extend(document.into_iter().zip(mask)),
            (document, None) => {
                let document = if self.fim_rate > 0.0 && self.fim.uniform() < self.fim_rate {
                    fim(&document, self.specials, &mut self.fim)
                } else {
                    document
                };
                self.pending.extend(document.into_iter().map(|t| (t, true)));
            }
        }
        self.pending.push_back((self.specials.eos, true));
    }
}

impl Iterator for RankStream {
    type Item = (u32, bool);

    fn next(&mut self) -> Option<(u32, bool)> {
        while self.pending.is_empty() {
            self.next_document();
        }
        self.pending.pop_front()
    }
}

/// The index the uniform draw `u` picks among `weights`.
fn pick(weights: &[f64], u: f64) -> usize {
    let total: f64 = weights.iter().sum();
    let mut left = u * total;
    for (i, w) in weights.iter().enumerate() {
        left -= w;
        if left < 0.0 {
            return i;
        }
    }
    weights.len() - 1
}

/// A document in Prefix-Suffix-Middle form, cut at two uniform positions.
fn fim(document: &[u32], s: Specials, rng: &mut Rng) -> Vec<u32> {
    let (a, b) = (rng.below(document.len() + 1), rng.below(document.len() + 1));
    let (start, end) = (a.min(b), a.max(b));
    let mut out = Vec::with_capacity(document.len() + 3);
    out.push(s.fim_begin);
    out.extend_from_slice(&document[..start]);
    out.push(s.fim_hole);
    out.extend_from_slice(&document[end..]);
    out.push(s.fim_end);
    out.extend_from_slice(&document[start..end]);
    out
}

impl DataLoader {
    /// The loader of `spec`'s data for `ranks` data-parallel ranks, from the start; file
    /// sources are prepared folders (paths relative to the working directory).
    pub fn new(spec: &Spec, seed: u64, ranks: usize) -> Result<Self, String> {
        Self::build(spec, seed, ranks, None)
    }

    /// The loader continued from `position`.
    pub fn resume(spec: &Spec, seed: u64, ranks: usize, position: Position) -> Result<Self, String> {
        if position.ranks.len() != ranks {
            return Err(format!("the data position is for {} ranks, the spec has {ranks}", position.ranks.len()));
        }
        Self::build(spec, seed, ranks, Some(position))
    }

    fn build(spec: &Spec, seed: u64, ranks: usize, position: Option<Position>) -> Result<Self, String> {
        let data = &spec.train.data;
        let vocab = spec.model.vocab as usize;
        let synthetic = data.sources.iter().any(|s| matches!(s, Source::Synthetic { .. }));
        let mut files = Vec::new();
        for source in &data.sources {
            if let Source::Files { path, .. } = source {
                let file = TokenFile::open(Path::new(path))?;
                if file.meta.vocab != spec.model.vocab {
                    return Err(format!(
                        "`{path}` was tokenized with a vocabulary of {} tokens but `{}` has `vocab = {}`: \
                         set `model.vocab = {}` (or `--set model.vocab={}`), or prepare the data with a tokenizer of {} tokens",
                        file.meta.vocab, spec.model.name, spec.model.vocab, file.meta.vocab, file.meta.vocab, spec.model.vocab
                    ));
                }
                files.push(Arc::new(file));
            }
        }
        if synthetic && !files.is_empty() {
            return Err(
                "the synthetic corpus and prepared files have different vocabularies: use one kind of source".into()
            );
        }
        let specials = match files.first() {
            Some(first) => {
                let specials = first.meta.specials();
                if files.iter().any(|f| f.meta.specials() != specials) {
                    return Err("the prepared sources were made with different tokenizers".into());
                }
                specials
            }
            None if data.fim_rate > 0.0 => {
                return Err("`fim_rate` needs prepared sources (the synthetic corpus has no FIM tokens)".into())
            }
            None => Specials { eos: EOS, fim_begin: EOS, fim_hole: EOS, fim_end: EOS },
        };
        let weights: Vec<f64> = data.sources.iter().map(Source::weight).collect();
        let mut positions = position.map(|p| p.ranks.into_iter());
        let mut streams = Vec::with_capacity(ranks);
        for rank in 0..ranks {
            let at = positions.as_mut().and_then(Iterator::next);
            let rank_seed = if rank == 0 { seed } else { Rng::derive(seed, rank as u64).next_u64() };
            let mut file_iter = files.iter();
            let mut sources = Vec::new();
            for (i, source) in data.sources.iter().enumerate() {
                let saved = at.as_ref().map(|p| p.sources.get(i).cloned());
                let stream = match (source, saved) {
                    (Source::Synthetic { .. }, None) => SourceStream::Synthetic(SyntheticCorpus::new(vocab, rank_seed)),
                    (Source::Synthetic { .. }, Some(Some(SourcePosition::Synthetic(p)))) => {
                        SourceStream::Synthetic(SyntheticCorpus::resume(vocab, rank_seed, p)?)
                    }
                    (Source::Files { .. }, saved) => {
                        let file = file_iter.next().expect("one opened file per file source").clone();
                        let (epoch, next) = match saved {
                            None => (0, 0),
                            Some(Some(SourcePosition::Files { epoch, next, documents })) => {
                                if documents != file.documents() as u64 {
                                    return Err(format!(
                                        "a prepared source had {documents} documents when the checkpoint was written and has {} now: it was prepared again since; prepare it as it was, or start a new run",
                                        file.documents()
                                    ));
                                }
                                (epoch, next as usize)
                            }
                            Some(_) => return Err("the data position does not match the spec's sources".into()),
                        };
                        let stream = FileStream::new(file, seed.wrapping_add(i as u64), rank, ranks, epoch, next);
                        if stream.order.is_empty() {
                            return Err(format!(
                                "a prepared source has {} documents, fewer than the {ranks} data-parallel ranks",
                                stream.file.documents()
                            ));
                        }
                        if stream.next > stream.order.len() {
                            return Err("the data position is past the end of a prepared source".into());
                        }
                        SourceStream::Files(stream)
                    }
                    (Source::Synthetic { .. }, Some(_)) => {
                        return Err("the data position does not match the spec's sources".into())
                    }
                };
                sources.push(stream);
            }
            let (mix, fim, pending) = match at {
                Some(p) => (Rng::new(p.mix), Rng::new(p.fim), p.pending.into_iter().collect()),
                None => (
                    Rng::derive(seed, MIX_STREAM + rank as u64),
                    Rng::derive(seed, FIM_STREAM + rank as u64),
                    VecDeque::new(),
                ),
            };
            if pending.iter().any(|&(t, _): &(u32, bool)| t as usize >= vocab) {
                return Err("the data position holds tokens outside the vocabulary".into());
            }
            streams.push(RankStream {
                sources,
                weights: weights.clone(),
                mix,
                fim,
                fim_rate: data.fim_rate,
                specials,
                pending,
            });
        }
        Ok(DataLoader { ranks: streams })
    }

    /// The next `sequences` rows of `seq_len + 1` tokens of `rank`'s stream.
    pub fn batch(&mut self, rank: usize, sequences: usize, seq_len: usize) -> Batch {
        Batch::pack(sequences, seq_len, &mut self.ranks[rank])
    }

    pub fn position(&self) -> Position {
        Position {
            ranks: self
                .ranks
                .iter()
                .map(|r| RankPosition {
                    mix: r.mix.state(),
                    fim: r.fim.state(),
                    pending: r.pending.iter().copied().collect(),
                    sources: r.sources.iter().map(SourceStream::position).collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(overrides: &[&str]) -> Spec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        dsc_lang::load(&path, &overrides).checked_spec().cloned().expect("tiny checks")
    }

    #[test]
    fn one_synthetic_source_is_the_synthetic_stream() {
        let spec = tiny(&[]);
        let mut loader = DataLoader::new(&spec, 3, 1).expect("loader");
        let mut corpus = SyntheticCorpus::new(512, 3);
        for _ in 0..5 {
            assert_eq!(loader.batch(0, 2, 16), corpus.batch(2, 16));
        }
    }

    #[test]
    fn a_resumed_loader_continues_exactly() {
        let spec = tiny(&[]);
        let mut loader = DataLoader::new(&spec, 4, 2).expect("loader");
        loader.batch(0, 3, 20);
        loader.batch(1, 1, 20);
        let position = loader.position();
        let json = serde_json::to_value(&position).expect("serialise");
        let back: Position = serde_json::from_value(json).expect("deserialise");
        let mut resumed = DataLoader::resume(&spec, 4, 2, back).expect("resume");
        for rank in [0, 1, 1, 0] {
            assert_eq!(loader.batch(rank, 2, 20), resumed.batch(rank, 2, 20));
        }
        assert_ne!(loader.batch(0, 1, 20), loader.batch(1, 1, 20), "ranks read different data");
        assert!(DataLoader::resume(&spec, 4, 3, loader.position()).is_err());
    }

    #[test]
    fn shards_split_each_epoch_between_ranks() {
        let shards: Vec<Vec<u32>> = (0..3).map(|r| shard(10, 7, 0, r, 3)).collect();
        let mut all: Vec<u32> = shards.concat();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_ne!(shard(10, 7, 0, 0, 1), shard(10, 7, 1, 0, 1), "each epoch has its own order");
    }

    #[test]
    fn fim_rearranges_prefix_suffix_middle() {
        let s = Specials { eos: 0, fim_begin: 1, fim_hole: 2, fim_end: 3 };
        let document: Vec<u32> = (10..30).collect();
        let mut rng = Rng::new(5);
        for _ in 0..50 {
            let out = fim(&document, s, &mut rng);
            assert_eq!((out.len(), out[0]), (document.len() + 3, 1));
            let hole = out.iter().position(|&t| t == 2).expect("a hole");
            let end = out.iter().position(|&t| t == 3).expect("an end");
            let (prefix, suffix, middle) = (&out[1..hole], &out[hole + 1..end], &out[end + 1..]);
            assert_eq!([prefix, middle, suffix].concat(), document);
        }
    }

    /// A prepared folder of `documents` documents of two tokens each, `first + i` twice.
    fn prepared(dir: &Path, first: u32, documents: u32) {
        let mut writer = crate::data::tokens::TokenWriter::create(dir, false).expect("writer");
        for i in 0..documents {
            writer.push(&[first + i, first + i], None).expect("push");
        }
        let meta = crate::data::tokens::TokenMeta {
            format: String::new(),
            vocab: 512,
            eos: 0,
            fim_begin: 1,
            fim_hole: 2,
            fim_end: 3,
            documents: 0,
            tokens: 0,
            masked: false,
            tokenizer_sha256: String::new(),
        };
        writer.finish(meta).expect("finish");
    }

    #[test]
    fn prepared_sources_mix_by_weight_without_repeats_and_ranks_split_them() {
        let dir = std::env::temp_dir().join(format!("dsc-loader-{}", std::process::id()));
        let (a, b) = (dir.join("a"), dir.join("b"));
        prepared(&a, 100, 20);
        prepared(&b, 200, 20);
        let sources = format!(
            "train.data.sources=[files {{ path = \"{}\", weight = 1 }}, files {{ path = \"{}\", weight = 3 }}]",
            a.display(),
            b.display()
        );
        let spec = tiny(&[&sources]);
        let mut loader = DataLoader::new(&spec, 1, 2).expect("loader");
        // Each document is two tokens then EOS: three tokens per document, rows of 3.
        let documents = |loader: &mut DataLoader, rank: usize, n: usize| -> Vec<u32> {
            let batch = loader.batch(rank, n, 2);
            (0..n)
                .map(|i| batch.tokens[i * 3..i * 3 + 3].to_vec())
                .map(|d| {
                    assert_eq!((d[0], d[2]), (d[1], 0), "rows are whole documents here: {d:?}");
                    d[0]
                })
                .collect()
        };
        let seen = documents(&mut loader, 0, 400);
        let from_b = seen.iter().filter(|&&t| t >= 200).count();
        assert!((260..340).contains(&from_b), "{from_b} of 400 documents from the source of weight 3");
        // Rank 0 reads the even positions of each epoch's order: 10 of A's 20, no repeats.
        let first_ten_of_a: Vec<u32> = seen.iter().copied().filter(|&t| t < 200).take(10).collect();
        let mut unique = first_ten_of_a.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 10, "{first_ten_of_a:?}");
        let other: Vec<u32> = documents(&mut loader, 1, 400).into_iter().filter(|&t| t < 200).take(10).collect();
        assert!(other.iter().all(|t| !first_ten_of_a.contains(t)), "ranks share documents: {other:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sources_are_picked_by_weight() {
        assert_eq!(pick(&[1.0, 3.0], 0.0), 0);
        assert_eq!(pick(&[1.0, 3.0], 0.24), 0);
        assert_eq!(pick(&[1.0, 3.0], 0.26), 1);
        assert_eq!(pick(&[1.0, 3.0], 0.999), 1);
    }
}
