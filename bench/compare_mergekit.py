"""Compare av_nbdev's merge methods with mergekit 0.1.5's on the same small checkpoints.

mergekit is not a dependency: install it in a scratch environment and point MERGEKIT_YAML at its CLI, e.g.

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 && /tmp/mk/bin/pip install mergekit==0.1.5
    MERGEKIT_YAML=/tmp/mk/bin/mergekit-yaml .venv/bin/python bench/compare_mergekit.py

Deterministic methods are compared entry by entry (max abs difference of every output tensor):
task_arithmetic vs linear, ties vs ties (normalize: false: we never normalise), dare_linear at density 1
vs dare. DARE's random drops cannot match another program's random numbers, so for density < 1 we compare
what they should share: the share of entries kept and the per-tensor L1 norm ratio (mergekit rescales to
the original L1 norm), and that both put every kept entry at the same value (the rescaled delta)."""
import json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from av_nbdev.compose import merge_checkpoint
from av_nbdev.tensorio import CheckpointReader
from av_nbdev.vectors import AlignmentVector

MERGEKIT = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml") or ""
DETERMINISTIC_TOL = 1e-5  # max abs difference allowed on the deterministic methods (fp32 summation order)
DARE_KEEP_TOL = 0.01      # kept-share gap allowed between two independent DARE masks (≥ 4.5 standard deviations on ~1e5 entries)
DARE_L1_TOL = 1e-3        # gap allowed in L1(merged delta) / L1(full delta): both rescale to the original L1


def make_models(d: Path, n_aligned=3):
    "A random tiny Llama base and aligned variants: dense nudges, sparse nudges, and an untouched tensor."
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(d / "base")
    for k in range(n_aligned):
        m = LlamaForCausalLM(cfg); m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name and k == 0: continue  # one model leaves the norms alone (omitted from its AV)
                noise = torch.randn_like(p) * 0.01 * (k + 1)
                if k == 2: noise *= torch.rand_like(p) < 0.3  # a sparse update
                p.add_(noise)
        m.save_pretrained(d / f"a{k}")
        AlignmentVector.extract_to(d / "base", d / f"a{k}", d / f"a{k}.safetensors")


def run_mergekit(d: Path, name: str, method: str, models, params=None, seed=None):
    cfg = {"merge_method": method, "base_model": str(d / "base"), "dtype": "float32",
           "models": [{"model": str(d / m), "parameters": p} for m, p in models]}
    if params: cfg["parameters"] = params
    (d / f"{name}.yml").write_text(json.dumps(cfg))  # JSON is YAML
    out = d / f"mk_{name}"
    cmd = [MERGEKIT, str(d / f"{name}.yml"), str(out), "--quiet", "--no-copy-tokenizer"]
    if seed is not None: cmd += ["--random-seed", str(seed)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return load_dir(out)


def load_dir(out: Path):
    r = CheckpointReader(out)
    return {n: r.get(n).clone() for n in r.names()}


def ours(d: Path, name: str, method: str, models, density=1.0, seed=0):
    merge_checkpoint(d / "base", [(d / f"{m}.safetensors", p["weight"]) for m, p in models], d / f"av_{name}",
                     method=method, density=density, seed=seed)
    return load_dir(d / f"av_{name}")


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), (set(a) ^ set(b))
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def dare_stats(merged: dict, base: dict, density: float):
    "Share of changed entries and mean per-tensor L1 ratio |merged-base|_1 / |delta|_1 (for one vector, λ=1)."
    kept, total, ratios = 0, 0, []
    for n, t in merged.items():
        dlt = t - base[n]
        if not bool((dlt != 0).any()): continue
        kept += int((dlt != 0).sum()); total += dlt.numel()
        ratios.append(float(dlt.abs().sum()))
    return kept / total, sum(ratios)


def main():
    if not (MERGEKIT and Path(MERGEKIT).exists()):
        print(f"mergekit-yaml not found ({MERGEKIT or 'not on PATH'}); set MERGEKIT_YAML", file=sys.stderr); return 2
    d = Path(tempfile.mkdtemp(prefix="av_mk_"))
    torch.set_num_threads(2)
    make_models(d)
    base = load_dir(d / "base")
    rows, dare_gaps = [], []
    w2 = [("a0", 0.7), ("a1", -0.4)]
    w3 = [("a0", 1.0), ("a1", 0.5), ("a2", -0.8)]
    cases = [  # (label, mergekit method, our method, [(model, weight)], density, mergekit global params)
        ("task_arithmetic 2 vectors", "task_arithmetic", "linear", w2, 1.0, None),
        ("task_arithmetic 3 vectors", "task_arithmetic", "linear", w3, 1.0, None),
        ("ties density 1.0, 3 vectors", "ties", "ties", w3, 1.0, {"normalize": False}),
        ("ties density 0.5, 2 vectors", "ties", "ties", w2, 0.5, {"normalize": False}),
        ("ties density 0.2, 3 vectors", "ties", "ties", w3, 0.2, {"normalize": False}),
        ("dare_linear density 1.0, 3 vectors", "dare_linear", "dare", w3, 1.0, None),
    ]
    for label, mk_method, our_method, models, density, params in cases:
        mp = [(m, {"weight": w, "density": density}) for m, w in models]
        name = label.replace(" ", "_").replace(",", "").replace(".", "")
        t = time.time(); mk = run_mergekit(d, name, mk_method, mp, params); mk_s = time.time() - t
        t = time.time(); av = ours(d, name, our_method, mp, density); av_s = time.time() - t
        diff = max_abs_diff(mk, av)
        rows.append((label, diff))
        print(f"{label:40s} max |mergekit - av_nbdev| = {diff:.3g}   (mergekit {mk_s:.1f} s, av_nbdev {av_s:.2f} s)")

    # DARE below density 1: random masks differ by construction; compare the statistics they share.
    for density in (0.5, 0.2):
        mp = [("a0", {"weight": 1.0, "density": density})]
        mk = run_mergekit(d, f"dare{density}", "dare_linear", mp, seed=0)
        av = ours(d, f"dare{density}", "dare", mp, density, seed=0)
        full = load_dir(d / "a0")
        l1_full = sum(float((full[n] - base[n]).abs().sum()) for n in base)
        (mk_keep, mk_l1), (av_keep, av_l1) = dare_stats(mk, base, density), dare_stats(av, base, density)
        print(f"dare_linear density {density}: kept share mergekit {mk_keep:.4f} / av_nbdev {av_keep:.4f}; "
              f"L1 of the merged delta / L1 of the full delta: mergekit {mk_l1 / l1_full:.6f} / av_nbdev {av_l1 / l1_full:.6f}")
        dare_gaps.append((abs(mk_keep - av_keep), abs(mk_l1 - av_l1) / l1_full))
    worst = max(r[1] for r in rows)
    worst_keep, worst_l1 = (max(g[i] for g in dare_gaps) for i in (0, 1))
    print(f"worst max abs difference over the deterministic cases: {worst:.3g} (allowed {DETERMINISTIC_TOL:g})")
    print(f"DARE density < 1, worst gaps: kept share {worst_keep:.4f} (allowed {DARE_KEEP_TOL:g}), "
          f"L1 ratio {worst_l1:.2g} (allowed {DARE_L1_TOL:g})")
    shutil.rmtree(d, ignore_errors=True)
    return 0 if worst < DETERMINISTIC_TOL and worst_keep < DARE_KEEP_TOL and worst_l1 < DARE_L1_TOL else 1


if __name__ == "__main__":
    sys.exit(main())
