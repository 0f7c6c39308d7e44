"""Does removing what each domain's dial shares with the other domains' (`compose.orthogonalize_domains`) keep it in its own domain?

One set of two-vector dials (each domain's generic step, generic − base, and expert step, expert − generic) runs
through the dial study of `av demo --dial` (`demo.dial_study_stage`: every level's dial position chosen on the tuning
half, measured on the reporting half; the 27 targets set dial by dial; the probe–solve–verify search) as trained and
orthogonalized at each --amounts value. Orthogonalizing is training-free: each tensor of a domain's vectors minus its
projection on the span of the other domains' same tensors. One table, one row per domain and amount: the levels
reached on the reporting half, the leakage ratio on the mean level (avoidance 0, generic 1, expert 2), the in-domain
expert share at the expert setting, and the well-formed share there; the targets line beside it. Each row's leakage
is also given as a ratio of the as-trained (amount 0) row measured in the same run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/orthogonal.py                          # the tiny model's joint dials (`av demo --dial`)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/orthogonal.py --model smollm2 --per-domain 16 --amounts 0,1   # SmolLM2's chained dials (`nbs/11_real`), ~1.5 h on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/orthogonal.py --model smollm2 --per-domain 16 --amounts 0 --anchor-share 0.25  # the chain trained with anchors (its models' training printed too)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/orthogonal.py --model smollm2 --per-domain 16 --amounts 0 --anchor-share 0.25 --lr-scale 2  # and at twice the learning rates
    HF_HUB_OFFLINE=1 .venv/bin/python bench/orthogonal.py --model smollm2 --per-domain 16 --amounts 0 --joint-steps 16  # the chain, then 16 joint steps from it (and 48, 96)

Vectors and results are kept in --out/<hash of model, seed, anchor share and the dial checkpoints>/ (a rerun with the
same settings and models reads them; models trained again get a folder of their own).
"""
import argparse, json, time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch

from av_nbdev.core import short_hash
from av_nbdev.stages import records_hash, write_json
from av_nbdev.demo import DemoConfig, dial_study_stage, dial_vector, DIAL_KINDS, KINDS
from av_nbdev.compose import orthogonalize_domains
from av_nbdev.data import DOMAINS, load_splits
from av_nbdev.sweep import sample_records, split_halves
from av_nbdev.train import pipeline_metrics


def dial_models(model:str, seed:int, anchor_share:float=0.0, lr_scale:float=1.0, joint_steps:int=0)->tuple:
    """(base folder, domain -> {generic, expert} checkpoints, stored dtype): the tiny joint dials or a real base's chained
    dials, trained or reused; with `anchor_share` the chain's steps also train on anchoring pairs, their step counts
    × (1 + anchor_share) so that each domain's own pairs are seen as often; `lr_scale` multiplies the chain's learning rates;
    with `joint_steps`, the chain's steps are then trained together on every combination of dial settings
    (`real.real_dial_models` started from the chain, `REAL_JOINT_DPO` for that many steps)."""
    if model == "tiny":
        torch.set_num_threads(1)  # tiny matrices: one thread is faster (as in `av demo`)
        from av_nbdev.train import JOINT_DPO, joint_dial_models, tiny_pipelines
        base = tiny_pipelines((False,), domains=(), seed=seed, progress=False)[False]["base"]
        return base, joint_dial_models(base, dpo_cfg=replace(JOINT_DPO, seed=seed), progress=False), "float32"
    from av_nbdev.models import base_dir
    from av_nbdev.real import REAL_CHAIN_EXPERT_DPO, REAL_DPO, REAL_JOINT_DPO, real_chained_dials, real_dial_models
    base = base_dir(model)
    scaled = lambda cfg: replace(cfg, steps=round(cfg.steps * (1 + anchor_share)), lr=cfg.lr * lr_scale)  # the defaults at 0 and 1
    chain = real_chained_dials(base, generic_cfg=scaled(REAL_DPO), expert_cfg=scaled(REAL_CHAIN_EXPERT_DPO), seed=seed,
                               anchor_share=anchor_share, progress=False)
    if joint_steps:
        chain = real_dial_models(base, dpo_cfg=replace(REAL_JOINT_DPO, steps=joint_steps), seed=seed, progress=False, start_from=chain)
    return base, chain, "bfloat16"


def dial_files(out:Path, base:Path, models:dict, dtype:str, amount:float)->dict:
    "knob -> vector file of the dials, orthogonalized across domains at `amount` (0: as trained)."
    files = {f"{d}-{KINDS[k][1]}": dial_vector(out, base, models[d], k, d, dtype) for d in DOMAINS for k in DIAL_KINDS}
    if amount == 0: return files
    odir = out/f"vectors-orthogonal-{amount:g}"
    done = {k: odir/f.name for k, f in files.items()}
    if not all(f.exists() for f in done.values()):
        for k, v in orthogonalize_domains(files, amount, allow_transfer=True, dtype=dtype).items(): v.save(done[k], overwrite=True)
    return done


def joint_table(models:dict)->str:
    "The joint training started from the chain: its steps, time and last steps' log."
    folder = next(iter(next(iter(models.values())).values())).parent
    m, log = json.loads((folder/"metrics.json").read_text()), pd.read_csv(folder/"log.csv")
    return (f"{m['steps']} joint steps from the chain in {m['seconds']:.0f} s\n"
            + log[["step", "loss", "reward_acc", "margin", "nll"]].round(3).tail(6).to_string(index=False))


def training_table(models:dict)->pd.DataFrame:
    "A real base's chain: each DPO model's pairs, anchoring pairs, steps, seconds and held-out reward accuracy and margin."
    df = pd.concat([pipeline_metrics(by_level) for by_level in models.values()], ignore_index=True)
    if "anchor_pairs" not in df: df["anchor_pairs"] = 0  # an unanchored model's metrics have no such count
    return df[["domain", "level", "n_pairs", "anchor_pairs", "steps", "seconds", "heldout_reward_accuracy", "heldout_margin"]].round(2)


def study(out:Path, label:str, base:Path, files:dict, tune:list, report:list, cfg:DemoConfig)->dict:
    "The dial study of `files`, kept in `out/<label>-<key>.json`."
    key = short_hash(sorted(str(f) for f in files.values()), asdict(cfg), records_hash(tune + report))
    f = out/f"{label}-{key}.json"
    if f.exists(): return json.loads(f.read_text())
    t0 = time.perf_counter()
    res = dial_study_stage(base, files, tune, report, cfg) | {"seconds": time.perf_counter() - t0}
    write_json(f, res)
    return res


def rows(amount:float, res:dict)->list:
    "One table row per domain: levels reached, leakage, expert share and well-formed share at the expert setting."
    out = []
    for d in DOMAINS:
        lv = res["levels"][d]
        exp, leak = lv.get("expert") or {}, res["leakage"][d]
        out.append({"amount": amount, "domain": d,
                    "levels reached": ", ".join(l for l, v in lv.items() if v and v["reached"]) or "none",
                    "leakage": leak and leak["ratio"], "expert share": exp.get("share"),
                    "well-formed": exp.get("well_formed"),
                    "dial (report / tune)": "/".join("yes" if res["dial_check"][f"{d} dial"][k] else "no" for k in ("is_dial", "is_dial_tune"))})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help='"tiny" (the joint dials) or a real base: "smollm2", a .gguf file, an HF folder (chained dials)')
    ap.add_argument("--amounts", default="0,0.5,1", help="comma-separated shares of the shared part removed (0: as trained)")
    ap.add_argument("--per-domain", type=int, default=30, help="held-out queries per domain (half tune, half report)")
    ap.add_argument("--out", default="/tmp/av-orthogonal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anchor-share", type=float, default=0.0, help="real model: anchoring pairs in the chain's DPO, as a share of its pairs")
    ap.add_argument("--lr-scale", type=float, default=1.0, help="real model: the chain's learning rates × this")
    ap.add_argument("--joint-steps", type=int, default=0, help="real model: then this many joint steps started from the chain")
    a = ap.parse_args()
    amounts = [float(x) for x in a.amounts.split(",")]
    if (a.anchor_share or a.lr_scale != 1 or a.joint_steps) and a.model == "tiny":
        ap.error("--anchor-share, --lr-scale, --joint-steps: for a real base's chain only")
    cfg = DemoConfig(per_domain=a.per_domain, seed=a.seed)
    tune, report = split_halves(sample_records(load_splits()["test"], cfg.per_domain, cfg.seed), cfg.seed)
    base, models, dtype = dial_models(a.model, a.seed, a.anchor_share, a.lr_scale, a.joint_steps)
    checkpoints = sorted(str(p) for by_level in models.values() for p in by_level.values())  # their names carry their training's hash
    out = Path(a.out)/short_hash(a.model, a.seed, *((a.anchor_share,) if a.anchor_share else ()), checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    table, lines = [], []
    for amount in amounts:
        res = study(out, f"study-{amount:g}", base, dial_files(out, base, models, dtype, amount), tune, report, cfg)
        table += rows(amount, res)
        lines.append(f"amount {amount:g}: targets dial by dial {res['targets_reached']}/27 on the reporting half "
                     f"(tuning half {res.get('targets_tune_reached', '?')}, settable {res['targets_settable']}); "
                     f"search {res['search']['reached']}/27 in {res['search']['evaluations']} passes; study {res['seconds']:.0f} s")
    if a.joint_steps: print(joint_table(models), "\n")
    elif a.model != "tiny": print(training_table(models).to_string(index=False), "\n")
    df = pd.DataFrame(table)
    if 0.0 in amounts:
        raw = df[df.amount == 0].set_index("domain")["leakage"]
        df["leakage / as trained"] = [r.leakage / raw[r.domain] for r in df.itertuples()]
    chain = ", ".join(([f"anchor share {a.anchor_share:g}"] if a.anchor_share else []) + ([f"lr × {a.lr_scale:g}"] if a.lr_scale != 1 else [])
                      + ([f"then {a.joint_steps} joint steps"] if a.joint_steps else []))
    print(f"{a.model}{f' ({chain})' if chain else ''}: {len(tune)} tuning and {len(report)} reporting queries")
    print(df.round(3).to_string(index=False))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
