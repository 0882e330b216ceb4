"""quantize.py: int8, int4 and w8a8 against the plain math of rounded weights, and what they keep of the model."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import generate
import olmo
import quantize
import speed

from conftest import (CASES, F32_TOL, FIXTURES, HYBRID_STEP_TOL, assert_close_to_fixture, load, max_diff, reference, run_sample,
                      skip_on_torch_sdpa_bug)


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
def test_quantized_logits_match_the_fake_quantized_math(case, mode, live_reference):
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


TEXT = "# olmo.py\n\nAI2's OLMo language models in one readable PyTorch file: OLMo 1, 2 and 3, the mixtures of experts OLMoE and\nFlexOlmo, and Olmo Hybrid (Gated DeltaNet beside attention), logit-exact against the reference implementation\n(Hugging Fa"  # 240 bytes of an earlier README


def test_w8a8_keeps_the_trained_models_choices():
    # the trained tiny OLMo (notebooks/tiny_olmo) on TEXT: w8a8 with bfloat16 activations picks the float32 model's
    # top token at 96.7% of the positions (int8 97.5%, bfloat16 97.5%); one scale for a whole prompt instead of one
    # per row: 90.8%
    folder = Path(__file__).parent / "notebooks" / "tiny_olmo"
    ids = torch.tensor([list(TEXT.encode())])
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
