//! Row-wise work spread over the machine's cores: an output of whole rows is cut into as many
//! contiguous blocks as there are cores, each filled on a thread of its own by the same code
//! that fills one row after another, so the result is the same bits on any number of cores.
//! Work too small to pay for the threads stays on the caller's.

/// Below this many operations (rows × work per row) the rows are filled on this thread.
const THREADED_WORK: usize = 1 << 24;

/// Fills `out`, rows of `row_len` elements, by `fill(first_row, block)` on contiguous blocks of
/// rows; `work_per_row` (operations) decides whether threads pay.
pub fn fill_rows<T: Send>(out: &mut [T], row_len: usize, work_per_row: usize, fill: impl Fn(usize, &mut [T]) + Sync) {
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if rows < 2 || cores < 2 || rows.saturating_mul(work_per_row) < THREADED_WORK {
        fill(0, out);
        return;
    }
    let per_block = rows.div_ceil(cores);
    std::thread::scope(|scope| {
        for (index, block) in out.chunks_mut(per_block * row_len).enumerate() {
            let fill = &fill;
            scope.spawn(move || fill(index * per_block, block));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_filled_once_with_its_own_index() {
        for (rows, row_len, work) in [(0, 3, 1 << 24), (1, 5, 1 << 25), (7, 3, 1 << 24), (1000, 4, 1 << 12), (5, 0, 1)]
        {
            let mut out = vec![usize::MAX; rows * row_len];
            fill_rows(&mut out, row_len, work, |first, block| {
                for (r, row) in block.chunks_mut(row_len.max(1)).enumerate() {
                    row.iter_mut().enumerate().for_each(|(j, x)| *x = (first + r) * 100 + j);
                }
            });
            let want: Vec<usize> = (0..rows * row_len).map(|i| (i / row_len) * 100 + i % row_len).collect();
            assert_eq!(out, want, "{rows} rows of {row_len}");
        }
    }
}
