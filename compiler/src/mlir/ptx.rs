//! The writer of the hand-scheduled tensor-core kernels ([`super::gemm`],
//! [`super::attention`]): one kernel body ([`Body`] names and emits its SSA values) in the
//! LLVM dialect's integer and float arithmetic, with inline PTX for what MLIR 22's NVVM ops
//! would need struct plumbing for (`wgmma`, `mma.sync`, `ldmatrix`, TMA, mbarriers).

use super::emit::Body;
use std::fmt::Write;

pub(super) struct Lines(Body);

/// An open `scf.for` ([`Lines::open_for`]).
pub(super) struct Loop {
    /// The iteration's index, as i64.
    pub index: String,
    /// The carried values inside the body, in order.
    pub carried: Vec<String>,
    /// The loop's results after it: `results` for one carried value, `results#i` for several.
    pub results: String,
}

impl Lines {
    pub fn new() -> Self {
        Lines(Body::new())
    }

    /// The body written so far.
    pub fn text(&self) -> &str {
        &self.0.text
    }

    /// A fresh SSA name, for values a region defines (loop indices and results).
    pub fn fresh(&mut self) -> String {
        self.0.fresh()
    }

    /// `%vN = rhs`; `%vN`.
    pub fn line(&mut self, rhs: impl AsRef<str>) -> String {
        self.0.line(rhs.as_ref().to_string())
    }

    /// A statement without a result.
    pub fn stmt(&mut self, s: impl AsRef<str>) {
        let _ = writeln!(self.0.text, "        {}", s.as_ref());
    }

    pub fn i64(&mut self, c: u64) -> String {
        self.line(format!("llvm.mlir.constant({c} : i64) : i64"))
    }

    pub fn i32(&mut self, c: u32) -> String {
        self.line(format!("llvm.mlir.constant({c} : i32) : i32"))
    }

    pub fn f32(&mut self, c: f64) -> String {
        self.line(format!("llvm.mlir.constant({} : f32) : f32", super::emit::float(c)))
    }

    /// `a <op> b` on i64 (`op` an LLVM dialect binary op: add, sub, mul, udiv, urem, or, xor,
    /// lshr, and).
    pub fn op(&mut self, op: &str, a: &str, b: &str) -> String {
        self.line(format!("llvm.{op} {a}, {b} : i64"))
    }

    pub fn op_c(&mut self, op: &str, a: &str, c: u64) -> String {
        let c = self.i64(c);
        self.op(op, a, &c)
    }

    /// Opens `scf.if` for the threads whose `index` (i64: a thread's place among some threads)
    /// is 0; the caller writes the body, then `}`.
    pub fn open_if_first(&mut self, index: &str) {
        let zero = self.i64(0);
        let first = self.line(format!("llvm.icmp \"eq\" {index}, {zero} : i64"));
        self.stmt(format!("scf.if {first} {{"));
    }

    /// Opens `scf.for` over `lower..upper` by `step` (i64 values) carrying `carried` (each an
    /// initial value and its type); the caller writes the body, then `scf.yield` and `}`.
    pub fn open_for(&mut self, lower: &str, upper: &str, step: &str, carried: &[(String, &str)]) -> Loop {
        let [lower, upper, step] =
            [lower, upper, step].map(|v| self.line(format!("arith.index_cast {v} : i64 to index")));
        let (index, results) = (self.fresh(), self.fresh());
        let names: Vec<String> = carried.iter().map(|_| self.fresh()).collect();
        let head = format!("scf.for {index} = {lower} to {upper} step {step}");
        if carried.is_empty() {
            self.stmt(format!("{head} {{"));
        } else {
            let args: Vec<String> =
                names.iter().zip(carried).map(|(name, (init, _))| format!("{name} = {init}")).collect();
            let types: Vec<&str> = carried.iter().map(|(_, t)| *t).collect();
            let count = if carried.len() > 1 { format!(":{}", carried.len()) } else { String::new() };
            self.stmt(format!("{results}{count} = {head} iter_args({}) -> ({}) {{", args.join(", "), types.join(", ")));
        }
        let index = self.line(format!("arith.index_cast {index} : index to i64"));
        Loop { index, carried: names, results }
    }

    /// `scf.if` on `condition` with results of `types`: the values each branch's body returns
    /// are its yield. Returns the results.
    pub fn if_else(
        &mut self,
        condition: &str,
        types: &[&str],
        then: impl FnOnce(&mut Self) -> Vec<String>,
        otherwise: impl FnOnce(&mut Self) -> Vec<String>,
    ) -> Vec<String> {
        let results = self.fresh();
        let types_text = types.join(", ");
        self.stmt(format!("{results}:{} = scf.if {condition} -> ({types_text}) {{", types.len()));
        let values = then(self);
        self.stmt(format!("scf.yield {} : {types_text}", values.join(", ")));
        self.stmt("} else {");
        let values = otherwise(self);
        self.stmt(format!("scf.yield {} : {types_text}", values.join(", ")));
        self.stmt("}");
        (0..types.len()).map(|i| format!("{results}#{i}")).collect()
    }

    /// An index-valued `gpu` op (`gpu.thread_id x`, …) as i64.
    pub fn index_i64(&mut self, rhs: &str) -> String {
        let i = self.line(rhs);
        self.line(format!("arith.index_cast {i} : index to i64"))
    }

    /// Inline PTX with side effects and no result.
    pub fn asm(&mut self, text: &str, operands: &[(String, &str, &str)]) {
        let constraints: Vec<String> = operands.iter().map(|(_, c, _)| c.to_string()).collect();
        let call = Self::inline(text, &constraints, operands);
        self.stmt(format!("{call}()"));
    }

    /// Inline PTX with side effects that updates f32 `values` in place (its results `$0..`,
    /// "=f" tied to them as the next operands), then reads `operands`; the values after it.
    pub fn asm_f32s(&mut self, text: &str, values: &[String], operands: &[(String, &str, &str)]) -> Vec<String> {
        let count = values.len();
        let mut constraints: Vec<String> = vec!["=f".into(); count];
        constraints.extend((0..count).map(|i| i.to_string()));
        constraints.extend(operands.iter().map(|(_, c, _)| c.to_string()));
        let all: Vec<(String, &str, &str)> =
            values.iter().map(|v| (v.clone(), "", "f32")).chain(operands.iter().cloned()).collect();
        let call = Self::inline(text, &constraints, &all);
        let s = self.line(format!("{call}{}", structure("f32", count)));
        self.fields(&s, "f32", count)
    }

    /// Inline PTX with side effects and `count` fresh "=r" (i32) results, `$0..`.
    pub fn asm_i32s(&mut self, text: &str, count: usize, operands: &[(String, &str, &str)]) -> Vec<String> {
        let constraints: Vec<String> =
            std::iter::repeat_n("=r", count).chain(operands.iter().map(|(_, c, _)| *c)).map(String::from).collect();
        let call = Self::inline(text, &constraints, operands);
        if count == 1 {
            return vec![self.line(format!("{call}i32"))];
        }
        let s = self.line(format!("{call}{}", structure("i32", count)));
        self.fields(&s, "i32", count)
    }

    /// Inline PTX with side effects and one "=r" (i32) result, `$0`.
    pub fn asm_i32(&mut self, text: &str, operands: &[(String, &str, &str)]) -> String {
        self.asm_i32s(text, 1, operands).remove(0)
    }

    /// Inline PTX with one "=f" (f32) result, `$0`.
    pub fn asm_f32(&mut self, text: &str, operands: &[(String, &str, &str)]) -> String {
        self.asm_one(text, ("=f", "f32"), operands)
    }

    /// Inline PTX with one "=l" (i64) result, `$0`.
    pub fn asm_i64(&mut self, text: &str, operands: &[(String, &str, &str)]) -> String {
        self.asm_one(text, ("=l", "i64"), operands)
    }

    fn asm_one(&mut self, text: &str, (constraint, ty): (&str, &str), operands: &[(String, &str, &str)]) -> String {
        let constraints: Vec<String> =
            std::iter::once(constraint).chain(operands.iter().map(|(_, c, _)| *c)).map(String::from).collect();
        let call = Self::inline(text, &constraints, operands);
        self.line(format!("{call}{ty}"))
    }

    fn fields(&mut self, s: &str, ty: &str, count: usize) -> Vec<String> {
        (0..count).map(|i| self.line(format!("llvm.extractvalue {s}[{i}] : {}", structure(ty, count)))).collect()
    }

    /// `llvm.inline_asm` up to its result type.
    fn inline(text: &str, constraints: &[String], operands: &[(String, &str, &str)]) -> String {
        let args: Vec<&str> = operands.iter().map(|(v, _, _)| v.as_str()).collect();
        let types: Vec<&str> = operands.iter().map(|(_, _, t)| *t).collect();
        format!(
            r#"llvm.inline_asm has_side_effects asm_dialect = att "{text}", "{}" {} : ({}) -> "#,
            constraints.join(","),
            args.join(", "),
            types.join(", ")
        )
    }
}

fn structure(ty: &str, count: usize) -> String {
    format!("!llvm.struct<({})>", vec![ty; count].join(", "))
}

/// The layout half of a `wgmma` shared-memory descriptor: 128-byte swizzle (bits 62–63), the
/// stride byte offset (bits 32–45) and the leading byte offset (bits 16–29), both in bytes.
pub fn swizzled_layout(g: &mut Lines, leading: u64, stride: u64) -> String {
    g.i64((1 << 62) | ((stride >> 4) << 32) | ((leading >> 4) << 16))
}

/// The descriptor of the tile at shared byte `at` (i64) with `layout` ([`swizzled_layout`]):
/// the address's bits 4–17 in bits 0–13.
pub fn descriptor(g: &mut Lines, layout: &str, at: &str) -> String {
    let low = g.op_c("and", at, 0x3FFFF);
    let address = g.op_c("lshr", &low, 4);
    g.op("or", layout, &address)
}

/// The descriptor of the tile `offset` bytes past the one `descriptor` ([`descriptor`])
/// describes: one add to its address field (bytes / 16). Shared addresses are below 2^18, so
/// the field (the address's bits 4–17) never carries into the bits above it.
pub fn descriptor_past(g: &mut Lines, descriptor: &str, offset: u64) -> String {
    assert_eq!(offset % 16, 0, "descriptors address 16-byte units");
    if offset == 0 {
        return descriptor.to_string();
    }
    g.op_c("add", descriptor, offset >> 4)
}

/// Spins until the mbarrier at shared address `barrier` (i32) has completed the phase of
/// parity `parity` (i64, 0 or 1).
pub fn mbarrier_wait(g: &mut Lines, barrier: &str, parity: &str) {
    let parity = g.line(format!("llvm.trunc {parity} : i64 to i32"));
    g.stmt("scf.while : () -> () {");
    let done = g.asm_i32(
        r"{\0A.reg .pred p;\0Ambarrier.try_wait.parity.shared::cta.b64 p, [$1], $2;\0Aselp.u32 $0, 1, 0, p;\0A}",
        &[(barrier.to_string(), "r", "i32"), (parity, "r", "i32")],
    );
    let zero = g.i32(0);
    let waiting = g.line(format!("llvm.icmp \"eq\" {done}, {zero} : i32"));
    g.stmt(format!("scf.condition({waiting})"));
    g.stmt("} do {");
    g.stmt("scf.yield");
    g.stmt("}");
}

/// Initialises the mbarrier at shared address `barrier` (i32) to expect `count` arrivals a
/// phase.
pub fn mbarrier_init(g: &mut Lines, barrier: &str, count: u32) {
    let count = g.i32(count);
    g.asm("mbarrier.init.shared::cta.b64 [$0], $1;", &[(barrier.to_string(), "r", "i32"), (count, "r", "i32")]);
}

/// Arrives at the mbarrier at shared address `barrier` (i32), its phase also to wait for
/// `bytes` of copies (TMA's `complete_tx`).
pub fn mbarrier_expect_bytes(g: &mut Lines, barrier: &str, bytes: u32) {
    let bytes = g.i32(bytes);
    g.asm(
        "mbarrier.arrive.expect_tx.shared::cta.b64 _, [$0], $1;",
        &[(barrier.to_string(), "r", "i32"), (bytes, "r", "i32")],
    );
}

/// Arrives at the mbarrier at shared address `barrier` (i32) of the thread's own block.
pub fn mbarrier_arrive(g: &mut Lines, barrier: &str) {
    g.asm("mbarrier.arrive.shared::cta.b64 _, [$0];", &[(barrier.to_string(), "r", "i32")]);
}

/// Copies the box at element coordinates `[column, row]` (i64) of the 2-D tensor map at `map`
/// (a global pointer to it) into shared byte `to` (i64) by TMA, its bytes completing on the
/// mbarrier at `barrier` (i32); with `multicast`, into the same place of both blocks of the
/// cluster (each barrier there counting them).
pub fn tma_load(g: &mut Lines, to: &str, map: &str, [column, row]: [&str; 2], barrier: &str, multicast: bool) {
    let [to, column, row] = [to, column, row].map(|x| g.line(format!("llvm.trunc {x} : i64 to i32")));
    let map = g.line(format!("llvm.ptrtoint {map} : !llvm.ptr<1> to i64"));
    let mut operands = vec![
        (to, "r", "i32"),
        (map, "l", "i64"),
        (column, "r", "i32"),
        (row, "r", "i32"),
        (barrier.to_string(), "r", "i32"),
    ];
    let copy = "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes";
    if multicast {
        operands.push((g.line("llvm.mlir.constant(3 : i16) : i16"), "h", "i16"));
        g.asm(&format!("{copy}.multicast::cluster [$0], [$1, {{$2, $3}}], [$4], $5;"), &operands);
    } else {
        g.asm(&format!("{copy} [$0], [$1, {{$2, $3}}], [$4];"), &operands);
    }
}

/// Bytes of registers spilled to local memory, as `report` (ptxas -v) gives them: the stores'
/// count of every function it lists.
#[cfg(all(test, feature = "mlir"))]
pub(super) fn spilled_bytes(report: &str) -> u64 {
    report
        .split(',')
        .filter_map(|part| part.trim().strip_suffix("bytes spill stores"))
        .map(|count| count.trim().parse::<u64>().expect("ptxas gives a count of bytes"))
        .sum()
}

/// ptxas's report (`-v`) of `ptx` assembled for sm_90a, where `DSC_PTXAS` names ptxas (else
/// None, saying so); fails the test when it does not assemble.
#[cfg(all(test, feature = "mlir"))]
pub(super) fn assemble(ptx: &str) -> Option<String> {
    let Some(ptxas) = std::env::var_os("DSC_PTXAS") else {
        eprintln!("ptxas not run: set DSC_PTXAS (scripts/install-deps.sh installs it)");
        return None;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("kernel.ptx");
    std::fs::write(&source, ptx).expect("write");
    let out = std::process::Command::new(ptxas)
        .args(["-arch=sm_90a", "-v", "-o"])
        .arg(dir.path().join("kernel.cubin"))
        .arg(&source)
        .output()
        .expect("ptxas runs");
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{report}");
    Some(report)
}

#[cfg(all(test, feature = "mlir"))]
mod tests {
    /// Spilled bytes are read as numbers: a report of 120 bytes of spill stores is not a clean
    /// one (searched for "0 bytes spill stores", it passed for one).
    #[test]
    fn spills_are_counted_not_matched() {
        let report = "ptxas info    : Used 168 registers, used 1 barriers\n    \
                      120 bytes stack frame, 120 bytes spill stores, 372 bytes spill loads\n    \
                      0 bytes stack frame, 4 bytes spill stores, 0 bytes spill loads";
        assert_eq!(super::spilled_bytes(report), 124);
        assert_eq!(super::spilled_bytes("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"), 0);
    }
}
