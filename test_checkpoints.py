"""Loading (olmo.py's loader, ai2_checkpoints.py): every layout the releases use, AI2's original and OLMo-core
checkpoints against AI2's own code, the Hub cache, memory, and errors that name the file and tensor."""

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ai2_checkpoints
import generate
import olmo

from conftest import (CASES, F32_RTOL, F32_TOL, FIXTURES, TOKENIZERS, _edit_config, _folder, _free_port, _write_state, as_read,
                      assert_close_to_fixture, max_diff, reference, run_sample)


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
    (tmp_path / "config.json").write_text(json.dumps(olmo.config_json(config)))
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
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder: .*nope"):
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
             "olmo_core_moe_dropless": "flex_olmo", "olmo_core_yarn_1e4": "olmo3"}


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


@pytest.mark.parametrize("theta,head_dim,old_context", [(10_000, 16, 65536), (10_000, 128, 131072), (10_000, 64, 8192),
                                                         (500_000, 128, 8192)])
def test_olmo_core_yarn_computes_as_olmo_core_hf_yarn_as_transformers(theta, head_dim, old_context):
    # the top of YaRN's ramp: OLMo-core caps it at head_dim/2 - 1, transformers at head_dim - 1 (they differ in the
    # first two cases, a frequency by up to 4.5 times); a config read from an OLMo-core checkpoint computes as
    # OLMo-core, a Hugging Face config as transformers, each bitwise (fixtures/olmo_core_yarn_1e4: the first, end to end)
    pytest.importorskip("olmo_core")
    transformers = pytest.importorskip("transformers")
    from olmo_core.nn.attention import SlidingWindowAttentionConfig
    from olmo_core.nn.feed_forward import FeedForwardConfig
    from olmo_core.nn.rope import YaRNRoPEScalingConfig
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = YaRNRoPEScalingConfig(factor=8.0, old_context_len=old_context)
    model = TransformerConfig.llama_like(d_model=2 * head_dim, vocab_size=128, n_layers=4, n_heads=2, qk_norm=True,
                                        rope_theta=theta, feed_forward=FeedForwardConfig(hidden_size=64, bias=False),
                                        block_name=TransformerBlockType.reordered_norm,
                                        sliding_window=SlidingWindowAttentionConfig(pattern=[4, 4, 4, -1]))
    experiment = json.loads(json.dumps({"model": model.with_rope_scaling(scaling).as_config_dict()}))  # as saved
    core = olmo.OlmoConfig.from_dict(ai2_checkpoints.config_from_olmo_core(experiment, "config.json"))
    expected, expected_factor = scaling.compute_scaled_inv_freq(theta, head_dim, torch.device("cpu"))
    inv_freq, attention_factor = olmo.rope_frequencies(core, yarn=True)
    assert torch.equal(inv_freq, expected) and attention_factor == expected_factor
    hf = {k: v for k, v in core.rope_scaling.items() if k != "olmo_core"}  # as a Hugging Face config.json has it
    reference_config = transformers.Olmo2Config(hidden_size=2 * head_dim, num_attention_heads=2,
                                                 max_position_embeddings=8 * old_context,
                                                 rope_parameters={**hf, "rope_theta": float(theta)})
    hf_expected, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](reference_config, "cpu")
    inv_freq, attention_factor = olmo.rope_frequencies(dataclasses.replace(core, rope_scaling=hf), yarn=True)
    assert torch.equal(inv_freq, hf_expected) and attention_factor == hf_factor
    apart = ((hf_expected - expected).abs() / expected).max()  # the two conventions
    assert apart > 0.1 if theta == 10_000 and old_context > 8192 else apart < 1e-6


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
    mixer, norm = config["model"]["block"]["sequence_mixer"], config["model"]["block"]["layer_norm"]
    for change, message in [(dict(name="peri_norm"), "block peri_norm"),
                            (dict(feed_forward={**config["model"]["block"]["feed_forward"], "bias": True}), "feed-forward"),
                            (dict(sequence_mixer={**mixer, "head_dim": 4}), "head_dim=4 \\(not d_model / n_heads\\)"),
                            # rotated or normalised in the model dtype: in bfloat16 not olmo.py's float32
                            (dict(sequence_mixer={**mixer, "rope": {**mixer["rope"], "full_precision": False}}),
                             "rope .*'full_precision': False"),
                            (dict(layer_norm={**norm, "full_precision": False}), "layer norm .*'full_precision': False")]:
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
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900)


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
    # the process reports in a file of its own, which nothing the model prints (a learner's debugging print) reaches
    script = f"""
import json, sys, torch, olmo
ref = torch.load({str(FIXTURES / "olmo2" / "reference.pt")!r})
model = olmo.OlmoForCausalLM.from_pretrained("allenai/OLMo-2-tiny", revision="stage1-step10-tokens1B")
out = dict(model_type=model.config.model_type,
           error=(model(ref["input_ids"])[0] - ref["logits"]).abs().max().item() / ref["logits"].abs().max().item())
try:
    olmo.OlmoForCausalLM.from_pretrained("allenai/OLMo-2-tiny", revision="stage9-no-such-step")
except OSError as e:
    out["refused"] = str(e)
open(sys.argv[1], "w").write(json.dumps(out))
"""
    r = _run_offline(tmp_path / "hub", "-c", script, str(tmp_path / "out.json"))
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["model_type"] == "olmo2" and out["error"] <= F32_RTOL
    assert "could not download 'allenai/OLMo-2-tiny' at revision 'stage9-no-such-step'" in out["refused"]
    r = _run_offline(tmp_path / "hub", str(Path(__file__).parent / "sample.py"), "--model", "allenai/OLMo-2-tiny",
                     "--revision", "stage9-no-such-step")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "at revision 'stage9-no-such-step'" in r.stderr
    with pytest.raises(ValueError, match="revision='main' is for Hub ids"):
        olmo.OlmoForCausalLM.from_pretrained(FIXTURES / "olmo2", revision="main")


@pytest.mark.parametrize("case", CASES)
def test_a_modified_model_saves_as_a_checkpoint_that_both_load(case, tmp_path):
    # save_pretrained after a change (a learner's edit, or training): olmo.py loads the folder to the same logits
    # bit for bit, and transformers to the same logits (to 1e-5 of the largest, as against the fixtures)
    transformers = pytest.importorskip("transformers")
    model, ids = olmo.OlmoForCausalLM.from_pretrained(FIXTURES / case), reference(case)["input_ids"]
    model.lm_head.weight.mul_(1.5)  # (OLMo 2's norm after the MLP would undo a scaled down_proj)
    logits = model(ids)[0]
    assert max_diff(logits, reference(case)["logits"]) > 1e-3  # the change shows
    tokenizer = olmo.load_tokenizer(TOKENIZERS / "allenai_dolma2.json")
    model.save_pretrained(tmp_path, tokenizer)
    assert torch.equal(olmo.OlmoForCausalLM.from_pretrained(tmp_path)(ids)[0], logits)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_close_to_fixture(ref(input_ids=ids).logits, logits)
    assert olmo.load_tokenizer(tmp_path).encode("Hello there") == tokenizer.encode("Hello there")


def test_a_quantized_model_is_not_saved(tmp_path):
    int8 = generate.load_model(FIXTURES / "olmo2", quantize="int8")
    with pytest.raises(ValueError, match="a quantized model is not saved: save the model it was quantized from"):
        int8.save_pretrained(tmp_path)


def test_a_mistyped_folder_is_named_as_a_folder(tmp_path, monkeypatch):
    # "models/tiny_olm" has the owner/name shape of a Hub id, but models/ is a folder here: a path, mistyped
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder: " + re.escape(str(tmp_path / "models" / "tiny_olm"))):
        olmo.resolve_checkpoint("models/tiny_olm")
