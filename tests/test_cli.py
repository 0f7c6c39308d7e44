"""Black-box tests of the `av` command: run it as a user would (a subprocess) on tiny random checkpoints.

Every bad input of issue 3 must give exit code 2, exactly one line on stderr naming the file and/or tensor,
and leave no output (not even a temporary file) behind."""
import json, math, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

AV = [sys.executable, "-m", "av_nbdev.cli"] if os.environ.get("AV_CLI_MODULE") else \
     [str(Path(sys.executable).with_name("av"))]


def av(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*AV, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def tiny(seed, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def nudged(model, seed, scale=1e-2):
    import copy
    g, m = torch.Generator().manual_seed(seed), copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" not in n: p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def weights(folder):
    "All tensors of a checkpoint folder (any sharding)."
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")): out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    "base/, aligned/, aligned2/ (same base), other/ (a different base) and med.safetensors extracted by the CLI."
    d = tmp_path_factory.mktemp("ck")
    base = tiny(0)
    base.save_pretrained(d/"base", max_shard_size="40KB")  # several shards + index json
    nudged(base, 1).save_pretrained(d/"aligned", max_shard_size="40KB")
    nudged(base, 2).save_pretrained(d/"aligned2")
    tiny(5).save_pretrained(d/"other")
    r = av("extract", d/"base", d/"aligned", "-o", d/"med.safetensors", "--domain", "medical", "--level", "expert")
    assert r.returncode == 0, r.stderr
    r = av("extract", d/"base", d/"aligned2", "-o", d/"leg.safetensors", "--domain", "legal")
    assert r.returncode == 0, r.stderr
    return d


def listing(d): return sorted(p.name for p in Path(d).iterdir())


def assert_refused(r, *names, before=None, folder=None):
    "Exit 2, one line on stderr naming each of `names`, and the folder holds what it held before."
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in names: assert str(n) in lines[0], (n, lines[0])
    assert "Traceback" not in r.stderr
    if folder is not None: assert listing(folder) == before, set(listing(folder)) ^ set(before)


def bad_copy(ck, src, name):
    d = ck/name; shutil.rmtree(d, ignore_errors=True); shutil.copytree(ck/src, d); return d


def shard_of(d, tensor):
    idx = d/"model.safetensors.index.json"
    return d/json.loads(idx.read_text())["weight_map"][tensor] if idx.exists() else d/"model.safetensors"


def rewrite(d, tensor, fn):
    f = shard_of(d, tensor); sd = fn(load_file(f)); save_file(sd, f, metadata={"format": "pt"})


T = "model.layers.1.mlp.up_proj.weight"  # the tensor the bad copies break


# ---------------------------------------------------------------- happy paths
def test_help_explains_each_option():
    r = av("--help"); assert r.returncode == 0 and all(c in r.stdout for c in ("extract", "merge", "info"))
    r = av("extract", "--help")
    assert r.returncode == 0 and all(o in r.stdout for o in ("--dtype", "--domain", "--level", "--overwrite", "bfloat16"))
    r = av("merge", "--help")
    assert r.returncode == 0 and all(o in r.stdout for o in ("--av", "--method", "--density", "--seed",
                                                             "--allow-transfer", "--overwrite", "FILE=λ"))
    assert av().returncode == 2


@pytest.mark.parametrize("lams", [(-1.0,), (0.0,), (0.5,), (1.0,), (1.5,), (0.7, -0.4)])
def test_extract_then_merge_is_base_plus_lambda_delta(ck, tmp_path, lams):
    files = [ck/"med.safetensors", ck/"leg.safetensors"][:len(lams)]
    args = [a for f, l in zip(files, lams) for a in ("--av", f"{f}={l}")]
    r = av("merge", ck/"base", *args, "-o", tmp_path/"out")
    assert r.returncode == 0, r.stderr
    b, out = weights(ck/"base"), weights(tmp_path/"out")
    aligned = [weights(ck/"aligned"), weights(ck/"aligned2")]
    assert out.keys() == b.keys()
    for n in b:
        want = b[n].double() + sum(l * (a[n].double() - b[n].double()) for l, a in zip(lams, aligned))
        torch.testing.assert_close(out[n].double(), want, atol=1e-6, rtol=1e-6)
    assert (tmp_path/"out"/"config.json").exists()


def test_merged_checkpoint_loads_with_transformers(ck, tmp_path):
    from transformers import AutoModelForCausalLM
    assert av("merge", ck/"base", "--av", f"{ck/'med.safetensors'}=1", "-o", tmp_path/"m").returncode == 0
    m = AutoModelForCausalLM.from_pretrained(tmp_path/"m")
    ref = AutoModelForCausalLM.from_pretrained(ck/"aligned")
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(m(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_ties_and_dare_run(ck, tmp_path):
    for method in ("ties", "dare"):
        r = av("merge", ck/"base", "--av", f"{ck/'med.safetensors'}=1", "--av", f"{ck/'leg.safetensors'}=1",
               "--method", method, "--density", "0.5", "--seed", "3", "-o", tmp_path/method)
        assert r.returncode == 0, r.stderr
        assert weights(tmp_path/method).keys() == weights(ck/"base").keys()


def test_bfloat16_vector_is_the_rounded_float32_one(ck, tmp_path):
    r = av("extract", ck/"base", ck/"aligned", "-o", tmp_path/"half.safetensors", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    half, full = load_file(tmp_path/"half.safetensors"), load_file(ck/"med.safetensors")
    assert half.keys() == full.keys()
    for n in full: assert half[n].dtype == torch.bfloat16 and torch.equal(half[n], full[n].bfloat16()), n


def test_info_prints_metadata_and_tensors(ck):
    r = av("info", ck/"med.safetensors")
    assert r.returncode == 0, r.stderr
    for s in ("medical", "expert", "float32", "base fingerprint", T, "norm"): assert s in r.stdout, s


# ---------------------------------------------------------------- bad input and safety
def test_missing_path(ck):
    before = listing(ck)
    assert_refused(av("extract", ck/"nope", ck/"aligned", "-o", ck/"x.safetensors"), "nope", before=before, folder=ck)
    assert_refused(av("merge", ck/"base", "--av", f"{ck/'gone.safetensors'}=1", "-o", ck/"x"),
                   "gone.safetensors", before=before, folder=ck)
    assert_refused(av("info", ck/"gone.safetensors"), "gone.safetensors")


def test_truncated_and_corrupt_safetensors(ck):
    t = bad_copy(ck, "aligned", "truncated"); f = shard_of(t, T); f.write_bytes(f.read_bytes()[:200])
    before = listing(ck)
    assert_refused(av("extract", ck/"base", t, "-o", ck/"x.safetensors"), f.name, before=before, folder=ck)
    c = bad_copy(ck, "aligned", "corrupt"); f = shard_of(c, T); f.write_bytes(b"\xff" * 64 + f.read_bytes()[64:])
    before = listing(ck)
    assert_refused(av("extract", ck/"base", c, "-o", ck/"x.safetensors"), f.name, before=before, folder=ck)
    v = ck/"trunc_av.safetensors"; v.write_bytes((ck/"med.safetensors").read_bytes()[:1000])
    before = listing(ck)
    assert_refused(av("merge", ck/"base", "--av", f"{v}=1", "-o", ck/"x"), v.name, before=before, folder=ck)
    assert_refused(av("info", v), v.name)


def test_tensor_missing_on_one_side(ck):
    t = bad_copy(ck, "aligned2", "missing")  # single-file checkpoint
    rewrite(t, T, lambda sd: {k: v for k, v in sd.items() if k != T})
    before = listing(ck)
    assert_refused(av("extract", ck/"base", t, "-o", ck/"x.safetensors"), t, T, before=before, folder=ck)
    assert_refused(av("extract", t, ck/"base", "-o", ck/"x.safetensors"), T, before=before, folder=ck)


def test_shape_and_dtype_mismatch(ck):
    s = bad_copy(ck, "aligned2", "shape")
    rewrite(s, T, lambda sd: {**sd, T: torch.zeros(3, 3)})
    d = bad_copy(ck, "aligned2", "dtype")
    rewrite(d, T, lambda sd: {**sd, T: sd[T].to(torch.float16)})
    before = listing(ck)
    assert_refused(av("extract", ck/"base", s, "-o", ck/"x.safetensors"), s, T, "shape", before=before, folder=ck)
    assert_refused(av("extract", ck/"base", d, "-o", ck/"x.safetensors"), d, T, "dtype", before=before, folder=ck)


def test_nan_or_inf_in_checkpoint_or_vector(ck):
    n = bad_copy(ck, "aligned2", "nan")
    rewrite(n, T, lambda sd: {**sd, T: sd[T].index_fill(0, torch.tensor([0]), float("nan"))})
    i = bad_copy(ck, "aligned2", "inf")
    rewrite(i, T, lambda sd: {**sd, T: sd[T].index_fill(0, torch.tensor([0]), float("inf"))})
    before = listing(ck)
    assert_refused(av("extract", ck/"base", n, "-o", ck/"x.safetensors"), n, T, before=before, folder=ck)
    assert_refused(av("extract", ck/"base", i, "-o", ck/"x.safetensors"), i, T, before=before, folder=ck)
    # a vector file with an Inf inside (header metadata intact)
    from safetensors import safe_open
    with safe_open(ck/"med.safetensors", "pt") as f: meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    sd[T] = sd[T].index_fill(0, torch.tensor([0]), float("inf"))
    bad = ck/"inf_av.safetensors"; save_file(sd, bad, metadata=meta)
    before = listing(ck)
    assert_refused(av("merge", ck/"base", "--av", f"{bad}=1", "-o", ck/"x"), bad, T, before=before, folder=ck)


@pytest.mark.parametrize("lam", ["nan", "inf", "-inf", "lots", ""])
def test_non_finite_or_bad_lambda(ck, lam):
    before = listing(ck)
    assert_refused(av("merge", ck/"base", "--av", f"{ck/'med.safetensors'}={lam}", "-o", ck/"x"),
                   "med.safetensors", before=before, folder=ck)


def test_different_base_needs_allow_transfer(ck, tmp_path):
    before = listing(ck)
    r = av("merge", ck/"other", "--av", f"{ck/'med.safetensors'}=1", "-o", ck/"x")
    assert_refused(r, "med.safetensors", "--allow-transfer", before=before, folder=ck)
    r = av("merge", ck/"other", "--av", f"{ck/'med.safetensors'}=1", "-o", tmp_path/"t", "--allow-transfer")
    assert r.returncode == 0, r.stderr
    o, b, v = weights(tmp_path/"t"), weights(ck/"other"), load_file(ck/"med.safetensors")
    torch.testing.assert_close(o[T], b[T] + v[T])


def test_existing_output_needs_overwrite(ck, tmp_path):
    out = tmp_path/"av.safetensors"; out.write_text("keep me")
    assert_refused(av("extract", ck/"base", ck/"aligned", "-o", out), out, before=["av.safetensors"], folder=tmp_path)
    assert out.read_text() == "keep me"
    assert av("extract", ck/"base", ck/"aligned", "-o", out, "--overwrite").returncode == 0
    od = tmp_path/"merged"; od.mkdir(); (od/"mine.txt").write_text("keep")
    before = listing(tmp_path)
    assert_refused(av("merge", ck/"base", "--av", f"{out}=1", "-o", od), od, before=before, folder=tmp_path)
    assert listing(od) == ["mine.txt"]
    assert av("merge", ck/"base", "--av", f"{out}=1", "-o", od, "--overwrite").returncode == 0
    assert (od/"config.json").exists() and not (od/"mine.txt").exists()


def test_demo_refuses_a_model_it_cannot_use(tmp_path):
    "A bad --model is refused in one line before the report folder is created."
    for model, named in ((tmp_path/"none.gguf", "none.gguf"), (tmp_path, "config.json")):
        assert_refused(av("demo", "--model", model, "--out", tmp_path/"report"), named)
        assert not (tmp_path/"report").exists()
    # anchored vectors need the tiny pipeline: asking for them with a real model is refused the same way
    assert_refused(av("demo", "--model", "smollm2", "--anchored", "--out", tmp_path/"report"), "tiny-model stages")
    assert not (tmp_path/"report").exists()


# ---------------------------------------------------------------- LoRA adapters in, LoRA adapters out
def peft_adapter(base, folder, **cfg):
    "Save a PEFT LoRA adapter with B ≠ 0 on a copy of `base`; return PEFT's merge_and_unload() model."
    import copy, warnings
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **cfg))
        for n, w in p.named_parameters():
            if "modules_to_save" in n: w.data.add_(torch.randn_like(w), alpha=0.1)
        p.save_pretrained(folder)
        return p.merge_and_unload()


@pytest.fixture(scope="module")
def adapter(ck):
    "A rsLoRA adapter with a rank pattern, a LoRA embedding and a norm in modules_to_save, and PEFT's merged model."
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(ck/"base")
    merged = peft_adapter(base, ck/"adapter", r=4, lora_alpha=8, use_rslora=True, modules_to_save=["model.norm"],
                          target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                          rank_pattern={"layers.0.mlp.down_proj": 2}, alpha_pattern={"v_proj": 2})
    return base, merged


def test_extract_from_adapter_is_peft_merge(ck, adapter, tmp_path):
    base, merged = adapter
    r = av("extract", ck/"base", ck/"adapter", "-o", tmp_path/"ad.safetensors")
    assert r.returncode == 0, r.stderr
    got = load_file(tmp_path/"ad.safetensors")
    want = {n: t - base.state_dict()[n] for n, t in merged.state_dict().items() if not torch.equal(t, base.state_dict()[n])}
    assert want and all(float(d.abs().max()) > 1e-3 for d in want.values())  # ΔW ≠ 0
    dense = {n: got[n + "::B"] @ got[n + "::A"] if n + "::A" in got else got[n] for n in want}
    for n, d in want.items(): assert torch.allclose(dense[n], d, atol=1e-6), n
    assert set(got) == {k for n in want for k in ((n + "::A", n + "::B") if n != "model.norm.weight" else (n,))}
    info = av("info", tmp_path/"ad.safetensors")
    assert info.returncode == 0 and "source: adapter" in info.stdout and "rank 2  norm" in info.stdout, info.stdout


def test_adapter_that_is_not_plain_lora_is_refused(ck, adapter):
    for key, value in (("use_dora", True), ("peft_type", "IA3"), ("layer_replication", [[0, 1]])):
        d = bad_copy(ck, "adapter", f"ad-{key}")
        (d/"adapter_config.json").write_text(json.dumps({**json.loads((d/"adapter_config.json").read_text()), key: value}))
        before = listing(ck)
        assert_refused(av("extract", ck/"base", d, "-o", ck/"x.safetensors"), d, key if key != "peft_type" else "IA3",
                       before=before, folder=ck)
    before = listing(ck)  # an adapter for another architecture: its keys match no base tensor
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1))
    peft_adapter(wide, ck/"ad-wide", r=2, lora_alpha=2, target_modules=["q_proj"])
    before = listing(ck)
    assert_refused(av("extract", ck/"base", ck/"ad-wide", "-o", ck/"x.safetensors"), ck/"ad-wide", "match no tensor of the base",
                   before=before, folder=ck)


def test_cast_extracts_bf16_base_with_fp32_finetune(ck, tmp_path):
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(ck/"base").to(torch.bfloat16).save_pretrained(tmp_path/"base16")
    r = av("extract", tmp_path/"base16", ck/"aligned", "-o", tmp_path/"x.safetensors")
    assert r.returncode == 2 and "--cast" in r.stderr and not (tmp_path/"x.safetensors").exists(), r.stderr
    r = av("extract", tmp_path/"base16", ck/"aligned", "-o", tmp_path/"x.safetensors", "--cast")
    assert r.returncode == 0, r.stderr
    got, b16, a = load_file(tmp_path/"x.safetensors"), weights(tmp_path/"base16"), weights(ck/"aligned")
    assert got and all(torch.equal(got[n], a[n] - b16[n].float()) for n in got)


def test_export_lora_loads_in_peft_as_base_plus_vector(ck, tmp_path):
    import copy, warnings
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base, aligned = (AutoModelForCausalLM.from_pretrained(ck/n).eval() for n in ("base", "aligned"))
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    want = aligned(ids).logits.detach()  # base + 1·AV
    gaps = {}
    for rank in (None, 2):
        out = tmp_path/f"lora-{rank}"
        r = av("export-lora", ck/"med.safetensors", "-o", out, *(["--rank", rank] if rank else []))
        assert r.returncode == 0, r.stderr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()(ids).logits.detach()
        gaps[rank] = float((got - want).abs().max())
    assert gaps[None] < 1e-4 < gaps[2], gaps  # exact at full rank (fp32 rounding), not at rank 2
    cfg = json.loads((tmp_path/"lora-2"/"adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 2 and cfg["base_model_name_or_path"] == str(ck/"base")
    before = listing(tmp_path)
    assert_refused(av("export-lora", ck/"med.safetensors", "-o", tmp_path/"lora-2", "--rank", "2"), "output exists",
                   before=before, folder=tmp_path)
