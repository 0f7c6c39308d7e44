"""How long, and with which likelihood term, must the tiny model's dials train? The dial study of `av demo --dial` on
joint dials trained for other step counts, learning rates and likelihood terms.

Each variant trains every domain's dial steps together (`train.joint_dial_models`, the default recipe `train.JOINT_DPO`
with its steps and learning rate replaced, and the likelihood term's weight, `train.JOINT_NLL` unless given, on the
raised domains' chosen responses or, with "lowest", on every chosen response; cached beside the default's in the
package cache) and runs the dial study
of `av demo --dial` on their vectors (`demo.dial_study_stage`: each level's dial position chosen on the tuning half,
measured on the reporting half; the 27 targets set dial by dial; the probe–solve–verify search), then measures the
chosen settings on the hand-written queries (`demo.handwritten_check`). One row per variant and domain: each level's
share on the reporting half (pooled and on its unseen topics), the leakage ratio on the mean level, whether the sweep
is a dial; what the model's own greedy answers to the reporting half's queries say at each level's setting (the share
the TF-IDF judge gives the level, ✓ where it is their strict plurality), and on the hand-written queries; the targets
line beside it. Training time is each run's own (`demo.training_seconds`), also given as a ratio of the first variant's.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/joint_steps.py   # the default; the term on every chosen response at 0.05; 300 steps at 2× lr
    HF_HUB_OFFLINE=1 .venv/bin/python bench/joint_steps.py --variants 600:4e-4,1200:4e-4,600:4e-4:0.05:lowest
"""
import argparse
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from av_nbdev.data import DOMAINS, LEVELS, load_splits
from av_nbdev.demo import (DIAL_KINDS, KINDS, DemoConfig, dial_study_stage, dial_vector, handwritten_check, target_settings,
                           training_seconds)
from av_nbdev.sweep import sample_records, split_halves
from av_nbdev.train import JOINT_DPO, JOINT_NLL, joint_dial_models, tiny_pipelines


def judged_text(v:dict|None)->str:
    "A level's judged share at its setting, ✓ where the level is the strict plurality of the judged answers."
    return "–" if not v or v.get("judged") is None else f"{v['judged']:.2f}{' ✓' if v['judged_reached'] else ''}"


def variant_rows(steps:int, lr:float, nll:float, lowest:bool, base, tune:list, report:list, cfg:DemoConfig, out)->tuple:
    "(one row per domain, the targets line, training seconds) of the joint dials trained `steps` steps at `lr` with likelihood weight `nll`."
    models = joint_dial_models(base, dpo_cfg=replace(JOINT_DPO, steps=steps, lr=lr), nll=nll, nll_lowest=lowest, progress=False)
    name = f"{steps} steps, lr {lr:g}, nll {nll:g}" + (" on every chosen response" if lowest else "")
    vec_dir = out/f"s{steps}-lr{lr:g}-nll{nll:g}{'-lowest' if lowest else ''}"
    files = {f"{d}-{KINDS[k][1]}": dial_vector(vec_dir, base, models[d], k, d, "float32") for d in DOMAINS for k in DIAL_KINDS}
    ds = dial_study_stage(base, files, tune, report, cfg)
    hw = handwritten_check(base, files, ds["settings"], target_settings(ds["targets"]), None, True)
    secs = training_seconds(p for by_level in models.values() for p in by_level.values())
    rows = []
    for d in DOMAINS:
        lv = ds["levels"][d]
        rows.append({"variant": name, "train s": round(secs), "domain": d,
                     **{f"{l} share (unseen)": "–" if not lv[l] else f"{lv[l]['share']:.2f} ({lv[l]['share_unseen']:.2f})" for l in LEVELS},
                     **{f"{l} judged": judged_text(lv[l]) for l in LEVELS},
                     "leakage": ds["leakage"][d] and round(ds["leakage"][d]["ratio"], 2),
                     "dial (report / tune)": "/".join("yes" if ds["dial_check"][f"{d} dial"][k] else "no" for k in ("is_dial", "is_dial_tune")),
                     "hand-written levels": ", ".join(hw["dial_levels_reached"][d]) or "none",
                     "hand-written, judged": ", ".join(hw["dial_levels_judged"][d]) or "none"})
    line = (f"{name}: targets dial by dial {ds['targets_reached']}/27 on the reporting half (unseen topics "
            f"{ds['targets_reached_unseen']}, tuning half {ds['targets_tune_reached']}); search {ds['search']['reached']}/27; "
            f"hand-written {len(hw['targets_reached'])} of {hw['targets_tried']}")
    return rows, line, secs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=f"{JOINT_DPO.steps}:{JOINT_DPO.lr:g},{JOINT_DPO.steps}:{JOINT_DPO.lr:g}:0.05:lowest,"
                                          f"300:{2 * JOINT_DPO.lr:g}",
                    help="comma-separated steps:lr[:nll[:lowest]] (nll default train.JOINT_NLL; lowest: the term on every chosen "
                         "response); the first is the baseline of the time ratio")
    ap.add_argument("--out", default="/tmp/av-joint-steps", help="where the variants' vector files go")
    a = ap.parse_args()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster (as in `av demo`)
    cfg = DemoConfig()
    tune, report = split_halves(sample_records(load_splits()["test"], cfg.per_domain, cfg.seed), cfg.seed)
    base = tiny_pipelines((False,), domains=(), seed=cfg.seed, progress=False)[False]["base"]
    table, lines, first = [], [], None
    for v in a.variants.split(","):
        steps, lr, *rest = v.split(":")
        nll, lowest = float(rest[0]) if rest else JOINT_NLL, rest[1:] == ["lowest"]
        rows, line, secs = variant_rows(int(steps), float(lr), nll, lowest, base, tune, report, cfg, Path(a.out))
        first = first or secs
        table += [r | {"train s / first": round(secs / first, 2)} for r in rows]
        lines.append(line)
    print(f"tiny joint dials: {len(tune)} tuning and {len(report)} reporting queries")
    print(pd.DataFrame(table).to_string(index=False))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
