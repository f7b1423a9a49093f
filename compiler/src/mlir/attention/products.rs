//! The warpgroup's tensor-core products (`wgmma` on BF16, f32 accumulators): shared-memory
//! descriptors of the swizzled tiles, the scores' products (rows times a column tile, both
//! K-major), the accumulations (A from registers, the tile N-major), and the fences, commits
//! and waits that order them; the BF16 pairs their A operands are.

use super::*;

/// How a staged tile is read by a product: along its rows (K-major: the scores' operands) or
/// down its columns (N-major: the B of the accumulations, its rows along the product's K).
#[derive(Clone, Copy)]
pub(super) enum Major {
    K,
    N,
}

/// The `wgmma` descriptor of a staged tile from shared byte `at` (i64): 128-byte swizzle,
/// 8-row groups 1,024 bytes apart; N-major, its 64-column regions [`REGION`] bytes apart
/// (K-major products stay within a region: that offset is unused).
pub(super) fn descriptor(g: &mut Lines, at: &str, major: Major) -> String {
    let regions = match major {
        Major::K => 16,
        Major::N => REGION,
    };
    let layout = crate::mlir::ptx::swizzled_layout(g, regions, 1024);
    crate::mlir::ptx::descriptor(g, &layout, at)
}

/// A product's A: a staged tile (its descriptor, K-major) or four BF16 pairs per thread.
pub(super) enum Operand<'a> {
    Shared(String),
    Registers(&'a [String; 4]),
}

/// `d` (the warpgroup's 64 × `n` f32 accumulators, `n / 2` a thread) + A · B over 16 of K:
/// one `wgmma.mma_async` on BF16, B read `b_major` (N-major only beside A in registers); `add`
/// false starts from zero.
pub(super) fn wgmma(
    g: &mut Lines,
    n: u32,
    d: &[String],
    a: Operand,
    (b, b_major): (&str, Major),
    add: bool,
) -> Vec<String> {
    let count = d.len();
    let accumulators: Vec<String> = (0..count).map(|i| format!("${i}")).collect();
    let next = 2 * count;
    let transposed_b = match b_major {
        Major::K => "0",
        Major::N => "1",
    };
    let (a_text, mut operands, transposed) = match a {
        Operand::Shared(desc) => (format!("${next}"), vec![(desc, "l", "i64")], format!("0, {transposed_b}")),
        Operand::Registers(regs) => (
            format!("{{${next}, ${}, ${}, ${}}}", next + 1, next + 2, next + 3),
            regs.iter().map(|r| (r.clone(), "r", "i32")).collect(),
            transposed_b.to_string(),
        ),
    };
    let (b_at, add_at) = (next + operands.len(), next + operands.len() + 1);
    operands.push((b.to_string(), "l", "i64"));
    operands.push((g.i32(u32::from(add)), "r", "i32"));
    let text = format!(
        r"{{\0A.reg .pred p;\0Asetp.ne.b32 p, ${add_at}, 0;\0Awgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{}}}, {a_text}, ${b_at}, p, 1, 1, {transposed};\0A}}",
        accumulators.join(", ")
    );
    g.asm_f32s(&text, d, &operands)
}

/// The rows of the scores' products (their A, K-major): a staged tile's `wgmma` descriptor
/// ([`Rows::staged`]), or the warpgroup's 64 rows held in registers ([`Block::hold`]: per 16
/// columns, four BF16 pairs a thread).
pub(super) enum Rows<'a> {
    Staged(String),
    Held(&'a [[String; 4]]),
}

impl Rows<'_> {
    /// The rows staged at shared byte `at` (i64).
    pub(super) fn staged(g: &mut Lines, at: &str) -> Self {
        Rows::Staged(descriptor(g, at, Major::K))
    }
}

/// `value` (i64) as this loop iteration's own (an opaque move): what is computed from it stays
/// in the loop. The row tiles' descriptors: hoisted, their products' 20 per-step descriptors
/// stay live across the key pass's loop and spill; a few adds an iteration instead.
pub(super) fn in_iteration(g: &mut Lines, value: &str) -> String {
    g.asm_i64("mov.b64 $0, $1;", &[(value.to_string(), "l", "i64")])
}

/// The 64 × 64 products of the `rows` (A) with the column tile at `cols` (B), both K-major
/// over `width`, into `d` (32 fenced values, overwritten), issued, not awaited.
pub(super) fn issue_products(g: &mut Lines, d: Vec<String>, rows: &Rows, cols: &str, width: u32) -> Vec<String> {
    let cols = descriptor(g, cols, Major::K);
    (0..u64::from(width / 16)).fold(d, |d, k| {
        // 16 columns (32 bytes) a product, four to a region's 128-byte rows.
        let offset = k / 4 * REGION + k % 4 * 32;
        let b = crate::mlir::ptx::descriptor_past(g, &cols, offset);
        let a = match rows {
            Rows::Staged(tile) => Operand::Shared(crate::mlir::ptx::descriptor_past(g, tile, offset)),
            Rows::Held(fragments) => Operand::Registers(&fragments[k as usize]),
        };
        wgmma(g, 64, &d, a, (&b, Major::K), k > 0)
    })
}

/// `p` (64 × 64 scores per warpgroup, 8 tiles of 4 a thread) rounded to BF16 as the A of a
/// product: per 16 of its K, four pairs.
pub(super) fn operands(g: &mut Lines, p: &[Vec<String>]) -> Vec<[String; 4]> {
    (0..4)
        .map(|kk| {
            let (t0, t1) = (&p[2 * kk], &p[2 * kk + 1]);
            [pack(g, &t0[0], &t0[1]), pack(g, &t0[2], &t0[3]), pack(g, &t1[0], &t1[1]), pack(g, &t1[2], &t1[3])]
        })
        .collect()
}

/// `wgmma.fence` before products that read accumulators `d` and A operands `a` written since
/// the last (after every write of them: they are its inputs); `d` after it.
pub(super) fn fence(g: &mut Lines, d: &[String], a: &[[String; 4]]) -> Vec<String> {
    let packed: Vec<(String, &str, &str)> = a.iter().flatten().map(|x| (x.clone(), "r", "i32")).collect();
    g.asm_f32s("wgmma.fence.sync.aligned;", d, &packed)
}

/// `d` (fenced) + A `a` ([`operands`]) times the staged 64-row tile at `tile`, read N-major (its
/// rows along the product's K), `width` wide: issued, not awaited.
pub(super) fn issue_accumulation(
    g: &mut Lines,
    d: Vec<String>,
    a: &[[String; 4]],
    tile: &str,
    width: u32,
) -> Vec<String> {
    let tile = descriptor(g, tile, Major::N);
    a.iter().enumerate().fold(d, |d, (kk, a)| {
        // 16 rows of the tile a product.
        let b = crate::mlir::ptx::descriptor_past(g, &tile, kk as u64 * 16 * 128);
        wgmma(g, width, &d, Operand::Registers(a), (&b, Major::N), true)
    })
}

/// Closes the group of the products issued since the last.
pub(super) fn commit(g: &mut Lines) {
    g.asm("wgmma.commit_group.sync.aligned;", &[]);
}

/// `d` once at most `pending` of the committed groups are still running (the accumulators
/// pass through the wait, so nothing reads them before it).
pub(super) fn awaited(g: &mut Lines, d: &[String], pending: u32) -> Vec<String> {
    g.asm_f32s(&format!("wgmma.wait_group.sync.aligned {pending};"), d, &[])
}

/// `d` once the products issued since the last commit are done.
pub(super) fn completed(g: &mut Lines, d: &[String]) -> Vec<String> {
    commit(g);
    awaited(g, d, 0)
}

/// [`operands`]' BF16 pairs back as f32, in the layout of the products they were rounded from.
pub(super) fn unpacked(g: &mut Lines, a: &[[String; 4]]) -> Vec<Vec<String>> {
    let [shift, mask] = [16, -65536].map(|c| g.line(format!("llvm.mlir.constant({c} : i32) : i32")));
    let mut halves = |word: &String| {
        let low = g.line(format!("llvm.shl {word}, {shift} : i32"));
        let high = g.line(format!("llvm.and {word}, {mask} : i32"));
        [low, high].map(|x| g.line(format!("llvm.bitcast {x} : i32 to f32")))
    };
    a.iter()
        .flat_map(|pairs| {
            let [p0, p1, p2, p3] = pairs.each_ref().map(&mut halves);
            [[p0, p1].concat(), [p2, p3].concat()]
        })
        .collect()
}

/// Two f32 rounded to BF16 in one word, `low` in the low half.
pub(super) fn pack(g: &mut Lines, low: &str, high: &str) -> String {
    g.asm_i32("cvt.rn.bf16x2.f32 $0, $1, $2;", &[(high.to_string(), "f", "f32"), (low.to_string(), "f", "f32")])
}
