//! Safetensors files of named f32 tensors: [`encode`] writes tensors and a string metadata
//! map into the bytes of one file; [`decode`] reads a file back, converting the element types
//! checkpoints of DeepSeek-V3-style models come in (F32, BF16, F16; E4M3 with its 128×128
//! `weight_scale_inv` blocks is dequantised by [`super::hf`]) to f32.

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};

/// A named tensor borrowed from the trainer (no copy until it is encoded).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

/// A tensor read from a file, as f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// The element type it was stored in.
    pub dtype: Dtype,
}

/// A file's tensors by name.
pub type Tensors = BTreeMap<String, Loaded>;
/// A file's string metadata.
pub type Metadata = HashMap<String, String>;

/// The bytes of a safetensors file holding `tensors` (in f32) and `metadata`.
pub fn encode(tensors: &[TensorRef], metadata: Metadata) -> Result<Vec<u8>, String> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| t.data.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map(|view| (t.name.clone(), view))
                .map_err(|e| format!("tensor `{}`: {e}", t.name))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let metadata = (!metadata.is_empty()).then_some(metadata);
    safetensors::serialize(views, metadata).map_err(|e| e.to_string())
}

/// Every tensor of a safetensors file (converted to f32) and its metadata map.
pub fn decode(bytes: &[u8]) -> Result<(Tensors, Metadata), String> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format!("not a safetensors file ({e})"))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let file = SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file ({e})"))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.iter() {
        let data = to_f32(view.dtype(), view.data()).map_err(|e| format!("tensor `{name}`: {e}"))?;
        tensors.insert(name.to_string(), Loaded { shape: view.shape().to_vec(), data, dtype: view.dtype() });
    }
    Ok((tensors, metadata))
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, String> {
    let words = |n: usize| bytes.chunks_exact(n);
    Ok(match dtype {
        Dtype::F32 => words(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => words(2).map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)).collect(),
        Dtype::F16 => words(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        Dtype::F8_E4M3 => bytes.iter().map(|&b| e4m3_to_f32(b)).collect(),
        other => return Err(format!("element type {other:?} is not supported (F32, BF16, F16 or F8_E4M3)")),
    })
}

/// IEEE half precision to f32, subnormals, infinities and NaN included.
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((h >> 10) & 0x1f);
    let mantissa = f32::from(h & 0x3ff);
    sign * match exponent {
        0 => mantissa * 2f32.powi(-24),
        31 if mantissa == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + mantissa / 1024.0) * 2f32.powi(e - 15),
    }
}

/// OCP FP8 E4M3 (bias 7, no infinities, S.1111.111 is NaN) to f32.
fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((b >> 3) & 0xf);
    let mantissa = f32::from(b & 0x7);
    sign * match (exponent, b & 0x7f) {
        (_, 0x7f) => f32::NAN,
        (0, _) => mantissa / 8.0 * 2f32.powi(-6),
        (e, _) => (1.0 + mantissa / 8.0) * 2f32.powi(e - 7),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_and_metadata_round_trip_bitwise() {
        let a = [1.5f32, -0.0, f32::MIN_POSITIVE, 3.25e-7, 42.0, -1e30];
        let b = [7.0f32];
        let tensors = vec![
            TensorRef { name: "a".into(), shape: vec![2, 3], data: &a },
            TensorRef { name: "b".into(), shape: vec![1], data: &b },
        ];
        let metadata = HashMap::from([("k".to_string(), "v".to_string())]);
        let bytes = encode(&tensors, metadata.clone()).expect("encode");
        let (back, meta) = decode(&bytes).expect("decode");
        assert_eq!(meta, metadata);
        assert_eq!(back["a"].shape, vec![2, 3]);
        assert_eq!(back["a"].data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), a.map(f32::to_bits).to_vec());
        assert_eq!(back["b"].data, vec![7.0]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(b"").is_err());
        assert!(decode(&[0xff; 64]).is_err());
        let bytes = encode(&[TensorRef { name: "a".into(), shape: vec![4], data: &[1.0; 4] }], HashMap::new()).unwrap();
        assert!(decode(&bytes[..bytes.len() - 3]).is_err(), "a truncated file");
    }

    #[test]
    fn half_and_fp8_decode_to_their_values() {
        // 1.0, −2.0, 65504 (largest half), 2⁻²⁴ (smallest subnormal).
        for (bits, value) in [(0x3c00u16, 1.0f32), (0xc000, -2.0), (0x7bff, 65504.0), (0x0001, 2f32.powi(-24))] {
            assert_eq!(f16_to_f32(bits), value);
        }
        // E4M3: 1.0 = 0.0111.000, 448 = 0.1111.110 (the largest), 2⁻⁹ = the smallest subnormal.
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert!(e4m3_to_f32(0x7f).is_nan());
        let bf16 = [0x80u8, 0x3f]; // 0x3f80 = 1.0
        assert_eq!(to_f32(Dtype::BF16, &bf16).unwrap(), vec![1.0]);
    }
}
