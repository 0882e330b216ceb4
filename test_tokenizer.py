"""olmo.Tokenizer against the `tokenizers` library on the real OLMo tokenizer files."""

import json
from pathlib import Path

import pytest

import olmo

from conftest import TOKENIZERS


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
