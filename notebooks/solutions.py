"""One solution to each exercise of the notebooks (checks.py says whether yours is right). Try first."""

import json
import math

import torch


# ---- 01 -------------------------------------------------------------------------------------------------------
# Written as in the notebook: a later stage calls an earlier one by its name there (rms_norm, rotary, ...).

def part(weights, prefix):  # as on the notebook's page: the tensors under one module, named without its prefix
    return {name[len(prefix):]: t for name, t in weights.items() if name.startswith(prefix)}


def embedding(ids, table):
    return table[ids]  # (B, T, d): row ids[b, t]; one_hot(ids) @ table gives the same, with V times the work


def rms_norm(x, weight, eps):
    xf = x.float()  # float32 inside, whatever x is
    return (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)  # rounded once, last


def rotary(x, positions, theta):
    hs = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs)  # (hs/2,) radians per position
    angle = positions[:, None].float() * inv_freq  # (T, hs/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :hs // 2], x[..., hs // 2:]  # pair i is (x1[i], x2[i]): dims i and i + hs/2
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)  # float32 inside, rounded once


def causal_average(x):
    T = x.shape[1]
    weights = torch.ones(T, T).tril()  # (T, T): row t is 1 at columns 0..t...
    weights = weights / weights.sum(1, keepdim=True)  # ...divided by t + 1
    return weights @ x  # (T, T) @ (B, T, C) -> (B, T, C)


def attention_head(q, k, v):
    T, hs = q.shape[-2:]
    scores = q @ k.transpose(-2, -1) / hs ** 0.5  # (..., T, T): query t against key s
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # s > t
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v  # (..., T, hs)


def multi_head(x, w, n_head):
    B, T, d = x.shape
    heads = lambda t: t.view(B, T, n_head, d // n_head).transpose(1, 2)  # (B, T, d) -> (B, nh, T, hs)
    q, k, v = (heads(x @ w[f"{p}_proj.weight"].T) for p in "qkv")
    y = attention_head(q, k, v)  # (B, nh, T, hs): every head at once
    return y.transpose(1, 2).reshape(B, T, d) @ w["o_proj.weight"].T  # the heads side by side, mixed by o_proj


def grouped_query(x, w, n_head, n_kv_head):
    B, T, d = x.shape
    hs = w["q_proj.weight"].shape[0] // n_head
    q = (x @ w["q_proj.weight"].T).view(B, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
    k, v = ((x @ w[f"{p}_proj.weight"].T).view(B, T, n_kv_head, hs).transpose(1, 2) for p in "kv")  # (B, nkv, T, hs)
    group = n_head // n_kv_head  # query heads 0..group-1 share kv head 0, and so on
    y = attention_head(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
    return y.transpose(1, 2).reshape(B, T, n_head * hs) @ w["o_proj.weight"].T


def olmo2_attention(x, w, config, positions):
    B, T, d = x.shape
    H, KV, eps = config["num_attention_heads"], config["num_key_value_heads"], config["rms_norm_eps"]
    hs = d // H
    q = rms_norm(x @ w["q_proj.weight"].T, w["q_norm.weight"], eps)  # QK-norm: over all heads at once...
    k = rms_norm(x @ w["k_proj.weight"].T, w["k_norm.weight"], eps)
    v = x @ w["v_proj.weight"].T
    q = q.view(B, T, H, hs).transpose(1, 2)  # ...then the heads: (B, nh, T, hs)
    k, v = (t.view(B, T, KV, hs).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hs)
    q, k = rotary(q, positions, config["rope_theta"]), rotary(k, positions, config["rope_theta"])
    y = attention_head(q, k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1))
    return y.transpose(1, 2).reshape(B, T, d) @ w["o_proj.weight"].T


def swiglu(x, w):
    gate, up = x @ w["gate_proj.weight"].T, x @ w["up_proj.weight"].T  # (B, T, I) each
    return (torch.nn.functional.silu(gate) * up) @ w["down_proj.weight"].T


def olmo2_block(x, w, config, positions):
    eps = config["rms_norm_eps"]
    attention = olmo2_attention(x, part(w, "self_attn."), config, positions)
    h = x + rms_norm(attention, w["post_attention_layernorm.weight"], eps)  # the norm on the branch's output
    return h + rms_norm(swiglu(h, part(w, "mlp.")), w["post_feedforward_layernorm.weight"], eps)


def olmo2(ids, weights, config):
    positions = torch.arange(ids.shape[1])
    x = embedding(ids, weights["model.embed_tokens.weight"])  # (B, T, d)
    for i in range(config["num_hidden_layers"]):
        x = olmo2_block(x, part(weights, f"model.layers.{i}."), config, positions)
    x = rms_norm(x, weights["model.norm.weight"], config["rms_norm_eps"])
    return x @ weights["lm_head.weight"].T  # (B, T, vocab)


# ---- 02 -------------------------------------------------------------------------------------------------------

def sliding_window_mask(T, window):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = j <= i
    return mask & (i - j < window) if window is not None else mask


def shifted_keys(k, shift, inv_freq):
    angle = -shift * inv_freq  # rotations add: turning every pair back by shift positions' angle moves the key back
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    k1, k2 = k.chunk(2, -1)
    return k * cos + torch.cat([-k2, k1], -1) * sin


# ---- 03 -------------------------------------------------------------------------------------------------------

def theta_for_context(context, head_dim, turns):
    # the slowest pair turns context * theta^(-(hd - 2)/hd) / 2 pi times: set that to `turns` and solve for theta
    return (context / (2 * math.pi * turns)) ** (head_dim / (head_dim - 2))


def tied_embedding_grad(E, ids, targets):
    h = E[ids]  # (T, d): the embedding's rows, read as the input
    probs = (h @ E.T).softmax(-1)
    dlogits = (probs - torch.nn.functional.one_hot(targets, E.shape[0])) / len(ids)  # mean cross-entropy
    grad = dlogits.T @ h  # E as the head: logits = h E^T
    return grad.index_add(0, ids, dlogits @ E)  # E as the embedding: each use of a row adds its part, repeats too


# ---- 04 -------------------------------------------------------------------------------------------------------

def top_p_before_temperature(logits, p, temperature):
    probs = logits.float().softmax(-1)  # temperature 1: the distribution top-p chooses from
    sorted_probs, order = probs.sort(-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < p  # the mass before this token has not reached p yet
    mask = torch.zeros_like(keep).scatter(-1, order, keep)
    return (logits.float() / temperature).masked_fill(~mask, float("-inf")).softmax(-1)


def min_p(logits, min_p):
    probs = logits.float().softmax(-1)
    kept = probs * (probs >= min_p * probs.max(-1, keepdim=True).values)
    return kept / kept.sum(-1, keepdim=True)


# ---- 05 -------------------------------------------------------------------------------------------------------

def longest_match(piece, ranks):
    ids = []
    while piece:
        n = max(n for n in range(1, len(piece) + 1) if piece[:n] in ranks)  # the longest token the piece starts with
        ids.append(ranks[piece[:n]])
        piece = piece[n:]
    return ids


def safetensors_bytes(tensors):
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, data = {}, b""
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()  # row-major bytes (numpy has no bfloat16; uint8 it has)
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + data  # offsets count from the end of the header


# ---- 06 -------------------------------------------------------------------------------------------------------

def clip_grad_norm(grads, max_norm):
    total = torch.sqrt(sum((g ** 2).sum() for g in grads))  # one norm for all of them, as if one long vector
    scale = min(1.0, max_norm / (total.item() + 1e-6))  # only ever shrink, and all alike: the direction is kept
    return [g * scale for g in grads]


def rms_norm_backward(x, weight, eps, grad_y):
    # y = weight * x * r, r = (mean(x^2) + eps)^-1/2. Through weight: grad_y * x * r, summed over every row. Through
    # x, two paths: directly (weight * grad_y * r), and through r, which every element of the row changes:
    # dr/dx_j = -r^3 x_j / d
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    g = grad_y * weight
    grad_x = g * r - x * r ** 3 * (g * x).mean(-1, keepdim=True)
    grad_weight = (grad_y * x * r).reshape(-1, x.shape[-1]).sum(0)
    return grad_x, grad_weight


# ---- 07 -------------------------------------------------------------------------------------------------------

def capacity_kept(router_logits, k, capacity):
    experts = torch.topk(torch.softmax(router_logits, -1, dtype=torch.float32), k, -1).indices  # (N, k)
    taken = torch.zeros(router_logits.shape[-1], dtype=torch.long)  # pairs each expert has accepted so far
    kept = torch.zeros(experts.shape, dtype=torch.bool)
    for t in range(experts.shape[0]):
        for s in range(k):
            e = experts[t, s]
            kept[t, s] = taken[e] < capacity
            taken[e] += 1
    return kept


def active_parameters(c):
    d, hd, I = c.hidden_size, c.head_dim, c.intermediate_size
    attention = d * c.num_attention_heads * hd * 2 + d * c.num_key_value_heads * hd * 2
    qk_norm = (c.num_attention_heads + c.num_key_value_heads) * hd if c.qk_norm else 0
    mlp = 3 * d * I * (c.num_experts_per_tok or 1) + (c.num_experts or 0) * d  # the chosen experts, the router
    norms = 2 * d if c.model_type != "olmo" else 0
    head = 0 if c.tie_word_embeddings else c.vocab_size * d
    return c.num_hidden_layers * (attention + qk_norm + mlp + norms) + d + head


# ---- 08 -------------------------------------------------------------------------------------------------------

def exact_write_beta(S, k, v):
    return 1 / (k @ k)  # a write scales the error S^T k - v by 1 - beta |k|^2, whatever S and v are


def state_bytes(c):
    channels = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
    per_layer = 4 * c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim \
        + 2 * channels * (c.linear_conv_kernel_dim - 1)
    return per_layer * c.layer_types.count("linear_attention")
