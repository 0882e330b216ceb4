"""generate.py's Python API: a checkpoint and its tokenizer in one call, text in one more."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
import olmo

from conftest import TOKENIZERS

TINY = Path(__file__).parent / "notebooks" / "tiny_olmo"


def test_load_and_complete_greedy_equal_the_decoding_loop():
    model, tokenizer = generate.load(TINY)
    ids = tokenizer.encode("Return the")
    expected = tokenizer.decode(list(generate.generate(model, ids, 40)))
    assert generate.complete(model, tokenizer, "Return the", max_new_tokens=40) == expected
    assert "".join(generate.stream(model, tokenizer, "Return the", max_new_tokens=40)) == expected


def test_sampled_text_follows_the_seed():
    model, tokenizer = generate.load(TINY)
    sampled = lambda seed: generate.complete(model, tokenizer, "Return the", 40, temperature=1.0, top_k=20, seed=seed)
    assert sampled(1) == sampled(1) != sampled(2)
    g = torch.Generator().manual_seed(1)
    ids = list(generate.generate(model, tokenizer.encode("Return the"), 40, 1.0, 20, generator=g))
    assert sampled(1) == tokenizer.decode(ids)


def test_stream_never_ends_a_piece_in_a_broken_character(monkeypatch):
    tokenizer = olmo.load_tokenizer(TOKENIZERS / "allenai_dolma2.json")
    text = "naïve 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok 👨‍👩‍👧 日本"
    ids = tokenizer.encode(text)
    assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids)  # some tokens split a character
    monkeypatch.setattr(generate, "generate", lambda *a, **k: iter(ids))
    model = olmo.OlmoForCausalLM(olmo.OlmoConfig(vocab_size=100352, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    pieces = list(generate.stream(model, tokenizer, "x", len(ids)))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_the_context_bounds_the_new_tokens():
    model, tokenizer = generate.load(TINY)  # a context of 256 byte-tokens
    prompt = "x" * 250
    assert len(tokenizer.encode(generate.complete(model, tokenizer, prompt, max_new_tokens=200))) <= 6
    with pytest.raises(ValueError, match="the prompt is 300 tokens; the model's context holds 256"):
        generate.complete(model, tokenizer, "x" * 300)


def test_installed_it_imports_from_anywhere(tmp_path):
    # `pip install -e .` (pyproject.toml) in the environment that runs the tests, as .ci/run does: then the modules
    # import from any folder. Without the install, only from the repository's root.
    r = subprocess.run([sys.executable, "-c", "import generate, olmo, speculate, quantize, tp, speed, ai2_checkpoints, sample; "
                        "print(olmo.__file__)"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if r.returncode and "No module named" in r.stderr:
        pytest.skip("olmo.py is not installed in this environment (pip install -e .)")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent == Path(__file__).parent


def test_readme_python_blocks_run_as_written():
    # the README's Python blocks, verbatim, each in a fresh process from the repository's root: the first prints the
    # greedy continuation that the decoding loop computes here, the second the next-token logits' shape and a loss
    import re
    blocks = re.findall(r"```python\n(.*?)```", (Path(__file__).parent / "README.md").read_text(), re.S)
    outputs = []
    for code in blocks:
        r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout)
    model, tokenizer = generate.load(TINY)
    ids = tokenizer.encode("Return the")
    assert outputs[0] == tokenizer.decode(list(generate.generate(model, ids, 40))) + "\n"
    assert outputs[1].startswith(f"torch.Size([1, 1, {model.config.vocab_size}]) ")
