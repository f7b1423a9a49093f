//! Kernels by index: every kernel the fast paths of [`super::emit`] do not cover. Each thread
//! computes one element of each output from its multi-index, following the index maps of the
//! kernel's ops back to its inputs: broadcasts, reshapes, transposes, slices, pads and
//! concatenations move indices; reductions loop over the reduced axes; top-k and the take/put
//! along ops read positions from index tensors, and the MoE combine and the dispatch's
//! transpose gather each token's k rows through the inverse permutation. Values inside a
//! kernel are recomputed where they are read, never stored in between. The scatter-adds
//! (adding where an index tensor says) run over their source elements instead and add
//! atomically into outputs the launcher zeroes first ([`Emitted::zeroed`]); the inverse of a
//! permutation also runs over its source, storing each element once. The sort by expert and the routing have
//! kernels of their own; the counts over many positions and the gates' gradient of the
//! combine take a warp per output element, its lanes striding over the summed extent.

use super::emit::{Body, Emitted, BLOCK, TARGET};
use crate::fuse::kernels::{scatters, Kernel};
use crate::graph::ir::{DType, Function, Node, Op, V};
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// Sweeps of 32 assignments the sort by expert loads at once.
const SORT_SWEEPS: usize = 8;
/// Terms a lane of a warp-per-element sum loads at once.
const SUM_TERMS: usize = 4;

/// The MLIR of `kernel` by index. Its `packed` values (bf16 buffers:
/// [`crate::fuse::kernels::packed_bf16`]; only kernels that compute each element at its own
/// index take them: [`crate::fuse::kernels::by_element`]) are widened to f32 as they are loaded and
/// rounded as they are stored.
pub fn indexed_kernel(f: &Function, kernel: &Kernel, packed: &HashSet<u32>) -> Result<Emitted, String> {
    let nodes: Vec<&Node> = kernel.nodes.iter().map(|&i| &f.nodes[i as usize]).collect();
    let mut g = Gen::new(f, kernel, packed);
    let zeroed = match nodes.as_slice() {
        [one] if matches!(one.op, Op::SortByExpert { .. }) => g.sort_by_expert(one)?,
        [one] if matches!(one.op, Op::UnpermuteGradGates { .. }) => g.gate_grads_by_warps(one)?,
        [one] if scatters(&one.op) => g.scatter(one)?,
        [one] if matches!(one.op, Op::Route { .. }) => {
            let parts = super::rows::parts(f, kernel.nodes[0], 2);
            let [Some(chosen), Some(gates)] = parts[..] else {
                return Err("a route whose chosen experts or gates nobody reads is not generated".into());
            };
            g.args.truncate(kernel.inputs.len());
            g.args.extend([chosen, gates]);
            g.route(one)?
        }
        [one] if g.counted_extent(one) >= SPLIT_EXTENT => g.count_by_warps(one)?,
        _ if g.split_reduction(kernel).is_some() => g.reduce_by_warps(kernel)?,
        _ => g.gather(kernel)?,
    };
    Ok(g.finish(kernel, zeroed))
}

/// Sums over at least this many elements per output are split across warps.
const SPLIT_EXTENT: usize = 256;
/// Elements of a sum one warp adds up (128 per lane).
const ELEMENTS_PER_WARP: usize = 4096;

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn element_type(dtype: DType) -> &'static str {
    if dtype == DType::I32 {
        "i32"
    } else {
        "f32"
    }
}

/// The kernel being written: its arguments (inputs, then outputs), the SSA text, and the
/// values already computed in each enclosing region (innermost last).
struct Gen<'a> {
    f: &'a Function,
    packed: &'a HashSet<u32>,
    slots: HashMap<u32, usize>,
    args: Vec<u32>,
    body: Body,
    scopes: Vec<HashMap<(u32, Vec<String>), String>>,
    domain: usize,
}

impl<'a> Gen<'a> {
    fn new(f: &'a Function, kernel: &Kernel, packed: &'a HashSet<u32>) -> Self {
        let mut args = kernel.inputs.clone();
        args.extend(&kernel.outputs);
        let slots = kernel.inputs.iter().enumerate().map(|(s, &v)| (v, s)).collect();
        Gen { f, packed, slots, args, body: Body::new(), scopes: vec![HashMap::new()], domain: 0 }
    }

    /// The element type of value `v`'s buffer.
    fn buffer_type(&self, v: u32) -> &'static str {
        if self.packed.contains(&v) {
            "bf16"
        } else {
            element_type(self.f.nodes[v as usize].dtype)
        }
    }

    fn line(&mut self, rhs: String) -> String {
        self.body.line(rhs)
    }

    fn index(&mut self, n: usize) -> String {
        self.line(format!("arith.constant {n} : index"))
    }

    fn node(&self, v: V) -> &'a Node {
        self.f.node(v)
    }

    /// Row-major flat position of `idx` in `shape`.
    fn linearize(&mut self, idx: &[String], shape: &[usize]) -> String {
        let mut flat = self.index(0);
        let mut stride = 1;
        for (i, &d) in idx.iter().zip(shape).rev() {
            let s = self.index(stride);
            let term = self.line(format!("arith.muli {i}, {s} : index"));
            flat = self.line(format!("arith.addi {flat}, {term} : index"));
            stride *= d;
        }
        flat
    }

    /// The multi-index of flat position `flat` in `shape`.
    fn delinearize(&mut self, flat: &str, shape: &[usize]) -> Vec<String> {
        let mut stride = numel(shape);
        shape
            .iter()
            .map(|&d| {
                stride /= d.max(1);
                let s = self.index(stride);
                let n = self.index(d);
                let q = self.line(format!("arith.divui {flat}, {s} : index"));
                self.line(format!("arith.remui {q}, {n} : index"))
            })
            .collect()
    }

    fn position(&mut self, i32_value: &str) -> String {
        self.line(format!("arith.index_cast {i32_value} : i32 to index"))
    }

    /// The index of `idx` in an argument of `shape` broadcast to `idx`'s rank.
    fn broadcast_index(&mut self, idx: &[String], shape: &[usize]) -> Vec<String> {
        let offset = idx.len() - shape.len();
        let zero = self.index(0);
        shape.iter().enumerate().map(|(k, &d)| if d == 1 { zero.clone() } else { idx[k + offset].clone() }).collect()
    }

    /// Runs `inner` in a new region whose computed values are forgotten afterwards.
    fn scoped<T>(&mut self, inner: impl FnOnce(&mut Self) -> T) -> T {
        self.scopes.push(HashMap::new());
        let r = inner(self);
        self.scopes.pop();
        r
    }

    /// `scf.for %iv = 0 to count` carrying values of `types` from `init`; `step` gets the loop
    /// variable and the carried values and returns the next ones.
    fn fold(
        &mut self,
        count: usize,
        init: &[String],
        types: &[&str],
        step: impl FnOnce(&mut Self, &str, &[String]) -> Result<Vec<String>, String>,
    ) -> Result<Vec<String>, String> {
        let (c0, n) = (self.index(0), self.index(count));
        self.fold_range(&c0, &n, 1, init, types, step)
    }

    /// [`Self::fold`] over `lo..hi` by `stride`.
    fn fold_range(
        &mut self,
        c0: &str,
        n: &str,
        stride: usize,
        init: &[String],
        types: &[&str],
        step: impl FnOnce(&mut Self, &str, &[String]) -> Result<Vec<String>, String>,
    ) -> Result<Vec<String>, String> {
        let c1 = self.index(stride);
        let result = self.body.fresh();
        let iv = self.body.fresh();
        let carried: Vec<String> = init.iter().map(|_| self.body.fresh()).collect();
        let bindings: Vec<String> = carried.iter().zip(init).map(|(c, i)| format!("{c} = {i}")).collect();
        let head = if init.is_empty() { String::new() } else { format!("{result}:{} = ", init.len()) };
        let _ = writeln!(
            self.body.text,
            "        {head}scf.for {iv} = {c0} to {n} step {c1} iter_args({}) -> ({}) {{",
            bindings.join(", "),
            types.join(", ")
        );
        let next = self.scoped(|g| step(g, &iv, &carried))?;
        let yielded =
            if next.is_empty() { String::new() } else { format!(" {} : {}", next.join(", "), types.join(", ")) };
        let _ = writeln!(self.body.text, "        scf.yield{yielded}\n        }}");
        Ok((0..init.len()).map(|k| format!("{result}#{k}")).collect())
    }

    /// `cond ? then() : otherwise()`, each branch in its own region (so a branch's loads
    /// happen only when it is taken).
    fn select(
        &mut self,
        cond: &str,
        ty: &str,
        then: impl FnOnce(&mut Self) -> Result<String, String>,
        otherwise: impl FnOnce(&mut Self) -> Result<String, String>,
    ) -> Result<String, String> {
        let result = self.body.fresh();
        let _ = writeln!(self.body.text, "        {result} = scf.if {cond} -> ({ty}) {{");
        let a = self.scoped(then)?;
        let _ = writeln!(self.body.text, "        scf.yield {a} : {ty}\n        }} else {{");
        let b = self.scoped(otherwise)?;
        let _ = writeln!(self.body.text, "        scf.yield {b} : {ty}\n        }}");
        Ok(result)
    }

    fn cmp_index(&mut self, pred: &str, a: &str, b: &str) -> String {
        self.line(format!("arith.cmpi {pred}, {a}, {b} : index"))
    }

    /// The element of value `v` at multi-index `idx`.
    fn value_at(&mut self, v: V, idx: &[String]) -> Result<String, String> {
        let key = (v.0, idx.to_vec());
        if let Some(s) = self.scopes.iter().rev().find_map(|m| m.get(&key)) {
            return Ok(s.clone());
        }
        let s = self.compute(v, idx)?;
        self.scopes.last_mut().expect("a scope").insert(key, s.clone());
        Ok(s)
    }

    fn compute(&mut self, v: V, idx: &[String]) -> Result<String, String> {
        let node = self.node(v);
        if let Some(&slot) = self.slots.get(&v.0) {
            let flat = self.linearize(idx, &node.shape);
            let ty = self.buffer_type(v.0);
            let x = self.line(format!("memref.load %a{slot}[{flat}] : memref<?x{ty}>"));
            return Ok(match ty {
                "bf16" => self.line(format!("arith.extf {x} : bf16 to f32")),
                _ => x,
            });
        }
        let arg = |k: usize| node.args[k];
        let shape_of = |g: &Self, k: usize| g.node(node.args[k]).shape.clone();
        Ok(match &node.op {
            Op::Const(c) => self.body.constant(*c),
            Op::Reshape(_) => {
                let flat = self.linearize(idx, &node.shape);
                let at = self.delinearize(&flat, &shape_of(self, 0));
                self.value_at(arg(0), &at)?
            }
            Op::StopGradient | Op::Cast(DType::F32) => self.value_at(arg(0), idx)?,
            Op::BroadcastTo(_) => {
                let at = self.broadcast_index(idx, &shape_of(self, 0));
                self.value_at(arg(0), &at)?
            }
            Op::Transpose(perm) => {
                let mut at = vec![String::new(); idx.len()];
                for (k, &p) in perm.iter().enumerate() {
                    at[p] = idx[k].clone();
                }
                self.value_at(arg(0), &at)?
            }
            Op::Slice { axis, start, .. } => {
                let mut at = idx.to_vec();
                let s = self.index(*start);
                at[*axis] = self.line(format!("arith.addi {}, {s} : index", idx[*axis]));
                self.value_at(arg(0), &at)?
            }
            Op::PadSlice { axis, start, .. } => {
                let n = shape_of(self, 0)[*axis];
                let (lo, hi) = (self.index(*start), self.index(start + n));
                let above = self.cmp_index("uge", &idx[*axis], &lo);
                let below = self.cmp_index("ult", &idx[*axis], &hi);
                let inside = self.line(format!("arith.andi {above}, {below} : i1"));
                let axis = *axis;
                self.select(
                    &inside,
                    "f32",
                    |g| {
                        let mut at = idx.to_vec();
                        at[axis] = g.line(format!("arith.subi {}, {lo} : index", idx[axis]));
                        g.value_at(arg(0), &at)
                    },
                    |g| Ok(g.body.constant(0.0)),
                )?
            }
            Op::Concat { axis } => self.concat(node, *axis, idx, 0, 0)?,
            Op::Sum { .. } | Op::Max { .. } | Op::SumTo(_) => {
                let is_max = matches!(node.op, Op::Max { .. });
                let init =
                    if is_max { self.line("arith.constant 0xFF800000 : f32".into()) } else { self.body.constant(0.0) };
                let combine = if is_max { "arith.maximumf" } else { "arith.addf" };
                self.fold(self.reduced_extent(node), &[init], &["f32"], |g, j, acc| {
                    let x = g.reduced_term(node, idx, j)?;
                    Ok(vec![g.line(format!("{combine} {}, {x} : f32", acc[0]))])
                })?
                .remove(0)
            }
            Op::TakeAlong => {
                let rank = idx.len();
                let i = self.value_at(arg(1), idx)?;
                let mut at = idx[..rank - 1].to_vec();
                at.push(self.position(&i));
                self.value_at(arg(0), &at)?
            }
            // put_along: out[p, j] = Σ_m [idx[p, m] = j] · g[p, m]; count: the same with g = 1.
            Op::PutAlong { .. } => self.sum_where_index_is(arg(0), Some(arg(1)), idx)?,
            Op::Count { .. } => self.sum_where_index_is(arg(0), None, idx)?,
            Op::TopK { .. } => self.top_k(arg(0), &shape_of(self, 0), idx)?,
            Op::ExpertOffsets { .. } => {
                // out[e] = #{a : idx[a] < e}
                let shape = shape_of(self, 0);
                let zero = self.line("arith.constant 0 : i32".into());
                self.fold(numel(&shape), &[zero], &["i32"], |g, a, acc| {
                    let at = g.delinearize(a, &shape);
                    let e = g.value_at(arg(0), &at)?;
                    let e = g.position(&e);
                    let below = g.cmp_index("ult", &e, &idx[0]);
                    let one = g.line("arith.constant 1 : i32".into());
                    let more = g.line(format!("arith.addi {}, {one} : i32", acc[0]));
                    Ok(vec![g.line(format!("arith.select {below}, {more}, {} : i32", acc[0]))])
                })?
                .remove(0)
            }
            Op::RopeConcat => self.rope_concat(node, idx)?,
            // Rows gathered back to their tokens: Σⱼ [gates[t, j] ·] x[positions[t·k + j], c],
            // j in order (unrolled: the k loads in flight together).
            Op::Unpermute { k } | Op::PermuteGrad { k, .. } => {
                let (t, c) = (idx[0].clone(), idx[1].clone());
                let kk = self.index(*k);
                let first = self.line(format!("arith.muli {t}, {kk} : index"));
                let mut sum = self.body.constant(0.0);
                for j in 0..*k {
                    let jj = self.index(j);
                    let a = self.line(format!("arith.addi {first}, {jj} : index"));
                    let i = self.value_at(arg(1), std::slice::from_ref(&a))?;
                    let row = self.position(&i);
                    let mut x = self.value_at(arg(0), &[row, c.clone()])?;
                    if let Op::Unpermute { .. } = node.op {
                        let gate = self.value_at(arg(2), &[t.clone(), jj])?;
                        x = self.line(format!("arith.mulf {gate}, {x} : f32"));
                    }
                    sum = self.line(format!("arith.addf {sum}, {x} : f32"));
                }
                sum
            }
            op if op.is_elementwise() => {
                let mut a = Vec::with_capacity(node.args.len());
                for k in 0..node.args.len() {
                    let at = self.broadcast_index(idx, &shape_of(self, k));
                    a.push(self.value_at(arg(k), &at)?);
                }
                self.body.op(op, &a)?
            }
            op => return Err(format!("`{}` is not generated yet", op.name())),
        })
    }

    /// Σ_m [positions[p, m] = j] · values[p, m] (values 1 when absent) at `idx` = (p, j).
    fn sum_where_index_is(&mut self, positions: V, values: Option<V>, idx: &[String]) -> Result<String, String> {
        let rank = idx.len();
        let m = *self.node(positions).shape.last().unwrap_or(&1);
        let zero = self.body.constant(0.0);
        self.fold(m, &[zero], &["f32"], |g, q, acc| {
            let mut at = idx[..rank - 1].to_vec();
            at.push(q.to_string());
            let i = g.value_at(positions, &at)?;
            let i = g.position(&i);
            let hit = g.cmp_index("eq", &i, &idx[rank - 1]);
            let x = match values {
                Some(v) => g.value_at(v, &at)?,
                None => g.body.constant(1.0),
            };
            let sum = g.line(format!("arith.addf {}, {x} : f32", acc[0]));
            Ok(vec![g.line(format!("arith.select {hit}, {sum}, {} : f32", acc[0]))])
        })
        .map(|mut r| r.remove(0))
    }

    /// concat(nope, rope(pe)) along the last axis, rope(pe) broadcast over nope's leading
    /// axes: at position q of pe's r, x(q) = pe[2q] below r/2 and pe[2(q − r/2) + 1] above
    /// (the pairs de-interleaved), and rope = x(q)·cos + rot(q)·sin with rot(q) = −x(q + r/2)
    /// below r/2 and x(q − r/2) above.
    fn rope_concat(&mut self, node: &Node, idx: &[String]) -> Result<String, String> {
        let rank = idx.len();
        let shapes: Vec<Vec<usize>> = node.args.iter().map(|&a| self.node(a).shape.clone()).collect();
        let n = shapes[0][rank - 1];
        let half = shapes[1][rank - 1] / 2;
        let end = self.index(n);
        let here = self.cmp_index("ult", &idx[rank - 1], &end);
        self.select(
            &here,
            "f32",
            |g| g.value_at(node.args[0], idx),
            |g| {
                let q = g.line(format!("arith.subi {}, {end} : index", idx[rank - 1]));
                let lead = g.broadcast_index(&idx[..rank - 1], &shapes[1][..rank - 1]);
                let h = g.index(half);
                let low = g.cmp_index("ult", &q, &h);
                // x at position p: pe[2p] below half, pe[2(p − half) + 1] above.
                let x_at = |g: &mut Self, p: &str| {
                    let c2 = g.index(2);
                    let c1 = g.index(1);
                    let even = g.line(format!("arith.muli {p}, {c2} : index"));
                    let above = g.line(format!("arith.subi {p}, {h} : index"));
                    let above = g.line(format!("arith.muli {above}, {c2} : index"));
                    let odd = g.line(format!("arith.addi {above}, {c1} : index"));
                    let below = g.cmp_index("ult", p, &h);
                    let j = g.line(format!("arith.select {below}, {even}, {odd} : index"));
                    let mut at = lead.clone();
                    at.push(j);
                    g.value_at(node.args[1], &at)
                };
                let x = x_at(g, &q)?;
                let up = g.line(format!("arith.addi {q}, {h} : index"));
                let down = g.line(format!("arith.subi {q}, {h} : index"));
                let partner = g.line(format!("arith.select {low}, {up}, {down} : index"));
                let y = x_at(g, &partner)?;
                let negated = g.line(format!("arith.negf {y} : f32"));
                let rotated = g.line(format!("arith.select {low}, {negated}, {y} : f32"));
                let mut at = lead.clone();
                at.push(q.clone());
                let cos_at = g.broadcast_index(&at, &shapes[2]);
                let sin_at = g.broadcast_index(&at, &shapes[3]);
                let cos = g.value_at(node.args[2], &cos_at)?;
                let sin = g.value_at(node.args[3], &sin_at)?;
                let a = g.line(format!("arith.mulf {x}, {cos} : f32"));
                let b = g.line(format!("arith.mulf {rotated}, {sin} : f32"));
                Ok(g.line(format!("arith.addf {a}, {b} : f32")))
            },
        )
    }

    /// Concatenation: the part whose range along `axis` holds the index.
    fn concat(
        &mut self,
        node: &Node,
        axis: usize,
        idx: &[String],
        part: usize,
        start: usize,
    ) -> Result<String, String> {
        let arg = node.args[part];
        let len = self.node(arg).shape[axis];
        let read = |g: &mut Self| {
            let mut at = idx.to_vec();
            let s = g.index(start);
            at[axis] = g.line(format!("arith.subi {}, {s} : index", idx[axis]));
            g.value_at(arg, &at)
        };
        if part + 1 == node.args.len() {
            return read(self);
        }
        let end = self.index(start + len);
        let here = self.cmp_index("ult", &idx[axis], &end);
        self.select(&here, "f32", read, |g| g.concat(node, axis, idx, part + 1, start + len))
    }

    /// The axes a reduction (`sum`, `max`, `sum_to`) reduces, as positions of its input.
    fn reduced_axes(&self, node: &Node) -> Vec<usize> {
        let shape = &self.node(node.args[0]).shape;
        match &node.op {
            Op::Sum { axis, .. } | Op::Max { axis, .. } => vec![*axis],
            Op::SumTo(target) => {
                let offset = shape.len() - target.len();
                (0..shape.len()).filter(|&k| k < offset || (target[k - offset] == 1 && shape[k] != 1)).collect()
            }
            _ => unreachable!("reductions"),
        }
    }

    /// How many input elements each output element of a reduction combines.
    fn reduced_extent(&self, node: &Node) -> usize {
        let shape = &self.node(node.args[0]).shape;
        self.reduced_axes(node).iter().map(|&k| shape[k]).product()
    }

    /// The input element of reduction `node` at output index `idx` and reduced position `j`.
    fn reduced_term(&mut self, node: &Node, idx: &[String], j: &str) -> Result<String, String> {
        let at = self.reduced_index(node, idx, j);
        self.value_at(node.args[0], &at)
    }

    /// The index in the input of reduction `node` of output index `idx`'s reduced position `j`.
    fn reduced_index(&mut self, node: &Node, idx: &[String], j: &str) -> Vec<String> {
        let shape = self.node(node.args[0]).shape.clone();
        let reduced = self.reduced_axes(node);
        let extents: Vec<usize> = reduced.iter().map(|&k| shape[k]).collect();
        let positions = self.delinearize(j, &extents);
        let at: Vec<String> = match &node.op {
            Op::Sum { axis, keep } | Op::Max { axis, keep } => {
                let mut at = idx.to_vec();
                if *keep {
                    at[*axis] = positions[0].clone();
                } else {
                    at.insert(*axis, positions[0].clone());
                }
                at
            }
            _ => {
                let offset = shape.len() - idx.len();
                let zero = self.index(0);
                (0..shape.len())
                    .map(|k| match reduced.iter().position(|&r| r == k) {
                        Some(p) => positions[p].clone(),
                        None if shape[k] == 1 => zero.clone(),
                        None => idx[k - offset].clone(),
                    })
                    .collect()
            }
        };
        at
    }

    /// Top-k: the m-th index of a row in the order (value descending, index ascending) is
    /// found by m + 1 rounds, each picking the best element after the previous pick.
    fn top_k(&mut self, x: V, shape: &[usize], idx: &[String]) -> Result<String, String> {
        let rank = idx.len();
        let n = shape[rank - 1];
        let one = self.index(1);
        let rounds = self.line(format!("arith.addi {}, {one} : index", idx[rank - 1]));
        let c0 = self.index(0);
        let (top, none) = (self.line("arith.constant 0x7F800000 : f32".into()), self.index(usize::MAX >> 1));
        let picked = self.fold_range(&c0, &rounds, 1, &[top, none], &["f32", "index"], |g, _, prev| {
            let (v, i) = g.best_after(n, &prev[0], &prev[1], &|g, j| {
                let mut at = idx[..rank - 1].to_vec();
                at.push(j.to_string());
                g.value_at(x, &at)
            })?;
            Ok(vec![v, i])
        })?;
        Ok(self.line(format!("arith.index_cast {} : index to i32", picked[1])))
    }

    /// The best of elements 0..count (`value` of each) after (pv, pi) in the order (value
    /// descending, index ascending): its value and index.
    fn best_after(
        &mut self,
        count: usize,
        pv: &str,
        pi: &str,
        value: &dyn Fn(&mut Self, &str) -> Result<String, String>,
    ) -> Result<(String, String), String> {
        let lowest = self.line("arith.constant 0xFF800000 : f32".into());
        let far = self.index(usize::MAX >> 1);
        let best = self.fold(count, &[lowest, far], &["f32", "index"], |g, j, acc| {
            let xj = value(g, j)?;
            // after the previous pick: x < pv, or x = pv and j > pi
            let lt = g.line(format!("arith.cmpf olt, {xj}, {pv} : f32"));
            let eq = g.line(format!("arith.cmpf oeq, {xj}, {pv} : f32"));
            let later = g.cmp_index("ugt", j, pi);
            let tie_after = g.line(format!("arith.andi {eq}, {later} : i1"));
            let after = g.line(format!("arith.ori {lt}, {tie_after} : i1"));
            // better than the best so far: x > bv, or x = bv and j < bi
            let gt = g.line(format!("arith.cmpf ogt, {xj}, {} : f32", acc[0]));
            let beq = g.line(format!("arith.cmpf oeq, {xj}, {} : f32", acc[0]));
            let earlier = g.cmp_index("ult", j, &acc[1]);
            let tie_better = g.line(format!("arith.andi {beq}, {earlier} : i1"));
            let better = g.line(format!("arith.ori {gt}, {tie_better} : i1"));
            let take = g.line(format!("arith.andi {after}, {better} : i1"));
            let v = g.line(format!("arith.select {take}, {xj}, {} : f32", acc[0]));
            let i = g.line(format!("arith.select {take}, {j}, {} : index", acc[1]));
            Ok(vec![v, i])
        })?;
        Ok((best[0].clone(), best[1].clone()))
    }

    /// DeepSeek-V3's routing, a thread per token t: on the biased scores s + bias, each
    /// group's score is the sum of its two best; `keep` rounds pick the best groups (a bit
    /// mask); `k` rounds pick the best experts among the kept groups' (the others' sunk by
    /// 10³⁰, as the reference does) into `chosen`, summing their unbiased scores; the gates are
    /// those scores over the sum, times `scale`.
    fn route(&mut self, node: &Node) -> Result<bool, String> {
        let Op::Route { groups, keep, k, scale } = node.op else { unreachable!("a route node") };
        let (scores, bias) = (node.args[0], node.args[1]);
        let [tokens, experts] = self.node(scores).shape[..] else {
            return Err("routing of [tokens, experts] scores".into());
        };
        let per_group = experts / groups;
        let (chosen_slot, gates_slot) = (self.slots.len(), self.slots.len() + 1);
        self.domain = tokens;
        let size = self.index(tokens);
        let inside = self.cmp_index("ult", "%gid", &size);
        let _ = writeln!(self.body.text, "        scf.if {inside} {{");
        let t = "%gid".to_string();
        let biased = |g: &mut Self, e: &str| -> Result<String, String> {
            let s = g.value_at(scores, &[t.clone(), e.to_string()])?;
            let b = g.value_at(bias, &[e.to_string()])?;
            Ok(g.line(format!("arith.addf {s}, {b} : f32")))
        };
        let start = |g: &mut Self| (g.line("arith.constant 0x7F800000 : f32".into()), g.index(usize::MAX >> 1));
        // A group's score: its best biased score plus its second best.
        let group_score = |g: &mut Self, group: &str| -> Result<String, String> {
            let pg = g.index(per_group);
            let first = g.line(format!("arith.muli {group}, {pg} : index"));
            let member = |g: &mut Self, j: &str| {
                let e = g.line(format!("arith.addi {first}, {j} : index"));
                biased(g, &e)
            };
            let (top, none) = start(g);
            let (v1, i1) = g.best_after(per_group, &top, &none, &member)?;
            let (v2, _) = g.best_after(per_group, &v1, &i1, &member)?;
            let zero = g.body.constant(0.0);
            let s = g.line(format!("arith.addf {zero}, {v1} : f32"));
            Ok(g.line(format!("arith.addf {s}, {v2} : f32")))
        };
        let (top, none) = start(self);
        let empty = self.line("arith.constant 0 : i64".into());
        let kept = self.fold(keep, &[top, none, empty], &["f32", "index", "i64"], |g, _, prev| {
            let (v, i) = g.best_after(groups, &prev[0], &prev[1], &group_score)?;
            let bit = g.line(format!("arith.index_cast {i} : index to i64"));
            let one = g.line("arith.constant 1 : i64".into());
            let mask = g.line(format!("arith.shli {one}, {bit} : i64"));
            Ok(vec![v, i, g.line(format!("arith.ori {}, {mask} : i64", prev[2]))])
        })?[2]
            .clone();
        let candidate = |g: &mut Self, e: &str| -> Result<String, String> {
            let b = biased(g, e)?;
            let pg = g.index(per_group);
            let group = g.line(format!("arith.divui {e}, {pg} : index"));
            let bit = g.line(format!("arith.index_cast {group} : index to i64"));
            let shifted = g.line(format!("arith.shrui {kept}, {bit} : i64"));
            let flag = g.line(format!("arith.trunci {shifted} : i64 to i1"));
            let one = g.body.constant(1.0);
            let zero = g.body.constant(0.0);
            let is_kept = g.line(format!("arith.select {flag}, {one}, {zero} : f32"));
            let out = g.line(format!("arith.subf {one}, {is_kept} : f32"));
            let sink = g.body.constant(1e30);
            let sunk = g.line(format!("arith.mulf {out}, {sink} : f32"));
            Ok(g.line(format!("arith.subf {b}, {sunk} : f32")))
        };
        let kk = self.index(k);
        let row = self.line(format!("arith.muli %gid, {kk} : index"));
        let (top, none) = start(self);
        let zero = self.body.constant(0.0);
        let total = self.fold(k, &[top, none, zero], &["f32", "index", "f32"], |g, m, prev| {
            let (v, e) = g.best_after(experts, &prev[0], &prev[1], &candidate)?;
            let at = g.line(format!("arith.addi {row}, {m} : index"));
            let id = g.line(format!("arith.index_cast {e} : index to i32"));
            let _ = writeln!(g.body.text, "        memref.store {id}, %a{chosen_slot}[{at}] : memref<?xi32>");
            let s = g.value_at(scores, &[t.clone(), e.clone()])?;
            Ok(vec![v, e, g.line(format!("arith.addf {}, {s} : f32", prev[2]))])
        })?[2]
            .clone();
        self.fold(k, &[], &[], |g, m, _| {
            let at = g.line(format!("arith.addi {row}, {m} : index"));
            let id = g.line(format!("memref.load %a{chosen_slot}[{at}] : memref<?xi32>"));
            let e = g.position(&id);
            let s = g.value_at(scores, &[t.clone(), e])?;
            let share = g.line(format!("arith.divf {s}, {total} : f32"));
            let factor = g.body.constant(scale);
            let gate = g.line(format!("arith.mulf {share}, {factor} : f32"));
            let _ = writeln!(g.body.text, "        memref.store {gate}, %a{gates_slot}[{at}] : memref<?xf32>");
            Ok(vec![])
        })?;
        let _ = writeln!(self.body.text, "        }}");
        Ok(false)
    }

    /// When the kernel's outputs are reductions of one size over one large extent, all sums or
    /// all maxima, and possibly values of the reductions' input shape (computed on the way):
    /// (output elements, warps per element). A thread per output would loop over the whole
    /// extent alone. Maxima take one warp per element (there is no atomic float max).
    fn split_reduction(&self, kernel: &Kernel) -> Option<(usize, usize)> {
        let outputs: Vec<&Node> = kernel.outputs.iter().map(|&o| &self.f.nodes[o as usize]).collect();
        let is_reduction = |n: &Node| matches!(n.op, Op::Sum { .. } | Op::SumTo(_) | Op::Max { .. });
        let (reductions, passengers): (Vec<&Node>, Vec<&Node>) = outputs.iter().partition(|n| is_reduction(n));
        let first = reductions.first()?;
        let extent = self.reduced_extent(first);
        let size = numel(&first.shape);
        let maxima = matches!(first.op, Op::Max { .. });
        let input = &self.node(first.args[0]).shape;
        let alike = reductions.iter().all(|n| {
            numel(&n.shape) == size && self.reduced_extent(n) == extent && matches!(n.op, Op::Max { .. }) == maxima
        });
        let on_the_way = passengers.iter().all(|n| &n.shape == input);
        let warps = if maxima { 1 } else { extent.div_ceil(ELEMENTS_PER_WARP) };
        (alike && on_the_way && extent >= SPLIT_EXTENT).then_some((size, warps))
    }

    /// Reductions by warps: warp w takes output element w / W and the W-th part of its
    /// extent, its lanes striding by 32 (coalesced where the reduced axis is the last); the
    /// lanes' partials meet through shuffles and lane 0 adds the warp's sum into the zeroed
    /// output (or stores it when one warp covers the whole extent). Outputs of the reduced
    /// input's shape are stored as the first reduction visits their elements.
    fn reduce_by_warps(&mut self, kernel: &Kernel) -> Result<bool, String> {
        let (size, warps) = self.split_reduction(kernel).expect("checked by the caller");
        let (warp, lane) = self.warp_per_item(size * warps);
        let w = self.index(warps);
        let element = self.line(format!("arith.divui {warp}, {w} : index"));
        let part = self.line(format!("arith.remui {warp}, {w} : index"));
        let zero_index = self.index(0);
        let is_reduction = |n: &Node| matches!(n.op, Op::Sum { .. } | Op::SumTo(_) | Op::Max { .. });
        // (argument slot, value) of each output: the reductions, and the values riding along.
        let slots = kernel.outputs.iter().enumerate().map(|(k, &o)| (kernel.inputs.len() + k, o));
        let (reductions, passengers): (Vec<_>, Vec<_>) =
            slots.partition(|&(_, o)| is_reduction(&self.f.nodes[o as usize]));
        let extent = self.reduced_extent(&self.f.nodes[reductions[0].1 as usize].clone());
        let chunk = self.index(ELEMENTS_PER_WARP.max(extent.div_ceil(warps)));
        let start = self.line(format!("arith.muli {part}, {chunk} : index"));
        let lo = self.line(format!("arith.addi {start}, {lane} : index"));
        let end = self.line(format!("arith.addi {start}, {chunk} : index"));
        let total = self.index(extent);
        let hi = self.line(format!("arith.minui {end}, {total} : index"));
        let is_lane0 = self.cmp_index("eq", &lane, &zero_index);
        for (r, &(slot, o)) in reductions.iter().enumerate() {
            let node = self.f.nodes[o as usize].clone();
            let maximum = matches!(node.op, Op::Max { .. });
            let combine = if maximum { "arith.maximumf" } else { "arith.addf" };
            let idx = self.delinearize(&element, &node.shape);
            let init = self.line(format!("arith.constant {} : f32", if maximum { "0xFF800000" } else { "0.0" }));
            let riders = if r == 0 { passengers.clone() } else { Vec::new() };
            let partial = self
                .fold_range(&lo, &hi, 32, &[init], &["f32"], |g, j, acc| {
                    let at = g.reduced_index(&node, &idx, j);
                    let x = g.value_at(node.args[0], &at)?;
                    for &(slot, p) in &riders {
                        let y = g.value_at(V(p), &at)?;
                        let shape = g.f.nodes[p as usize].shape.clone();
                        let flat = g.linearize(&at, &shape);
                        let _ = writeln!(g.body.text, "        memref.store {y}, %a{slot}[{flat}] : memref<?xf32>");
                    }
                    Ok(vec![g.line(format!("{combine} {}, {x} : f32", acc[0]))])
                })?
                .remove(0);
            let name = self.body.fresh();
            let reduced = super::emit::warp_reduce(
                &mut self.body.text,
                &name[1..],
                &partial,
                &format!("{combine} %acc, %y : f32"),
            );
            let store = if warps > 1 {
                format!(
                    "%{}_old = memref.atomic_rmw addf {reduced}, %a{slot}[{element}] : (f32, memref<?xf32>) -> f32",
                    &name[1..]
                )
            } else {
                format!("memref.store {reduced}, %a{slot}[{element}] : memref<?xf32>")
            };
            let _ = writeln!(
                self.body.text,
                "        scf.if {is_lane0} {{
        {store}
        }}"
            );
        }
        let _ = writeln!(self.body.text, "        }}");
        Ok(warps > 1)
    }

    /// A warp per item of `items`: the domain set to their threads, this thread's warp (its
    /// item) and lane, `%w32` (the shuffles' width) defined, and an `scf.if` on the warp being
    /// an item opened (the caller closes it).
    fn warp_per_item(&mut self, items: usize) -> (String, String) {
        self.domain = items * 32;
        let c32 = self.index(32);
        let warp = self.line(format!("arith.divui %gid, {c32} : index"));
        let lane = self.line(format!("arith.remui %gid, {c32} : index"));
        let _ = writeln!(self.body.text, "      %w32 = arith.constant 32 : i32");
        let limit = self.index(items);
        let inside = self.cmp_index("ult", &warp, &limit);
        let _ = writeln!(self.body.text, "        scf.if {inside} {{");
        (warp, lane)
    }

    /// How many positions each output element of a count looks at (`count`: a row's, each
    /// bin; `expert_offsets`: all of them, each expert); 0 for other ops.
    fn counted_extent(&self, node: &Node) -> usize {
        let shape = &self.node(node.args[0]).shape;
        match node.op {
            Op::Count { .. } => *shape.last().unwrap_or(&1),
            Op::ExpertOffsets { .. } => numel(shape),
            _ => 0,
        }
    }

    /// A count over many positions: `count` adds the positions holding the element's bin,
    /// `expert_offsets` those holding an expert below the element's (in f32: exact below
    /// 2²⁴), a warp per output element.
    fn count_by_warps(&mut self, node: &Node) -> Result<bool, String> {
        let out = self.slots.len();
        let positions = node.args[0];
        let shape = self.node(positions).shape.clone();
        let term = |g: &mut Self, idx: &[String], j: &str| {
            let (at, pred, bound) = match node.op {
                Op::Count { .. } => {
                    let rank = idx.len();
                    let mut at = idx[..rank - 1].to_vec();
                    at.push(j.to_string());
                    (at, "eq", idx[rank - 1].clone())
                }
                _ => (g.delinearize(j, &shape), "ult", idx[0].clone()),
            };
            let p = g.value_at(positions, &at)?;
            let p = g.position(&p);
            let hit = g.cmp_index(pred, &p, &bound);
            let (one, zero) = (g.body.constant(1.0), g.body.constant(0.0));
            Ok(g.line(format!("arith.select {hit}, {one}, {zero} : f32")))
        };
        let store = |g: &mut Self, element: &str, _: &[String], sum: &str| {
            let ty = element_type(node.dtype);
            let value = match node.dtype {
                DType::I32 => g.line(format!("arith.fptosi {sum} : f32 to i32")),
                _ => sum.to_string(),
            };
            let _ = writeln!(g.body.text, "        memref.store {value}, %a{out}[{element}] : memref<?x{ty}>");
            Ok(())
        };
        self.sum_by_warps(&node.shape.clone(), self.counted_extent(node), term, store)?;
        Ok(false)
    }

    /// The gates' gradient of the weighted combine, a warp per routed row i: out[order[i]] =
    /// Σ_j grad[order[i] / k, j] · ys[i, j] over the hidden width (both rows read coalesced).
    fn gate_grads_by_warps(&mut self, node: &Node) -> Result<bool, String> {
        let Op::UnpermuteGradGates { k } = node.op else { unreachable!("the gates' gradient") };
        let out = self.slots.len();
        let [grad, ys, order] = [node.args[0], node.args[1], node.args[2]];
        let rows = self.node(ys).shape.clone();
        let token = |g: &mut Self, idx: &[String]| -> Result<(String, String), String> {
            let a = g.value_at(order, &idx[..1])?;
            let a = g.position(&a);
            let kk = g.index(k);
            let t = g.line(format!("arith.divui {a}, {kk} : index"));
            Ok((a, t))
        };
        let term = |g: &mut Self, idx: &[String], j: &str| {
            let (_, t) = token(g, idx)?;
            let x = g.value_at(grad, &[t, j.to_string()])?;
            let y = g.value_at(ys, &[idx[0].clone(), j.to_string()])?;
            Ok(g.line(format!("arith.mulf {x}, {y} : f32")))
        };
        let store = |g: &mut Self, _: &str, idx: &[String], sum: &str| {
            let (a, _) = token(g, idx)?;
            let _ = writeln!(g.body.text, "        memref.store {sum}, %a{out}[{a}] : memref<?xf32>");
            Ok(())
        };
        self.sum_by_warps(&rows[..1], rows[1], term, store)?;
        Ok(false)
    }

    /// Sums by warps, a warp per output element w of `shape` (multi-index idx): the lanes
    /// stride over j < `extent` adding `term(idx, j)` ([`SUM_TERMS`] loaded at a time;
    /// coalesced where consecutive j are adjacent), their partial sums meet through shuffles,
    /// and lane 0 runs `store(w, idx, sum)`.
    fn sum_by_warps(
        &mut self,
        shape: &[usize],
        extent: usize,
        mut term: impl FnMut(&mut Self, &[String], &str) -> Result<String, String>,
        store: impl FnOnce(&mut Self, &str, &[String], &str) -> Result<(), String>,
    ) -> Result<(), String> {
        let (warp, lane) = self.warp_per_item(numel(shape));
        let idx = self.delinearize(&warp, shape);
        // A lane's turn takes SUM_TERMS terms 32 apart, their loads in flight together; past
        // the extent a term reads its last element and counts nothing.
        let end = self.index(extent.next_multiple_of(32 * SUM_TERMS));
        let (extent_index, last) = (self.index(extent), self.index(extent.max(1) - 1));
        let zero = self.body.constant(0.0);
        let partial = self
            .fold_range(&lane, &end, 32 * SUM_TERMS, std::slice::from_ref(&zero), &["f32"], |g, j, acc| {
                let mut terms = Vec::with_capacity(SUM_TERMS);
                for u in 0..SUM_TERMS {
                    let offset = g.index(32 * u);
                    let ju = g.line(format!("arith.addi {j}, {offset} : index"));
                    let inside = g.cmp_index("ult", &ju, &extent_index);
                    let clamped = g.line(format!("arith.minui {ju}, {last} : index"));
                    terms.push((inside, term(g, &idx, &clamped)?));
                }
                let mut sum = acc[0].clone();
                for (inside, x) in terms {
                    let counted = g.line(format!("arith.select {inside}, {x}, {zero} : f32"));
                    sum = g.line(format!("arith.addf {sum}, {counted} : f32"));
                }
                Ok(vec![sum])
            })?
            .remove(0);
        let name = self.body.fresh();
        let sum = super::emit::warp_reduce(&mut self.body.text, &name[1..], &partial, "arith.addf %acc, %y : f32");
        let zero_index = self.index(0);
        let is_lane0 = self.cmp_index("eq", &lane, &zero_index);
        let _ = writeln!(self.body.text, "        scf.if {is_lane0} {{");
        self.scoped(|g| store(g, &warp, &idx, &sum))?;
        let _ = writeln!(
            self.body.text,
            "        }}
        }}"
        );
        Ok(())
    }

    /// Each output element computed at its own index: outputs of different sizes each by the
    /// threads below their size.
    fn gather(&mut self, kernel: &Kernel) -> Result<bool, String> {
        let outputs: Vec<&Node> = kernel.outputs.iter().map(|&o| &self.f.nodes[o as usize]).collect();
        self.domain = outputs.iter().map(|n| numel(&n.shape)).max().unwrap_or(0);
        for (k, (&o, node)) in kernel.outputs.iter().zip(&outputs).enumerate() {
            let slot = kernel.inputs.len() + k;
            let size = self.index(numel(&node.shape));
            let inside = self.cmp_index("ult", "%gid", &size);
            let _ = writeln!(self.body.text, "        scf.if {inside} {{");
            self.scoped(|g| -> Result<(), String> {
                let idx = g.delinearize("%gid", &node.shape);
                let mut x = g.value_at(V(o), &idx)?;
                let ty = g.buffer_type(o);
                if ty == "bf16" {
                    x = g.line(format!("arith.truncf {x} : f32 to bf16"));
                }
                let _ = writeln!(g.body.text, "        memref.store {x}, %a{slot}[%gid] : memref<?x{ty}>");
                Ok(())
            })?;
            let _ = writeln!(self.body.text, "        }}");
        }
        Ok(false)
    }

    /// The stable sort of assignments by expert, a warp per expert e: one sweep over the
    /// assignments counts those of lower experts (where e's rows start), a second writes e's
    /// assignments in order, each lane's place its rank among the warp's matches (a ballot
    /// and a population count) after the matches of earlier sweeps. A turn of either sweep
    /// loads [`SORT_SWEEPS`] sweeps of 32 assignments before it counts them, so that their
    /// loads are in flight together (one at a time, every sweep waited on memory's latency).
    fn sort_by_expert(&mut self, node: &Node) -> Result<bool, String> {
        let Op::SortByExpert { experts } = node.op else { unreachable!("a sort by expert") };
        let out = self.slots.len();
        let shape = self.node(node.args[0]).shape.clone();
        let n = numel(&shape);
        let (warp, lane) = self.warp_per_item(experts);
        let c32 = self.index(32);
        let expert = self.line(format!("arith.index_cast {warp} : index to i32"));
        let lane32 = self.line(format!("arith.index_cast {lane} : index to i32"));
        let one = self.line("arith.constant 1 : i32".into());
        let bit = self.line(format!("arith.shli {one}, {lane32} : i32"));
        let below_lane = self.line(format!("arith.subi {bit}, {one} : i32"));
        let all = self.line("arith.constant -1 : i32".into());
        // The turn's sweeps: for each, this lane's assignment, whether it is inside, and its
        // expert.
        let load = |g: &mut Self, turn: &str| -> Result<Vec<(String, String, String)>, String> {
            let sweeps = g.index(SORT_SWEEPS);
            let first = g.line(format!("arith.muli {turn}, {sweeps} : index"));
            (0..SORT_SWEEPS)
                .map(|u| {
                    let u = g.index(u);
                    let t = g.line(format!("arith.addi {first}, {u} : index"));
                    let base = g.line(format!("arith.muli {t}, {c32} : index"));
                    let a = g.line(format!("arith.addi {base}, {lane} : index"));
                    let size = g.index(n);
                    let valid = g.cmp_index("ult", &a, &size);
                    let last = g.index(n - 1);
                    let clamped = g.line(format!("arith.minui {a}, {last} : index"));
                    let at = g.delinearize(&clamped, &shape);
                    let e = g.value_at(node.args[0], &at)?;
                    Ok((a, valid, e))
                })
                .collect()
        };
        // Whether the assignment counts (`pred` of its expert against the warp's), and the
        // ballot of that over the warp.
        let ballot = |g: &mut Self, valid: &str, e: &str, pred: &str| -> (String, String) {
            let hit = g.line(format!("arith.cmpi {pred}, {e}, {expert} : i32"));
            let counted = g.line(format!("arith.andi {valid}, {hit} : i1"));
            let ballot = g.line(format!("nvvm.vote.sync ballot {all}, {counted} -> i32"));
            (counted, ballot)
        };
        let turns = n.div_ceil(32 * SORT_SWEEPS);
        let zero = self.index(0);
        let start = self
            .fold(turns, std::slice::from_ref(&zero), &["index"], |g, turn, acc| {
                let mut total = acc[0].clone();
                for (_, valid, e) in load(g, turn)? {
                    let (_, ballot) = ballot(g, &valid, &e, "slt");
                    let count = g.line(format!("llvm.intr.ctpop({ballot}) : (i32) -> i32"));
                    let count = g.position(&count);
                    total = g.line(format!("arith.addi {total}, {count} : index"));
                }
                Ok(vec![total])
            })?
            .remove(0);
        self.fold(turns, &[start], &["index"], |g, turn, acc| {
            let mut placed = acc[0].clone();
            for (a, valid, e) in load(g, turn)? {
                let (counted, ballot) = ballot(g, &valid, &e, "eq");
                let earlier = g.line(format!("arith.andi {ballot}, {below_lane} : i32"));
                let rank = g.line(format!("llvm.intr.ctpop({earlier}) : (i32) -> i32"));
                let rank = g.position(&rank);
                let place = g.line(format!("arith.addi {placed}, {rank} : index"));
                let id = g.line(format!("arith.index_cast {a} : index to i32"));
                let _ = writeln!(
                    g.body.text,
                    "        scf.if {counted} {{\n        memref.store {id}, %a{out}[{place}] : memref<?xi32>\n        }}"
                );
                let count = g.line(format!("llvm.intr.ctpop({ballot}) : (i32) -> i32"));
                let count = g.position(&count);
                placed = g.line(format!("arith.addi {placed}, {count} : index"));
            }
            Ok(vec![placed])
        })?;
        let _ = writeln!(self.body.text, "        }}");
        Ok(false)
    }

    /// A scatter op over its source elements; whether its output must be zeroed first.
    fn scatter(&mut self, node: &Node) -> Result<bool, String> {
        let out = self.slots.len();
        let arg = |k: usize| node.args[k];
        let shape = |g: &Self, k: usize| g.node(node.args[k]).shape.clone();
        let atomic_add = |g: &mut Self, x: &str, at: &str| {
            g.line(format!("memref.atomic_rmw addf {x}, %a{out}[{at}] : (f32, memref<?xf32>) -> f32"));
        };
        let source = match &node.op {
            Op::ScatterRows { .. } => shape(self, 1),
            Op::InvertOrder => shape(self, 0),
            _ => unreachable!("scatter ops"),
        };
        self.domain = numel(&source);
        let size = self.index(self.domain);
        let inside = self.cmp_index("ult", "%gid", &size);
        let _ = writeln!(self.body.text, "        scf.if {inside} {{");
        let idx = self.delinearize("%gid", &source);
        let zeroed = match &node.op {
            Op::ScatterRows { .. } => {
                // out[ids[p], j] += g[p, j]
                let rank = idx.len();
                let id = self.value_at(arg(0), &idx[..rank - 1])?;
                let row = self.position(&id);
                let x = self.value_at(arg(1), &idx)?;
                let at = self.linearize(&[row, idx[rank - 1].clone()], &node.shape);
                atomic_add(self, &x, &at);
                true
            }
            Op::InvertOrder => {
                // out[order[i]] = i (a permutation: every element written once)
                let a = self.value_at(arg(0), &idx)?;
                let at = self.position(&a);
                let i = self.line(format!("arith.index_cast {} : index to i32", idx[0]));
                let _ = writeln!(self.body.text, "        memref.store {i}, %a{out}[{at}] : memref<?xi32>");
                false
            }
            _ => unreachable!("scatter ops"),
        };
        let _ = writeln!(self.body.text, "        }}");
        Ok(zeroed)
    }

    fn finish(self, kernel: &Kernel, zeroed: bool) -> Emitted {
        let types: Vec<&str> = self.args.iter().map(|&v| self.buffer_type(v)).collect();
        let params: Vec<String> = types.iter().enumerate().map(|(i, t)| format!("%a{i}: memref<?x{t}>")).collect();
        let name = &kernel.name;
        let mlir = format!(
            "module attributes {{gpu.container_module}} {{\n  gpu.module @{name} [{TARGET}] {{\n    gpu.func @{name}({}) kernel {{\n      %bid = gpu.block_id x\n      %bdim = gpu.block_dim x\n      %tid = gpu.thread_id x\n      %t0 = arith.muli %bid, %bdim : index\n      %gid = arith.addi %t0, %tid : index\n{}      gpu.return\n    }}\n  }}\n}}\n",
            params.join(", "),
            self.body.text
        );
        let threads = self.domain as u32;
        Emitted { mlir, grid: threads.div_ceil(BLOCK).max(1), block: BLOCK, args: self.args, zeroed }
    }
}
