"""Wall time and peak RSS of streaming extraction and merging on random Llama checkpoints.

    .venv/bin/python bench/stream_memory.py                      # ~0.2B params, fp32, 256 MB shards
    .venv/bin/python bench/stream_memory.py --hidden 2048 --layers 16 --inter 5504 --shard 1GB   # ~0.94B
    MERGEKIT_YAML=/path/to/mergekit-yaml .venv/bin/python bench/stream_memory.py --mergekit

Checkpoints are written tensor by tensor with random values (no model is ever built in memory). Each step
runs in a fresh Python process that samples its own RSS every 5 ms during the step and reports the growth
over the RSS it had before (imports done), plus its lifetime ru_maxrss. mergekit's number is its process
tree's ru_maxrss."""
import argparse, json, os, subprocess, sys, tempfile, time, shutil
from pathlib import Path

STEP = r"""
import resource, sys, time, json, torch
torch.set_num_threads(2)
from pathlib import Path
from av_nbdev.vectors import AlignmentVector
from av_nbdev.compose import merge_checkpoint
import threading
from av_nbdev.tensorio import rss_mb
d, step = Path(sys.argv[1]), sys.argv[2]
before, peak, done = rss_mb(), [0.0], threading.Event()
def poll():  # ru_maxrss would include import-time spikes; sample the RSS during the step instead
    while not done.is_set(): peak[0] = max(peak[0], rss_mb()); time.sleep(0.005)
th = threading.Thread(target=poll); th.start()
t = time.time()
if step == "extract": AlignmentVector.extract_to(d/"base", d/"aligned", d/"av.safetensors", max_shard_size=sys.argv[3])
elif step == "merge": merge_checkpoint(d/"base", [(d/"av.safetensors", 0.5)], d/"merged", max_shard_size=sys.argv[3])
s = time.time() - t; done.set(); th.join()
print(json.dumps({"s": s, "before_mb": before, "peak_mb": max(peak[0], rss_mb()),
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_checkpoint(out: Path, cfg, shard: str, seed: int, like: Path | None = None):
    "Random Llama-shaped weights (or `like` plus small noise), streamed to sharded safetensors."
    import torch
    from av_nbdev.tensorio import ShardWriter, CheckpointReader
    g = torch.Generator().manual_seed(seed)
    h, i, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for l in range(L):
        p = f"model.layers.{l}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                   p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    src = CheckpointReader(like) if like else None
    with ShardWriter(out, shard, {"format": "pt"}) as w:
        for n, s in shapes.items():
            t = src.get(n) + torch.randn(s, generator=g) * 1e-3 if src else torch.randn(s, generator=g) * 0.02
            w.add(n, t); del t
        (w.tmp / "config.json").write_text(json.dumps(cfg))


def run_step(d: Path, step: str, shard: str):
    out = subprocess.run([sys.executable, "-c", STEP, str(d), step, shard], capture_output=True, text=True)
    if out.returncode: raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_cmd(cmd):
    t = time.time()
    out = subprocess.run([sys.executable, "-c",
                          "import resource,subprocess,sys,json;r=subprocess.run(sys.argv[1:]);"
                          "print(json.dumps({'rc':r.returncode,'rss_mb':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024}))",
                          *cmd], capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1]); res["s"] = time.time() - t
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024); ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inter", type=int, default=2752); ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard", default="256MB"); ap.add_argument("--dir", default=None)
    ap.add_argument("--mergekit", action="store_true", help="also time mergekit-yaml task_arithmetic (MERGEKIT_YAML)")
    a = ap.parse_args()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
           "intermediate_size": a.inter, "num_hidden_layers": a.layers, "num_attention_heads": a.hidden // 64,
           "num_key_value_heads": a.hidden // 64, "vocab_size": a.vocab, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32"}
    d = Path(a.dir or tempfile.mkdtemp(prefix="av_bench_"))
    t = time.time()
    make_checkpoint(d / "base", cfg, a.shard, 0)
    make_checkpoint(d / "aligned", cfg, a.shard, 1, like=d / "base")
    from av_nbdev.tensorio import CheckpointReader
    r = CheckpointReader(d / "base")
    n_params = sum(i.nbytes for i in r.infos.values()) // 4
    largest = max(f.stat().st_size for f in r.files) / 2**20
    print(f"checkpoints: {n_params/1e9:.3f}B params fp32, {len(r.files)} shards, largest {largest:.0f} MB "
          f"(made in {time.time()-t:.0f} s)")
    for step in ("extract", "merge"):
        res = run_step(d, step, a.shard)
        print(f"av {step:8s}: {res['s']:6.1f} s, RSS {res['before_mb']:.0f} MB before -> peak {res['peak_mb']:.0f} MB "
              f"(+{res['peak_mb'] - res['before_mb']:.0f} MB; largest shard {largest:.0f} MB; process ru_maxrss {res['maxrss_mb']:.0f} MB)")
    if a.mergekit:
        mk = os.environ.get("MERGEKIT_YAML") or "/work/scratch/mk-venv/bin/mergekit-yaml"
        (d / "mk.yml").write_text(json.dumps({"merge_method": "task_arithmetic", "base_model": str(d / "base"), "dtype": "float32",
                                             "models": [{"model": str(d / "aligned"), "parameters": {"weight": 0.5}}]}))
        res = measure_cmd([mk, str(d / "mk.yml"), str(d / "mk_out"), "--quiet", "--no-copy-tokenizer"])
        print(f"mergekit task_arithmetic: {res['s']:6.1f} s, peak RSS {res['rss_mb']:6.0f} MB (rc {res['rc']})")
    if not a.dir: shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
