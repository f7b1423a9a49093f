//! DAG-aware extraction: which node of each e-class becomes the graph. egg's `Extractor`
//! minimises a tree cost, which counts a shared subterm once per use, so it cannot see that
//! a fused op with two results (or a GEMM over concatenated weights read by two slices) is
//! paid for once. This is the greedy-DAG algorithm of extraction-gym: a class's cost is a
//! *set* of (class, own cost) pairs — the union of its chosen node's children's sets plus
//! itself — and its total is the sum over the set, so shared classes count once. Classes are
//! swept until no total improves (each update strictly lowers a total, so the sweeps end).
//! A node whose children's sets already contain its own class would close a cycle and is
//! skipped.

use super::lang::Fx;
use egg::{Analysis, EGraph, Id, Language};
use std::collections::HashMap;

/// The chosen node of every class reachable in the extraction, and the total cost of the
/// roots (shared classes once).
pub struct Extraction {
    pub chosen: HashMap<Id, Fx>,
    pub cost: f64,
}

/// A class's best so far: its node, the (class, cost) set sorted by class, and its sum.
struct Best {
    node: Fx,
    set: Vec<(Id, f64)>,
    total: f64,
}

/// Extracts the DAG of minimal total `cost(class, node)` for `roots`: greedy DAG, then
/// `refine`.
pub fn extract<N: Analysis<Fx>>(egraph: &EGraph<Fx, N>, roots: &[Id], cost: impl Fn(Id, &Fx) -> f64) -> Extraction {
    let mut classes: Vec<Id> = egraph.classes().map(|c| c.id).collect();
    // Original nodes were added children first, so ascending ids settle most classes in the
    // first sweep.
    classes.sort();
    let mut best: HashMap<Id, Best> = HashMap::new();
    let mut changed = true;
    while changed {
        changed = false;
        for &class in &classes {
            for node in &egraph[class].nodes {
                let Some(candidate) = candidate(egraph, &best, class, node, &cost) else { continue };
                let better = best.get(&class).is_none_or(|b| candidate.total < b.total * (1.0 - 1e-12));
                if better {
                    best.insert(class, candidate);
                    changed = true;
                }
            }
        }
    }
    let roots: Vec<Id> = roots.iter().map(|r| egraph.find(*r)).collect();
    let mut choice: HashMap<Id, Fx> = best.into_iter().map(|(class, b)| (class, b.node)).collect();
    let cost = refine(egraph, &classes, &roots, &mut choice, &cost);
    let mut chosen = HashMap::new();
    let mut stack = roots;
    while let Some(class) = stack.pop() {
        let node = &choice[&class];
        if chosen.insert(class, node.clone()).is_none() {
            stack.extend(node.children().iter().map(|c| egraph.find(*c)));
        }
    }
    Extraction { chosen, cost }
}

/// Greedy DAG decides each class on its own, so it can pick a fused op with two results for
/// one reader while the other reader keeps the unfused op (and pays for both), or keep both
/// unfused ops when the fused one costs more than either alone. Local search fixes that: every
/// class with alternatives is switched to each of them — a switch to one result of a tuple
/// switches every class that has a result of that tuple, together — and a switch is kept when
/// the whole DAG (shared classes once, cycles refused) gets cheaper; sweeps repeat until none
/// is. Returns the DAG's cost.
fn refine<N: Analysis<Fx>>(
    egraph: &EGraph<Fx, N>,
    classes: &[Id],
    roots: &[Id],
    choice: &mut HashMap<Id, Fx>,
    cost: &impl Fn(Id, &Fx) -> f64,
) -> f64 {
    let mut total = dag_cost(egraph, roots, choice, cost).expect("greedy DAG chooses no cycle");
    let alternatives: Vec<Id> = classes.iter().copied().filter(|c| egraph[*c].nodes.len() > 1).collect();
    // The classes reading each tuple, with the node that reads it.
    let mut readers: HashMap<Id, Vec<(Id, Fx)>> = HashMap::new();
    for &class in &alternatives {
        for node in &egraph[class].nodes {
            if let Fx::Get0(t) | Fx::Get1(t) | Fx::Get2(t) = node {
                readers.entry(egraph.find(*t)).or_default().push((class, node.clone()));
            }
        }
    }
    let mut improved = true;
    while improved {
        improved = false;
        for &class in &alternatives {
            for node in &egraph[class].nodes {
                if choice.get(&class) == Some(node) {
                    continue;
                }
                let switch = match node {
                    Fx::Get0(t) | Fx::Get1(t) | Fx::Get2(t) => readers[&egraph.find(*t)].clone(),
                    _ => vec![(class, node.clone())],
                };
                let previous: Vec<(Id, Option<Fx>)> =
                    switch.into_iter().map(|(c, n)| (c, choice.insert(c, n))).collect();
                match dag_cost(egraph, roots, choice, cost) {
                    Some(c) if c < total * (1.0 - 1e-12) => {
                        total = c;
                        improved = true;
                    }
                    _ => {
                        for (c, p) in previous.into_iter().rev() {
                            match p {
                                Some(p) => choice.insert(c, p),
                                None => choice.remove(&c),
                            };
                        }
                    }
                }
            }
        }
    }
    total
}

/// The cost of the DAG the choices make from `roots` (each class once), or `None` when a
/// chosen node is missing or the choices form a cycle.
fn dag_cost<N: Analysis<Fx>>(
    egraph: &EGraph<Fx, N>,
    roots: &[Id],
    choice: &HashMap<Id, Fx>,
    cost: &impl Fn(Id, &Fx) -> f64,
) -> Option<f64> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Open,
        Done,
    }
    let mut state: HashMap<Id, State> = HashMap::new();
    let mut total = 0.0;
    let mut stack: Vec<(Id, bool)> = roots.iter().map(|&r| (r, false)).collect();
    while let Some((class, children_done)) = stack.pop() {
        if children_done {
            state.insert(class, State::Done);
            continue;
        }
        match state.get(&class) {
            Some(State::Done) => continue,
            Some(State::Open) => return None,
            None => {}
        }
        let node = choice.get(&class)?;
        total += cost(class, node);
        state.insert(class, State::Open);
        stack.push((class, true));
        for child in node.children() {
            let child = egraph.find(*child);
            match state.get(&child) {
                Some(State::Open) => return None,
                Some(State::Done) => {}
                None => stack.push((child, false)),
            }
        }
    }
    Some(total)
}

/// The cost set of `class` through `node`, if all its children have one and none of them
/// depends on `class`.
fn candidate<N: Analysis<Fx>>(
    egraph: &EGraph<Fx, N>,
    best: &HashMap<Id, Best>,
    class: Id,
    node: &Fx,
    cost: &impl Fn(Id, &Fx) -> f64,
) -> Option<Best> {
    let mut set: Vec<(Id, f64)> = Vec::new();
    for child in node.children() {
        let child = best.get(&egraph.find(*child))?;
        if contains(&child.set, class) {
            return None;
        }
        set = union(&set, &child.set);
    }
    set = union(&set, &[(class, cost(class, node))]);
    let total = set.iter().map(|(_, c)| c).sum();
    Some(Best { node: node.clone(), set, total })
}

fn contains(set: &[(Id, f64)], class: Id) -> bool {
    set.binary_search_by_key(&class, |(c, _)| *c).is_ok()
}

/// The union of two sets sorted by class (a class in both keeps `a`'s cost).
fn union(a: &[(Id, f64)], b: &[(Id, f64)]) -> Vec<(Id, f64)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::lang::ConstBits;
    use egg::Symbol;

    fn opaque(egraph: &mut EGraph<Fx, ()>, name: &str, children: Vec<Id>) -> Id {
        egraph.add(Fx::Opaque(Symbol::from(name), children))
    }

    /// r = exp(s) + silu(s) with s costing 9, or an alternative costing 15. Per tree, s is paid
    /// twice (1 + 10 + 10 = 21) and the alternative wins; over the DAG, 1 + 1 + 1 + 9 = 12.
    #[test]
    fn a_shared_subterm_counts_once() {
        let mut egraph: EGraph<Fx, ()> = EGraph::default();
        let x = egraph.add(Fx::Const(ConstBits(0)));
        let shared = opaque(&mut egraph, "shared", vec![x]);
        let a = egraph.add(Fx::Exp(shared));
        let b = egraph.add(Fx::Silu(shared));
        let r = egraph.add(Fx::Add([a, b]));
        let alternative = opaque(&mut egraph, "alternative", vec![x]);
        egraph.union(r, alternative);
        egraph.rebuild();
        let cost = |_: Id, node: &Fx| match node {
            Fx::Opaque(s, _) if s.as_str() == "shared" => 9.0,
            Fx::Opaque(..) => 15.0,
            Fx::Exp(_) | Fx::Silu(_) | Fx::Add(_) => 1.0,
            _ => 0.0,
        };
        let r = egraph.find(r);
        let e = extract(&egraph, &[r], cost);
        assert_eq!(e.cost, 12.0);
        assert!(matches!(e.chosen[&r], Fx::Add(_)));
    }

    /// s = a + b (cost 2) and n = norm(s) (cost 2), or both read from one fused t (cost 3).
    /// Greedy DAG takes s = a + b (2 < 3) and then n from t (3 < 4), paying 5; switching s to t
    /// too pays 3.
    #[test]
    fn a_fused_tuple_serves_both_readers() {
        let mut egraph: EGraph<Fx, ()> = EGraph::default();
        let (a, b) = (opaque(&mut egraph, "a", vec![]), opaque(&mut egraph, "b", vec![]));
        let s = egraph.add(Fx::Add([a, b]));
        let n = egraph.add(Fx::Softmax(s));
        let t = opaque(&mut egraph, "t", vec![a, b]);
        let (s0, n1) = (egraph.add(Fx::Get0(t)), egraph.add(Fx::Get1(t)));
        egraph.union(s, s0);
        egraph.union(n, n1);
        egraph.rebuild();
        let cost = |_: Id, node: &Fx| match node {
            Fx::Add(_) | Fx::Softmax(_) => 2.0,
            Fx::Opaque(s, _) if s.as_str() == "t" => 3.0,
            _ => 0.0,
        };
        let roots = [egraph.find(s), egraph.find(n)];
        let e = extract(&egraph, &roots, cost);
        assert_eq!(e.cost, 3.0);
        assert!(matches!(e.chosen[&roots[0]], Fx::Get0(_)) && matches!(e.chosen[&roots[1]], Fx::Get1(_)));
    }

    /// y1 = f(x) and y2 = g(x) (cost 2 each), or both from one fused t (cost 3). Greedy DAG
    /// keeps both (2 < 3 twice), and no single switch helps (3 + 2 > 4); switching both
    /// readers of t together pays 3.
    #[test]
    fn both_readers_of_a_tuple_switch_together() {
        let mut egraph: EGraph<Fx, ()> = EGraph::default();
        let x = opaque(&mut egraph, "x", vec![]);
        let y1 = egraph.add(Fx::Exp(x));
        let y2 = egraph.add(Fx::Silu(x));
        let t = opaque(&mut egraph, "t", vec![x]);
        let (g0, g1) = (egraph.add(Fx::Get0(t)), egraph.add(Fx::Get1(t)));
        egraph.union(y1, g0);
        egraph.union(y2, g1);
        egraph.rebuild();
        let cost = |_: Id, node: &Fx| match node {
            Fx::Exp(_) | Fx::Silu(_) => 2.0,
            Fx::Opaque(s, _) if s.as_str() == "t" => 3.0,
            _ => 0.0,
        };
        let roots = [egraph.find(y1), egraph.find(y2)];
        assert_eq!(extract(&egraph, &roots, cost).cost, 3.0);
    }

    /// x = stop(x) after a rule merged them: the node that would make x its own input is
    /// never chosen.
    #[test]
    fn a_cycle_is_never_chosen() {
        let mut egraph: EGraph<Fx, ()> = EGraph::default();
        let x = opaque(&mut egraph, "x", vec![]);
        let stopped = egraph.add(Fx::Stop(x));
        egraph.union(x, stopped);
        egraph.rebuild();
        let e = extract(&egraph, &[egraph.find(x)], |_, _| 1.0);
        assert_eq!(e.cost, 1.0);
        assert!(matches!(e.chosen[&egraph.find(x)], Fx::Opaque(..)));
    }
}
