"""What rank buys: relative Frobenius error of each alignment vector truncated per tensor to rank k (the SVD that
`export_lora` uses), and PEFT's `set_scale` on an exported adapter as a knob, against `Knobs` at the same λ.

    python bench/lora_rank.py [--out DIR]     # tiny demo models from the cache if trained, else random ones (~1 min)

Relative error = ‖AV − AV_k‖_F / ‖AV‖_F over all tensors, 1-D tensors kept exact (they travel in modules_to_save).
The set_scale gap is the largest |logit| difference on random token ids, with and without the vector's 1-D tensors
(PEFT's set_scale scales LoRA layers only, not modules_to_save).
"""
from __future__ import annotations
import argparse, copy, json, math, tempfile, warnings
from pathlib import Path

import torch

from av_nbdev.data import load_splits
from av_nbdev.judge import preference_accuracy
from av_nbdev.knobs import Knobs
from av_nbdev.sweep import sample_records
from av_nbdev.models import cache_dir, load_model, random_llama, nudged
from av_nbdev.vectors import AlignmentVector, export_lora, svd_factors

RANKS = (1, 2, 4, 8, 16, 32, 64, 128)


def tiny_models()->tuple[Path|None, dict]:
    "The cached tiny base and its DPO models ({domain: folder}), newest cache version; (None, {}) when not trained."
    for version in sorted((cache_dir()/"tiny").glob("v*"), reverse=True):
        bases = sorted(p for p in version.glob("base-*") if p.is_dir())
        dpo = {p.name.split("-")[1]: p for p in sorted(version.glob("dpo-*-expert-*")) if p.is_dir() and (p/"config.json").exists()}
        if bases and dpo: return bases[0], dpo
    return None, {}


def rank_errors(av:AlignmentVector, ranks=RANKS)->dict[int, float]:
    "Relative Frobenius error of `av` with every 2-D tensor truncated to rank k, for each k."
    total, tails = 0.0, {k: 0.0 for k in ranks}
    for n in av.names():
        t = av.factors(n) or av[n]
        if len(t.shape) != 2: total += float(t.float().square().sum()); continue
        S2 = svd_factors(t)[1].double() ** 2
        total += float(S2.sum())
        for k in ranks: tails[k] += float(S2[k:].sum())
    return {k: math.sqrt(tails[k] / total) for k in ranks}


def set_scale_gap(base, av:AlignmentVector, lams, work:Path)->dict:
    "Max |logit| gap between PEFT set_scale(λ) on the exported full-rank adapter and Knobs at λ (all tensors / 2-D only)."
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    ids = torch.randint(0, base.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    flat = AlignmentVector({n: av.tensors[n] for n in av.names() if len(av.shape(n)) == 2}, av.meta)
    out = {}
    for label, vec in (("all tensors", av), ("2-D tensors only", flat)):
        folder = work/f"adapter-{label.split()[0]}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_lora(vec, folder, base=base)
            peft = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        knobs = Knobs(copy.deepcopy(base), {"v": vec})
        gaps = {}
        for lam in lams:
            for m in peft.modules():
                if isinstance(m, LoraLayer): m.set_scale("default", lam)
            with torch.no_grad():
                a = peft(ids).logits
                knobs.set(v=lam); b = knobs.model(ids).logits
            gaps[lam] = float((a - b).abs().max())
        out[label] = {"n_1d": len(av.names()) - len(flat.names()), "gaps": gaps}
    return out


def shares_by_rank(base, tok, vectors:dict, lams:dict, ranks=(4, 16, 64), per_domain:int=30)->dict:
    "Expert share (likelihood) on each vector's own domain at the knob setting `lams[d]`, full vector against rank k."
    test = sample_records(load_splits()["test"], per_domain)
    out = {}
    for d, av in vectors.items():
        recs = [r for r in test if r["domain"] == d]
        row = {}
        for k in (None, *ranks):
            v = av if k is None else av.factorize(rank=k)
            with Knobs(base, {d: v}).using(**{d: lams[d]}) as kn:
                row["full" if k is None else k] = preference_accuracy(kn.model, tok, recs)["expert"]
        out[d] = {"lam": lams[d], "expert_share": row}
    return out


def plot(errors:dict, path:Path):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, errs in errors.items(): ax.plot(list(errs), list(errs.values()), marker="o", label=name)
    ax.set_xscale("log", base=2); ax.set_xlabel("rank per tensor"); ax.set_ylabel("relative Frobenius error")
    ax.set_ylim(0, 1.02); ax.grid(alpha=0.3); ax.legend(); fig.tight_layout(); fig.savefig(path, dpi=120); plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/av_bench", help="folder for lora_rank.json and lora_rank.png")
    args = ap.parse_args()
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    base_dir, dpo = tiny_models()
    if base_dir is not None:
        source = f"tiny demo models ({base_dir.parent})"
        base = load_model(base_dir)[0]
        vectors = {d: AlignmentVector.extract(base_dir, p, domain=d) for d, p in dpo.items()}
    else:
        source = "random Llama, nudged (no tiny cache)"
        base = random_llama(0)
        vectors = {d: AlignmentVector.extract(base, nudged(base, i + 1)) for i, d in enumerate(("medical", "legal", "financial"))}
    base = base.float().eval()
    errors = {d: rank_errors(v) for d, v in vectors.items()}
    with tempfile.TemporaryDirectory() as tmp:
        first = next(iter(vectors))
        gap = set_scale_gap(base, vectors[first], (0.0, 0.5, 1.0, 2.0), Path(tmp))
    result = {"source": source, "relative_error": errors, "set_scale_vs_knobs": {first: gap}}
    if base_dir is not None:  # the demo's setting: each knob at 1.5, where the tiny vectors' expert share is high
        result["expert_share_by_rank"] = shares_by_rank(base, load_model(base_dir)[1], vectors, {d: 1.5 for d in vectors})
    (out/"lora_rank.json").write_text(json.dumps(result, indent=1))
    plot(errors, out/"lora_rank.png")
    print(f"source: {source}")
    print("relative Frobenius error per rank: " + " ".join(f"{k:>6}" for k in RANKS))
    for d, e in errors.items(): print(f"  {d:10}" + " ".join(f"{e[k]:6.3f}" for k in RANKS))
    for label, g in gap.items():
        print(f"set_scale vs Knobs ({first}, {label}; {g['n_1d']} 1-D tensors in the vector): max |logit gap| "
              + ", ".join(f"λ={lam:g}: {v:.2e}" for lam, v in g["gaps"].items()))
    for d, r in result.get("expert_share_by_rank", {}).items():
        print(f"expert share at λ={r['lam']:g} on {d}: " + ", ".join(f"rank {k}: {v:.2f}" for k, v in r["expert_share"].items()))
    print(f"wrote {out/'lora_rank.json'}, {out/'lora_rank.png'}")


if __name__ == "__main__":
    main()
