//! A plan's tuning: `tuning.json` beside `plan.json`, written by `dsc tune DIR` on a GPU and
//! read by the CUDA backend. For each of the plan's FP8 GEMMs that generated tiles can run (a
//! library GEMM kernel: a dense Fprop or Dgrad with 128×128 weight blocks, or the MoE experts'
//! products or weight gradients) it records what each candidate took on that GEMM's shapes (the
//! plan's generated tiles, [`super::Plan::generated_gemms`], and cuBLASLt, [`LIBRARY`], where it
//! runs the GEMM), how far each result was from the reference's (cuBLASLt's, else the first
//! tile's), and the fastest right one, which the backend then runs. Without the file the
//! backend runs the experts' first tiles and the dense products on cuBLASLt. `dsc compile -o
//! DIR` removes it: the plan it measured is gone.

use super::PlanError;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const TUNING_FILE: &str = "tuning.json";

/// The name [`TunedGemm::chosen`] gives cuBLASLt's path (one product per expert, the offsets
/// read back to the host first).
pub const LIBRARY: &str = "cublaslt";

/// The largest relative error (Frobenius norm, against the reference's result on the same FP8
/// operands: cuBLASLt's, or where it cannot run the GEMM the first tile's) a candidate may have
/// and be chosen. Issue 9 holds a generated GEMM's error against float64 to at most 1.1 times
/// cuBLASLt's, ~1.3e-4 for FP8 products over K ≥ 4K (the tensor cores' partial sums are
/// promoted every 128 elements: benches/README.md); two results within that of float64 are
/// within ~2.1 times it of each other.
pub const MAX_ERROR: f64 = 3e-4;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tuning {
    /// The GPU it was measured on.
    pub gpu: String,
    pub gemms: Vec<TunedGemm>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TunedGemm {
    /// The plan's kernel.
    pub kernel: String,
    /// Rows (of A; the Wgrad: of the gradient), N, K (the Wgrad: the tokens' capacity) and
    /// experts.
    pub shape: [usize; 4],
    pub measured: Vec<Measured>,
    /// The fastest whose error is within [`MAX_ERROR`]: a kernel's name or [`LIBRARY`].
    pub chosen: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// A generated kernel's name, or [`LIBRARY`].
    pub candidate: String,
    /// The median of the timed launches, in microseconds.
    pub micros: f64,
    /// Relative error against the reference's result ([`MAX_ERROR`]; 0 for the reference).
    pub error: f64,
}

impl TunedGemm {
    /// The fastest of `measured` within [`MAX_ERROR`].
    pub fn fastest(measured: &[Measured]) -> Option<&Measured> {
        measured.iter().filter(|m| m.error <= MAX_ERROR).min_by(|a, b| a.micros.total_cmp(&b.micros))
    }
}

impl Tuning {
    /// The tuning of the plan in `dir`, if it has been tuned.
    pub fn read(dir: &Path) -> Result<Option<Tuning>, PlanError> {
        let path = dir.join(TUNING_FILE);
        let shown = path.display().to_string();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| PlanError::Tuning(e.to_string(), shown)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(PlanError::Io(e, shown)),
        }
    }

    /// Writes `dir/tuning.json` (whole, or not at all: through a temporary file).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{TUNING_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, dir.join(TUNING_FILE))
    }

    /// Removes `dir/tuning.json`, if there is one.
    pub fn remove(dir: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(dir.join(TUNING_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(candidate: &str, micros: f64, error: f64) -> Measured {
        Measured { candidate: candidate.into(), micros, error }
    }

    #[test]
    fn the_fastest_right_candidate_is_chosen() {
        let all = [measured(LIBRARY, 30.0, 0.0), measured("a", 10.0, 1e-3), measured("b", 20.0, 1e-6)];
        assert_eq!(TunedGemm::fastest(&all).map(|m| m.candidate.as_str()), Some("b"));
        assert_eq!(TunedGemm::fastest(&all[1..2]), None);
    }

    #[test]
    fn a_tuning_is_written_read_and_removed() {
        let dir = std::env::temp_dir().join(format!("dsc-tuning-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Tuning::read(&dir).unwrap(), None);
        let gemm = TunedGemm {
            kernel: "layer1_bwd_7_scaled_grouped_wgrad".into(),
            shape: [1024, 2048, 53120, 32],
            measured: vec![measured(LIBRARY, 300.0, 0.0), measured("fp8_wgrad_m128_n128_s4", 150.0, 3e-7)],
            chosen: "fp8_wgrad_m128_n128_s4".into(),
        };
        let tuning = Tuning { gpu: "H100".into(), gemms: vec![gemm] };
        tuning.write(&dir).unwrap();
        let read = Tuning::read(&dir).unwrap().expect("written");
        assert_eq!(read, tuning);
        std::fs::write(dir.join(TUNING_FILE), "{\"gpu\": 1}").unwrap();
        let error = Tuning::read(&dir).unwrap_err().to_string();
        assert!(error.contains("tuning.json") && error.contains("dsc tune"), "{error}");
        Tuning::remove(&dir).unwrap();
        Tuning::remove(&dir).unwrap();
        assert_eq!(Tuning::read(&dir).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
