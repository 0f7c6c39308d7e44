"""Benchmark shared-prompt likelihoods (`train.response_logprob_sums`) against one padded sequence per response.

Both routes run in this process on the same model and data, so the ratio is what counts, not the seconds:
  - preference evaluation: 3 levels × N held-out records, no gradients (what every sweep and search point costs);
  - a DPO-style step: chosen and rejected of 8 pairs (4 queries × 2 pairs), forward and backward.
The baseline is the route used before: `encode` (one right-padded row per response, batches of similar length)
and `sequence_logprobs`. Prints the median of `--repeats` timings of each and the ratio baseline / shared.
A benchmark, not a test: timings depend on the machine and on what else runs on it.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/likelihood.py --threads 1
    HF_HUB_OFFLINE=1 .venv/bin/python bench/likelihood.py --model smollm2 --threads 2 --records 12 --repeats 2
"""
import argparse, json, os, statistics, time


def median_seconds(fn, repeats:int)->float:
    "Median wall seconds of `fn()` over `repeats` runs (after one warm-up run)."
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=90, help="held-out records in the preference evaluation")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--model", default="tiny", help="tiny (the cached medical DPO model), smollm2, a .gguf file or an HF folder")
    a = ap.parse_args()

    import torch
    torch.set_num_threads(a.threads)
    from av_nbdev.data import LEVELS, load_splits, dpo_pairs
    from av_nbdev.models import load_model
    from av_nbdev.train import tiny_pipeline, encode, sequence_logprobs, response_logprob_sums

    if a.model == "tiny": model, tok = load_model(tiny_pipeline(domains=("medical",), progress=False)["medical"])
    else:
        from av_nbdev.real import base_dir
        model, tok = load_model(base_dir(a.model))
    data = load_splits()
    recs = data["test"][:a.records]
    qs, rs = [r["query"] for r in recs for _ in LEVELS], [r["responses"][l] for r in recs for l in LEVELS]

    def padded(q, r, batch):  # the baseline: one right-padded row per response, similar lengths together
        order = sorted(range(len(q)), key=lambda i: len(q[i]) + len(r[i]))
        out = torch.zeros(len(q))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            out = out.index_put((torch.tensor(idx),), sequence_logprobs(model, encode(tok, [q[j] for j in idx], [r[j] for j in idx]))[0])
        return out

    def evaluation(shared):
        with torch.no_grad():
            return response_logprob_sums(model, tok, qs, rs, batch_size=32)[0] if shared else padded(qs, rs, 32)

    pairs = dpo_pairs(data["train"], "medical", "expert")[:8]  # 4 queries, 2 pairs each
    pq = [p["query"] for p in pairs for _ in (0, 1)]
    pr = [p[k] for p in pairs for k in ("chosen", "rejected")]

    def dpo_step(shared):
        s = response_logprob_sums(model, tok, pq, pr, batch_size=4)[0] if shared else padded(pq, pr, 16)
        (s[0::2] - s[1::2]).sum().backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():  # the two routes agree before we time them
        gap = (response_logprob_sums(model, tok, qs, rs)[0] - padded(qs, rs, 32)).abs().max().item()
    report = {"model": a.model, "threads": a.threads, "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
              "records": len(recs), "max_abs_difference_nats": gap}
    for name, fn in (("preference_evaluation", evaluation), ("dpo_step", dpo_step)):
        base, new = median_seconds(lambda: fn(False), a.repeats), median_seconds(lambda: fn(True), a.repeats)
        report[name] = {"padded_seconds": round(base, 4), "shared_seconds": round(new, 4), "speedup": round(base / new, 2)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
