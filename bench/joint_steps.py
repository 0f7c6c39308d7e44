"""How long must the tiny model's dials train? The dial study of `av demo --dial` on joint dials trained for other step counts.

Each variant trains every domain's dial steps together (`train.joint_dial_models`, the default recipe `train.JOINT_DPO`
with its steps and learning rate replaced; cached beside the default's in the package cache) and runs the dial study
of `av demo --dial` on their vectors (`demo.dial_study_stage`: each level's dial position chosen on the tuning half,
measured on the reporting half; the 27 targets set dial by dial; the probe–solve–verify search), then measures the
chosen settings on the hand-written queries (`demo.handwritten_check`). One row per variant and domain: each level's
share on the reporting half (pooled and on its unseen topics), the leakage ratio on the mean level, whether the sweep
is a dial; the targets line beside it. Training time is each run's own (`demo.training_seconds`), also given as a
ratio of the default variant's.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/joint_steps.py                      # 600 (the default), 300 at 2× lr, 900
    HF_HUB_OFFLINE=1 .venv/bin/python bench/joint_steps.py --variants 600:4e-4,1200:4e-4
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
from av_nbdev.train import JOINT_DPO, joint_dial_models, tiny_pipelines


def variant_rows(steps:int, lr:float, base, tune:list, report:list, cfg:DemoConfig, out)->tuple:
    "(one row per domain, the targets line) of the joint dials trained `steps` steps at `lr`."
    models = joint_dial_models(base, dpo_cfg=replace(JOINT_DPO, steps=steps, lr=lr), progress=False)
    vec_dir = out/f"s{steps}-lr{lr:g}"
    files = {f"{d}-{KINDS[k][1]}": dial_vector(vec_dir, base, models[d], k, d, "float32") for d in DOMAINS for k in DIAL_KINDS}
    ds = dial_study_stage(base, files, tune, report, cfg)
    hw = handwritten_check(base, files, ds["settings"], target_settings(ds["targets"]), None, True)
    secs = training_seconds(p for by_level in models.values() for p in by_level.values())
    rows = []
    for d in DOMAINS:
        lv = ds["levels"][d]
        rows.append({"steps": steps, "lr": lr, "train s": round(secs), "domain": d,
                     **{f"{l} share (unseen)": "–" if not lv[l] else f"{lv[l]['share']:.2f} ({lv[l]['share_unseen']:.2f})" for l in LEVELS},
                     "leakage": ds["leakage"][d] and round(ds["leakage"][d]["ratio"], 2),
                     "dial (report / tune)": "/".join("yes" if ds["dial_check"][f"{d} dial"][k] else "no" for k in ("is_dial", "is_dial_tune")),
                     "hand-written levels": ", ".join(hw["dial_levels_reached"][d]) or "none"})
    line = (f"{steps} steps at lr {lr:g}: targets dial by dial {ds['targets_reached']}/27 on the reporting half (unseen topics "
            f"{ds['targets_reached_unseen']}, tuning half {ds['targets_tune_reached']}); search {ds['search']['reached']}/27; "
            f"hand-written {len(hw['targets_reached'])} of {hw['targets_tried']}")
    return rows, line, secs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=f"{JOINT_DPO.steps}:{JOINT_DPO.lr:g},300:{2 * JOINT_DPO.lr:g},900:{JOINT_DPO.lr:g}",
                    help="comma-separated steps:lr; the first is the baseline of the time ratio")
    ap.add_argument("--out", default="/tmp/av-joint-steps", help="where the variants' vector files go")
    a = ap.parse_args()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster (as in `av demo`)
    cfg = DemoConfig()
    tune, report = split_halves(sample_records(load_splits()["test"], cfg.per_domain, cfg.seed), cfg.seed)
    base = tiny_pipelines((False,), domains=(), seed=cfg.seed, progress=False)[False]["base"]
    table, lines, first = [], [], None
    for v in a.variants.split(","):
        steps, lr = v.split(":")
        rows, line, secs = variant_rows(int(steps), float(lr), base, tune, report, cfg, Path(a.out))
        first = first or secs
        table += [r | {"train s / first": round(secs / first, 2)} for r in rows]
        lines.append(line)
    print(f"tiny joint dials: {len(tune)} tuning and {len(report)} reporting queries")
    print(pd.DataFrame(table).to_string(index=False))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
