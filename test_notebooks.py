"""The notebooks: their exercise checks accept right answers and catch plausible wrong ones, and every notebook runs."""

import json
import math
import re
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import generate
import olmo

sys.path.insert(0, str(Path(__file__).parent / "notebooks"))  # the notebooks' exercise checks and solutions
import checks  # noqa: E402
import solutions  # noqa: E402

# ---- the notebooks' exercises ----------------------------------------------------------------------------------


# notebook 1's stages written otherwise than solutions.py (right), or with a plausible mistake (wrong)

def _rotary_interleaved(x, positions, theta):  # wrong: the pairs (0, 1), (2, 3), ... instead of (i, i + hs/2)
    halves = lambda t: torch.cat([t[..., 0::2], t[..., 1::2]], -1)  # interleaved pairs -> halves
    y = solutions.rotary(halves(x), positions, theta)
    return torch.stack(y.chunk(2, -1), -1).flatten(-2)  # and back


def _rotary_complex(x, positions, theta):  # each pair a complex number, multiplied by e^(i angle), in float64
    hs = x.shape[-1]
    angle = positions[:, None].double() * theta ** (-torch.arange(0, hs, 2).double() / hs)  # (T, hs/2)
    z = torch.complex(x[..., :hs // 2].double(), x[..., hs // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], -1).to(x.dtype)


def _attention_row_by_row(q, k, v):  # each query against the keys up to it
    rows = [(q[..., t:t + 1, :] @ k[..., :t + 1, :].transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
            @ v[..., :t + 1, :] for t in range(q.shape[-2])]
    return torch.cat(rows, -2)


def _softmax_over_queries(q, k, v):  # wrong: each key's column sums to 1, not each query's row
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    return scores.softmax(-2) @ v


def _heads_one_by_one(x, w, n_head, n_kv_head=None):  # each head from its own rows of the projections
    n_kv_head = n_kv_head or n_head
    hs = w["q_proj.weight"].shape[0] // n_head
    rows = lambda name, i: w[f"{name}_proj.weight"][i * hs:(i + 1) * hs]
    heads = []
    for h in range(n_head):
        g = h // (n_head // n_kv_head)  # the kv head of query head h
        heads.append(_attention_row_by_row(x @ rows("q", h).T, x @ rows("k", g).T, x @ rows("v", g).T))
    return torch.cat(heads, -1) @ w["o_proj.weight"].T


def _heads_split_wrongly(x, w, n_head):  # wrong: viewed as (B, nh, T, hs) straight away, mixing positions and heads
    B, T, d = x.shape
    q, k, v = ((x @ w[f"{p}_proj.weight"].T).view(B, n_head, T, d // n_head) for p in "qkv")
    return solutions.attention_head(q, k, v).transpose(1, 2).reshape(B, T, d) @ w["o_proj.weight"].T


def _grouped_spread(x, w, n_head, n_kv_head, spread_k, spread_v):  # the kv heads spread by the given functions
    B, T, _ = x.shape
    hs = w["q_proj.weight"].shape[0] // n_head
    q = (x @ w["q_proj.weight"].T).view(B, T, n_head, hs).transpose(1, 2)
    k, v = ((x @ w[f"{p}_proj.weight"].T).view(B, T, n_kv_head, hs).transpose(1, 2) for p in "kv")
    y = solutions.attention_head(q, spread_k(k, n_head // n_kv_head), spread_v(v, n_head // n_kv_head))
    return y.transpose(1, 2).reshape(B, T, -1) @ w["o_proj.weight"].T


_tiled = lambda t, n: t.repeat(1, n, 1, 1)  # kv heads 0, 1, 0, 1: the wrong ones for queries 1 and 2
_interleaved = lambda t, n: t.repeat_interleave(n, 1)


def _olmo2_attention_variant(x, w, config, positions, norm="whole", rope_first=False):
    """right (norm="whole") by other means: QK-norm of x / sqrt(mean + eps), RoPE by complex numbers, kv heads by
    expand. Wrong: norm="per head" (QK-norm over each head's hs, as Qwen3), or rope_first (RoPE, then QK-norm)."""
    B, T, d = x.shape
    H, KV, eps = config["num_attention_heads"], config["num_key_value_heads"], config["rms_norm_eps"]
    hs = d // H
    heads = lambda t, n: t.view(B, T, n, hs).transpose(1, 2)
    norm_of = lambda t, weight: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight
    q, k, v = (x @ w[f"{p}_proj.weight"].T for p in "qkv")
    if rope_first:
        q, k = (_rotary_complex(heads(t, n), positions, config["rope_theta"]).transpose(1, 2).reshape(B, T, -1)
                for t, n in ((q, H), (k, KV)))
    if norm == "whole":
        q, k = norm_of(q, w["q_norm.weight"]), norm_of(k, w["k_norm.weight"])
        q, k = heads(q, H), heads(k, KV)
    else:
        q = norm_of(heads(q, H), w["q_norm.weight"].view(H, 1, hs))
        k = norm_of(heads(k, KV), w["k_norm.weight"].view(KV, 1, hs))
    if not rope_first:
        q, k = _rotary_complex(q, positions, config["rope_theta"]), _rotary_complex(k, positions, config["rope_theta"])
    k, v = (t[:, :, None].expand(B, KV, H // KV, T, hs).reshape(B, H, T, hs) for t in (k, heads(v, KV)))
    return _attention_row_by_row(q, k, v).transpose(1, 2).reshape(B, T, d) @ w["o_proj.weight"].T


def _swiglu_by_linear(x, w, act=lambda z: z * torch.sigmoid(z)):
    F = torch.nn.functional
    return F.linear(act(F.linear(x, w["gate_proj.weight"])) * F.linear(x, w["up_proj.weight"]), w["down_proj.weight"])


def _olmo2_block_variant(x, w, config, positions, norm="output"):
    """norm="output": OLMo 2's block by other means. Wrong: "input" (pre-norm: the norm on the branch's input, as
    OLMo 1 and Llama) or "stream" (post-LN: the norm on the stream, after the addition, as the 2017 Transformer)."""
    eps, part = config["rms_norm_eps"], solutions.part
    norm1 = lambda t: solutions.rms_norm(t, w["post_attention_layernorm.weight"], eps)
    norm2 = lambda t: solutions.rms_norm(t, w["post_feedforward_layernorm.weight"], eps)
    attention = lambda t: _olmo2_attention_variant(t, part(w, "self_attn."), config, positions)
    mlp = lambda t: _swiglu_by_linear(t, part(w, "mlp."))
    if norm == "input":
        x = x + attention(norm1(x))
        return x + mlp(norm2(x))
    if norm == "stream":
        x = norm1(x + attention(x))
        return norm2(x + mlp(x))
    x = x + norm1(attention(x))
    return x + norm2(mlp(x))


def _olmo2_variant(ids, weights, config, final_norm=True, head="lm_head.weight"):
    """Right by other means (one-hot embedding, the block above); wrong: final_norm=False, or head= the embedding
    (a tied head, which OLMo 2 has not)."""
    table = weights["model.embed_tokens.weight"]
    x = torch.nn.functional.one_hot(ids, table.shape[0]).to(table.dtype) @ table
    for i in range(config["num_hidden_layers"]):
        x = _olmo2_block_variant(x, solutions.part(weights, f"model.layers.{i}."), config, torch.arange(ids.shape[1]))
    if final_norm:
        x = solutions.rms_norm(x, weights["model.norm.weight"], config["rms_norm_eps"])
    return torch.nn.functional.linear(x, weights[head])


def _loaded(module, state):  # an olmo.py module holding the given tensors
    module.load_state_dict(state)
    return module


def _olmo_attention_of(x, w, config, positions=None):  # olmo.Attention itself (the shortcut)
    t = torch.arange(x.shape[1])
    cos = sin = None
    if positions is not None:
        cos, sin = olmo.rope_cos_sin(*olmo.rope_frequencies(config, False), positions[None])
    return _loaded(olmo.Attention(config), w)(x, cos, sin, olmo.make_mask(t, t, None, None))


_sizes = lambda x, H, KV: dict(hidden_size=x.shape[-1], num_attention_heads=H, num_key_value_heads=KV)


WRONG = {  # each exercise with a plausible mistake, which its check must catch
    "embedding": lambda ids, table: torch.nn.functional.one_hot(ids, table.shape[0]).float() @ table.float(),  # float32 always
    "rms_norm": lambda x, w, eps: w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps),  # in x's dtype throughout
    "rotary": _rotary_interleaved,  # pairs (0, 1), (2, 3), ...
    "causal_average": lambda x: (lambda a: a / a.sum(1, keepdim=True))(torch.ones(x.shape[1], x.shape[1]).tril(1)) @ x,  # sees the next one
    "attention_head": lambda q, k, v: solutions.attention_head(q * q.shape[-1] ** 0.5, k, v),  # not divided by sqrt(hs)
    "multi_head": _heads_split_wrongly,
    "grouped_query": lambda x, w, H, KV: _grouped_spread(x, w, H, KV, _tiled, _tiled),  # repeat, not repeat_interleave
    "olmo2_attention": lambda x, w, c, pos: _olmo2_attention_variant(x, w, c, pos, norm="per head"),
    "swiglu": lambda x, w: _swiglu_by_linear(x, dict(w, **{"gate_proj.weight": w["up_proj.weight"], "up_proj.weight": w["gate_proj.weight"]})),  # silu on up
    "olmo2_block": lambda x, w, c, pos: _olmo2_block_variant(x, w, c, pos, norm="input"),  # pre-norm
    "olmo2": lambda ids, w, c: _olmo2_variant(ids, w, c, final_norm=False),
    "sliding_window_mask": lambda T, w: solutions.sliding_window_mask(T, None if w is None else w + 1),
    "shifted_keys": lambda k, shift, inv_freq: solutions.shifted_keys(k, -shift, inv_freq),  # turned forward, not back
    "theta_for_context": lambda context, hd, turns: context / (2 * math.pi * turns),  # the slowest pair as theta^-1
    "tied_embedding_grad": lambda E, ids, targets: _tied_grad_token_by_token(E, ids, targets, as_input=False),  # head only
    "top_p_before_temperature": lambda logits, p, t: _top_p_by_count(logits / t, p, 1.0),  # the other order
    "min_p": lambda logits, m: (lambda q: q / q.sum(-1, keepdim=True))(logits.softmax(-1) * (logits.softmax(-1) >= m)),  # absolute
    "longest_match": lambda piece, ranks: checks._dolma2().enc.encode_ordinary(piece.decode()),  # BPE's ids
    "safetensors_bytes": lambda tensors: _safetensors_by_hand(tensors, offsets_from_file_start=True),
    "clip_grad_norm": lambda grads, m: [g * min(1.0, m / g.norm().item()) for g in grads],  # each on its own
    "rms_norm_backward": lambda x, w, eps, gy: (gy * w * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps),  # rms taken
                                                solutions.rms_norm_backward(x, w, eps, gy)[1]),  # for a constant
    "capacity_kept": lambda logits, k, capacity: solutions.capacity_kept(logits.flip(0), k, capacity).flip(0),  # the last tokens first
    "active_parameters": lambda c: solutions.active_parameters(c) + c.vocab_size * c.hidden_size,  # the embedding table too
    "exact_write_beta": lambda S, k, v: 1.0,  # as if k were normalized
    "state_bytes": lambda c: _state_bytes_by_shapes(c, state_itemsize=2),  # S in bfloat16, as the convolution's inputs
}


def _shift_by_complex(k, shift, inv_freq, interleaved=False):  # pair i as the complex number k_i + i k_(i + hd/2)
    pairs = k.unflatten(-1, (-1, 2)) if interleaved else torch.stack(k.chunk(2, -1), -1)
    turn_back = torch.polar(torch.ones_like(inv_freq), -shift * inv_freq)  # e^(-i shift inv_freq)
    turned = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * turn_back)
    return turned.flatten(-2) if interleaved else torch.cat(turned.unbind(-1), -1)


def _theta_by_bisection(context, hd, turns, slowest=lambda theta, hd: theta ** (-(hd - 2) / hd)):  # on log theta
    low, high = 1.0, 1e30
    for _ in range(200):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if context * slowest(mid, hd) / (2 * math.pi) > turns else (low, mid)
    return high


def _slowest_by_library(theta, hd):
    config = olmo.OlmoConfig(hidden_size=hd, num_attention_heads=1, num_key_value_heads=1, rope_theta=theta)
    return olmo.rope_frequencies(config, yarn=False)[0][-1].item()


def _tied_grad_token_by_token(E, ids, targets, as_input=True):  # each token's two uses of E, added up
    grad = torch.zeros_like(E)
    for i, t in zip(ids.tolist(), targets.tolist()):
        dlogits = (E @ E[i]).softmax(0) - torch.nn.functional.one_hot(torch.tensor(t), len(E))
        grad += torch.outer(dlogits, E[i]) / len(ids)  # the head: logit j = E[j] . E[i]
        if as_input:
            grad[i] += dlogits @ E / len(ids)  # the embedding row read as the input
    return grad


def _tied_grad_rows_assigned(E, ids, targets):  # grad[ids] += ...: a row read twice keeps only one of its parts
    dlogits = ((E[ids] @ E.T).softmax(-1) - torch.nn.functional.one_hot(targets, len(E))) / len(ids)
    grad = dlogits.T @ E[ids]
    grad[ids] += dlogits @ E
    return grad


def _tied_grad_by_autograd(E, ids, targets):
    with torch.enable_grad():
        W = E.clone().requires_grad_()
        return torch.autograd.grad(torch.nn.functional.cross_entropy(W[ids] @ W.T, targets), W)[0]


def _safetensors_by_hand(tensors, offsets_from_file_start=False, storage=False):
    header, blobs, at = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        # the storage as it lies in memory (wrong for a transposed view), or the values in row-major order
        blob = bytes(t.untyped_storage()) if storage else t.contiguous().view(torch.int8).numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [at, at + len(blob)]}
        blobs.append(blob)
        at += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the data 8-byte aligned, as the safetensors package writes it
    if offsets_from_file_start:  # (they count from the end of the header)
        for info in list(header.values())[1:]:
            info["data_offsets"] = [o + 8 + len(head) for o in info["data_offsets"]]
        head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def _safetensors_by_library(tensors):
    with tempfile.TemporaryDirectory() as folder:
        olmo.write_safetensors(Path(folder) / "x.safetensors", {name: t.contiguous() for name, t in tensors.items()})
        return (Path(folder) / "x.safetensors").read_bytes()


def _longest_match_recursive(piece, ranks, longest=True):  # the longest (or, wrongly, shortest) prefix, then the rest
    if not piece:
        return []
    sizes = [n for n in range(1, len(piece) + 1) if piece[:n] in ranks]
    n = max(sizes) if longest else min(sizes)
    return [ranks[piece[:n]]] + _longest_match_recursive(piece[n:], ranks, longest)


def _clip_by_flattening(grads, max_norm, only_shrink=True):  # the gradients as one long vector, and back
    flat = torch.cat([g.flatten() for g in grads])
    scale = max_norm / flat.norm() if flat.norm() > max_norm or not only_shrink else 1.0
    return [piece.view_as(g) for piece, g in zip((flat * scale).split([g.numel() for g in grads]), grads)]


def _rms_norm_backward_normalized(x, w, eps, gy, eps_too=True):  # through x_hat = x r: dx = r (g - x_hat mean(g x_hat))
    r = (x.pow(2).mean(-1, keepdim=True) + (eps if eps_too else 0)) ** -0.5
    x_hat, g = x * r, gy * w
    return r * (g - x_hat * (g * x_hat).mean(-1, keepdim=True)), (gy * x_hat).flatten(0, -2).sum(0)


def _rms_norm_backward_by_autograd(x, w, eps, gy):
    with torch.enable_grad():
        x, norm = x.clone().requires_grad_(), olmo.RMSNorm(x.shape[-1], eps)
        norm.weight.data = w.clone()
        (norm(x) * gy).sum().backward()
    return x.grad, norm.weight.grad


def _top_p_by_count(logits, p, t):  # keep the n likeliest, n = 1 + how many cumulative sums stay below p
    probs = logits.softmax(-1)[0]
    n = 1 + int((probs.sort(descending=True).values.cumsum(0) < p).sum())
    chosen = torch.zeros_like(probs, dtype=torch.bool)
    chosen[probs.argsort(descending=True)[:n]] = True
    return torch.where(chosen, logits / t, float("-inf")).softmax(-1)


def _capacity_by_counting(logits, k, capacity):  # pair i is kept if fewer than `capacity` earlier pairs chose its expert
    chosen = logits.argsort(-1, descending=True)[:, :k].flatten().tolist()
    return torch.tensor([chosen[:i].count(e) < capacity for i, e in enumerate(chosen)]).view(-1, k)


def _capacity_first_choices_first(logits, k, capacity):  # every token's first choice before any second choice
    chosen = logits.argsort(-1, descending=True)[:, :k].T.flatten().tolist()
    return torch.tensor([chosen[:i].count(e) < capacity for i, e in enumerate(chosen)]).view(k, -1).T


def _active_by_parts(c):  # per layer: q, k, v, o, QK-norm, the router and k experts, two norms; the final norm, the head
    d, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    experts = (c.num_experts_per_tok or 1) * 3 * d * c.intermediate_size + (c.num_experts or 0) * d
    layer = d * (2 * q + 2 * kv) + c.qk_norm * (q + kv) + experts + 2 * d
    return c.num_hidden_layers * layer + d + (not c.tie_word_embeddings) * c.vocab_size * d


def _active_by_library(c):
    with torch.device("meta"):
        return sum(p.numel() for p in generate.weights_read_per_token(olmo.OlmoForCausalLM(c)))


def _state_bytes_by_shapes(c, state_itemsize=4):  # per Gated DeltaNet layer: S (heads, d_k, d_v), the conv's K-1 inputs
    state = (c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim)
    conv = (2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim,
            c.linear_conv_kernel_dim - 1)
    return sum(state_itemsize * math.prod(state) + 2 * math.prod(conv) for kind in c.layer_types if kind == "linear_attention")


RIGHT_TOO = {  # right answers written otherwise than solutions.py's, which their checks must accept too
    "embedding": lambda ids, table: torch.nn.functional.one_hot(ids, table.shape[0]).to(table.dtype) @ table,
    "rms_norm": lambda x, w, eps: (x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype),
    "rotary": _rotary_complex,
    "causal_average": lambda x: torch.stack([x[:, :t + 1].mean(1) for t in range(x.shape[1])], 1),
    "attention_head": _attention_row_by_row,
    "multi_head": _heads_one_by_one,
    "grouped_query": _heads_one_by_one,
    "olmo2_attention": _olmo2_attention_variant,
    "swiglu": _swiglu_by_linear,
    "olmo2_block": _olmo2_block_variant,
    "olmo2": _olmo2_variant,
    "sliding_window_mask": lambda T, w: torch.ones(T, T, dtype=torch.bool).tril() & (
        torch.ones(T, T, dtype=torch.bool).triu(-(w - 1)) if w is not None else True),
    "shifted_keys": _shift_by_complex,
    "theta_for_context": _theta_by_bisection,
    "tied_embedding_grad": _tied_grad_token_by_token,
    "top_p_before_temperature": _top_p_by_count,
    "min_p": lambda logits, m: torch.where(logits >= logits.max(-1, keepdim=True).values + math.log(m), logits,
                                           float("-inf")).softmax(-1),
    "longest_match": lambda piece, ranks: tuple(_longest_match_recursive(piece, ranks)),  # a tuple: any sequence will do
    "safetensors_bytes": _safetensors_by_hand,
    "clip_grad_norm": _clip_by_flattening,
    "rms_norm_backward": _rms_norm_backward_normalized,
    "capacity_kept": _capacity_by_counting,
    "active_parameters": _active_by_parts,
    "exact_write_beta": lambda S, k, v: k.norm() ** -2,
    "state_bytes": _state_bytes_by_shapes,
}
WRONG_TOO = {  # a second mistake for each
    "embedding": lambda ids, table: table[ids.flatten()],  # (B * T, d): the batch lost
    "rms_norm": lambda x, w, eps: w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype),  # OLMoE's order
    "rotary": lambda x, pos, theta: solutions.rotary(x, -pos, theta),  # turned the other way
    "causal_average": lambda x: x.cumsum(1) / x.shape[1],  # divided by T, not by t + 1
    "attention_head": _softmax_over_queries,
    "multi_head": lambda x, w, H: solutions.multi_head(x, dict(w, **{"q_proj.weight": w["q_proj.weight"] / H ** 0.5}), H),  # / sqrt(d), not sqrt(hs)
    "grouped_query": lambda x, w, H, KV: _grouped_spread(x, w, H, KV, _interleaved, _tiled),  # k right, v tiled
    "olmo2_attention": lambda x, w, c, pos: _olmo2_attention_variant(x, w, c, pos, rope_first=True),  # RoPE, then QK-norm
    "swiglu": lambda x, w: _swiglu_by_linear(x, w, act=torch.nn.functional.gelu),  # GELU's gate
    "olmo2_block": lambda x, w, c, pos: _olmo2_block_variant(x, w, c, pos, norm="stream"),  # post-LN
    "olmo2": lambda ids, w, c: _olmo2_variant(ids, w, c, head="model.embed_tokens.weight"),  # a tied head
    "sliding_window_mask": lambda T, w: solutions.sliding_window_mask(T, w).T,  # the future instead of the past
    "shifted_keys": lambda k, shift, inv_freq: _shift_by_complex(k, shift, inv_freq, interleaved=True),  # pairs (2i, 2i+1)
    "theta_for_context": lambda context, hd, turns: (context / turns) ** (hd / (hd - 2)),  # turns counted in radians
    "tied_embedding_grad": _tied_grad_rows_assigned,
    "top_p_before_temperature": lambda logits, p, t: _top_p_by_count(logits, p, 1.0) ** (1 / t),  # not renormalized
    "min_p": lambda logits, m: logits.softmax(-1) * (logits.softmax(-1) >= m * logits.softmax(-1).max()),  # not renormalized
    "longest_match": lambda piece, ranks: _longest_match_recursive(piece, ranks, longest=False),  # single bytes
    "safetensors_bytes": lambda tensors: _safetensors_by_hand(tensors, storage=True),  # a view's storage, not its values
    "clip_grad_norm": lambda grads, m: _clip_by_flattening(grads, m, only_shrink=False),  # small gradients grown too
    "rms_norm_backward": lambda x, w, eps, gy: _rms_norm_backward_normalized(x, w, eps, gy, eps_too=False),
    "capacity_kept": _capacity_first_choices_first,  # the check once passed it
    "active_parameters": lambda c: solutions.active_parameters(c) - c.num_hidden_layers * (c.num_experts or 0) * c.hidden_size,  # no router
    "exact_write_beta": lambda S, k, v: 1 / k.norm(),  # the norm, not its square
    "state_bytes": lambda c: c.layer_types.count("linear_attention") * c.num_attention_heads * (  # every head count alike
        4 * c.linear_key_head_dim * c.linear_value_head_dim
        + 2 * (2 * c.linear_key_head_dim + c.linear_value_head_dim) * (c.linear_conv_kernel_dim - 1)),
}
assert RIGHT_TOO.keys() == WRONG_TOO.keys() == WRONG.keys()

SHORTCUT = {  # each exercise answered by calling the library function it asks the student to write
    "top_p_before_temperature": lambda logits, p, t: (  # top-p's tokens from the library, then the temperature
        lambda kept: torch.where(kept, logits / t, float("-inf")).softmax(-1))(generate.filtered_probs(logits, top_p=p) > 0),
    "embedding": lambda ids, table: torch.nn.functional.embedding(ids, table),
    "rms_norm": lambda x, w, eps: _loaded(olmo.RMSNorm(w.shape[0], eps), {"weight": w})(x),
    "rotary": lambda x, pos, theta: olmo.apply_rope(x, *olmo.rope_cos_sin(*olmo.rope_frequencies(
        olmo.OlmoConfig(**_sizes(x, 1, 1), rope_theta=theta), False), pos[None])),
    "causal_average": lambda x: torch.nn.functional.scaled_dot_product_attention(0 * x, 0 * x, x, is_causal=True),
    "attention_head": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    "multi_head": lambda x, w, H: _olmo_attention_of(x, w, olmo.OlmoConfig(model_type="olmo", **_sizes(x, H, H))),
    "grouped_query": lambda x, w, H, KV: _olmo_attention_of(x, w, olmo.OlmoConfig(model_type="olmo", **_sizes(x, H, KV))),
    "olmo2_attention": lambda x, w, c, pos: _olmo_attention_of(x, w, olmo.OlmoConfig.from_dict(c), pos),
    "swiglu": lambda x, w: _loaded(olmo.MLP(olmo.OlmoConfig(hidden_size=x.shape[-1], intermediate_size=w["up_proj.weight"].shape[0])), w)(x),
    "olmo2_block": lambda x, w, c, pos: _loaded(olmo.Block(olmo.OlmoConfig.from_dict(c)), w)(
        x, *olmo.rope_cos_sin(*olmo.rope_frequencies(olmo.OlmoConfig.from_dict(c), False), pos[None]),
        olmo.make_mask(pos, pos, None, None)),
    "olmo2": lambda ids, w, c: _loaded(olmo.OlmoForCausalLM(olmo.OlmoConfig.from_dict(c)), w)(ids)[0],
    "sliding_window_mask": lambda T, w: olmo.make_mask(torch.arange(T), torch.arange(T), w, None)[0, 0],
    "shifted_keys": lambda k, shift, inv_freq: olmo.apply_rope(
        k, *olmo.rope_cos_sin(inv_freq, 1.0, torch.full((1, k.shape[2]), -shift))),
    "theta_for_context": lambda context, hd, turns: _theta_by_bisection(context, hd, turns, slowest=_slowest_by_library),
    "tied_embedding_grad": _tied_grad_by_autograd,
    "clip_grad_norm": checks._clipped,  # torch.nn.utils.clip_grad_norm_, as the check computes the answer
    "rms_norm_backward": _rms_norm_backward_by_autograd,
    "safetensors_bytes": _safetensors_by_library,
    "active_parameters": _active_by_library,
    "state_bytes": lambda c: sum(s.S.nbytes + s.conv.nbytes for s in olmo.KVCache(c, 1, 1, 1, "meta", torch.bfloat16).layers
                                 if isinstance(s, olmo.GDNState)),
}


@pytest.mark.parametrize("name", sorted(SHORTCUT))
def test_exercise_checks_reject_the_library_shortcut(name, capsys):
    assert getattr(checks, f"check_{name}")(SHORTCUT[name]) is False
    assert "asks you to write it yourself" in capsys.readouterr().out


def test_build_olmo_uses_olmos_stand_ins_until_yours_passes_and_never_as_an_answer(capsys):
    """Notebook 1's later stages call an earlier stage by name: olmo.py's stand-in until the student's function passes
    its check. A stage built on stand-ins passes its own check; a stand-in of this stage or a later one is refused."""
    attention = checks.yours_or_olmos("attention_head", None)  # nothing passed yet: olmo.py's
    assert checks.check_causal_average(lambda x: attention(0 * x, 0 * x, x)) is False  # 4(b) answering 4(a)
    assert "asks you to write it yourself" in capsys.readouterr().out

    def multi_head(x, w, n_head):  # solutions.multi_head, on olmo.py's attention_head
        B, T, d = x.shape
        heads = lambda t: t.view(B, T, n_head, d // n_head).transpose(1, 2)
        y = attention(*(heads(x @ w[f"{p}_proj.weight"].T) for p in "qkv"))
        return y.transpose(1, 2).reshape(B, T, d) @ w["o_proj.weight"].T
    assert checks.check_multi_head(multi_head) is True
    assert checks.yours_or_olmos("multi_head", multi_head) is multi_head
    assert checks.check_multi_head(WRONG["multi_head"]) is False  # a failed check hands the stage back to olmo.py
    assert checks.yours_or_olmos("multi_head", multi_head) is not multi_head

    block, norm = checks.yours_or_olmos("olmo2_block", None), checks.yours_or_olmos("rms_norm", None)

    def model(ids, weights, config):  # the model on olmo.py's blocks and norm: refuses nothing it needs
        x = weights["model.embed_tokens.weight"][ids]
        for i in range(config["num_hidden_layers"]):
            x = block(x, solutions.part(weights, f"model.layers.{i}."), config, torch.arange(ids.shape[1]))
        return norm(x, weights["model.norm.weight"], config["rms_norm_eps"]) @ weights["lm_head.weight"].T
    assert checks.check_olmo2(model) is True
    assert checks.check_olmo2_block(lambda x, w, c, pos: block(x, w, c, pos)) is False  # the stand-in as the answer


_no_eps = lambda c: dict(c, rms_norm_eps=0.0)  # as if the config's eps were never read
_counted = lambda positions: torch.arange(len(positions))  # as if the positions given were never read: 0..T-1
IGNORED = {  # notebook 1's later stages with an input silently ignored, which their checks must catch too
    "olmo2_attention, eps": ("olmo2_attention", lambda x, w, c, pos: solutions.olmo2_attention(x, w, _no_eps(c), pos)),
    "olmo2_attention, positions": ("olmo2_attention",
                                   lambda x, w, c, pos: solutions.olmo2_attention(x, w, c, _counted(pos))),
    "olmo2_block, eps": ("olmo2_block", lambda x, w, c, pos: solutions.olmo2_block(x, w, _no_eps(c), pos)),
    "olmo2_block, positions": ("olmo2_block", lambda x, w, c, pos: solutions.olmo2_block(x, w, c, _counted(pos))),
    "olmo2, eps": ("olmo2", lambda ids, w, c: solutions.olmo2(ids, w, _no_eps(c))),
}


@pytest.mark.parametrize("case", sorted(IGNORED))
def test_build_olmo_checks_catch_an_ignored_eps_or_positions(case, capsys):
    stage, fn = IGNORED[case]
    assert getattr(checks, f"check_{stage}")(fn) is False
    assert capsys.readouterr().out.startswith("not yet")


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


@pytest.mark.parametrize("name", ["capacity_kept", "active_parameters"])
def test_moe_page_measures_with_yours_once_it_passes_and_with_solutions_until_then(name, capsys):
    """Notebook 7 measures with each exercise's function after its check: solutions.py's until the student's passes."""
    check = getattr(checks, f"check_{name}")
    assert check(WRONG[name]) is False
    assert checks.yours_or_solutions(name, WRONG[name]) is getattr(solutions, name)
    assert check(RIGHT_TOO[name]) is True
    assert checks.yours_or_solutions(name, RIGHT_TOO[name]) is RIGHT_TOO[name]
    assert capsys.readouterr().out.rstrip().endswith(f"{name}: yours")


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
        most = 12 if path.stem.startswith("01") else 4  # notebook 1 builds OLMo 2 in stages, each an exercise
        assert 2 <= len(re.findall(r"^check_\w+\(my_\w+\)$", source, re.M)) <= most, path.name  # exercises
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
