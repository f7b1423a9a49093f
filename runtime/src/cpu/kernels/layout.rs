//! Kernels that move or reduce data without arithmetic on it beyond sums: broadcasting,
//! reductions, transposes, slices and concatenation. All work on row-major data of any
//! element type.

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Strides with which an input of `shape` is read when broadcast to `out` (0 where it is
/// broadcast), aligned to `out`'s rank.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = strides(shape);
    let offset = out.len() - shape.len();
    (0..out.len()).map(|i| if i < offset || shape[i - offset] == 1 { 0 } else { own[i - offset] }).collect()
}

/// Calls `f(output index, input offsets…)` for every element of `out`, where each input is
/// read with its broadcast strides.
pub fn for_each_broadcast(out: &[usize], inputs: &[&[usize]], mut f: impl FnMut(usize, &[usize])) {
    let rank = out.len();
    let input_strides: Vec<Vec<usize>> = inputs.iter().map(|s| broadcast_strides(s, out)).collect();
    let total: usize = out.iter().product();
    let mut index = vec![0usize; rank];
    let mut offsets = vec![0usize; inputs.len()];
    for o in 0..total {
        f(o, &offsets);
        // Advance the multi-index and the offsets.
        for axis in (0..rank).rev() {
            index[axis] += 1;
            for (off, s) in offsets.iter_mut().zip(&input_strides) {
                *off += s[axis];
            }
            if index[axis] < out[axis] {
                break;
            }
            for (off, s) in offsets.iter_mut().zip(&input_strides) {
                *off -= s[axis] * out[axis];
            }
            index[axis] = 0;
        }
    }
}

pub fn broadcast_to<E: Copy>(data: &[E], shape: &[usize], out: &[usize]) -> Vec<E> {
    let mut result = Vec::with_capacity(out.iter().product());
    for_each_broadcast(out, &[shape], |_, off| result.push(data[off[0]]));
    result
}

/// Sums `data` of `shape` down to `out`, which broadcasts to `shape` (the transpose of
/// broadcasting). Each output sums its inputs in row-major order.
pub fn sum_to<E: Copy + Default + std::ops::AddAssign>(data: &[E], shape: &[usize], out: &[usize]) -> Vec<E> {
    let mut result = vec![E::default(); out.iter().product()];
    let mut reads = 0;
    for_each_broadcast(shape, &[out], |i, off| {
        result[off[0]] += data[i];
        reads += 1;
    });
    debug_assert_eq!(reads, data.len());
    result
}

/// `shape` seen as `[outer, shape[axis], inner]`.
pub fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// Reduces `axis` with `f` starting from `init`.
pub fn reduce<E: Copy>(data: &[E], shape: &[usize], axis: usize, init: E, f: impl Fn(E, E) -> E) -> Vec<E> {
    let (outer, n, inner) = around(shape, axis);
    let mut out = vec![init; outer * inner];
    for o in 0..outer {
        for i in 0..n {
            let row = &data[(o * n + i) * inner..(o * n + i + 1) * inner];
            for (acc, x) in out[o * inner..(o + 1) * inner].iter_mut().zip(row) {
                *acc = f(*acc, *x);
            }
        }
    }
    out
}

pub fn transpose<E: Copy>(data: &[E], shape: &[usize], perm: &[usize]) -> Vec<E> {
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let in_strides = strides(shape);
    let permuted: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let mut result = Vec::with_capacity(data.len());
    let rank = shape.len();
    let mut index = vec![0usize; rank];
    let mut offset = 0usize;
    for _ in 0..data.len() {
        result.push(data[offset]);
        for axis in (0..rank).rev() {
            index[axis] += 1;
            offset += permuted[axis];
            if index[axis] < out_shape[axis] {
                break;
            }
            offset -= permuted[axis] * out_shape[axis];
            index[axis] = 0;
        }
    }
    result
}

pub fn slice<E: Copy>(data: &[E], shape: &[usize], axis: usize, start: usize, end: usize) -> Vec<E> {
    let (outer, n, inner) = around(shape, axis);
    let mut out = Vec::with_capacity(outer * (end - start) * inner);
    for o in 0..outer {
        out.extend_from_slice(&data[(o * n + start) * inner..(o * n + end) * inner]);
    }
    out
}

/// Places `data` (of `shape`) at `start` along `axis` in zeros of length `len` there.
pub fn pad_slice<E: Copy + Default>(data: &[E], shape: &[usize], axis: usize, start: usize, len: usize) -> Vec<E> {
    let (outer, n, inner) = around(shape, axis);
    let mut out = vec![E::default(); outer * len * inner];
    for o in 0..outer {
        out[(o * len + start) * inner..(o * len + start + n) * inner]
            .copy_from_slice(&data[o * n * inner..(o + 1) * n * inner]);
    }
    out
}

pub fn concat<E: Copy>(parts: &[(&[E], &[usize])], axis: usize) -> Vec<E> {
    let outer = around(parts[0].1, axis).0;
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.0.len()).sum());
    for o in 0..outer {
        for (data, shape) in parts {
            let (_, n, inner) = around(shape, axis);
            out.extend_from_slice(&data[o * n * inner..(o + 1) * n * inner]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_and_its_transpose() {
        // [2, 1, 3] broadcast to [2, 2, 3], then summed back.
        let x = [1, 2, 3, 4, 5, 6];
        let b = broadcast_to(&x, &[2, 1, 3], &[2, 2, 3]);
        assert_eq!(b, vec![1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6]);
        assert_eq!(sum_to(&b, &[2, 2, 3], &[2, 1, 3]), vec![2, 4, 6, 8, 10, 12]);
        assert_eq!(sum_to(&b, &[2, 2, 3], &[3]), vec![10, 14, 18]);
        assert_eq!(sum_to(&b, &[2, 2, 3], &[]), vec![42]);
    }

    #[test]
    fn transposes_slices_and_concatenation() {
        let x: Vec<i32> = (0..24).collect();
        let t = transpose(&x, &[2, 3, 4], &[2, 0, 1]);
        // t[k, i, j] = x[i, j, k]
        assert_eq!(t[6 + 3 + 2], x[12 + 2 * 4 + 1]);
        assert_eq!(slice(&x, &[2, 3, 4], 1, 1, 2), vec![4, 5, 6, 7, 16, 17, 18, 19]);
        let padded = pad_slice(&slice(&x, &[2, 3, 4], 2, 1, 3), &[2, 3, 2], 2, 1, 4);
        assert_eq!(&padded[..4], &[0, 1, 2, 0]);
        let c = concat(&[(&[1, 2][..], &[2, 1][..]), (&[3, 4, 5, 6][..], &[2, 2][..])], 1);
        assert_eq!(c, vec![1, 3, 4, 2, 5, 6]);
        assert_eq!(reduce(&x, &[2, 3, 4], 1, 0, |a, b| a + b), vec![12, 15, 18, 21, 48, 51, 54, 57]);
    }
}
