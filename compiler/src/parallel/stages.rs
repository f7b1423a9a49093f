//! The split of the model into pipeline stages. The model is a sequence of items: the embedding,
//! layers 0..L, and the tail (final norm + output head, then the MTP modules, which share the
//! head and so sit with it). A spec's explicit layout is taken as it is (the checker has made it
//! contiguous and covering); otherwise the items are cut into contiguous stages minimising the
//! largest per-stage training FLOPs, ties going to the later stages (they keep fewer
//! micro-batches in flight), so the embedding always starts stage 0 and the tail ends the last.

use std::ops::Range;

use dsc_lang::{LayerRange, Model, Spec, StagePart};
use serde::Serialize;

use crate::estimate::flops;

/// One pipeline stage: what it holds, in model order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stage {
    pub index: u64,
    pub parts: Vec<StagePart>,
}

/// The stages of a spec's pipeline.
pub fn split(spec: &Spec) -> Vec<Stage> {
    let pipeline = &spec.parallel.pipeline;
    let layout = if pipeline.layout.is_empty() {
        balance(&spec.model, pipeline.stages, spec.train.seq_len)
    } else {
        pipeline.layout.clone()
    };
    layout.into_iter().zip(0..).map(|(parts, index)| Stage { index, parts }).collect()
}

/// A stage's contents for people, e.g. "embedding, layers 0..4" (layer ranges are half-open).
pub fn describe(parts: &[StagePart]) -> String {
    let names: Vec<String> = parts
        .iter()
        .map(|part| match part {
            StagePart::Embedding => "embedding".to_string(),
            StagePart::Layers(range) => format!("layers {}..{}", range.start, range.end),
            StagePart::Head => "head".to_string(),
            StagePart::Mtp => "mtp".to_string(),
        })
        .collect();
    names.join(", ")
}

/// Cuts the items into `stages` non-empty contiguous groups by training FLOPs per token.
fn balance(model: &Model, stages: u64, seq_len: u64) -> Vec<Vec<StagePart>> {
    let costs = item_costs(model, seq_len);
    let stages = usize::try_from(stages).expect("stage count fits in usize");
    assert!(
        (1..=costs.len()).contains(&stages),
        "{stages} pipeline stages for {} items (embedding, {} layers, head)",
        costs.len(),
        model.layers
    );
    min_max_partition(&costs, stages).into_iter().map(|items| stage_parts(model, items)).collect()
}

/// Training FLOPs per token of each item: embedding, each layer, tail.
fn item_costs(model: &Model, seq_len: u64) -> Vec<u64> {
    let layer_costs = (0..model.layers).map(|layer| flops::layer_training(model, layer, seq_len));
    let tail: u64 = tail_parts(model).iter().map(|part| flops::training(model, part, seq_len)).sum();
    std::iter::once(0).chain(layer_costs).chain(std::iter::once(tail)).collect()
}

fn tail_parts(model: &Model) -> Vec<StagePart> {
    let mut parts = vec![StagePart::Head];
    if model.mtp.is_some() {
        parts.push(StagePart::Mtp);
    }
    parts
}

/// What items `items` (0 = embedding, 1..=L = layers, L+1 = tail) are as stage parts.
fn stage_parts(model: &Model, items: Range<usize>) -> Vec<StagePart> {
    let tail = model.layers as usize + 1;
    let mut parts = Vec::new();
    if items.start == 0 {
        parts.push(StagePart::Embedding);
    }
    let layers = LayerRange { start: items.start.max(1) as u64 - 1, end: items.end.min(tail) as u64 - 1 };
    if !layers.is_empty() {
        parts.push(StagePart::Layers(layers));
    }
    if items.end > tail {
        parts.extend(tail_parts(model));
    }
    parts
}

/// Splits `costs` into `parts` non-empty contiguous ranges with the smallest possible largest
/// sum; among those, each range from the last one back is as long as the bound allows.
fn min_max_partition(costs: &[u64], parts: usize) -> Vec<Range<usize>> {
    let n = costs.len();
    let prefix: Vec<u64> = std::iter::once(0)
        .chain(costs.iter().scan(0, |sum, &cost| {
            *sum += cost;
            Some(*sum)
        }))
        .collect();
    let sum = |range: Range<usize>| prefix[range.end] - prefix[range.start];
    // best[p][i]: the smallest largest sum cutting the first i items into p + 1 ranges
    // (u64::MAX where there are too few items).
    let mut best = vec![prefix.clone()];
    for p in 1..parts {
        let row = (0..=n).map(|i| (p..i).map(|j| best[p - 1][j].max(sum(j..i))).min().unwrap_or(u64::MAX)).collect();
        best.push(row);
    }
    let bound = best[parts - 1][n];
    let mut ranges = Vec::with_capacity(parts);
    let mut end = n;
    for p in (1..parts).rev() {
        let start =
            (p..end).find(|&j| best[p - 1][j] <= bound && sum(j..end) <= bound).expect("the optimum is reachable");
        ranges.push(start..end);
        end = start;
    }
    ranges.push(0..end);
    ranges.reverse();
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    /// Every layer exactly once, in order; embedding first on stage 0; head (then MTP) last.
    fn assert_covers(model: &Model, stages: &[Stage]) {
        let parts: Vec<StagePart> = stages.iter().flat_map(|stage| stage.parts.clone()).collect();
        assert_eq!(parts.first(), Some(&StagePart::Embedding));
        assert_eq!(stages[0].parts[0], StagePart::Embedding);
        let mut next = 0;
        for part in &parts {
            if let StagePart::Layers(range) = part {
                assert_eq!(range.start, next, "{parts:?}");
                assert!(!range.is_empty());
                next = range.end;
            }
        }
        assert_eq!(next, model.layers);
        assert!(stages.last().unwrap().parts.ends_with(&tail_parts(model)));
        assert_eq!(parts.len(), stages.iter().map(|s| s.parts.len()).sum::<usize>());
    }

    #[test]
    fn deepseek_v3_stages_cover_all_layers() {
        let spec = testing::deepseek_v3();
        let stages = split(&spec);
        assert_eq!(stages.len(), 16);
        assert!(stages.iter().zip(0..).all(|(stage, i)| stage.index == i));
        assert_covers(&spec.model, &stages);
        // Head + MTP cost about four layers: 15 stages of 4 layers, the last holds one.
        assert_eq!(describe(&stages[0].parts), "embedding, layers 0..4");
        assert_eq!(describe(&stages[15].parts), "layers 60..61, head, mtp");
        assert_eq!(split(&spec), stages, "deterministic");
    }

    #[test]
    fn partition_matches_brute_force() {
        let costs = [0, 7, 3, 9, 1, 4, 8, 2, 6];
        let largest = |ranges: &[Range<usize>]| {
            ranges.iter().map(|range| costs[range.clone()].iter().sum::<u64>()).max().unwrap()
        };
        for parts in 1..=costs.len() {
            let ranges = min_max_partition(&costs, parts);
            assert_eq!(ranges.len(), parts);
            assert!(ranges.iter().all(|range| !range.is_empty()));
            assert_eq!(ranges.last().unwrap().end, costs.len());
            assert!(ranges.windows(2).all(|pair| pair[0].end == pair[1].start));
            // Every way to place parts − 1 cuts between the 9 items.
            let brute = (0u32..1 << (costs.len() - 1))
                .filter(|cuts| cuts.count_ones() as usize == parts - 1)
                .map(|cuts| {
                    let mut bounds = vec![0];
                    bounds.extend((1..costs.len()).filter(|i| cuts & (1 << (i - 1)) != 0));
                    bounds.push(costs.len());
                    let ranges: Vec<_> = bounds.windows(2).map(|b| b[0]..b[1]).collect();
                    largest(&ranges)
                })
                .min()
                .unwrap();
            assert_eq!(largest(&ranges), brute, "{parts} parts");
        }
    }

    #[test]
    fn explicit_layout_is_kept() {
        let mut spec = testing::deepseek_v3();
        spec.parallel.pipeline.stages = 2;
        let layout = vec![
            vec![StagePart::Embedding, StagePart::Layers(LayerRange { start: 0, end: 30 })],
            vec![StagePart::Layers(LayerRange { start: 30, end: 61 }), StagePart::Head, StagePart::Mtp],
        ];
        spec.parallel.pipeline.layout = layout.clone();
        let parts: Vec<_> = split(&spec).into_iter().map(|stage| stage.parts).collect();
        assert_eq!(parts, layout);
    }

    #[test]
    fn as_many_stages_as_items() {
        let mut spec = testing::tiny_dense();
        spec.parallel.pipeline.stages = 3;
        let stages = split(&spec);
        let parts: Vec<String> = stages.iter().map(|stage| describe(&stage.parts)).collect();
        assert_eq!(parts, ["embedding", "layers 0..1", "head"]);
    }

    #[test]
    fn partition_by_hand() {
        assert_eq!(min_max_partition(&[0, 5, 5, 5, 5, 9], 3), [0..3, 3..5, 5..6]);
        assert_eq!(min_max_partition(&[0, 1, 1, 1], 1), [Range { start: 0, end: 4 }]);
        // Ties go to the back: [0, 2 | 2, 2] and [0, 2, 2 | 2] both have max 4.
        assert_eq!(min_max_partition(&[0, 2, 2, 2], 2), [0..2, 2..4]);
    }
}
