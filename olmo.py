"""
The OLMo family in one file: the language models of AI2's Open Language Model project.

Reading order, like a paper. The dense model first, whole: config -> norms -> rotary embedding (plain and YaRN) ->
attention -> MLP -> block -> model. Then what some families add, each in its own section: the mixture of experts
(OLMoE, FlexOlmo) and Gated DeltaNet (Olmo Hybrid). Then the released shapes (presets), the KV cache, the
checkpoint loader (and saver) and the tokenizer.
Parameter names equal the Hugging Face checkpoint names (model.layers.0.self_attn.q_proj.weight, ...), so a
checkpoint loads with load_state_dict. Everything else lives beside this file: generate.py (sampling, generation),
quantize.py, tp.py (tensor parallelism), ai2_checkpoints.py (AI2's own checkpoint formats) and speed.py (faster
kernels, torch.compile, CUDA graphs), which this file uses only to give a loaded model the CPU's fast products.

The generations differ in a few lines, each behind one config flag:
  OLMo 1 (model_type "olmo"):     pre-norm blocks with a LayerNorm that has no weights; optional clip_qkv.
  OLMo 2 ("olmo2"):               norms moved after attention/MLP (RMSNorm), RMSNorm on the full q and k.
  OLMo 3 ("olmo3"):               OLMo 2 + sliding-window attention on 3 of 4 layers, YaRN on the others.
  OLMoE ("olmoe"):                pre-norm with RMSNorm, QK-norm, and a mixture of 64 small experts as the MLP.
  FlexOlmo ("flex_olmo"):         the OLMo 2 block with a mixture of 7B-wide experts as the MLP.
  Olmo Hybrid ("olmo_hybrid"):    3 of 4 layers are Gated DeltaNet (linear attention with a fixed-size state).
"""

import json
import math
import mmap
import os
import re
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import speed  # load_model gives a model on the CPU the fastest CPU kernels (speed.use_cpu_kernels)


# -----------------------------------------------------------------------------------------------------------
# Config: field names are the keys of the Hugging Face config.json


MODEL_TYPES = ("olmo", "olmo2", "olmo3", "olmoe", "flex_olmo", "olmo_hybrid")
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")
# What the reference (transformers 5.24) assumes for keys that a config.json leaves out, where a family differs
# from the fields' defaults below. Released OLMoE config.json files, for one, carry no rms_norm_eps: 1e-5 applies.
REFERENCE_DEFAULTS = {
    "olmo": dict(rope_theta=10000.0, max_position_embeddings=2048),
    "olmo2": dict(rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048),
    "olmo3": dict(rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=2048),
    "olmoe": dict(rope_theta=10000.0, rms_norm_eps=1e-5, num_experts=64, num_experts_per_tok=8),
    "flex_olmo": dict(rope_theta=500000.0, num_experts=7, num_experts_per_tok=5),
    "olmo_hybrid": dict(rope_theta=10000.0, max_position_embeddings=65536),
}


@dataclass
class OlmoConfig:
    model_type: str = "olmo2"  # one of MODEL_TYPES: picks the block layout (see the flags below)
    vocab_size: int = 100352  # rows of the embedding and of the logits (can be padded past the tokenizer)
    hidden_size: int = 2048  # d, the width of the residual stream
    intermediate_size: int = 8192  # width of the SwiGLU hidden layer (of each expert, in a mixture of experts)
    num_hidden_layers: int = 16
    num_attention_heads: int = 16  # H query heads of head_dim = hidden_size // H (128 in every release)
    num_key_value_heads: int = 16  # KV heads; fewer than H means grouped-query attention (GQA)
    max_position_embeddings: int = 4096  # context length the model was trained for
    rope_theta: float | None = 500000.0  # RoPE base; None: no RoPE at all ("NoPE", the released Olmo Hybrid)
    rope_scaling: dict | None = None  # YaRN parameters for the full-attention layers (OLMo 3), else None
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon (OLMo 1's LayerNorm uses a fixed 1e-5)
    clip_qkv: float | None = None  # OLMo 1 0424/0724: clamp q, k, v to [-clip_qkv, clip_qkv]
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix (OLMo-1B)
    sliding_window: int | None = None  # OLMo 3: how many keys (counting itself) a sliding layer sees
    layer_types: list | None = None  # per layer "full_attention", "sliding_attention" or "linear_attention"
    eos_token_id: int | None = None  # end of text, where generation stops
    pad_token_id: int | None = None
    attn_implementation: str = "sdpa"  # "eager" spells the attention math out; "sdpa" calls the fused kernel
    # mixture of experts (OLMoE, FlexOlmo): the MLP is num_experts MLPs, of which each token uses a few
    num_experts: int | None = None  # E experts per layer; None: one dense MLP
    num_experts_per_tok: int | None = None  # k, the experts each token is routed to
    norm_topk_prob: bool = False  # rescale the k chosen probabilities to sum to 1 (False in every release)
    output_router_logits: bool = False  # training: add the router's load-balancing loss to the loss...
    router_aux_loss_coef: float = 0.01  # ...times this
    # Gated DeltaNet, the "linear_attention" layers of Olmo Hybrid (None: the reference's defaults, below)
    linear_num_key_heads: int | None = None  # heads of q and k (default num_attention_heads)
    linear_num_value_heads: int | None = None  # heads of v and of the state (default num_attention_heads)
    linear_key_head_dim: int | None = None  # d_k (default 0.75 * hidden_size / linear_num_key_heads)
    linear_value_head_dim: int | None = None  # d_v (default 2 * d_k)
    linear_conv_kernel_dim: int = 4  # width of the short causal convolution on q, k and v
    linear_allow_neg_eigval: bool = True  # the write strength beta in (0, 2) rather than (0, 1)

    def __post_init__(self):
        # the fields left None here are filled in from the others below: a change of those fills them in anew
        derived = {f for f in ("layer_types", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                               "linear_value_head_dim") if getattr(self, f) is None}
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {self.model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
        if self.attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {self.attn_implementation!r}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("hidden_size must divide into num_attention_heads, and those into num_key_value_heads")
        if self.layer_types is None:  # every 4th layer sees everything; OLMo 3 slides a window, the Hybrid a state
            other = {"olmo3": "sliding_attention", "olmo_hybrid": "linear_attention"}.get(self.model_type,
                                                                                         "full_attention")
            self.layer_types = ["full_attention" if i % 4 == 3 else other for i in range(self.num_hidden_layers)]
            if self.model_type == "olmo_hybrid" and "full_attention" not in self.layer_types:
                self.layer_types[-1] = "full_attention"  # fewer than 4 layers: the reference makes the last one full
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(f"layer_types must list one of {', '.join(LAYER_TYPES)} per layer "
                             f"(num_hidden_layers={self.num_hidden_layers}), got {self.layer_types}: give both, "
                             "or layer_types=None for the family's pattern")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if ("linear_attention" in self.layer_types) != (self.model_type == "olmo_hybrid"):
            raise ValueError("linear_attention layers are Olmo Hybrid's (model_type 'olmo_hybrid'), "
                             f"got {self.layer_types}")
        if self.model_type == "olmo_hybrid" and "full_attention" not in self.layer_types:
            raise ValueError(f"Olmo Hybrid needs at least one full_attention layer, got {self.layer_types}")
        scaling = self.rope_scaling or {}
        if self.rope_scaling is not None and scaling.get("rope_type", scaling.get("type")) != "yarn":
            raise ValueError(f"only YaRN rope scaling is used by OLMo checkpoints, got {self.rope_scaling}")
        if self.num_experts is not None and not 1 <= (self.num_experts_per_tok or 0) <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be between 1 and num_experts={self.num_experts}, "
                             f"got {self.num_experts_per_tok}")
        if self.model_type == "olmo_hybrid":
            self.linear_num_key_heads = self.linear_num_key_heads or self.num_attention_heads
            self.linear_num_value_heads = self.linear_num_value_heads or self.num_attention_heads
            self.linear_key_head_dim = (self.linear_key_head_dim
                                        or int(0.75 * self.hidden_size / self.linear_num_key_heads))
            self.linear_value_head_dim = self.linear_value_head_dim or 2 * self.linear_key_head_dim
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise ValueError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        object.__setattr__(self, "_derived", derived)

    def __setattr__(self, name, value):
        """A field changed after construction is honoured, never ignored: what was filled in from the others
        (layer_types, ...) is filled in anew and the whole config checked again; a change that does not fit raises
        and leaves the config as it was. (A model already built keeps its shape: build a new one.)"""
        if "_derived" in self.__dict__ and name in self.__dataclass_fields__:
            self.__dict__.update(self.replace(**{name: value}).__dict__)
        else:
            object.__setattr__(self, name, value)

    def replace(self, **changes):
        """A copy with changes, the fields that were filled in from others filled in anew unless given."""
        return dataclasses.replace(self, **{f: None for f in self._derived} | changes)

    # The switches between the generations, one per difference, each used in one place.
    @property
    def norm_after(self):  # RMSNorm on the OUTPUT of attention and MLP (OLMo 2+), not a norm on the input
        return self.model_type not in ("olmo", "olmoe")

    @property
    def qk_norm(self):  # RMSNorm on the full-width q and k projections (all but OLMo 1)
        return self.model_type != "olmo"

    @property
    def norm_rounds_first(self):  # OLMoE's RMSNorm rounds to the model dtype BEFORE multiplying its weight
        return self.model_type == "olmoe"

    @property
    def rope_in_model_dtype(self):  # OLMoE rotates q and k with cos/sin rounded to the model dtype
        return self.model_type == "olmoe"

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d, source="config"):
        """A Hugging Face config.json dict, transformers-4 or transformers-5 style."""
        d = dict(d)
        if d.get("model_type") == "olmo_1124":  # what some OLMo 2 intermediate revisions on the Hub call OLMo 2
            d["model_type"] = "olmo2"
        if d.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not an OLMo model "
                             f"(expected one of {', '.join(MODEL_TYPES)})")
        rope = d.pop("rope_parameters", None)  # transformers 5 moved rope_theta/rope_scaling in here
        if rope is not None:
            if "full_attention" in rope or "sliding_attention" in rope:  # OLMo 3: one dict per layer type
                full, sliding = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
                theta = full.get("rope_theta")
                if sliding.get("rope_type", "default") != "default" or sliding.get("rope_theta", theta) != theta:
                    raise ValueError(f"{source}: sliding layers must use plain RoPE with the full layers' theta, "
                                     f"got {rope}")
                rope = full
            if "rope_theta" in rope:
                d.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d.get("num_attention_heads")
        for k, v in REFERENCE_DEFAULTS[d["model_type"]].items():
            nope = k == "rope_theta" and k in d and d["model_type"] == "olmo_hybrid"  # only there null means NoPE
            if d.get(k) is None and not nope:
                d[k] = v
        names = {f.name for f in fields(cls)}
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
        if d.get("attention_bias"):
            raise ValueError(f"{source}: attention_bias=true was never used by an OLMo release and is not supported")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(read_json(path), source=str(path))

    @classmethod
    def from_name(cls, name, **changes):
        """A preset with the hyper-parameters of a released checkpoint, e.g. 'OLMo-2-0425-1B', with changes
        (from_name("OLMo-2-0425-1B", num_hidden_layers=2): two layers of the 1B)."""
        key = name.split("/")[-1]
        key = next((k for k in PRESETS if key == k or key.startswith(k + "-")), None)  # -Instruct, -Think, ...
        if key is None:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        family, d, mlp, layers, heads, kv_heads, other = PRESETS[key]
        return cls(**FAMILIES[family] | dict(model_type=family, hidden_size=d, intermediate_size=mlp,
                                             num_hidden_layers=layers, num_attention_heads=heads,
                                             num_key_value_heads=kv_heads) | other | changes)


# -----------------------------------------------------------------------------------------------------------
# Norms. Both compute in float32 and round once at the end, as the reference does.


class LayerNorm(nn.Module):
    """OLMo 1: LayerNorm with no weight and no bias, eps fixed at 1e-5."""

    def forward(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],), None, None, 1e-5).to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight. OLMo 2/3 multiply the weight in float32 and round once; OLMoE (rounds_first) rounds
    x / rms(x) to the model dtype first, then multiplies (in bfloat16 the two differ in the last bit)."""

    def __init__(self, dim, eps, rounds_first=False):
        super().__init__()
        self.eps, self.rounds_first = eps, rounds_first
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.times_weight(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps), self.weight, x.dtype)

    def times_weight(self, normed, weight, dtype):
        if self.rounds_first:
            return weight * normed.to(dtype)
        return (weight * normed).to(dtype)


def make_norm(config, dim=None):
    """The block and final norm of a generation: OLMo 1's weightless LayerNorm, or an RMSNorm."""
    if config.model_type == "olmo":
        return LayerNorm()
    return RMSNorm(dim or config.hidden_size, config.rms_norm_eps, config.norm_rounds_first)


# -----------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE), "half-split" form: dims i and i + hd/2 rotate together.


def rope_frequencies(config, yarn):
    """Inverse frequencies (hd/2,) and the cos/sin scale. YaRN (OLMo 3, full-attention layers only) keeps the
    high frequencies, divides the low ones by `factor`, blends a ramp between, and scales cos/sin."""
    hd, theta = config.head_dim, config.rope_theta
    pos_freqs = theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    if not yarn:
        return 1.0 / pos_freqs, 1.0
    s = config.rope_scaling
    factor = s.get("factor") or config.max_position_embeddings / s["original_max_position_embeddings"]
    attention_factor = s.get("attention_factor") or 0.1 * math.log(factor) + 1.0
    # the dimension that turns `rotations` times over the original context: below `low` the frequencies are
    # left alone (extrapolated), above `high` divided by factor (interpolated)
    old_context = s["original_max_position_embeddings"]
    dim_of = lambda rotations: hd * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    # Where the ramp ends: transformers caps it at hd - 1, OLMo-core at hd/2 - 1 (the last frequency). They differ
    # only for a low theta and a long old context (theta 1e4 at hd 128: above ~54k; never for the released Olmo 3),
    # by up to factor-fold. A config read from an OLMo-core checkpoint carries "olmo_core": True (ai2_checkpoints.py)
    # and gets OLMo-core's cap and its order of the blend, which rounds otherwise: its frequencies bit for bit.
    olmo_core = s.get("olmo_core", False)
    low, high = max(low, 0), min(high, hd // 2 - 1 if olmo_core else hd - 1)
    ramp = ((torch.arange(hd // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    if olmo_core:
        return 1.0 / pos_freqs / factor * ramp + 1.0 / pos_freqs * (1 - ramp), attention_factor
    keep = 1 - ramp  # weight of the original (extrapolated) frequency
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
    return inv_freq, attention_factor


def rope_cos_sin(inv_freq, scale, pos):
    """pos (B, T) integer positions -> cos, sin (B, 1, T, hd) in float32."""
    freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+hd/2}) pair by its angle, in float32 (cos/sin promote x), then round once."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


# -----------------------------------------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads."""

    def __init__(self, config):
        super().__init__()
        d, H, KV, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, KV, hd  # on this device (tp.py gives a rank fewer)
        self.q_proj = nn.Linear(d, H * hd, bias=False)
        self.k_proj = nn.Linear(d, KV * hd, bias=False)
        self.v_proj = nn.Linear(d, KV * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, d, bias=False)
        self.clip_qkv = config.clip_qkv
        # QK-norm (all but OLMo 1): over all heads at once, before the split into heads (not per head as in Qwen3)
        self.q_norm = make_norm(config, H * hd) if config.qk_norm else nn.Identity()
        self.k_norm = make_norm(config, KV * hd) if config.qk_norm else nn.Identity()
        self.config = config  # attn_implementation, read at every call: it can be switched on a built model

    def forward(self, x, cos, sin, mask, kv=None):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, H*hd), (B, T, KV*hd) x2
        q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:  # after the QK-norm (OLMoE); OLMo 1 has none
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cos is not None:  # None: no positions at all (NoPE, Olmo Hybrid)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # this layer's LayerKV
            k, v = kv.update(k, v)  # (B, KV, S, hd): past keys and these, S >= T
        if self.config.attn_implementation == "eager":
            y = self.attend(q, k, v, mask)
        else:  # the same math, fused (flash attention on GPU); GQA by broadcasting the KV heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d)

    def attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(hd) + mask) v, one line at a time."""
        rep = self.n_head // self.n_kv_head  # GQA: each KV head serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
        scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5  # (B, H, T, S)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in float32, like the reference
        return probs @ v  # (B, H, T, hd)


# -----------------------------------------------------------------------------------------------------------
# MLP


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One layer: attention and an MLP, each in a residual branch, with its norm before the branch (OLMo 1, OLMoE)
    or after it (OLMo 2 and later). kind: "full_attention" or "sliding_attention" (the layer's cos/sin and mask)."""

    def __init__(self, config, kind="full_attention"):
        super().__init__()
        self.kind = kind
        self.self_attn = Attention(config)
        self.mlp = MoE(config) if config.num_experts else MLP(config)  # OLMoE, FlexOlmo: see Mixture of experts
        self.norm_after = config.norm_after
        if config.norm_after:  # OLMo 2/3. Careful: in Llama (and OLMoE) the same name is the norm BEFORE the MLP
            self.post_attention_layernorm = make_norm(config)
            self.post_feedforward_layernorm = make_norm(config)
        else:  # OLMo 1, OLMoE: classic pre-norm
            self.input_layernorm = make_norm(config)
            self.post_attention_layernorm = make_norm(config)

    def forward(self, x, cos, sin, mask, kv=None):
        if self.norm_after:
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, mask, kv))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------------------------------------
# The model


class OlmoModel(nn.Module):
    """Token embeddings -> blocks -> final norm. Returns the last hidden states (B, T, d)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # _weight: no N(0, 1) init here. OlmoForCausalLM's init or a checkpoint fills it, and normal_ on the meta
        # device (where loading builds the model) would cost a one-second import of torch._dynamo
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        # Olmo Hybrid's linear_attention layers are Gated DeltaNet blocks (see Gated DeltaNet)
        self.layers = nn.ModuleList(GatedDeltaNetBlock(config) if kind == "linear_attention" else Block(config, kind)
                                    for kind in config.layer_types)
        self.norm = make_norm(config)
        # (yarn, device) -> RoPE's frequencies there; not a buffer: .to(bfloat16) must not round them
        self.inv_freqs = {}

    def rope(self, yarn, device):
        """Made in float32 on the CPU, as the reference makes them, and copied to the device once: a copy every
        step would make the host wait for the GPU, and could not be recorded in a CUDA graph."""
        if (yarn, device) not in self.inv_freqs:
            inv_freq, scale = rope_frequencies(self.config, yarn)
            self.inv_freqs[yarn, device] = inv_freq.to(device), scale
        return self.inv_freqs[yarn, device]

    def forward(self, input_ids, cache=None, attention_mask=None):
        """input_ids (B, T). With a cache, these tokens follow the cache.length tokens already in it.
        attention_mask (B, past + T), 1 for real tokens and 0 for (left) padding, as in Hugging Face."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)} "
                             "(one sequence: input_ids[None])")
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None:
            cache.check_room(T)
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask must have shape {(B, past + T)}, got {tuple(attention_mask.shape)}")
        start = cache.past() if cache is not None else 0  # past, or its device copy in a static cache
        t = start + torch.arange(T, device=input_ids.device)  # time step of each new token
        if attention_mask is None:
            pos = t[None]  # (1, T) positions for RoPE
        else:  # a left-padded row starts counting positions at its first real token
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        states = cache.layers if cache is not None else [None] * len(self.layers)
        inputs = {}  # (cos, sin, mask) depend only on a layer's kind: made once per kind
        for layer, state in zip(self.layers, states):
            if layer.kind not in inputs:
                inputs[layer.kind] = self.layer_inputs(layer.kind, state, t, pos, attention_mask)
        x = self.embed_tokens(input_ids)  # (B, T, d): no scaling, no learned positions
        for layer, state in zip(self.layers, states):
            x = layer(x, *inputs[layer.kind], state)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def layer_inputs(self, kind, state, t, pos, attention_mask):
        """RoPE's cos and sin, and the mask, for the layers of one kind in a step of the time steps t."""
        if kind == "linear_attention":  # Gated DeltaNet: no positions; the padding of these tokens is zeroed
            return (None if attention_mask is None else attention_mask[:, -len(t):],)
        window = self.config.sliding_window if kind == "sliding_attention" else None
        key_t = state.key_times(len(t)) if state is not None else t
        mask = make_mask(t, key_t, window, attention_mask)
        if self.config.rope_theta is None:  # NoPE: attention without positions (Olmo Hybrid)
            return None, None, mask
        yarn = kind == "full_attention" and self.config.rope_scaling is not None  # YaRN on full layers only
        cos, sin = rope_cos_sin(*self.rope(yarn, pos.device), pos)
        if self.config.rope_in_model_dtype:  # OLMoE
            cos, sin = cos.to(self.embed_tokens.weight.dtype), sin.to(self.embed_tokens.weight.dtype)
        return cos, sin, mask


def make_mask(t, key_t, window, attention_mask):
    """(B|1, 1, T, S) bool, True where the query at time t[i] may see the key at time key_t[j]:
    causal, within the sliding window, and not padding. Empty cache slots have key_t = -1."""
    ok = (key_t[None, :] <= t[:, None]) & (key_t[None, :] >= 0)  # (T, S)
    if window is not None:  # the window counts the query itself: window keys in all
        ok = ok & (t[:, None] - key_t[None, :] < window)
    ok = ok[None]  # (1, T, S)
    if attention_mask is not None:
        ok = ok & attention_mask.bool()[:, key_t.clamp(min=0)][:, None, :]  # (B, T, S)
        ok = ok | (key_t[None, None, :] == t[None, :, None])  # a padding query sees itself: no empty softmax
    return ok[:, None]


class OlmoForCausalLM(nn.Module):
    """OlmoModel + lm_head: returns logits (B, T, vocab_size), and the mean cross-entropy loss when targets
    (the next token at each position, -100 = ignore) are given."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = OlmoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:  # OLMo-1B: the output layer is the embedding matrix
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.lm_head.weight.device.type != "meta":  # built on the meta device, a checkpoint fills every weight
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # the reference's init (for training from scratch; loading overwrites it)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, input_ids, targets=None, cache=None, attention_mask=None, last_only=False):
        x = self.model(input_ids, cache, attention_mask)
        if last_only:  # generation needs only the next-token logits: skip the big vocab matmul elsewhere
            x = x[:, -1:]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
            if self.config.num_experts and self.config.output_router_logits:  # training a mixture of experts
                router_logits = [layer.mlp.router_logits for layer in self.model.layers]
                mask = attention_mask[:, -input_ids.shape[1]:] if attention_mask is not None else None
                aux = load_balancing_loss(router_logits, self.config.num_experts_per_tok, mask)
                loss = loss + self.config.router_aux_loss_coef * aux
        return logits, loss

    def new_cache(self, batch_size, max_len, device=None, dtype=None, static=False, spare=0):
        p = self.model.embed_tokens.weight
        kv_heads = next(layer.self_attn.n_kv_head for layer in self.model.layers if hasattr(layer, "self_attn"))
        return KVCache(self.config, batch_size, max_len, kv_heads, device or p.device, dtype or p.dtype, static, spare)

    @classmethod
    def from_pretrained(cls, name_or_folder, device=None, dtype=None, revision=None, attn_implementation=None):
        """See load_model. Quantized or split across devices: generate.load_model."""
        return load_model(name_or_folder, device, dtype, revision, attn_implementation)

    def save_pretrained(self, folder, tokenizer=None):
        """See save_model."""
        save_model(self, folder, tokenizer)


# -----------------------------------------------------------------------------------------------------------
# Mixture of experts (OLMoE, FlexOlmo): many MLPs per layer, a router sends each token to a few of them


class MoE(nn.Module):
    """The router (gate) scores every expert for each token; the token goes through its k best experts, whose
    outputs are summed, weighted by the router's probabilities. Only the chosen experts' weights are read: OLMoE
    decodes with 8 of its 64 experts per layer, so it computes like a 1B model and knows like a 7B one."""

    def __init__(self, config):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router: one logit per expert
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.num_experts))
        self.router_logits = None  # (tokens, E) of the last call: for the load-balancing loss, and to look at

    def forward(self, x):
        B, T, d = x.shape
        x = x.reshape(-1, d)  # (N, d): tokens are routed one by one
        self.router_logits = self.gate(x)  # (N, E)
        probs = F.softmax(self.router_logits, dim=-1, dtype=torch.float32)  # float32 and torch.topk, as the
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # reference: bfloat16 ties must break its way
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)  # (N, k)
        if x.shape[0] == 1:  # one token (decoding): its k experts in turn, without the bookkeeping below
            out = torch.cat([self.experts[e](x) for e in chosen[0].tolist()])  # (k, d)
            return (out * weights[0, :, None]).sum(0).view(B, T, d)
        out = x.new_zeros(x.shape[0], self.top_k, d)  # (N, k, d): each token's k weighted expert outputs
        for e in chosen.unique().tolist():  # each expert that some token chose, once, on all its tokens
            token, slot = torch.where(chosen == e)
            out[token, slot] = self.experts[e](x[token]) * weights[token, slot, None]
        return out.sum(1).view(B, T, d)  # summed in float32 and rounded once, as the reference does


def load_balancing_loss(router_logits, top_k, mask=None):
    """The auxiliary loss that keeps a mixture's experts evenly used (Switch Transformer), as the reference
    computes it: E * sum_e f_e P_e over all layers, f_e the share of tokens that chose expert e (among their k),
    P_e the mean router probability of e. It equals k when routing is even. mask (B, T): 0 for padding."""
    E, counts, probs_sum, rows = router_logits[0].shape[-1], 0, 0, 0
    w = mask.reshape(-1, 1).float() if mask is not None else router_logits[0].new_ones(len(router_logits[0]), 1).float()
    for logits in router_logits:
        probs = F.softmax(logits, dim=-1)  # in the logits' dtype (the router itself uses float32: same in f32)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, E).sum(1)  # (N, E), 0/1
        counts = counts + (chosen * w).sum(0)
        probs_sum = probs_sum + (probs.float() * w).sum(0)
        rows = rows + w.sum()
    return E * ((counts / rows) * (probs_sum / rows)).sum()


# -----------------------------------------------------------------------------------------------------------
# Gated DeltaNet: Olmo Hybrid's "linear_attention" layers, attention with a memory of fixed size
#
# Softmax attention keeps every past key and value and compares each query with all of them. Linear attention
# keeps one matrix per head instead, the state S (d_k, d_v), and reads it with the query: o = S^T q. Writing
# S += k v^T makes S^T q = sum over the past of v (k . q): attention without the softmax. The delta rule writes
# only what S does not already return for k, S += k (beta (v - S^T k))^T, with a write strength beta; and a
# learned gate first decays the whole memory, S *= exp(g), g <= 0. The state is the same size at token 10 and
# at token 100000, so memory per sequence and the cost of a decode step stay constant.


class GatedDeltaNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, K = config.hidden_size, config.linear_conv_kernel_dim
        self.n_k, self.n_v = config.linear_num_key_heads, config.linear_num_value_heads  # q/k heads, v/state heads
        self.d_k, self.d_v = config.linear_key_head_dim, config.linear_value_head_dim
        self.q_proj = nn.Linear(d, self.n_k * self.d_k, bias=False)
        self.k_proj = nn.Linear(d, self.n_k * self.d_k, bias=False)
        self.v_proj = nn.Linear(d, self.n_v * self.d_v, bias=False)
        # a short causal convolution along time on every channel of q, k and v (kernel K, no bias)
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (nn.Conv1d(c, c, K, groups=c, bias=False) for c in self.widths)
        self.a_proj = nn.Linear(d, self.n_v, bias=False)  # per head: how much to forget (through A_log and dt_bias)
        self.b_proj = nn.Linear(d, self.n_v, bias=False)  # per head: how strongly to write
        self.A_log = nn.Parameter(torch.zeros(self.n_v))
        self.dt_bias = nn.Parameter(torch.zeros(self.n_v))
        self.g_proj = nn.Linear(d, self.n_v * self.d_v, bias=False)  # the output gate
        self.o_norm = RMSNorm(self.d_v, 1e-5, rounds_first=True)  # per head, eps 1e-5 whatever the config says
        self.o_proj = nn.Linear(self.n_v * self.d_v, d, bias=False)
        self.beta_scale = 2.0 if config.linear_allow_neg_eigval else 1.0  # beta in (0, 2): S can also un-learn

    @property
    def widths(self):  # channels of q, k and v
        return self.n_k * self.d_k, self.n_k * self.d_k, self.n_v * self.d_v

    def forward(self, x, mask=None, state=None):
        """x (B, T, d); mask (B, T), 0 for left padding; state: this layer's GDNState in a KVCache."""
        B, T, _ = x.shape
        if mask is not None:  # a zero input writes nothing (k = 0) and feeds zeros to the convolution
            x = x * mask[:, :, None].to(x.dtype)
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1).transpose(1, 2)  # (B, C, T)
        w = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])  # (C, 1, K)
        K = w.shape[-1]
        past = state.conv if state is not None else qkv.new_zeros(B, qkv.shape[1], K - 1)  # inputs before these
        window = torch.cat([past, qkv], -1)  # (B, C, K - 1 + T)
        if state is not None:
            state.conv.copy_(window[:, :, -(K - 1):])
        qkv = F.silu(F.conv1d(window, w, groups=w.shape[0])).transpose(1, 2)  # (B, T, C): output t sees t-K+1..t
        q, k, v = qkv.split(self.widths, -1)
        beta = self.b_proj(x).sigmoid() * self.beta_scale  # (B, T, n_v), in the model dtype as the reference
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias)  # (B, T, n_v), log decay
        rep = self.n_v // self.n_k  # grouped heads: each q/k head serves rep state heads
        q = q.view(B, T, self.n_k, self.d_k).repeat_interleave(rep, 2)
        k = k.view(B, T, self.n_k, self.d_k).repeat_interleave(rep, 2)
        v = v.view(B, T, self.n_v, self.d_v)
        q, k, v, beta, g = (t.transpose(1, 2).float() for t in (q, k, v, beta, g))  # heads first, float32
        q, k = l2_normalize(q) * self.d_k ** -0.5, l2_normalize(k)  # (B, n_v, T, d_k)
        S = state.S if state is not None else q.new_zeros(B, self.n_v, self.d_k, self.d_v)
        o, S = (delta_rule_recurrent if T == 1 else delta_rule_chunked)(q, k, v, g, beta, S)
        if state is not None:
            state.S.copy_(S)
        o = o.transpose(1, 2).to(x.dtype)  # (B, T, n_v, d_v)
        gate = self.g_proj(x).view(B, T, self.n_v, self.d_v)
        o = (self.o_norm(o) * F.silu(gate.float())).to(x.dtype)  # normalised per head, then gated
        return self.o_proj(o.reshape(B, T, -1))


def l2_normalize(x, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def delta_rule_recurrent(q, k, v, g, beta, S):
    """The gated delta rule one token at a time, as defined: the decoding form. q, k (B, H, T, d_k) normalised,
    v (B, H, T, d_v), g and beta (B, H, T), all float32; S (B, H, d_k, d_v) the state before the first token.
    Returns the outputs (B, H, T, d_v) and the state after the last token."""
    out = []
    for t in range(q.shape[2]):
        S = S * g[:, :, t, None, None].exp()  # forget a little of everything
        k_t = k[:, :, t, :, None]  # (B, H, d_k, 1)
        recalled = (S * k_t).sum(-2)  # S^T k: what the memory returns for this key (B, H, d_v)
        delta = beta[:, :, t, None] * (v[:, :, t] - recalled)  # write only the correction...
        S = S + k_t * delta[:, :, None, :]  # ...at the key: S += k delta^T
        out.append((S * q[:, :, t, :, None]).sum(-2))  # o = S^T q
    return torch.stack(out, 2), S


def delta_rule_chunked(q, k, v, g, beta, S, C=64):
    """The same recurrence C tokens at a time: the prompt form, a few matrix products per chunk instead of C small
    steps. Within a chunk, token i's write is delta_i = beta_i (v_i - Gamma_i S0^T k_i - sum_{j<i} D_ij (k_i.k_j)
    delta_j), where S0 is the state at the chunk's start, Gamma_i the decay from the start to token i and D_ij from
    token j to i: a lower-triangular linear system in the deltas, solved once. Across chunks S is carried."""
    B, H, T, _ = q.shape
    pad = -T % C  # padded tokens (k = 0, beta = 0, g = 0) leave the state as it is
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n = (T + pad) // C
    q, k, v = (t.reshape(B, H, n, C, -1) for t in (q, k, v))
    g, beta = g.reshape(B, H, n, C), beta.reshape(B, H, n, C)
    G = g.cumsum(-1)  # log Gamma_i: the decay from the chunk's start to token i
    later = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)  # j > i: no influence
    D = (G[..., :, None] - G[..., None, :]).masked_fill(later, float("-inf")).exp()  # (B, H, n, C, C) D_ij
    kb = k * beta[..., None]
    A = (kb @ k.transpose(-1, -2)) * D  # (I + A) delta = ..., A strictly lower (the diagonal counts as 1)
    U = torch.linalg.solve_triangular(A, v * beta[..., None], upper=False, unitriangular=True)  # the deltas if S0 = 0
    W = torch.linalg.solve_triangular(A, kb * G.exp()[..., None], upper=False, unitriangular=True)  # ... minus W S0
    scores = (q @ k.transpose(-1, -2)) * D  # decayed causal attention within the chunk
    q_from_start = q * G.exp()[..., None]  # reads S0 decayed up to token i
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]  # writes decayed from token j to the chunk's end
    out = []
    for i in range(n):
        delta = U[:, :, i] - W[:, :, i] @ S  # (B, H, C, d_v)
        out.append(q_from_start[:, :, i] @ S + scores[:, :, i] @ delta)
        S = S * G[:, :, i, -1, None, None].exp() + k_to_end[:, :, i].transpose(-1, -2) @ delta
    return torch.stack(out, 2).reshape(B, H, n * C, -1)[:, :, :T], S


class GatedDeltaNetBlock(nn.Module):
    """An Olmo Hybrid layer of kind "linear_attention": Gated DeltaNet and an MLP, pre-norm, under the
    reference's names for its norms. The model hands it a mask of padding only: no positions, no RoPE."""

    def __init__(self, config):
        super().__init__()
        self.kind = "linear_attention"
        self.linear_attn = GatedDeltaNet(config)
        self.mlp = MLP(config)
        self.attention_layer_norm, self.feedforward_layer_norm = make_norm(config), make_norm(config)

    def forward(self, x, mask, state=None):
        x = x + self.linear_attn(self.attention_layer_norm(x), mask, state)
        return x + self.mlp(self.feedforward_layer_norm(x))


# -----------------------------------------------------------------------------------------------------------
# Presets: the shapes of the released checkpoints (OlmoConfig.from_name)

# What the releases of each family share: vocabulary, context, RoPE, norm epsilon (as their config.json files say),
# experts, and the tokenizer's end-of-text and padding ids (OLMo 1 and OLMoE: GPT-NeoX's; the rest: dolma2's)
NEOX, DOLMA2 = dict(eos_token_id=50279, pad_token_id=1), dict(eos_token_id=100257, pad_token_id=100277)
OLMO3_YARN = dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=8192, beta_fast=32, beta_slow=1,
                  attention_factor=1.2079441541679836)
FAMILIES = {
    "olmo": dict(vocab_size=50304, max_position_embeddings=2048, rope_theta=10000.0, **NEOX),
    "olmo2": dict(vocab_size=100352, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-6, **DOLMA2),
    "olmo3": dict(vocab_size=100278, max_position_embeddings=65536, rope_theta=500000.0, rms_norm_eps=1e-6,
                  sliding_window=4096, rope_scaling=OLMO3_YARN, **DOLMA2),
    "olmoe": dict(vocab_size=50304, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                  num_experts=64, num_experts_per_tok=8, **NEOX),
    "flex_olmo": dict(vocab_size=100352, max_position_embeddings=4096, rope_theta=500000.0, num_experts=7,
                      num_experts_per_tok=5, **DOLMA2),
    "olmo_hybrid": dict(vocab_size=100352, max_position_embeddings=65536, rope_theta=None, **DOLMA2),
}
PRESETS = {  # released checkpoints (allenai/<name>); instruct/think variants share their base's shape
    # name:                 family,       d, MLP width, layers, heads, KV heads, what else differs
    "OLMo-1B-hf":           ("olmo",      2048,  8192, 16, 16, 16, dict(tie_word_embeddings=True)),
    "OLMo-7B-hf":           ("olmo",      4096, 11008, 32, 32, 32, {}),
    "OLMo-7B-Twin-2T-hf":   ("olmo",      4096, 11008, 32, 32, 32, {}),
    "OLMo-7B-0424-hf":      ("olmo",      4096, 11008, 32, 32, 32, dict(max_position_embeddings=4096, clip_qkv=8.0)),
    "OLMo-7B-0724-hf":      ("olmo",      4096, 11008, 32, 32, 32, dict(max_position_embeddings=4096, clip_qkv=8.0)),
    "OLMo-2-0425-1B":       ("olmo2",     2048,  8192, 16, 16, 16, {}),
    "OLMo-2-1124-7B":       ("olmo2",     4096, 11008, 32, 32, 32, {}),
    "OLMo-2-1124-13B":      ("olmo2",     5120, 13824, 40, 40, 40, {}),
    "OLMo-2-0325-32B":      ("olmo2",     5120, 27648, 64, 40,  8, {}),
    "Olmo-3-1025-7B":       ("olmo3",     4096, 11008, 32, 32, 32, {}),
    "Olmo-3-1125-32B":      ("olmo3",     5120, 27648, 64, 40,  8, {}),
    # 64 experts of width 1024, 8 per token: 6.9B parameters, 1.3B of them used per token
    "OLMoE-1B-7B-0924":     ("olmoe",     2048,  1024, 16, 16, 16, {}),
    "OLMoE-1B-7B-0125":     ("olmoe",     2048,  1024, 16, 16, 16, {}),
    # OLMo-2-7B blocks whose MLP is 7 experts (the reference's defaults: 5 per token)
    "FlexOlmo-7x7B-1T":     ("flex_olmo", 4096, 11008, 32, 32, 32, {}),
    # 24 Gated DeltaNet layers (30 heads, d_k 96, d_v 192) and 8 attention layers without RoPE
    "Olmo-Hybrid-7B":       ("olmo_hybrid", 3840, 11008, 32, 30, 30, {}),
}


# -----------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of the tokens seen so far, allocated once so decoding allocates nothing per step.

    Full-attention layers keep every time step t in slot t. Sliding-window layers keep a ring of the last
    `sliding_window` steps in slot t % window, so their memory stays bounded however long the text.

    static=True is for CUDA graphs, which replay fixed kernels on fixed memory: every step attends over the whole
    buffers (the mask hides empty slots), so all decode steps have the same shapes, and positions count from a
    copy of the length on the device, which a replayed step advances itself.

    spare: ring slots beyond the window, so that rewind can step back over up to `spare` steps after a ring has
    wrapped (speculative decoding takes back the guesses the model rejected; the mask still sees only the window)."""

    def __init__(self, config, batch_size, max_len, kv_heads, device, dtype, static=False, spare=0):
        self.max_len, self.length, self.static = max_len, 0, static  # length: time steps stored so far
        self.device_length = torch.zeros((), dtype=torch.long, device=device) if static else None
        self.saved_length = None  # where snapshot() left the Gated DeltaNet states
        def layer(kind):
            if kind == "linear_attention":  # Gated DeltaNet: a state of fixed size instead of keys and values
                return GDNState(config, batch_size, device, dtype)
            window = config.sliding_window if kind == "sliding_attention" else None
            size = max_len if window is None else min(max_len, window + spare)
            return LayerKV(self, (batch_size, kv_heads, size, config.head_dim), device, dtype, window)
        self.layers = [layer(kind) for kind in config.layer_types]

    def check_room(self, T):
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.length} are in it and {T} more do not fit")

    def past(self):  # what the next step's time steps count from
        return self.device_length if self.static else self.length

    def snapshot(self):
        """Keep the Gated DeltaNet states as they are now, so that rewind can come back to this length: their state
        holds no past to step back through (speculative decoding snapshots before a step of guesses)."""
        for layer in self.layers:
            if isinstance(layer, GDNState):
                layer.save()
        self.saved_length = self.length

    def rewind(self, length):
        """Forget every time step from `length` on (a chat whose history renders differently from what was fed,
        guesses the model rejected); False where that cannot be done: a Gated DeltaNet state goes back only to
        the last snapshot, and a ring that has wrapped keeps only `spare` steps more than its window."""
        if length == self.length:
            return True
        gdn = [layer for layer in self.layers if isinstance(layer, GDNState)]
        kv = [layer for layer in self.layers if isinstance(layer, LayerKV)]
        if not 0 <= length < self.length or (gdn and length != self.saved_length) \
                or not all(layer.can_rewind(length) for layer in kv):
            return False
        for layer in gdn:
            layer.restore()
        self.length = length
        if self.static:
            self.device_length.fill_(length)
        return True

    def advance(self, T, on_device=True):
        """T more time steps are stored. on_device=False: a replayed CUDA graph advances the device copy itself."""
        self.length += T
        if self.static and on_device:
            self.device_length += T


class LayerKV:
    """One layer's part of a KVCache. Each layer gets its own object rather than an index into the cache, so
    that a compiled block is one graph for all layers (an index would be a constant baked into each graph)."""

    def __init__(self, cache, shape, device, dtype, window=None):
        self.cache, self.window = cache, window  # the shared length; a sliding layer's window
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (B, KV, S, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def can_rewind(self, length):
        """Does the ring still hold what a query at `length` sees, the steps length - window + 1 .. length - 1?
        It holds the last S steps before cache.length. The steps after `length` stay in their slots until
        overwritten, labelled by _slot_times as S steps earlier: outside the window too, under the same bound."""
        size = self.k.shape[2]
        return self.cache.length <= size or (self.window is not None
                                             and self.cache.length - length <= size - self.window + 1)

    def _wraps(self, T):  # would writing T tokens overwrite keys that this chunk's own queries need?
        return T > 1 and self.cache.length + T > self.k.shape[2]

    def key_times(self, T):
        """Time step of each key attended over in a step of T new tokens (-1: empty slot)."""
        size, past, dev = self.k.shape[2], self.cache.past(), self.k.device
        if self._wraps(T):  # old ring contents followed by the whole new chunk
            return torch.cat([self._slot_times(size, past, dev), past + torch.arange(T, device=dev)])
        times = self._slot_times(size, past + T, dev)
        return times if self.cache.static else times[: min(self.cache.length + T, size)]

    @staticmethod
    def _slot_times(size, L, device):  # after L steps, slot s holds the latest t < L with t % size == s
        s = torch.arange(size, device=device)
        return torch.where(s < L, s + (L - 1 - s).clamp(min=0) // size * size, -1)

    def update(self, k, v):
        """Store this step's k, v (B, KV, T, hd); return the keys and values to attend over."""
        K, V = self.k, self.v
        size, T = K.shape[2], k.shape[2]
        slots = (self.cache.past() + torch.arange(T, device=K.device)) % size
        wraps = self._wraps(T)
        if wraps:  # attend over the old ring and the whole chunk, taken before the write overwrites the ring
            keys, values = torch.cat([K, k], 2), torch.cat([V, v], 2)
        K.index_copy_(2, slots[-size:], k[:, :, -size:])  # a chunk longer than the ring keeps only its tail
        V.index_copy_(2, slots[-size:], v[:, :, -size:])
        if wraps:
            return keys, values
        if self.cache.static:  # all slots, every step: the same shapes
            return K, V
        n = min(self.cache.length + T, size)
        return K[:, :, :n], V[:, :, :n]


class GDNState:
    """One Gated DeltaNet layer's part of a KVCache: the last K-1 inputs of its convolution (model dtype) and its
    state S (float32, as the reference keeps it). Updated in place, so a CUDA graph can replay the updates."""

    def __init__(self, config, batch_size, device, dtype):
        c = config
        channels = (2 * c.linear_num_key_heads * c.linear_key_head_dim
                    + c.linear_num_value_heads * c.linear_value_head_dim)  # q, k and v
        self.conv = torch.zeros(batch_size, channels, c.linear_conv_kernel_dim - 1, device=device, dtype=dtype)
        self.S = torch.zeros(batch_size, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim,
                             device=device, dtype=torch.float32)
        self.saved = None  # (conv, S) at KVCache.snapshot, allocated at the first one: plain decoding never needs it

    def save(self):
        if self.saved is None:
            self.saved = self.conv.clone(), self.S.clone()
        else:
            self.saved[0].copy_(self.conv), self.saved[1].copy_(self.S)

    def restore(self):
        self.conv.copy_(self.saved[0]), self.S.copy_(self.saved[1])

# -----------------------------------------------------------------------------------------------------------
# Loading checkpoints. A folder holds config.json and weights in any layout the releases use: model.safetensors,
# shards listed in model.safetensors.index.json, pytorch_model.bin (or its shards). AI2's own formats (the original
# OLMo layout, OLMo-core training checkpoints) are translated to these names by ai2_checkpoints.py.


def load_model(name_or_folder, device=None, dtype=None, revision=None, attn_implementation=None):
    """An OlmoForCausalLM from a checkpoint folder or a Hugging Face Hub id (e.g. 'allenai/OLMo-2-0425-1B'), at a
    revision of the Hub repository if given (a branch such as 'stage1-step10000-tokens42B', a tag or a commit).
    dtype None keeps the checkpoint's. On a CPU, the linear layers get the CPU's fastest kernels (speed.py)."""
    folder = resolve_checkpoint(name_or_folder, revision)
    model = empty_model(read_config(folder, attn_implementation))
    load_checkpoint(model, folder, place_on(device, as_dtype(dtype)))
    if model.model.embed_tokens.weight.device.type == "cpu":
        speed.use_cpu_kernels(model)
    return model.eval()


def as_dtype(dtype):
    """A torch.dtype from itself or its name ("bfloat16", "torch.float32"); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or its name, e.g. 'bfloat16' or 'float32', got {dtype!r}")
    return found


def empty_model(config):
    """The model with parameters on the meta device, which hold no memory: load_checkpoint makes the checkpoint's
    tensors the parameters, so the weights are never held twice."""
    with torch.device("meta"):
        return OlmoForCausalLM(config)


def place_on(device=None, dtype=None):
    """load_checkpoint's `place` for one device: each tensor moved there in dtype (None: as stored), but for Gated
    DeltaNet's decay rates A_log, which the reference keeps in float32 whatever the model's dtype."""
    def place(name, t):
        keep = dtype is None or not t.is_floating_point() or name.endswith(".A_log")
        return t.to(device=device or "cpu", dtype=t.dtype if keep else dtype)
    return place


def load_checkpoint(model, folder, place, mapped=False):
    """Fill a model built on the meta device with the tensors of a checkpoint folder. place(name, tensor) -> the
    tensor as its parameter will hold it (a device and dtype, or under tensor parallelism a rank's share): called
    on each tensor, under its Hugging Face name, before the next is read, so the peak is one model plus one
    tensor. mapped: safetensors are mapped from the file rather than read (see read_safetensors)."""
    folder = Path(folder)
    files, source = checkpoint_files(folder)
    rename = lambda name, t: [(name, t)]
    if not hugging_face_layout(folder):
        import ai2_checkpoints  # AI2's names -> Hugging Face's

        rename = ai2_checkpoints.hf_names(folder, model.config, source)
    state = {}
    for file in files:
        for name, t in tensors_in(file, mapped):
            for hf_name, part in rename(name, t):
                state[hf_name] = place(hf_name, part)
    load_weights(model, state, source)


def tensors_in(file, mapped=False):
    """(name, tensor) for each tensor of a weights file, one at a time."""
    if file.suffix == ".safetensors":
        return safetensors_tensors(file, mapped)
    if file.name == ".metadata":  # OLMo-core's torch.distributed.checkpoint
        import ai2_checkpoints

        return ai2_checkpoints.dcp_tensors(file.parent)
    return read_torch_checkpoint(file).items()


def resolve_checkpoint(name_or_folder, revision=None):
    """A local folder as is (an OLMo-core stepN/model_and_optim/: its stepN/); otherwise a Hub id, at revision,
    downloaded into (or found in, offline too) the Hugging Face cache."""
    folder = Path(name_or_folder).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is a file; pass the checkpoint folder that holds config.json")
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for Hub ids; {folder} is a local folder")
        if (folder / ".metadata").is_file() and (folder.parent / "config.json").is_file():
            return folder.parent
        return folder
    name = str(name_or_folder)
    # a path, mistyped (a Hub id is owner/name, and its owner is not a folder here): say so, not "no network"
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or "\\" in name or folder.parent.is_dir():
        raise FileNotFoundError(f"no such checkpoint folder: {folder.resolve()} (nor is {name!r} a Hub id like "
                                "'allenai/OLMo-2-0425-1B')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{name!r} is not a local folder; downloading it from the Hugging Face Hub needs "
                          "`pip install huggingface_hub` (or pass a local checkpoint folder)") from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "config.yaml"]
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo or revision, gated repo: the Hub's own message says which
        at = f" at revision {revision!r}" if revision else ""
        raise OSError(f"could not download {name!r}{at} from the Hugging Face Hub ({type(e).__name__}: {e}). "
                      "Without a network, pass a local checkpoint folder instead.") from None


def read_config(folder, attn_implementation=None):
    """OlmoConfig from a checkpoint folder's config.json (or, translated, from AI2's formats)."""
    folder, path = Path(folder), Path(folder) / "config.json"
    d = read_json(path) if path.is_file() else {}
    if not hugging_face_layout(folder):
        import ai2_checkpoints

        translated = ai2_checkpoints.hf_config(folder)
        if translated is None and not path.is_file():
            raise FileNotFoundError(f"no config.json (or AI2 config.yaml) in {folder}")
        d, path = translated or (d, path)
    if attn_implementation is not None:
        d = d | dict(attn_implementation=attn_implementation)
    return OlmoConfig.from_dict(d, str(path))


def hugging_face_layout(folder):
    """Whether a folder's config.json is a Hugging Face OLMo config (else: AI2's formats, or not a checkpoint)."""
    path = Path(folder) / "config.json"
    return path.is_file() and read_json(path).get("model_type") in MODEL_TYPES + ("olmo_1124",)


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def checkpoint_files(folder):
    """The weight files of a checkpoint folder, in the first layout found, and a name for messages."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"{folder / index}: not a shard index ({e})") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder / index} lists shard(s) that are not in the folder: "
                                        f"{', '.join(missing)}")
            return [folder / s for s in shards], str(folder / index)
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model_and_optim/.metadata"):
        if (folder / name).is_file():
            return [folder / name], str(folder / name)
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json, "
                            "pytorch_model.bin(.index.json), model.pt or OLMo-core's model_and_optim/")


def read_torch_checkpoint(path):
    """{name: tensor} from a pickled PyTorch checkpoint, loading tensors only (no code). Not memory-mapped,
    for the reason in read_safetensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    return state.get("model", state) if isinstance(state, dict) else state


def load_weights(model, state, source):
    """Make checkpoint tensors (Hugging Face names, placed) the model's parameters, checking names and shapes."""
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.tie_word_embeddings
    if tied:
        state.pop("lm_head.weight", None)  # a tied checkpoint may or may not store the shared matrix twice
        expected.pop("lm_head.weight")
    hybrid_as_saved(state, expected)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    experts = {int(n.split(".")[5]) for n in state if re.match(r"model\.layers\.0\.mlp\.experts\.\d+\.", n)}
    if model.config.num_experts and experts and len(experts) != model.config.num_experts:
        raise ValueError(f"{source}: the checkpoint has {len(experts)} experts per layer (in layer 0), but the config "
                         f"says num_experts={model.config.num_experts}")
    if missing or unexpected:
        def listed(label, names):
            return f"\n  {label}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}" if names else ""
        raise ValueError(f"{source}: tensors do not match an {model.config.model_type} model of this config:"
                         + listed("missing", missing) + listed("unexpected", unexpected))
    for name, p in expected.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                             f"the config expects {tuple(p.shape)}")
    model.load_state_dict(state, assign=True, strict=not tied)
    if tied:  # assign=True replaced the embedding Parameter; point the head at it again
        model.lm_head.weight = model.model.embed_tokens.weight


def hybrid_as_saved(state, expected):
    """Olmo Hybrid as transformers 5.24's save_pretrained writes it, beside the Hub's layout (its loader undoes both):
    - it renames every post_attention_layernorm to feedforward_layer_norm, in the attention layers too, where the
      norm is the one after attention;
    - it splits a Gated DeltaNet layer's concatenated q/k/v convolution into three EQUAL parts (e.g. 19/19/18
      channels for widths 16/16/24) instead of at the q, k and v widths: glue them and split at the widths."""
    for name in [n for n in state if n.endswith(".feedforward_layer_norm.weight") and n not in expected]:
        state[name.replace("feedforward_layer_norm", "post_attention_layernorm")] = state.pop(name)
    for name in [n for n in state if n.endswith("linear_attn.q_conv1d.weight")]:
        names = [name.replace("q_conv1d", c) for c in ("q_conv1d", "k_conv1d", "v_conv1d")]
        if not all(n in state and n in expected for n in names):
            continue  # reported as missing or unexpected
        widths = [expected[n].shape[0] for n in names]
        parts = [state[n] for n in names]
        if [p.shape[0] for p in parts] != widths and sum(p.shape[0] for p in parts) == sum(widths):
            state.update(zip(names, torch.cat(parts).split(widths)))

def save_model(model, folder, tokenizer=None):
    """A Hugging Face checkpoint folder that olmo.py and transformers both load: config.json, model.safetensors,
    and with a tokenizer its tokenizer.json and the files beside it (tokenizer_config.json with its chat template,
    generation_config.json). A tied head is stored once, as the embedding."""
    if any(not p.is_floating_point() for p in model.parameters()) or any(hasattr(m, "packed") for m in model.modules()):
        raise ValueError("a quantized model is not saved: save the model it was quantized from (quantization is "
                         "applied when loading: generate.load_model(..., quantize=...))")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json(model.config), indent=2))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    write_safetensors(folder / "model.safetensors", state)
    if tokenizer is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            source = tokenizer.path if name == "tokenizer.json" else tokenizer.path.parent / name
            if source.is_file() and source.resolve() != (folder / name).resolve():
                (folder / name).write_bytes(source.read_bytes())


def config_json(config):
    """config.json's keys for a config, as transformers reads them."""
    keys = {k: v for k, v in dataclasses.asdict(config).items() if v is not None or k == "rope_theta"}  # null: NoPE
    architecture = {"olmo": "Olmo", "olmo2": "Olmo2", "olmo3": "Olmo3", "olmoe": "Olmoe", "flex_olmo": "FlexOlmo",
                    "olmo_hybrid": "OlmoHybrid"}[config.model_type]
    return keys | {"architectures": [architecture + "ForCausalLM"]}


# -----------------------------------------------------------------------------------------------------------
# The safetensors format, read (and written) without the safetensors package

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def write_safetensors(path, state):
    """{name: tensor} (contiguous, on the CPU) as a .safetensors file: the header, then each tensor's bytes."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in state.items():
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in state.values():
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def read_safetensors(path, mapped=False):
    """{name: tensor} of a .safetensors file (see safetensors_tensors)."""
    return dict(safetensors_tensors(path, mapped))


def safetensors_tensors(path, mapped=False):
    """(name, tensor) for each tensor of a .safetensors file, each read straight into its own memory when it is
    asked for: a loader that converts it before asking for the next holds one model plus one tensor at its peak.
    mapped: tensors are not read but mapped, each a read-only view of the file (writing to one crashes the
    process; a private writable mapping would be charged to memory, and one larger than the machine's is refused),
    whose pages come from the page cache when first touched. That costs no time and no memory of its own, but
    decoding from such pages was measured slower than from memory that was read (docs/speed.md), so only weights
    that are converted right away (quantized) are mapped.
    Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f, ThreadPoolExecutor(4) as pool:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
        header.pop("__metadata__", None)
        mapping = None
        for name, info in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0]):
            file_dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            if file_dtype is None:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info.get("data_offsets", (0, -1))
            shape = info.get("shape", [])
            nbytes = math.prod(shape) * file_dtype.itemsize
            if end - begin != nbytes or 8 + n + end > size:
                raise ValueError(f"{path}: tensor {name} needs bytes {begin}..{end} of the data (shape {shape}, "
                                 f"{info['dtype']}) but the file has {size - 8 - n}: truncated or corrupt")
            offset = 8 + n + begin
            if mapped and offset % file_dtype.itemsize == 0:
                if mapping is None:
                    with warnings.catch_warnings():  # torch warns that the buffer is read-only: so are the tensors
                        warnings.simplefilter("ignore")
                        mapping = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=torch.uint8)
                yield name, mapping[offset:offset + nbytes].view(file_dtype).view(shape)
            else:
                raw = torch.empty(nbytes, dtype=torch.uint8)
                # several threads reading 16 MiB pieces at once: one's page faults and copies overlap another's reads
                pieces = [(raw[i:i + (16 << 20)].numpy(), offset + i) for i in range(0, nbytes, 16 << 20)]
                list(pool.map(lambda p: os.preadv(f.fileno(), [p[0]], p[1]), pieces))
                yield name, raw.view(file_dtype).view(shape)


# -----------------------------------------------------------------------------------------------------------
# Tokenizer: the checkpoint's tokenizer.json (byte-level BPE) run by tiktoken

GPT2_PRETOKENIZE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode():
    """GPT-2's table that spells every byte as a printable character: tokenizer.json stores tokens in it.
    Printable Latin-1 bytes stand for themselves; the others (space, controls, ...) map to chr(256 + i)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}
    return table | {b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in table)}


class Tokenizer:
    """encode/decode with the same ids as the Hugging Face `tokenizers` library, for OLMo's tokenizer.json files.

    Byte-level BPE with ranks = token ids is exactly what tiktoken runs, given the file's pre-tokenizer regex.
    Two things happen before it, as in `tokenizers`: the text is normalized (NFC, for the NeoX tokenizer of
    OLMo 1), and added tokens (special tokens, and OLMo 1's runs of 2..24 spaces) are split out longest first."""

    def __init__(self, path, eos_token=None):
        import tiktoken  # imported here: `import olmo` stays quick for model-only use

        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            model, added = spec["model"], spec.get("added_tokens", [])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a tokenizer.json ({type(e).__name__}: {e})") from None
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: expected a byte-level BPE tokenizer, got model type {model.get('type')!r}")
        norm = (spec.get("normalizer") or {}).get("type")
        if norm not in (None, "NFC"):
            raise ValueError(f"{path}: unsupported normalizer {norm!r}")
        self.normalize = (lambda s: unicodedata.normalize("NFC", s)) if norm == "NFC" else (lambda s: s)
        pre = spec.get("pre_tokenizer") or {}
        splits = [p for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
        pattern = splits[0]["pattern"]["Regex"] if splits else GPT2_PRETOKENIZE

        self.added = {a["content"]: a["id"] for a in added}
        to_byte = {c: b for b, c in byte_to_unicode().items()}
        ranks = {bytes(to_byte[c] for c in tok): i for tok, i in model["vocab"].items() if tok not in self.added}
        self.enc = tiktoken.Encoding(name=path.stem, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.added)
        # leftmost-longest match of any added token, as the `tokenizers` library splits them out
        self.added_re = re.compile("|".join(map(re.escape, sorted(self.added, key=len, reverse=True))) or "(?!)")
        eos = eos_token or ("<|endoftext|>" if "<|endoftext|>" in self.added else None)
        self.eos_token_id = self.added.get(eos) if eos else None
        self.path = path  # save_model copies the file and what lies beside it

    def encode(self, text):
        text, ids, start = self.normalize(text), [], 0
        for m in self.added_re.finditer(text):
            ids += self.enc.encode_ordinary(text[start:m.start()]) + [self.added[m.group()]]
            start = m.end()
        return ids + self.enc.encode_ordinary(text[start:])

    def decode_bytes(self, ids):
        try:
            return self.enc.decode_bytes(ids)
        except KeyError:  # an id the file has no token for decodes to nothing, as in `tokenizers`: an embedding may
            # have more rows than its tokenizer has tokens (OLMo 2: 100352 for 100278), and a model may sample one
            return b"".join(self.enc.decode_bytes([i]) if i < self.enc.n_vocab else b"" for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def load_tokenizer(folder_or_file):
    """The Tokenizer of a checkpoint folder (its tokenizer.json, eos from tokenizer_config.json), of a file, or of a
    Hub id (resolve_checkpoint). An OLMo-core checkpoint has none: the tokenizer its config names (e.g.
    allenai/dolma2-tokenizer) is fetched from the Hub, or found in the Hugging Face cache."""
    path = Path(folder_or_file)
    if not path.exists():  # a Hub id
        path = resolve_checkpoint(folder_or_file)
    file = path / "tokenizer.json" if path.is_dir() else path
    if path.is_dir() and not file.is_file() and (path / "config.json").is_file():
        import ai2_checkpoints

        named = ai2_checkpoints.tokenizer_id(path)
        if named:
            try:
                file = resolve_checkpoint(named) / "tokenizer.json"
            except (OSError, ImportError) as e:
                raise OSError(f"{path} has no tokenizer.json, and the tokenizer its config.json names could not be "
                              f"loaded: {e} Pass a tokenizer folder or file (sample.py --tokenizer).") from None
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    eos = None
    if (file.parent / "tokenizer_config.json").is_file():
        eos = json.loads((file.parent / "tokenizer_config.json").read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    return Tokenizer(file, eos)
