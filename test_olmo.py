"""The model's numerics (olmo.py): configs, every family's logits and loss against the reference (fixtures made by
Hugging Face transformers, and the reference run live), padding, the mixtures of experts, Gated DeltaNet, the KV cache."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import olmo

from conftest import (CASES, DENSE, F32_TOL, FIXTURES, FIXTURE_YARN, HYBRID_STEP_TOL, MOE, assert_close_to_fixture, decode_in_chunks,
                      load, max_diff, reference, reference_classes, skip_on_torch_sdpa_bug, with_config)


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
    model = load(case, attn)
    logits, _ = model(ref["input_ids"])
    assert logits.dtype == torch.float32
    assert_close_to_fixture(logits, ref["logits"], model, case)


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
def test_bfloat16_logits_match_the_live_reference(case, attn, matmul, monkeypatch, live_reference):
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


def test_olmoe_rounds_as_the_reference_in_bfloat16(monkeypatch, live_reference):
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


def test_imports_go_one_way():
    # olmo.py is the model a learner reads: it imports only files that import nothing of ours, and no file's imports
    # (at the top or inside a function) lead back to itself
    import ast
    root = Path(__file__).parent
    ours = {p.stem for p in root.glob("*.py") if not p.stem.startswith(("test_", "conftest"))}
    imports = {}
    for name in ours:
        tree = ast.parse((root / f"{name}.py").read_text())
        imports[name] = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                         for a in node.names} & ours
    assert imports["speed"] == imports["ai2_checkpoints"] == set()
    assert imports["olmo"] == {"speed", "ai2_checkpoints"}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in imports[start])
    assert not [name for name in ours if reaches(name, name)]


def test_a_config_field_changed_after_construction_is_honoured_or_refused():
    cfg = olmo.OlmoConfig.from_name("OLMo-2-0425-1B")
    cfg.num_hidden_layers = 2  # layer_types was filled in for 16: filled in anew
    assert cfg.layer_types == ["full_attention"] * 2
    with torch.device("meta"):
        assert len(olmo.OlmoForCausalLM(cfg).model.layers) == 2
    assert olmo.OlmoConfig.from_name("Olmo-3-1025-7B", num_hidden_layers=5).layer_types == \
        ["sliding_attention"] * 3 + ["full_attention", "sliding_attention"]
    assert cfg.replace(num_hidden_layers=3).layer_types == ["full_attention"] * 3
    with pytest.raises(ValueError, match=r"\(num_hidden_layers=3\).*give both, or layer_types=None"):
        dataclasses.replace(cfg, num_hidden_layers=3)  # the plain dataclass copy keeps the old list: said how to fix
    with pytest.raises(ValueError, match="hidden_size must divide into num_attention_heads"):
        cfg.num_attention_heads = 7
    assert cfg.num_attention_heads == 16  # a refused change leaves the config as it was
    hybrid = olmo.OlmoConfig.from_name("Olmo-Hybrid-7B")
    hybrid.hidden_size = 1920  # Gated DeltaNet's d_k follows (0.75 d / heads)
    assert hybrid.linear_key_head_dim == 48 and hybrid.linear_value_head_dim == 96


def test_attention_is_chosen_the_documented_ways(tmp_path, monkeypatch):
    # attn_implementation in from_pretrained, in config.json and on a built model's config: each takes effect
    calls = []
    monkeypatch.setattr(olmo.Attention, "attend", lambda self, *a: calls.append(1) or F.scaled_dot_product_attention(*a))
    ids = reference("olmo2")["input_ids"]
    model = olmo.OlmoForCausalLM.from_pretrained(FIXTURES / "olmo2")
    model(ids)
    assert not calls and model.config.attn_implementation == "sdpa"
    model.config.attn_implementation = "eager"
    model(ids)
    assert len(calls) == model.config.num_hidden_layers
    olmo.OlmoForCausalLM.from_pretrained(FIXTURES / "olmo2", attn_implementation="eager")(ids)
    assert len(calls) == 2 * model.config.num_hidden_layers
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((FIXTURES / "olmo2" / f).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attn_implementation": "eager"}))
    assert olmo.OlmoForCausalLM.from_pretrained(tmp_path).config.attn_implementation == "eager"
    with pytest.raises(ValueError, match="attn_implementation must be 'eager' or 'sdpa', got 'flash'"):
        model.config.attn_implementation = "flash"


def test_wrong_inputs_are_named():
    model = load("olmo2")
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, tokens\), got shape \(5,\) \(one sequence: input_ids\[None\]\)"):
        model(torch.tensor([1, 2, 3, 4, 5]))
    assert olmo.OlmoForCausalLM.from_pretrained(FIXTURES / "olmo2", dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be a torch.dtype or its name, e.g. 'bfloat16' or 'float32', got 'bf16'"):
        olmo.OlmoForCausalLM.from_pretrained(FIXTURES / "olmo2", dtype="bf16")
