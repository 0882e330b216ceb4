"""The notebooks: their exercise checks accept right answers and catch plausible wrong ones, and every notebook runs."""

import math
import re
import sys
from pathlib import Path

import pytest
import torch

import generate
import olmo

sys.path.insert(0, str(Path(__file__).parent / "notebooks"))  # the notebooks' exercise checks and solutions
import checks  # noqa: E402
import solutions  # noqa: E402

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

SHORTCUT = {  # each exercise answered by calling the library function it asks the student to write
}


@pytest.mark.parametrize("name", sorted(SHORTCUT))
def test_exercise_checks_reject_the_library_shortcut(name, capsys):
    assert getattr(checks, f"check_{name}")(SHORTCUT[name]) is False
    assert "asks you to write it yourself" in capsys.readouterr().out


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


PROSE_NUMBER = re.compile(r"(?<![\w.\-])\d+(?:,\d{3})*(?:\.\d+)?(?![\w\-]|\.\d)")


def prose_numbers(markdown):
    """The figures a notebook's text states: numbers outside formulas, code spans and links, leaving out the digits
    0-9 (counts and names such as OLMo 2), years 1990-2029 (citations) and anything joined to letters or a hyphen
    (7B, bf16, OLMo-2-0425-1B) or starting with a 0 (0425)."""
    text = re.sub(r"\$\$.*?\$\$|\$[^$\n]*\$|`[^`\n]*`|\]\([^)]*\)|<[^>]*>", " ", markdown, flags=re.S)
    numbers = {n.replace(",", "") for n in PROSE_NUMBER.findall(text)}
    return {n for n in numbers if not (len(n) == 1 or re.fullmatch(r"(199\d|20[0-2]\d|0\d+)", n))}


def computed_numbers(cells):
    """The numbers a notebook computes or pins: every number its outputs print (but not one the code merely writes
    inside a string, which would be decoration), the constants of its asserts that compare something computed, and
    the settings it uses (a literal bound to a keyword argument, or to a name the notebook reads again)."""
    import ast
    import io
    import tokenize

    code = [c.source for c in cells if c.cell_type == "code"]
    in_strings, backed, settings, names_read = set(), set(), {}, set()
    for source in code:
        source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        try:
            tree = ast.parse(source)
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (SyntaxError, tokenize.TokenError):
            continue
        for t in tokens:
            if t.type == tokenize.STRING or getattr(tokenize, "FSTRING_MIDDLE", None) == t.type:
                in_strings |= {n.replace(",", "") for n in PROSE_NUMBER.findall(t.string)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                names_read.add(node.id)
            constants = []
            if isinstance(node, ast.Assert) and any(isinstance(n, (ast.Name, ast.Call, ast.Attribute))
                                                    for n in ast.walk(node.test)):
                backed |= {repr(c.value) for c in ast.walk(node.test) if isinstance(c, ast.Constant)}
            elif isinstance(node, ast.keyword):
                constants = [(None, node.value)]
            elif isinstance(node, ast.Assign):
                constants = [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
            for name, value in constants:
                for c in ast.walk(value):
                    if isinstance(c, ast.Constant) and isinstance(c.value, (int, float)):
                        settings.setdefault(name, set()).add(repr(c.value))
    for name, values in settings.items():
        if name is None or name in names_read:
            backed |= values
    printed = set()
    for cell in cells:
        for o in cell.get("outputs", []):
            text = o.get("text", "") + o.get("data", {}).get("text/plain", "") + o.get("data", {}).get("text/markdown", "")
            printed |= {n.replace(",", "") for n in PROSE_NUMBER.findall(text)}
    return backed | (printed - in_strings)


def unbacked_numbers(nb):
    """The figures in a notebook's markdown that none of its outputs, asserts or settings produce."""
    backed = computed_numbers(nb.cells)
    backed_values = {float(n) for n in backed if re.fullmatch(r"[\d.e+-]+", n) and n.count(".") <= 1}
    stated = prose_numbers("\n".join(c.source for c in nb.cells if c.cell_type == "markdown"))
    return sorted(n for n in stated if n not in backed and float(n) not in backed_values)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_number_in_the_prose_is_computed_on_the_page(path):
    nbformat = pytest.importorskip("nbformat")
    assert unbacked_numbers(nbformat.read(path, as_version=4)) == [], "state these as the notebook prints them"


def test_the_number_check_catches_a_figure_no_cell_computes():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("Its loss is 1.82 bits per byte, 53 MB, not 2.2; OLMo-2-0425-1B in 2024 for $10^{16}$."),
        nbformat.v4.new_code_cell("bpb = 1.8234\nprint(f'{bpb:.2f}')\nprint('53 MB')\nx = 2.2",
                                  outputs=[nbformat.v4.new_output("stream", text="1.82\n53 MB\n")])])
    assert unbacked_numbers(nb) == ["2.2", "53"]  # 53 is only written in a string; x = 2.2 is never read
    nb.cells[1].source += "\nassert size_mb(bpb) == 53"
    assert unbacked_numbers(nb) == ["2.2"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nbclient, nbformat = pytest.importorskip("nbclient"), pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    before = folder_contents(path.parent)
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    assert folder_contents(path.parent) == before  # a notebook run by the tests writes nothing into the repository
