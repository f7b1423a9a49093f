#!/usr/bin/env python3
"""Checks dsc's Hugging Face export against `transformers` itself: dsc's exported tiny
checkpoint is loaded as a DeepseekV3ForCausalLM (f32, eager attention) and its logits on fixed
token rows are compared with dsc's own forward pass (`dsc forward`, f64) on the same rows. The
relative error ||hf - dsc|| / ||dsc|| must be below 1e-4.

Two steps, because the machine with `transformers` need not have a Rust toolchain:

  1. Where dsc builds (no torch needed):
       cargo build --release
       python3 tests/device/hf_parity.py --prepare target/hf-parity
     For two cases, the tiny model as it is and with YaRN active (`rope_scaling` in the
     config), this trains it for 20 steps (so the routing biases are not zero), exports it
     (`dsc export --hf`), writes token rows and dsc's logits for them.
  2. Where torch, transformers (4.5x or 5.x), safetensors and numpy are installed:
       python3 tests/device/hf_parity.py target/hf-parity
     Prints `PASS` or `FAIL` with the measured error; exits 1 on FAIL.

`--prepare` uses the dsc binary named by $DSC, else the newer of target/release/dsc and
target/debug/dsc.
"""
import json
import os
import subprocess
import sys

ROWS, SEQ, SEED = 2, 24, 1234
# (case, extra `dsc train` arguments)
CASES = [
    ("plain", []),
    ("yarn", ["--set", "model.attention.yarn={ factor = 4, original_seq = 16, beta_fast = 4, beta_slow = 1 }"]),
]
BOUND = 1e-4


def dsc_binary():
    if os.environ.get("DSC"):
        return os.environ["DSC"]
    built = [p for p in ["target/release/dsc", "target/debug/dsc"] if os.path.exists(p)]
    if not built:
        sys.exit("no dsc binary: build it with `cargo build --release` or set $DSC")
    return max(built, key=os.path.getmtime)  # the most recently built


def prepare(root):
    for case, extra in CASES:
        prepare_case(os.path.join(root, case), extra)
    print(f"prepared {root}: now run `python3 tests/device/hf_parity.py {root}` where transformers is installed")


def prepare_case(out, extra):
    dsc = dsc_binary()
    run = os.path.join(out, "run")
    os.makedirs(out, exist_ok=True)

    def call(*args):
        print("$ dsc " + " ".join(args), flush=True)
        subprocess.run([dsc, *args], check=True)

    call("train", "models/deepseek-v3-tiny.dsc", "--steps", "20", "--set", "train.seq_len=32", *extra,
         "--checkpoint-dir", run)
    call("export", run, "--hf", os.path.join(out, "hf"))
    # Fixed pseudo-random rows over the whole vocabulary (a 64-bit LCG: no numpy needed here).
    vocab = json.load(open(os.path.join(out, "hf", "config.json")))["vocab_size"]
    state, rows = SEED, []
    for _ in range(ROWS):
        row = []
        for _ in range(SEQ):
            state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
            row.append((state >> 33) % vocab)
        rows.append(row)
    tokens = os.path.join(out, "tokens.json")
    json.dump(rows, open(tokens, "w"))
    call("forward", run, "--tokens", tokens, "-o", os.path.join(out, "dsc_logits.json"))


def fill_fused_experts(model, folder, missing):
    """transformers versions that fuse the routed experts into 3-D parameters convert per-expert
    checkpoints when loading; where one did not, build those parameters from the file."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(folder, "model.safetensors"))
    params = dict(model.named_parameters())
    filled = []
    for key in list(missing):
        prefix, _, name = key.rpartition(".experts.")
        if not prefix or name not in ("gate_up_proj", "down_proj") or key not in params:
            continue
        target = params[key]
        experts = target.shape[0]
        per = []
        for e in range(experts):
            base = f"{prefix}.experts.{e}."
            if name == "gate_up_proj":
                per.append(torch.cat([tensors[base + "gate_proj.weight"], tensors[base + "up_proj.weight"]], 0))
            else:
                per.append(tensors[base + "down_proj.weight"])
        stacked = torch.stack(per)
        if stacked.shape != target.shape:
            stacked = stacked.transpose(1, 2)
        with torch.no_grad():
            target.copy_(stacked)
        filled.append(key)
    return [k for k in missing if k not in filled], filled


def check(root):
    results = [check_case(case, os.path.join(root, case)) for case, _ in CASES]
    sys.exit(0 if all(results) else 1)


def check_case(case, out):
    """Prints the case's PASS/FAIL line; returns whether it passed."""
    import numpy as np
    import torch
    import transformers
    from transformers import DeepseekV3ForCausalLM

    folder = os.path.join(out, "hf")
    tokens = json.load(open(os.path.join(out, "tokens.json")))
    reference = json.load(open(os.path.join(out, "dsc_logits.json")))
    dsc = np.asarray(reference["logits"], dtype=np.float64).reshape(reference["shape"])
    kwargs = dict(attn_implementation="eager", output_loading_info=True)
    try:
        model, info = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except TypeError:
        model, info = DeepseekV3ForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, **kwargs)
    missing = list(info.get("missing_keys", []))
    missing, filled = fill_fused_experts(model, folder, missing)
    unexpected = [k for k in info.get("unexpected_keys", []) if ".layers." not in k or not k.startswith(
        f"model.layers.{model.config.num_hidden_layers}.")]
    print(f"[{case}] transformers {transformers.__version__}, torch {torch.__version__}")
    if filled:
        print(f"note: this transformers did not convert {len(filled)} fused expert parameters; built from the file")
    if missing or unexpected or info.get("mismatched_keys"):
        print(f"FAIL [{case}]: loading the export: missing {missing}, unexpected {unexpected}, "
              f"mismatched {info.get('mismatched_keys')}")
        return False
    model.eval()
    with torch.no_grad():
        hf = model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.double().numpy()
    if hf.shape != dsc.shape:
        print(f"FAIL [{case}]: logits of shape {hf.shape}, dsc's are {dsc.shape}")
        return False
    error = float(np.linalg.norm(hf - dsc) / np.linalg.norm(dsc))
    worst = float(np.abs(hf - dsc).max())
    verdict = "PASS" if error < BOUND else "FAIL"
    print(f"{verdict} [{case}]: relative error of transformers' logits vs dsc's {error:.3e} (bound {BOUND:g}); "
          f"max abs difference {worst:.3e}; {hf.shape[0]}x{hf.shape[1]} tokens, vocab {hf.shape[2]}")
    return verdict == "PASS"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--prepare":
        prepare(sys.argv[2])
    elif len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
        check(sys.argv[1])
    else:
        sys.exit(__doc__)
