//! `dsc train` as a user runs it for days: checkpoints every N steps, keep-last-N, `--resume`
//! continuing bitwise exactly, damaged or mismatched checkpoints refused without touching
//! anything, non-finite steps skipped and a stop after too many, and SIGTERM ending the run
//! with a checkpoint and exit code 0. The tiny model runs with 16-token sequences so that each
//! run takes about a second.

mod common;

use common::{dsc, losses, path, SMALL};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn train(extra: &[&str]) -> Output {
    let mut args = vec!["train", "models/deepseek-v3-tiny.dsc"];
    args.extend(SMALL);
    args.extend(extra);
    dsc(&args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "dsc failed:\n{}", text(&o.stderr));
    o
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("dir") {
        let p = entry.expect("entry").path();
        if p.is_dir() {
            for (name, bytes) in snapshot(&p) {
                files.insert(format!("{}/{name}", p.file_name().unwrap().to_string_lossy()), bytes);
            }
        } else {
            files.insert(p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).expect("read"));
        }
    }
    files
}

#[test]
fn twenty_steps_straight_equal_ten_resumed_ten_bitwise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let straight = dir.path().join("straight.jsonl");
    ok(train(&["--steps", "20", "--metrics", path(&straight)]));
    let run = dir.path().join("run");
    let resumed = dir.path().join("resumed.jsonl");
    ok(train(&["--steps", "10", "--metrics", path(&resumed), "--checkpoint-dir", path(&run)]));
    // Resume from the run's directory alone: the spec comes from the checkpoint.
    let o = ok(dsc(&["train", "--resume", path(&run), "--steps", "20", "--metrics", path(&resumed)]));
    assert!(text(&o.stderr).contains("resuming from"), "{}", text(&o.stderr));
    let (a, b) = (losses(&straight), losses(&resumed));
    assert_eq!(a.len(), 20);
    assert_eq!(a, b, "losses differ after resuming");
    assert!(run.join("step-00000020/model.safetensors").is_file());
}

#[test]
fn two_data_parallel_ranks_resume_exactly_and_read_other_data_than_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let two = ["--set", "parallel.gpus_per_node=2", "--set", "parallel.data={ size = 2 }"];
    let (straight, resumed, single) =
        (dir.path().join("straight.jsonl"), dir.path().join("resumed.jsonl"), dir.path().join("single.jsonl"));
    let mut args = two.to_vec();
    args.extend(["--steps", "4", "--metrics", path(&straight)]);
    ok(train(&args));
    let run = dir.path().join("run");
    let mut args = two.to_vec();
    args.extend(["--steps", "2", "--metrics", path(&resumed), "--checkpoint-dir", path(&run)]);
    ok(train(&args));
    ok(dsc(&["train", "--resume", path(&run), "--steps", "4", "--metrics", path(&resumed)]));
    assert_eq!(losses(&straight), losses(&resumed));
    // Rank 1 reads its own stream: from the first step on, the batch differs from one rank's
    // (whose second micro-batch continues rank 0's stream).
    ok(train(&["--steps", "4", "--metrics", path(&single)]));
    assert_ne!(losses(&single)[0], losses(&straight)[0]);
}

/// `extra` on the plan PP 2 (DualPipe) × 4 replicas, the routed experts split over 2: 8 ranks,
/// 4 micro-batches each.
fn eight_ranks<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--set",
        "parallel.gpus_per_node=8",
        "--set",
        "parallel.pipeline=dualpipe { stages = 2 }",
        "--set",
        "parallel.data={ size = 4 }",
        "--set",
        "parallel.expert={ size = 2, max_nodes = 1 }",
        "--set",
        "train.batch=16",
        "--set",
        "train.micro_batch=1",
    ];
    args.extend(extra);
    args
}

/// `dsc compile` of the tiny model with `extra` into `dir/plan`; the plan's directory.
fn compiled(dir: &Path, extra: &[&str]) -> std::path::PathBuf {
    let plan = dir.join("plan");
    let mut compile = vec!["compile", "models/deepseek-v3-tiny.dsc", "-o", path(&plan)];
    compile.extend(SMALL);
    compile.extend(extra);
    ok(dsc(&compile));
    plan
}

/// `dsc train` of the tiny model with `extra`, as the `world` processes a launcher starts
/// (torchrun's variables, rank 0 listening on a free port of this machine); their outputs in
/// rank order.
fn launched(world: usize, extra: &[&str]) -> Vec<Output> {
    let mut args = vec!["train", "models/deepseek-v3-tiny.dsc"];
    args.extend(SMALL);
    args.extend(extra);
    launched_with(world, &args)
}

/// `dsc args` as the `world` processes a launcher starts; their outputs in rank order.
fn launched_with(world: usize, args: &[&str]) -> Vec<Output> {
    let children = spawn_launched(world, args);
    children.into_iter().map(|child| child.wait_with_output().expect("dsc ends")).collect()
}

/// Starts `dsc args` as the `world` processes a launcher starts, in rank order.
fn spawn_launched(world: usize, args: &[&str]) -> Vec<std::process::Child> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a port").local_addr().expect("address").port();
    (0..world)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_dsc"))
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .args(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting dsc")
        })
        .collect()
}

#[test]
fn a_parallel_plan_trains_on_thread_ranks_and_resumes_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (straight, resumed) = (dir.path().join("straight.jsonl"), dir.path().join("resumed.jsonl"));
    let o = ok(train(&eight_ranks(&["--steps", "2", "--metrics", path(&straight)])));
    assert!(
        text(&o.stderr).contains("training on 8 thread-ranks on the CPU: 2 pipeline stages (DualPipe)"),
        "{}",
        text(&o.stderr)
    );
    let run = dir.path().join("run");
    ok(train(&eight_ranks(&["--steps", "1", "--metrics", path(&resumed), "--checkpoint-dir", path(&run)])));
    ok(dsc(&["train", "--resume", path(&run), "--steps", "2", "--metrics", path(&resumed)]));
    let a = losses(&straight);
    assert_eq!(a.len(), 2);
    assert_eq!(a, losses(&resumed), "losses differ after resuming");
}

/// The same plan with its ranks as 8 processes over TCP (as torchrun starts them) trains to
/// the same bits as its thread-ranks in one process.
#[test]
fn a_parallel_plan_trains_on_launched_processes_like_on_thread_ranks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (threads, processes) = (dir.path().join("threads.jsonl"), dir.path().join("processes.jsonl"));
    ok(train(&eight_ranks(&["--steps", "2", "--metrics", path(&threads)])));
    let outputs = launched(8, &eight_ranks(&["--steps", "2", "--metrics", path(&processes)]));
    for (rank, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "rank {rank} failed:\n{}", text(&o.stderr));
        let says = format!("training on rank {rank} of 8 processes over TCP on the CPU: 2 pipeline stages (DualPipe)");
        assert!(text(&o.stderr).contains(&says), "rank {rank}:\n{}", text(&o.stderr));
        // Rank 0 alone prints the steps.
        let steps = text(&o.stdout).lines().filter(|line| line.starts_with("step")).count();
        assert_eq!(steps, if rank == 0 { 2 } else { 0 }, "rank {rank}:\n{}", text(&o.stdout));
    }
    let a = losses(&threads);
    assert_eq!(a.len(), 2);
    assert_eq!(a, losses(&processes), "the processes' losses differ from the threads'");
    // Rank 0 alone writes checkpoints; every rank resumes from them.
    let (run, resumed) = (dir.path().join("run"), dir.path().join("resumed.jsonl"));
    let first = eight_ranks(&["--steps", "1", "--metrics", path(&resumed), "--checkpoint-dir", path(&run)]);
    assert!(launched(8, &first).iter().all(|o| o.status.success()), "the first step's processes failed");
    let outputs = launched_with(8, &["train", "--resume", path(&run), "--steps", "2", "--metrics", path(&resumed)]);
    for (rank, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "rank {rank} failed to resume:\n{}", text(&o.stderr));
    }
    assert_eq!(a, losses(&resumed), "losses differ after resuming on processes");
}

/// The ranks of a pipeline with expert parallelism run the stage functions of a compiled plan
/// (on the CPU here; on the GPU where there is one) as they run the spec's stage graphs;
/// `--backend cuda` without a usable GPU is refused.
#[test]
fn a_parallel_plans_ranks_run_its_compiled_stages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = compiled(dir.path(), &eight_ranks(&[]));
    let (graphs, stages) = (dir.path().join("graphs.jsonl"), dir.path().join("stages.jsonl"));
    ok(train(&eight_ranks(&["--steps", "2", "--metrics", path(&graphs)])));
    let o = ok(train(&eight_ranks(&[
        "--steps",
        "2",
        "--plan",
        path(&plan),
        "--backend",
        "cpu",
        "--metrics",
        path(&stages),
    ])));
    let says = format!("training on 8 thread-ranks on the CPU (plan `{}`): 2 pipeline stages", plan.display());
    assert!(text(&o.stderr).contains(&says), "{}", text(&o.stderr));
    let (a, b) = (losses(&graphs), losses(&stages));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        let (x, y): (f64, f64) = (x.parse().expect("a loss"), y.parse().expect("a loss"));
        assert!((x - y).abs() <= 1e-5 * x.abs(), "the stage graphs' loss {x}, the plan's {y}");
    }
    let o = train(&eight_ranks(&["--steps", "1", "--plan", path(&plan), "--backend", "cuda"]));
    assert!(!o.status.success() && text(&o.stderr).to_lowercase().contains("cuda"), "{}", text(&o.stderr));
}

/// The step `dsc train` says it was interrupted at (`interrupted at step N…` on stderr).
fn stopped_at(stderr: &str) -> Option<u64> {
    let rest = stderr.split("interrupted at step ").nth(1)?;
    rest.split([':', '\n']).next()?.parse().ok()
}

/// A signal that reaches one process of a launched run stops all of them after the same step;
/// rank 0 saves the state gathered from all (the moments live in the ranks' ZeRO-1 shards),
/// and the run resumed on processes continues as if it had not stopped.
#[test]
fn a_signal_to_one_launched_process_stops_all_at_the_same_step_and_saves_their_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let (stopped, straight) = (dir.path().join("stopped.jsonl"), dir.path().join("straight.jsonl"));
    let mut args = vec!["train", "models/deepseek-v3-tiny.dsc"];
    args.extend(SMALL);
    args.extend(eight_ranks(&["--steps", "100000", "--metrics", path(&stopped), "--checkpoint-dir", path(&run)]));
    let mut children = spawn_launched(8, &args);
    let mut stdout = std::io::BufReader::new(children[0].stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("a step line");
    assert!(line.starts_with("step"), "{line}");
    let kill = Command::new("kill").args(["-TERM", &children[3].id().to_string()]).status().expect("kill");
    assert!(kill.success());
    let steps: Vec<u64> = children
        .into_iter()
        .enumerate()
        .map(|(rank, child)| {
            let o = child.wait_with_output().expect("dsc ends");
            let err = text(&o.stderr);
            assert_eq!(o.status.code(), Some(0), "rank {rank}:\n{err}");
            stopped_at(&err).unwrap_or_else(|| panic!("rank {rank} says where it stopped:\n{err}"))
        })
        .collect();
    assert!(steps.iter().all(|&s| s == steps[0]), "the processes stopped at steps {steps:?}");
    let target = (steps[0] + 2).to_string();
    let outputs = launched_with(8, &["train", "--resume", path(&run), "--steps", &target, "--metrics", path(&stopped)]);
    for (rank, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "rank {rank} failed to resume:\n{}", text(&o.stderr));
    }
    ok(train(&eight_ranks(&["--steps", &target, "--metrics", path(&straight)])));
    assert_eq!(losses(&straight), losses(&stopped), "the stopped and resumed run differs from the straight one");
}

/// A launcher that starts another number of processes than the plan has ranks is told how many
/// to start, before any process waits for another. (A peer that dies or never comes:
/// `comm::sockets`'s tests.)
#[test]
fn launched_ranks_fail_clearly() {
    let outputs = launched(2, &["--steps", "1"]);
    for o in &outputs {
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains("the spec's plan has 1 rank(s)") && err.contains("start 1"), "{err}");
    }
}

#[test]
fn checkpoints_every_n_steps_keep_the_newest_and_hold_the_hf_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    ok(train(&["--steps", "7", "--checkpoint-dir", path(&run), "--checkpoint-every", "2", "--keep", "2"]));
    let mut names: Vec<String> =
        std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    // Steps 2, 4, 6 and the final 7, of which the newest two stay.
    assert_eq!(names, ["step-00000006", "step-00000007"]);
    let step = run.join("step-00000007");
    for file in ["model.safetensors", "state.safetensors", "config.json", "spec.dsc", "manifest.json"] {
        assert!(step.join(file).is_file(), "{file} missing");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(step.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "deepseek_v3");
    assert_eq!(config["n_routed_experts"], 8);
    assert_eq!(config["first_k_dense_replace"], 1);
    assert_eq!(config["num_nextn_predict_layers"], 1);
    let model = std::fs::read(step.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(model[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&model[8..8 + header_len]).unwrap();
    for name in [
        "model.layers.1.mlp.experts.7.gate_proj.weight",
        "model.layers.2.mlp.gate.e_score_correction_bias",
        "model.layers.3.eh_proj.weight",
        "model.layers.3.embed_tokens.weight",
        "model.layers.3.shared_head.head.weight",
        "lm_head.weight",
    ] {
        assert!(header.get(name).is_some(), "{name} missing from model.safetensors");
    }
    assert_eq!(header["model.layers.1.mlp.experts.0.down_proj.weight"]["shape"], serde_json::json!([64, 32]));
    assert!(header.get("model.layers.1.mlp.experts.gate_proj.weight").is_none(), "stacked experts are split");
}

#[test]
fn damaged_or_mismatched_checkpoints_are_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    ok(train(&["--steps", "2", "--checkpoint-dir", path(&run)]));
    let step = run.join("step-00000002");
    let refused = |args: &[&str], expect: &[&str]| {
        let before = snapshot(&run);
        let o = dsc(args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}:\n{err}");
        assert!(!err.contains("panicked"), "{err}");
        for e in expect {
            assert!(err.contains(e), "`{e}` missing from:\n{err}");
        }
        assert_eq!(snapshot(&run), before, "a refused resume changed the checkpoint directory");
    };
    // Another spec.
    let mut args = vec!["train", "models/deepseek-v3-tiny.dsc", "--resume", path(&run), "--steps", "4"];
    args.extend(SMALL);
    args.extend(["--set", "model.hidden=32"]);
    refused(&args, &["another spec", "model.hidden"]);
    // A corrupt and a truncated file.
    let model = step.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[1000] ^= 0x40;
    std::fs::write(&model, &bytes).unwrap();
    refused(&["train", "--resume", path(&run), "--steps", "4"], &["model.safetensors", "corrupt", "older"]);
    bytes[1000] ^= 0x40;
    std::fs::write(&model, &bytes).unwrap();
    let state = step.join("state.safetensors");
    let full = std::fs::read(&state).unwrap();
    std::fs::write(&state, &full[..full.len() / 2]).unwrap();
    refused(&["train", "--resume", path(&run), "--steps", "4"], &["state.safetensors", "truncated"]);
    std::fs::write(&state, &full).unwrap();
    refused(&["train", "--resume", path(&dir.path().join("nothing")), "--steps", "4"], &["not a checkpoint directory"]);
    // Repaired, it resumes.
    ok(dsc(&["train", "--resume", path(&run), "--steps", "3"]));
}

#[test]
fn non_finite_steps_are_skipped_then_the_run_stops_with_a_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (run, metrics) = (dir.path().join("run"), dir.path().join("m.jsonl"));
    // An absurd learning rate: the first step makes the weights huge, the next ones overflow.
    let o = train(&[
        "--set",
        "train.lr=[constant { at = 1e30 }]",
        "--steps",
        "20",
        "--max-bad-steps",
        "3",
        "--checkpoint-dir",
        path(&run),
        "--metrics",
        path(&metrics),
    ]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("3 steps in a row had a non-finite loss or gradient"), "{err}");
    assert!(err.contains("skipped"), "{err}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&metrics).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let skipped: Vec<&serde_json::Value> = lines.iter().filter(|m| m["skipped"] == true).collect();
    assert_eq!(skipped.len(), 3, "{lines:?}");
    let last_good = lines.iter().rev().find(|m| m["skipped"] == false).expect("a good step")["step"].as_u64().unwrap();
    assert!(skipped.iter().all(|m| m["step"].as_u64() == Some(last_good)), "skipped steps do not count");
    assert!(run.join(format!("step-{last_good:08}/manifest.json")).is_file(), "{err}");
}

#[test]
fn sigterm_saves_a_checkpoint_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let mut args = vec!["train", "models/deepseek-v3-tiny.dsc"];
    args.extend(SMALL);
    args.extend(["--steps", "100000", "--checkpoint-dir", path(&run)]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsc"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dsc");
    // Wait for the first step line, then ask it to stop.
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("a step line");
    assert!(line.starts_with("step"), "{line}");
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(kill.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "dsc did not stop within a minute of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert_eq!(status.code(), Some(0), "{err}");
    let stopped = stopped_at(&err).unwrap_or_else(|| panic!("says where it stopped:\n{err}"));
    let target = (stopped + 1).to_string();
    let o = ok(dsc(&["train", "--resume", path(&run), "--steps", &target]));
    let resumed = text(&o.stderr);
    assert!(resumed.contains("resuming from"), "{resumed}");
}

#[test]
fn metrics_report_throughput_and_memory_and_plot_as_svg() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (metrics, svg) = (dir.path().join("m.jsonl"), dir.path().join("loss.svg"));
    ok(train(&["--steps", "3", "--metrics", path(&metrics)]));
    for line in std::fs::read_to_string(&metrics).unwrap().lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(m["flops_per_s"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["memory_bytes"].as_u64().unwrap() > 1 << 20, "{m}");
        assert!(m["mfu"].is_null(), "the CPU backend reports no MFU: {m}");
    }
    let o = ok(dsc(&["plot", path(&metrics), "-o", path(&svg)]));
    assert!(text(&o.stderr).contains("3 steps"));
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(drawn.contains("<svg") && drawn.contains("learning rate"), "{drawn}");
    let o = dsc(&["plot", path(&dir.path().join("none.jsonl")), "-o", path(&svg)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("none.jsonl"));
}

#[test]
fn the_ema_is_saved_resumed_exactly_and_exported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ema = ["--set", "precision.ema={ decay = 0.9 }"];
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    let mut args = ema.to_vec();
    args.extend(["--steps", "4", "--checkpoint-dir", path(&straight)]);
    ok(train(&args));
    let mut args = ema.to_vec();
    args.extend(["--steps", "2", "--checkpoint-dir", path(&split)]);
    ok(train(&args));
    ok(dsc(&["train", "--resume", path(&split), "--steps", "4"]));
    let (a, b, w) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("w"));
    ok(dsc(&["export", path(&straight), "--hf", path(&a), "--ema"]));
    ok(dsc(&["export", path(&split), "--hf", path(&b), "--ema"]));
    ok(dsc(&["export", path(&split), "--hf", path(&w)]));
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).expect("exported");
    assert_eq!(read(&a), read(&b), "the EMA after resuming differs");
    assert_ne!(read(&a), read(&w), "the EMA is not the weights");
    let run = dir.path().join("no-ema");
    ok(train(&["--steps", "1", "--checkpoint-dir", path(&run)]));
    let o = dsc(&["export", path(&run), "--hf", path(&dir.path().join("x")), "--ema"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("precision.ema"), "{}", text(&o.stderr));
}

#[test]
fn runs_do_not_mix_their_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    ok(train(&["--steps", "2", "--checkpoint-dir", path(&run), "--checkpoint-every", "1"]));
    let before = snapshot(&run);
    // A new run into the same directory.
    let o = train(&["--steps", "1", "--checkpoint-dir", path(&run)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("already holds checkpoints"), "{}", text(&o.stderr));
    // A branch from an older checkpoint into the same directory.
    let o = dsc(&["train", "--resume", path(&run.join("step-00000001")), "--steps", "3"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("newer than step 1"), "{}", text(&o.stderr));
    assert_eq!(snapshot(&run), before);
    // The branch goes elsewhere; the newest continues in place.
    let branch = dir.path().join("branch");
    ok(dsc(&[
        "train",
        "--resume",
        path(&run.join("step-00000001")),
        "--steps",
        "3",
        "--checkpoint-dir",
        path(&branch),
    ]));
    assert!(branch.join("step-00000003/manifest.json").is_file());
    ok(dsc(&["train", "--resume", path(&run), "--steps", "3"]));
    assert!(run.join("step-00000003/manifest.json").is_file());
}

#[test]
fn runs_killed_at_any_moment_resume_from_their_last_good_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let spawn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dsc"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dsc")
    };
    let every = ["--steps", "100000", "--checkpoint-every", "1", "--keep", "2"];
    let mut first = vec!["train", "models/deepseek-v3-tiny.dsc"];
    first.extend(SMALL);
    first.extend(every);
    first.extend(["--checkpoint-dir", path(&run)]);
    let mut child = spawn(&first);
    let started = Instant::now();
    while !run.join("step-00000002/manifest.json").is_file() {
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint within a minute");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().expect("kill");
    child.wait().expect("wait");
    // SIGKILL (no handler runs) at several moments of resumed runs' step/checkpoint cycle.
    let mut resume = vec!["train", "--resume", path(&run)];
    resume.extend(every);
    for delay_ms in [60u64, 190, 330, 470, 610] {
        let mut child = spawn(&resume);
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().expect("kill");
        child.wait().expect("wait");
    }
    // Whatever the kills left, the newest complete checkpoint verifies and training goes on.
    let newest = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
        .max()
        .expect("a checkpoint");
    let target = (newest + 1).to_string();
    let o = ok(dsc(&["train", "--resume", path(&run), "--steps", &target]));
    assert!(text(&o.stderr).contains("resuming from"), "{}", text(&o.stderr));
    assert!(run.join(format!("step-{:08}/manifest.json", newest + 1)).is_file());
}

/// `--plan DIR` trains a compiled plan's fused graph (on the CPU here: no GPU), with the same
/// losses as the spec's own graph (a fused plan trains bitwise like it); a plan of another
/// spec (the differing settings named), `--numerics exact` with a plan, `--backend cuda`
/// without one, and the GPU's flags on the CPU are refused with what to do instead.
#[test]
fn a_compiled_plan_trains_and_mismatches_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = compiled(dir.path(), &[]);
    let (graph, planned) = (dir.path().join("graph.jsonl"), dir.path().join("plan.jsonl"));
    ok(train(&["--steps", "3", "--metrics", path(&graph)]));
    let o = ok(train(&["--steps", "3", "--plan", path(&plan), "--backend", "cpu", "--metrics", path(&planned)]));
    assert!(text(&o.stderr).contains("on the CPU"), "{}", text(&o.stderr));
    assert_eq!(losses(&graph), losses(&planned), "the plan trains like the spec's graph");
    // Other data settings do not change the plan.
    let unpacked = ["--set", "train.data.packing=false", "--steps", "1", "--plan", path(&plan), "--backend", "cpu"];
    ok(train(&unpacked));
    let refused = |o: Output, what: &str| {
        assert!(!o.status.success() && text(&o.stderr).contains(what), "expected `{what}`:\n{}", text(&o.stderr));
    };
    refused(
        dsc(&["train", "models/deepseek-v3-tiny.dsc", "--plan", path(&plan)]),
        "compiled from another spec (or other `--set` values): `train.batch.sequences`, `train.micro_batch`, `train.seq_len` differ",
    );
    refused(train(&["--plan", path(&plan), "--numerics", "exact"]), "leave out `--numerics exact`");
    refused(train(&["--backend", "cuda"]), "give `--plan DIR`");
    refused(train(&["--profile"]), "`--profile` times the GPU's kernels");
    refused(train(&eight_ranks(&["--profile"])), "`--profile` times the GPU's kernels");
    refused(train(&["--no-cuda-graphs"]), "`--no-cuda-graphs` is for the GPU's kernels");
}

/// A process started by a launcher (torchrun's or SLURM's variables) trains a compiled plan on
/// its GPU over NCCL (or its rank of the plan on the CPU): what it needs is said before any
/// work, and malformed variables are named.
#[test]
fn launched_processes_say_what_they_need() {
    let launched = |vars: &[(&str, &str)], extra: &[&str]| {
        let mut args = vec!["train", "models/deepseek-v3-tiny.dsc"];
        args.extend(SMALL);
        args.extend(extra);
        Command::new(env!("CARGO_BIN_EXE_dsc"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(&args)
            .envs(vars.iter().copied())
            .output()
            .expect("running dsc")
    };
    let torchrun = [("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")];
    for (vars, extra, says) in [
        (&torchrun[..], &["--backend", "cuda"][..], "give `--plan DIR`"),
        (&[("RANK", "2"), ("WORLD_SIZE", "2")][..], &[][..], "`RANK=2` is not a rank of a world of `WORLD_SIZE=2`"),
        (&[("SLURM_NTASKS", "4")][..], &[][..], "`SLURM_NTASKS` is set but `SLURM_PROCID` is not"),
    ] {
        let o = launched(vars, extra);
        assert!(!o.status.success() && text(&o.stderr).contains(says), "expected `{says}`:\n{}", text(&o.stderr));
    }
}
