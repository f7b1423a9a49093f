//! Kernels driven by index tensors: embedding rows, take/put along the last axis, top-k,
//! counting, and the MoE dispatch (sorting assignments by expert, permuting rows to the
//! experts and combining them back with gate weights), with the transposes the backward
//! pass needs. Accumulations run in a fixed order, so results are deterministic.

use crate::cpu::real::Real;

fn index(i: i32) -> usize {
    usize::try_from(i).expect("indices are non-negative")
}

/// Rows `ids` of `table` [n, d].
pub fn gather<T: Real>(table: &[T], d: usize, ids: &[i32]) -> Vec<T> {
    ids.iter().flat_map(|&i| table[index(i) * d..(index(i) + 1) * d].iter().copied()).collect()
}

/// The transpose of `gather`: adds each row of `g` into row `ids[i]` of a [rows, d] zero table.
pub fn scatter_rows<T: Real>(ids: &[i32], g: &[T], rows: usize, d: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; rows * d];
    for (r, &i) in ids.iter().enumerate() {
        for (o, x) in out[index(i) * d..(index(i) + 1) * d].iter_mut().zip(&g[r * d..(r + 1) * d]) {
            *o += *x;
        }
    }
    out
}

/// x [.., n], idx [.., k] → [.., k].
pub fn take_along<T: Real>(x: &[T], n: usize, idx: &[i32], k: usize) -> Vec<T> {
    idx.iter().enumerate().map(|(a, &i)| x[(a / k) * n + index(i)]).collect()
}

/// The transpose of `take_along`: idx [.., k], g [.., k] → [.., n].
pub fn put_along<T: Real>(idx: &[i32], k: usize, g: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; idx.len() / k * n];
    for (a, &i) in idx.iter().enumerate() {
        out[(a / k) * n + index(i)] += g[a];
    }
    out
}

/// Per row of n, the indices of the k largest, largest first; ties go to the lower index.
pub fn top_k<T: Real>(x: &[T], n: usize, k: usize) -> Vec<i32> {
    let mut out = Vec::with_capacity(x.len() / n * k);
    let mut order: Vec<usize> = Vec::with_capacity(n);
    for row in x.chunks(n) {
        order.clear();
        order.extend(0..n);
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
        out.extend(order[..k].iter().map(|&i| i as i32));
    }
    out
}

/// idx [rows, m] → [rows, bins]: how often each value occurs in each row.
pub fn count<T: Real>(idx: &[i32], m: usize, bins: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; idx.len() / m * bins];
    for (a, &i) in idx.iter().enumerate() {
        out[(a / m) * bins + index(i)] += T::ONE;
    }
    out
}

/// DeepSeek-V3's routing of each token (a row of `scores`, one per expert): on the biased
/// scores s + bias, a group's score is the sum of its two best; the `keep` best of the
/// `groups` groups stay, the experts of the others sink by 1e30; the top `k` are chosen, and
/// their gates are their unbiased scores normalised to sum 1, times `scale`. Returns (chosen
/// [t, k], gates [t, k]). Sums run in the order the unfused graph's do, so the gates are
/// bit-identical to it.
pub fn route<T: Real>(scores: &[T], bias: &[T], groups: usize, keep: usize, k: usize, scale: T) -> (Vec<i32>, Vec<T>) {
    let experts = bias.len();
    let per_group = experts / groups;
    let sink = T::from_f64(1e30);
    let mut chosen = Vec::with_capacity(scores.len() / experts * k);
    let mut gates = Vec::with_capacity(scores.len() / experts * k);
    for s in scores.chunks(experts) {
        let biased: Vec<T> = s.iter().zip(bias).map(|(&s, &b)| s + b).collect();
        let best_two = top_k(&biased, per_group, 2);
        let group_scores: Vec<T> = best_two
            .chunks(2)
            .enumerate()
            .map(|(g, two)| two.iter().fold(T::ZERO, |sum, &i| sum + biased[g * per_group + index(i)]))
            .collect();
        let mut kept = vec![T::ZERO; groups];
        for g in top_k(&group_scores, groups, keep) {
            kept[index(g)] = T::ONE;
        }
        let candidates: Vec<T> =
            biased.iter().enumerate().map(|(e, &b)| b - (T::ONE - kept[e / per_group]) * sink).collect();
        let top = top_k(&candidates, experts, k);
        let total = top.iter().fold(T::ZERO, |sum, &e| sum + s[index(e)]);
        gates.extend(top.iter().map(|&e| s[index(e)] / total * scale));
        chosen.extend(top);
    }
    (chosen, gates)
}

/// Assignment ids (t·k + j) sorted stably by the expert they go to.
pub fn sort_by_expert(idx: &[i32]) -> Vec<i32> {
    let mut order: Vec<i32> = (0..idx.len() as i32).collect();
    order.sort_by_key(|&a| idx[a as usize]);
    order
}

/// Where each expert's rows start in the sorted order, and the total at the end.
pub fn expert_offsets(idx: &[i32], experts: usize) -> Vec<i32> {
    let mut offsets = vec![0i32; experts + 1];
    for &e in idx {
        offsets[index(e) + 1] += 1;
    }
    for e in 0..experts {
        offsets[e + 1] += offsets[e];
    }
    offsets
}

/// Row i of the result is `x[order[i] / k]`: each token's row, once per chosen expert.
pub fn permute<T: Real>(x: &[T], d: usize, order: &[i32], k: usize) -> Vec<T> {
    order.iter().flat_map(|&a| x[(index(a) / k) * d..(index(a) / k + 1) * d].iter().copied()).collect()
}

/// The transpose of `permute`, as a gather: row t = `Σⱼ g[positions[t·k + j]]`, j in order.
pub fn permute_grad<T: Real>(g: &[T], d: usize, positions: &[i32], k: usize, tokens: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; tokens * d];
    for (a, &i) in positions.iter().enumerate() {
        let t = a / k;
        for (o, x) in out[t * d..(t + 1) * d].iter_mut().zip(&g[index(i) * d..(index(i) + 1) * d]) {
            *o += *x;
        }
    }
    out
}

/// The inverse of permutation `order`: `positions[order[i]] = i`.
pub fn invert_order(order: &[i32]) -> Vec<i32> {
    let mut positions = vec![0; order.len()];
    for (i, &a) in order.iter().enumerate() {
        positions[index(a)] = i32::try_from(i).expect("rows fit i32");
    }
    positions
}

/// `out[t] = Σⱼ gates[t, j] · ys[positions[t·k + j]]`, j in order.
pub fn unpermute<T: Real>(ys: &[T], d: usize, positions: &[i32], gates: &[T], k: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; gates.len() / k * d];
    for (a, &i) in positions.iter().enumerate() {
        let (t, gate) = (a / k, gates[a]);
        for (o, y) in out[t * d..(t + 1) * d].iter_mut().zip(&ys[index(i) * d..(index(i) + 1) * d]) {
            *o += gate * *y;
        }
    }
    out
}

/// d ys of `unpermute`: row i = `gate(a) · g[a / k]` for `a = order[i]`.
pub fn unpermute_grad_rows<T: Real>(g: &[T], d: usize, order: &[i32], gates: &[T], k: usize) -> Vec<T> {
    order
        .iter()
        .flat_map(|&a| {
            let (t, gate) = (index(a) / k, gates[index(a)]);
            g[t * d..(t + 1) * d].iter().map(move |x| gate * *x)
        })
        .collect()
}

/// d gates of `unpermute`: gates(a) gets `⟨g[a / k], ys[i]⟩` for `a = order[i]`.
pub fn unpermute_grad_gates<T: Real>(g: &[T], d: usize, ys: &[T], order: &[i32], k: usize, tokens: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; tokens * k];
    for (i, &a) in order.iter().enumerate() {
        let t = index(a) / k;
        out[index(a)] = g[t * d..(t + 1) * d].iter().zip(&ys[i * d..(i + 1) * d]).map(|(x, y)| *x * *y).sum();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_value_and_breaks_ties_low() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.9, 0.2, 0.3], 3, 2), vec![1, 2, 0, 2]);
    }

    #[test]
    fn dispatch_and_combine_round_trip() {
        // 3 tokens, k = 2; token t picks experts idx[t].
        let idx = [1, 0, 2, 1, 0, 2];
        let order = sort_by_expert(&idx);
        assert_eq!(order, vec![1, 4, 0, 3, 2, 5]);
        assert_eq!(expert_offsets(&idx, 3), vec![0, 2, 4, 6]);
        let x = [10.0, 20.0, 30.0]; // d = 1
        let rows = permute(&x, 1, &order, 2);
        assert_eq!(rows, vec![10.0, 30.0, 10.0, 20.0, 20.0, 30.0]);
        // Experts double their rows; gates 0.25 / 0.75 per token: out = 2x.
        let ys: Vec<f64> = rows.iter().map(|r| 2.0 * r).collect();
        let gates = [0.25, 0.75, 0.25, 0.75, 0.25, 0.75];
        let positions = invert_order(&order);
        assert_eq!(positions, vec![2, 0, 4, 3, 1, 5]);
        assert_eq!(unpermute(&ys, 1, &positions, &gates, 2), vec![20.0, 40.0, 60.0]);
        assert_eq!(permute_grad(&[1.0; 6], 1, &positions, 2, 3), vec![2.0, 2.0, 2.0]);
        assert_eq!(
            unpermute_grad_gates(&[1.0, 1.0, 1.0], 1, &ys, &order, 2, 3),
            vec![20.0, 20.0, 40.0, 40.0, 60.0, 60.0]
        );
    }
}
