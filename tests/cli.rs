//! The `dsc` command line end to end: snapshots of every printed stage for the shipped
//! models, the `dsc info` JSON contract, formatting round trips, overrides, and hostile
//! input (empty, binary, huge, a directory, a missing file), which must give a located
//! error and exit code 1, never a panic.

use std::path::Path;
use std::process::{Command, Output};

const MODELS: [&str; 3] = ["deepseek-v3", "deepseek-v3-bench", "deepseek-v3-tiny"];

fn dsc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsc"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--color", "never"])
        .args(args)
        .output()
        .expect("running dsc")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs dsc and insists that it succeeded.
fn dsc_ok(args: &[&str]) -> String {
    let o = dsc(args);
    assert!(o.status.success(), "dsc {args:?} failed:\n{}", stderr(&o));
    stdout(&o)
}

/// Runs dsc and insists that it rejected its input cleanly: exit 1, a coded error, no panic.
fn dsc_rejects(args: &[&str]) -> String {
    let o = dsc(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "dsc {args:?}:\n{err}");
    assert!(!err.contains("panicked"), "dsc {args:?} panicked:\n{err}");
    assert!(err.contains("error[E"), "dsc {args:?} gave no coded error:\n{err}");
    err
}

fn model(name: &str) -> String {
    format!("models/{name}.dsc")
}

#[test]
fn shipped_models_check_cleanly() {
    for name in MODELS {
        let o = dsc(&["check", &model(name)]);
        assert!(o.status.success(), "{name}:\n{}", stderr(&o));
        assert!(!stderr(&o).contains("error"), "{name}:\n{}", stderr(&o));
    }
}

#[test]
fn emit_spec_snapshots() {
    for name in MODELS {
        insta::assert_snapshot!(format!("spec-{name}"), dsc_ok(&["compile", &model(name), "--emit=spec"]));
    }
}

#[test]
fn info_snapshots() {
    for name in MODELS {
        insta::assert_snapshot!(format!("info-{name}"), dsc_ok(&["info", &model(name)]));
        insta::assert_snapshot!(format!("info-json-{name}"), dsc_ok(&["info", &model(name), "--format", "json"]));
    }
}

fn info_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&dsc_ok(&["info", &model(name), "--format", "json"])).expect("info JSON")
}

#[test]
fn info_json_contract_and_deepseek_v3_size() {
    let info = info_json("deepseek-v3");
    let params = &info["params"];
    // SPEC.md: 671,026,419,200 main-model parameters, about 37B activated, MTP 11.6B.
    assert_eq!(params["total"].as_u64(), Some(671_026_419_200));
    let activated = params["activated"].as_u64().expect("activated");
    assert!((36_500_000_000..38_500_000_000).contains(&activated), "{activated}");
    let mtp = params["mtp"].as_u64().expect("mtp");
    assert!((11_500_000_000..11_700_000_000).contains(&mtp), "{mtp}");
    assert!(info["flops_per_token"].as_f64().expect("flops") > 0.0);
    let memory = info["memory"].as_array().expect("memory");
    assert_eq!(memory.len(), 16, "one entry per pipeline rank");
    for (i, rank) in memory.iter().enumerate() {
        assert_eq!(rank["stage"].as_u64(), Some(i as u64));
        assert!(rank["bytes"].as_u64().expect("bytes") > 0);
    }
}

#[test]
fn formatting_is_idempotent_and_keeps_the_spec() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in MODELS {
        // The shipped files are in canonical form.
        dsc_ok(&["fmt", "--check", &model(name)]);
        // Squash the layout (one entry per line, no alignment), format it back, compare.
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(model(name))).expect("model");
        let squashed: String =
            text.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") + "\n").collect();
        let squashed_path = dir.path().join(format!("{name}.dsc"));
        std::fs::write(&squashed_path, &squashed).expect("write");
        let squashed_path = squashed_path.to_str().expect("utf-8 path");
        let formatted = dsc_ok(&["fmt", squashed_path]);
        assert_eq!(formatted, text, "{name}: formatting the squashed file gives back the original");
        let original = dsc_ok(&["compile", &model(name), "--emit=spec"]);
        assert_eq!(dsc_ok(&["compile", squashed_path, "--emit=spec"]), original);
    }
}

#[test]
fn overrides_change_the_resolved_spec() {
    let spec = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["compile", "models/deepseek-v3-tiny.dsc", "--emit=spec"];
        all.extend_from_slice(args);
        serde_json::from_str(&dsc_ok(&all)).expect("spec JSON")
    };
    let s = spec(&[
        "--set",
        "train.seq_len=128",
        "--set",
        "model.ffn.1.top_k=3",
        "--set",
        "precision.ema={ decay = 0.99 }",
    ]);
    assert_eq!(s["train"]["seq_len"], 128);
    assert_eq!(s["model"]["ffn"][1]["ffn"]["top_k"], 3);
    assert_eq!(s["precision"]["ema"]["decay"], 0.99);
    // An override gets the checks a value in the file gets.
    let err = dsc_rejects(&["check", "models/deepseek-v3-tiny.dsc", "--set", "model.ffn.1.top_k=9"]);
    assert!(err.contains("top-9 of 8 routed experts"), "{err}");
    let err = dsc_rejects(&["check", "models/deepseek-v3-tiny.dsc", "--set", "model.vocab"]);
    assert!(err.contains("has no `=`"), "{err}");
}

#[test]
fn json_diagnostics_are_one_object_per_line() {
    let o = dsc(&["check", "tests/ui/several-mistakes.dsc", "--error-format=json"]);
    assert_eq!(o.status.code(), Some(1));
    let lines: Vec<serde_json::Value> =
        stderr(&o).lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    assert_eq!(lines.len(), 3);
    let first = &lines[0];
    assert_eq!(first["severity"], "error");
    assert_eq!(first["code"], "E0007");
    assert_eq!(first["file"], "tests/ui/several-mistakes.dsc");
    assert_eq!((first["line"].as_u64(), first["column"].as_u64()), (Some(5), Some(15)));
    assert!(lines.iter().all(|d| d["message"].is_string() && d["labels"].is_array()));
}

#[test]
fn hostile_inputs_are_rejected_with_located_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        p.to_str().expect("utf-8 path").to_string()
    };
    let err = dsc_rejects(&["check", &write("empty.dsc", b"")]);
    assert!(err.contains("the spec is empty"), "{err}");
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let err = dsc_rejects(&["check", &write("garbage.dsc", &garbage)]);
    assert!(err.contains("not UTF-8"), "{err}");
    let err = dsc_rejects(&["check", &write("nul.dsc", b"model {\0}")]);
    assert!(err.contains("E0001"), "{err}");
    let huge = "model { name = \"x\" }\n".repeat(10 * 1024 * 1024 / 21);
    let err = dsc_rejects(&["check", &write("huge.dsc", huge.as_bytes())]);
    assert!(err.contains("limited to"), "{err}");
    let err = dsc_rejects(&["check", dir.path().to_str().expect("utf-8 path")]);
    assert!(err.contains("is a directory"), "{err}");
    let err = dsc_rejects(&["info", &dir.path().join("missing.dsc").to_string_lossy()]);
    assert!(err.contains("cannot read"), "{err}");
    let err = dsc_rejects(&["check", &write("overflow.dsc", b"model { vocab = 184467440737095516160 }")]);
    assert!(err.contains("too large"), "{err}");
}

#[test]
fn compile_writes_its_output_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("spec.json");
    dsc_ok(&["compile", "models/deepseek-v3-tiny.dsc", "--emit=spec", "-o", out.to_str().expect("utf-8 path")]);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("written")).expect("JSON");
    assert_eq!(written["model"]["name"], "deepseek-v3-tiny");
}

#[test]
fn training_graph_snapshots() {
    insta::assert_snapshot!("graph-deepseek-v3-tiny", dsc_ok(&["compile", &model("deepseek-v3-tiny"), "--emit=graph"]));
    for name in MODELS {
        let stats = dsc_ok(&["compile", &model(name), "--emit=graph-stats"]);
        insta::assert_snapshot!(format!("graph-stats-{name}"), stats);
        // The graph's parameters are exactly what `dsc info` counts (MTP included).
        let stats: serde_json::Value = serde_json::from_str(&stats).expect("JSON");
        let info = info_json(name);
        let expected = info["params"]["total"].as_u64().unwrap() + info["params"]["mtp"].as_u64().unwrap();
        assert_eq!(stats["params"].as_u64(), Some(expected), "{name}");
    }
}

#[test]
fn train_prints_a_line_per_step_and_writes_jsonl_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = dir.path().join("m.jsonl");
    let out = dsc_ok(&[
        "train",
        &model("deepseek-v3-tiny"),
        "--steps",
        "3",
        "--seed",
        "1",
        "--metrics",
        metrics.to_str().unwrap(),
    ]);
    assert_eq!(out.lines().filter(|l| l.starts_with("step ")).count(), 3, "{out}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .expect("metrics file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, m) in lines.iter().enumerate() {
        assert_eq!(m["step"].as_u64(), Some(i as u64 + 1));
        for key in [
            "loss",
            "mtp_loss",
            "balance_loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "expert_load_max",
            "expert_load_mean",
        ] {
            assert!(m[key].is_number(), "{key} missing in {m}");
        }
    }
}

#[test]
fn train_refuses_what_the_cpu_cannot_run() {
    let o = dsc(&["train", &model("deepseek-v3"), "--steps", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("the CPU backend trains models of up to"), "{}", stderr(&o));
    // A data folder that is not there: the error names it and how to make it.
    let o = dsc(&[
        "train",
        &model("deepseek-v3-tiny"),
        "--steps",
        "1",
        "--set",
        "train.data.sources=[files { path = \"data/nowhere\" }]",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("data/nowhere") && stderr(&o).contains("dsc data prepare"), "{}", stderr(&o));
}

#[test]
fn compile_writes_a_plan_that_inspect_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("plan");
    let plan_s = plan.to_str().expect("utf-8 path");
    // Kernels of an earlier plan in the same directory go; other files stay.
    for (folder, file) in [("ir", "gone.mlir"), ("kernels", "gone.ptx"), ("kernels", "notes.txt")] {
        std::fs::create_dir_all(plan.join(folder)).expect("folder");
        std::fs::write(plan.join(folder).join(file), "earlier").expect("file");
    }
    let o = dsc(&["compile", &model("deepseek-v3-tiny"), "-o", plan_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!plan.join("ir/gone.mlir").exists() && !plan.join("kernels/gone.ptx").exists());
    std::fs::remove_file(plan.join("kernels/notes.txt")).expect("other files stay");
    let summary: serde_json::Value =
        serde_json::from_str(&dsc_ok(&["inspect", plan_s, "--format", "json"])).expect("JSON");
    let s = &summary["summary"];
    let (fused, unfused) = (s["launches_per_step"].as_u64().unwrap(), s["launches_per_step_unfused"].as_u64().unwrap());
    assert!(fused * 2 < unfused, "fusion must cut launches by more than half: {fused} vs {unfused}");
    // The GPU memory of a step: the state (every parameter and the gradients of the learned
    // ones in f32, both moments of the learned ones in the policy's bf16, each parameter from a
    // 64-element boundary), the step's FP8 copies of the weights, and the larger of the
    // gradient calls' and the optimizer's arenas, or both where the GPU has room to keep them.
    let memory = &summary["gpu_memory"];
    let [state, weights, gradients, optimizer, peak, kept] =
        ["state", "weights", "gradients", "optimizer", "peak", "kept"].map(|k| memory[k].as_u64().expect("bytes"));
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plan.join("plan.json")).expect("plan.json")).expect("JSON");
    let params = stored["params"].as_array().expect("params");
    assert_eq!(stored["spec"]["precision"]["adam_moments"], "bf16");
    let bytes: u64 = params
        .iter()
        .map(|p| {
            let numel: u64 = p["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product();
            numel * if p["learned"] == true { 4 + 4 + 2 * 2 } else { 4 }
        })
        .sum();
    let padding = 12 * 63 * params.len() as u64;
    assert!(bytes <= state && state <= bytes + padding, "{memory}: {bytes} bytes");
    assert!(weights > 0, "{memory}");
    let function_peak = |name: &str| {
        summary["functions"].as_array().unwrap().iter().find(|f| f["name"] == name).unwrap()["memory"]["peak"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(optimizer, function_peak("adamw"));
    let called =
        ["model.grad", "layer0.fwd", "layer1.fwd", "layer0.bwd", "layer1.bwd"].map(function_peak).iter().sum::<u64>();
    assert_eq!(gradients, called, "the gradient function and its callees (not `model`, not `adamw`)");
    assert_eq!(peak, state + weights + gradients.max(optimizer));
    assert_eq!(kept, state + weights + gradients + optimizer);
    let text = dsc_ok(&["inspect", plan_s]);
    assert!(text.contains("rmsnorm") && text.contains("kernel launches") && text.contains("GPU memory"), "{text}");
    // Every generated kernel has MLIR, and (with MLIR built in) PTX for sm_90a.
    let mlir = std::fs::read_dir(plan.join("ir")).expect("ir/").count();
    assert!(mlir > 0);
    let ptx: Vec<_> = std::fs::read_dir(plan.join("kernels")).expect("kernels/").map(|e| e.unwrap().path()).collect();
    assert_eq!(ptx.len(), mlir);
    let name = ptx[0].file_stem().unwrap().to_str().unwrap().to_string();
    let one = dsc_ok(&["inspect", plan_s, "--kernel", &name]);
    assert!(one.contains("gpu.module") && one.contains(".target sm_90a"), "{one}");
    // The hand-scheduled kernels the plan carries (the tiny FP8 plan's expert GEMMs) are listed
    // and shown as well.
    let carried = text
        .lines()
        .find_map(|l| l.strip_prefix("hand-scheduled kernels carried for the backend: "))
        .and_then(|names| names.split(", ").next())
        .unwrap_or_else(|| panic!("no carried kernels listed:\n{text}"));
    let shown = dsc_ok(&["inspect", plan_s, "--kernel", carried]);
    assert!(shown.contains("hand-scheduled") && shown.contains("gpu.module"), "{shown}");
    // A reader that stops early (`| head`) ends the printing quietly, without a panic.
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsc"))
        .args(["inspect", plan_s, "--kernel", carried])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running dsc");
    let mut first = [0u8; 16];
    std::io::Read::read_exact(child.stdout.as_mut().expect("piped"), &mut first).expect("some output");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("dsc ends");
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(matches!(o.status.code(), Some(0 | 141)), "{:?}", o.status);
    let err = dsc_rejects_plain(&["inspect", dir.path().join("nothing").to_str().unwrap()]);
    assert!(err.contains("plan.json"), "{err}");
}

/// Rejected with exit 1 and a message (not a spec diagnostic).
fn dsc_rejects_plain(args: &[&str]) -> String {
    let o = dsc(args);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    stderr(&o)
}

#[test]
fn generated_ptx_assembles_with_ptxas() {
    let ptxas = std::env::var("DSC_PTXAS").ok().filter(|p| Path::new(p).exists()).or_else(|| {
        let found = Command::new("ptxas").arg("--version").output().is_ok_and(|o| o.status.success());
        found.then(|| "ptxas".to_string())
    });
    let Some(ptxas) = ptxas else {
        eprintln!(
            "skipped: no ptxas (run scripts/install-deps.sh and set DSC_PTXAS=target/tools/nvidia/cu13/bin/ptxas)"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("plan");
    dsc(&["compile", &model("deepseek-v3-bench"), "-o", plan.to_str().unwrap()]);
    let mut assembled = 0;
    for entry in std::fs::read_dir(plan.join("kernels")).expect("kernels/") {
        let path = entry.expect("entry").path();
        let out = Command::new(&ptxas)
            .args(["-arch=sm_90a", "-o"])
            .arg(dir.path().join("k.cubin"))
            .arg(&path)
            .output()
            .expect("running ptxas");
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        assembled += 1;
    }
    assert!(assembled > 100, "only {assembled} kernels");
    eprintln!("ptxas -arch=sm_90a assembled {assembled} generated kernels of the bench plan");
}

/// The tiny model as a two-rank DualPipe pipeline with four micro-batches per step.
const TINY_DUALPIPE: [&str; 6] = [
    "--set",
    "parallel.pipeline=dualpipe { stages = 2 }",
    "--set",
    "parallel.gpus_per_node=2",
    "--set",
    "train.micro_batch=2",
];

#[test]
fn simulate_prints_the_2048_gpu_table() {
    insta::assert_snapshot!("simulate-deepseek-v3", dsc_ok(&["simulate", &model("deepseek-v3")]));
}

#[test]
fn simulate_json_contract_and_timeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svg = dir.path().join("timeline.svg");
    let svg_path = svg.to_str().expect("utf-8 path");
    let json: serde_json::Value =
        serde_json::from_str(&dsc_ok(&["simulate", &model("deepseek-v3"), "--format", "json", "--timeline", svg_path]))
            .expect("simulate JSON");
    assert_eq!(json["schedule"], "dualpipe");
    assert_eq!(json["gpus"], 2048);
    assert_eq!(json["micro_batches"], 120);
    for key in [
        "step_seconds",
        "pipeline_seconds",
        "bubble_seconds",
        "bubble_total_seconds",
        "bubble_fraction",
        "gpu_hours_per_trillion_tokens",
    ] {
        assert!(json[key].as_f64().is_some_and(|v| v > 0.0), "{key}");
    }
    let ranks = json["ranks"].as_array().expect("ranks");
    assert_eq!(ranks.len(), 16);
    assert!(ranks.iter().all(|rank| rank["stages_held"] == 2 && rank["peak_micro_batches"] == 17));
    for key in ["ib_bytes", "nvlink_bytes", "seconds"] {
        assert!(json["dispatch"][key].is_f64() && json["combine"][key].is_f64(), "{key}");
    }
    let svg = std::fs::read_to_string(&svg).expect("the timeline was written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // Well-formed XML: every `&` starts an entity.
    assert!(svg.match_indices('&').all(|(i, _)| ["&amp;", "&lt;", "&gt;"].iter().any(|e| svg[i..].starts_with(e))));
    assert!((0..16).all(|rank| svg.contains(&format!(">rank {rank}</text>"))), "a row per rank");
    assert!(!svg.contains(">rank 16</text>"));
    // Every rank runs the forward and backward of all 120 micro-batches (both directions), some
    // as overlapped pairs: more than 120 boxes a rank.
    assert!(svg.matches("<rect").count() > 16 * 120, "{} boxes", svg.matches("<rect").count());
}

#[test]
fn emit_schedule_prints_each_ranks_instructions() {
    let mut args = vec!["compile", "models/deepseek-v3-tiny.dsc", "--emit=schedule"];
    args.extend_from_slice(&TINY_DUALPIPE);
    insta::assert_snapshot!("schedule-tiny-dualpipe", dsc_ok(&args));
}

#[test]
fn a_pipeline_its_batch_cannot_feed_is_a_located_error() {
    // Two micro-batches cannot fill DualPipe's two directions on two ranks.
    let args = [
        "simulate",
        "models/deepseek-v3-tiny.dsc",
        "--set",
        "parallel.pipeline=dualpipe { stages = 2 }",
        "--set",
        "parallel.gpus_per_node=2",
    ];
    let err = dsc_rejects(&args);
    assert!(
        err.contains("error[E0105]: DualPipe over 2 stages needs at least 4 micro-batches per step, every step has 2"),
        "{err}"
    );
    assert!(err.contains("--set parallel.pipeline") && err.contains("2 stages"), "{err}");
    let mut json_args = args.to_vec();
    json_args.push("--error-format=json");
    let o = dsc(&json_args);
    assert_eq!(o.status.code(), Some(1));
    let line: serde_json::Value = serde_json::from_str(stderr(&o).trim()).expect("one JSON diagnostic");
    assert_eq!(line["code"], "E0105");
    assert_eq!(line["file"], "models/deepseek-v3-tiny.dsc");
}

/// `dsc tune` measures on a GPU: a dsc without the `cuda` feature says so. `dsc inspect` says
/// whether a plan is tuned and what its tuning chose, and refuses a malformed tuning by name.
/// Recompiling a plan drops its tuning (the kernels it measured are gone).
#[test]
fn tune_needs_a_gpu_build_inspect_shows_the_tuning_and_a_recompile_drops_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("plan");
    let plan_s = plan.to_str().expect("utf-8 path");
    dsc_ok(&["compile", &model("deepseek-v3-tiny"), "-o", plan_s]);
    let err = dsc_rejects_plain(&["tune", plan_s]);
    assert!(err.contains("`cuda` feature") && err.contains("GPU"), "{err}");
    let text = dsc_ok(&["inspect", plan_s]);
    assert!(text.contains("untuned: ") && text.contains("`dsc tune DIR`"), "{text}");
    // A tuning is shown by `dsc inspect`, a malformed one refused by name.
    let tuning = plan.join("tuning.json");
    let measured = |candidate: &str| serde_json::json!({"candidate": candidate, "micros": 10.0, "error": 0.0});
    let gemm = |kernel: &str, chosen: &str| serde_json::json!({"kernel": kernel, "shape": [256, 128, 256, 4], "measured": [measured("cublaslt"), measured(chosen)], "chosen": chosen});
    let tuned = serde_json::json!({"gpu": "Test GPU", "gemms": [
        gemm("a", "fp8_grouped_m128_n192_s4"), gemm("b", "fp8_grouped_m128_n192_s4"), gemm("c", "cublaslt")]});
    std::fs::write(&tuning, tuned.to_string()).expect("a tuning");
    let text = dsc_ok(&["inspect", plan_s]);
    assert!(
        text.contains("tuned on Test GPU (`dsc tune`): 3 GEMM kernels on cublaslt ×1, fp8_grouped_m128_n192_s4 ×2"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&dsc_ok(&["inspect", plan_s, "--format", "json"])).expect("JSON");
    assert_eq!(json["tuning"]["gpu"], "Test GPU");
    std::fs::write(&tuning, "{}").expect("a tuning");
    let err = dsc_rejects_plain(&["inspect", plan_s]);
    assert!(err.contains("tuning.json") && err.contains("dsc tune"), "{err}");
    dsc_ok(&["compile", &model("deepseek-v3-tiny"), "-o", plan_s]);
    assert!(!tuning.exists(), "the recompiled plan keeps no tuning");
    let o = dsc(&["tune", "--repeats", "0", plan_s]);
    assert!(o.status.code() == Some(2) && stderr(&o).contains("--repeats"), "{}", stderr(&o));
}
