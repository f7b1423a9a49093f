//! Inference on the CPU backend: the logits of the main model for given token rows, in f64
//! with no low-precision rounding, the reference a Hugging Face port is compared with
//! (`dsc forward`, `tests/device/hf_parity.py`).

use crate::cpu::{run, Tensor, Value};
use dsc_compiler::graph::model::build_logits;
use dsc_compiler::graph::Numerics;
use dsc_lang::Spec;

/// Logits [rows][position · vocab] of `tokens` (rows of equal length) under the model of
/// `spec` with parameter values `params` (in the graph's order).
pub fn logits(spec: &Spec, params: &[Vec<f32>], tokens: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, String> {
    let seq = tokens.first().map_or(0, Vec::len);
    if seq == 0 || tokens.iter().any(|row| row.len() != seq) {
        return Err("the token rows must be non-empty and of equal length".into());
    }
    if let Some(t) = tokens.iter().flatten().find(|&&t| u64::from(t) >= spec.model.vocab) {
        return Err(format!("token {t} is outside the model's vocabulary of {}", spec.model.vocab));
    }
    let mut spec = spec.clone();
    if let Some(y) = spec.model.attention.yarn.as_ref().filter(|y| spec.train.seq_len > y.original_seq) {
        if seq as u64 <= y.original_seq {
            return Err(format!(
                "the model was trained with YaRN (sequences over {} tokens); give rows longer than that",
                y.original_seq
            ));
        }
    }
    spec.train.seq_len = seq as u64;
    spec.train.micro_batch = tokens.len() as u64;
    let graph = build_logits(&spec, Numerics::Exact);
    if graph.params.len() != params.len() || graph.params.iter().zip(params).any(|(p, v)| p.numel() != v.len()) {
        return Err("the parameters do not fit the model".into());
    }
    let mut args: Vec<Value<f64>> = graph
        .params
        .iter()
        .zip(params)
        .map(|(p, v)| Value::real(Tensor::new(p.shape.clone(), v.iter().map(|&x| f64::from(x)).collect())))
        .collect();
    let ids = tokens.iter().flatten().map(|&t| t as i32).collect();
    args.push(Value::int(Tensor::new(vec![tokens.len(), seq], ids)));
    let out = run(&graph.module, graph.model, args);
    let flat = &out[0].as_real().data;
    let row = flat.len() / tokens.len();
    Ok(flat.chunks(row).map(|r| r.iter().map(|&x| x as f32).collect()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::init::init_params;
    use dsc_compiler::graph::model::build;

    #[test]
    fn the_masked_cross_entropy_of_the_logits_is_the_training_graphs_loss() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3-tiny.dsc");
        let overrides = ["train.seq_len=8".to_string(), "train.micro_batch=1".to_string()];
        let spec = dsc_lang::load(&path, &overrides).checked_spec().expect("tiny").clone();
        let training = build(&spec, Numerics::Exact);
        let params: Vec<Tensor<f64>> = init_params(&training.params, 0.02, 3);
        // Tokens for the training graph: 8 inputs, the labels after them, and one more for MTP.
        let tokens: Vec<u32> = (0..10).map(|i| (i * 37 + 5) % 512).collect();
        // The loss counts the labels whose mask is 1 (positions 1..=8 are the main head's).
        let counted: Vec<f64> = (0..10).map(|i| if i % 3 == 0 { 0.0 } else { 1.0 }).collect();
        let mask = || Value::real(Tensor::new(vec![1, 10], counted.clone()));
        let mut args: Vec<Value<f64>> = params.iter().cloned().map(Value::real).collect();
        args.push(Value::int(Tensor::new(vec![1, 10], tokens.iter().map(|&t| t as i32).collect())));
        args.push(mask());
        args.push(Value::real(Tensor::scalar(0.0)));
        let main_loss = run(&training.module, training.model, args)[1].scalar();
        let as_f32: Vec<Vec<f32>> = params.iter().map(|p| p.data.iter().map(|&x| x as f32).collect()).collect();
        // The same parameters rounded to f32, as a checkpoint holds them.
        let mut args: Vec<Value<f64>> = as_f32
            .iter()
            .zip(&training.params)
            .map(|(v, p)| Value::real(Tensor::new(p.shape.clone(), v.iter().map(|&x| f64::from(x)).collect())))
            .collect();
        args.push(Value::int(Tensor::new(vec![1, 10], tokens.iter().map(|&t| t as i32).collect())));
        args.push(mask());
        args.push(Value::real(Tensor::scalar(0.0)));
        let rounded_loss = run(&training.module, training.model, args)[1].scalar();
        let out = logits(&spec, &as_f32, &[tokens[..8].to_vec()]).expect("logits");
        let vocab = 512;
        let nll: f64 = (0..8)
            .map(|i| {
                let row: Vec<f64> = out[0][i * vocab..(i + 1) * vocab].iter().map(|&x| f64::from(x)).collect();
                let max = row.iter().copied().fold(f64::MIN, f64::max);
                let z: f64 = row.iter().map(|x| (x - max).exp()).sum();
                counted[i + 1] * (max + z.ln() - row[tokens[i + 1] as usize])
            })
            .sum::<f64>()
            / counted[1..9].iter().sum::<f64>();
        assert!((nll - rounded_loss).abs() < 1e-6 * rounded_loss, "{nll} vs {rounded_loss}");
        assert!((nll - main_loss).abs() < 1e-4 * main_loss, "{nll} vs {main_loss}");
        assert!(logits(&spec, &as_f32, &[vec![600]]).is_err());
        assert!(logits(&spec, &as_f32, &[vec![1, 2], vec![3]]).is_err());
    }
}
