//! Documents as users bring them: a `.jsonl` file holds one document per line, as
//! `{"text": "..."}` or, for supervised fine-tuning, `{"prompt": "...", "response": "..."}`;
//! any other file is one UTF-8 document. Errors name the file and line.

use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Document {
    /// Text whose every token counts (pre-training).
    Text(String),
    /// An SFT example: the loss counts on the response only.
    Chat { prompt: String, response: String },
}

impl Document {
    /// Its strings, for training a tokenizer.
    pub fn texts(&self) -> Vec<&str> {
        match self {
            Document::Text(text) => vec![text],
            Document::Chat { prompt, response } => vec![prompt, response],
        }
    }
}

/// The documents of one file, in order (empty documents are dropped).
pub fn read_documents(path: &Path) -> Result<Vec<Document>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read `{}` as UTF-8 text: {e}", path.display()))?;
    if path.extension().is_none_or(|e| e != "jsonl") {
        return Ok(if text.trim().is_empty() { vec![] } else { vec![Document::Text(text)] });
    }
    let mut documents = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("`{}` line {}", path.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{} is not JSON ({e})", at()))?;
        let document = match (value["text"].as_str(), value["prompt"].as_str(), value["response"].as_str()) {
            (Some(text), None, None) => Document::Text(text.to_string()),
            (None, Some(prompt), Some(response)) => {
                Document::Chat { prompt: prompt.to_string(), response: response.to_string() }
            }
            _ => {
                return Err(format!(
                    "{} is neither `{{\"text\": \"...\"}}` nor `{{\"prompt\": \"...\", \"response\": \"...\"}}`",
                    at()
                ))
            }
        };
        if document.texts().iter().any(|t| !t.is_empty()) {
            documents.push(document);
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
        std::fs::write(&jsonl, "{\"text\": \"one\"}\n\n{\"prompt\": \"2+2?\", \"response\": \"4\", \"id\": 3}\n")
            .unwrap();
        let chat = Document::Chat { prompt: "2+2?".into(), response: "4".into() };
        assert_eq!(read_documents(&jsonl).unwrap(), [Document::Text("one".into()), chat]);
        let plain = dir.join("b.txt");
        std::fs::write(&plain, "all of it\nis one document\n").unwrap();
        assert_eq!(read_documents(&plain).unwrap(), [Document::Text("all of it\nis one document\n".into())]);
        std::fs::write(&jsonl, "{\"text\": \"one\"}\n{\"body\": 1}\n").unwrap();
        let err = read_documents(&jsonl).unwrap_err();
        assert!(err.contains("a.jsonl` line 2") && err.contains("text"), "{err}");
        assert!(read_documents(&dir.join("missing.txt")).unwrap_err().contains("missing.txt"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
