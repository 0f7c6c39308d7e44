"""Per-request knobs in one batch: tokens per second for 16 requests with 16 different knob settings.

    python bench/batch_knobs.py cpu                 # the tiny model's shape and SmolLM2-135M's shape, fp32, on CPU
    python bench/batch_knobs.py cpu --models tiny   # one of them
    python bench/batch_knobs.py gpu                 # CUDA, bf16: SmolLM2-135M's shape

Every request is one prompt of `--tokens` tokens; the work timed is the forward pass over all 16 (a prefill).
Contenders, all measured in the same run (medians, and fastest rounds, of `--repeats` interleaved rounds, after a
correctness pass that doubles as a warm-up):

- `ceiling`: the base model's plain batched forward, no knobs at all;
- `batch_knobs_factored`: `BatchKnobs` with low-rank vectors (ΔW = B·A, rank `--rank` per knob and module);
- `batch_knobs_dense`: `BatchKnobs` with the same vectors multiplied out;
- `knobs_per_request`: what a user does without per-row knobs: `Knobs.set(**λ_i)` then a forward of request i alone,
  for i = 1..16 (then `reset`), with the same dense vectors;
- `peft_mixed_batch`: PEFT's mixed-adapter batch (`adapter_names=`): one LoRA adapter per request, pre-scaled
  (adapter i = the knobs' factors concatenated, B scaled by λ_i per column: rank = knobs × `--rank`).

The vectors are random low-rank differences on the attention and MLP projections (what a LoRA adapter touches, so
PEFT can express them). The tiny model is the trained one from the cache when present, else a random model of its
shape. Before timing, each contender's logits are checked against `knobs_per_request` (they must agree).
Ratios are tokens/s over `knobs_per_request`'s and over the ceiling's.
"""
from __future__ import annotations
import argparse, copy, json, os, random, statistics, time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from av_nbdev.knobs import BatchKnobs, Knobs
from av_nbdev.models import TinyConfig, cache_dir
from av_nbdev.vectors import AlignmentVector, LowRank

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KNOBS = ("medical", "legal", "financial")
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def random_model(shape:dict, dtype, device, seed=0):
    "A Llama of `shape` with N(0, 0.02) weights and unit norms."
    torch.manual_seed(seed)
    with torch.device(device): m = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=512))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n: p.fill_(1.0)
            else: p.normal_(0, 0.02)
    return m.to(dtype).eval()


def tiny_model(dtype, device):
    "The trained tiny base from the cache when present, else a random model of `TinyConfig`'s shape."
    found = sorted(cache_dir().glob("tiny/v*/base-*/config.json"))
    if found:
        return LlamaForCausalLM.from_pretrained(found[-1].parent, dtype=dtype).to(device).eval(), str(found[-1].parent)
    c = TinyConfig()
    shape = dict(vocab_size=1024, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                 num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                 num_key_value_heads=c.num_key_value_heads, tie_word_embeddings=c.tie_word_embeddings)
    return random_model(shape, dtype, device), "random, TinyConfig's shape (no trained tiny model in the cache)"


def low_rank_vectors(model, rank:int, scale:float=0.02, seed:int=0)->dict[str, AlignmentVector]:
    "One factored vector per knob: ΔW = B·A of rank `rank` on every projection, ‖ΔW‖ about `scale`·‖W‖."
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in KNOBS:
        t = {}
        for n, p in model.named_parameters():
            if n.endswith(".weight") and n.split(".")[-2] in TARGETS:
                o, i = p.shape
                s = (scale * 0.02 / rank ** 0.5) ** 0.5  # entries of B·A then have std scale·0.02, as W's are 0.02
                A, B = torch.randn(rank, i, generator=g) * s, torch.randn(o, rank, generator=g) * s
                t[n] = LowRank(A.to(p.dtype).to(p.device), B.to(p.dtype).to(p.device))
        out[k] = AlignmentVector(t, {"domain": k})
    return out


def densified(vectors:dict)->dict[str, AlignmentVector]:
    "The same vectors with every tensor multiplied out."
    return {k: AlignmentVector({n: av[n] for n in av.names()}, av.meta) for k, av in vectors.items()}


def settings(n:int, seed:int=0)->list[dict]:
    "`n` different knob settings: each request turns one to three knobs to its own values."
    rng = random.Random(seed)
    return [{k: round(rng.uniform(-1.5, 2.0), 3) for k in rng.sample(KNOBS, rng.choice([1, 2, 3]))} for _ in range(n)]


def peft_mixed(model, vectors:dict, requests:list[dict], rank:int):
    "A PEFT model (on a copy of `model`) with one pre-scaled LoRA adapter per request, and its adapter names."
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=rank * len(KNOBS), lora_alpha=rank * len(KNOBS), target_modules=list(TARGETS),
                     init_lora_weights=False, lora_dropout=0.0)
    names = [f"request{i}" for i in range(len(requests))]
    pm = get_peft_model(copy.deepcopy(model), cfg, adapter_name=names[0])
    for a in names[1:]: pm.add_adapter(a, cfg)
    mods = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for n in vectors[KNOBS[0]].names():
            layer = mods[n.removesuffix(".weight")]
            for a, lam in zip(names, requests):
                fs = [vectors[k].factors(n) for k in KNOBS]
                layer.lora_A[a].weight.copy_(torch.cat([f.A for f in fs]))
                layer.lora_B[a].weight.copy_(torch.cat([f.B * lam.get(k, 0.0) for k, f in zip(KNOBS, fs)], dim=1))
    pm.eval()
    return pm, names


def contenders(model, vectors, dense, requests, ids, rank):
    "name -> a function running the 16 requests once and returning their last-position logits."
    bkf, bkd, kn = BatchKnobs(model, vectors, allow_transfer=True), BatchKnobs(model, dense, allow_transfer=True), \
        Knobs(model, dense, allow_transfer=True)
    pm, names = peft_mixed(model, vectors, requests, rank)
    def per_request():
        rows = []
        for i, lam in enumerate(requests):
            kn.set(**{k: lam.get(k, 0.0) for k in KNOBS}); rows.append(model(ids[i:i+1]).logits[:, -1])
        kn.reset()
        return torch.cat(rows)
    return {"ceiling": lambda: model(ids).logits[:, -1],
            "batch_knobs_factored": lambda: bkf(ids, lambdas=requests).logits[:, -1],
            "batch_knobs_dense": lambda: bkd(ids, lambdas=requests).logits[:, -1],
            "knobs_per_request": per_request,
            "peft_mixed_batch": lambda: pm(input_ids=ids, adapter_names=names).logits[:, -1]}


def bench(which:str, device:str, dtype, n_requests:int, tokens:int, rank:int, repeats:int)->dict:
    if which == "tiny": model, source = tiny_model(dtype, device)
    else: model, source = random_model(SMOLLM2, dtype, device), "random, SmolLM2-135M's shape"
    vectors = low_rank_vectors(model, rank)
    dense = densified(vectors)
    requests = settings(n_requests)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (n_requests, tokens), generator=g).to(device)
    runs = contenders(model, vectors, dense, requests, ids, rank)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        want = runs["knobs_per_request"]()
        gaps = {k: (f().float() - want.float()).abs().max().item() for k, f in runs.items() if k != "ceiling"}
        spread = (runs["ceiling"]().float() - want.float()).abs().max().item()
        times = {k: [] for k in runs}
        for _ in range(repeats):
            for k, f in runs.items():
                sync(); t = time.perf_counter(); f(); sync(); times[k].append(time.perf_counter() - t)
    n_tok = n_requests * tokens
    tps = {k: n_tok / statistics.median(v) for k, v in times.items()}
    return {"model": which, "source": source, "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(dtype).removeprefix("torch."), "device": device, "requests": n_requests, "tokens_per_request": tokens,
            "rank_per_knob": rank, "knobs": list(KNOBS), "settings": requests,
            "max_logit_gap_vs_knobs_per_request": gaps, "max_logit_change_from_base": spread,
            "seconds": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()},
            "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
            "ratio_vs_knobs_per_request": {k: round(v / tps["knobs_per_request"], 2) for k, v in tps.items()},
            "ratio_vs_ceiling": {k: round(v / tps["ceiling"], 3) for k, v in tps.items()},
            # the fastest round of each: less exposed to other processes on a shared machine
            "ratio_of_fastest_vs_knobs_per_request": {k: round(min(times["knobs_per_request"]) / min(v), 2) for k, v in times.items()},
            "ratio_of_fastest_vs_ceiling": {k: round(min(times["ceiling"]) / min(v), 3) for k, v in times.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["cpu", "gpu"])
    ap.add_argument("--models", nargs="+", default=None, choices=["tiny", "smollm2"], help="default: tiny smollm2 (cpu), smollm2 (gpu)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--rank", type=int, default=16, help="rank of each knob's ΔW per module")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds; default 15 (tiny), 3 (smollm2)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gpu = a.part == "gpu"
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    models = a.models or (["smollm2"] if gpu else ["tiny", "smollm2"])
    out = {"torch": torch.__version__, "threads": a.threads, "cpu_count": os.cpu_count(),
           "device_name": torch.cuda.get_device_name() if gpu else "cpu",
           "runs": [bench(m, device, dtype, a.requests, a.tokens, a.rank, a.repeats or (15 if m == "tiny" else 3))
                    for m in models]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__": main()
