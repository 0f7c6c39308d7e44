"""Which training gives each domain a three-level dial (avoidance → generic → expert) that stays in its own domain?

Compares training methods for the tiny model's vectors under the package's dial definitions, in one table:

- dial: one scalar s per domain mapped to the λs of that domain's vectors by a piecewise-linear schedule; on a grid of
  s (step 0.25) the strict plurality of the domain's own held-out queries must go avoidance → generic → expert, each
  level holding ≥ 2 consecutive grid points (checked on the tuning half and on the reporting half);
- settings for each level are chosen on a tuning half of the held-out queries (stratified by domain and by
  seen/unseen topic) and reported on the other half (seen, unseen and pooled);
- reached: the level is the strict plurality (a tie is not reached) in a real evaluation;
- leakage ratio: in-domain shift of the mean level (avoidance 0, generic 1, expert 2) from s=0 to the expert setting,
  over the largest |shift| of another domain (inf when none moves);
- well-formed: share of ≥ 16 greedy answers (reporting half, own domain) that pass `scoring.answer_problem`;
- multidomain: 27 targets (one level per domain), searched on the tuning half, reported on the reporting half.

Candidate names are flags joined by "_": perlevel (a generic- and an expert-preferring model per domain), ga (generic
only ≻ avoidance), anchorX (anchoring pairs, X × the domain's pairs: the base's preferred level ≻ the level trained),
symX (symmetric anchors: every ordered pair of levels on other-domain queries, which holds their log-ratios), awW
(anchor loss × W), chain (the expert model trained from the generic one, its vector expert − generic), nllA / enllA
(a likelihood term on the chosen responses; enll: the chained expert step only), retainG (squared change of the other domains' per-token likelihoods × G), sN (at most N steps); joint (every
domain's generic and expert steps trained together on every combination of dial settings: `train.joint_dial_models`;
tT, qQ: T targets per step, Q queries per domain each; nllA: the likelihood term's weight on the raised domains' chosen
responses, default 0; lowest: on every chosen response (`nll_lowest`); floorF: DPO-Positive's
floor on the chosen responses' likelihood; betaB: DPO's β, default `DPOConfig`'s 0.1). Targets are counted three ways: by_dials (each dial turned
to its level's tuned position, no search), by_knots (each dial at 0, 1 or 2: where its steps were trained) and the
surrogate search.

Models are cached under --out (default /tmp/dial), the joint ones where `train.joint_dial_models` keeps them (the
package cache); results per candidate are kept in --out/results/<name>.json.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/dial_candidates.py            # full table
    HF_HUB_OFFLINE=1 .venv/bin/python bench/dial_candidates.py --quick    # fewer candidates, no grid search
    HF_HUB_OFFLINE=1 .venv/bin/python bench/dial_candidates.py --only plain,perlevel
"""
import argparse, itertools, json, os, time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from av_nbdev.data import dpo_pairs
from av_nbdev.sweep import dial_schedule, is_dial, mean_level, mean_level_leakage, plurality, share_matrix, split_halves

LEVELS = ("avoidance", "generic", "expert")
DOMAINS = ("medical", "legal", "financial")
STEP = 0.25
WINNER = "joint_nll0.1_beta0.03"  # the recipe `train.joint_dial_models` implements with its defaults (what `av demo --dial` trains)


# ----------------------------------------------------------------------------------------------------------------- data
def halves(test:list, seed:int=0)->dict:
    "Tuning and reporting halves of the held-out records (`sweep.split_halves`: stratified by domain and seen/unseen topic)."
    tune, report = split_halves(test, seed)
    return {"tune": tune, "report": report}


# ------------------------------------------------------------------------------------------------------------- training
def cached_model(out:Path, name:str, key:str, reference_dir:Path, init_dir:Path, n_pairs:int, train, extra:str|None=None)->dict:
    """Train (or reuse, by `name` and `key`) a model of `init_dir` against `reference_dir`: `train(policy, reference,
    tok)` returns its log; saved with its stats (and the last steps' mean of the log column `extra`)."""
    from av_nbdev.models import load_model, save_checkpoint
    d = out/"models"/f"{name}-{key}"
    meta = d.parent/f"{d.name}.json"
    if meta.exists() and (d/"config.json").exists(): return json.loads(meta.read_text()) | {"dir": str(d)}
    reference, tok = load_model(reference_dir, dtype=torch.float32)
    policy, _ = load_model(init_dir, dtype=torch.float32)
    log = train(policy, reference, tok)
    save_checkpoint(policy, tok, d, overwrite=True)
    stats = {"name": name, "pairs": n_pairs, "steps": len(log), "seconds": float(log.seconds.iloc[-1]),
             "final_margin": float(log.margin.iloc[-3:].mean())}
    stats |= {f"final_{extra}": float(log[extra].iloc[-3:].mean())} if extra else {"final_reward_acc": float(log.reward_acc.iloc[-1])}
    meta.parent.mkdir(parents=True, exist_ok=True); meta.write_text(json.dumps(stats))
    return stats | {"dir": str(d)}


def _pairs_key(pairs:list)->list: return [json.dumps(p, sort_keys=True) for p in pairs]


def dpo_model(out:Path, name:str, base_dir:Path, pairs:list, cfg, init_dir:Path|None=None)->dict:
    "Train (or reuse) a DPO model of `init_dir` (default the base) against the base on `pairs`; its folder and stats."
    from av_nbdev.core import short_hash
    from av_nbdev.train import dpo
    init_dir = init_dir or base_dir
    key = short_hash(name, str(base_dir), str(init_dir), _pairs_key(pairs), asdict(cfg))
    return cached_model(out, name, key, base_dir, init_dir, len(pairs), lambda pol, ref, tok: dpo(pol, ref, tok, pairs, cfg, progress=False))


def _sums(model, tok, queries:list, responses:list, cfg)->tuple:
    "(summed log-prob, token count) per response; prompts shared (`scoring.response_logprob_sums`)."
    from av_nbdev.scoring import response_logprob_sums
    return response_logprob_sums(model, tok, queries, responses, max_length=cfg.max_length, batch_size=8)


def pair_pass(policy, reference, tok, ps:list, cfg)->tuple:
    "One DPO pass over pairs `ps`: the policy's (chosen, rejected)-interleaved sums and counts, the loss per pair and both rewards."
    from av_nbdev.train import dpo_loss
    qs, rs = [p["query"] for p in ps for _ in (0, 1)], [p[k] for p in ps for k in ("chosen", "rejected")]
    with torch.no_grad(): ref, _ = _sums(reference, tok, qs, rs, cfg)
    pol, cnt = _sums(policy, tok, qs, rs, cfg)
    return (pol, cnt, *dpo_loss(pol[0::2], pol[1::2], ref[0::2], ref[1::2], beta=cfg.beta))


def dpo_retain(policy, reference, tok, pairs:list, retain:list, cfg, gamma:float, per_step:int=8):
    """DPO on `pairs` plus `gamma` × the mean squared change of the per-token log-likelihood of `retain` items
    ({"query","response"}: other domains' queries with every level's response) against the reference; a batch of
    `per_step` retain items per step. Stops on the DPO reward margin like `train.dpo`."""
    from av_nbdev.train import train_loop, margin_stop, by_query
    reference.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    def step(micro:list)->dict:
        n, st = sum(map(len, micro)), dict(loss=0.0, margin=0.0, reward_acc=0.0, retain=0.0)
        for idx in micro:
            _, _, loss, rw, rl = pair_pass(policy, reference, tok, [pairs[i] for i in idx], cfg)
            (loss.sum() / n).backward()
            st["loss"] += loss.sum().item() / n; st["margin"] += (rw - rl).sum().item() / n
            st["reward_acc"] += (rw > rl).float().sum().item() / n
        keep = [retain[i] for i in torch.randint(len(retain), (per_step,), generator=g).tolist()]
        qs, rs = [x["query"] for x in keep], [x["response"] for x in keep]
        with torch.no_grad(): ref, cnt = _sums(reference, tok, qs, rs, cfg)
        pol, _ = _sums(policy, tok, qs, rs, cfg)
        drift = ((pol - ref) / cnt.clamp(min=1)).pow(2).mean()
        (gamma * drift).backward(); st["retain"] = drift.item()
        return st
    return train_loop(policy, cfg, len(pairs), step, "dpo-retain", stop=margin_stop(cfg), progress=False, groups=by_query(pairs))


def dpo_nll(policy, reference, tok, pairs:list, cfg, alpha:float, anchor_weight:float=1.0):
    """DPO on `pairs` plus `alpha` × the mean per-token negative log-likelihood of the chosen responses of the
    domain's own pairs (anchors excluded): the aligned level's text stays likely, not only likelier than the rejected."""
    from av_nbdev.train import train_loop, margin_stop, by_query
    reference.eval()
    def step(micro:list)->dict:
        n, st, n_own = sum(map(len, micro)), dict(loss=0.0, margin=0.0, reward_acc=0.0, nll=0.0), 0.0
        for idx in micro:
            ps = [pairs[i] for i in idx]
            pol, cnt, loss, rw, rl = pair_pass(policy, reference, tok, ps, cfg)
            own = torch.tensor([not p.get("anchor") for p in ps], dtype=pol.dtype)
            nll = -(pol[0::2] / cnt[0::2].clamp(min=1)) * own
            w = 1.0 + (anchor_weight - 1.0) * (1.0 - own)  # anchors' DPO loss × `anchor_weight`
            (((loss * w).sum() + alpha * nll.sum()) / n).backward()
            k = max(1.0, own.sum().item()); n_own += k
            st["loss"] += loss.sum().item() / n; st["margin"] += ((rw - rl) * own).sum().item()
            st["reward_acc"] += ((rw > rl).float() * own).sum().item(); st["nll"] += nll.sum().item()
        for key in ("margin", "reward_acc", "nll"): st[key] /= n_own  # over the domain's own pairs (the stop rule reads it)
        return st
    return train_loop(policy, cfg, len(pairs), step, "dpo-nll", stop=margin_stop(cfg), progress=False, groups=by_query(pairs))


def nll_model(out:Path, name:str, base_dir:Path, pairs:list, cfg, alpha:float, anchor_weight:float=1.0)->dict:
    "Train (or reuse) a `dpo_nll` model of the base; its folder and stats."
    from av_nbdev.core import short_hash
    key = short_hash(name, str(base_dir), _pairs_key(pairs), alpha, asdict(cfg), *([anchor_weight] if anchor_weight != 1.0 else []))
    train = lambda pol, ref, tok: dpo_nll(pol, ref, tok, pairs, cfg, alpha, anchor_weight)
    return cached_model(out, name, key, base_dir, base_dir, len(pairs), train, "nll")


def retain_model(out:Path, name:str, base_dir:Path, pairs:list, retain:list, cfg, gamma:float)->dict:
    "Train (or reuse) a `dpo_retain` model of the base; its folder and stats."
    from av_nbdev.core import short_hash
    key = short_hash(name, str(base_dir), _pairs_key(pairs), len(retain), gamma, asdict(cfg))
    train = lambda pol, ref, tok: dpo_retain(pol, ref, tok, pairs, retain, cfg, gamma)
    return cached_model(out, name, key, base_dir, base_dir, len(pairs), train, "retain")


def level_pairs(records:list, domain:str, chosen:str, rejected:tuple, weight:int=1)->list:
    "`data.dpo_pairs` narrowed to `rejected`, each pair repeated `weight` times (a weight per kind of pair)."
    return [p for p in dpo_pairs(records, domain, chosen, tuple(rejected)) for _ in range(weight)]


def anchor_pairs(records:list, domain:str, level:str, base, tok, share:float, n_domain_pairs:int, seed:int=0)->list:
    "`train.build_pairs`' anchors: other-domain records, the base's preferred level ≻ `level` (share of the domain's pairs)."
    from av_nbdev.train import base_preference
    others = [r for r in records if r["domain"] != domain]
    g = torch.Generator().manual_seed(seed)
    n = min(len(others), round(share * n_domain_pairs))
    others = [others[i] for i in torch.randperm(len(others), generator=g)[:n].tolist()]
    return [{"query": r["query"], "chosen": r["responses"][pref], "rejected": r["responses"][level], "domain": r["domain"],
             "chosen_level": pref, "rejected_level": level, "anchor": True}
            for r, pref in zip(others, base_preference(base, tok, others)) if pref != level]


def symmetric_anchor_pairs(records:list, domain:str, share:float, n_domain_pairs:int, seed:int=0)->list:
    """Other-domain records with every ordered pair of distinct levels (a ≻ b and b ≻ a): DPO's loss on a pair and its
    reverse is least when the pair's log-ratio is the reference's, so these hold the other domains' preferences where the
    base had them instead of pushing them towards any level. About `share` × `n_domain_pairs` pairs."""
    from av_nbdev.core import seeded_sample
    others = [r for r in records if r["domain"] != domain]
    per = len(LEVELS) * (len(LEVELS) - 1)
    picked = seeded_sample(others, round(share * n_domain_pairs / per), seed)
    return [{"query": r["query"], "chosen": r["responses"][a], "rejected": r["responses"][b], "domain": r["domain"],
             "chosen_level": a, "rejected_level": b, "anchor": True}
            for r in picked for a in LEVELS for b in LEVELS if a != b]


# -------------------------------------------------------------------------------------------------------------- vectors
def orthogonalised(vectors:dict, domain_of:dict)->dict:
    "Each vector minus, tensor by tensor, its least-squares projection onto the span of the other domains' vectors."
    from av_nbdev.vectors import AlignmentVector
    out = {}
    for k, av in vectors.items():
        others = [o for o in vectors if domain_of[o] != domain_of[k]]
        ts = {}
        for n in av.names():
            v = av[n].double().flatten()
            U = torch.stack([vectors[o][n].double().flatten() for o in others], 1)
            coef = torch.linalg.lstsq(U, v[:, None]).solution
            ts[n] = (v - (U @ coef)[:, 0]).reshape(av[n].shape).float()
        out[k] = AlignmentVector(ts, {**av.meta, "orthogonalised_against": others})
    return out


# ------------------------------------------------------------------------------------------------------------- the dial
def cumulative_knots(G:str, E:str, g:float=1.0, e:float=1.0)->list:
    "A dial of a generic knob G and an expert knob E: generic up to g and held, then expert added (every λ monotone)."
    return [(-1.0, {G: -g, E: 0.0}), (0.0, {G: 0.0, E: 0.0}), (1.0, {G: g, E: 0.0}), (2.0, {G: g, E: e}), (3.0, {G: g, E: 2 * e})]


def monotone(sched, grid)->bool:
    "Does every λ of the schedule move one way only along the grid?"
    lams = pd.DataFrame([sched(s) for s in grid])
    return bool(all(lams[c].is_monotonic_increasing or lams[c].is_monotonic_decreasing for c in lams))


def shares(table:pd.DataFrame, domain:str|None=None)->pd.Series:
    "Share preferring each level among the table's rows (of one domain)."
    t = table if domain is None else table[table.domain == domain]
    return t.preferred.value_counts(normalize=True).reindex(list(LEVELS), fill_value=0.0)


class Bench:
    "Knobs over the base, evaluations cached by setting, and the halves of the held-out data."
    def __init__(self, base_dir, vectors:dict, parts:dict):
        from av_nbdev.models import load_model
        from av_nbdev.knobs import Knobs
        self.model, self.tok = load_model(base_dir, dtype=torch.float32)
        self.knobs = Knobs(self.model, vectors, allow_transfer=True)
        self.parts, self.cache, self.n_evals = parts, {}, 0.0

    def table(self, lambdas:dict, part:str, domain:str|None=None)->pd.DataFrame:
        "Preference table on a half (or one domain of it) at `lambdas` (others 0)."
        from av_nbdev.scoring import preference_table
        lam = {k: float(lambdas.get(k, 0.0)) for k in self.knobs.lambdas}
        key = (tuple(sorted(lam.items())), part, domain)
        if key not in self.cache:
            recs = [r for r in self.parts[part] if domain is None or r["domain"] == domain]
            with self.knobs.using(**lam): self.cache[key] = preference_table(self.model, self.tok, recs, batch_size=64)
            self.n_evals += len(recs) / len(self.parts[part])
        return self.cache[key]

    def well_formed(self, lambdas:dict, queries:list)->float:
        from av_nbdev.scoring import well_formed
        with self.knobs.using(**{k: float(lambdas.get(k, 0.0)) for k in self.knobs.lambdas}):
            return float(well_formed(self.model, self.tok, queries).problem.isna().mean())


def calibrate_dial(b:Bench, domain:str, sched, grid, n_wf:int=16, min_wf:float=0.8)->dict:
    """Sweep one dial on its own domain (both halves); choose each level's setting on the tuning half: avoidance at
    s=0 when the base already avoids, else where its share peaks; generic where its share peaks; expert at the smallest
    s with an expert share ≥ 0.9, else where it peaks; generic and expert only among settings whose greedy answers to
    `n_wf` tuning queries are ≥ `min_wf` well-formed (checked from the preferred setting on, until one passes)."""
    rows = []
    for s in grid:
        lam = sched(s)
        for part in ("tune", "report"):
            sh = shares(b.table(lam, part, domain))
            rows.append({"s": float(s), "part": part, **sh.to_dict(), "plurality": plurality(sh)})
    df = pd.DataFrame(rows)
    tune = df[df.part == "tune"].reset_index(drop=True)
    settings, checked = {}, {}
    qs = [r["query"] for r in b.parts["tune"] if r["domain"] == domain][:n_wf]
    for lvl in LEVELS:
        wins = tune[tune.plurality == lvl]
        if wins.empty: settings[lvl] = None; continue
        if lvl == "avoidance" and (wins.s == 0).any(): settings[lvl] = 0.0; continue  # the base itself when it already avoids
        if lvl == "expert": order = sorted(wins.itertuples(), key=lambda r: (not r.expert >= 0.9, r.s if r.expert >= 0.9 else -r.expert))
        else: order = sorted(wins.itertuples(), key=lambda r: -getattr(r, lvl))
        settings[lvl] = None
        for r in order:
            wf = checked.setdefault(r.s, b.well_formed(sched(r.s), qs))
            if wf >= min_wf: settings[lvl] = float(r.s); break
    return {"sweep": df, "settings": settings, "tune_well_formed": {str(k): v for k, v in checked.items()},
            "dial_tune": is_dial(list(tune.plurality), LEVELS), "dial_report": is_dial(list(df[df.part == "report"].plurality), LEVELS)}


def report_levels(b:Bench, domain:str, sched, settings:dict)->dict:
    "At each chosen setting, the reporting half's own-domain shares (pooled, seen, unseen), and which levels are reached."
    out = {}
    for lvl, s in settings.items():
        if s is None: out[lvl] = None; continue
        t = b.table(sched(s), "report", domain)
        row = {"s": s}
        for name, sub in (("pooled", t), ("seen", t[~t.heldout_topic.astype(bool)]), ("unseen", t[t.heldout_topic.astype(bool)])):
            sh = shares(sub)
            row[f"{name}_share"], row[f"{name}_reached"] = float(sh[lvl]), plurality(sh) == lvl
        out[lvl] = row
    return out


def leakage(b:Bench, domain:str, sched, s_expert:float|None, part:str="report")->dict:
    "Leakage ratio of the mean level from s=0 to the expert setting, on every domain of a half."
    if s_expert is None: return {"leakage_ratio": None, "shifts": None}
    t0, t1 = share_matrix(b.table(sched(0.0), part)), share_matrix(b.table(sched(s_expert), part))
    shifts = (mean_level(t1) - mean_level(t0)).to_dict()
    return {"leakage_ratio": mean_level_leakage(t0, t1, domain), "shifts": shifts, "expert_share": float(t1.loc[domain, "expert"])}


# ---------------------------------------------------------------------------------------------------------- multidomain
def targets():
    return [dict(zip(DOMAINS, c)) for c in itertools.product(LEVELS, repeat=len(DOMAINS))]


def target_reached(table:pd.DataFrame, target:dict)->tuple:
    "(reached: every domain's strict plurality is its level, accuracy: mean target share)."
    ok, acc = True, []
    for d, lvl in target.items():
        sh = shares(table, d)
        ok &= plurality(sh) == lvl; acc.append(float(sh[lvl]))
    return bool(ok), float(np.mean(acc))


def dial_lambdas(scheds:dict, s:dict)->dict:
    "Every knob's λ from the dials' scalars."
    return {k: v for d, x in s.items() for k, v in scheds[d](x).items()}


def md_report(b:Bench, scheds:dict, chosen:dict)->dict:
    "Each target's chosen dial setting evaluated on the reporting half."
    rows = []
    for t in targets():
        s = chosen[tuple(t.values())]
        reached, acc = target_reached(b.table(dial_lambdas(scheds, s), "report"), t)
        rows.append({"target": t, "s": s, "reached": reached, "accuracy": acc})
    return {"reached": sum(r["reached"] for r in rows), "rows": rows}


def targets_by_dials(b:Bench, scheds:dict, positions:dict)->dict:
    "Every target with each dial turned to its level's position (domain -> level -> s; None: not reached), no search: tuning and reporting half."
    rows = []
    for t in targets():
        if any(positions[d][l] is None for d, l in t.items()): continue
        s = {d: positions[d][l] for d, l in t.items()}
        rows.append({"target": t, "s": s, **{part: target_reached(b.table(dial_lambdas(scheds, s), part), t) for part in ("tune", "report")}})
    return {"evaluations": len(rows), "tune_reached": sum(r["tune"][0] for r in rows), "reached": sum(r["report"][0] for r in rows), "rows": rows}


def grid_search(b:Bench, scheds:dict, points:tuple)->dict:
    "The paper's grid over the dials (len(points)**3 evaluations on the tuning half); best per target reported."
    before, evals = b.n_evals, []
    for combo in itertools.product(points, repeat=len(DOMAINS)):
        s = dict(zip(DOMAINS, map(float, combo)))
        evals.append((s, b.table(dial_lambdas(scheds, s), "tune")))
    used = b.n_evals - before
    chosen = {}
    for t in targets():
        scored = [(target_reached(tab, t), s) for s, tab in evals]
        chosen[tuple(t.values())] = max(scored, key=lambda x: (x[0][0], x[0][1]))[1]
    tune_reached = sum(max(target_reached(tab, t)[0] for _, tab in evals) for t in targets())
    return {"evaluations": len(evals), "evaluations_counted": used, "tune_reached": int(tune_reached), **md_report(b, scheds, chosen)}


def surrogate_search(b:Bench, scheds:dict, probes:dict, candidates:dict, budget:int=40)->dict:
    """Probe each dial alone at a few s (tuning half, all domains), model the scores additively (piecewise-linear in s
    per dial), solve every target on the model, verify the best prediction per target with a real evaluation; when a
    verification misses, spend the remaining budget on the next-best predictions."""
    b_evals = []
    zero = {d: 0.0 for d in DOMAINS}
    t0 = b.table(dial_lambdas(scheds, zero), "tune"); n = 1
    score = lambda t: t[list(LEVELS)].to_numpy(dtype=np.float64)
    base = score(t0)
    curves = {}
    for d in DOMAINS:
        pts = sorted(set(probes[d]) | {0.0})
        curves[d] = (np.array(pts), np.stack([base if p == 0 else score(b.table(dial_lambdas(scheds, zero | {d: p}), "tune")) for p in pts]))
        n += len(pts) - 1
    def interp(d, xs):
        pts, c = curves[d]
        xs = np.clip(xs, pts[0], pts[-1]); i = np.clip(np.searchsorted(pts, xs) - 1, 0, len(pts) - 2)
        w = ((xs - pts[i]) / (pts[i + 1] - pts[i]))[:, None, None]
        return (1 - w) * c[i] + w * c[i + 1]
    cand = np.array(list(itertools.product(*(candidates[d] for d in DOMAINS))), dtype=np.float64)
    pred = base[None] + sum(interp(d, cand[:, j]) - base[None] for j, d in enumerate(DOMAINS))  # [C, Q, L]
    pref = pred.argmax(2); doms = t0.domain.to_numpy()
    psh = np.stack([np.stack([(pref[:, doms == d] == li).mean(1) for li in range(3)], 1) for d in DOMAINS], 1)  # [C, D, L]
    ranked = {}
    for t in targets():
        li = [LEVELS.index(l) for l in t.values()]
        got = psh[:, np.arange(3), li]
        oth = psh.copy(); oth[:, np.arange(3), li] = -np.inf
        ok = np.all(got > oth.max(2), 1); acc = got.mean(1)
        ranked[tuple(t.values())] = list(np.lexsort((-acc, ~ok)))
    verified, chosen, tries = {}, {}, {k: 0 for k in ranked}
    def verify(key):
        nonlocal n
        c = ranked[key][tries[key]]; tries[key] += 1
        s = dict(zip(DOMAINS, map(float, cand[c])))
        sk = tuple(s.values())
        if sk not in verified: verified[sk] = b.table(dial_lambdas(scheds, s), "tune"); n += 1
        return s, target_reached(verified[sk], dict(zip(DOMAINS, key)))
    best = {}
    for key in ranked:  # first pass: the best prediction of every target
        if n >= budget: break
        s, (ok, acc) = verify(key); best[key] = (ok, acc, s)
    for key in itertools.cycle(list(ranked)):  # then retry the misses while the budget lasts
        if n >= budget or all(v[0] for v in best.values()): break
        if best.get(key, (False,))[0] or tries[key] >= len(ranked[key]): continue
        s, (ok, acc) = verify(key)
        if (ok, acc) > best[key][:2]: best[key] = (ok, acc, s)
    for key in ranked: chosen[key] = best[key][2] if key in best else dict(zip(DOMAINS, map(float, cand[ranked[key][0]])))
    tune_reached = sum(v[0] for v in best.values())
    return {"evaluations": n, "tune_reached": int(tune_reached), **md_report(b, scheds, chosen)}


# ----------------------------------------------------------------------------------------------------------- candidates
def build_candidate(name:str, ctx:dict)->dict:
    """Train what the candidate needs; return {"vectors": {knob: AV}, "domain_of", "scheds": {domain: s→λ},
    "grid": s values, "train_seconds", "models": [...stats]}."""
    from av_nbdev.vectors import AlignmentVector
    from av_nbdev.train import DPOConfig
    base_dir, train, out, quick = ctx["base_dir"], ctx["train"], ctx["out"], ctx["quick"]
    steps = next((int(p[1:]) for p in name.split("_") if p[:1] == "s" and p[1:].isdigit()), ctx["dpo_steps"])
    cfg = DPOConfig(steps=steps)  # candidate suffix _sN: at most N steps (the margin stop still applies)
    models, vectors, domain_of = [], {}, {}
    def vec(knob, d, level, stats, ref_dir=None):
        models.append({k: v for k, v in stats.items() if k != "dir"})
        vectors[knob] = AlignmentVector.extract(ref_dir or base_dir, stats["dir"], domain=d, level=level)
        domain_of[knob] = d
    def plain_stats(d): return {"name": f"pipeline-{d}", **ctx["pipeline_metrics"][d], "dir": str(ctx["paths"][d])}
    def expert_generic(d, anchor_share=0.0, generic_over=("avoidance", "expert"), expert_weight=1, retain_gamma=0.0, nll_alpha=0.0,
                       chain=False, expert_nll=0.0, sym_share=0.0, anchor_weight=1.0):
        """A generic-preferring (≻ `generic_over`) and an expert-preferring model of domain d (optionally anchored);
        with `chain` the expert model is trained from the generic one against it, and its vector is expert − generic."""
        from av_nbdev.models import load_model
        generic_dir = None
        for lvl, knob in (("generic", f"{d}_generic"), ("expert", f"{d}_expert")):
            pairs = level_pairs(train, d, lvl, generic_over if lvl == "generic" else ("avoidance", "generic"),
                                expert_weight if lvl == "expert" else 1)
            step_from = generic_dir if (chain and lvl == "expert") else None
            if sym_share: pairs = pairs + symmetric_anchor_pairs(train, d, sym_share, len(pairs), seed=LEVELS.index(lvl))
            elif anchor_share:
                ref = load_model(step_from, dtype=torch.float32)[0] if step_from else ctx["base"]
                pairs = pairs + anchor_pairs(train, d, lvl, ref, ctx["tok"], anchor_share, len(pairs))
            if sym_share:  # symmetric anchors: the stop rule reads the domain's own pairs only (`dpo_nll`, α may be 0)
                tag = f"{d}-{lvl}{'-from-generic' if step_from else ''}-s{cfg.steps}-sym{sym_share:g}" + (f"-nll{expert_nll:g}" if expert_nll and lvl == "expert" else "") \
                      + (f"-aw{anchor_weight:g}" if anchor_weight != 1.0 else "")
                stats = nll_model(out, tag, Path(step_from or base_dir), pairs, cfg, expert_nll if lvl == "expert" else 0.0, anchor_weight)
                vec(knob, d, lvl, stats, ref_dir=step_from)
                if lvl == "generic": generic_dir = stats["dir"]
                continue
            if step_from:
                tag = f"{d}-expert-from-generic-s{cfg.steps}" + (f"-anchor{anchor_share:g}" if anchor_share else "")
                if retain_gamma:
                    retain = [{"query": r["query"], "response": r["responses"][l]} for r in train if r["domain"] != d for l in LEVELS]
                    stats = retain_model(out, tag + f"-retain{retain_gamma:g}", Path(step_from), pairs, retain, cfg, retain_gamma)
                else: stats = (nll_model(out, tag + f"-nll{expert_nll:g}", Path(step_from), pairs, cfg, expert_nll) if expert_nll else
                               dpo_model(out, tag, Path(step_from), pairs, cfg))
                vec(knob, d, lvl, stats, ref_dir=step_from); continue
            tag = f"{d}-{lvl}" + (f"-s{cfg.steps}" if cfg.steps != 120 else "") + ("-over-" + "-".join(generic_over) if lvl == "generic" and generic_over != ("avoidance", "expert") else "") \
                  + (f"-anchor{anchor_share:g}" if anchor_share else "") + (f"-w{expert_weight}" if lvl == "expert" and expert_weight != 1 else "")
            if nll_alpha:  # the chosen (own-domain) responses' likelihood kept up as well
                stats = nll_model(out, tag + f"-nll{nll_alpha:g}", base_dir, pairs, cfg, nll_alpha)
            elif retain_gamma:  # other domains' queries with every level's response keep their likelihood
                retain = [{"query": r["query"], "response": r["responses"][l]} for r in train if r["domain"] != d for l in LEVELS]
                stats = retain_model(out, tag + f"-retain{retain_gamma:g}", base_dir, pairs, retain, cfg, retain_gamma)
            else: stats = plain_stats(d) if (lvl == "expert" and not anchor_share and cfg.steps == 120 and expert_weight == 1) else \
                dpo_model(out, tag, base_dir, pairs, cfg)
            vec(knob, d, lvl, stats)
            if lvl == "generic": generic_dir = stats["dir"]
    scheds, grid = {}, None
    if name in ("plain", "plain_orth"):
        for d in DOMAINS: vec(d, d, "expert", plain_stats(d))
        if name == "plain_orth": vectors = orthogonalised(vectors, domain_of)
        scheds = {d: dial_schedule([(0.0, {d: 0.0}), (1.0, {d: 1.0})]) for d in DOMAINS}
        grid = np.round(np.arange(-1.5, 3.01 if name == "plain" else 6.01, STEP), 2)
    elif name.startswith("ordinal"):
        parts = name.split("_")
        w = (1, 2, 1) if "ga2" in parts else (1, 1, 1)  # weights of the (E≻G, G≻A, E≻A) pairs
        share = next((float(p[6:]) for p in parts if p.startswith("anchor")), 0.0)
        for d in DOMAINS:
            pairs = (level_pairs(train, d, "expert", ("generic",), w[0]) + level_pairs(train, d, "generic", ("avoidance",), w[1])
                     + level_pairs(train, d, "expert", ("avoidance",), w[2]))
            if share:  # off-domain: the base's preferred level ≻ generic and ≻ expert
                n = len(pairs) // 2
                pairs = pairs + [p for lvl in ("generic", "expert")
                                 for p in anchor_pairs(train, d, lvl, ctx["base"], ctx["tok"], share, n, seed=LEVELS.index(lvl))]
            vec(d, d, "expert", dpo_model(out, f"{d}-{name}", base_dir, pairs, cfg))
        scheds = {d: dial_schedule([(0.0, {d: 0.0}), (1.0, {d: 1.0})]) for d in DOMAINS}
        grid = np.round(np.arange(-1.5, 3.01, STEP), 2)
    elif name.startswith("joint"):  # joint[_sN][_tT][_qQ][_nllA][_lowest][_floorF][_betaB]: `train.joint_dial_models`, N steps of T targets × Q queries per domain
        from av_nbdev.train import joint_dial_models, JOINT_DPO
        parts = name.split("_")
        t_per = next((int(p[1:]) for p in parts if p[:1] == "t" and p[1:].isdigit()), JOINT_DPO.grad_accum)
        q_per = next((int(p[1:]) for p in parts if p[:1] == "q" and p[1:].isdigit()), JOINT_DPO.batch_size // JOINT_DPO.grad_accum)
        jcfg = replace(JOINT_DPO, steps=next((int(p[1:]) for p in parts if p[:1] == "s" and p[1:].isdigit()), JOINT_DPO.steps),
                       grad_accum=t_per, batch_size=t_per * q_per,
                       beta=next((float(p[4:]) for p in parts if p.startswith("beta")), DPOConfig.beta))  # _betaB: DPO's β
        nll = next((float(p[3:]) for p in parts if p.startswith("nll")), 0.0)  # _nllA: the likelihood term's weight (default none)
        floor = next((float(p[5:]) for p in parts if p.startswith("floor")), 0.0)  # _floorF: the likelihood floor's weight
        m = joint_dial_models(base_dir, progress=False, dpo_cfg=jcfg, nll=nll, floor=floor, nll_lowest="lowest" in parts)
        jm = json.loads((m[DOMAINS[0]]["generic"].parent/"metrics.json").read_text())
        for d in DOMAINS:
            G, E = f"{d}_generic", f"{d}_expert"
            stats = lambda l: {"name": f"{name}-{d}-{l}", "steps": jm["steps"], "seconds": jm["seconds"] / (2 * len(DOMAINS)),
                               "final_margin": jm["train_margin"], "dir": str(m[d][l])}  # the joint run's time shared by its models
            vec(G, d, "generic", stats("generic"))
            vec(E, d, "expert", stats("expert"), ref_dir=m[d]["generic"])
            scheds[d] = dial_schedule(cumulative_knots(G, E))
        grid = np.round(np.arange(-0.5, 3.01, STEP), 2)
    elif name.startswith("perlevel"):  # perlevel[_anchorX][_orth][_handoff]
        parts = name.split("_")
        share = next((float(p[6:]) for p in parts if p.startswith("anchor")), 0.0)
        ew = next((int(p[2:]) for p in parts if p.startswith("ew")), 1)  # _ewN: the expert model's own pairs N times
        gamma = next((float(p[6:]) for p in parts if p.startswith("retain")), 0.0)  # _retainG: `dpo_retain` with γ=G
        alpha = next((float(p[3:]) for p in parts if p.startswith("nll")), 0.0)  # _nllA: `dpo_nll` with α=A
        e_alpha = next((float(p[4:]) for p in parts if p.startswith("enll")), 0.0)  # _enllA: the chained expert step only
        for d in DOMAINS: expert_generic(d, share, ("avoidance",) if "ga" in parts else ("avoidance", "expert"), ew, gamma, alpha,
                                         chain="chain" in parts, expert_nll=e_alpha,
                                         sym_share=next((float(p[3:]) for p in parts if p.startswith("sym")), 0.0),
                                         anchor_weight=next((float(p[2:]) for p in parts if p.startswith("aw")), 1.0))
        if "orth" in parts: vectors = orthogonalised(vectors, domain_of)
        g, e = ctx["generic_lam"].get(name, 1.0), ctx["expert_lam"].get(name, 1.0)
        for d in DOMAINS:
            G, E = f"{d}_generic", f"{d}_expert"
            if "handoff" in parts:  # generic up, then generic down while expert comes up (λ_generic not monotone)
                knots = [(0.0, {G: 0.0, E: 0.0}), (1.0, {G: g, E: 0.0}), (2.0, {G: 0.0, E: e}), (3.0, {G: 0.0, E: 2 * e})]
            else: knots = cumulative_knots(G, E, g, e)
            scheds[d] = dial_schedule(knots, monotone="handoff" not in parts)
        grid = np.round(np.arange(-0.5, 3.01, STEP), 2)
    else: raise SystemExit(f"unknown candidate {name!r}")
    return {"vectors": vectors, "domain_of": domain_of, "scheds": scheds, "grid": grid, "models": models,
            "train_seconds": float(sum(m["seconds"] for m in models))}


def run_candidate(name:str, ctx:dict, search:bool)->dict:
    t0 = time.perf_counter()
    c = build_candidate(name, ctx)
    b = Bench(ctx["base_dir"], c["vectors"], ctx["parts"])
    res = {"candidate": name, "train_seconds": c["train_seconds"], "models": c["models"],
           "monotone": all(monotone(c["scheds"][d], c["grid"]) for d in DOMAINS), "domains": {}}
    for d in DOMAINS:
        cal = calibrate_dial(b, d, c["scheds"][d], c["grid"], min_wf=ctx["min_wf"])
        st = cal["settings"]
        rep = report_levels(b, d, c["scheds"][d], st)
        leak = leakage(b, d, c["scheds"][d], st["expert"])
        qs = [r["query"] for r in ctx["parts"]["report"] if r["domain"] == d][:ctx["n_wf"]]
        wf = {lvl: (b.well_formed(c["scheds"][d](s), qs) if s is not None else None) for lvl, s in st.items()}
        res["domains"][d] = {"settings": st, "lambdas": {l: (c["scheds"][d](s) if s is not None else None) for l, s in st.items()},
                             "dial_tune": cal["dial_tune"], "dial_report": cal["dial_report"], "tune_well_formed": cal["tune_well_formed"],
                             "sweep": cal["sweep"].to_dict(orient="records"), "report": rep, **leak, "well_formed": wf}
        print(f"  {name} {d}: settings {st} dial(tune/report) {cal['dial_tune']}/{cal['dial_report']} "
              f"reached {[lvl for lvl in LEVELS if rep[lvl] and rep[lvl]['pooled_reached']]} "
              f"leak {leak['leakage_ratio']} shifts {leak['shifts']} wf {wf}", flush=True)
    res["calibration_evaluations"] = b.n_evals
    tuned = {d: res["domains"][d]["settings"] for d in DOMAINS}
    res["by_dials"] = targets_by_dials(b, c["scheds"], tuned)
    res["by_knots"] = targets_by_dials(b, c["scheds"], {d: dict(zip(LEVELS, (0.0, 1.0, 2.0))) for d in DOMAINS})  # the trained steps' own positions
    for k in ("by_dials", "by_knots"):
        print(f"  {name} {k}: {res[k]['reached']}/27 on the reporting half ({res[k]['tune_reached']}/27 tuning)", flush=True)
    if search and all(res["domains"][d]["settings"]["expert"] is not None for d in DOMAINS):
        st = {d: res["domains"][d]["settings"] for d in DOMAINS}  # probes: each dial at its tuned level settings
        probes = {d: sorted({st[d][l] for l in LEVELS if st[d][l] not in (None, 0.0)}) for d in DOMAINS}
        grid_pts = {d: c["grid"] for d in DOMAINS}
        res["surrogate"] = surrogate_search(b, c["scheds"], probes, grid_pts)
        print(f"  {name} surrogate: {res['surrogate']['reached']}/27 on the reporting half "
              f"({res['surrogate']['tune_reached']}/27 tuning) in {res['surrogate']['evaluations']} evaluations", flush=True)
        if not ctx["quick"]:
            res["grid"] = grid_search(b, c["scheds"], ctx["grid_points"][name] if name in ctx["grid_points"] else (0.0, 1.0, 2.0, 3.0))
            print(f"  {name} grid: {res['grid']['reached']}/27 ({res['grid']['tune_reached']}/27 tuning) "
                  f"in {res['grid']['evaluations']} evaluations", flush=True)
    res["seconds"] = time.perf_counter() - t0
    return res


def row(res:dict)->dict:
    "One line of the table."
    r = {"candidate": res["candidate"], "train_s": round(res["train_seconds"], 1), "monotone": res["monotone"]}
    for d in DOMAINS:
        x = res["domains"][d]
        reached = "".join(lvl[0].upper() if x["report"][lvl] and x["report"][lvl]["pooled_reached"] else "·" for lvl in LEVELS)
        unseen = "".join(lvl[0].upper() if x["report"][lvl] and x["report"][lvl]["unseen_reached"] else "·" for lvl in LEVELS)
        r[f"{d[:3]} levels(pool/unseen)"] = f"{reached}/{unseen}" + (" dial" if x["dial_tune"] and x["dial_report"] else "")
        lr = x["leakage_ratio"]
        r[f"{d[:3]} leak"] = None if lr is None else (round(lr, 2) if np.isfinite(lr) else lr)
        r[f"{d[:3]} E@exp"] = None if x.get("expert_share") is None else round(x["expert_share"], 2)
        wf = [v for v in x["well_formed"].values() if v is not None]
        r[f"{d[:3]} wf(min)"] = round(min(wf), 2) if wf else None
    for s in ("by_dials", "by_knots", "surrogate", "grid"):
        r[s] = f"{res[s]['reached']}/27 in {res[s]['evaluations']}" if s in res else None
    return r


def jsonable(x):
    "numpy scalars as Python numbers for json."
    if isinstance(x, np.bool_): return bool(x)
    if isinstance(x, np.integer): return int(x)
    if isinstance(x, np.floating): return float(x)
    return str(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/dial")
    ap.add_argument("--quick", action="store_true", help="three candidates (plain, per-level, the winner), no grid search")
    ap.add_argument("--only", default=None, help="comma-separated candidate names")
    ap.add_argument("--fresh", action="store_true", help="recompute results (models stay cached)")
    ap.add_argument("--search", default=f"plain,perlevel,{WINNER}", help="candidates that also get the multidomain searches")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-wf", type=float, default=0.8, help="well-formed share (tuning queries) a chosen setting must keep")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from av_nbdev.data import load_splits
    from av_nbdev.models import load_model
    from av_nbdev.train import tiny_pipeline, pipeline_metrics
    out = Path(a.out); (out/"results").mkdir(parents=True, exist_ok=True)
    paths = tiny_pipeline(progress=False)
    pm = pipeline_metrics(paths).set_index("domain")
    data = load_splits()
    base, tok = load_model(paths["base"], dtype=torch.float32)
    ctx = {"base_dir": paths["base"], "paths": paths, "train": data["train"], "parts": halves(data["test"]), "out": out,
           "quick": a.quick, "dpo_steps": 120, "base": base, "tok": tok, "n_wf": 16,
           "pipeline_metrics": {d: {"steps": int(pm.loc[d, "steps"]), "seconds": float(pm.loc[d, "seconds"]),
                                    "final_margin": float(pm.loc[d, "train_margin"])} for d in DOMAINS},
           "generic_lam": {}, "expert_lam": {}, "grid_points": {}, "min_wf": a.min_wf}
    names = a.only.split(",") if a.only else (["plain", "perlevel", WINNER] if a.quick else
             ["plain", "plain_orth", "ordinal", "ordinal_anchor1_s240", "perlevel", "perlevel_handoff",
              "perlevel_anchor0.5", "perlevel_anchor1", "perlevel_ga_anchor1_s240", "perlevel_ga_anchor1_s240_chain",
              "perlevel_ga_sym2_aw10_s240_chain", "perlevel_ga_anchor0.3_s240_chain", "perlevel_ga_anchor0.3_s240_chain_enll1",
              "joint", "joint_nll1", "joint_nll0.2", "joint_nll0.05", "joint_floor1", "joint_nll0.05_beta0.05", "joint_nll0.05_lowest_beta0.03", WINNER])
    rows = []
    for n in names:
        f = out/"results"/f"{n}{'-quick' if a.quick else ''}{'' if a.min_wf == 0.8 else f'-minwf{a.min_wf:g}'}.json"
        if f.exists() and not a.fresh: res = json.loads(f.read_text())
        else:
            print(f"== {n}", flush=True)
            res = run_candidate(n, ctx, n in a.search.split(","))
            f.write_text(json.dumps(res, default=jsonable))
        rows.append(row(res) | ({"min_wf": a.min_wf} if a.min_wf != 0.8 else {}))
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 250); pd.set_option("display.max_columns", 40)
    print(table.to_string(index=False))
    (out/f"table{'-quick' if a.quick else ''}.txt").write_text(table.to_string(index=False))


if __name__ == "__main__":
    main()
