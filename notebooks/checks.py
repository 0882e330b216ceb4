"""Check cells for the notebooks' exercises: each check_* runs your function against olmo.py and says right or
not yet, and why. It returns True or False and never raises, so a notebook with unsolved exercises still runs.
Solutions, if you are stuck: solutions.py (the tests run every check on them, and on wrong answers)."""

import contextlib
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # olmo.py and the files beside it live one folder up
import olmo  # noqa: E402
import ai2_checkpoints  # noqa: E402
import generate  # noqa: E402


class _Shortcut(Exception):
    pass


@contextlib.contextmanager
def _forbidding(shortcuts):
    """Within: each of shortcuts, a (module, attribute name) pair such as (olmo, "make_mask"), raises _Shortcut
    instead of computing the answer, so an exercise cannot be passed by calling the library function it rebuilds."""
    saved = [(module, name, getattr(module, name)) for module, name in shortcuts]

    def refuse(module, name):
        def refused(*args, **kwargs):
            raise _Shortcut(f"{module.__name__}.{name}")
        return refused
    for module, name, _ in saved:
        setattr(module, name, refuse(module, name))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _verdict(fn, cases, shortcuts=()):
    """cases: (description, arguments, expected, compare) tuples; compare(got, expected) -> bool.
    shortcuts: the library functions that compute the answer, which fn may not call (see _forbidding)."""
    name = getattr(fn, "__name__", "your function")
    for description, args, expected, compare in cases:
        try:
            with torch.no_grad(), _forbidding(shortcuts):
                got = fn(*args)
        except _Shortcut as e:
            print(f"not yet: {name} calls {e}, which computes the answer: this exercise asks you to write it yourself")
            return False
        except Exception as e:  # an exercise may still raise NotImplementedError, or fail in any other way
            print(f"not yet: {name} raised {type(e).__name__}: {e} ({description})")
            return False
        if got is None:
            print(f"not yet: {name} returned None ({description})")
            return False
        try:
            ok = compare(got, expected)
        except Exception as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        else:
            why = _difference(got, expected)
        if not ok:
            print(f"not yet: {description}: {why}")
            return False
    print(f"right: {name} passes all {len(cases)} checks")
    return True


def _difference(got, expected):
    """What differs, in words: for tensors of one shape, the dtype or the largest difference and how many differ."""
    if isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor) and got.shape == expected.shape:
        if got.dtype != expected.dtype:
            return f"got {got.dtype}, expected {expected.dtype}"
        d = (got.float() - expected.float()).abs()
        return f"largest difference {d.max().item():.3g}; {int((d > 0).sum())} of {d.numel()} elements differ"
    return f"got {_short(got)}, expected {_short(expected)}"


def _short(x):
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}" + (f" ({x.flatten()[:4].tolist()}...)" if x.numel() else "")
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_short(v) for v in x) + ")"
    return repr(x)


def _close(tol):
    return lambda got, expected: got.shape == expected.shape and (got.float() - expected.float()).abs().max().item() <= tol


def _equal(got, expected):
    return got == expected


def _count(config):
    with torch.device("meta"):
        return sum(p.numel() for p in olmo.OlmoForCausalLM(config).parameters())


# ---- 01: anatomy ----------------------------------------------------------------------------------------------

def check_parameter_count(fn):
    """fn(config) -> the number of parameters of OlmoForCausalLM(config), by formula."""
    names = ["OLMo-1B-hf", "OLMo-7B-hf", "OLMo-2-0425-1B", "OLMo-2-0325-32B", "Olmo-3-1025-7B"]
    return _verdict(fn, [(name, (olmo.OlmoConfig.from_name(name),), _count(olmo.OlmoConfig.from_name(name)), _equal)
                         for name in names])


def check_olmoe_rms_norm(fn):
    """fn(x, weight, eps) -> OLMoE's RMSNorm of x: x / rms(x) in float32, rounded to x's dtype, then times weight."""
    torch.manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        x, w = (3 * torch.randn(2, 5, 64)).to(dtype), (1 + 0.3 * torch.randn(64)).to(dtype)
        norm = olmo.RMSNorm(64, 1e-6, rounds_first=True).to(dtype)
        norm.weight.data = w
        cases.append((f"x in {dtype}", (x, w, 1e-6), norm(x), _rounded_as))
    return _verdict(fn, cases)


def _rounded_as(got, expected):
    """float32: within 1e-6 of the largest value (the same operations written in another order, x / sqrt(...) for
    x * rsqrt(...), move the last bit). bfloat16: equal, but for last-bit ties in at most 1% of the elements;
    rounding in the other order (once, after the weight multiply) changes about a quarter of them."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    d = (got.float() - expected.float()).abs()
    if expected.dtype == torch.float32:
        return d.max().item() <= 1e-6 * expected.abs().max().item()
    return (d > 0).float().mean().item() <= 0.01


# ---- 02: attention and positions -------------------------------------------------------------------------------

def check_sliding_window_mask(fn):
    """fn(T, window) -> (T, T) bool mask, True where query i may attend to key j (window counts the query itself;
    window None: plain causal)."""
    cases = []
    for T, window in [(10, None), (10, 3), (7, 1), (12, 12)]:
        t = torch.arange(T)
        cases.append((f"T={T}, window={window}", (T, window), olmo.make_mask(t, t, window, None)[0, 0], _close(0)))
    return _verdict(fn, cases)


def check_rope(fn):
    """fn(x, positions, theta) -> x (B, H, T, hd) rotated by RoPE at integer positions (T,), half-split form."""
    torch.manual_seed(0)
    x, pos = torch.randn(1, 2, 6, 16), torch.tensor([0, 1, 2, 7, 100, 4095])
    cases = []
    for theta in (10000.0, 500000.0):
        config = olmo.OlmoConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, rope_theta=theta)
        cos, sin = olmo.rope_cos_sin(*olmo.rope_frequencies(config, yarn=False), pos[None])
        # 1e-3: a float32 angle near position 4095 is exact to about 2e-4 radians, so the same rotation computed in
        # another order (pos / theta^e for pos * theta^-e) moves the result by about 1e-4
        cases.append((f"theta {theta:g}", (x, pos, theta), olmo.apply_rope(x, cos, sin), _close(1e-3)))
    return _verdict(fn, cases)


# ---- 03: the generations -----------------------------------------------------------------------------------------

def check_kv_cache_bytes(fn):
    """fn(config, tokens) -> bytes of a bfloat16 KV cache for one sequence of `tokens` tokens (sliding-window
    layers keep only their window)."""
    cases = []
    for name, tokens in [("OLMo-2-0425-1B", 4096), ("OLMo-2-0325-32B", 1000), ("Olmo-3-1025-7B", 65536),
                         ("Olmo-3-1025-7B", 1000)]:
        config = olmo.OlmoConfig.from_name(name)
        with torch.device("meta"):
            cache = olmo.KVCache(config, 1, tokens, config.num_key_value_heads, "meta", torch.bfloat16)
        expected = sum(kv.k.nbytes + kv.v.nbytes for kv in cache.layers)
        cases.append((f"{name}, {tokens} tokens", (config, tokens), expected, _equal))
    return _verdict(fn, cases)


def check_longest_wavelength(fn):
    """fn(theta, head_dim) -> the longest RoPE wavelength in tokens: how far apart two positions must be before
    the slowest-turning pair of dimensions comes round to the same angle."""
    import math
    cases = []
    for theta in (10000.0, 500000.0):
        config = olmo.OlmoConfig(hidden_size=128 * 16, num_attention_heads=16, num_key_value_heads=16, rope_theta=theta)
        inv_freq, _ = olmo.rope_frequencies(config, yarn=False)
        cases.append((f"theta {theta:g}", (theta, 128), 2 * math.pi / inv_freq.min().item(),
                      lambda got, expected: abs(got - expected) <= 1e-3 * expected))
    return _verdict(fn, cases)


# ---- 04: generation ------------------------------------------------------------------------------------------------

def check_top_p_before_temperature(fn):
    """fn(logits (1, V), p, temperature) -> the probabilities (1, V) when top-p chooses the tokens from the
    untempered distribution (temperature 1) and temperature then reshapes the kept ones, renormalized; 0 elsewhere.
    (generate.filtered_probs applies them the other way round.)"""
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2
    cases = []
    for p, t in [(0.5, 1.0), (0.5, 2.0), (0.9, 0.5), (0.3, 3.0)]:
        chosen = generate.filtered_probs(logits, top_p=p) > 0  # the tokens top-p keeps at temperature 1
        kept = torch.where(chosen, logits / t, float("-inf")).softmax(-1)
        cases.append((f"p = {p}, temperature {t}", (logits, p, t), kept, _close(1e-6)))
    return _verdict(fn, cases)


def check_min_p(fn):
    """fn(logits (1, V), min_p) -> the probabilities (1, V) of the tokens at least min_p times as likely as the
    likeliest one, renormalized; 0 elsewhere."""
    torch.manual_seed(1)
    logits = torch.randn(1, 50) * 2
    probs, cases = logits.softmax(-1), []
    for m in (0.05, 0.3, 1.0):
        kept = torch.where(probs >= m * probs.max(-1, keepdim=True).values, probs, 0)
        cases.append((f"min_p = {m}", (logits, m), kept / kept.sum(-1, keepdim=True), _close(1e-6)))
    return _verdict(fn, cases)


# ---- 05: checkpoints and the tokenizer ------------------------------------------------------------------------

def _dolma2():
    return olmo.load_tokenizer(Path(__file__).resolve().parent.parent / "fixtures" / "tokenizers" / "allenai_dolma2.json")


def _longest_match(piece, ranks):
    out, i = [], 0
    while i < len(piece):
        j = max(j for j in range(i + 1, len(piece) + 1) if piece[i:j] in ranks)  # every byte is a token
        out.append(ranks[piece[i:j]])
        i = j
    return out


def check_longest_match(fn):
    """fn(piece: bytes, ranks: {bytes: id}) -> ids of the longest-match tokenization: from the left, always the
    longest token in the vocabulary that the rest of the piece starts with."""
    ranks = _dolma2().enc._mergeable_ranks
    words = [" hello", "12345", " mixtures", " OLMo", " Überraschung", " 🤗", "Gated"]
    return _verdict(fn, [(repr(w), (w.encode(), ranks), _longest_match(w.encode(), ranks), _equal) for w in words])


def check_att_proj_split(fn):
    """fn(att_proj (d + 2 KV*hd, d), config) -> (q, k, v) weights, as AI2's fused projection splits into them."""
    config = olmo.OlmoConfig(model_type="olmo2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, vocab_size=10, num_hidden_layers=1)
    att_proj = torch.randn(64 + 2 * 32, 64)
    state = dict(ai2_checkpoints.ai2_names("transformer.blocks.0.att_proj.weight", att_proj, config, "check"))
    expected = tuple(state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    same = lambda got, exp: len(got) == 3 and all(_close(0)(g, e) for g, e in zip(got, exp))
    return _verdict(fn, [("GQA: 4 query heads, 2 key/value heads of 16", (att_proj, config), expected, same)])


# ---- 06: training ---------------------------------------------------------------------------------------------

def _trigram_bits(train, val):
    counts = torch.ones(256 ** 3)  # add-one smoothing, one count per (a, b, c)
    counts.index_put_((train[:-2] * 65536 + train[1:-1] * 256 + train[2:],), torch.ones(len(train) - 2), accumulate=True)
    probs = counts.view(65536, 256) / counts.view(65536, 256).sum(-1, keepdim=True)
    return -probs[val[:-2] * 256 + val[1:-1], val[2:]].log2().mean().item()


def check_trigram_bits_per_byte(fn):
    """fn(train, val) -> bits per byte on val (from its third byte on) of the trigram model counted on train (both
    byte-valued long tensors), with add-one smoothing: P(c | a, b) = (count(a, b, c) + 1) / (count(a, b) + 256)."""
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (5000,), generator=g) // 7 * 7
    val = torch.randint(0, 256, (500,), generator=g) // 7 * 7
    text = torch.tensor(list(b"the cat sat on the mat and the dog sat on the log"))
    return _verdict(fn, [("random bytes", (train, val), _trigram_bits(train, val), lambda a, b: abs(a - b) < 1e-4),
                         ("a sentence", (text, text), _trigram_bits(text, text), lambda a, b: abs(a - b) < 1e-4)])


def check_initial_bits_per_byte(fn):
    """fn(vocab_size) -> the loss, in bits per token, of a model that gives every token the same probability."""
    return _verdict(fn, [(f"a vocabulary of {v}", (v,), math.log2(v), lambda a, b: abs(a - b) < 1e-9)
                         for v in (257, 50304, 100352)])


# ---- 07: mixture of experts -----------------------------------------------------------------------------------

def _capacity_kept(router_logits, k, capacity):
    experts = router_logits.float().softmax(-1).topk(k, -1).indices.flatten()  # token by token, slot by slot
    rank = (torch.nn.functional.one_hot(experts, router_logits.shape[-1]).cumsum(0) - 1).gather(1, experts[:, None])
    return (rank < capacity).view(-1, k)  # the first `capacity` pairs of each expert, in that order


def check_capacity_kept(fn):
    """fn(router_logits (N, E), k, capacity) -> (N, k) booleans: which of each token's k choices (in top-k order)
    its expert accepts, when an expert takes only the first `capacity` (token, choice) pairs, token by token."""
    torch.manual_seed(0)
    logits = torch.randn(12, 4)
    logits[:, 1] += 1.5  # expert 1 is popular: it overflows first
    cases = [(f"capacity {c}", (logits, 2, c), _capacity_kept(logits, 2, c), lambda got, exp: torch.equal(got.bool(), exp))
             for c in (3, 6, 24)]
    return _verdict(fn, cases)


def check_active_parameters(fn):
    """fn(config) -> the parameters one token uses: all but the embedding table (one row of it: count none) and
    the experts it is not routed to."""
    cases = []
    for name in ["OLMoE-1B-7B-0924", "FlexOlmo-7x7B-1T", "OLMo-2-0425-1B"]:
        config = olmo.OlmoConfig.from_name(name)
        with torch.device("meta"):
            model = olmo.OlmoForCausalLM(config)
        expected = sum(p.numel() for p in generate.weights_read_per_token(model))
        cases.append((name, (config,), expected, _equal))
    return _verdict(fn, cases)


# ---- 08: Gated DeltaNet -----------------------------------------------------------------------------------------

def check_exact_write_beta(fn):
    """fn(S (d_k, d_v), k (d_k,), v (d_v,)) -> the write strength beta with which one delta-rule write,
    S + beta k (v - S^T k)^T, makes the memory return exactly v for k, when k is not normalized."""
    torch.manual_seed(0)
    cases = []
    for scale in (1.0, 0.3, 2.5):
        S, k, v = (torch.randn(4, 3, dtype=torch.float64), scale * torch.randn(4, dtype=torch.float64),
                   torch.randn(3, dtype=torch.float64))

        def writes_v(got, expected, S=S, k=k, v=v):  # judged by its effect: any right form passes
            return ((S + float(got) * torch.outer(k, v - S.T @ k)).T @ k - v).abs().max().item() <= 1e-9 * v.abs().max().item()
        cases.append((f"|k| = {k.norm():.2f}", (S, k, v), 1 / (k @ k).item(), writes_v))
    return _verdict(fn, cases)


def check_state_bytes(fn):
    """fn(config) -> bytes that one sequence's Gated DeltaNet states take, all linear_attention layers together:
    the float32 state S of each layer and its convolution's last K-1 inputs (in bfloat16)."""
    cases = []
    distinct = olmo.OlmoConfig(model_type="olmo_hybrid", vocab_size=256, hidden_size=128, intermediate_size=256,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, linear_num_key_heads=2,
                               linear_num_value_heads=6, linear_key_head_dim=24, linear_value_head_dim=40,
                               linear_conv_kernel_dim=3)  # every head count and size its own (7B's are all 30 heads)
    for name, config in [("Olmo-Hybrid-7B", olmo.OlmoConfig.from_name("Olmo-Hybrid-7B")), ("a small hybrid", distinct)]:
        cache = olmo.KVCache(config, 1, 16, config.num_key_value_heads, "meta", torch.bfloat16)
        expected = sum(s.S.nbytes + s.conv.nbytes for s in cache.layers if isinstance(s, olmo.GDNState))
        cases.append((name, (config,), expected, _equal))
    return _verdict(fn, cases)
