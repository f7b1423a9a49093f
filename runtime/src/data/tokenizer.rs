//! Tokenizers, through Hugging Face's `tokenizers` crate: [`train`] makes a byte-level BPE of
//! exactly the vocabulary size asked for (its special tokens first: `<|eos|>` = 0,
//! `<|fim_begin|>`, `<|fim_hole|>`, `<|fim_end|>`; reserved tokens fill a vocabulary the text
//! is too small to reach), saved as a `tokenizer.json` that `transformers` reads too.
//! [`prepare`] tokenizes documents into a prepared folder ([`super::tokens`]); SFT examples
//! (prompt and response) become the prompt's tokens then the response's, with a loss mask that
//! counts the response only.

use super::text::{read_documents, Document};
use super::tokens::{Specials, TokenMeta, TokenWriter};
use sha2::{Digest, Sha256};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper};
use tokenizers::{ModelWrapper, Tokenizer, TokenizerBuilder};

pub const EOS: &str = "<|eos|>";
pub const FIM_BEGIN: &str = "<|fim_begin|>";
pub const FIM_HOLE: &str = "<|fim_hole|>";
pub const FIM_END: &str = "<|fim_end|>";
const SPECIALS: [&str; 4] = [EOS, FIM_BEGIN, FIM_HOLE, FIM_END];

/// Trains a byte-level BPE of `vocab` tokens on the documents of `files` and saves it.
pub fn train(files: &[&Path], vocab: usize, out: &Path) -> Result<(), String> {
    let minimum = 256 + SPECIALS.len();
    if vocab < minimum {
        return Err(format!(
            "a byte-level BPE needs at least {minimum} tokens (256 bytes and {} special)",
            SPECIALS.len()
        ));
    }
    let mut documents = Vec::new();
    for file in files {
        documents.extend(read_documents(file)?);
    }
    if documents.is_empty() {
        return Err("the files hold no text to train a tokenizer on".into());
    }
    let specials = SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab)
        .min_frequency(0)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer: Tokenizer = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default().into())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
    .with_post_processor(Some(ByteLevel::default().into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| e.to_string())?
    .into();
    let texts = documents.iter().flat_map(Document::texts);
    tokenizer.train(&mut trainer, texts).map_err(|e| format!("training the tokenizer failed: {e}"))?;
    let have = tokenizer.get_vocab_size(true);
    if have < vocab {
        let reserved: Vec<AddedToken> =
            (0..vocab - have).map(|i| AddedToken::from(format!("<|reserved_{i}|>"), true)).collect();
        tokenizer.add_special_tokens(reserved).map_err(|e| e.to_string())?;
    }
    let specials = specials_of(&tokenizer, out)?;
    debug_assert_eq!(specials.eos, 0);
    tokenizer.save(out, true).map_err(|e| format!("cannot write `{}`: {e}", out.display()))
}

/// The ids of the special tokens a loader needs.
fn specials_of(tokenizer: &Tokenizer, path: &Path) -> Result<Specials, String> {
    let id = |token: &str| {
        tokenizer
            .token_to_id(token)
            .ok_or_else(|| format!("`{}` has no `{token}` token: train one with `dsc data tokenizer`", path.display()))
    };
    Ok(Specials { eos: id(EOS)?, fim_begin: id(FIM_BEGIN)?, fim_hole: id(FIM_HOLE)?, fim_end: id(FIM_END)? })
}

/// Tokenizes the documents of `files` with the tokenizer at `tokenizer` into the prepared
/// folder `out`; returns what it wrote.
pub fn prepare(files: &[&Path], tokenizer_path: &Path, out: &Path) -> Result<TokenMeta, String> {
    let bytes =
        std::fs::read(tokenizer_path).map_err(|e| format!("cannot read `{}`: {e}", tokenizer_path.display()))?;
    let tokenizer = Tokenizer::from_bytes(&bytes)
        .map_err(|e| format!("`{}` is not a tokenizer.json ({e})", tokenizer_path.display()))?;
    let specials = specials_of(&tokenizer, tokenizer_path)?;
    let documents: Vec<(&Path, Vec<Document>)> =
        files.iter().map(|f| read_documents(f).map(|d| (*f, d))).collect::<Result<_, _>>()?;
    let masked = documents.iter().flat_map(|(_, d)| d).any(|d| matches!(d, Document::Chat { .. }));
    let mut writer = TokenWriter::create(out, masked)?;
    for (file, documents) in &documents {
        let texts: Vec<&str> = documents.iter().flat_map(Document::texts).collect();
        let encoded =
            tokenizer.encode_batch(texts, false).map_err(|e| format!("tokenizing `{}` failed: {e}", file.display()))?;
        let mut encoded = encoded.iter().map(|e| e.get_ids());
        for document in documents {
            let mut next = || encoded.next().expect("one encoding per text");
            match document {
                Document::Text(_) => writer.push(next(), None)?,
                Document::Chat { .. } => {
                    let (prompt, response) = (next(), next());
                    let tokens = [prompt, response].concat();
                    let mask: Vec<bool> = (0..tokens.len()).map(|i| i >= prompt.len()).collect();
                    writer.push(&tokens, Some(&mask))?;
                }
            }
        }
    }
    writer.finish(TokenMeta {
        format: String::new(),
        vocab: tokenizer.get_vocab_size(true) as u64,
        eos: specials.eos,
        fim_begin: specials.fim_begin,
        fim_hole: specials.fim_hole,
        fim_end: specials.fim_end,
        documents: 0,
        tokens: 0,
        masked,
        tokenizer_sha256: Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokens::TokenFile;

    #[test]
    fn trains_a_tokenizer_of_the_exact_size_and_prepares_documents() {
        let dir = std::env::temp_dir().join(format!("dsc-tokenizer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let corpus = dir.join("c.jsonl");
        let lines: Vec<String> = (0..50)
            .map(|i| format!("{{\"text\": \"document {i}: the quick brown fox jumps over the lazy dog {i} times\"}}"))
            .collect();
        std::fs::write(&corpus, lines.join("\n")).unwrap();
        let tokenizer = dir.join("tokenizer.json");
        // More tokens than the text can merge into: reserved tokens fill the rest.
        train(&[&corpus], 600, &tokenizer).expect("train");
        let loaded = Tokenizer::from_file(&tokenizer).unwrap();
        assert_eq!(loaded.get_vocab_size(true), 600);
        assert_eq!([EOS, FIM_BEGIN, FIM_HOLE, FIM_END].map(|t| loaded.token_to_id(t)), [0, 1, 2, 3].map(Some));
        let prepared = dir.join("prepared");
        let meta = prepare(&[&corpus], &tokenizer, &prepared).expect("prepare");
        assert_eq!((meta.vocab, meta.documents, meta.eos), (600, 50, 0));
        let file = TokenFile::open(&prepared).expect("open");
        let (first, mask) = file.document(0);
        assert_eq!(mask, None, "plain text has no loss mask");
        let text = loaded.decode(&first, false).unwrap();
        assert_eq!(text, "document 0: the quick brown fox jumps over the lazy dog 0 times");
        // SFT examples: the loss counts on the response's tokens only.
        let sft = dir.join("sft.jsonl");
        std::fs::write(
            &sft,
            "{\"prompt\": \"the quick brown\", \"response\": \" fox jumps\"}\n{\"text\": \"lazy dog\"}\n",
        )
        .unwrap();
        let prepared_sft = dir.join("sft");
        assert!(prepare(&[&sft], &tokenizer, &prepared_sft).expect("prepare").masked);
        let file = TokenFile::open(&prepared_sft).expect("open");
        let (tokens, mask) = file.document(0);
        let mask = mask.expect("SFT data has a mask");
        let prompt = loaded.encode("the quick brown", false).unwrap().get_ids().len();
        assert_eq!(mask, (0..tokens.len()).map(|i| i >= prompt).collect::<Vec<_>>());
        assert_eq!(loaded.decode(&tokens[prompt..], false).unwrap(), " fox jumps");
        assert!(file.document(1).1.expect("a mask").iter().all(|&m| m), "plain text in SFT data counts whole");
        assert!(train(&[&corpus], 100, &tokenizer).is_err(), "smaller than the byte alphabet");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
