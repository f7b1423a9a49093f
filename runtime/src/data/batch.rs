//! A training batch of packed sequences, whatever corpus it came from: documents concatenated
//! with `<|eos|>` between them are cut into rows of `seq_len + 1` consecutive tokens, so a row's
//! first `seq_len` tokens are the model's inputs and its last `seq_len` the labels (the inputs
//! shifted by one). No attention mask separates the documents inside a row. Each token carries
//! a loss flag: whether it counts as a label (always in pre-training; in SFT only the
//! responses and the `<|eos|>` after them).

/// `sequences` rows of `seq_len + 1` tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// `[sequences, seq_len + 1]`, row-major.
    pub tokens: Vec<u32>,
    /// Per token, whether it counts as a label; the same layout.
    pub loss_mask: Vec<bool>,
    pub sequences: usize,
    pub seq_len: usize,
}

impl Batch {
    /// Packs the next `sequences · (seq_len + 1)` tokens of `stream` (with their loss flags)
    /// into rows.
    ///
    /// # Panics
    /// If `stream` ends before the batch is full.
    pub fn pack(sequences: usize, seq_len: usize, stream: impl Iterator<Item = (u32, bool)>) -> Self {
        let wanted = sequences * (seq_len + 1);
        let (tokens, loss_mask): (Vec<u32>, Vec<bool>) = stream.take(wanted).unzip();
        assert_eq!(tokens.len(), wanted, "the token stream ended inside a batch");
        Batch { tokens, loss_mask, sequences, seq_len }
    }

    /// Row `i`: `seq_len + 1` consecutive tokens.
    pub fn row(&self, i: usize) -> &[u32] {
        let width = self.seq_len + 1;
        &self.tokens[i * width..(i + 1) * width]
    }

    /// The inputs of row `i`: its first `seq_len` tokens.
    pub fn inputs(&self, i: usize) -> &[u32] {
        &self.row(i)[..self.seq_len]
    }

    /// The labels of row `i`: the token after each input.
    pub fn labels(&self, i: usize) -> &[u32] {
        &self.row(i)[1..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_take_consecutive_tokens_and_labels_are_inputs_shifted_by_one() {
        let batch = Batch::pack(2, 3, (10..).map(|t| (t, true)));
        assert_eq!(batch.tokens, (10..18).collect::<Vec<_>>());
        assert_eq!(batch.inputs(0), [10, 11, 12]);
        assert_eq!(batch.labels(0), [11, 12, 13]);
        assert_eq!(batch.inputs(1), [14, 15, 16]);
        assert_eq!(batch.labels(1), [15, 16, 17]);
    }

    #[test]
    #[should_panic(expected = "ended inside a batch")]
    fn a_short_stream_does_not_make_a_batch() {
        Batch::pack(2, 3, (0..5).map(|t| (t, true)));
    }
}
