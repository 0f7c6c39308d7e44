"""Benchmarks: knob moves against a plain in-place add, and `av extract` / `av merge` against
mergekit on two random ~0.94B-parameter Llama checkpoints.

    python bench/knobs.py knobs                 # (a) ~270M-param model, fp32 and bf16 (~2 min, ~5 GB RAM)
    python bench/knobs.py files --work DIR      # (b) writes ~15 GB under DIR (not in the repo), ~10 min
    python bench/knobs.py all --work DIR [--mergekit PATH/TO/mergekit-yaml] [--keep]
    python bench/knobs.py gpu                   # CUDA: Llama-8B shapes in bf16, base on device and in pinned host memory;
                                                # GB/s against the device's nominal and measured (copy) bandwidth

Timings are medians over repeats; on a shared machine report the spread (min..max) with them.
"""
from __future__ import annotations
import argparse, json, os, re, shutil, statistics, subprocess, sys, time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from av_nbdev.knobs import Knobs
from av_nbdev.vectors import AlignmentVector

ROOT = Path(__file__).resolve().parents[1]
AV_BIN = Path(sys.executable).with_name("av")


def timed(fn, repeats):
    "Wall seconds of each of `repeats` calls of fn (after one warm-up)."
    fn(); out = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return out


def summary(xs): return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "n": len(xs)}


# ---------------------------------------------------------------- (a) knob move vs in-place add
SHAPES = {  # random Llamas (values don't matter for timing)
    "270m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=16),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),  # Llama-3-8B shapes
}


def random_llama(shape, dtype, device="cpu"):
    "A Llama of the given shapes with N(0, 0.02) weights, made without HF's (slow) init."
    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"): m = LlamaForCausalLM(cfg)
    m = m.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in m.parameters(): p.normal_(0, 0.02)
    return m


def bench_knob_move(dtype, shape="270m", device="cpu", base_on="device", repeats=15, flat=True):
    """One knob move (a one-vector rebuild: read base and vector, write the parameter) against plain in-place adds
    over the same bytes: `p.add_(av)` on the same tensors, and (with `flat`) one flat tensor of the same size, plus
    an out-of-place add over the same bytes. All interleaved in each repeat, so noise from other processes hits them
    alike; CUDA timings synchronise."""
    model = random_llama(shape, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    av = AlignmentVector({n: torch.randn(p.shape, dtype=dtype, device=device) * 1e-3
                          for n, p in model.named_parameters()}, {"domain": "bench"})
    knobs = Knobs(model, {"a": av}, allow_transfer=True, base_on=base_on)  # random vector: no fingerprint to check
    del av
    pairs = [(t.param, av_t) for t in knobs._targets for _, av_t in t.terms]
    lams = iter([0.5, 1.0] * 10_000)
    runs = {"knob_move": lambda: knobs.set(a=next(lams)),
            "inplace_add_same_tensors": lambda: [p.add_(a) for p, a in pairs]}
    if flat:
        fa, fb, fc = (torch.empty(n_params, dtype=dtype, device=device).normal_() for _ in range(3))
        runs["inplace_add_one_flat_tensor"] = lambda: fa.add_(fb)
        # the same three streams with a distinct destination (what a rebuild must do): shows the write-allocate cost
        runs["out_of_place_add_one_flat_tensor"] = lambda: torch.add(fb, fc, alpha=0.5, out=fa)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {k: [] for k in runs}
    with torch.no_grad():
        for f in runs.values(): f()
        for _ in range(repeats):
            for k, f in runs.items():
                sync(); t = time.perf_counter(); f(); sync(); times[k].append(time.perf_counter() - t)
    knobs.reset()
    out = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "device": device, "base_on": base_on,
           "params": n_params, "bytes_per_tensor_stream": n_params * dtype.itemsize,
           **{k: summary(v) for k, v in times.items()}}
    for base in [k for k in runs if k != "knob_move"]:
        out[f"ratio_vs_{base}"] = {"median": round(statistics.median(times[base]) / statistics.median(times["knob_move"]), 3),
                                   "min": round(min(times[base]) / min(times["knob_move"]), 3)}
    # every contender reads two streams and writes one: bytes the program asks to move, per second
    out["GB_per_s"] = {k: round(3 * out["bytes_per_tensor_stream"] / statistics.median(v) / 1e9, 1) for k, v in times.items()}
    return out


def device_bandwidth(gb:float=4.0, repeats:int=10)->dict:
    """The CUDA device's memory bandwidth: nominal (from its memory clock and bus width, when torch reports them) and
    measured (a plain device-to-device copy of `gb` GB: read once, write once), to set knob moves' GB/s against."""
    p = torch.cuda.get_device_properties(0)
    clock, bus = getattr(p, "memory_clock_rate", None), getattr(p, "memory_bus_width", None)  # kHz, bits
    a = torch.empty(int(gb * 1e9) // 2, dtype=torch.bfloat16, device="cuda"); b = torch.empty_like(a)
    b.copy_(a); ts = []
    for _ in range(repeats):
        torch.cuda.synchronize(); t = time.perf_counter(); b.copy_(a); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    del a, b; torch.cuda.empty_cache()
    return {"nominal_GB_per_s": round(2 * clock * 1e3 * bus / 8 / 1e9, 1) if clock and bus else None,
            "copy_GB_per_s": round(2 * gb / statistics.median(ts), 1)}


# ---------------------------------------------------------------- (b) files: extract / merge vs mergekit
BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
           num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, torch_dtype="float32")


def write_pair(work:Path, shard_bytes=1_000_000_000, seed=0):
    "Write base/ and aligned/ (= base + 1e-3·noise) as fp32 HF checkpoints in ~1 GB shards, one shard in memory."
    cfg = LlamaConfig(**BIG, architectures=["LlamaForCausalLM"])  # mergekit reads `architectures`
    dirs = {k: work/k for k in ("base", "aligned")}
    if all((d/"model.safetensors.index.json").exists() for d in dirs.values()):  # kept from an earlier --keep run
        return dirs, json.loads((dirs["base"]/"model.safetensors.index.json").read_text())["metadata"]["total_size"] // 4
    with torch.device("meta"): shapes = {n: t.shape for n, t in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    for d in dirs.values(): d.mkdir(parents=True, exist_ok=True); cfg.save_pretrained(d)
    shards, cur, size = [], {"base": {}, "aligned": {}}, 0
    def flush():
        nonlocal cur, size
        if not size: return
        name = f"model-{len(shards)+1:05d}.safetensors"
        for k in dirs: save_file(cur[k], dirs[k]/name, metadata={"format": "pt"})
        shards.append((name, list(cur["base"]))); cur, size = {"base": {}, "aligned": {}}, 0
    for n, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.02
        nbytes = t.numel() * 4
        if size and size + nbytes > shard_bytes: flush()
        cur["base"][n], cur["aligned"][n] = t, t + torch.randn(shape, generator=g) * 1e-3
        size += nbytes
    flush()
    total = sum(s.numel() for s in shapes.values()) * 4
    n_sh = len(shards)
    for d in dirs.values():
        wm = {}
        for i, (name, names) in enumerate(shards):
            new = f"model-{i+1:05d}-of-{n_sh:05d}.safetensors"
            (d/name).rename(d/new); wm.update({n: new for n in names})
        (d/"model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    return dirs, sum(s.numel() for s in shapes.values())


def run_timed(cmd, log:Path):
    """Run cmd under /usr/bin/time -v: wall seconds, peak RSS, exit code, and the seconds a `sync` right after it
    took (the writes it left unflushed: `av` fsyncs its output, mergekit does not). A `sync` before it (untimed)
    keeps one command's dirty pages from slowing the next."""
    subprocess.run(["sync"])
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    t = time.perf_counter(); subprocess.run(["sync"]); flush = time.perf_counter() - t
    log.write_text(f"$ {' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", r.stderr))
    return {"cmd": " ".join(map(str, cmd)), "wall_s": round(wall, 2), "sync_after_s": round(flush, 2), "cpu_s": round(cpu, 2), "exit": r.returncode,
            "peak_rss_GB": round(int(rss.group(1)) * 1024 / 1e9, 3) if rss else None}


def mergekit_config(work, base, aligned, lam=1.0):
    cfg = work/"task_arithmetic.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {aligned}\n"
                   f"    parameters:\n      weight: {lam}\ndtype: float32\n")
    return cfg


def bench_files(work:Path, mergekit:str|None, rounds=3, keep=False):
    """`av extract`, `av merge` (from that AV) and mergekit's task_arithmetic on the same files, `rounds` times
    interleaved (each run's output deleted first, so every round starts alike), then a knob move in memory."""
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter(); dirs, n_params = write_pair(work); gen_s = time.perf_counter() - t
    shard = max(p.stat().st_size for p in dirs["base"].glob("*.safetensors"))
    av, merged, mk_out = work/"av.safetensors", work/"merged", work/"mk-out"
    jobs = {"av_extract": ([AV_BIN, "extract", dirs["base"], dirs["aligned"], "-o", av, "--overwrite"], av),
            "av_merge": ([AV_BIN, "merge", dirs["base"], "--av", f"{av}=1.0", "-o", merged, "--overwrite"], merged),
            # the same vector stored in bf16: half the bytes to write
            "av_extract_bf16": ([AV_BIN, "extract", dirs["base"], dirs["aligned"], "-o", work/"av16.safetensors",
                                 "--dtype", "bfloat16", "--overwrite"], work/"av16.safetensors"),
            "av_merge_from_bf16": ([AV_BIN, "merge", dirs["base"], "--av", f"{work/'av16.safetensors'}=1.0", "-o", merged,
                                    "--overwrite"], merged)}
    if mergekit: jobs["mergekit"] = ([mergekit, mergekit_config(work, dirs["base"], dirs["aligned"]), mk_out], mk_out)
    runs = {k: [] for k in jobs}
    for r in range(rounds):
        for k, (cmd, out) in jobs.items():
            if out.is_dir(): shutil.rmtree(out, ignore_errors=True)  # folders go first; files are replaced by --overwrite
            runs[k].append(run_timed(cmd, work/f"{k}.{r}.log"))
            if runs[k][-1]["exit"] != 0: raise SystemExit(f"{k} failed, see {work}/{k}.{r}.log")
    res = {"params": n_params, "largest_shard_GB": round(shard / 1e9, 3), "peak_rss_goal_GB": round(shard / 1e9 + 1, 3),
           "write_checkpoints_s": round(gen_s, 1), "rounds": rounds, "commands": {k: runs[k][0]["cmd"] for k in runs}}
    for k, rs in runs.items():
        walls, synced = [x["wall_s"] for x in rs], [x["wall_s"] + x["sync_after_s"] for x in rs]
        res[k] = {"wall_s": summary(walls), "walls": walls, "wall_plus_sync_s": summary(synced),
                  "cpu_s": summary([x["cpu_s"] for x in rs]),
                  "peak_rss_GB_max": max(x["peak_rss_GB"] for x in rs)}
    med = {k: res[k]["wall_s"]["median_s"] for k in runs}
    durable = {k: res[k]["wall_plus_sync_s"]["median_s"] for k in runs}
    if mergekit:
        for name, m in (("", med), ("_durable", durable)):  # as returned / until the output is on disk
            res[f"merge_speedup_vs_mergekit{name}"] = round(m["mergekit"] / m["av_merge"], 2)
            res[f"mergekit_over_extract_plus_merge{name}"] = round(m["mergekit"] / (m["av_extract"] + m["av_merge"]), 2)
            res[f"mergekit_over_extract_plus_merge_bf16_vector{name}"] = round(
                m["mergekit"] / (m["av_extract_bf16"] + m["av_merge_from_bf16"]), 2)
    shutil.rmtree(merged, ignore_errors=True); shutil.rmtree(mk_out, ignore_errors=True)
    res["in_memory_knob_move"] = knob_move_on(dirs["base"], av)
    if mergekit: res["knob_move_speedup_vs_mergekit"] = round(med["mergekit"] / res["in_memory_knob_move"]["median_s"], 1)
    if not keep: shutil.rmtree(work, ignore_errors=True)
    return res


def knob_move_on(base_dir, av_path, repeats=5):
    """Time of one knob move on the loaded 0.94B model: fp32 (model + base + vector ≈ 11.3 GB) when that much
    memory is free, else bf16 (≈ 5.6 GB) — the dtype used is reported."""
    import psutil
    dtype = torch.float32 if psutil.virtual_memory().available > 14e9 else torch.bfloat16
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype)
    knobs = Knobs(model, {"a": AlignmentVector.load(av_path, lazy=True)})  # cast to the model's dtype as it is read
    lams = iter([0.5, 1.0] * 100)
    out = {"dtype": str(dtype).replace("torch.", ""), **summary(timed(lambda: knobs.set(a=next(lams)), repeats))}
    del knobs, model
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["knobs", "files", "all", "gpu"])
    ap.add_argument("--work", type=Path, default=Path("/work/scratch/bench"), help="scratch folder for (b), outside the repo")
    ap.add_argument("--mergekit", default=None, help="path to mergekit-yaml (mergekit 0.1.5, in its own venv)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the files of (b)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats of each command in (b)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = {"torch": torch.__version__, "threads": a.threads, "cpu_count": os.cpu_count()}
    if a.part in ("knobs", "all"):
        out["knob_move_270m"] = [bench_knob_move(torch.float32), bench_knob_move(torch.bfloat16)]
    if a.part == "gpu":  # 8B bf16: model + base + vector = 48 GB on the device; no flat baselines (memory)
        out["device_name"] = torch.cuda.get_device_name()
        out["bandwidth"] = device_bandwidth()
        out["knob_move_8b_cuda"] = [bench_knob_move(torch.bfloat16, "8b", "cuda", where, repeats=10, flat=False)
                                    for where in ("device", "cpu")]
        for r in out["knob_move_8b_cuda"]:
            r["knob_move_share_of_copy_bandwidth"] = round(r["GB_per_s"]["knob_move"] / out["bandwidth"]["copy_GB_per_s"], 3)
    if a.part in ("files", "all"): out["files_0p94b"] = bench_files(a.work, a.mergekit, a.rounds, a.keep)
    print(json.dumps(out, indent=1))


if __name__ == "__main__": main()
