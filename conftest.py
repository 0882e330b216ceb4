"""What the test files share: the fixtures' paths and tolerances, loading a fixture and its reference output,
the reference computed live, checkpoints made with a real tokenizer, and running sample.py as a process.
The tests are split by what they test: test_olmo.py (the model's numerics), test_checkpoints.py, test_quantize.py,
test_tp.py, test_speed.py, test_tokenizer.py, test_sample.py (generation and the command line), test_bench.py and
test_notebooks.py."""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import olmo

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
# over ATEN_CPU_CAPABILITY=default/avx2/avx512 with ONEDNN_MAX_CPU_ISA/MKL_ENABLE_INSTRUCTIONS=AVX2 (docs/testing.md):
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
    other = olmo.OlmoForCausalLM(model.config.replace(**changes))
    other.load_state_dict(model.state_dict())
    return other.eval()


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def assert_close_to_fixture(logits, expected, model=None, case=None):
    """Float32 logits against a fixture's, to F32_RTOL of its largest logit (see F32_RTOL). Given the model and its
    fixture's case, a failure names the first module whose output differs from the reference's."""
    tol = F32_RTOL * expected.abs().max().item()
    diff = max_diff(logits, expected)
    where = first_divergence(model, case) if diff > tol and model is not None else ""
    assert diff <= tol, f"max |difference| {diff:.2e} > {tol:.2e}{where}"


def first_divergence(model, case):
    """Where a model first computes otherwise than the reference (transformers) on a fixture's input: both run with a
    hook on every module, and the modules of the same name (the parameter names are the same) compared in the order
    ours ran them, each on its own first output."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / case, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    outputs = {}
    for key, m in (("ours", model), ("ref", ref)):
        outputs[key] = {}
        for name, module in m.named_modules():
            def keep(module, args, out, name=name, store=outputs[key]):
                out = out[0] if isinstance(out, tuple) else out
                if torch.is_tensor(out) and name not in store:
                    store[name] = out.detach().float()
            module.register_forward_hook(keep)
        m(input_ids=reference(case)["input_ids"]) if key == "ref" else m(reference(case)["input_ids"])
    for name, ours in outputs["ours"].items():
        theirs = outputs["ref"].get(name)
        if theirs is not None and theirs.shape == ours.shape and max_diff(ours, theirs) > F32_RTOL * theirs.abs().max():
            return f"; the first module to differ from the reference: {name} (max |difference| {max_diff(ours, theirs):.2e})"
    return "; no module's output differs from the reference's by more than that"


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


@pytest.fixture(scope="session")
def live_reference():
    """live_reference(case, dtype, attn="sdpa"): the reference's output (logits, and a mixture's router logits) on the
    fixture's input, computed here and now: in bfloat16 the kernels of this machine decide the last bits, so a stored
    fixture would be another machine's. Each is computed once per test session."""
    computed = {}

    def run(case, dtype, attn="sdpa"):
        if (case, dtype, attn) not in computed:
            transformers = pytest.importorskip("transformers")
            model = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / case, dtype=dtype, attn_implementation=attn)
            ids = reference(case)["input_ids"]
            computed[case, dtype, attn] = skip_on_torch_sdpa_bug(model.eval(), input_ids=ids, output_router_logits=case in MOE)
        return computed[case, dtype, attn]
    return run


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
                          text=True, input=stdin, timeout=900)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_read(text):
    """text as run_sample reads it back from a pipe (universal newlines: "\\r\\n" and "\\r" become "\\n")."""
    return text.replace("\r\n", "\n").replace("\r", "\n")
