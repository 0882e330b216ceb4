"""Tests: olmo.py against reference logits made by Hugging Face transformers (fixtures/make_fixtures.py),
and, where transformers is installed, against the reference classes directly."""

import copy
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ai2_checkpoints
import generate
import olmo
import quantize
import sample
import speed
import tp
sys.path.insert(0, str(Path(__file__).parent / "notebooks"))  # the notebooks' exercise checks and solutions
import checks  # noqa: E402
import solutions  # noqa: E402

torch.set_grad_enabled(False)
# torch.compile's on-disk cache does not tell kernels compiled under one ATEN_CPU_CAPABILITY from another's, and
# reused them wrongly (logits off by 0.8 after a run with the native setting, PyTorch 2.13): one cache per setting
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) /
                                                     f"torchinductor_olmo_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZERS = FIXTURES / "tokenizers"  # the real OLMo tokenizer files (fixtures/tokenizers/README.md)
DENSE = ["olmo1", "olmo1_tied_clip", "olmo2", "olmo2_gqa", "olmo3"]
MOE = ["olmoe", "olmoe_clip_norm", "flex_olmo"]
CASES = DENSE + MOE + ["olmo_hybrid"]
# Float32 against a fixture made on another machine: kernels differ between CPUs (AVX2, AVX512, AMX, Arm, a GPU)
# and sum in other orders, so logits move in their last bits, more the longer and deeper the computation. Measured
# over ATEN_CPU_CAPABILITY=default/avx2/avx512 with ONEDNN_MAX_CPU_ISA/MKL_ENABLE_INSTRUCTIONS=AVX2 (README, Tests):
# up to 1.3e-6 of the largest logit on the 24-token fixtures, 4.1e-6 on the 150-token hybrid, the reference itself
# alike. Compared live, on one machine, we stay at F32_TOL (absolute).
F32_RTOL = 1e-5
F32_TOL = 1e-5
# Gated DeltaNet decodes with the token-by-token form of its recurrence and reads prompts with the chunked form:
# in float32 the two differ in the last bits, which 150 steps add up. The reference's own cached decoding differs
# from its full forward by 3.0e-5 on the olmo_hybrid fixture (ours: 3.2e-5).
HYBRID_STEP_TOL = 1e-4
FIXTURE_YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                "beta_slow": 1, "attention_factor": 1.2079441541679836}  # as in make_fixtures.py


# ---- helpers shared by the sections ----------------------------------------------------------------------------


def load(case, attn="sdpa", dtype=None):
    return olmo.OlmoForCausalLM.from_pretrained(FIXTURES / case, dtype=dtype, attn_implementation=attn)


def reference(case):
    return torch.load(FIXTURES / case / "reference.pt")


def reference_classes(family):
    transformers = pytest.importorskip("transformers")
    return {"olmo": (transformers.OlmoForCausalLM, transformers.OlmoConfig),
            "olmo2": (transformers.Olmo2ForCausalLM, transformers.Olmo2Config),
            "olmo3": (transformers.Olmo3ForCausalLM, transformers.Olmo3Config),
            "olmoe": (transformers.OlmoeForCausalLM, transformers.OlmoeConfig),
            "flex_olmo": (transformers.FlexOlmoForCausalLM, transformers.FlexOlmoConfig),
            "olmo_hybrid": (transformers.OlmoHybridForCausalLM, transformers.OlmoHybridConfig)}[family]


def with_config(model, **changes):
    """A copy of model with the same weights and a changed config."""
    config = copy.deepcopy(model.config)
    for k, v in changes.items():
        setattr(config, k, v)
    config.__post_init__()
    other = olmo.OlmoForCausalLM(config)
    other.load_state_dict(model.state_dict())
    return other.eval()


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def assert_close_to_fixture(logits, expected):
    """Float32 logits against a fixture's, to F32_RTOL of its largest logit (see F32_RTOL)."""
    tol = F32_RTOL * expected.abs().max().item()
    assert max_diff(logits, expected) <= tol, f"max |difference| {max_diff(logits, expected):.2e} > {tol:.2e}"


# PyTorch 2.13's bfloat16 flash-attention kernel, on a CPU with AMX, packs its blocks with AVX512 code and raises
# this when ATEN_CPU_CAPABILITY asks for less (a setting that makes such a CPU imitate a smaller one; a real AVX2
# CPU has no AMX and takes another path). The reference and we call the same kernel, so both fail alike there.
TORCH_SDPA_BUG = "pack_vnni2 is only supported when avx512 is supported"


def skip_on_torch_sdpa_bug(f, *args, **kwargs):
    try:
        return f(*args, **kwargs)
    except RuntimeError as e:
        if TORCH_SDPA_BUG not in str(e):
            raise
        pytest.skip(f"PyTorch's bfloat16 SDPA kernel under ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')} "
                    f"on an AMX CPU: {TORCH_SDPA_BUG}")


_live = {}


def live_reference(case, dtype, attn="sdpa"):
    """The reference's output (logits, and a mixture's router logits) on the fixture's input, computed here and now:
    in bfloat16 the kernels of this machine decide the last bits, so a stored fixture would be another machine's."""
    if (case, dtype, attn) not in _live:
        transformers = pytest.importorskip("transformers")
        model = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / case, dtype=dtype, attn_implementation=attn)
        ids = reference(case)["input_ids"]
        _live[case, dtype, attn] = skip_on_torch_sdpa_bug(model.eval(), input_ids=ids, output_router_logits=case in MOE)
    return _live[case, dtype, attn]


def decode_in_chunks(model, ids, chunks, static=False):
    """The logits of ids fed through a KV cache a chunk at a time, and the cache."""
    cache, start, out = model.new_cache(ids.shape[0], ids.shape[1], static=static), 0, []
    for n in chunks:
        out.append(model(ids[:, start:start + n], cache=cache)[0])
        start += n
    return torch.cat(out, 1), cache


def _folder(tmp_path, case="olmo2"):
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((FIXTURES / case / f).read_bytes())
    return tmp_path


def _edit_config(folder, **changes):
    c = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**c, **changes}))


def _write_state(folder, state):
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")


DOLMA2 = dict(eos_token_id=100257, pad_token_id=100277)
E2E = {  # family: (tokenizer file, vocab rows, extra config)
    "olmo": ("allenai_gpt-neox-olmo-dolma-v1_5.json", 50304, dict(clip_qkv=0.5, eos_token_id=50279, pad_token_id=1)),
    "olmo2": ("allenai_dolma2.json", 100352, dict(num_key_value_heads=1, **DOLMA2)),
    "olmo3": ("allenai_dolma2.json", 100278, dict(sliding_window=6, rope_scaling={**FIXTURE_YARN, "original_max_position_embeddings": 16},
                                                   **DOLMA2)),
    "olmoe": ("allenai_gpt-neox-olmo-dolma-v1_5.json", 50304, dict(num_experts=8, num_experts_per_tok=2, eos_token_id=50279,
                                                                    pad_token_id=1)),
    "flex_olmo": ("allenai_dolma2.json", 100352, dict(num_experts=3, num_experts_per_tok=2, num_key_value_heads=1, **DOLMA2)),
    "olmo_hybrid": ("allenai_dolma2.json", 100352, dict(linear_num_key_heads=1, linear_key_head_dim=16, **DOLMA2,
                                                         rope_parameters={"rope_type": "default", "rope_theta": None})),
}


def e2e_checkpoint(family, folder, chat_template=None, max_shard_size=None):
    """A tiny random reference model saved with a real tokenizer, as a released checkpoint folder looks."""
    tok_file, vocab, extra = E2E[family]
    cls, cfg = reference_classes(family)
    config = cfg(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                 max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    model = cls(config).eval()
    for name, p in model.named_parameters():  # logits that spread, so greedy picks are far from ties
        p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    (folder / "tokenizer.json").write_bytes((TOKENIZERS / tok_file).read_bytes())
    tok_config = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template:
        tok_config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return cls


def run_sample(*args, stdin=None):
    return subprocess.run([sys.executable, str(Path(__file__).parent / "sample.py"), *args], capture_output=True,
                          text=True, input=stdin, timeout=300)


# ---- config ----------------------------------------------------------------------------------------------------


def test_config_reads_transformers4_and_transformers5_styles():
    v5 = json.loads((FIXTURES / "olmo3" / "config.json").read_text())
    assert "rope_parameters" in v5
    full = v5["rope_parameters"]["full_attention"]
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
    v4["rope_theta"] = full["rope_theta"]
    v4["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    a, b = olmo.OlmoConfig.from_dict(v5), olmo.OlmoConfig.from_dict(v4)
    assert a == b
    assert a.rope_scaling["factor"] == 8.0 and a.sliding_window == 8 and a.layer_types[3] == "full_attention"
    v2 = json.loads((FIXTURES / "olmo2" / "config.json").read_text())  # transformers 5, not per layer type
    assert olmo.OlmoConfig.from_dict(v2).rope_theta == v2["rope_parameters"]["rope_theta"]
    bare = {k: v for k, v in v2.items() if k != "rope_parameters"}  # the reference's defaults when absent
    assert olmo.OlmoConfig.from_dict(bare).rope_theta == 10000.0
    assert olmo.OlmoConfig.from_dict({**bare, "model_type": "olmo3", "sliding_window": 4}).rope_theta == 500000.0
    # keys a config.json leaves out take the reference's defaults for the family: released OLMoE configs carry no
    # rms_norm_eps (1e-5 then, as OLMo 2/3's reference default), and no expert counts need be given
    no_eps = {k: v for k, v in bare.items() if k != "rms_norm_eps"}
    assert olmo.OlmoConfig.from_dict(no_eps).rms_norm_eps == 1e-5
    olmoe = olmo.OlmoConfig.from_dict({**no_eps, "model_type": "olmoe"})
    assert (olmoe.rms_norm_eps, olmoe.num_experts, olmoe.num_experts_per_tok, olmoe.rope_theta) == (1e-5, 64, 8, 10000.0)
    assert olmo.OlmoConfig.from_dict({**no_eps, "model_type": "flex_olmo"}).num_experts_per_tok == 5


def test_config_errors_are_clear(tmp_path):
    good = json.loads((FIXTURES / "olmo2" / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type 'llama' is not an OLMo model"):
        olmo.OlmoConfig.from_dict({**good, "model_type": "llama"})
    with pytest.raises(ValueError, match="missing key.*hidden_size"):
        olmo.OlmoConfig.from_dict({k: v for k, v in good.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="only YaRN"):
        olmo.OlmoConfig.from_dict({**good, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(FileNotFoundError, match="no config file"):
        olmo.OlmoConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        olmo.OlmoConfig.from_json(tmp_path / "config.json")


def test_presets():
    names = list(olmo.PRESETS)
    assert len(names) == 15
    c = olmo.OlmoConfig.from_name("allenai/Olmo-3-1025-7B-Instruct")
    assert c.layer_types[:4] == ["sliding_attention"] * 3 + ["full_attention"] and c.sliding_window == 4096
    assert olmo.OlmoConfig.from_name("OLMo-2-0325-32B").num_key_value_heads == 8
    with torch.device("meta"):  # parameter counts of the released sizes, without allocating them
        n = sum(p.numel() for p in olmo.OlmoForCausalLM(olmo.OlmoConfig.from_name("OLMo-1B-hf")).parameters())
        assert round(n / 1e9, 2) == 1.18  # OLMo-1B: tied head
        n = sum(p.numel() for p in olmo.OlmoForCausalLM(olmo.OlmoConfig.from_name("OLMo-2-0425-1B")).parameters())
        assert round(n / 1e9, 2) == 1.48
        model = olmo.OlmoForCausalLM(olmo.OlmoConfig.from_name("OLMoE-1B-7B-0924"))
        total = sum(p.numel() for p in model.parameters())
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        assert round(total / 1e9, 1) == 6.9 and round((total - experts * (1 - 8 / 64)) / 1e9, 1) == 1.3  # "1B-7B"
        n = sum(p.numel() for p in olmo.OlmoForCausalLM(olmo.OlmoConfig.from_name("FlexOlmo-7x7B-1T")).parameters())
        assert round(n / 1e9) == 33  # "33B total parameters" (its model card)
    c = olmo.OlmoConfig.from_name("Olmo-Hybrid-7B")
    assert c.layer_types.count("linear_attention") == 24 and c.rope_theta is None and c.linear_key_head_dim == 96
    with pytest.raises(ValueError, match="unknown preset"):
        olmo.OlmoConfig.from_name("OLMo-9B")


# ---- exactness against the reference ---------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES)
def test_float32_logits_match_reference(case, attn):
    ref = reference(case)
    logits, _ = load(case, attn)(ref["input_ids"])
    assert logits.dtype == torch.float32
    assert_close_to_fixture(logits, ref["logits"])


def routing(router_logits, k):
    """Per layer: each token's router probabilities (N, E) and chosen experts (N, k), as the reference chooses them."""
    out = []
    for logits in router_logits:
        probs = F.softmax(logits.float(), -1)
        out.append((probs, probs.topk(k, -1).indices.sort(-1).values))
    return out


def routed_alike(a, b, shape):
    """(B, T) True where two routings chose the same experts in every layer for this token and all before it in its
    row (attention carries an earlier token's difference into the later ones)."""
    same = torch.stack([(ca == cb).all(-1) for (_, ca), (_, cb) in zip(a, b)]).all(0).view(shape)
    return same.int().cummin(-1).values.bool()


def assert_routes_as_the_reference(model, logits, ref16, ref32):
    """A mixture in bfloat16 whose sums run in another order than the reference's: where a token's k-th and
    (k+1)-th router probabilities are closer than rounding moves them, either choice is right and the logits after
    it may differ by a whole expert's output. Rounding's size is the reference's own: its bfloat16 router
    probabilities and logits against its float32 ones, where those two routed alike. Elsewhere the choices must be
    the reference's, and where every choice so far was, the logits must be as close as the reference's own."""
    k, shape = model.config.num_experts_per_tok, logits.shape[:2]
    ours = routing([layer.mlp.router_logits for layer in model.model.layers], k)
    r16, r32 = routing(ref16.router_logits, k), routing(ref32.router_logits, k)
    clean = routed_alike(r16, r32, shape).flatten()
    prob_error = max(max_diff(p16[clean], p32[clean]) for (p16, _), (p32, _) in zip(r16, r32))
    logit_error = max_diff(ref16.logits[clean.view(shape)], ref32.logits[clean.view(shape)])
    decided = ties = 0
    for (_, chosen), (p16, ref_chosen) in zip(ours, r16):
        top = p16.topk(k + 1, -1).values if k < p16.shape[-1] else None
        clear = top[:, k - 1] - top[:, k] > prob_error if top is not None else torch.ones(len(p16), dtype=torch.bool)
        assert torch.equal(chosen[clear], ref_chosen[clear]), "a router choice the reference makes by a clear margin"
        decided, ties = decided + clear.sum().item(), ties + (~clear).sum().item()
    same = routed_alike(ours, r16, shape)
    assert decided > ties and same.any(), (decided, ties)
    assert max_diff(logits[same], ref16.logits[same]) <= logit_error


@pytest.mark.parametrize("matmul", ["bfloat16", "float32"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES)
def test_bfloat16_logits_match_the_live_reference(case, attn, matmul, monkeypatch):
    # bfloat16 keeps 8 significant bits: logits of size ~4 round in steps of 1/32, and which way each rounding goes
    # depends on the order of the sums, that is, on this machine's kernels. So the reference runs here, now.
    # - Prompt products in bfloat16 (speed.prompt_matmul): we call the same kernels as the reference on the same
    #   inputs in the same order, so on any machine the logits are the same bits. Any change of what is rounded
    #   when (OLMoE's norm rounding first, RoPE's cos/sin in bfloat16, a softmax in bfloat16) breaks that.
    # - Prompt products in float32 (what CPUs without fast bfloat16 run): the sums run in another order, so a last
    #   bit differs here and there. Bound: the reference's own bfloat16 error, its bfloat16 logits against its
    #   float32 ones, measured on this machine.
    monkeypatch.setenv("OLMO_PROMPT_MATMUL", matmul)
    ref16, ref32 = live_reference(case, torch.bfloat16, attn), live_reference(case, torch.float32, attn)
    model = load(case, attn, torch.bfloat16)
    logits = skip_on_torch_sdpa_bug(model, reference(case)["input_ids"])[0]
    assert logits.dtype == torch.bfloat16
    if matmul == "bfloat16":
        assert max_diff(logits, ref16.logits) == 0
    elif case in MOE:
        assert_routes_as_the_reference(model, logits, ref16, ref32)
    else:
        ref_error = max_diff(ref16.logits, ref32.logits)
        assert max_diff(logits, ref16.logits) <= ref_error
        assert max_diff(logits, ref32.logits) <= 1.5 * ref_error


@pytest.mark.parametrize("case", CASES)
def test_loss_matches_reference(case):
    ref = reference(case)
    ids = ref["input_ids"]
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # next token; none for the last
    _, loss = load(case)(ids, targets)
    assert abs(loss.item() - ref["loss"].item()) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_eager_and_sdpa_agree(case):
    ids = reference(case)["input_ids"]
    assert max_diff(load(case, "eager")(ids)[0], load(case, "sdpa")(ids)[0]) < F32_TOL


# ---- live cross-check against transformers ---------------------------------------------------------------------


def _random_configs():
    import random
    rng = random.Random(0)
    for family in ["olmo", "olmo2", "olmo3", "olmoe", "flex_olmo", "olmo_hybrid"] * 2:
        H = rng.choice([2, 4])
        d = dict(model_type=family, vocab_size=rng.randint(50, 200), hidden_size=16 * H, num_attention_heads=H,
                 num_key_value_heads=rng.choice([k for k in (1, 2, H) if H % k == 0]) if family != "olmo" else H,
                 intermediate_size=rng.choice([40, 64]), num_hidden_layers=rng.randint(1, 5),
                 max_position_embeddings=128, pad_token_id=0, eos_token_id=1)
        if family in ("olmoe", "flex_olmo"):
            d["num_experts"] = rng.choice([4, 6])
            d["num_experts_per_tok"] = rng.choice([1, 2, 3])
            d["norm_topk_prob"] = rng.random() < 0.5
        if family == "olmoe":
            d["clip_qkv"] = rng.choice([None, 1.0])
        if family == "olmo_hybrid":  # the linear layers' heads and dims differ from the attention layers'
            d["num_hidden_layers"] = rng.randint(2, 5)
            d["layer_types"] = ["full_attention"] + [rng.choice(["linear_attention", "full_attention"])
                                                     for _ in range(d["num_hidden_layers"] - 2)] + ["linear_attention"]
            d["linear_num_key_heads"] = rng.choice([1, 2])
            d["linear_num_value_heads"] = d["linear_num_key_heads"] * rng.choice([1, 2, 3])
            d["linear_key_head_dim"], d["linear_value_head_dim"] = rng.choice([8, 16]), rng.choice([8, 12, 24])
            d["linear_allow_neg_eigval"] = rng.random() < 0.5
            d["linear_conv_kernel_dim"] = rng.choice([2, 4])
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": rng.choice([None, 10000.0])}
        if family == "olmo":
            d["clip_qkv"] = rng.choice([None, 0.5])
            d["tie_word_embeddings"] = rng.random() < 0.5
        else:
            d["rms_norm_eps"] = rng.choice([1e-5, 1e-6])
        if family == "olmo3":
            d["sliding_window"] = rng.randint(3, 10)
            d["rope_scaling"] = {"rope_type": "yarn", "factor": rng.choice([2.0, 8.0]),
                                 "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}
        yield d


@pytest.mark.parametrize("d", list(_random_configs()), ids=lambda d: f"{d['model_type']}-L{d['num_hidden_layers']}")
def test_live_cross_check_against_transformers(d, tmp_path):
    ref_cls, cfg_cls = reference_classes(d["model_type"])
    torch.manual_seed(0)
    ref = ref_cls(cfg_cls(**{k: v for k, v in d.items() if k != "model_type"})).eval()
    for name, p in ref.named_parameters():  # norm weights away from 1, so they are tested too
        if "norm" in name:
            p.copy_(1 + 0.3 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    ours = olmo.OlmoForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(2, d["vocab_size"], (2, 80))  # 80 tokens: more than one chunk of Gated DeltaNet
    expected = ref(input_ids=ids).logits
    assert max_diff(ours(ids)[0], expected) < F32_TOL
    cache = ours.new_cache(2, 80)
    stepped = torch.cat([ours(ids[:, :67], cache=cache)[0]] + [ours(ids[:, t:t + 1], cache=cache)[0] for t in range(67, 80)], 1)
    assert max_diff(stepped, expected) < (HYBRID_STEP_TOL if d["model_type"] == "olmo_hybrid" else F32_TOL)


# ---- every feature is live: turning it off changes the logits --------------------------------------------------


@pytest.mark.parametrize("case,change", [
    ("olmo1_tied_clip", dict(clip_qkv=None)),
    ("olmo3", dict(sliding_window=16)),
    ("olmo3", dict(layer_types=["full_attention"] * 4)),
    ("olmo3", dict(rope_scaling={**FIXTURE_YARN, "factor": 4.0})),
    ("olmo3", dict(rope_scaling=None)),
    ("olmo2", dict(rope_theta=10000.0)),
    ("olmoe_clip_norm", dict(norm_topk_prob=False)),
    ("olmoe_clip_norm", dict(clip_qkv=None)),
    ("olmoe", dict(num_experts_per_tok=3)),
])
def test_feature_changes_logits(case, change):
    model, ids = load(case), reference(case)["input_ids"]
    assert max_diff(with_config(model, **change)(ids)[0], model(ids)[0]) > 1e-2


def test_yarn_only_on_full_attention_layers():
    # YaRN applied to every layer (the transformers 5.2 regression) must not match the reference
    model, ids = load("olmo3"), reference("olmo3")["input_ids"]
    rope = model.model.rope
    model.model.rope = lambda yarn, device: rope(True, device)
    wrong, _ = model(ids)
    assert max_diff(wrong, reference("olmo3")["logits"]) > 1e-2


def test_tied_head_shares_the_embedding():
    model = load("olmo1_tied_clip")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in olmo.read_safetensors(FIXTURES / "olmo1_tied_clip" / "model.safetensors")


# ---- left-padded batches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_batch_matches_reference_and_single_prompts(attn):
    ref, model = reference("olmo3"), load("olmo3", attn)
    ids, mask = ref["padded_ids"], ref["padded_mask"]
    logits, _ = model(ids, attention_mask=mask)
    real = mask.bool()
    assert_close_to_fixture(logits[real], ref["padded_logits"][real])
    alone, _ = model(ids[:1, 5:])  # row 0 without its 5 pads
    assert max_diff(logits[0, 5:], alone[0]) < F32_TOL
    alone, _ = model(ids[1:])
    assert max_diff(logits[1], alone[0]) < F32_TOL
    assert torch.isfinite(logits).all()  # padding queries see themselves: no empty softmax, no NaN


def test_padded_batch_with_cache():
    ref, model = reference("olmo3"), load("olmo3")
    ids, mask = ref["padded_ids"], ref["padded_mask"]
    full, _ = model(ids, attention_mask=mask)
    cache = model.new_cache(2, 24)
    out = [model(ids[:, :10], cache=cache, attention_mask=mask[:, :10])[0]]
    for t in range(10, 24):
        out.append(model(ids[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1])[0])
    real = mask.bool()
    assert max_diff(torch.cat(out, 1)[real], full[real]) < F32_TOL


def test_attention_mask_shape_is_checked():
    model = load("olmo2")
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, 3\)"):
        model(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 4))


# ---- mixture of experts (OLMoE, FlexOlmo) ----------------------------------------------------------------------


@pytest.mark.parametrize("case", MOE)
def test_loss_with_router_load_balancing_matches_reference(case):
    ref, model = reference(case), load(case)
    ids = ref["input_ids"]
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    model.config.output_router_logits = True  # as the reference's output_router_logits=True
    _, loss = model(ids, targets)
    assert abs(loss.item() - ref["loss_with_aux"].item()) < 1e-5
    assert loss.item() - ref["loss"].item() > 1e-3  # the auxiliary term is there


def test_load_balancing_loss_with_padding_matches_reference():
    transformers = pytest.importorskip("transformers")
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func
    torch.manual_seed(0)
    logits = [torch.randn(2 * 9, 8) for _ in range(3)]  # 3 layers, batch 2 x 9 tokens, 8 experts
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    for m in (None, mask):
        expected = load_balancing_loss_func(tuple(logits), 8, 2, m)
        assert abs(olmo.load_balancing_loss(logits, 2, m).item() - expected.item()) < 1e-6


def test_a_routing_tie_breaks_as_the_reference_breaks_it(monkeypatch):
    # experts 2 and 5 get the same router row, so every token ties them exactly (in bfloat16 too). Where the tie
    # falls at the k-th place, one of the two is chosen, and the two experts compute different things: the choice
    # must come from the same float32 softmax and torch.topk as the reference's to give its logits.
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("OLMO_PROMPT_MATMUL", "bfloat16")  # the reference's kernels: the same bits
    ids = reference("olmoe")["input_ids"]
    ref = transformers.OlmoeForCausalLM.from_pretrained(FIXTURES / "olmoe", dtype=torch.bfloat16).eval()
    ours = load("olmoe", dtype=torch.bfloat16)
    for model in (ref, ours):
        for layer in model.model.layers:
            layer.mlp.gate.weight[5] = layer.mlp.gate.weight[2]
    assert max_diff(ours(ids)[0], ref(input_ids=ids).logits) == 0
    k, border = ours.config.num_experts_per_tok, 0
    for layer in ours.model.layers:
        probs = F.softmax(layer.mlp.router_logits, -1, dtype=torch.float32)
        top = probs.topk(k + 1, -1)
        tied = top.values[:, k - 1] == top.values[:, k]  # the k-th and (k+1)-th best are the tied pair
        border += tied.sum().item()
        lower_first = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]  # a tie-break a rewrite might pick
        assert (top.indices[tied, :k].sort(-1).values != lower_first[tied].sort(-1).values).any()
    assert border > 0
    x = torch.randn(4, ours.config.hidden_size, dtype=torch.bfloat16)
    assert max_diff(ours.model.layers[0].mlp.experts[2](x), ours.model.layers[0].mlp.experts[5](x)) > 1e-2


def test_decoding_reads_only_the_chosen_experts():
    model = load("olmoe")
    calls = []
    for i, layer in enumerate(model.model.layers):
        for e, expert in enumerate(layer.mlp.experts):
            expert.register_forward_hook(lambda m, inp, out, i=i, e=e: calls.append((i, e, inp[0].shape[0])))
    cache = model.new_cache(1, 8)
    model(torch.tensor([[5, 6, 7]]), cache=cache)
    calls.clear()
    model(torch.tensor([[8]]), cache=cache)  # one decode step at batch 1
    k, layers = model.config.num_experts_per_tok, model.config.num_hidden_layers
    assert len(calls) == k * layers and all(n == 1 for _, _, n in calls)  # 2 of 8 experts per layer, one row each
    for i in range(layers):
        chosen = model.model.layers[i].mlp.router_logits.topk(k).indices[0].tolist()
        assert sorted(e for j, e, _ in calls if j == i) == sorted(chosen)


@pytest.mark.parametrize("case", MOE)
def test_one_token_through_its_experts_equals_the_batched_path(case):
    # batch 1, one token a step: the mixture's decoding path (the token's k experts in turn) against the full forward
    model, ids = load(case), reference(case)["input_ids"][:1]
    stepped, _ = decode_in_chunks(model, ids, [1] * ids.shape[1])
    assert max_diff(stepped, model(ids)[0]) < F32_TOL


def test_olmoe_rounds_as_the_reference_in_bfloat16(monkeypatch):
    # OLMoE's RMSNorm rounds before its weight multiply, and its RoPE uses cos/sin in bfloat16: each shows only
    # in bfloat16, where our logits equal the reference's bitwise (same kernels: see the bfloat16 test above);
    # undoing either breaks that
    monkeypatch.setenv("OLMO_PROMPT_MATMUL", "bfloat16")
    expected, model = live_reference("olmoe_clip_norm", torch.bfloat16).logits, load("olmoe_clip_norm", dtype=torch.bfloat16)
    ids = reference("olmoe_clip_norm")["input_ids"]
    assert max_diff(model(ids)[0], expected) == 0
    norms = [m for m in model.modules() if isinstance(m, olmo.RMSNorm)]
    for m in norms:
        m.rounds_first = False
    assert max_diff(model(ids)[0], expected) > 0
    for m in norms:
        m.rounds_first = True
    model.config.model_type = "olmo2"  # rope_in_model_dtype off (the norms keep their own setting)
    assert max_diff(model(ids)[0], expected) > 0


def test_moe_checkpoint_errors_are_clear(tmp_path):
    folder = _folder(tmp_path, "olmoe")
    state = dict(olmo.read_safetensors(folder / "model.safetensors"))
    _write_state(folder, {k: v for k, v in state.items() if ".mlp.experts.3." not in k or ".layers.1." not in k})
    with pytest.raises(ValueError, match=r"(?s)tensors do not match.*missing: model.layers.1.mlp.experts.3.down_proj"):
        olmo.OlmoForCausalLM.from_pretrained(folder)
    _write_state(folder, {k: v for k, v in state.items() if not re.search(r"\.experts\.[67]\.", k)})
    with pytest.raises(ValueError, match="the checkpoint has 6 experts per layer .in layer 0., but the config says num_experts=8"):
        olmo.OlmoForCausalLM.from_pretrained(folder)
    _write_state(folder, state)
    _edit_config(folder, num_experts_per_tok=9)
    with pytest.raises(ValueError, match="num_experts_per_tok must be between 1 and num_experts=8, got 9"):
        olmo.OlmoForCausalLM.from_pretrained(folder)


def test_moe_is_not_replayed_from_a_cuda_graph():
    model = load("olmoe")
    with pytest.raises(ValueError, match="mixture of experts picks its experts on the host"):
        speed.cuda_graph_decoder(model, model.new_cache(1, 8, static=True))


# ---- Olmo Hybrid: Gated DeltaNet -------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 5, 64, 150])
def test_delta_rule_chunked_equals_recurrent(T):
    torch.manual_seed(T)
    B, H, dk, dv = 2, 3, 8, 12
    q, k = (olmo.l2_normalize(torch.randn(B, H, T, dk)) for _ in range(2))
    v, beta, g = torch.randn(B, H, T, dv), 2 * torch.rand(B, H, T), -0.2 * torch.rand(B, H, T)
    S0 = torch.randn(B, H, dk, dv)  # a state from earlier tokens
    o1, S1 = olmo.delta_rule_recurrent(q, k, v, g, beta, S0)
    o2, S2 = olmo.delta_rule_chunked(q, k, v, g, beta, S0, C=16)
    assert max_diff(o1, o2) < 1e-4 and max_diff(S1, S2) < 1e-4
    o3, S3 = olmo.delta_rule_chunked(q, k, v, g, beta, S0)  # one chunk of 64 or three
    assert max_diff(o1, o3) < 1e-4 and max_diff(S1, S3) < 1e-4


def test_delta_rule_is_the_definition():
    # one token by hand: decay, read at k, write the correction at k, read at q
    q, k = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])
    v, S = torch.tensor([2.0, -1.0, 0.5]), torch.arange(6.0).view(2, 3)
    g, beta = torch.tensor(-0.1), torch.tensor(1.5)
    S1 = S * g.exp()
    S1 = S1 + beta * torch.outer(k, v - S1.T @ k)
    o, S_out = olmo.delta_rule_recurrent(q.view(1, 1, 1, 2), k.view(1, 1, 1, 2), v.view(1, 1, 1, 3), g.view(1, 1, 1),
                                         beta.view(1, 1, 1), S.view(1, 1, 2, 3))
    assert max_diff(S_out[0, 0], S1) < 1e-6 and max_diff(o[0, 0, 0], S1.T @ q) < 1e-6


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
@pytest.mark.parametrize("chunks", [[1] * 150, [100] + [1] * 50, [64, 64, 22], [7] * 21 + [3]],
                         ids=["1x150", "100+1x50", "64-64-22", "7x21+3"])
def test_hybrid_cached_decoding_equals_full_forward(chunks, static):
    model, ids = load("olmo_hybrid"), reference("olmo_hybrid")["input_ids"]
    full, _ = model(ids)
    assert max_diff(decode_in_chunks(model, ids, chunks, static)[0], full) < HYBRID_STEP_TOL
    assert_close_to_fixture(full, reference("olmo_hybrid")["logits"])


def test_hybrid_padded_batch_matches_reference():
    ref, model = reference("olmo_hybrid"), load("olmo_hybrid")
    ids, mask = ref["padded_ids"], ref["padded_mask"]
    logits, _ = model(ids, attention_mask=mask)
    real = mask.bool()
    assert_close_to_fixture(logits[real], ref["padded_logits"][real])
    alone, _ = model(ids[:1, 5:])  # row 0 without its 5 pads: the pads left no trace in the state (its chunks of 64
    assert max_diff(logits[0, 5:], alone[0]) < HYBRID_STEP_TOL  # start 5 tokens later: float32 rounding differs)
    cache = model.new_cache(2, 150)  # and with a cache: a padded prompt, then decoding
    out = [model(ids[:, :60], cache=cache, attention_mask=mask[:, :60])[0]]
    out += [model(ids[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1])[0] for t in range(60, 150)]
    assert max_diff(torch.cat(out, 1)[real], ref["padded_logits"][real]) < HYBRID_STEP_TOL


def test_hybrid_state_is_constant_in_size():
    model = load("olmo_hybrid")
    short, long = model.new_cache(1, 100), model.new_cache(1, 10000)
    gdn = [i for i, kind in enumerate(model.config.layer_types) if kind == "linear_attention"]
    for i in gdn:
        assert short.layers[i].S.shape == long.layers[i].S.shape == (1, 4, 16, 24)  # n_v heads of (d_k, d_v)
        assert short.layers[i].S.dtype == torch.float32 and short.layers[i].conv.shape == (1, 32 + 32 + 96, 3)
    assert long.layers[3].k.shape[2] == 10000  # the attention layer's keys grow with the context


@pytest.mark.parametrize("change", [dict(linear_allow_neg_eigval=False), dict(rope_theta=10000.0),
                                    dict(linear_conv_kernel_dim=2)])
def test_hybrid_feature_changes_logits(change):
    model, ids = load("olmo_hybrid"), reference("olmo_hybrid")["input_ids"]
    other = copy.deepcopy(model.config)
    for k, v in change.items():
        setattr(other, k, v)
    other.__post_init__()
    changed = olmo.OlmoForCausalLM(other).eval()
    state = model.state_dict()
    if "linear_conv_kernel_dim" in change:  # keep the newest taps of each kernel
        state = {k: v[..., -2:] if "conv1d" in k else v for k, v in state.items()}
    changed.load_state_dict(state)
    assert max_diff(changed(ids)[0], model(ids)[0]) > 1e-2


def test_hybrid_a_log_stays_float32():
    # the reference makes A_log in float32 whatever the model dtype; rounded to bfloat16 the decays change
    # enough to move bfloat16 logits by 0.27 on the fixture, where ours equal the reference's bitwise
    for quantize in (None, "int8"):
        model = generate.load_model(FIXTURES / "olmo_hybrid", dtype=torch.bfloat16, quantize=quantize)
        assert all(layer.linear_attn.A_log.dtype == torch.float32 for layer in model.model.layers if layer.kind == "linear_attention")
        assert model.model.layers[0].linear_attn.dt_bias.dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["hub", "hub-shards", "saved-shards"])
def test_hybrid_checkpoint_layouts(layout, tmp_path):
    # fixtures/olmo_hybrid is save_pretrained's layout: its convolutions split into equal parts (54/54/52 channels
    # for q/k/v widths 32/32/96) and the attention layer's post-attention norm named feedforward_layer_norm. The
    # Hub's layout splits at the widths and keeps post_attention_layernorm.
    ref, config = reference("olmo_hybrid"), olmo.read_config(FIXTURES / "olmo_hybrid")
    state = dict(olmo.read_safetensors(FIXTURES / "olmo_hybrid" / "model.safetensors"))
    assert state["model.layers.0.linear_attn.q_conv1d.weight"].shape == (54, 1, 4)
    if layout.startswith("hub"):
        for i, kind in enumerate(config.layer_types):
            pre = f"model.layers.{i}."
            if kind == "linear_attention":
                names = [pre + f"linear_attn.{c}_conv1d.weight" for c in "qkv"]
                state.update(zip(names, torch.cat([state[n] for n in names]).split([32, 32, 96])))
            else:
                state[pre + "post_attention_layernorm.weight"] = state.pop(pre + "feedforward_layer_norm.weight")
    shards = 1 if layout == "hub" else 3
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[i::shards]}
        pytest.importorskip("safetensors.torch").save_file(part, tmp_path / file)
        weight_map.update({n: file for n in part})
    if shards > 1:
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((FIXTURES / "olmo_hybrid" / "config.json").read_text())
    model = olmo.OlmoForCausalLM.from_pretrained(tmp_path)
    assert_close_to_fixture(model(ref["input_ids"])[0], ref["logits"])


def test_hybrid_checkpoint_errors_are_clear(tmp_path):
    folder = _folder(tmp_path, "olmo_hybrid")
    state = dict(olmo.read_safetensors(folder / "model.safetensors"))
    _write_state(folder, {k: v for k, v in state.items() if k != "model.layers.1.linear_attn.A_log"})
    with pytest.raises(ValueError, match=r"(?s)tensors do not match an olmo_hybrid model.*missing: model.layers.1.linear_attn.A_log"):
        olmo.OlmoForCausalLM.from_pretrained(folder)
    v = "model.layers.0.linear_attn.v_conv1d.weight"  # a channel short: the parts no longer add up to the widths
    _write_state(folder, state | {v: state[v][1:]})
    with pytest.raises(ValueError, match=r"tensor model.layers.0.linear_attn.q_conv1d.weight has shape \(54, 1, 4\), "
                                         r"the config expects \(32, 1, 4\)"):
        olmo.OlmoForCausalLM.from_pretrained(folder)


def test_hybrid_refuses_tensor_parallelism():
    model = load("olmo_hybrid")
    mesh = type("Mesh", (), {"size": lambda self: 1})()
    with pytest.raises(ValueError, match="does not split Olmo Hybrid's Gated DeltaNet layers"):
        tp.tensor_parallel(model, mesh)


def test_hybrid_config_rope_theta_null_means_no_rope():
    d = json.loads((FIXTURES / "olmo_hybrid" / "config.json").read_text())
    assert d["rope_parameters"]["rope_theta"] is None and olmo.OlmoConfig.from_dict(d).rope_theta is None
    v4 = {k: v for k, v in d.items() if k != "rope_parameters"}
    assert olmo.OlmoConfig.from_dict({**v4, "rope_theta": None}).rope_theta is None  # explicit null: NoPE
    assert olmo.OlmoConfig.from_dict(v4).rope_theta == 10000.0  # absent: the reference's default
    with pytest.raises(ValueError, match="linear_attention layers are Olmo Hybrid's"):
        olmo.OlmoConfig(model_type="olmo3", num_hidden_layers=1, layer_types=["linear_attention"])
    with pytest.raises(ValueError, match="Olmo Hybrid needs at least one full_attention layer"):
        olmo.OlmoConfig(model_type="olmo_hybrid", num_hidden_layers=2, layer_types=["linear_attention"] * 2)
    short = olmo.OlmoConfig(model_type="olmo_hybrid", num_hidden_layers=2)  # as the reference: the last is full
    assert short.layer_types == ["linear_attention", "full_attention"]


# ---- runtime: float32 prompt products, the KV cache, torch.compile, CUDA graphs --------------------------------


def test_matmul_in_float32_block_by_block(monkeypatch):
    monkeypatch.setattr(speed, "FLOAT32_BLOCK", 3 * 40)  # three rows of 40 at a time: 7 blocks for 20 rows
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 40).bfloat16(), torch.randn(20, 40).bfloat16()
    expected = (x.float() @ w.float().t()).bfloat16()
    assert max_diff(speed.matmul_in_float32(x, w), expected) == 0
    q, s = torch.randint(-127, 128, (20, 40), dtype=torch.int8), torch.rand(20)
    expected = x.float() @ (q.float() * s[:, None]).t()
    assert max_diff(speed.matmul_in_float32(x.float(), q, s), expected) < 1e-6 * expected.abs().max()


def test_one_row_products_leave_onednn_on():
    # matvec turns oneDNN off for its own product only, even when the product fails
    torch.manual_seed(0)
    w, x = torch.randn(64, 32).bfloat16(), torch.randn(32).bfloat16()
    expected = w.float() @ x.float()
    assert max_diff(speed.matvec(w, x), expected) <= expected.abs().max() / 128  # bfloat16's rounding
    with pytest.raises(RuntimeError):
        speed.matvec(w, x[:31])
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("chunks", [[1] * 24, [5, 1, 1, 10, 7], [12, 12], [3, 21]])
@pytest.mark.parametrize("case", DENSE + MOE)
def test_cached_decoding_equals_full_forward(case, chunks, attn, static):
    # olmo3's sliding layers keep only the last 8 keys in a ring; 24 tokens wrap it three times, and chunks
    # longer than one token take the path that must not overwrite keys the chunk itself still needs.
    # A static cache (for CUDA graphs) attends over all its slots every step and counts on the device.
    model, ids = load(case, attn), reference(case)["input_ids"]
    stepped, cache = decode_in_chunks(model, ids, chunks, static)
    assert max_diff(stepped, model(ids)[0]) < F32_TOL
    assert cache.length == 24 and (not static or cache.device_length.item() == 24)


def test_sliding_layers_keep_only_the_window():
    model = load("olmo3")
    cache = model.new_cache(2, 100)
    sizes = [kv.k.shape[2] for kv in cache.layers]
    assert sizes == [8, 8, 8, 100]  # layer_types: sliding, sliding, sliding, full


def test_cache_overflow_is_a_clear_error():
    model = load("olmo2")
    cache = model.new_cache(1, 4)
    model(torch.tensor([[5, 6, 7]]), cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 4 tokens; 3 are in it and 2 more do not fit"):
        model(torch.tensor([[8, 9]]), cache=cache)


def test_last_only_gives_the_last_position():
    model, ids = load("olmo2"), reference("olmo2")["input_ids"]
    full, _ = model(ids)
    last, _ = model(ids, last_only=True)
    assert last.shape == (2, 1, 128) and max_diff(last[:, 0], full[:, -1]) < F32_TOL


@pytest.mark.slow
def test_compiled_blocks_share_one_graph_and_match_eager():
    # 10 layers, more than torch's recompile limit (8): had each layer compiled its own graph, the rest would
    # silently run eagerly. Graphs: the prefill, decode steps while a ring still has room, decode steps after.
    from torch._dynamo.utils import counters

    config = copy.deepcopy(load("olmo3").config)
    config.num_hidden_layers, config.layer_types = 10, None
    config.__post_init__()  # OLMo 3's pattern again: sliding layers with rings of 8, every 4th layer full
    torch.manual_seed(0)
    eager = olmo.OlmoForCausalLM(config).eval()
    compiled = speed.compile_blocks(copy.deepcopy(eager))
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, config.vocab_size, (2, 18))
    outs = []
    for model in (eager, compiled):  # prefill 6 tokens, then decode 12 one by one: the rings wrap
        cache = model.new_cache(2, 18)
        steps = [model(ids[:, :6], cache=cache)[0]] + [model(ids[:, i:i + 1], cache=cache)[0] for i in range(6, 18)]
        outs.append(torch.cat(steps, 1))
    assert max_diff(outs[0], outs[1]) < F32_TOL
    assert 1 <= counters["stats"]["unique_graphs"] <= 3
    cache = compiled.new_cache(2, 18, static=True)  # as for CUDA graphs: all slots every step, length on the device
    steps = [compiled(ids[:, :6], cache=cache)[0]] + [compiled(ids[:, i:i + 1], cache=cache)[0] for i in range(6, 18)]
    assert max_diff(outs[0], torch.cat(steps, 1)) < F32_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by hand where one is)")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_graph_decoding_matches_eager(compiled):
    # recorded on the third step, replayed for the rest; olmo3's rings of 8 wrap during the replays
    model = load("olmo3").to("cuda")
    graphed = speed.compile_blocks(copy.deepcopy(model)) if compiled else model
    ids = reference("olmo3")["input_ids"].to("cuda")
    with torch.inference_mode():
        full, _ = model(ids)
        cache = graphed.new_cache(2, 24, static=True)
        step = speed.cuda_graph_decoder(graphed, cache)
        out = [graphed(ids[:, :4], cache=cache)[0]] + [step(ids[:, i:i + 1]).clone() for i in range(4, 24)]
        assert max_diff(torch.cat(out, 1), full) < F32_TOL
        assert cache.length == 24 and cache.device_length.item() == 24
        with pytest.raises(ValueError, match="KV cache holds 24 tokens; 24 are in it"):
            step(ids[:, :1])


# ---- loading checkpoints ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["ai2_olmo1", "ai2_olmo2"])
def test_ai2_original_layout_matches_ai2_model(case):
    # fixtures/make_ai2_fixtures.py: AI2's own OLMo code (ai2-olmo 0.6.0) made these weights and logits;
    # ai2_olmo1 is the trainer's config.yaml + model.pt, ai2_olmo2 the hf_olmo config.json + model.safetensors
    ref = reference(case)
    model = olmo.OlmoForCausalLM.from_pretrained(FIXTURES / case)
    assert model.config.model_type == {"ai2_olmo1": "olmo", "ai2_olmo2": "olmo2"}[case]
    assert_close_to_fixture(model(ref["input_ids"])[0], ref["logits"])


def _save_bin(state, folder, shards):
    """pytorch_model.bin, or shards with their index, as transformers 4 wrote them (torch.save of the state)."""
    names = sorted(state)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n].clone() for n in names[i::shards]}
        torch.save(part, folder / file)
        weight_map.update({n: file for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["safetensors-shards", "bin", "bin-shards"])
def test_checkpoint_layouts(layout, tmp_path):
    case = "olmo2_gqa"
    (tmp_path / "config.json").write_text((FIXTURES / case / "config.json").read_text())
    state = olmo.read_safetensors(FIXTURES / case / "model.safetensors")
    if layout == "safetensors-shards":
        transformers = pytest.importorskip("transformers")
        transformers.Olmo2ForCausalLM.from_pretrained(FIXTURES / case).save_pretrained(tmp_path, max_shard_size="100KB")
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    else:
        _save_bin({k: v.clone() for k, v in state.items()}, tmp_path, shards=1 if layout == "bin" else 3)
    ref = reference(case)
    model = olmo.OlmoForCausalLM.from_pretrained(tmp_path)
    assert_close_to_fixture(model(ref["input_ids"])[0], ref["logits"])


def test_load_converts_dtype():
    model = olmo.OlmoForCausalLM.from_pretrained(FIXTURES / "olmo2", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = olmo.OlmoForCausalLM.from_pretrained(FIXTURES / "olmo2")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(p.is_meta for p in model.parameters())


def test_weights_are_read_into_their_own_memory(tmp_path):
    # not mapped from the file: decoding from mapped pages was slower (see read_safetensors)
    folder, ref = _folder(tmp_path), reference("olmo2")
    for dtype in (None, torch.bfloat16):
        model = olmo.OlmoForCausalLM.from_pretrained(folder, dtype=dtype)
        assert all(p.untyped_storage().nbytes() == p.nbytes for p in model.parameters())
    assert_close_to_fixture(olmo.OlmoForCausalLM.from_pretrained(folder)(ref["input_ids"])[0], ref["logits"])


def test_mapped_tensors_are_views_of_the_file(tmp_path):
    # read-only views (a private writable mapping is charged to memory: one of a 27 GB file was refused on a 24 GB
    # machine, where quantized loading of OLMo-2 13B needs it)
    folder = _folder(tmp_path)
    size = (folder / "model.safetensors").stat().st_size
    mapped = olmo.read_safetensors(folder / "model.safetensors", mapped=True)
    read = olmo.read_safetensors(folder / "model.safetensors")
    assert all(t.untyped_storage().nbytes() == size for t in mapped.values())
    assert mapped.keys() == read.keys() and all(torch.equal(mapped[k], read[k]) for k in read)


LOAD_PEAK = """
import sys, torch, generate
def peak_kb():  # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
def rss_kb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
def load(folder):
    return generate.load_model(folder, dtype=getattr(torch, sys.argv[2]),
                               quantize=None if sys.argv[3] == "none" else sys.argv[3])
# torch's one-time memory (code pages of the kernels a load runs, their tables, thread pools) before the baseline
load(sys.argv[4])
base, base_rss = peak_kb(), rss_kb()
model = load(sys.argv[1])
print((peak_kb() - base) * 1024, (rss_kb() - base_rss) * 1024, sum(p.nbytes for p in model.parameters()))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype,quantize", [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8")])
def test_loading_holds_the_weights_once(dtype, quantize, tmp_path):
    # a float32 checkpoint of 256 MiB, loaded as is and converted to bfloat16. A second copy of the weights would add
    # the whole model; loading may add the one file tensor being read (when converting) and a quarter of the model at
    # most (the allocator). The baseline is taken after a first load of a tiny model with the same arguments: the code
    # pages of the kernels that loading runs count as resident memory (up to 50 MiB when they were not). Quantized:
    # the file is mapped and its pages count while touched (clean page cache, which the kernel reclaims under
    # pressure), and one layer at a time is converted. Afterwards the resident memory is the model's, within a quarter
    # of it: the mapping released, and the allocator's freed pages handed back (without that, glibc keeps about half
    # the int8 model here)
    safetensors = pytest.importorskip("safetensors.torch")
    config = olmo.OlmoConfig(model_type="olmo2", vocab_size=8192, hidden_size=1024, intermediate_size=4096,
                             num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8)
    with torch.device("meta"):
        names = {k: v.shape for k, v in olmo.OlmoForCausalLM(config).state_dict().items()}
    safetensors.save_file({k: torch.randn(s) for k, s in names.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.__dict__.items() if k != "attn_implementation"}))
    r = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path), dtype, quantize, str(FIXTURES / "olmo2")],
                       capture_output=True, text=True, cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr
    peak, resident, model_bytes = map(int, r.stdout.split())
    in_flight = 4 * max(s.numel() for s in names.values()) if dtype == "bfloat16" else 0
    file_bytes = (tmp_path / "model.safetensors").stat().st_size if quantize != "none" else 0
    extra = peak - model_bytes - file_bytes
    mib = lambda n: f"{n / 2**20:.0f} MiB"
    assert extra <= in_flight + model_bytes / 4, f"loading added {mib(extra)} beyond the model ({mib(model_bytes)})"
    assert resident - model_bytes <= model_bytes / 4, f"{mib(resident - model_bytes)} resident beyond the model ({mib(model_bytes)})"


def test_load_errors_name_the_file_and_tensor(tmp_path):
    load = olmo.OlmoForCausalLM.from_pretrained
    with pytest.raises(FileNotFoundError, match="checkpoint folder .*nope does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path)
    folder = _folder(tmp_path)
    _edit_config(folder, model_type="llama")
    with pytest.raises(ValueError, match=r"config.json: model_type 'llama' is not an OLMo model"):
        load(folder)
    _edit_config(folder, model_type="olmo2", intermediate_size=80)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape "
                                         r"\(96, 64\), the config expects \(80, 64\)"):
        load(folder)
    _edit_config(folder, intermediate_size=96)
    state = dict(olmo.read_safetensors(folder / "model.safetensors"))
    _write_state(folder, {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"} | {"extra.bias": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"(?s)model.safetensors: tensors do not match.*missing: model.layers.1.mlp.up_proj.weight"
                                         r".*unexpected: extra.bias"):
        load(folder)


def test_truncated_and_corrupt_files_are_named(tmp_path):
    folder = _folder(tmp_path)
    data = (FIXTURES / "olmo2" / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"model.safetensors: tensor .* but the file has .*: truncated or corrupt"):
        olmo.OlmoForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(data[:8] + b"#" * 100 + data[108:])
    with pytest.raises(ValueError, match="model.safetensors: corrupt safetensors header"):
        olmo.OlmoForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 50)
    with pytest.raises(ValueError, match="model.safetensors: not a safetensors file"):
        olmo.OlmoForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="pytorch_model.bin: cannot be read as a PyTorch checkpoint"):
        olmo.OlmoForCausalLM.from_pretrained(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        olmo.OlmoForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="lists shard.* not in the folder: model-00001-of-00002.safetensors"):
        olmo.OlmoForCausalLM.from_pretrained(folder)


def test_hub_ids(monkeypatch):
    # no network here: the error says so and points to a local folder (an HF-cached snapshot would be used)
    pytest.importorskip("huggingface_hub")
    with pytest.raises(OSError, match="(?s)could not download 'allenai/no-such-olmo'.*pass a local checkpoint folder"):
        olmo.OlmoForCausalLM.from_pretrained("allenai/no-such-olmo")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        olmo.OlmoForCausalLM.from_pretrained("allenai/OLMo-2-0425-1B")


def test_ai2_config_refuses_unreleased_architectures():
    c = {"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 100}
    assert ai2_checkpoints.config_from_ai2(c, "x")["model_type"] == "olmo"
    with pytest.raises(ValueError, match=r"x: not a released OLMo architecture \(alibi=True\)"):
        ai2_checkpoints.config_from_ai2({**c, "alibi": True}, "x")
    with pytest.raises(ValueError, match="neither OLMo 1's nor OLMo 2's"):
        ai2_checkpoints.config_from_ai2({**c, "layer_norm_type": "rms"}, "x")
    olmo2 = {**c, "norm_after": True, "attention_layer_norm": True, "layer_norm_type": "rms"}
    assert ai2_checkpoints.config_from_ai2(olmo2, "x")["model_type"] == "olmo2"
    with pytest.raises(ValueError, match="clip_qkv=8.0 with the QK-norm"):
        ai2_checkpoints.config_from_ai2({**olmo2, "clip_qkv": 8.0}, "x")


# ---- OLMo-core training checkpoints -----------------------------------------------------------------------------
# fixtures/make_olmo_core_fixtures.py: AI2's trainer code (ai2-olmo-core) built these models, saved them as its
# trainer does (two FSDP processes: every tensor in two chunks) and computed their logits.

OLMO_CORE = {"olmo_core_olmo2": "olmo2", "olmo_core_olmo3": "olmo3", "olmo_core_moe": "flex_olmo",
             "olmo_core_moe_dropless": "flex_olmo"}


def _olmo_core_copy(tmp_path, case="olmo_core_olmo2"):
    import shutil
    return Path(shutil.copytree(FIXTURES / case, tmp_path / "step1"))


@pytest.mark.parametrize("case", OLMO_CORE)
def test_olmo_core_checkpoint_matches_olmo_core_model(case):
    ref = reference(case)
    model = olmo.OlmoForCausalLM.from_pretrained(FIXTURES / case)
    assert model.config.model_type == OLMO_CORE[case]
    assert_close_to_fixture(model(ref["input_ids"])[0], ref["logits"])


def test_olmo_core_config_maps_windows_yarn_and_experts():
    c = olmo.OlmoForCausalLM.from_pretrained(FIXTURES / "olmo_core_olmo3" / "model_and_optim").config  # the inner folder too
    assert c.layer_types == ["sliding_attention"] * 3 + ["full_attention"] and c.sliding_window == 4
    assert c.rope_scaling["factor"] == 8.0 and c.rope_scaling["original_max_position_embeddings"] == 8
    assert c.tie_word_embeddings and c.eos_token_id == 100257 and c.pad_token_id == 100277
    m = olmo.OlmoForCausalLM.from_pretrained(FIXTURES / "olmo_core_moe_dropless").config
    assert (m.num_experts, m.num_experts_per_tok, m.norm_topk_prob) == (4, 2, True)
    assert olmo.OlmoForCausalLM.from_pretrained(FIXTURES / "olmo_core_moe").config.norm_topk_prob is False


def test_olmo_core_optimizer_bytes_are_never_read(tmp_path):
    folder = _olmo_core_copy(tmp_path)
    index = ai2_checkpoints.read_dcp_metadata(folder / "model_and_optim" / ".metadata")
    optim = [chunk for name, (_, _, chunks) in index.items() if name.startswith("optim.") for chunk in chunks]
    assert len(optim) > 100  # AdamW's two moments per parameter and rank
    for _, _, file, start, length in optim:  # garbage where the optimizer's tensors were
        with open(folder / "model_and_optim" / file, "r+b") as f:
            f.seek(start)
            f.write(b"\xff" * length)
    ref = reference("olmo_core_olmo2")
    assert_close_to_fixture(olmo.OlmoForCausalLM.from_pretrained(folder)(ref["input_ids"])[0], ref["logits"])


def test_olmo_core_checkpoint_errors_are_clear(tmp_path):
    folder = _olmo_core_copy(tmp_path)
    load = olmo.OlmoForCausalLM.from_pretrained
    config = json.loads((folder / "config.json").read_text())
    for change, message in [(dict(name="peri_norm"), "block peri_norm"),
                            (dict(feed_forward={**config["model"]["block"]["feed_forward"], "bias": True}), "feed-forward"),
                            (dict(sequence_mixer={**config["model"]["block"]["sequence_mixer"], "head_dim": 4}),
                             "head_dim=4 \\(not d_model / n_heads\\)")]:
        (folder / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "block": {**config["model"]["block"], **change}}}))
        with pytest.raises(ValueError, match=f"config.json: an OLMo-core model that olmo.py does not compute \\(.*{message}"):
            load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    index = ai2_checkpoints.read_dcp_metadata(folder / "model_and_optim" / ".metadata")
    file = index["model.blocks.1.attention.w_q.weight"][2][1][2]  # rank 1's chunk
    data = (folder / "model_and_optim" / file).read_bytes()
    (folder / "model_and_optim" / file).write_bytes(data[:100])
    with pytest.raises(ValueError, match=f"{file}: truncated \\(model\\."):
        load(folder)
    (folder / "model_and_optim" / file).unlink()
    with pytest.raises(FileNotFoundError, match=f"model_and_optim: {file}, which holds model\\..*, is missing"):
        load(folder)
    (folder / "model_and_optim" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="metadata: not a torch.distributed.checkpoint index"):
        load(folder)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    import pickle

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    folder = _olmo_core_copy(tmp_path)
    (folder / "model_and_optim" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ValueError, match=r"asks to load (posix|nt|os)\.system, which a checkpoint index never needs: refused"):
        olmo.OlmoForCausalLM.from_pretrained(folder)
    assert not (tmp_path / "ran").exists()


def _olmo_core_fixture_maker():
    pytest.importorskip("olmo_core")
    if str(FIXTURES) not in sys.path:  # importable by name: the saving processes it spawns import it again
        sys.path.append(str(FIXTURES))
    import make_olmo_core_fixtures
    return make_olmo_core_fixtures


@pytest.mark.slow
@pytest.mark.parametrize("case", OLMO_CORE)
def test_olmo_core_live(case, tmp_path):
    # the installed OLMo-core, other weights (seed), saved by two FSDP processes, against its own forward now
    maker = _olmo_core_fixture_maker()
    maker.save_checkpoint(case, tmp_path / "step1", port=_free_port())
    ids = torch.randint(0, maker.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    model = olmo.OlmoForCausalLM.from_pretrained(tmp_path / "step1")
    assert max_diff(model(ids)[0], maker.reference_logits(case, ids)) <= F32_TOL


def _hub_snapshot(hub, repo_id, ref):
    """A Hugging Face cache as the Hub leaves it after downloading ref of repo_id: refs/<ref> names a commit whose
    files are in snapshots/<commit>/ (returned, empty)."""
    commit = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    return repo / "snapshots" / commit


def _run_offline(hub, *args):
    """python *args in a fresh process with no network, the Hugging Face cache at hub and olmo.py importable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_sample_runs_an_olmo_core_checkpoint(tmp_path):
    maker = _olmo_core_fixture_maker()
    from olmo_core.distributed.checkpoint import save_model_and_optim_state
    from olmo_core.nn.transformer import TransformerConfig
    config = TransformerConfig.olmo2_1M(vocab_size=100352, n_heads=2, head_dim=6)  # d_model 12: 6 per head
    torch.manual_seed(0)
    model = config.build(init_device="cpu").eval()
    step = tmp_path / "step1"
    save_model_and_optim_state(step / "model_and_optim", model)
    (step / "config.json").write_text(json.dumps({**maker.experiment_config("olmo_core_olmo2"), "model": config.as_config_dict()}))
    tokenizer = olmo.load_tokenizer(TOKENIZERS / "allenai_dolma2.json")
    ids = tokenizer.encode("The capital of France")
    for _ in range(6):  # OLMo-core's greedy continuation, without a cache
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    r = run_sample("--model", str(step), "--tokenizer", str(TOKENIZERS / "allenai_dolma2.json"), "--prompt",
                   "The capital of France", "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert as_read(r.stdout) == as_read(tokenizer.decode(ids)) + "\n"
    r = _run_offline(tmp_path / "hub", str(Path(__file__).parent / "sample.py"), "--model", str(step))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "config.json names could not be loaded: could not download 'allenai/dolma2-tokenizer'" in r.stderr
    assert "sample.py --tokenizer" in r.stderr


def test_olmo_core_checkpoint_takes_the_tokenizer_its_config_names_from_the_cache(tmp_path):
    # no tokenizer.json in the checkpoint: its config names allenai/dolma2-tokenizer, found in the HF cache offline
    pytest.importorskip("huggingface_hub")
    snapshot = _hub_snapshot(tmp_path / "hub", "allenai/dolma2-tokenizer", "main")
    (snapshot / "tokenizer.json").write_bytes((TOKENIZERS / "allenai_dolma2.json").read_bytes())
    script = f"""
import olmo
tok = olmo.load_tokenizer({str(FIXTURES / "olmo_core_olmo2")!r})
print(tok.encode("Hello, OLMo-core!"), tok.eos_token_id)
"""
    r = _run_offline(tmp_path / "hub", "-c", script)
    assert r.returncode == 0, r.stderr
    dolma2 = olmo.load_tokenizer(TOKENIZERS / "allenai_dolma2.json")
    assert r.stdout.split()[-1] == "100257" and r.stdout.startswith(str(dolma2.encode("Hello, OLMo-core!")))


def test_hub_revision_loads_offline_from_the_cache(tmp_path):
    # a Hugging Face cache as the Hub leaves it after downloading a branch: refs/<branch> -> snapshots/<commit>/;
    # that OLMo 2 revision calls itself model_type "olmo_1124"
    pytest.importorskip("huggingface_hub")
    snapshot = _folder(_hub_snapshot(tmp_path / "hub", "allenai/OLMo-2-tiny", "stage1-step10-tokens1B"))
    _edit_config(snapshot, model_type="olmo_1124")
    script = f"""
import sys, torch, olmo
ref = torch.load({str(FIXTURES / "olmo2" / "reference.pt")!r})
model = olmo.OlmoForCausalLM.from_pretrained("allenai/OLMo-2-tiny", revision="stage1-step10-tokens1B")
print(model.config.model_type, (model(ref["input_ids"])[0] - ref["logits"]).abs().max().item() / ref["logits"].abs().max().item())
try:
    olmo.OlmoForCausalLM.from_pretrained("allenai/OLMo-2-tiny", revision="stage9-no-such-step")
except OSError as e:
    print(e)
"""
    r = _run_offline(tmp_path / "hub", "-c", script)
    assert r.returncode == 0, r.stderr
    loaded, error = r.stdout.splitlines()[0].split(), "\n".join(r.stdout.splitlines()[1:])
    assert loaded[0] == "olmo2" and float(loaded[1]) <= F32_RTOL
    assert "could not download 'allenai/OLMo-2-tiny' at revision 'stage9-no-such-step'" in error
    r = _run_offline(tmp_path / "hub", str(Path(__file__).parent / "sample.py"), "--model", "allenai/OLMo-2-tiny",
                     "--revision", "stage9-no-such-step")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "at revision 'stage9-no-such-step'" in r.stderr
    with pytest.raises(ValueError, match="revision='main' is for Hub ids"):
        olmo.OlmoForCausalLM.from_pretrained(FIXTURES / "olmo2", revision="main")


# ---- weight-only quantization ----------------------------------------------------------------------------------


def fake_quantized(model, bits):
    """The plain math that QuantizedLinear must match: each weight it would replace, rounded to its levels and kept
    in float32 (int8: per row, symmetric; int4: per group of 32, over the group's range)."""
    model = copy.deepcopy(model)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for parent in model.modules():
        for name, m in parent.named_children():
            if not isinstance(m, torch.nn.Linear) or (isinstance(parent, olmo.MoE) and name == "gate") or (tied and m is model.lm_head):
                continue
            w = m.weight.data
            if bits == 8 or w.shape[0] % 16 or w.shape[1] % 32:
                s = w.abs().amax(1, keepdim=True) / 127
                m.weight.data = (w / s).round().clamp(-127, 127) * s
            else:
                g = w.view(w.shape[0], -1, 32)
                lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
                s = (hi - lo) / 15
                m.weight.data = (((g - lo) / s).round().clamp(0, 15) * s + lo).view(w.shape)
    return model


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("case", CASES)
def test_quantized_logits_match_the_fake_quantized_math(case, mode):
    # in float32 the quantized model computes what rounding its weights does (to 3e-6..7e-6 here; the hybrid's
    # recurrence carries the last bits further: 6e-5), so its logits move from the float32 reference by that
    # rounding's error and no more; in bfloat16 by at most 1.5x that plus the reference's own bfloat16 error (live)
    ids = reference(case)["input_ids"]
    ref16, ref32 = live_reference(case, torch.bfloat16), live_reference(case, torch.float32)
    fq = fake_quantized(load(case), 8 if mode == "int8" else 4)(ids)[0]
    fq_error = max_diff(fq, ref32.logits)
    ours = generate.load_model(FIXTURES / case, dtype=torch.float32, quantize=mode)
    left = [name for name, m in ours.named_modules() if type(m) is speed.CPULinear]  # routers, a tied head
    assert all(name.endswith("mlp.gate") or name == "lm_head" and ours.config.tie_word_embeddings for name in left)
    assert max_diff(ours(ids)[0], fq) < (HYBRID_STEP_TOL if case == "olmo_hybrid" else F32_TOL)
    bf16 = generate.load_model(FIXTURES / case, dtype=torch.bfloat16, quantize=mode)
    logits = skip_on_torch_sdpa_bug(bf16, ids)[0]
    assert max_diff(logits, ref32.logits) <= 1.5 * fq_error + max_diff(ref16.logits, ref32.logits)


@pytest.mark.parametrize("case", ["olmo_core_olmo3", "olmo_core_moe_dropless"])
def test_olmo_core_checkpoints_load_in_bfloat16_and_quantized(case):
    # OLMo-core saves float32: dtype converts each tensor as it is read, quantize rounds what the float32 model holds
    ids = reference(case)["input_ids"]
    f32 = olmo.OlmoForCausalLM.from_pretrained(FIXTURES / case)
    bf16 = olmo.OlmoForCausalLM.from_pretrained(FIXTURES / case, dtype=torch.bfloat16)
    assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(bf16.state_dict().values(), f32.state_dict().values()))
    int8 = generate.load_model(FIXTURES / case, dtype=torch.float32, quantize="int8")
    assert_close_to_fixture(int8(ids)[0], fake_quantized(f32, 8)(ids)[0])  # int8 kernels sum in another order


@pytest.mark.slow
def test_quantized_greedy_text_keeps_the_float32_choices():
    # on the trained tiny OLMo (notebooks/tiny_olmo): sample.py --quantize int8 prints what generate() computes, and
    # each token of int8's greedy text is the float32 model's choice given the same text before it, wherever the
    # float32 model's top two logits are further apart than int8 can move them: its weights' rounding (the
    # fake-quantized model's error) plus bfloat16's (the bfloat16 model's error), both measured on that text
    folder = Path(__file__).parent / "notebooks" / "tiny_olmo"
    tokenizer = olmo.load_tokenizer(folder)
    r = run_sample("--model", str(folder), "--prompt", "Return the", "--temperature", "0", "--max-new-tokens", "64",
                   "--dtype", "bfloat16", "--quantize", "int8")
    assert r.returncode == 0 and "int8 weights" in r.stderr, r.stderr
    load_as = lambda dtype, q=None: generate.load_model(folder, dtype=dtype, quantize=q)
    int8, int8_f32, f32, bf16 = load_as(torch.bfloat16, "int8"), load_as(torch.float32, "int8"), load_as(torch.float32), load_as(torch.bfloat16)
    fq = fake_quantized(f32, 8)
    assert r.stdout == "Return the" + tokenizer.decode(list(generate.generate(int8, tokenizer.encode("Return the"), 64))) + "\n"
    clear = total = 0
    for prompt in ["Return the", "The default is", "If the file", "class Path", "Return a new", "This method", "The path"]:
        ids = tokenizer.encode(prompt)
        for model, truth, limit in [(int8, f32, None), (int8_f32, fq, 1e-4)]:
            new = list(generate.generate(model, ids, 64))
            seq = torch.tensor([ids + new])
            at = lambda m: m(seq)[0][0, len(ids) - 1:-1].float()  # the logits that chose each new token
            expected = at(truth)
            if limit is None:  # int8 weights and bfloat16 activations against float32
                limit = (at(fq) - expected).abs().amax(-1) + (at(bf16) - expected).abs().amax(-1)
                assert max_diff(at(model), expected) <= 1.5 * limit.max()
            top = expected.topk(2, -1)
            decided = top.values[:, 0] - top.values[:, 1] > 2 * limit  # each logit may move by limit
            assert torch.equal(torch.tensor(new)[decided], top.indices[decided, 0]), prompt
            clear, total = clear + decided.sum().item(), total + len(new)
    assert clear > 0.75 * total, (clear, total)


def rounded_rows(x):
    """What w8a8 multiplies instead of x (rows, in): each row divided by its largest |value|, rounded to unsigned
    levels with the scale and zero point PyTorch's dynamic quantization chooses for the whole input (7-bit range:
    reduce_range), expanded back and multiplied by the row's maximum again. Rounded as fbgemm does: times the
    float32 inverse of the scale, plus the zero point, then to the nearest level (ties to even) in 0..255 (the top
    of the 7-bit range may round up to 128)."""
    x = x.float()
    peak = x.abs().amax(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    scale, zero = torch._choose_qparams_per_tensor(x / peak, True)
    levels = (x / peak * torch.tensor(scale, dtype=torch.float32).reciprocal() + zero).round().clamp(0, 255)
    return (levels - zero) * scale * peak


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rows", [quantize.FBGEMM_ROWS, 24])
def test_w8a8_products_are_integer_products_of_rounded_rows(case, rows, monkeypatch):
    # every product of a float32 w8a8 forward is int8's rounded weight times its rounded input rows, to 1e-5 of
    # its largest output (here 1e-7..4e-7). Whole models cannot be compared so: clip_qkv's clamped values land on
    # rounding boundaries, where the last bits of the float32 arithmetic before decide the level. rows: each weight
    # packed whole, or in pieces of 24 rows (as an lm_head is packed in pieces of FBGEMM_ROWS)
    monkeypatch.setattr(quantize, "FBGEMM_ROWS", rows)
    ids = reference(case)["input_ids"]
    ours = generate.load_model(FIXTURES / case, dtype=torch.float32, quantize="w8a8")
    rounded = fake_quantized(load(case), 8)
    seen = []
    for name, m in ours.named_modules():
        if isinstance(m, quantize.W8A8Linear):
            m.register_forward_hook(lambda m, inputs, out, name=name: seen.append((name, inputs[0], out)))
    ours(ids)
    every = {name for name, m in ours.named_modules() if isinstance(m, quantize.W8A8Linear) and ".experts." not in name}
    assert every <= {name for name, *_ in seen}  # (of a mixture's experts, the chosen ones)
    for name, x, out in seen:
        expected = F.linear(rounded_rows(x.reshape(-1, x.shape[-1])), rounded.get_submodule(name).weight)
        assert max_diff(out.reshape(expected.shape), expected) <= 1e-5 * expected.abs().max(), name
    int8 = generate.load_model(FIXTURES / case, dtype=torch.float32, quantize="int8")
    nbytes = lambda m: sum(p.nbytes for p in generate.weights_read_per_token(m))
    assert nbytes(ours) == nbytes(int8)  # as many weight bytes per token as int8


def test_w8a8_keeps_the_trained_models_choices():
    # the trained tiny OLMo (notebooks/tiny_olmo) on the README's first 240 bytes: w8a8 with bfloat16 activations
    # picks the float32 model's top token at 96.7% of the positions (int8 97.5%, bfloat16 97.5%); one scale for a
    # whole prompt instead of one per row: 90.8%
    folder = Path(__file__).parent / "notebooks" / "tiny_olmo"
    ids = torch.tensor([list((Path(__file__).parent / "README.md").read_bytes()[:240])])
    f32 = olmo.OlmoForCausalLM.from_pretrained(folder)(ids)[0]
    w8a8 = generate.load_model(folder, dtype=torch.bfloat16, quantize="w8a8")
    assert (w8a8(ids)[0].argmax(-1) == f32.argmax(-1)).float().mean() > 0.95


@pytest.mark.slow
def test_sample_w8a8_prints_what_generate_computes():
    folder = Path(__file__).parent / "notebooks" / "tiny_olmo"
    w8a8 = generate.load_model(folder, dtype=torch.bfloat16, quantize="w8a8")
    tokenizer = olmo.load_tokenizer(folder)
    r = run_sample("--model", str(folder), "--prompt", "Return the", "--temperature", "0", "--max-new-tokens", "32",
                   "--dtype", "bfloat16", "--quantize", "w8a8")
    assert r.returncode == 0 and "w8a8 weights" in r.stderr, r.stderr
    assert r.stdout == "Return the" + tokenizer.decode(list(generate.generate(w8a8, tokenizer.encode("Return the"), 32))) + "\n"


def test_w8a8_sums_exactly_with_avx2_kernels():
    # AVX2's int8 kernel adds pairs of byte products in 16 bits: inputs rounded to 8-bit levels (255 x 127 x 2)
    # overflow there (this sum came out 129.5, not 255, before the 7-bit range); 7-bit levels do not
    code = ("import torch, quantize; layer = quantize.W8A8Linear(torch.ones(64, 256), torch.float32); "
            "x = torch.ones(1, 256); x[0, 0] = 0; print(layer(x)[0, 0].item())")
    for isa in ("AVX2", "AVX512"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent,
                           env=os.environ | {"FBGEMM_ENABLE_INSTRUCTIONS": isa})
        assert r.returncode == 0, r.stderr
        assert abs(float(r.stdout) - 255) < 1e-3, (isa, r.stdout)


def test_quantization_errors_are_clear():
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quantize.quantize(load("olmo2"), "int3")
    for mode in ("int4", "w8a8"):
        with pytest.raises(ValueError, match=f"{mode} uses PyTorch's CPU kernels"):
            generate.load_model(FIXTURES / "olmo2", device="cuda", quantize=mode)
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"  # as on an Arm CPU
        with pytest.raises(ValueError, match="w8a8 needs fbgemm.*'qnnpack'.*use int8"):
            quantize.quantize(load("olmo2"), "w8a8")
    finally:
        torch.backends.quantized.engine = engine
    with pytest.raises(ValueError, match="not combined with tensor parallelism"):
        generate.load_model(FIXTURES / "olmo2", mesh=object(), quantize="int8")


def test_w8a8_without_quantized_tensors_says_so(monkeypatch):
    # PyTorch 2.13 deprecates the quantized tensors that carry a weight to fbgemm's packing: once they are gone,
    # w8a8 says what is missing instead of failing inside torch
    def removed(*args):
        raise AttributeError("module 'torch' has no attribute '_make_per_channel_quantized_tensor'")
    monkeypatch.setattr(torch, "_make_per_channel_quantized_tensor", removed)
    with pytest.raises(ValueError, match=r"w8a8 needs fbgemm's quantized::linear_prepack, which PyTorch .* use int8"):
        generate.load_model(FIXTURES / "olmo2", quantize="w8a8")


# ---- tensor parallelism ----------------------------------------------------------------------------------------


TP_WORKER = """
import sys, torch, tp
from torch.distributed.device_mesh import init_device_mesh
torch.set_grad_enabled(False)
mesh = init_device_mesh("cpu", (2,))  # the process group comes from the environment: gloo on CPUs
out = {}
for case in sys.argv[2:]:
    model = tp.load_split(f"fixtures/{case}", mesh)
    ids = torch.load(f"fixtures/{case}/reference.pt")["input_ids"]
    cache = model.new_cache(2, 24)
    stepped = [model(ids[:, :7], cache=cache)[0]] + [model(ids[:, t:t + 1], cache=cache)[0] for t in range(7, 24)]
    shares = {name: (p.to_local().numel(), p.numel()) for name, p in model.named_parameters() if hasattr(p, "to_local")}
    out[case] = dict(logits=model(ids)[0], stepped=torch.cat(stepped, 1), shares=shares)
torch.save(out, f"{sys.argv[1]}/rank{mesh.get_rank()}.pt")
torch.distributed.destroy_process_group()
# the results are saved: skip the interpreter's teardown, where once (of many runs, on a loaded machine) a
# thread of the process group aborted the process ("terminate called without an active exception")
import os; os._exit(0)
"""


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tensor_parallel_two_cpu_processes_match_one(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", TP_WORKER, str(tmp_path), *DENSE, *MOE], cwd=Path(__file__).parent,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for case in DENSE + MOE:
        ref, config = reference(case), olmo.read_config(FIXTURES / case)
        for out in ranks:
            assert_close_to_fixture(out[case]["logits"], ref["logits"])
            assert_close_to_fixture(out[case]["stepped"], ref["logits"])
            shares = out[case]["shares"]
            # per layer 4 attention projections, 3 per MLP (every expert's), the QK-norms of all but OLMo 1; the
            # untied head: each rank holds exactly half of each (the router stays whole)
            per_layer = 4 + 3 * (config.num_experts or 1) + 2 * config.qk_norm
            expected = config.num_hidden_layers * per_layer + (not config.tie_word_embeddings)
            assert len(shares) == expected, (case, sorted(shares))
            assert all(local * 2 == total for local, total in shares.values()), (case, shares)


@pytest.mark.slow
def test_torchrun_sample_generates_the_single_process_text(tmp_path):
    e2e_checkpoint("olmo3", tmp_path)
    args = ["--model", str(tmp_path), "--prompt", "Tensor parallel", "--temperature", "0", "--max-new-tokens", "20",
            "--dtype", "float32", "--device", "cpu"]
    single = run_sample(*args)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), str(Path(__file__).parent / "sample.py"), *args],
                       capture_output=True, text=True, timeout=180)
    assert single.returncode == 0 and r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == single.stdout  # rank 0 prints, once


# ---- tokenizer -------------------------------------------------------------------------------------------------


CORPUS = "\n".join([
    "The quick brown fox jumps over the lazy dog. It's 9:30am; we'll see—don't you think? I'M SURE they'd agree.",
    Path(__file__).read_text()[:4000],  # code
    "def f(x):\n\tif x  >  0:\n\t\treturn   x**2\n\n\n    # indented comment   \r\n",
    " " * 2 + "a" + " " * 7 + "b" + " " * 24 + "c" + " " * 25 + "d" + " " * 49 + "e\u00a0f\u2003g\u3000h",
    "0 12 345 6789 3.14159 1,000,000 2026-11-26 +44 (0)20 7946 0958 ½ ² ٣٤٥",
    "日本語のテキストです。中文文本，标点符号！한국어 텍스트입니다. ภาษาไทย Ελληνικά Русский текст",
    "emoji 😀👍🏽👨‍👩‍👧‍👦🇫🇷 ✓ ∑ ∫ → ≠ ∞",
    "RTL: مرحبا بالعالم، كيف حالك؟ שלום עולם! Mixed עברית and English.",
    "combining: cafe\u0301 e\u0301\u0302 n\u0303 A\u030a \u1e9b\u0323 Å Ω",
    "special: <|endoftext|> after <|pad|> and <|im_start|>user\nhi<|im_end|> |||EMAIL_ADDRESS||| <|padding|>",
    "URLs https://example.com/a?b=c&d=e#f and emails someone@example.org",
])


@pytest.mark.parametrize("name", ["allenai_dolma2.json", "allenai_gpt-neox-olmo-dolma-v1_5.json",
                                  "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"])
def test_tokenizer_matches_the_tokenizers_library(name):
    tokenizers = pytest.importorskip("tokenizers")
    path = TOKENIZERS / name
    ours, ref = olmo.load_tokenizer(path), tokenizers.Tokenizer.from_file(str(path))
    for text in [CORPUS, *CORPUS.split("\n")]:
        ids = ours.encode(text)
        assert ids == ref.encode(text).ids, text[:60]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    padded = [ids[0], ours.enc.n_vocab + 7, ids[1]]  # an embedding row with no token (OLMo 2 has 100352 for 100278)
    assert ours.decode(padded) == ref.decode(padded, skip_special_tokens=False) == ours.decode([ids[0], ids[1]])
    assert ours.eos_token_id == {"allenai_dolma2.json": 100257}.get(name, 50279 if "v1_5" in name else 0)


def test_tokenizer_errors_and_eos_from_tokenizer_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        olmo.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizer.json"):
        olmo.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((TOKENIZERS / "allenai_dolma2.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|pad|>"}}))
    assert olmo.load_tokenizer(tmp_path).eos_token_id == 100277


# ---- sample.py -------------------------------------------------------------------------------------------------


def as_read(text):
    """text as run_sample reads it back from a pipe (universal newlines: "\\r\\n" and "\\r" become "\\n")."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def reference_greedy(cls, folder, ids, n, dtype=torch.float32, eos=None):
    """The reference's greedy generate(): the new ids, without the final end-of-text if it stopped there."""
    model = cls.from_pretrained(folder, dtype=dtype).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos or model.config.eos_token_id)
    new = out[0, len(ids):].tolist()
    return new[:-1] if new and new[-1] in ([eos] if isinstance(eos, int) else eos or [model.config.eos_token_id]) else new


def assert_greedy_as_the_reference(cls, folder, prompt_ids, new):
    """Teacher-forced: the reference reads prompt + new in bfloat16 and float32; each new token must be its bfloat16
    argmax where the top two logits are further apart than its bfloat16 logits are from its float32 ones there."""
    seq = torch.tensor([prompt_ids + new])
    logits = {dtype: cls.from_pretrained(folder, dtype=dtype).eval()(input_ids=seq).logits[0, len(prompt_ids) - 1:-1].float()
              for dtype in (torch.bfloat16, torch.float32)}
    error = (logits[torch.bfloat16] - logits[torch.float32]).abs().amax(-1)  # (len(new),)
    top = logits[torch.bfloat16].topk(2, -1)
    clear = top.values[:, 0] - top.values[:, 1] > error
    assert clear.sum() >= len(new) // 2, (clear.sum(), error)
    wrong = [i for i in range(len(new)) if clear[i] and new[i] != top.indices[i, 0]]
    assert not wrong, f"new tokens {wrong} are not the reference's clear choice"


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype,extra", [("olmo", "float32", []), ("olmo2", "float32", []),
                                                ("olmo2", "bfloat16", []), ("olmo3", "float32", []),
                                                ("olmo3", "float32", ["--compile"]), ("olmoe", "float32", []),
                                                ("flex_olmo", "bfloat16", []), ("olmo_hybrid", "float32", [])])
def test_sample_greedy_equals_reference_generate(family, dtype, extra, tmp_path):
    # the mixtures of experts are saved in shards, as the released ones are
    cls = e2e_checkpoint(family, tmp_path, max_shard_size="2MB" if family in ("olmoe", "flex_olmo") else None)
    if family in ("olmoe", "flex_olmo"):
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    prompt = "The history of the  Open Language Model ist ganz 日本語 interessant:"
    ids = tok.encode(prompt).ids
    r = run_sample("--model", str(tmp_path), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "40",
                   "--dtype", dtype, "--device", "cpu", *extra)
    assert r.returncode == 0, r.stderr
    assert "prefill" in r.stderr and "decode" in r.stderr and "peak" in r.stderr
    if dtype == "float32":  # float32 greedy text is the reference's, token for token
        new = reference_greedy(cls, tmp_path, ids, 40)
        assert len(new) > 20  # long enough to pass olmo3's sliding window (6) several times
        assert r.stdout == as_read(prompt + tok.decode(new, skip_special_tokens=False) + "\n")
        return
    # bfloat16: we decode with torch.mv where the reference calls F.linear, so a last bit can differ, and on random
    # weights two tokens can be that close. The text is ours (generate.generate in this process, what sample.py
    # printed), and every token of it must be the reference's choice given the same text before it, wherever the
    # reference's top two are further apart than its own bfloat16 error
    model = olmo.OlmoForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    eos = model.config.eos_token_id
    new = list(generate.generate(model, ids, 40, stop_ids={eos}))
    new = new[:-1] if new[-1] == eos else new
    # (decoded by Python, as sample.py prints: the tokenizers library replaces a broken UTF-8 sequence differently)
    assert len(new) > 20 and r.stdout == as_read(prompt + olmo.load_tokenizer(tmp_path).decode(new) + "\n")
    assert_greedy_as_the_reference(cls, tmp_path, ids, new)


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {generate.sample_next(logits, 1.0, generator=g, **kw).item() for _ in range(300)}
    assert generate.sample_next(logits, 0).item() == 0
    assert draws(top_k=2) == {0, 1}
    p = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...: top_p=0.8 needs the first two, 0.6 only the first
    assert p[0] < 0.8 < p[0] + p[1]
    assert draws(top_p=0.8) == {0, 1}
    assert draws(top_p=0.6) == {0}
    assert draws() == {0, 1, 2, 3, 4}


GREEDY = dict(temperature=0.0, top_k=None, top_p=None)  # sample.stream and sample.converse: greedy replies


def _valid_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_streaming_never_prints_a_broken_character(tmp_path, monkeypatch):
    tokenizer = olmo.load_tokenizer(TOKENIZERS / "allenai_dolma2.json")
    text = "naïve 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok 👨‍👩‍👧 日本"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode_bytes([i]) for i in ids]
    assert any(b"\xef\xbf\xbd" in p or not _valid_utf8(p) for p in pieces)  # some tokens split a character
    monkeypatch.setattr(generate, "generate", lambda *a, **k: iter(ids))
    writes = []
    monkeypatch.setattr(sys, "stdout", type("W", (), {"write": lambda self, s: writes.append(s), "flush": lambda self: None})())
    model = load("olmo2")
    assert sample.stream(model, tokenizer, [5], len(ids), GREEDY) == (ids, False)  # every token, not interrupted
    assert "".join(writes) == text + "\n"
    assert not any("\ufffd" in w for w in writes)


@pytest.mark.slow
def test_prompt_from_stdin_and_file(tmp_path):
    e2e_checkpoint("olmo2", tmp_path)
    (tmp_path / "p.txt").write_text("From a file")
    common = ["--model", str(tmp_path), "--temperature", "0", "--max-new-tokens", "5", "--dtype", "float32"]
    a = run_sample(*common, "--prompt-file", str(tmp_path / "p.txt"))
    b = run_sample(*common, "--prompt", "-", stdin="From a file")
    assert a.returncode == 0 and a.stdout.startswith("From a file") and a.stdout == b.stdout


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--device", "tpu"], "--device tpu"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file"),
    (["--max-new-tokens", "300"], "exceeds the model's context of 256 tokens"),
    (["--chat"], "has no chat template"),
])
@pytest.mark.slow
def test_bad_arguments_get_argparse_errors(args, message, tmp_path):
    e2e_checkpoint("olmo2", tmp_path)
    r = run_sample("--model", str(tmp_path), "--prompt", "hi", *args)
    assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr
    assert re.search(message, r.stderr), r.stderr


@pytest.mark.slow
def test_bad_model_is_a_one_line_error(tmp_path):
    r = run_sample("--model", str(tmp_path / "missing"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "does not exist" in r.stderr
    r = run_sample("--model", str(FIXTURES / "olmo2"), "--tokenizer", str(tmp_path / "missing"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and f"--tokenizer {tmp_path / 'missing'}: " in r.stderr


@pytest.mark.slow
def test_ctrl_c_stops_cleanly(tmp_path):
    import signal
    e2e_checkpoint("olmo2", tmp_path)
    cmd = [sys.executable, str(Path(__file__).parent / "sample.py"), "--model", str(tmp_path), "--prompt", "Hi",
           "--max-new-tokens", "250", "--temperature", "1", "--dtype", "float32"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.read(2) == "Hi"  # the prompt is echoed once generation starts
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "interrupted; prompt 1 tokens" in err  # the stats line still comes


TULU = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>\\n' + m['content'] + '\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '<|user|>\\n' + m['content'] + '\\n' }}{% else %}"
        "{{ '<|assistant|>\\n' + m['content'] + eos_token + '\\n' }}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.slow
@pytest.mark.parametrize("template,family", [(TULU, "olmo2"), (CHATML, "olmo3")])
def test_chat_prompt_equals_transformers_template(template, family, tmp_path):
    e2e_checkpoint(family, tmp_path, chat_template=template)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    template_text, specials = sample.chat_template(tmp_path)
    assert sample.render_chat(template_text, specials, messages) == expected
    tokenizer = olmo.load_tokenizer(tmp_path)
    assert tokenizer.encode(expected) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                                return_dict=False)


@pytest.mark.slow
def test_chat_generation_stops_at_end_of_turn(tmp_path):
    cls = e2e_checkpoint("olmo3", tmp_path, chat_template=CHATML)
    tokenizer = olmo.load_tokenizer(tmp_path)
    im_end = tokenizer.added["<|im_end|>"]
    config = olmo.read_config(tmp_path)
    assert sample.stop_tokens(tmp_path, config, tokenizer, chat=True) == {100257, im_end}
    prompt = "Hello there"
    text = sample.render_chat(CHATML, {}, [{"role": "user", "content": prompt}])
    new = reference_greedy(cls, tmp_path, tokenizer.encode(text), 30, eos=[100257, im_end])
    r = run_sample("--model", str(tmp_path), "--chat", "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "30",
                   "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == tokenizer.decode(new) + "\n"  # only the reply is printed


# ---- a conversation (sample.py --chat without --prompt) --------------------------------------------------------


# like a Think model's template, which drops the reasoning from earlier replies: the history renders differently
# from what was generated, so the cache must be rewound to where the two part
TRUNCATING = CHATML.replace("m['content'] + '<|im_end|>", "(m['content'][:7] if m['role'] == 'assistant' else m['content']) + '<|im_end|>")
MESSAGES = ["Hello there!", "What is the capital of France?", "Tell me more about it."]


def reference_conversation(cls, folder, messages, n, system=None):
    """Each reply as the reference makes it: greedy generate() on apply_chat_template of the history so far."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>") if t in tok.get_vocab()]
    history, replies, lengths = [{"role": "system", "content": system}] if system else [], [], []
    for message in messages:
        history.append({"role": "user", "content": message})
        ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
        lengths.append(len(ids))
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stops)
        new = out[0, len(ids):].tolist()
        replies.append(tok.decode(new[:-1] if new[-1] in stops else new, skip_special_tokens=False))
        history.append({"role": "assistant", "content": replies[-1]})
    return replies, lengths


@pytest.mark.slow
@pytest.mark.parametrize("template,family", [(TULU, "olmo2"), (CHATML, "olmo3"), (TRUNCATING, "olmo2")],
                         ids=["tulu", "chatml", "truncating"])
def test_conversation_equals_reference_turn_by_turn(template, family, tmp_path):
    cls = e2e_checkpoint(family, tmp_path, chat_template=template)
    expected, lengths = reference_conversation(cls, tmp_path, MESSAGES, 12, system="Be brief.")
    r = run_sample("--model", str(tmp_path), "--chat", "--system", "Be brief.", "--temperature", "0",
                   "--max-new-tokens", "12", "--dtype", "float32", stdin="\n".join(MESSAGES) + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(reply + "\n" for reply in expected)
    assert r.stderr.count("decode ") == 3  # a statistics line per reply
    # the cache: turns 2 and 3 feed only what follows the prefix that the cache holds, where it can be rewound to
    # where the new rendering parts from what was fed (the reply as generated and as tokenized again can differ);
    # olmo3's sliding layers keep rings of 6 here, which have wrapped: those turns are computed again
    fed = [int(n) for n in re.findall(r"prompt (\d+) tokens", r.stderr)]
    assert fed[0] == lengths[0]
    assert (fed[1] < lengths[1] and fed[2] < lengths[2]) if family == "olmo2" else fed[1:] == lengths[1:]


@pytest.mark.parametrize("template,family", [(CHATML, "olmo3"), (TRUNCATING, "olmo3"), (CHATML, "olmo_hybrid")],
                         ids=["chatml", "truncating", "hybrid"])
def test_cached_conversation_equals_recomputing_every_turn(template, family, tmp_path, monkeypatch, capsys):
    e2e_checkpoint(family, tmp_path, chat_template=template)
    model, tokenizer = olmo.OlmoForCausalLM.from_pretrained(tmp_path), olmo.load_tokenizer(tmp_path)
    stops = sample.stop_tokens(tmp_path, model.config, tokenizer, True)
    outputs = []
    for keep_cache in (True, False):
        monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(MESSAGES) + "\n"))
        assert sample.converse(model, tokenizer, template, {}, None, 4096, 10, GREEDY, stops, None, keep_cache) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) >= 3


def test_conversation_keeps_an_interrupted_reply(tmp_path, monkeypatch, capsys):
    # Ctrl-C during a reply stops it; the partial reply stays in the history, and the conversation goes on
    e2e_checkpoint("olmo3", tmp_path, chat_template=CHATML)
    model, tokenizer = olmo.OlmoForCausalLM.from_pretrained(tmp_path), olmo.load_tokenizer(tmp_path)
    plain, histories = generate.generate, []

    def interrupted_after_3(*a, **k):
        for i, token in enumerate(plain(*a, **k)):
            if i == 3 and not histories[1:]:
                raise KeyboardInterrupt
            yield token
    monkeypatch.setattr(generate, "generate", interrupted_after_3)
    render = sample.render_chat
    monkeypatch.setattr(sample, "render_chat", lambda t, s, messages: histories.append(list(messages)) or render(t, s, messages))
    monkeypatch.setattr(sys, "stdin", io.StringIO("First\nSecond\n"))
    stops = sample.stop_tokens(tmp_path, model.config, tokenizer, True)
    assert sample.converse(model, tokenizer, CHATML, {}, None, 4096, 10, GREEDY, stops) == 0
    out, err = capsys.readouterr()
    assert "interrupted; " in err and len(histories) == 2
    partial = out.splitlines()[0]
    assert histories[1][:2] == [{"role": "user", "content": "First"}, {"role": "assistant", "content": partial}]
    assert len(tokenizer.encode(partial)) == 3


@pytest.mark.slow
def test_conversation_commands_and_a_full_context(tmp_path):
    e2e_checkpoint("olmo2", tmp_path, chat_template=TULU)
    common = ["--model", str(tmp_path), "--chat", "--temperature", "0", "--max-new-tokens", "8", "--dtype", "float32"]
    r = run_sample(*common, stdin="Hello\n/reset\nHello\n/system Be nice.\n\n/quit\nnot read\n")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()[:2]
    assert first == second and len(r.stdout.splitlines()) == 2  # /reset: the same first turn again; /quit ends
    assert "(a new conversation)" in r.stderr and "system message: 'Be nice.'" in r.stderr
    # the first turn is 13 tokens: its reply fills the remaining 5 of 18; the second turn does not fit
    r = run_sample(*common, "--max-context", "18", stdin="Hi\nHi again\n")
    assert r.returncode == 0, r.stderr
    assert "decode 5 tokens" in r.stderr and "(the context is full: /reset starts a new conversation)" in r.stderr
    assert "the context holds 18 (--max-context): /reset starts a new one" in r.stderr


@pytest.mark.slow
def test_conversation_in_a_terminal_ends_with_ctrl_d(tmp_path):
    import pty
    e2e_checkpoint("olmo2", tmp_path, chat_template=TULU)
    leader, follower = pty.openpty()
    p = subprocess.Popen([sys.executable, str(Path(__file__).parent / "sample.py"), "--model", str(tmp_path), "--chat",
                          "--temperature", "0", "--max-new-tokens", "5", "--dtype", "float32"],
                         stdin=follower, stdout=follower, stderr=subprocess.PIPE, text=True)
    os.close(follower)
    seen = b""
    while seen.count(b"> ") < 1:  # the prompt, once the model is loaded
        seen += os.read(leader, 1024)
    os.write(leader, b"Hello\n")
    while seen.count(b"> ") < 2:  # the reply, then the prompt again
        seen += os.read(leader, 1024)
    os.write(leader, b"\x04")  # Ctrl-D
    assert p.wait(timeout=60) == 0
    assert "/reset starts a new conversation" in p.stderr.read()
    os.close(leader)


# ---- bench.py --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--no-reference", "--profile", "--quantize", "w8a8"]])
def test_bench_runs_and_reports(extra):
    # a smoke test of the benchmark's code paths on a tiny checkpoint (its timings mean nothing here)
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "bench.py"), "--model", str(FIXTURES / "olmo2"),
                        "--dtype", "float32", "--device", "cpu", "--rounds", "1", "--max-new-tokens", "4",
                        "--prefill-len", "8", "--batch", "2", "--parts", "inprocess", *extra],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("KEY ") and "of read bandwidth" in lines[-1]
    with_reference = not extra and importlib.util.find_spec("transformers") is not None
    assert ("transformers" in lines[-1]) == with_reference
    assert any(line.startswith("peak RSS GB") for line in lines) and "linear layers alone" in r.stdout
    assert ("profile of ours, decode at batch 1" in r.stdout and "aten::" in r.stdout) == ("--profile" in extra)


def test_bench_preset_keeps_its_first_layers():
    import bench
    full, cut = olmo.OlmoConfig.from_name("Olmo-3-1025-7B"), bench.preset("Olmo-3-1025-7B:5")
    assert cut.num_hidden_layers == 5 and cut.layer_types == full.layer_types[:5] and cut.hidden_size == full.hidden_size
    assert "sliding_attention" in cut.layer_types and "full_attention" in cut.layer_types


@pytest.mark.slow
def test_bench_whole_processes_run_and_report(tmp_path):
    # sample.py and the transformers script as whole processes, bf16, int8 and w8a8 (their peers need torchao)
    e2e_checkpoint("olmo2", tmp_path)
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "bench.py"), "--model", str(tmp_path),
                        "--parts", "processes", "--variants", "bf16,int8,w8a8", "--process-rounds", "1", "--max-new-tokens", "6",
                        "--prefill-len", "32"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip().splitlines()[-1]
    assert key.startswith("KEY processes") and "bf16" in key and "x transformers" in key and "x our bf16" in key
    assert "olmo.py int8" in r.stdout and "olmo.py w8a8" in r.stdout and "transformers bf16" in r.stdout
    # N chosen for each run from a first process's own rate: at least 17, within the context (256)
    n = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(olmo\.py \w+|transformers \w+) +(\d+) ", r.stdout, re.M)}
    assert len(n) >= 4 and all(17 <= v <= 256 for v in n.values()), r.stdout


# ---- the notebooks' exercises ----------------------------------------------------------------------------------


WRONG = {  # each exercise with a plausible mistake, which its check must catch
    "parameter_count": lambda c: solutions.parameter_count(c) + c.vocab_size * c.hidden_size * c.tie_word_embeddings,
    "olmoe_rms_norm": lambda x, w, eps: (w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype),  # OLMo 2's
    "sliding_window_mask": lambda T, w: solutions.sliding_window_mask(T, None if w is None else w + 1),
    "rope": lambda x, pos, theta: solutions.rope(x.flip(-1), pos, theta).flip(-1),  # interleaved pairs, not halves
    "kv_cache_bytes": lambda c, t: 2 * c.num_key_value_heads * c.head_dim * 2 * t * c.num_hidden_layers,  # no windows
    "longest_wavelength": lambda theta, hd: 2 * math.pi * theta,
    "top_p_before_temperature": lambda logits, p, t: generate.filtered_probs(logits, temperature=t, top_p=p),  # other order
    "min_p": lambda logits, m: (lambda q: q / q.sum(-1, keepdim=True))(logits.softmax(-1) * (logits.softmax(-1) >= m)),  # absolute
    "longest_match": lambda piece, ranks: checks._dolma2().enc.encode_ordinary(piece.decode()),  # BPE's ids
    "att_proj_split": lambda w, c: tuple(w.chunk(3)),  # equal thirds: wrong under GQA
    "trigram_bits_per_byte": lambda train, val: solutions.trigram_bits_per_byte(train, val) * math.log(2),  # nats
    "initial_bits_per_byte": lambda v: math.log(v),  # nats
    "capacity_kept": lambda logits, k, capacity: torch.ones(logits.shape[0], k, dtype=torch.bool),  # no capacity
    "active_parameters": lambda c: checks._count(c),  # every expert, and the embedding table
    "exact_write_beta": lambda S, k, v: 1.0,  # as if k were normalized
    "state_bytes": lambda c: solutions.state_bytes(c) // 2,
}


def _rope_by_halves(x, positions, theta, exponent_step=2):  # the rotation spelled out pair by pair
    hd = x.shape[-1]
    angle = positions[:, None].float() / theta ** (exponent_step * torch.arange(hd // 2).float() / hd)  # (T, hd/2)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


def _longest_match_recursive(piece, ranks, longest=True):  # the longest (or, wrongly, shortest) prefix, then the rest
    if not piece:
        return []
    sizes = [n for n in range(1, len(piece) + 1) if piece[:n] in ranks]
    n = max(sizes) if longest else min(sizes)
    return [ranks[piece[:n]]] + _longest_match_recursive(piece[n:], ranks, longest)


def _trigram_by_counter(train, val):
    import collections
    three = collections.Counter(zip(train.tolist(), train[1:].tolist(), train[2:].tolist()))
    two = collections.Counter(zip(train.tolist(), train[1:-1].tolist()))
    v = val.tolist()
    return sum(-math.log2((three[a, b, c] + 1) / (two[a, b] + 256)) for a, b, c in zip(v, v[1:], v[2:])) / (len(v) - 2)


def _top_p_by_count(logits, p, t):  # keep the n likeliest, n = 1 + how many cumulative sums stay below p
    probs = logits.softmax(-1)[0]
    n = 1 + int((probs.sort(descending=True).values.cumsum(0) < p).sum())
    chosen = torch.zeros_like(probs, dtype=torch.bool)
    chosen[probs.argsort(descending=True)[:n]] = True
    return torch.where(chosen, logits / t, float("-inf")).softmax(-1)


def _capacity_by_counting(logits, k, capacity):  # pair i is kept if fewer than `capacity` earlier pairs chose its expert
    chosen = logits.argsort(-1, descending=True)[:, :k].flatten().tolist()
    return torch.tensor([chosen[:i].count(e) < capacity for i, e in enumerate(chosen)]).view(-1, k)


def _kv_cache_by_cache(c, t, heads=None):
    cache = olmo.KVCache(c, 1, t, heads or c.num_key_value_heads, "meta", torch.bfloat16)
    return sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers)


RIGHT_TOO = {  # right answers written otherwise than solutions.py's, which their checks must accept too
    "parameter_count": lambda c: checks._count(c),
    "olmoe_rms_norm": lambda x, w, eps: (x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w,
    "sliding_window_mask": lambda T, w: torch.ones(T, T, dtype=torch.bool).tril() & (
        torch.ones(T, T, dtype=torch.bool).triu(-(w - 1)) if w is not None else True),
    "rope": _rope_by_halves,
    "kv_cache_bytes": _kv_cache_by_cache,
    "longest_wavelength": lambda theta, hd: 2 * math.pi * theta ** ((hd - 2) / hd),
    "top_p_before_temperature": _top_p_by_count,
    "min_p": lambda logits, m: torch.where(logits >= logits.max(-1, keepdim=True).values + math.log(m), logits,
                                           float("-inf")).softmax(-1),
    "longest_match": _longest_match_recursive,
    "att_proj_split": lambda w, c: (w[:c.hidden_size], w[c.hidden_size:c.hidden_size + c.num_key_value_heads * c.head_dim],
                                    w[c.hidden_size + c.num_key_value_heads * c.head_dim:]),
    "trigram_bits_per_byte": _trigram_by_counter,
    "initial_bits_per_byte": lambda v: -math.log2(1 / v),
    "capacity_kept": _capacity_by_counting,
    "active_parameters": lambda c: checks._count(c) - c.vocab_size * c.hidden_size  # all but the embedding table
    - c.num_hidden_layers * ((c.num_experts or 0) - (c.num_experts_per_tok or 0)) * 3 * c.hidden_size * c.intermediate_size,
    "exact_write_beta": lambda S, k, v: k.norm() ** -2,
    "state_bytes": lambda c: sum(s.S.nbytes + s.conv.nbytes for s in olmo.KVCache(c, 1, 1, 1, "meta", torch.bfloat16).layers
                                 if isinstance(s, olmo.GDNState)),
}
WRONG_TOO = {  # a second mistake for each
    "parameter_count": lambda c: solutions.parameter_count(c) + (c.num_attention_heads - c.num_key_value_heads) * c.head_dim
    * c.qk_norm * c.num_hidden_layers,  # k's QK-norm as wide as q's
    "olmoe_rms_norm": lambda x, w, eps: (w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)),  # in x's dtype throughout
    "sliding_window_mask": lambda T, w: solutions.sliding_window_mask(T, w).T,  # the future instead of the past
    "rope": lambda x, pos, theta: _rope_by_halves(x, pos, theta, exponent_step=1),  # theta^(-i/hd): half the exponent
    "kv_cache_bytes": lambda c, t: _kv_cache_by_cache(c, t, heads=c.num_attention_heads),  # query heads, not KV heads
    "longest_wavelength": lambda theta, hd: theta ** ((hd - 2) / hd),  # in radians per turn, not tokens
    "top_p_before_temperature": lambda logits, p, t: generate.filtered_probs(logits, top_p=p) ** (1 / t),  # not renormalized
    "min_p": lambda logits, m: logits.softmax(-1) * (logits.softmax(-1) >= m * logits.softmax(-1).max()),  # not renormalized
    "longest_match": lambda piece, ranks: _longest_match_recursive(piece, ranks, longest=False),  # single bytes
    "att_proj_split": lambda w, c: tuple(reversed(solutions.att_proj_split(w, c))),  # v, k, q
    "trigram_bits_per_byte": lambda train, val: solutions.trigram_bits_per_byte(val, val),  # trained on the validation text
    "initial_bits_per_byte": lambda v: math.log2(v - 1),  # the 256 bytes, forgetting the end-of-text token
    "capacity_kept": lambda logits, k, capacity: solutions.capacity_kept(logits.flip(0), k, capacity).flip(0),  # the last tokens first
    "active_parameters": lambda c: solutions.active_parameters(c) - c.num_hidden_layers * (c.num_experts or 0) * c.hidden_size,
    "exact_write_beta": lambda S, k, v: 1 / k.norm(),  # the norm, not its square
    "state_bytes": lambda c: c.layer_types.count("linear_attention") * c.num_attention_heads * (  # every head count alike
        4 * c.linear_key_head_dim * c.linear_value_head_dim
        + 2 * (2 * c.linear_key_head_dim + c.linear_value_head_dim) * (c.linear_conv_kernel_dim - 1)),
}
assert RIGHT_TOO.keys() == WRONG_TOO.keys() == WRONG.keys()


@pytest.mark.parametrize("name", sorted(RIGHT_TOO))
def test_exercise_checks_accept_another_right_answer_and_catch_a_second_wrong_one(name, capsys):
    check = getattr(checks, f"check_{name}")
    right = check(RIGHT_TOO[name])
    assert right is True and capsys.readouterr().out.startswith("right")
    assert check(WRONG_TOO[name]) is False
    assert capsys.readouterr().out.startswith("not yet")


@pytest.mark.parametrize("name", sorted(WRONG))
def test_exercise_checks_pass_the_solution_and_catch_a_wrong_one(name, capsys):
    check = getattr(checks, f"check_{name}")
    assert check(getattr(solutions, name)) is True
    assert capsys.readouterr().out.startswith("right")
    assert check(WRONG[name]) is False
    assert capsys.readouterr().out.startswith("not yet")
    assert check(lambda *args: None) is False  # an unsolved exercise: no exception, a message
    assert "returned None" in capsys.readouterr().out


# ---- notebooks -------------------------------------------------------------------------------------------------


NOTEBOOKS = sorted((Path(__file__).parent / "notebooks").glob("*.ipynb"))


def folder_contents(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts
            and ".ipynb_checkpoints" not in p.parts}


def test_the_notebooks_are_committed_with_outputs_asserts_and_exercises():
    nbformat = pytest.importorskip("nbformat")
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07", "08"]
    for path in NOTEBOOKS:
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        outputs = [o for c in cells for o in c.outputs]
        assert outputs and not any(o.output_type == "error" for o in outputs), path.name
        assert not any(o.get("name") == "stderr" for o in outputs), path.name  # no warnings, no progress bars
        source = "\n".join(c.source for c in cells)
        assert source.count("assert ") >= 5, path.name  # checked against olmo.py at each stage
        assert 2 <= len(re.findall(r"^check_\w+\(my_\w+\)$", source, re.M)) <= 4, path.name  # exercises
        text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
        assert "$$" in text, path.name  # a formula, rendered
        assert "pictures." in source and any("image/png" in o.get("data", {}) for o in outputs), path.name  # a diagram


@pytest.mark.slow
def test_readme_first_command_runs_the_tiny_olmo_offline():
    # the first set-up command of README.md: the checkpoint that notebook 06 trains, in the repository
    readme = (Path(__file__).parent / "README.md").read_text()
    command = shlex.split(re.search(r"python sample.py --model notebooks/tiny_olmo [^\n]*", readme).group())
    r = subprocess.run([sys.executable, *command[1:]], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Return the") and len(r.stdout) > 40 and "decode" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nbclient, nbformat = pytest.importorskip("nbclient"), pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    before = folder_contents(path.parent)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    assert folder_contents(path.parent) == before  # a notebook run by the tests writes nothing into the repository
