"""Benchmark the tiny training route: wall time of tokenizer + pretrain + SFT + one DPO model, from scratch.

Prints per-stage seconds (from the stage logs), the total wall time and this process's CPU time (with
--threads 1 on a busy shared machine, CPU seconds estimate the wall time on one idle core), the held-out DPO
reward accuracy on the domain's test pairs, and the share of well-formed greedy answers to held-out queries.
A benchmark, not a test: timings depend on the machine and on what else runs on it.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train.py --domain medical --threads 2
"""
import argparse, json, os, tempfile, time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", default="medical")
    ap.add_argument("--level", default="expert")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (use 1 on a busy shared machine)")
    ap.add_argument("--out", default=None, help="run folder (default: a fresh temporary folder, so nothing is cached)")
    a = ap.parse_args()

    import torch
    torch.set_num_threads(a.threads)
    import pandas as pd
    from av_nbdev.train import tiny_pipeline, pipeline_metrics

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="av-bench-train-"))
    t0, c0 = time.perf_counter(), time.process_time()
    paths = tiny_pipeline(out_dir=out, domains=(a.domain,), level=a.level, seed=a.seed, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    stages = {}
    for stage, key in (("pretrain", "pretrain"), ("sft", "base"), ("dpo", a.domain)):
        log = pd.read_csv(paths[key].parent / f"{paths[key].name}.log.csv")
        stages[stage] = {"steps": len(log), "seconds": round(float(log.seconds.iloc[-1]), 1)}
    m = pipeline_metrics(paths).iloc[0]
    report = {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "threads": a.threads, "cpus": os.cpu_count(),
              "load_avg_1min": round(os.getloadavg()[0], 2), "stages": stages,
              "dpo_final_train_margin": round(float(m.train_margin), 2),
              "heldout_reward_accuracy": round(float(m.heldout_reward_accuracy), 3),
              "heldout_margin": round(float(m.heldout_margin), 2), "heldout_pairs_domain": a.domain,
              "well_formed": round(float(m.well_formed), 3), "well_formed_n": int(m.well_formed_n),
              "out": str(out)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
