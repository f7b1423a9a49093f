//! Documents as users bring them: a `.jsonl` file holds one document per line as
//! `{"text": "..."}`; any other file is one UTF-8 document. Errors name the file and line.

use std::path::Path;

/// The documents of one file, in order (empty documents are dropped).
pub fn read_documents(path: &Path) -> Result<Vec<String>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read `{}` as UTF-8 text: {e}", path.display()))?;
    if path.extension().is_none_or(|e| e != "jsonl") {
        return Ok(if text.trim().is_empty() { vec![] } else { vec![text] });
    }
    let mut documents = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("`{}` line {}", path.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{} is not JSON ({e})", at()))?;
        let text = value["text"]
            .as_str()
            .ok_or_else(|| format!("{} has no string `text` (each line is `{{\"text\": \"...\"}}`)", at()))?;
        if !text.is_empty() {
            documents.push(text.to_string());
        }
    }
    Ok(documents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines_and_plain_files_are_documents() {
        let dir = std::env::temp_dir().join(format!("dsc-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jsonl = dir.join("a.jsonl");
        std::fs::write(&jsonl, "{\"text\": \"one\"}\n\n{\"text\": \"two\", \"id\": 3}\n").unwrap();
        assert_eq!(read_documents(&jsonl).unwrap(), ["one", "two"]);
        let plain = dir.join("b.txt");
        std::fs::write(&plain, "all of it\nis one document\n").unwrap();
        assert_eq!(read_documents(&plain).unwrap(), ["all of it\nis one document\n"]);
        std::fs::write(&jsonl, "{\"text\": \"one\"}\n{\"body\": 1}\n").unwrap();
        let err = read_documents(&jsonl).unwrap_err();
        assert!(err.contains("a.jsonl` line 2") && err.contains("text"), "{err}");
        assert!(read_documents(&dir.join("missing.txt")).unwrap_err().contains("missing.txt"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
