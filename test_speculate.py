"""speculate.py: speculative decoding gives plain decoding's greedy text in every family, its sampling rule keeps the
model's distribution, and the KV cache takes back rejected guesses exactly."""

import random
import re
from pathlib import Path

import pytest
import torch

import generate
import olmo
import speculate

from conftest import F32_RTOL, HYBRID_STEP_TOL, load, reference

FAMILIES = ["olmo2", "olmo3", "olmoe", "olmo_hybrid"]  # dense, sliding window 8, mixture of experts, Gated DeltaNet


def prompt(case, n=8):
    return reference(case)["input_ids"][0, :n].tolist()


def shallow_draft(model, folder):
    """A draft made of the model's last half of layers, saved and loaded as a checkpoint is."""
    n = model.config.num_hidden_layers
    drop = n // 2
    config = model.config.replace(num_hidden_layers=n - drop, layer_types=model.config.layer_types[drop:])
    draft = olmo.OlmoForCausalLM(config)
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            if int(i) < drop:
                continue
            name = f"model.layers.{int(i) - drop}.{rest}"
        state[name] = t
    draft.load_state_dict(state)
    draft.save_pretrained(folder)
    return olmo.OlmoForCausalLM.from_pretrained(folder)


def held(cache):
    """What a cache holds for the next step, slot order aside: per attention layer the keys and values of the steps
    the next query can see, in time order; per Gated DeltaNet layer its convolution inputs and state."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, olmo.GDNState):
            out += [layer.conv, layer.S]
            continue
        times = layer._slot_times(layer.k.shape[2], cache.length, layer.k.device)
        low = cache.length - layer.window + 1 if layer.window else 0
        order = [s for _, s in sorted((t, s) for s, t in enumerate(times.tolist()) if t >= max(low, 0))]
        out += [layer.k[:, :, order], layer.v[:, :, order]]
    return out


def assert_same_cache(ours, plain, rtol):
    """Equal up to the rounding of steps of other lengths, rtol of each tensor's largest entry (see conftest)."""
    assert ours.length == plain.length
    for a, b in zip(held(ours), held(plain), strict=True):
        assert a.shape == b.shape and (a - b).abs().max().item() <= rtol * b.abs().max().item()


def replayed(model, ids, tokens):
    """The cache of plain decoding: the prompt ids in one step, then the tokens one at a time."""
    cache = model.new_cache(1, len(ids) + len(tokens))
    model(torch.tensor([ids]), cache=cache)
    for t in tokens:
        model(torch.tensor([[t]]), cache=cache)
    return cache


def count_steps(model):
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls


@pytest.mark.parametrize("guesser", ["lookup", "lookup auto", "draft itself", "shallow draft"])
@pytest.mark.parametrize("case", FAMILIES)
def test_greedy_text_and_cache_equal_plain_greedy_decoding(case, guesser, tmp_path):
    model = load(case)
    ids, n = prompt(case), 40
    expected = list(generate.generate(model, ids, n))
    spec = {"lookup": lambda: speculate.PromptLookup(k=4, n=2),
            "lookup auto": lambda: speculate.PromptLookup(k=4, n=2, auto=True),
            "draft itself": lambda: speculate.DraftModel(load(case), k=4),
            "shallow draft": lambda: speculate.DraftModel(shallow_draft(model, tmp_path), k=3)}[guesser]()
    cache = spec.new_cache(model, len(ids) + n)
    steps = count_steps(model)
    assert list(generate.generate(model, ids, n, cache=cache, speculate=spec)) == expected
    if guesser == "draft itself":  # guesses the model always agrees with: 5 tokens per step
        assert len(steps) <= 1 + (n - 1 + 4) // 5 + 1
    if guesser == "lookup" and case in ("olmo2", "olmoe"):  # these texts repeat: some guesses are kept
        assert len(steps) < n
    # the cache holds what plain decoding one token at a time puts there: the prompt and every token but the last
    tol = HYBRID_STEP_TOL if case == "olmo_hybrid" else F32_RTOL
    assert_same_cache(cache, replayed(model, ids, expected[:-1]), tol)


@pytest.mark.parametrize("case", FAMILIES)
def test_a_cache_stepped_back_equals_plain_decoding_of_the_kept_tokens(case):
    # random steps of 1 + k tokens of which a random number is kept, as speculation feeds and takes back; the window
    # of olmo3 (8) wraps many times. Then the same tokens fed one at a time to a plain cache
    model, rng, k = load(case), random.Random(0), 4
    ids = prompt(case)
    spec = speculate.PromptLookup(k=k)
    cache = spec.new_cache(model, 80)
    model(torch.tensor([ids]), cache=cache)
    kept = ids + [rng.randrange(model.config.vocab_size)]  # the prompt, fed, and the first token, not yet
    while len(kept) < 60:
        start = cache.length
        pending = kept[start:]  # more than one token where a Gated DeltaNet state went back to the snapshot
        guesses = [rng.randrange(model.config.vocab_size) for _ in range(k)]
        cache.snapshot()
        model(torch.tensor([pending + guesses]), cache=cache)
        a = rng.randint(0, k)
        kept += guesses[:a] + [rng.randrange(model.config.vocab_size)]  # a rejected guess's replacement
        assert cache.rewind(len(kept) - 1) or cache.rewind(start)
        assert cache.length in (len(kept) - 1, start)
    if cache.length < len(kept) - 1:
        model(torch.tensor([kept[cache.length:-1]]), cache=cache)
    tol = HYBRID_STEP_TOL if case == "olmo_hybrid" else F32_RTOL
    assert_same_cache(cache, replayed(model, ids, kept[len(ids):-1]), tol)


def test_a_ring_without_spare_slots_or_a_state_without_snapshot_refuses_to_step_back():
    sliding = load("olmo3")
    cache = sliding.new_cache(1, 40)  # rings of exactly the window (8)
    sliding(torch.arange(20)[None], cache=cache)
    assert cache.rewind(19) and not cache.rewind(17)  # one step back keeps the window; two lose a key it needs
    hybrid = load("olmo_hybrid")
    cache = hybrid.new_cache(1, 40)
    hybrid(torch.arange(10)[None], cache=cache)
    assert not cache.rewind(8)
    cache.snapshot()
    hybrid(torch.arange(3)[None], cache=cache)
    assert not cache.rewind(11) and cache.rewind(10) and cache.length == 10


# ---- the sampling rule ---------------------------------------------------------------------------------------

P1 = torch.tensor([0.6, 0.3, 0.1])  # the model's first token
P2 = torch.tensor([[0.2, 0.5, 0.3], [0.7, 0.1, 0.2], [0.1, 0.1, 0.8]])  # its second, after each first
Q1 = torch.tensor([0.1, 0.3, 0.6])  # a draft that disagrees
Q2 = torch.tensor([[0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.3, 0.6, 0.1]])


def one_step(p, q):
    """The exact distribution (vocab,) of a step's first token: a guess g drawn from q is kept with
    speculate.acceptance, else replaced by a draw from speculate.residual."""
    out = torch.zeros_like(p)
    for g in range(len(p)):
        keep = speculate.acceptance(p[None], q[None], torch.tensor([g]))[0]
        out[g] += q[g] * keep
        out += q[g] * (1 - keep) * speculate.residual(p, q)
    return out


@pytest.mark.parametrize("guess", ["draft", "lookup"])
def test_the_first_two_tokens_have_the_models_distribution_exactly(guess):
    # the first token is a step's first; the second is either the same step's second (after a kept guess) or the
    # first of the next step (after a replaced one): either way a step's first token given the first. Lookup's
    # guesses are certain: q is the point mass at the guess (here, each possible one in turn)
    point = lambda g: torch.eye(3)[g]
    for g1, g2 in [(0, 1), (2, 2), (1, 0)] if guess == "lookup" else [(None, None)]:
        q1 = Q1 if guess == "draft" else point(g1)
        q2 = Q2 if guess == "draft" else point(g2).expand(3, 3)
        first = one_step(P1, q1)
        both = first[:, None] * torch.stack([one_step(P2[a], q2[a]) for a in range(3)])
        assert torch.allclose(both, P1[:, None] * P2, atol=1e-6), both


def test_verify_samples_the_models_distribution():
    # verify() itself, with its draws: the first two tokens over 3000 runs, against P1 P2 (standard error per cell
    # under 0.0091; a rule that replaces rejected guesses with draws from p instead is off by 0.2)
    g = torch.Generator().manual_seed(0)
    counts, n = torch.zeros(3, 3), 3000
    for _ in range(n):
        d1 = torch.multinomial(Q1, 1, generator=g).item()
        d2 = torch.multinomial(Q2[d1], 1, generator=g).item()
        logits = torch.stack([P1, P2[d1], P2[d2]]).log()  # the third row: any distribution
        new = speculate.verify(logits, [d1, d2], torch.stack([Q1, Q2[d1]]), 1.0, None, None, g)
        if len(new) == 1:  # the first guess was replaced: the second token is the next step's first
            d = torch.multinomial(Q2[new[0]], 1, generator=g).item()
            logits = torch.stack([P2[new[0]], P1]).log()
            new += speculate.verify(logits, [d], Q2[new[0]][None], 1.0, None, None, g)[:1]
        counts[new[0], new[1]] += 1
    assert (counts / n - P1[:, None] * P2).abs().max() < 0.04


def test_sampled_speculation_runs_and_stops_as_plain_decoding(tmp_path):
    model = load("olmo2")
    ids = prompt("olmo2")
    for spec in (speculate.PromptLookup(k=3, n=1), speculate.DraftModel(load("olmo2"), k=3)):
        g = torch.Generator().manual_seed(0)
        cache = spec.new_cache(model, len(ids) + 30)
        out = list(generate.generate(model, ids, 30, 1.0, top_k=20, generator=g, cache=cache, speculate=spec))
        assert len(out) == 30 and cache.length == len(ids) + 29
        stop = out[5]  # stop at its first occurrence, as plain decoding stops
        g = torch.Generator().manual_seed(0)
        cache = spec.new_cache(model, len(ids) + 30)
        out2 = list(generate.generate(model, ids, 30, 1.0, top_k=20, stop_ids={stop}, generator=g, cache=cache,
                                      speculate=spec))
        assert out2 == out[:out.index(stop) + 1] and cache.length == len(ids) + len(out2) - 1


def test_auto_guesses_where_the_measured_steps_say_it_pays():
    spec = speculate.PromptLookup(k=4, auto=True)
    assert spec.choose(100) == 4  # first a step of guesses is measured...
    spec.measured(4, 3.0, 4)
    assert spec.choose(100) == 0  # ...then a plain one
    spec.measured(0, 1.0, 0)
    spec.kept, spec.offered = 9.0, 10.0  # 1 + 0.9 + ... + 0.9^4 = 4.1 tokens per step of 3 s: 1.37 per second
    assert spec.choose(100) == 4 and spec.choose(3) == 2  # near the end, fewer
    spec.seconds[4] = 5.0  # 0.82 per second: plain steps, and guesses again every PROBE_EVERY steps
    assert [spec.choose(100) for _ in range(2 * speculate.PROBE_EVERY)].count(4) == 2
    spec.seconds[4], spec.kept = 3.0, 2.0  # 1 + 0.2 + ...: 1.25 tokens per 3 s
    assert spec.choose(100) == 0


# ---- the Python API and refusals -----------------------------------------------------------------------------


def test_complete_with_speculation_gives_the_same_text():
    model, tokenizer = generate.load(Path(__file__).parent / "notebooks" / "tiny_olmo")
    expected = generate.complete(model, tokenizer, "Return the", max_new_tokens=60)
    for spec in (speculate.PromptLookup(), speculate.DraftModel(model)):
        assert generate.complete(model, tokenizer, "Return the", max_new_tokens=60, speculate=spec) == expected


def test_a_draft_with_other_token_ids_is_refused():
    model = load("olmo2")
    other = olmo.OlmoForCausalLM(model.config.replace(vocab_size=model.config.vocab_size + 64))
    with pytest.raises(ValueError, match="draft: its vocabulary has 192 ids and the model's 128"):
        list(generate.generate(model, prompt("olmo2"), 5, speculate=speculate.DraftModel(other)))
    with pytest.raises(ValueError, match="k .* must be an int >= 1, got 0"):
        speculate.PromptLookup(k=0)
    with pytest.raises(ValueError, match="leave out cuda_graph"):
        list(generate.generate(model, prompt("olmo2"), 5, cuda_graph=True, speculate=speculate.PromptLookup()))
    with pytest.raises(ValueError, match="speculator.new_cache"):
        list(generate.generate(load("olmo3"), prompt("olmo3"), 5, cache=load("olmo3").new_cache(1, 40),
                               speculate=speculate.PromptLookup()))


# ---- the command line ----------------------------------------------------------------------------------------


def test_sample_speculates_to_the_same_text(capsys):
    import sample
    tiny = str(Path(__file__).parent / "notebooks" / "tiny_olmo")
    common = ["--model", tiny, "--prompt", "Return the", "--temperature", "0", "--max-new-tokens", "60",
              "--dtype", "float32"]
    outputs, per_step = [], []
    for extra in ([], ["--speculate", "4"], ["--speculate", "3", "--lookup", "1"], ["--speculate", "auto"],
                  ["--speculate", "2", "--draft-model", tiny]):
        assert sample.main(common + extra) == 0
        out, err = capsys.readouterr()
        outputs.append(out)
        per_step.append(re.findall(r"([\d.]+) tokens per step", err))
    assert outputs[1:] == outputs[:1] * 4 and len(outputs[0]) > 20
    # the statistics line says how many tokens a step gave: none without guesses; 2 guesses the model always
    # keeps (the draft is the model) give 3 tokens a step, but for the shorter last step
    assert per_step[0] == [] and all(len(found) == 1 for found in per_step[1:])
    assert 2.9 <= float(per_step[4][0]) <= 3
    for bad in (["--lookup", "2"], ["--draft-model", tiny], ["--speculate", "-1"], ["--speculate", "many"],
                ["--speculate", "2", "--lookup", "2", "--draft-model", tiny]):
        with pytest.raises(SystemExit) as done:
            sample.parse_args(common + bad)
        assert done.value.code == 2


def test_sample_refuses_a_draft_with_other_token_ids(tmp_path, capsys):
    import sample
    from conftest import e2e_checkpoint
    for family in ("olmo2", "olmo", "olmo3"):  # dolma2's tokenizer; NeoX's; dolma2's with 100278 rows, not 100352
        e2e_checkpoint(family, tmp_path / family)
    common = ["--model", str(tmp_path / "olmo2"), "--prompt", "Hi", "--max-new-tokens", "3", "--speculate", "2"]
    assert sample.main(common + ["--draft-model", str(tmp_path / "olmo2")]) == 0
    assert sample.main(common + ["--draft-model", str(tmp_path / "olmo")]) == 1
    assert "its tokenizer gives other tokens than the model's" in capsys.readouterr().err
    assert sample.main(common + ["--draft-model", str(tmp_path / "olmo3")]) == 1
    assert "its vocabulary has 100278 ids and the model's 100352" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["olmo3", "olmo_hybrid"])
def test_a_speculating_conversation_equals_a_plain_one(family, tmp_path, monkeypatch, capsys):
    import io
    import sys
    import sample
    from conftest import e2e_checkpoint
    from test_sample import CHATML, GREEDY, MESSAGES
    e2e_checkpoint(family, tmp_path, chat_template=CHATML)
    model, tokenizer = olmo.OlmoForCausalLM.from_pretrained(tmp_path), olmo.load_tokenizer(tmp_path)
    stops = sample.stop_tokens(tmp_path, model.config, tokenizer, True)
    outputs = []
    for speculator in (None, speculate.PromptLookup(k=3, n=1), speculate.DraftModel(model, k=3)):
        monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(MESSAGES) + "\n"))
        assert sample.converse(model, tokenizer, CHATML, {}, None, 4096, 10, GREEDY, stops,
                               speculator=speculator) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[1:] == outputs[:1] * 2 and len(outputs[0].splitlines()) >= 3
