"""One solution to each exercise of the notebooks (checks.py says whether yours is right). Try first."""

import math

import torch


# ---- 01 -------------------------------------------------------------------------------------------------------

def parameter_count(c):
    d, hd, I, V = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
    attention = d * c.num_attention_heads * hd * 2 + d * c.num_key_value_heads * hd * 2  # q and o; k and v
    qk_norm = (c.num_attention_heads + c.num_key_value_heads) * hd if c.qk_norm else 0
    norms = 2 * d if c.model_type != "olmo" else 0  # OLMo 1's LayerNorm has no weights
    block = attention + qk_norm + 3 * d * I + norms
    head = 0 if c.tie_word_embeddings else V * d
    return V * d + c.num_hidden_layers * block + (d if c.model_type != "olmo" else 0) + head


def olmoe_rms_norm(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# ---- 02 -------------------------------------------------------------------------------------------------------

def sliding_window_mask(T, window):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = j <= i
    return mask & (i - j < window) if window is not None else mask


def rope(x, positions, theta):
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angle = positions[:, None].float() * inv_freq  # (T, hd/2)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


# ---- 03 -------------------------------------------------------------------------------------------------------

def kv_cache_bytes(config, tokens):
    per_token = 2 * config.num_key_value_heads * config.head_dim * 2  # a key and a value, 2 bytes each
    return sum(per_token * (tokens if kind == "full_attention" else min(tokens, config.sliding_window))
               for kind in config.layer_types)


def longest_wavelength(theta, head_dim):
    slowest = 1.0 / theta ** ((head_dim - 2) / head_dim)  # the last pair's radians per position
    return 2 * math.pi / slowest


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


def att_proj_split(att_proj, config):
    kv = config.num_key_value_heads * config.head_dim
    return tuple(att_proj.split([config.hidden_size, kv, kv], dim=0))


# ---- 06 -------------------------------------------------------------------------------------------------------

def trigram_bits_per_byte(train, val):
    counts = torch.ones(256, 256, 256)
    counts.index_put_((train[:-2], train[1:-1], train[2:]), torch.ones(len(train) - 2), accumulate=True)
    probs = counts / counts.sum(-1, keepdim=True)
    return -probs[val[:-2], val[1:-1], val[2:]].log2().mean().item()


def initial_bits_per_byte(vocab_size):
    # small random weights give logits near 0, a softmax near uniform: -log2(1 / V) bits for whichever token came
    return math.log2(vocab_size)


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
