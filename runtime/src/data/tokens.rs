//! The prepared-data format `dsc data prepare` writes and the loader reads: a folder with
//! `tokens.bin` (every document's token ids, u32 little-endian, back to back), `index.bin`
//! (u64 little-endian offsets into it: documents + 1 of them, the first 0), for SFT data
//! `mask.bin` (one byte per token, 1 where it counts as a label: the responses) and `meta.json`
//! ([`TokenMeta`]: the tokenizer's vocabulary size and special-token ids). The token and index
//! files are memory-mapped, so a corpus larger than memory trains as well as a small one.

use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const TOKENS: &str = "tokens.bin";
pub const INDEX: &str = "index.bin";
pub const MASK: &str = "mask.bin";
pub const META: &str = "meta.json";
const FORMAT: &str = "dsc-tokens/1";

/// What a prepared folder holds, and the tokenizer it was made with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenMeta {
    pub format: String,
    /// The tokenizer's vocabulary size: the model's `vocab` must equal it.
    pub vocab: u64,
    pub eos: u32,
    pub fim_begin: u32,
    pub fim_hole: u32,
    pub fim_end: u32,
    pub documents: u64,
    pub tokens: u64,
    /// Whether `mask.bin` exists (SFT data: the loss counts on the responses only).
    pub masked: bool,
    /// SHA-256 of the `tokenizer.json` used.
    pub tokenizer_sha256: String,
}

/// The special tokens a loader needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Specials {
    pub eos: u32,
    pub fim_begin: u32,
    pub fim_hole: u32,
    pub fim_end: u32,
}

impl TokenMeta {
    pub fn specials(&self) -> Specials {
        Specials { eos: self.eos, fim_begin: self.fim_begin, fim_hole: self.fim_hole, fim_end: self.fim_end }
    }
}

/// Writes a prepared folder document by document.
pub struct TokenWriter {
    dir: PathBuf,
    tokens: BufWriter<File>,
    mask: Option<BufWriter<File>>,
    offsets: Vec<u64>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("cannot {what} `{}`: {e}", path.display())
}

impl TokenWriter {
    /// A writer of a folder; `masked` for SFT data.
    pub fn create(dir: &Path, masked: bool) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
        // `meta.json` is written last: until then the folder is not a valid prepared folder.
        let meta = dir.join(META);
        if meta.exists() {
            std::fs::remove_file(&meta).map_err(|e| io("remove the old", &meta, e))?;
        }
        let open = |name: &str| {
            let path = dir.join(name);
            File::create(&path).map(BufWriter::new).map_err(|e| io("create", &path, e))
        };
        let mask = if masked { Some(open(MASK)?) } else { None };
        Ok(TokenWriter { dir: dir.to_path_buf(), tokens: open(TOKENS)?, mask, offsets: vec![0] })
    }

    /// Appends a document; in a masked folder, `mask` flags the tokens that count (all of
    /// them when `None`).
    pub fn push(&mut self, tokens: &[u32], mask: Option<&[bool]>) -> Result<(), String> {
        let path = self.dir.join(TOKENS);
        for t in tokens {
            self.tokens.write_all(&t.to_le_bytes()).map_err(|e| io("write", &path, e))?;
        }
        if let Some(out) = self.mask.as_mut() {
            let bytes: Vec<u8> = match mask {
                Some(mask) => mask.iter().map(|&m| u8::from(m)).collect(),
                None => vec![1; tokens.len()],
            };
            out.write_all(&bytes).map_err(|e| io("write", &self.dir.join(MASK), e))?;
        }
        let end = self.offsets.last().copied().unwrap_or(0) + tokens.len() as u64;
        self.offsets.push(end);
        Ok(())
    }

    /// Finishes the files and writes `meta.json` (with the counts filled in).
    pub fn finish(mut self, mut meta: TokenMeta) -> Result<TokenMeta, String> {
        meta.format = FORMAT.into();
        meta.documents = self.offsets.len() as u64 - 1;
        meta.tokens = *self.offsets.last().unwrap_or(&0);
        meta.masked = self.mask.is_some();
        self.tokens.flush().map_err(|e| io("write", &self.dir.join(TOKENS), e))?;
        if let Some(mask) = self.mask.as_mut() {
            mask.flush().map_err(|e| io("write", &self.dir.join(MASK), e))?;
        }
        let index: Vec<u8> = self.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        let index_path = self.dir.join(INDEX);
        std::fs::write(&index_path, index).map_err(|e| io("write", &index_path, e))?;
        let meta_path = self.dir.join(META);
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?;
        std::fs::write(&meta_path, json).map_err(|e| io("write", &meta_path, e))?;
        Ok(meta)
    }
}

/// A prepared folder, memory-mapped and checked.
pub struct TokenFile {
    pub meta: TokenMeta,
    tokens: Mmap,
    index: Mmap,
    mask: Option<Mmap>,
}

fn map(path: &Path) -> Result<Mmap, String> {
    let file = File::open(path).map_err(|e| io("open", path, e))?;
    // SAFETY: the file is only read; a prepared folder is not modified while training reads it
    // (the documented contract of `dsc data prepare`'s output).
    unsafe { Mmap::map(&file) }.map_err(|e| io("map", path, e))
}

impl TokenFile {
    /// Opens a folder written by `dsc data prepare`; every inconsistency is an error naming
    /// the file.
    pub fn open(dir: &Path) -> Result<Self, String> {
        let fix = "prepare it again with `dsc data prepare`";
        let meta_path = dir.join(META);
        let text = std::fs::read(&meta_path).map_err(|e| {
            format!(
                "cannot read `{}` ({e}): `{}` is not a folder prepared by `dsc data prepare`",
                meta_path.display(),
                dir.display()
            )
        })?;
        let meta: TokenMeta = serde_json::from_slice(&text)
            .map_err(|e| format!("`{}` is not valid ({e}); {fix}", meta_path.display()))?;
        if meta.format != FORMAT {
            return Err(format!(
                "`{}` is in format `{}`, this dsc reads `{FORMAT}`; {fix}",
                meta_path.display(),
                meta.format
            ));
        }
        let tokens = map(&dir.join(TOKENS))?;
        let index = map(&dir.join(INDEX))?;
        let mask = if meta.masked { Some(map(&dir.join(MASK))?) } else { None };
        let file = TokenFile { meta, tokens, index, mask };
        let documents = file.meta.documents as usize;
        let bad = |what: &str| format!("`{}`: {what}; {fix}", dir.display());
        if file.index.len() != (documents + 1) * 8 || file.tokens.len() as u64 != file.meta.tokens * 4 {
            return Err(bad("the token or index file does not have the size `meta.json` says (truncated?)"));
        }
        if file.mask.as_ref().is_some_and(|m| m.len() as u64 != file.meta.tokens) {
            return Err(bad("`mask.bin` does not have one byte per token"));
        }
        if (0..documents).any(|d| file.offset(d) > file.offset(d + 1)) || file.offset(documents) != file.meta.tokens {
            return Err(bad("the document index is not increasing"));
        }
        if documents == 0 {
            return Err(bad("it holds no document"));
        }
        Ok(file)
    }

    fn offset(&self, i: usize) -> u64 {
        let b = &self.index[i * 8..i * 8 + 8];
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }

    pub fn documents(&self) -> usize {
        self.meta.documents as usize
    }

    /// Document `i`'s tokens and, for SFT data, which of them count as labels.
    pub fn document(&self, i: usize) -> (Vec<u32>, Option<Vec<bool>>) {
        let (start, end) = (self.offset(i) as usize, self.offset(i + 1) as usize);
        let tokens = self.tokens[start * 4..end * 4]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mask = self.mask.as_ref().map(|m| m[start..end].iter().map(|&b| b != 0).collect());
        (tokens, mask)
    }
}
