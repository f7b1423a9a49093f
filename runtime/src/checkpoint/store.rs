//! The checkpoint directory on disk. A checkpoint is a folder `step-NNNNNNNN` under the run's
//! checkpoint directory holding its files and a `manifest.json` with each file's size and
//! SHA-256. It is written atomically: every file goes into a hidden temporary folder, each is
//! fsynced, the manifest last, then the folder is renamed into place and the parent fsynced, so
//! a kill at any moment leaves either the new checkpoint complete or no trace of it next to the
//! previous ones. Reading verifies the manifest before anything is used. Keep-last-N removes
//! the oldest complete checkpoints after a new one is in place. One process writes into a
//! checkpoint directory at a time; before writing it clears what a killed writer left: partial
//! temporary folders are removed, a checkpoint moved aside for replacement is put back.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The manifest's name inside a checkpoint folder.
pub const MANIFEST: &str = "manifest.json";
const FORMAT: &str = "dsc-checkpoint/1";
const PREFIX: &str = "step-";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("cannot {what} `{}`: {e}", path.display())
}

/// The folder of the checkpoint at `step` under `root`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("{PREFIX}{step:08}"))
}

/// Writes `files` as the checkpoint of `step` under `root` (created if missing), atomically;
/// then, with `keep`, removes all but the newest `keep` checkpoints. Returns its folder.
pub fn write(root: &Path, step: u64, files: &[(&str, Vec<u8>)], keep: Option<usize>) -> Result<PathBuf, String> {
    fs::create_dir_all(root).map_err(|e| io_error("create the checkpoint directory", root, e))?;
    recover(root)?;
    let tmp = root.join(format!(".{PREFIX}{step:08}.tmp-{}", std::process::id()));
    fs::create_dir(&tmp).map_err(|e| io_error("create", &tmp, e))?;
    let mut manifest = Manifest { format: FORMAT.into(), step, files: BTreeMap::new() };
    for (name, bytes) in files {
        write_synced(&tmp.join(name), bytes)?;
        manifest.files.insert(name.to_string(), FileEntry { bytes: bytes.len() as u64, sha256: sha256(bytes) });
    }
    let manifest_json = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
    write_synced(&tmp.join(MANIFEST), &manifest_json)?;
    sync_dir(&tmp)?;
    let target = step_dir(root, step);
    // A checkpoint of the same step (a run resumed and stopped again there) is replaced: moved
    // aside first, so that one complete copy exists at every moment.
    let aside = root.join(format!(".{PREFIX}{step:08}.old-{}", std::process::id()));
    let replaced = target.exists();
    if replaced {
        fs::rename(&target, &aside).map_err(|e| io_error("move aside", &target, e))?;
    }
    fs::rename(&tmp, &target).map_err(|e| io_error("rename the new checkpoint into", &target, e))?;
    sync_dir(root)?;
    if replaced {
        fs::remove_dir_all(&aside).map_err(|e| io_error("remove", &aside, e))?;
    }
    if let Some(keep) = keep {
        let steps = complete_steps(root)?;
        for &old in steps.iter().rev().skip(keep.max(1)) {
            let dir = step_dir(root, old);
            fs::remove_dir_all(&dir).map_err(|e| io_error("remove the old checkpoint", &dir, e))?;
        }
        sync_dir(root)?;
    }
    Ok(target)
}

/// Clears what a writer killed mid-write left under `root`: its temporary folders go; a
/// checkpoint it had moved aside to replace is renamed back if the replacement never arrived.
fn recover(root: &Path) -> Result<(), String> {
    let entries = fs::read_dir(root).map_err(|e| io_error("read the checkpoint directory", root, e))?;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&format!(".{PREFIX}")) else { continue };
        let path = entry.path();
        if let Some((step, _)) = rest.split_once(".old-") {
            let target = root.join(format!("{PREFIX}{step}"));
            if !target.join(MANIFEST).is_file() && path.join(MANIFEST).is_file() {
                fs::rename(&path, &target).map_err(|e| io_error("restore the checkpoint moved aside in", &path, e))?;
                continue;
            }
        } else if !rest.contains(".tmp-") {
            continue;
        }
        fs::remove_dir_all(&path).map_err(|e| io_error("remove the leftover", &path, e))?;
    }
    sync_dir(root)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut file = File::create(path).map_err(|e| io_error("create", path, e))?;
    file.write_all(bytes).map_err(|e| io_error("write", path, e))?;
    file.sync_all().map_err(|e| io_error("sync", path, e))
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("sync the directory", dir, e))
}

/// The steps of the complete checkpoints (those with a manifest) under `root`, ascending.
pub fn complete_steps(root: &Path) -> Result<Vec<u64>, String> {
    let entries = fs::read_dir(root).map_err(|e| io_error("read the checkpoint directory", root, e))?;
    let mut steps: Vec<u64> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.strip_prefix(PREFIX)?.parse().ok())
        .filter(|&step| step_dir(root, step).join(MANIFEST).is_file())
        .collect();
    steps.sort_unstable();
    Ok(steps)
}

/// The checkpoint folder `path` names: itself if it holds a manifest, else the newest complete
/// checkpoint under it.
pub fn resolve(path: &Path) -> Result<PathBuf, String> {
    if path.join(MANIFEST).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(format!(
            "`{}` is not a checkpoint directory (it does not exist or is not a folder)",
            path.display()
        ));
    }
    let newest = complete_steps(path)?
        .pop()
        .ok_or_else(|| format!("`{}` holds no complete checkpoint (no `{PREFIX}N/{MANIFEST}`)", path.display()))?;
    Ok(step_dir(path, newest))
}

/// A verified checkpoint folder: its manifest matched every file's size and checksum.
#[derive(Clone, Debug)]
pub struct Verified {
    pub dir: PathBuf,
    files: BTreeMap<String, Vec<u8>>,
}

impl Verified {
    /// A file's bytes (verified); an error if the checkpoint has no such file.
    pub fn file(&self, name: &str) -> Result<&[u8], String> {
        self.files.get(name).map(Vec::as_slice).ok_or_else(|| {
            format!("checkpoint `{}` has no `{name}`: it was not written by this version of dsc", self.dir.display())
        })
    }
}

/// Reads a checkpoint folder and checks every file against its manifest; nothing is trusted
/// before that. Errors name the file and say what to do.
pub fn read_verified(dir: &Path) -> Result<Verified, String> {
    let manifest_path = dir.join(MANIFEST);
    let text = fs::read(&manifest_path).map_err(|e| io_error("read", &manifest_path, e))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| format!("`{}` is corrupt ({e}); resume from an older checkpoint", manifest_path.display()))?;
    if manifest.format != FORMAT {
        return Err(format!(
            "`{}` is a `{}` checkpoint; this dsc reads `{FORMAT}`",
            manifest_path.display(),
            manifest.format
        ));
    }
    let mut files = BTreeMap::new();
    for (name, entry) in &manifest.files {
        let path = dir.join(name);
        let bytes = fs::read(&path).map_err(|e| io_error("read", &path, e))?;
        let damaged = |what: &str| {
            format!(
                "checkpoint file `{}` is {what}: the checkpoint is damaged; resume from an older one \
                 (`--resume {}`)",
                path.display(),
                dir.parent().map_or_else(|| ".".into(), |p| p.join(format!("{PREFIX}<N>")).display().to_string())
            )
        };
        if bytes.len() as u64 != entry.bytes {
            return Err(damaged(&format!(
                "truncated or extended ({} bytes, the manifest says {})",
                bytes.len(),
                entry.bytes
            )));
        }
        if sha256(&bytes) != entry.sha256 {
            return Err(damaged("corrupt (its SHA-256 differs from the manifest's)"));
        }
        files.insert(name.clone(), bytes);
    }
    Ok(Verified { dir: dir.to_path_buf(), files })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dsc-store-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn written_checkpoints_verify_and_keep_the_newest() {
        let root = scratch("keep");
        for step in [10, 20, 30] {
            write(&root, step, &[("a.bin", vec![step as u8; 100])], Some(2)).expect("write");
        }
        assert_eq!(complete_steps(&root).unwrap(), vec![20, 30]);
        let newest = resolve(&root).expect("resolve");
        assert_eq!(newest, step_dir(&root, 30));
        let verified = read_verified(&newest).expect("verified");
        assert_eq!(verified.file("a.bin").unwrap(), &[30u8; 100][..]);
        assert!(verified.file("b.bin").is_err());
        // Rewriting a step replaces it whole.
        write(&root, 30, &[("a.bin", vec![1; 5])], None).expect("rewrite");
        assert_eq!(read_verified(&newest).unwrap().file("a.bin").unwrap(), &[1u8; 5][..]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn damaged_files_are_named() {
        let root = scratch("damage");
        let dir = write(&root, 1, &[("a.bin", vec![7; 64])], None).expect("write");
        fs::write(dir.join("a.bin"), [7u8; 10]).unwrap();
        let err = read_verified(&dir).unwrap_err();
        assert!(err.contains("a.bin") && err.contains("truncated"), "{err}");
        let mut flipped = vec![7u8; 64];
        flipped[3] ^= 1;
        fs::write(dir.join("a.bin"), &flipped).unwrap();
        let err = read_verified(&dir).unwrap_err();
        assert!(err.contains("SHA-256"), "{err}");
        fs::write(dir.join(MANIFEST), b"{").unwrap();
        assert!(read_verified(&dir).unwrap_err().contains("corrupt"));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_interrupted_write_leaves_no_checkpoint_and_the_next_write_cleans_up() {
        let root = scratch("interrupted");
        write(&root, 5, &[("a.bin", vec![1; 8])], None).expect("write");
        // What a kill during the next write leaves: a temporary folder without a manifest.
        fs::create_dir_all(root.join(".step-00000006.tmp-1")).unwrap();
        fs::create_dir_all(step_dir(&root, 7)).unwrap();
        assert_eq!(resolve(&root).unwrap(), step_dir(&root, 5));
        assert!(resolve(&root.join("missing")).is_err());
        // A kill while replacing step 5: it was moved aside, the new one not yet in place.
        fs::rename(step_dir(&root, 5), root.join(".step-00000005.old-1")).unwrap();
        write(&root, 8, &[("a.bin", vec![8; 8])], None).expect("write");
        assert_eq!(complete_steps(&root).unwrap(), vec![5, 8], "step 5 is back");
        let hidden: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "{hidden:?}");
        fs::remove_dir_all(&root).unwrap();
    }
}
