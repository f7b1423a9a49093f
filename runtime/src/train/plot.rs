//! Training curves as SVG (`dsc plot`): the losses (main, MTP) and the learning rate of a
//! metrics JSONL file against the step, drawn with `plotters`.

use plotters::prelude::*;
use std::path::Path;

/// The curves of one metrics file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Curves {
    pub loss: Vec<(f64, f64)>,
    pub mtp_loss: Vec<(f64, f64)>,
    pub lr: Vec<(f64, f64)>,
}

/// Reads a metrics JSONL file (`dsc train --metrics`); skipped steps and non-finite values are
/// left out of the curves.
pub fn read_curves(path: &Path) -> Result<Curves, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let mut curves = Curves::default();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let m: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            format!("`{}` line {} is not JSON ({e}): not a `dsc train --metrics` file", path.display(), i + 1)
        })?;
        let step = m["step"].as_f64().ok_or_else(|| format!("`{}` line {} has no `step`", path.display(), i + 1))?;
        if m["skipped"].as_bool() == Some(true) {
            continue;
        }
        for (curve, key) in [(&mut curves.loss, "loss"), (&mut curves.mtp_loss, "mtp_loss"), (&mut curves.lr, "lr")] {
            if let Some(v) = m[key].as_f64().filter(|v| v.is_finite()) {
                curve.push((step, v));
            }
        }
    }
    if curves.loss.is_empty() {
        return Err(format!("`{}` has no step with a finite loss", path.display()));
    }
    Ok(curves)
}

/// Draws the loss curves above the learning rate into an SVG file.
pub fn plot(curves: &Curves, title: &str, out: &Path) -> Result<(), String> {
    let root = SVGBackend::new(out, (960, 720)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("cannot draw `{}`: {e}", out.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(460);
    let steps = |c: &[(f64, f64)]| c.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let last = steps(&curves.loss).max(1.0);
    let first = curves.loss[0].0.min(last - 1.0);
    let values = curves.loss.iter().chain(&curves.mtp_loss).map(|p| p.1);
    let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let margin = ((high - low) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(&top)
        .caption(format!("{title}: loss"), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(first..last, (low - margin)..(high + margin))
        .map_err(|e| err(&e))?;
    let whole = |v: &f64| format!("{v:.0}");
    chart.configure_mesh().x_desc("step").x_label_formatter(&whole).y_desc("nats/token").draw().map_err(|e| err(&e))?;
    for (curve, color, label) in [(&curves.loss, BLUE, "loss"), (&curves.mtp_loss, RED, "MTP loss")] {
        if curve.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(curve.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| err(&e))?;
    let lr_high = curves.lr.iter().map(|p| p.1).fold(0.0, f64::max).max(f64::MIN_POSITIVE);
    let mut chart = ChartBuilder::on(&bottom)
        .caption("learning rate", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(first..last, 0.0..lr_high * 1.05)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&whole)
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()
        .map_err(|e| err(&e))?;
    chart.draw_series(LineSeries::new(curves.lr.iter().copied(), GREEN.stroke_width(2))).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_become_an_svg_with_both_panels() {
        let dir = std::env::temp_dir().join(format!("dsc-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let metrics = dir.join("m.jsonl");
        let lines: Vec<String> = (1..=30)
            .map(|s| {
                let skipped = s == 7;
                format!(
                    "{{\"step\": {s}, \"skipped\": {skipped}, \"loss\": {}, \"mtp_loss\": {}, \"lr\": {}}}",
                    if skipped { "null".to_string() } else { format!("{}", 6.0 - s as f64 * 0.1) },
                    6.1 - s as f64 * 0.1,
                    1e-3 * s as f64 / 30.0
                )
            })
            .collect();
        std::fs::write(&metrics, lines.join("\n")).unwrap();
        let curves = read_curves(&metrics).expect("curves");
        assert_eq!((curves.loss.len(), curves.lr.len()), (29, 29));
        let svg = dir.join("loss.svg");
        plot(&curves, "tiny", &svg).expect("plot");
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("learning rate") && text.contains("MTP loss"));
        assert!(text.matches("<polyline").count() >= 3, "three curves");
        std::fs::write(&metrics, "not json\n").unwrap();
        assert!(read_curves(&metrics).unwrap_err().contains("line 1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
