//! The graph ops of expert parallelism, which move an MoE layer's rows between the members of
//! an expert-parallel group (`exchange_counts`, `dispatch`, `combine`; `received_offsets` only
//! reads their counts), and the [`Exchange`] through which a running graph reaches the other
//! members. Member j holds routed experts j·h .. (j+1)·h, h = E / members. Rows travel as f32.

use super::real::Real;
use super::value::{Tensor, Value};
use crate::comm::CommError;
use dsc_compiler::graph::ir::{Node, Op};

/// The members of this rank's expert-parallel group, as a running graph sees them.
pub trait Exchange {
    /// Sends `parts[j]` to member j (this rank's own part included); returns what every member
    /// sent this one, in member order.
    fn all_to_all(&self, parts: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CommError>;
}

/// A rank outside any group: a graph with an all-to-all cannot run on it.
pub struct Alone;

impl Exchange for Alone {
    fn all_to_all(&self, parts: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CommError> {
        Err(CommError(format!(
            "an all-to-all among {} expert-parallel ranks ran on a rank outside any group",
            parts.len()
        )))
    }
}

/// Evaluates one of the ops of this module.
pub fn eval<T: Real>(node: &Node, v: &[&Value<T>], exchange: &dyn Exchange) -> Result<Value<T>, CommError> {
    let ix = |i: usize| &v[i].as_int().data;
    let int = |data: Vec<i32>| Value::int(Tensor::new(node.shape.clone(), data));
    let real = |data: Vec<T>| Value::real(Tensor::new(node.shape.clone(), data));
    Ok(match node.op {
        Op::ExchangeCounts { ranks } => int(exchange_counts(ix(0), ranks, exchange)?),
        Op::ReceivedOffsets => int(received_offsets(ix(0), node.shape[0] - 1)),
        Op::Dispatch { ranks } => {
            let rows = Rows::new(v[0].as_real(), ix(1), ix(2), ranks);
            real(rows.dispatch(&v[0].as_real().data, exchange)?)
        }
        Op::Combine { ranks } => {
            let rows = Rows::new(v[0].as_real(), ix(1), ix(2), ranks);
            real(rows.combine(&v[0].as_real().data, exchange)?)
        }
        ref op => unreachable!("{} is not an exchange op", op.name()),
    })
}

/// Per member, how many of this rank's rows (sorted by expert at `offsets`) go to each of its
/// experts; exchanged, how many rows each member sends this one per local expert: [members,
/// h].
fn exchange_counts(offsets: &[i32], members: usize, exchange: &dyn Exchange) -> Result<Vec<i32>, CommError> {
    let held = (offsets.len() - 1) / members;
    let parts = (0..members)
        .map(|j| (j * held..(j + 1) * held).map(|e| (offsets[e + 1] - offsets[e]) as f32).collect())
        .collect();
    Ok(exchange.all_to_all(parts)?.concat().into_iter().map(|count| count as i32).collect())
}

/// The offsets of the local experts' rows after a dispatch: [h + 1].
fn received_offsets(counts: &[i32], held: usize) -> Vec<i32> {
    let mut offsets = vec![0; held + 1];
    for e in 0..held {
        offsets[e + 1] = offsets[e] + counts.iter().skip(e).step_by(held).sum::<i32>();
    }
    offsets
}

/// The two layouts of an MoE layer's rows that dispatch and combine map between: this rank's
/// own rows [r, d] sorted by (global) expert, and the rows its experts receive [members · r,
/// d] sorted by local expert, then by sender.
struct Rows<'a> {
    width: usize,
    /// The own rows' expert offsets [E + 1].
    offsets: &'a [i32],
    /// Rows each member sends this one per local expert [members, h].
    counts: &'a [i32],
    members: usize,
    held: usize,
    /// Where the received rows of each local expert start.
    received: Vec<i32>,
}

impl<'a> Rows<'a> {
    fn new<T>(x: &Tensor<T>, offsets: &'a [i32], counts: &'a [i32], members: usize) -> Self {
        let held = counts.len() / members;
        let width = *x.shape.last().expect("rows of rank 2");
        Rows { width, offsets, counts, members, held, received: received_offsets(counts, held) }
    }

    /// The element range of the own rows that go to member j: from its first expert's offset
    /// to its last's end.
    fn own_range(&self, j: usize) -> std::ops::Range<usize> {
        self.offsets[j * self.held] as usize * self.width..self.offsets[(j + 1) * self.held] as usize * self.width
    }

    /// For each local expert, the element range of member p's rows in the received layout.
    fn received_ranges(&self, p: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..self.held).map(move |e| {
            let before: i32 = (0..p).map(|q| self.counts[q * self.held + e]).sum();
            let start = (self.received[e] + before) as usize * self.width;
            start..start + self.counts[p * self.held + e] as usize * self.width
        })
    }

    /// Own rows [r, d] → the received rows of this rank's experts [members · r, d].
    fn dispatch<T: Real>(&self, own: &[T], exchange: &dyn Exchange) -> Result<Vec<T>, CommError> {
        let parts = (0..self.members).map(|j| own[self.own_range(j)].iter().map(|x| x.to_f64() as f32).collect());
        let arrived = exchange.all_to_all(parts.collect())?;
        let mut out = vec![T::ZERO; self.members * own.len()];
        for (p, rows) in arrived.iter().enumerate() {
            let mut next = rows.iter();
            for range in self.received_ranges(p) {
                out[range].iter_mut().zip(next.by_ref()).for_each(|(o, &x)| *o = T::from_f64(f64::from(x)));
            }
        }
        Ok(out)
    }

    /// The received layout [members · r, d] → own rows [r, d]: each row back to its sender.
    fn combine<T: Real>(&self, received: &[T], exchange: &dyn Exchange) -> Result<Vec<T>, CommError> {
        let parts = (0..self.members).map(|p| {
            self.received_ranges(p).flat_map(|range| received[range].iter().map(|x| x.to_f64() as f32)).collect()
        });
        let returned = exchange.all_to_all(parts.collect())?;
        let mut out = vec![T::ZERO; received.len() / self.members];
        for (j, rows) in returned.iter().enumerate() {
            out[self.own_range(j)].iter_mut().zip(rows).for_each(|(o, &x)| *o = T::from_f64(f64::from(x)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{Comm, ExpertGroup, ThreadComm};
    use dsc_compiler::graph::ir::DType;
    use std::sync::Arc;
    use std::time::Duration;

    fn node(op: Op, shape: Vec<usize>) -> Node {
        Node { op, args: Vec::new(), shape, dtype: DType::F32 }
    }

    #[test]
    fn dispatch_sends_rows_to_their_experts_and_combine_brings_them_back() {
        // Two members, four experts (member 0 holds 0 and 1, member 1 holds 2 and 3), rows of
        // width 1 whose value names them: 10 · rank + row. Rank 0's three rows go to experts
        // 0, 2, 3; rank 1's three to experts 1, 1, 2.
        let offsets = [vec![0, 1, 1, 2, 3], vec![0, 0, 2, 3, 3]];
        let comm: Arc<dyn Comm> = Arc::new(ThreadComm::new(Duration::from_secs(5)));
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let (comm, offsets) = (Arc::clone(&comm), &offsets);
                    scope.spawn(move || {
                        let exchange = ExpertGroup::new(comm, vec![0, 1], rank, "layer");
                        let offsets = Value::<f32>::int(Tensor::new(vec![5], offsets[rank].clone()));
                        let counts = eval(&node(Op::ExchangeCounts { ranks: 2 }, vec![2, 2]), &[&offsets], &exchange)
                            .expect("exchanged");
                        let received = eval(&node(Op::ReceivedOffsets, vec![3]), &[&counts], &exchange).expect("local");
                        let own: Vec<f32> = (0..3).map(|row| (10 * rank + row) as f32).collect();
                        let own = Value::real(Tensor::new(vec![3, 1], own));
                        let dispatch = node(Op::Dispatch { ranks: 2 }, vec![6, 1]);
                        let arrived = eval(&dispatch, &[&own, &offsets, &counts], &exchange).expect("dispatched");
                        let combine = node(Op::Combine { ranks: 2 }, vec![3, 1]);
                        let back = eval(&combine, &[&arrived, &offsets, &counts], &exchange).expect("combined");
                        (counts.as_int().data.clone(), received.as_int().data.clone(), arrived, back, own)
                    })
                })
                .collect();
            handles.into_iter().map(|handle| handle.join().expect("the rank ran")).collect()
        });
        // Member 0's experts: 0 gets rank 0's row 0; 1 gets rank 1's rows 0 and 1.
        assert_eq!(results[0].0, [1, 0, 0, 2]);
        assert_eq!(results[0].1, [0, 1, 3]);
        assert_eq!(results[0].2.as_real().data, [0.0, 10.0, 11.0, 0.0, 0.0, 0.0]);
        // Member 1's: 2 gets rank 0's row 1 then rank 1's row 2; 3 gets rank 0's row 2.
        assert_eq!(results[1].0, [1, 1, 1, 0]);
        assert_eq!(results[1].2.as_real().data, [1.0, 12.0, 2.0, 0.0, 0.0, 0.0]);
        for (_, _, _, back, own) in &results {
            assert_eq!(back.as_real().data, own.as_real().data);
        }
    }

    #[test]
    fn an_exchange_outside_a_group_is_an_error() {
        let offsets = Value::<f32>::int(Tensor::new(vec![3], vec![0, 1, 2]));
        let error = eval(&node(Op::ExchangeCounts { ranks: 2 }, vec![2, 1]), &[&offsets], &Alone).unwrap_err();
        assert!(error.0.contains("outside any group"), "{error}");
    }
}
