"""Tests: olmo.py against reference logits made by Hugging Face transformers (fixtures/make_fixtures.py),
and, where transformers is installed, against the reference classes directly."""

import copy
import json
from pathlib import Path

import pytest
import torch

import olmo

torch.set_grad_enabled(False)
FIXTURES = Path(__file__).parent / "fixtures"
CASES = ["olmo1", "olmo1_tied_clip", "olmo2", "olmo2_gqa", "olmo3"]
F32_TOL = 1e-5
FIXTURE_YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                "beta_slow": 1, "attention_factor": 1.2079441541679836}  # as in make_fixtures.py


def load(case, attn="sdpa", dtype=None):
    model = olmo.OlmoForCausalLM.from_pretrained(FIXTURES / case, dtype=dtype)
    for layer in model.model.layers:
        layer.self_attn.eager = attn == "eager"
    return model


def reference(case):
    return torch.load(FIXTURES / case / "reference.pt")


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


# ---- exactness against the reference fixtures ------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES)
def test_float32_logits_match_reference(case, attn):
    ref = reference(case)
    logits, _ = load(case, attn)(ref["input_ids"])
    assert logits.dtype == torch.float32
    assert max_diff(logits, ref["logits"]) < F32_TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES)
def test_bfloat16_logits_within_reference_rounding(case, attn):
    # bfloat16 keeps 8 significant bits, so logits of size ~4 round in steps of 1/32, and 2-4 layers of such
    # rounding move them by a few steps: the reference's own bf16 logits differ from its float32 ones by
    # 0.045-0.082 on these fixtures. Ours must be as close to float32 as that, within a factor 1.5 (a
    # different attention kernel rounds differently), and the SDPA path uses the reference's kernel, so
    # must equal its bf16 logits to one rounding step of the largest logit (1/32).
    ref = reference(case)
    logits, _ = load(case, attn, torch.bfloat16)(ref["input_ids"])
    assert logits.dtype == torch.bfloat16
    ref_error = max_diff(ref["logits_bf16"], ref["logits"])
    assert max_diff(logits, ref["logits"]) <= 1.5 * ref_error
    if attn == "sdpa":
        assert max_diff(logits, ref["logits_bf16"]) <= 1 / 32


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


# ---- KV cache ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("chunks", [[1] * 24, [5, 1, 1, 10, 7], [12, 12], [3, 21]])
@pytest.mark.parametrize("case", CASES)
def test_cached_decoding_equals_full_forward(case, chunks, attn):
    # olmo3's sliding layers keep only the last 8 keys in a ring; 24 tokens wrap it three times, and chunks
    # longer than one token take the path that must not overwrite keys the chunk itself still needs
    model, ids = load(case, attn), reference(case)["input_ids"]
    full, _ = model(ids)
    cache, start, out = model.new_cache(2, 24), 0, []
    for n in chunks:
        out.append(model(ids[:, start:start + n], cache=cache)[0])
        start += n
    assert max_diff(torch.cat(out, 1), full) < F32_TOL
    assert cache.length == 24


def test_sliding_layers_keep_only_the_window():
    model = load("olmo3")
    cache = model.new_cache(2, 100)
    sizes = [k.shape[2] for k in cache.k]
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


# ---- left-padded batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_batch_matches_reference_and_single_prompts(attn):
    ref, model = reference("olmo3"), load("olmo3", attn)
    ids, mask = ref["padded_ids"], ref["padded_mask"]
    logits, _ = model(ids, attention_mask=mask)
    real = mask.bool()
    assert max_diff(logits[real], ref["padded_logits"][real]) < F32_TOL
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


# ---- every feature is live: turning it off changes the logits -------------------------------------------------


@pytest.mark.parametrize("case,change", [
    ("olmo1_tied_clip", dict(clip_qkv=None)),
    ("olmo3", dict(sliding_window=16)),
    ("olmo3", dict(layer_types=["full_attention"] * 4)),
    ("olmo3", dict(rope_scaling={**FIXTURE_YARN, "factor": 4.0})),
    ("olmo3", dict(rope_scaling=None)),
    ("olmo2", dict(rope_theta=10000.0)),
])
def test_feature_changes_logits(case, change):
    model, ids = load(case), reference(case)["input_ids"]
    assert max_diff(with_config(model, **change)(ids)[0], model(ids)[0]) > 1e-2


def test_yarn_only_on_full_attention_layers():
    # YaRN applied to every layer (the transformers 5.2 regression) must not match the reference
    model, ids = load("olmo3"), reference("olmo3")["input_ids"]
    yarn_everywhere = olmo.rope_cos_sin
    try:
        olmo.rope_cos_sin = lambda config, yarn, pos: yarn_everywhere(config, True, pos)
        wrong, _ = model(ids)
    finally:
        olmo.rope_cos_sin = yarn_everywhere
    assert max_diff(wrong, reference("olmo3")["logits"]) > 1e-2


def test_tied_head_shares_the_embedding():
    model = load("olmo1_tied_clip")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in olmo.read_safetensors(FIXTURES / "olmo1_tied_clip" / "model.safetensors")


# ---- config -------------------------------------------------------------------------------------------------


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
    assert len(names) == 11
    c = olmo.OlmoConfig.from_name("allenai/Olmo-3-1025-7B-Instruct")
    assert c.layer_types[:4] == ["sliding_attention"] * 3 + ["full_attention"] and c.sliding_window == 4096
    assert olmo.OlmoConfig.from_name("OLMo-2-0325-32B").num_key_value_heads == 8
    with torch.device("meta"):  # parameter counts of the released sizes, without allocating them
        n = sum(p.numel() for p in olmo.OlmoForCausalLM(olmo.OlmoConfig.from_name("OLMo-1B-hf")).parameters())
        assert round(n / 1e9, 2) == 1.18  # OLMo-1B: tied head
        n = sum(p.numel() for p in olmo.OlmoForCausalLM(olmo.OlmoConfig.from_name("OLMo-2-0425-1B")).parameters())
        assert round(n / 1e9, 2) == 1.48
    with pytest.raises(ValueError, match="unknown preset"):
        olmo.OlmoConfig.from_name("OLMo-9B")


# ---- live cross-check against transformers -------------------------------------------------------------------


def _random_configs():
    import random
    rng = random.Random(0)
    for family in ["olmo", "olmo2", "olmo3"] * 2:
        H = rng.choice([2, 4])
        d = dict(model_type=family, vocab_size=rng.randint(50, 200), hidden_size=16 * H, num_attention_heads=H,
                 num_key_value_heads=rng.choice([k for k in (1, 2, H) if H % k == 0]) if family != "olmo" else H,
                 intermediate_size=rng.choice([40, 64]), num_hidden_layers=rng.randint(1, 5),
                 max_position_embeddings=128, pad_token_id=0, eos_token_id=1)
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
    transformers = pytest.importorskip("transformers")
    ref_cls, cfg_cls = {"olmo": (transformers.OlmoForCausalLM, transformers.OlmoConfig),
                        "olmo2": (transformers.Olmo2ForCausalLM, transformers.Olmo2Config),
                        "olmo3": (transformers.Olmo3ForCausalLM, transformers.Olmo3Config)}[d["model_type"]]
    torch.manual_seed(0)
    ref = ref_cls(cfg_cls(**{k: v for k, v in d.items() if k != "model_type"})).eval()
    for name, p in ref.named_parameters():  # norm weights away from 1, so they are tested too
        if "norm" in name:
            p.copy_(1 + 0.3 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    ours = olmo.OlmoForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(2, d["vocab_size"], (2, 20))
    expected = ref(input_ids=ids).logits
    assert max_diff(ours(ids)[0], expected) < F32_TOL
    cache = ours.new_cache(2, 20)
    stepped = torch.cat([ours(ids[:, :7], cache=cache)[0]] + [ours(ids[:, t:t + 1], cache=cache)[0] for t in range(7, 20)], 1)
    assert max_diff(stepped, expected) < F32_TOL
