//! The SVG timeline of a simulated step, drawn like the DualPipe paper's figure: one row per
//! pipeline rank, time to the right, each compute chunk a box coloured by its kind (forward,
//! backward, input gradient, weight gradient, overlapped forward & backward) and labelled with
//! its micro-batch (black for the down direction, white for the up one); the ZeRO-1 end of the
//! step in grey. Hovering a box shows the instruction and its times.

use std::fmt::Write;

use super::execute::Run;
use super::schedule::{Compute, Direction, Instruction, Micro, Schedule};

const LABEL_WIDTH: f64 = 64.0;
const PLOT_WIDTH: f64 = 1600.0;
const ROW: f64 = 26.0;
const GAP: f64 = 4.0;
const LEGEND: f64 = 40.0;

/// Fill colour and legend name of each kind of box.
const KINDS: [(&str, &str); 6] = [
    ("#f4b183", "forward"),
    ("#a9d18e", "backward"),
    ("#c5e0b4", "backward (input)"),
    ("#9dc3e6", "backward (weight)"),
    ("#ffd966", "forward & backward"),
    ("#d9d9d9", "ZeRO-1 / optimizer"),
];

/// The timeline of `run`, a run of `schedule`.
pub fn svg(schedule: &Schedule, run: &Run) -> String {
    let end = run.spans.iter().flatten().map(|span| span.end).fold(0.0, f64::max).max(f64::MIN_POSITIVE);
    let x = |t: f64| LABEL_WIDTH + t / end * PLOT_WIDTH;
    let height = schedule.ranks as f64 * ROW + LEGEND;
    let mut out = String::new();
    let width = LABEL_WIDTH + PLOT_WIDTH + 10.0;
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (rank, spans) in run.spans.iter().enumerate() {
        let y = rank as f64 * ROW;
        let _ = writeln!(out, r#"<text x="4" y="{:.1}">rank {rank}</text>"#, y + ROW / 2.0 + 4.0);
        for span in spans {
            let instruction = &schedule.programs[rank][span.instruction];
            let Some((kind, micro)) = kind_of(instruction) else { continue };
            let (left, right) = (x(span.start), x(span.end));
            let w = right - left;
            let _ = writeln!(
                out,
                r#"<rect x="{left:.2}" y="{y:.1}" width="{w:.2}" height="{:.1}" fill="{}" stroke="black" stroke-width="0.3"><title>rank {rank}: {}, {:.3} ms to {:.3} ms</title></rect>"#,
                ROW - GAP,
                KINDS[kind].0,
                escape(&instruction.to_string()),
                span.start * 1e3,
                span.end * 1e3
            );
            if let Some(micro) = micro.filter(|_| w >= 12.0) {
                let colour = match micro.direction {
                    Direction::Down => "black",
                    Direction::Up => "white",
                };
                let _ = writeln!(
                    out,
                    r#"<text x="{:.2}" y="{:.1}" fill="{colour}" text-anchor="middle">{}</text>"#,
                    left + w / 2.0,
                    y + ROW / 2.0 + 2.0,
                    micro.index
                );
            }
        }
    }
    let y = schedule.ranks as f64 * ROW + 16.0;
    for (i, (colour, name)) in KINDS.iter().enumerate() {
        let left = LABEL_WIDTH + i as f64 * 170.0;
        let _ = writeln!(
            out,
            r#"<rect x="{left}" y="{:.1}" width="14" height="14" fill="{colour}" stroke="black" stroke-width="0.3"/><text x="{}" y="{:.1}">{}</text>"#,
            y - 11.0,
            left + 18.0,
            y,
            escape(name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// `text` as SVG character data.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The box kind (an index into [`KINDS`]) and the micro-batch to label it with; `None` for
/// instructions not drawn (sends and receives).
fn kind_of(instruction: &Instruction) -> Option<(usize, Option<Micro>)> {
    match *instruction {
        Instruction::Compute(Compute::Forward(micro)) => Some((0, Some(micro))),
        Instruction::Compute(Compute::Backward(micro)) => Some((1, Some(micro))),
        Instruction::Compute(Compute::BackwardInput(micro)) => Some((2, Some(micro))),
        Instruction::Compute(Compute::BackwardWeight(micro)) => Some((3, Some(micro))),
        Instruction::Compute(Compute::ForwardBackward { forward, .. }) => Some((4, Some(forward))),
        Instruction::ReduceScatterGrads | Instruction::OptimizerStep | Instruction::AllGatherParams => Some((5, None)),
        Instruction::Send { .. } | Instruction::Recv { .. } => None,
    }
}
