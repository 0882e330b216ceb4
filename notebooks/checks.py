"""Check cells for the notebooks' exercises: each check_* runs your function against olmo.py and says right or
not yet, and why. It returns True or False and never raises, so a notebook with unsolved exercises still runs.
Solutions, if you are stuck: solutions.py (the tests run every check on them, and on wrong answers)."""

import contextlib
import math
import operator
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # olmo.py and the files beside it live one folder up
import olmo  # noqa: E402
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
        if got.is_floating_point() and got.isnan().any():  # nan - x is nan: say where it came from instead
            return (f"{int(got.isnan().sum())} of {got.numel()} elements are NaN (0/0: was something divided by a "
                    "sum of zeros?)")
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


# ---- 01: build OLMo 2 yourself ---------------------------------------------------------------------------------
# The notebook's stages, in order. Each has a stand-in, olmos_<stage>: the same function computed by olmo.py's
# module. yours_or_olmos gives the notebook's later stages the student's function once its check passed, the
# stand-in until then, so the notebook runs top to bottom with any of its exercises unsolved.

STAGES = ("embedding", "rms_norm", "rotary", "causal_average", "attention_head", "multi_head", "grouped_query",
          "olmo2_attention", "swiglu", "olmo2_block", "olmo2")
_STAND_IN = {"embedding": "nn.Embedding", "rms_norm": "RMSNorm", "rotary": "apply_rope",
             "causal_average": "Attention (its queries and keys all zero)", "attention_head": "Attention.attend",
             "multi_head": "Attention", "grouped_query": "Attention", "olmo2_attention": "Attention", "swiglu": "MLP",
             "olmo2_block": "Block", "olmo2": "OlmoForCausalLM"}
_passed = {}  # stage -> the function that passed its check
# olmo.py's pieces as the stand-ins call them, taken now: a check that refuses olmo.Attention to the function it
# checks does not refuse it to the stand-in of an earlier stage that the function calls
_olmo = {name: getattr(olmo, name) for name in ("RMSNorm", "Attention", "MLP", "Block", "OlmoForCausalLM", "make_mask",
                                               "rope_frequencies", "rope_cos_sin", "apply_rope")}
_embedding = torch.nn.functional.embedding


def yours_or_olmos(stage, mine):
    """mine if it passed check_<stage>, else olmo.py's stand-in (called through this module, so that a check can
    refuse it to the function it checks: the stand-in of a stage, or of a later one, is not an answer)."""
    if stage in _passed and _passed[stage] is mine:
        print(f"{stage}: yours")
        return mine
    print(f"{stage}: olmo.py's {_STAND_IN[stage]} stands in until my_{stage} passes check_{stage}")
    return lambda *args: getattr(sys.modules[__name__], f"olmos_{stage}")(*args)


def _stage_verdict(stage, fn, cases, shortcuts=()):
    """_verdict, refusing the stand-ins of this stage and the later ones too; records fn when it passes."""
    this = sys.modules[__name__]
    later = [(this, f"olmos_{s}") for s in STAGES[STAGES.index(stage):]]
    ok = _verdict(fn, cases, tuple(shortcuts) + tuple(later))
    if ok:
        _passed[stage] = fn
    else:
        _passed.pop(stage, None)
    return ok


def _module(make, state):
    """The olmo.py module make() builds (on the meta device: no memory, no init), holding the tensors of state."""
    with torch.device("meta"):
        module = make()
    module.load_state_dict(state, assign=True)
    return module.requires_grad_(False).eval()


def _config(d, n_head, n_kv_head, **more):
    return olmo.OlmoConfig(hidden_size=d, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                           attn_implementation="eager", **more)


def _from_json(config):
    """An OlmoConfig from a config.json dict, its attention spelled out (the stand-ins refuse nothing to torch)."""
    return olmo.OlmoConfig.from_dict(dict(config, attn_implementation="eager"))


def _rope_and_mask(config, positions):
    cos, sin = _olmo["rope_cos_sin"](*_olmo["rope_frequencies"](config, False), positions[None])
    t = torch.arange(len(positions))
    return cos, sin, _olmo["make_mask"](t, t, None, None)


def olmos_embedding(ids, table):
    return _embedding(ids, table)  # what nn.Embedding, olmo.py's model.embed_tokens, computes


def olmos_rms_norm(x, weight, eps):
    return _module(lambda: _olmo["RMSNorm"](weight.shape[0], eps), {"weight": weight})(x)


def olmos_rotary(x, positions, theta):
    config = _config(x.shape[-1], 1, 1, rope_theta=theta)
    cos, sin, _ = _rope_and_mask(config, positions)
    return _olmo["apply_rope"](x, cos, sin)


def _attention(x, state, config, positions=None):
    """olmo.Attention of config holding state, on x (B, T, d): causal, rotated at positions (None: no RoPE)."""
    cos, sin, mask = _rope_and_mask(config, torch.arange(x.shape[1]) if positions is None else positions)
    if positions is None:
        cos = sin = None
    return _module(lambda: _olmo["Attention"](config), state)(x, cos, sin, mask)


def olmos_causal_average(x):
    """Attention whose queries and keys are all zero scores every key alike: its softmax is the plain average."""
    C = x.shape[-1]
    zero, eye = torch.zeros(C, C, dtype=x.dtype), torch.eye(C, dtype=x.dtype)
    state = {"q_proj.weight": zero, "k_proj.weight": zero, "v_proj.weight": eye, "o_proj.weight": eye}
    return _attention(x, state, _config(C, 1, 1, model_type="olmo"))


def olmos_attention_head(q, k, v):
    *lead, T, hs = q.shape
    with torch.device("meta"):
        attention = _olmo["Attention"](_config(hs, 1, 1, model_type="olmo"))  # attend uses no weights
    heads = lambda t: t.reshape(-1, 1, T, t.shape[-1])  # any leading dims -> (N, 1, T, hs)
    t = torch.arange(T)
    y = attention.attend(heads(q), heads(k), heads(v), _olmo["make_mask"](t, t, None, None))
    return y.reshape(*lead, T, v.shape[-1])


def olmos_multi_head(x, w, n_head):
    return _attention(x, w, _config(x.shape[-1], n_head, n_head, model_type="olmo"))  # OLMo 1's: no QK-norm


def olmos_grouped_query(x, w, n_head, n_kv_head):
    return _attention(x, w, _config(x.shape[-1], n_head, n_kv_head, model_type="olmo"))


def olmos_olmo2_attention(x, w, config, positions):
    return _attention(x, w, _from_json(config), positions)


def olmos_swiglu(x, w):
    I, d = w["gate_proj.weight"].shape
    return _module(lambda: _olmo["MLP"](_config(d, 1, 1, intermediate_size=I)), w)(x)


def olmos_olmo2_block(x, w, config, positions):
    config = _from_json(config)
    return _module(lambda: _olmo["Block"](config), w)(x, *_rope_and_mask(config, positions))


def olmos_olmo2(ids, weights, config):
    with torch.device("meta"):
        model = _olmo["OlmoForCausalLM"](_from_json(config))
    olmo.load_weights(model, dict(weights), "the weights")
    return model.eval()(ids)[0]


# Two small OLMo 2 shapes the checks build: grouped-query, and not; their sizes, theta and eps all differ, so a
# function that hard-codes one of them (rather than reading the config) fails the other. The second eps is large:
# on vectors of RMS about 1 an eps of 1e-6 moves nothing, and a function that ignored eps would pass
_SHAPES = [dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6),
           dict(vocab_size=50, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=3,
                num_key_value_heads=3, rope_theta=500000.0, rms_norm_eps=1e-2)]
# positions with gaps, for the checks that take them: RoPE depends only on the distance between two positions, so
# evenly spaced ones (0..T-1, or 5..5+T-1) cannot tell a function that reads positions from one that uses 0..T-1
_GAPPED = torch.tensor([0, 1, 2, 7, 30, 100])


def _random_olmo2(shape, seed):
    """(config.json dict, weights {Hugging Face name: tensor}) of an OLMo 2 of a shape, every weight random: the
    matrices scaled to keep activations near 1, the norms' weights around 1 but not all 1 (a piece that mixes up
    which weight goes where cannot pass by luck)."""
    config = olmo.config_json(olmo.OlmoConfig(model_type="olmo2", **shape))
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in _olmo["OlmoForCausalLM"](_from_json(config)).named_parameters()}
    weights = {}
    for name, s in shapes.items():
        r = torch.randn(s, generator=g)
        weights[name] = 1 + 0.3 * r if len(s) == 1 else r if "embed" in name else r / s[-1] ** 0.5
    return config, weights


def _part(weights, prefix):
    return {name[len(prefix):]: t for name, t in weights.items() if name.startswith(prefix)}


def _same(tol):
    """The expected shape and dtype, and every value within tol of the expected one (relative to the largest)."""
    return lambda got, expected: (isinstance(got, torch.Tensor) and got.shape == expected.shape
                                  and got.dtype == expected.dtype
                                  and (got.float() - expected.float()).abs().max().item()
                                  <= tol * max(1.0, expected.abs().max().item()))


def _refusing(*names):  # olmo.py's pieces a stage may not call: they compute its answer
    return tuple((olmo, name) for name in names)


_F = torch.nn.functional
_ATTENTION = _refusing("Attention", "make_mask") + ((_F, "scaled_dot_product_attention"),)


def check_embedding(fn):
    """fn(ids (B, T), table (V, d)) -> (B, T, d): row ids[b, t] of the table, in the table's dtype, as olmo.py's
    model.embed_tokens computes it."""
    cases = []
    for shape, dtype in zip(_SHAPES, (torch.float32, torch.bfloat16)):
        config, weights = _random_olmo2(shape, 0)
        model = _module(lambda: _olmo["OlmoForCausalLM"](_from_json(config)), weights).to(dtype)
        ids = torch.randint(0, shape["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
        table = model.model.embed_tokens.weight.detach()
        cases.append((f"a ({shape['vocab_size']}, {shape['hidden_size']}) table in {dtype}", (ids, table),
                      model.model.embed_tokens(ids), _same(0)))
    return _stage_verdict("embedding", fn, cases, [(_F, "embedding")])


def check_rms_norm(fn):
    """fn(x, weight, eps) -> OLMo 2's RMSNorm of x, as olmo.RMSNorm computes it: x / rms(x) in float32, times the
    weight, rounded to x's dtype once, at the end."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for what, dtype, scale, eps in [("x in float32", torch.float32, 3.0, 1e-6), ("x in bfloat16", torch.bfloat16, 3.0, 1e-6),
                                    ("a small x, where eps counts", torch.float32, 1e-3, 1e-5)]:
        x, w = (scale * torch.randn(2, 5, 64, generator=g)).to(dtype), (1 + 0.3 * torch.randn(64, generator=g)).to(dtype)
        cases.append((what, (x, w, eps), olmos_rms_norm(x, w, eps), _rounded_as))
    return _stage_verdict("rms_norm", fn, cases, _refusing("RMSNorm") + ((_F, "rms_norm"),))


def check_rotary(fn):
    """fn(x (B, nh, T, hs), positions (T,), theta) -> x rotated by RoPE, pairs (i, i + hs/2), in x's dtype, as
    olmo.py's rope_frequencies, rope_cos_sin and apply_rope compute it."""
    g = torch.Generator().manual_seed(0)
    x, positions = torch.randn(2, 3, 6, 16, generator=g), torch.tensor([0, 1, 2, 7, 100, 4095])
    # 1e-3: a float32 angle near position 4095 is exact to about 2e-4 radians, so the same rotation computed in
    # another order (pos / theta^e for pos * theta^-e) moves the result by about 1e-4; in bfloat16, a last bit
    cases = [(f"theta {theta:g}, x in {x.dtype}", (x, positions, theta), olmos_rotary(x, positions, theta), _same(tol))
             for theta, x, tol in [(10000.0, x, 1e-3), (500000.0, x, 1e-3), (500000.0, x.bfloat16(), 1e-2)]]
    return _stage_verdict("rotary", fn, cases, _refusing("apply_rope", "rope_cos_sin", "rope_frequencies"))


def check_causal_average(fn):
    """fn(x (B, T, C)) -> (B, T, C): at each position t, the mean of x over positions 0..t."""
    g = torch.Generator().manual_seed(0)
    cases = [(f"x of shape {shape}", (x,), olmos_causal_average(x), _same(1e-5))
             for shape in [(2, 7, 8), (1, 1, 3), (3, 12, 5)] for x in [torch.randn(shape, generator=g)]]
    return _stage_verdict("causal_average", fn, cases, _ATTENTION)


def check_attention_head(fn):
    """fn(q, k, v (..., T, hs)) -> (..., T, hs): causal softmax(q k^T / sqrt(hs)) v, as olmo.py's
    Attention.attend computes it, for any leading dimensions."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape in [(2, 6, 16), (2, 3, 6, 16), (1, 9, 8)]:
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
        cases.append((f"q, k, v of shape {shape}", (q, k, v), olmos_attention_head(q, k, v), _same(1e-5)))
    return _stage_verdict("attention_head", fn, cases, _ATTENTION)


def _attention_cases(n_heads, seed=0):
    """(description, x, the attention weights) for each (n_head, n_kv_head), from a random OLMo 2's first layer."""
    g = torch.Generator().manual_seed(seed)
    for H, KV in n_heads:
        config, weights = _random_olmo2(dict(_SHAPES[0], num_attention_heads=H, num_key_value_heads=KV), seed)
        w = {n: t for n, t in _part(weights, "model.layers.0.self_attn.").items() if "norm" not in n}
        yield f"{H} query heads, {KV} key/value heads", torch.randn(2, 6, 64, generator=g), w


def check_multi_head(fn):
    """fn(x (B, T, d), w {q_proj.weight, k_proj.weight, v_proj.weight, o_proj.weight}, n_head) -> (B, T, d):
    causal multi-head attention without QK-norm or RoPE, as olmo.Attention computes it (OLMo 1's)."""
    cases = [(what, (x, w, H), olmos_multi_head(x, w, H), _same(1e-5))
             for (what, x, w), H in zip(_attention_cases([(4, 4), (2, 2), (1, 1)]), (4, 2, 1))]
    return _stage_verdict("multi_head", fn, cases, _ATTENTION)


def check_grouped_query(fn):
    """fn(x (B, T, d), w, n_head, n_kv_head) -> (B, T, d): multi-head attention whose n_head query heads share
    n_kv_head key/value heads, each kv head serving n_head // n_kv_head neighbouring query heads, as olmo.Attention
    computes it (without QK-norm or RoPE)."""
    n_heads = [(4, 2), (8, 2), (4, 1), (4, 4)]
    cases = [(what, (x, w, H, KV), olmos_grouped_query(x, w, H, KV), _same(1e-5))
             for (what, x, w), (H, KV) in zip(_attention_cases(n_heads), n_heads)]
    return _stage_verdict("grouped_query", fn, cases, _ATTENTION)


def check_olmo2_attention(fn):
    """fn(x (B, T, d), w (q/k/v/o_proj.weight, q_norm.weight, k_norm.weight), config (config.json's dict),
    positions (T,)) -> (B, T, d): OLMo 2's attention, as olmo.Attention computes it."""
    cases = _positioned_cases("model.layers.0.self_attn.", olmos_olmo2_attention, lambda shape: (
        f"{shape['num_attention_heads']} query heads, {shape['num_key_value_heads']} key/value heads, "
        f"theta {shape['rope_theta']:g}"))
    return _stage_verdict("olmo2_attention", fn, cases, _ATTENTION)


def _positioned_cases(part, reference, describe):
    """A case per shape of _SHAPES for a stage fed (x, w, config, positions): w the random model's weights under
    part, positions 0..5 for the first shape and _GAPPED for the second, reference(x, w, config, positions) the
    answer; describe(shape) names the shape."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape, positions in zip(_SHAPES, (torch.arange(6), _GAPPED)):
        config, weights = _random_olmo2(shape, 0)
        x, w = torch.randn(2, 6, shape["hidden_size"], generator=g), _part(weights, part)
        what = f"{describe(shape)}, eps {shape['rms_norm_eps']:g}, positions {positions.tolist()}"
        cases.append((what, (x, w, config, positions), reference(x, w, config, positions), _same(1e-5)))
    return cases


def check_swiglu(fn):
    """fn(x (B, T, d), w {gate_proj.weight, up_proj.weight, down_proj.weight}) -> (B, T, d), as olmo.MLP computes it."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape in _SHAPES:
        _, weights = _random_olmo2(shape, 0)
        x, w = torch.randn(2, 5, shape["hidden_size"], generator=g), _part(weights, "model.layers.0.mlp.")
        cases.append((f"d = {shape['hidden_size']}, {shape['intermediate_size']} hidden", (x, w), olmos_swiglu(x, w),
                      _same(1e-5)))
    return _stage_verdict("swiglu", fn, cases, _refusing("MLP"))


def check_olmo2_block(fn):
    """fn(x (B, T, d), w (one layer's weights, names under model.layers.N.), config, positions (T,)) -> (B, T, d):
    OLMo 2's block, as olmo.Block computes it."""
    cases = _positioned_cases("model.layers.1.", olmos_olmo2_block,
                              lambda shape: f"d = {shape['hidden_size']}, {shape['num_attention_heads']} heads")
    return _stage_verdict("olmo2_block", fn, cases, _refusing("Block"))


def check_olmo2(fn):
    """fn(ids (B, T), weights {Hugging Face name: tensor}, config (config.json's dict)) -> logits (B, T, vocab),
    as olmo.OlmoForCausalLM computes them."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape in _SHAPES:
        config, weights = _random_olmo2(shape, 1)
        ids = torch.randint(0, shape["vocab_size"], (2, 7), generator=g)
        what = f"{shape['num_hidden_layers']} layers of width {shape['hidden_size']}, eps {shape['rms_norm_eps']:g}"
        cases.append((what, (ids, weights, config), olmos_olmo2(ids, weights, config), _same(1e-4)))
    return _stage_verdict("olmo2", fn, cases, _refusing("OlmoForCausalLM", "OlmoModel", "load_model"))


def _rounded_as(got, expected):
    """float32: within 1e-6 of the largest value (the same operations written in another order, x / sqrt(...) for
    x * rsqrt(...), move the last bit). bfloat16: equal, but for last-bit ties in at most 1% of the elements;
    rounding in the other order (once, after the weight multiply) changes about a quarter of them."""
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    d = (got.float() - expected.float()).abs()
    if expected.dtype == torch.float32:
        return d.max().item() <= 1e-6 * expected.abs().max().item()
    return (d > 0).float().mean().item() <= 0.01


# ---- 02: attention and positions -------------------------------------------------------------------------------

def check_sliding_window_mask(fn):
    """fn(T, window) -> (T, T) bool mask, True where query i may attend to key j (window counts the query itself;
    window None: plain causal). olmo.make_mask, which every mask of olmo.py comes from, is refused."""
    cases = []
    for T, window in [(10, None), (10, 3), (7, 1), (12, 12)]:
        t = torch.arange(T)
        cases.append((f"T={T}, window={window}", (T, window), olmo.make_mask(t, t, window, None)[0, 0], _close(0)))
    return _verdict(fn, cases, shortcuts=[(olmo, "make_mask")])


def check_shifted_keys(fn):
    """fn(k (B, H, T, hd), shift, inv_freq (hd/2,)) -> the keys k, which RoPE rotated to their positions (half-split
    pairs, frequencies inv_freq), rotated as if each sat `shift` positions earlier: what a cache that drops its
    oldest `shift` tokens needs. The positions are not given. olmo's RoPE functions are refused."""
    torch.manual_seed(0)
    raw = torch.randn(1, 2, 5, 16, dtype=torch.float64)  # the keys before RoPE, which fn never sees
    plain = olmo.OlmoConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, rope_theta=10000.0)
    yarn = plain.replace(rope_theta=500000.0, max_position_embeddings=4096,
                         rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512})
    cases = []
    for label, config, first, shift in [("theta 10000, positions 10..14, shift 3", plain, 10, 3),
                                        ("theta 10000, positions 1000..1004, shift 1000", plain, 1000, 1000),
                                        ("YaRN's frequencies, positions 300..304, shift 257", yarn, 300, 257)]:
        inv_freq = olmo.rope_frequencies(config, yarn=config.rope_scaling is not None)[0].double()
        at = lambda start: olmo.apply_rope(raw, *olmo.rope_cos_sin(inv_freq, 1.0, torch.arange(start, start + 5)[None]))
        # 1e-4: the keys are float64, but an answer that turns them in float32 is still right (angles up to ~300 rad)
        cases.append((label, (at(first), shift, inv_freq), at(first - shift), _close(1e-4)))
    return _verdict(fn, cases, shortcuts=[(olmo, "apply_rope"), (olmo, "rope_cos_sin")])


# ---- 03: the generations -----------------------------------------------------------------------------------------

def check_theta_for_context(fn):
    """fn(context, head_dim, turns) -> the smallest rope_theta at which RoPE's slowest pair of dimensions turns at
    most `turns` times over `context` tokens. Judged by its effect: at the theta returned, the slowest frequency of
    olmo.rope_frequencies (which fn may not call) turns `turns` times over the context."""
    def turns_right(context, head_dim, turns):
        def compare(got, expected):
            config = olmo.OlmoConfig(hidden_size=head_dim, num_attention_heads=1, num_key_value_heads=1,
                                     rope_theta=float(got))
            slowest = olmo.rope_frequencies(config, yarn=False)[0][-1].item()  # radians per token
            return abs(context * slowest / (2 * math.pi) - turns) <= 1e-5 * turns
        return compare
    cases = [(f"{context} tokens, head_dim {hd}, {turns} turns", (context, hd, turns),
              (context / (2 * math.pi * turns)) ** (hd / (hd - 2)), turns_right(context, hd, turns))
             for context, hd, turns in [(4096, 128, 0.0016), (65536, 128, 0.5), (2048, 64, 0.05), (8192, 256, 1.0)]]
    return _verdict(fn, cases, shortcuts=[(olmo, "rope_frequencies")])


def check_tied_embedding_grad(fn):
    """fn(E (V, d), ids (T,), targets (T,)) -> the gradient with respect to E of the mean cross-entropy of the logits
    E[ids] @ E^T against targets: a tied model with no blocks, E its embedding and its head at once. By hand:
    autograd, which computes it, is refused."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for V, d, ids in [(10, 4, torch.tensor([3, 1, 3, 7, 0, 3])), (50, 8, torch.randint(0, 50, (40,), generator=g))]:
        E = torch.randn(V, d, generator=g, dtype=torch.float64)
        targets = torch.randint(0, V, ids.shape, generator=g)
        with torch.enable_grad():
            W = E.clone().requires_grad_()
            torch.nn.functional.cross_entropy(W[ids] @ W.T, targets).backward()
        repeats = len(ids) - len(ids.unique())  # rows read more than once, whose two parts must add
        cases.append((f"V={V}, d={d}, {len(ids)} tokens, {repeats} of them repeats", (E, ids, targets), W.grad,
                      _close(1e-6)))
    return _verdict(fn, cases, shortcuts=[(torch.Tensor, "backward"), (torch.autograd, "backward"),
                                          (torch.autograd, "grad")])


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
    return _verdict(fn, cases, shortcuts=[(generate, "filtered_probs"), (generate, "sample_next")])


def check_min_p(fn):
    """fn(logits (1, V), min_p) -> the probabilities (1, V) of the tokens at least min_p times as likely as the
    likeliest one, renormalized; 0 elsewhere."""
    torch.manual_seed(1)
    logits = torch.randn(1, 50) * 2
    probs, cases = logits.softmax(-1), []
    for m in (0.05, 0.3, 1.0):
        kept = torch.where(probs >= m * probs.max(-1, keepdim=True).values, probs, 0)
        cases.append((f"min_p = {m}", (logits, m), kept / kept.sum(-1, keepdim=True), _close(1e-6)))
    return _verdict(fn, cases, shortcuts=[(generate, "filtered_probs"), (generate, "sample_next")])


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


def _same_ids(got, expected):
    """The expected ids in order, as any sequence of ints: a list, a tuple, a tensor."""
    try:
        return [operator.index(i) for i in got] == expected
    except TypeError:  # not a sequence, or not of ints
        return False


def check_longest_match(fn):
    """fn(piece: bytes, ranks: {bytes: id}) -> ids of the longest-match tokenization: from the left, always the
    longest token in the vocabulary that the rest of the piece starts with. No library function computes it, so
    none is refused: the tokenizer's own encoder is BPE, the answer this exercise tells apart."""
    ranks = _dolma2().enc._mergeable_ranks
    words = [" hello", "12345", " OLMo", " Überraschung", " 🤗", "Gated", " tokenizers", " medians"]
    return _verdict(fn, [(repr(w), (w.encode(), ranks), _longest_match(w.encode(), ranks), _same_ids) for w in words])


def _reads_back(got, tensors):
    """True if olmo.read_safetensors reads tensors back from the bytes got; otherwise raises, saying what differs."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "yours.safetensors"
        path.write_bytes(got)
        back = olmo.read_safetensors(path)
    if back.keys() != tensors.keys():
        raise ValueError(f"the file holds {sorted(back)}, not {sorted(tensors)}")
    for name, t in tensors.items():
        if back[name].dtype != t.dtype or back[name].shape != t.shape or not torch.equal(back[name], t):
            raise ValueError(f"{name} reads back as {_short(back[name])} {back[name].dtype}, not {_short(t)} {t.dtype}")
    return True


def check_safetensors_bytes(fn):
    """fn({name: tensor}) -> the bytes of a .safetensors file holding those tensors, judged by reading them back with
    olmo.read_safetensors. olmo.write_safetensors, which writes such a file, is refused."""
    torch.manual_seed(0)
    cases = [("one float32 matrix", {"weight": torch.randn(3, 4)}),
             ("float32, bfloat16 and int64 in one file",
              {"a.weight": torch.randn(2, 3), "a.bias": torch.randn(5).bfloat16(), "steps": torch.arange(4)}),
             ("a transposed matrix, not contiguous in memory", {"w": torch.randn(4, 3).T})]
    return _verdict(fn, [(d, (dict(tensors),), tensors, _reads_back) for d, tensors in cases],
                    shortcuts=[(olmo, "write_safetensors")])


# ---- 06: training ---------------------------------------------------------------------------------------------

def _gradients(loss, *inputs):
    """Autograd's gradients of loss(*inputs), a number, with respect to each input."""
    with torch.enable_grad():
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        return torch.autograd.grad(loss(*leaves), leaves)


def _clipped(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_ on parameters holding copies of grads: what the training loop calls."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return [p.grad for p in params]


def _all_close(got, expected):
    """The same number of tensors, each within 1e-5 of the largest element (clip_grad_norm_ adds 1e-6 to the norm
    it divides by: an answer without it passes)."""
    scale = max(e.abs().max().item() for e in expected)
    return len(got) == len(expected) and all(g.shape == e.shape and (g - e).abs().max().item() <= 1e-5 * scale
                                             for g, e in zip(got, expected))


def check_clip_grad_norm(fn):
    """fn(grads: a list of tensors, max_norm) -> the list as gradient clipping leaves it: where the norm of all the
    gradients together exceeds max_norm, every gradient scaled by one factor that brings it down to max_norm."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)
    cases = [("three gradients, their norm together 7.9, max_norm 1", [2 * r(4, 3), r(6), r(2, 2, 2)], 1.0),
             ("one large gradient and one small one, max_norm 1", [3 * r(8, 8), 0.01 * r(8)], 1.0),
             ("gradients already within max_norm", [0.1 * r(5, 5), 0.1 * r(5)], 1.0),
             ("max_norm 0.25", [r(16, 4), r(4)], 0.25)]
    return _verdict(fn, [(description, ([t.clone() for t in grads], max_norm), _clipped(grads, max_norm), _all_close)
                         for description, grads, max_norm in cases],
                    shortcuts=[(torch.nn.utils, "clip_grad_norm_"), (torch.nn.utils.clip_grad, "clip_grad_norm_"),
                               (torch.nn.utils, "get_total_norm"), (torch.nn.utils, "clip_grads_with_norm_")])


def _both_close(got, expected):
    """(grad_x, grad_weight), each within 1e-5 of its largest element (float32 rounds another order otherwise)."""
    return len(got) == 2 and all(g.shape == e.shape and (g - e).abs().max().item() <= 1e-5 * e.abs().max().item()
                                 for g, e in zip(got, expected))


def check_rms_norm_backward(fn):
    """fn(x (..., d), weight (d,), eps, grad_y (..., d)) -> (grad_x, grad_weight): the gradients with respect to x
    and weight of (olmo.RMSNorm(x) * grad_y).sum(), where RMSNorm(x) = weight * x / sqrt(mean(x^2) + eps), without
    autograd. grad_y is the gradient that arrives from above (the loss's, with respect to RMSNorm's output)."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for description, shape, scale, eps in [("3 rows of 16", (3, 16), 1.0, 1e-6),
                                           ("a batch of sequences, (2, 5, 32)", (2, 5, 32), 3.0, 1e-6),
                                           ("small inputs, where eps counts", (4, 64), 0.05, 1e-2)]:
        x, grad_y = scale * torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        weight = 1 + 0.3 * torch.randn(shape[-1], generator=g)

        def loss(x, w, norm=olmo.RMSNorm(shape[-1], eps), grad_y=grad_y):  # olmo.py's RMSNorm, its weight w
            return (torch.func.functional_call(norm, {"weight": w}, (x,)) * grad_y).sum()
        cases.append((description, (x, weight, eps, grad_y), _gradients(loss, x, weight), _both_close))
    autograd = [(torch.autograd, "grad"), (torch.autograd, "backward"), (torch.Tensor, "backward"),
                (torch.autograd.functional, "vjp"), (torch.autograd.functional, "jacobian")]  # any gradient at all
    return _verdict(fn, cases, shortcuts=autograd)


# ---- 07: mixture of experts -----------------------------------------------------------------------------------
# The page measures with each exercise's function after its check: the student's once it passed, solutions.py's
# until then (as notebook 1's yours_or_olmos), so the page runs whatever has been solved.

def yours_or_solutions(name, mine):
    """mine if it passed check_<name>, else solutions.py's function of that name; says which."""
    if _passed.get(name) is mine:
        print(f"{name}: yours")
        return mine
    import solutions  # beside this file
    print(f"{name}: solutions.py's stands in until my_{name} passes check_{name}")
    return getattr(solutions, name)


def _recorded(name, fn, ok):
    """ok, having remembered fn in _passed if it passed (for yours_or_solutions)."""
    if ok:
        _passed[name] = fn
    else:
        _passed.pop(name, None)
    return ok


def _capacity_kept(router_logits, k, capacity):
    experts = router_logits.float().softmax(-1).topk(k, -1).indices.flatten()  # token by token, slot by slot
    rank = (torch.nn.functional.one_hot(experts, router_logits.shape[-1]).cumsum(0) - 1).gather(1, experts[:, None])
    return (rank < capacity).view(-1, k)  # the first `capacity` pairs of each expert, in that order


def check_capacity_kept(fn):
    """fn(router_logits (N, E), k, capacity) -> (N, k) booleans: which of each token's k choices (in top-k order)
    its expert accepts, when an expert takes only the first `capacity` (token, choice) pairs, token by token."""
    same = lambda got, exp: torch.equal(got.bool(), exp)
    # two tokens that want each other's experts: in token order, token 0's second choice (expert 1) comes before
    # token 1's first (expert 1 too), so token 1 loses both; taking every first choice first would keep one each
    crossed = torch.tensor([[3.0, 2.0, 0.0, 0.0], [2.0, 3.0, 0.0, 0.0]])
    cases = [("token 0 chooses experts (0, 1), token 1 chooses (1, 0), capacity 1", (crossed, 2, 1),
              torch.tensor([[True, True], [False, False]]), same)]
    torch.manual_seed(0)
    logits = torch.randn(32, 8)
    logits[:, 1] += 1.0  # expert 1 is popular: it overflows first
    for c in (8, 10, 16):  # capacity factors 1, 1.25 and 2 of k N / E = 8; at 16 nothing is dropped
        cases.append((f"32 tokens, 8 experts, capacity {c}", (logits, 2, c), _capacity_kept(logits, 2, c), same))
    return _recorded("capacity_kept", fn, _verdict(fn, cases))


def check_active_parameters(fn):
    """fn(config) -> the parameters one token uses, by formula from the config: all but the embedding table (one
    row of it: count none) and the experts it is not routed to. Building the model to count is refused."""
    cases = []
    for name in ["OLMoE-1B-7B-0924", "FlexOlmo-7x7B-1T", "OLMo-2-0425-1B"]:
        config = olmo.OlmoConfig.from_name(name)
        with torch.device("meta"):
            model = olmo.OlmoForCausalLM(config)
        expected = sum(p.numel() for p in generate.weights_read_per_token(model))
        cases.append((name, (config,), expected, _equal))
    return _recorded("active_parameters", fn, _verdict(fn, cases, shortcuts=[
        (generate, "weights_read_per_token"), (olmo, "OlmoForCausalLM"), (olmo, "OlmoModel")]))


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
    return _verdict(fn, cases, shortcuts=[(olmo, "KVCache"), (olmo, "GDNState")])  # allocating the states to measure
