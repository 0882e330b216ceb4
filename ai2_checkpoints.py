"""
AI2's own checkpoint formats, translated to Hugging Face's: their configs become config.json dicts and their
tensors get Hugging Face names, so olmo.py's loader builds and fills the same model from them.

  AI2's original layout (allenai/OLMo, the trainer of OLMo 1 and 2): config.json of model_type "hf_olmo", or the
  trainer's config.yaml, with transformer.blocks.* tensors (also model.pt).
  OLMo-core (AI2's current trainer): stepN/config.json, the experiment's config ("model" is its TransformerConfig),
  and stepN/model_and_optim/: torch.distributed.checkpoint's layout, a pickled index (.metadata) and
  __{rank}_{n}.distcp files of torch.save'd tensors at byte offsets, each tensor in one chunk per rank that saved
  it, the model's and the optimizer's together. Its names are its own (blocks.0.attention.w_q).

Nothing here imports olmo.py, which imports this file when it meets one of these formats.
"""

import io
import json
import math
import pickle
import re
from pathlib import Path

import torch


def hf_config(folder):
    """The Hugging Face config.json dict of an AI2 checkpoint folder, and the file it was read from; None if the
    folder is in neither of AI2's formats."""
    path = Path(folder) / "config.json"
    if path.is_file():
        d = json.loads(path.read_text())
        if d.get("model_type") == "hf_olmo":
            return config_from_ai2(d, str(path)), str(path)
        if "model_type" not in d and isinstance(d.get("model"), dict) and "d_model" in d["model"]:
            return config_from_olmo_core(d, str(path)), str(path)
        return None
    path = Path(folder) / "config.yaml"
    if path.is_file():
        try:
            import yaml
        except ImportError:
            raise ImportError(f"reading AI2's {path} needs `pip install pyyaml`") from None
        return config_from_ai2(yaml.safe_load(path.read_text())["model"], str(path)), str(path)
    return None


def hf_names(folder, config, source):
    """A function (name, tensor) -> [(Hugging Face name, tensor), ...] for the tensors of this AI2 checkpoint, one
    tensor at a time, so the loader can place each before it reads the next."""
    path = Path(folder) / "config.json"
    experiment = json.loads(path.read_text()) if path.is_file() else {}
    if "model" in experiment and "model_type" not in experiment:  # OLMo-core
        layout = (experiment["model"]["block"].get("feed_forward_moe") or {}).get("name", "default")
        return lambda name, t: olmo_core_names(name, t, config, layout, source)
    return lambda name, t: ai2_names(name, t, config, source)


# -----------------------------------------------------------------------------------------------------------
# AI2's original layout (allenai/OLMo)


def config_from_ai2(c, source):
    """AI2's ModelConfig keys (allenai/OLMo trainer) as config.json keys. Only what was released is accepted."""
    refuse = {"alibi": True, "include_bias": True, "bias_for_layer_norm": True, "multi_query_attention": True,
              "scale_logits": True, "rope": False}
    bad = [f"{k}={c[k]}" for k, v in refuse.items() if k in c and c[k] == v]
    if c.get("block_type", "sequential") != "sequential":
        bad.append(f"block_type={c['block_type']}")
    olmo2 = bool(c.get("norm_after")) and bool(c.get("attention_layer_norm")) and c.get("layer_norm_type") == "rms"
    olmo1 = (not c.get("norm_after") and not c.get("attention_layer_norm")
             and c.get("layer_norm_type", "default") == "default" and not c.get("layer_norm_with_affine"))
    if not (olmo1 or olmo2):
        bad.append("a norm layout that is neither OLMo 1's nor OLMo 2's")
    if olmo2 and c.get("clip_qkv"):  # AI2's trainer clips before the QK-norm; only OLMoE clips beside one (after)
        bad.append(f"clip_qkv={c['clip_qkv']} with the QK-norm")
    if bad:
        raise ValueError(f"{source}: not a released OLMo architecture ({', '.join(bad)})")
    d, heads = c["d_model"], c["n_heads"]
    mlp = c.get("mlp_hidden_size") or c.get("mlp_ratio", 4) * d  # the fused up+gate width
    return dict(model_type="olmo2" if olmo2 else "olmo", vocab_size=c.get("embedding_size") or c["vocab_size"],
                hidden_size=d, intermediate_size=mlp // 2, num_hidden_layers=c["n_layers"], num_attention_heads=heads,
                num_key_value_heads=c.get("n_kv_heads") or heads, max_position_embeddings=c.get("max_sequence_length", 1024),
                rope_theta=c.get("rope_theta", 10000.0), rms_norm_eps=c.get("layer_norm_eps", 1e-5),
                clip_qkv=c.get("clip_qkv"), tie_word_embeddings=c.get("weight_tying", True),
                eos_token_id=c.get("eos_token_id"), pad_token_id=c.get("pad_token_id"))


AI2_RENAMES = {"attn_out": "self_attn.o_proj", "ff_out": "mlp.down_proj", "q_norm": "self_attn.q_norm",
               "k_norm": "self_attn.k_norm", "attn_norm": "post_attention_layernorm",
               "ff_norm": "post_feedforward_layernorm"}


def ai2_names(name, t, config, source):
    """An AI2 tensor under Hugging Face names. The fused projections are split by rows:
    att_proj = [q (d rows); k (KV*hd); v (KV*hd)], ff_proj = [up (I rows); gate (I)] (up FIRST: a swap still
    gives fluent-looking nonsense, not an error)."""
    parts = name.removeprefix("model.").split(".")
    if parts[0] != "transformer":
        raise ValueError(f"{source}: tensor {name} is not an AI2 OLMo tensor (expected transformer.*)")
    top = {"wte": "model.embed_tokens.weight", "ff_out": "lm_head.weight", "ln_f": "model.norm.weight"}
    if len(parts) == 3 and parts[1] in top:
        return [(top[parts[1]], t)]
    if parts[1] != "blocks" or len(parts) != 5:
        raise ValueError(f"{source}: unexpected AI2 tensor {name}")
    pre, kind = f"model.layers.{parts[2]}.", parts[3]
    if kind == "att_proj":
        kv = config.num_key_value_heads * config.head_dim
        q, k, v = t.split([config.hidden_size, kv, kv], dim=0)
        return [(pre + "self_attn.q_proj.weight", q), (pre + "self_attn.k_proj.weight", k),
                (pre + "self_attn.v_proj.weight", v)]
    if kind == "ff_proj":
        up, gate = t.chunk(2, dim=0)
        return [(pre + "mlp.up_proj.weight", up), (pre + "mlp.gate_proj.weight", gate)]
    if kind in AI2_RENAMES:
        return [(pre + AI2_RENAMES[kind] + "." + parts[4], t)]
    raise ValueError(f"{source}: unexpected AI2 tensor {name}")


# -----------------------------------------------------------------------------------------------------------
# OLMo-core: the config


def config_from_olmo_core(experiment, source):
    """config.json keys from an OLMo-core experiment config (its "model" a TransformerConfig as a dict). Only what
    olmo.py computes as OLMo-core does is accepted; anything else is named and refused."""
    c, n, d = experiment["model"], experiment["model"]["n_layers"], experiment["model"]["d_model"]
    if "name" not in c["block"] or c.get("block_pattern"):  # a dict of named blocks: a hybrid
        raise ValueError(f"{source}: blocks of several kinds (a hybrid model) are not supported from OLMo-core checkpoints")
    blocks = [(c.get("block_overrides") or {}).get(str(i)) or c["block"] for i in range(n)]
    mixers = [b.get("sequence_mixer") or b["attention"] for b in blocks]
    windows = [olmo_core_window(i, n, a["sliding_window"]) if a.get("sliding_window") else -1 for i, a in enumerate(mixers)]
    scalings = [(a.get("rope") or {}).get("scaling") for a in mixers]
    b, a = blocks[0], mixers[0]
    moe, ff, rope, eps = b.get("feed_forward_moe"), b.get("feed_forward"), a.get("rope") or {}, b["layer_norm"]["eps"]
    router = (moe or {}).get("router", {})
    full_scalings = {json.dumps(s) for s, w in zip(scalings, windows) if w == -1}
    refused = {  # what is refused: a reason each
        "layers of different shapes": len({shape_of_block(b, a) for b, a in zip(blocks, mixers)}) > 1,
        f"block {b['name']}": b["name"] not in ("reordered_norm", "moe_reordered_norm"),
        f"sequence mixer {a.get('name')}": a.get("type", "attention") != "attention" or a.get("name", "default") != "default",
        f"head_dim={a.get('head_dim')} (not d_model / n_heads)": a.get("head_dim") not in (None, d // a["n_heads"]),
        "attention without QK-norm": a.get("qk_norm") is None,
        # full_precision false: OLMo-core rotates and normalises in the model dtype, olmo.py in float32 (bfloat16 differs)
        f"rope {rope}": rope.get("name") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0
                        or bool(rope.get("no_global_rope")) or rope.get("full_precision") is False,
        "embedding norm or scale, or a head bias": bool(c.get("embedding_norm") or c.get("embed_scale")
                                                        or c["lm_head"].get("bias")),
        f"transformer {c.get('name')}": c.get("name", "default") not in ("default", "moe"),
        f"sliding windows of several sizes {set(windows) - {-1}}": len(set(windows) - {-1}) > 1,
        "rope scaling on sliding-window layers": any(s is not None for s, w in zip(scalings, windows) if w != -1),
        "different rope scalings on full layers": len(full_scalings) > 1,
    }
    for key in ("bias", "gate", "clip_qkv", "use_head_qk_norm", "scalable_softmax", "attention_sinks"):
        refused[f"attention {key}={a.get(key)}"] = bool(a.get(key))
    for norm in (b["layer_norm"], a.get("qk_norm") or {}, c["lm_head"]["layer_norm"]):
        refused[f"layer norm {norm}"] = (norm.get("name") not in ("rms", "fused_rms") or bool(norm.get("bias"))
                                         or norm.get("eps") != eps or norm.get("full_precision") is False)
    if moe:
        refused["shared or latent experts"] = bool(moe.get("shared_mlp") or moe.get("latent_moe"))
        refused[f"router {router}"] = (router.get("gating_function", "softmax") != "softmax"
                                       or router.get("normalize_expert_weights") not in (None, 1)
                                       or any(router.get(k) for k in ("bias_gamma", "uniform_expert_assignment",
                                                                      "random_expert_assignment")))
        refused["sliding windows or rope scaling with experts"] = windows.count(-1) != n or bool(scalings[0])
    else:
        refused[f"feed-forward {ff}"] = ff.get("activation", "silu") != "silu" or bool(ff.get("bias"))
    yarn = scalings[windows.index(-1)] if -1 in windows else None
    refused[f"rope scaling {yarn}"] = yarn is not None and not yarn.get("_CLASS_", "").endswith("YaRNRoPEScalingConfig")
    bad = sorted(reason for reason, refuse in refused.items() if refuse)
    if bad:
        raise ValueError(f"{source}: an OLMo-core model that olmo.py does not compute ({', '.join(bad)})")

    tokenizer = next(dicts_with_key(experiment, "eos_token_id"), {})
    keys = dict(vocab_size=c["vocab_size"], hidden_size=d, num_hidden_layers=n, num_attention_heads=a["n_heads"],
                num_key_value_heads=a.get("n_kv_heads") or a["n_heads"], rope_theta=float(rope["theta"]),
                rms_norm_eps=eps, tie_word_embeddings=c.get("tie_word_embeddings", False),
                eos_token_id=tokenizer.get("eos_token_id"), pad_token_id=tokenizer.get("pad_token_id"))
    if moe:
        return dict(model_type="flex_olmo", intermediate_size=moe["hidden_size"], num_experts=moe["num_experts"],
                    num_experts_per_tok=router["top_k"], norm_topk_prob=router.get("normalize_expert_weights") == 1, **keys)
    if yarn is None and windows.count(-1) == n:
        return dict(model_type="olmo2", intermediate_size=ff["hidden_size"], **keys)
    if yarn is not None:
        yarn = dict(rope_type="yarn", factor=yarn["factor"], original_max_position_embeddings=yarn["old_context_len"],
                    beta_fast=yarn["beta_fast"], beta_slow=yarn["beta_slow"],
                    attention_factor=0.1 * math.log(yarn["factor"]) + 1, olmo_core=True)  # its YaRN: see rope_frequencies
    return dict(model_type="olmo3", intermediate_size=ff["hidden_size"], sliding_window=max(windows), rope_scaling=yarn,
                layer_types=["full_attention" if w == -1 else "sliding_attention" for w in windows], **keys)


def olmo_core_window(i, n, sw):
    """Layer i's window (-1: full attention) by OLMo-core's rule: the pattern repeats after a first layer that is
    forced to full attention, and a last one too, unless told otherwise."""
    first, last = sw.get("force_full_attention_on_first_layer", True), sw.get("force_full_attention_on_last_layer", True)
    if first and i == 0 or last and i == n - 1:
        return -1
    return sw["pattern"][(i - first) % len(sw["pattern"])]


def shape_of_block(block, mixer):
    """A block's settings but for its window and rope scaling, which may differ between layers: as a string, so that
    layers of one shape compare equal."""
    mixer = {**mixer, "sliding_window": 0, "rope": {**(mixer.get("rope") or {}), "scaling": 0}}
    return json.dumps({**block, "sequence_mixer": mixer, "attention": 0}, sort_keys=True)


def dicts_with_key(tree, key):
    """The dicts within a JSON tree that hold key (the tokenizer's settings in an experiment config)."""
    if isinstance(tree, dict):
        yield from [tree] if key in tree else []
        for v in tree.values():
            yield from dicts_with_key(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from dicts_with_key(v, key)


def tokenizer_id(folder):
    """The Hub id of the tokenizer an OLMo-core experiment config names (e.g. allenai/dolma2-tokenizer), or None."""
    path = Path(folder) / "config.json"
    named = [t["identifier"] for t in dicts_with_key(json.loads(path.read_text()), "identifier") if "eos_token_id" in t]
    return named[0] if named else None


# -----------------------------------------------------------------------------------------------------------
# OLMo-core: the tensors

OLMO_CORE_NAMES = {"embeddings.weight": "model.embed_tokens.weight", "lm_head.norm.weight": "model.norm.weight",
                   "lm_head.w_out.weight": "lm_head.weight", "attention.w_q": "self_attn.q_proj",
                   "attention.w_k": "self_attn.k_proj", "attention.w_v": "self_attn.v_proj",
                   "attention.w_out": "self_attn.o_proj", "attention.q_norm": "self_attn.q_norm",
                   "attention.k_norm": "self_attn.k_norm", "attention_norm": "post_attention_layernorm",
                   "feed_forward_norm": "post_feedforward_layernorm", "feed_forward.w1": "mlp.gate_proj",
                   "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
                   "feed_forward_moe.router": "mlp.gate"}
EXPERT_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def olmo_core_names(name, t, config, layout, source):
    """An OLMo-core tensor under Hugging Face names. A mixture's router is one flat vector (E * d), and its experts
    are fused in one matrix each: the default experts' w1, w2, w3 are (E * d, h), (E * h, d), (E * d, h), used as
    x @ w; the dropless experts' all (E * h, d), used as x @ w1^T, x @ w3^T and x @ w2. Both are cut into the
    per-expert (out, in) matrices of nn.Linear."""
    E, d = config.num_experts, config.hidden_size
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|w[123])", name)
    if name in OLMO_CORE_NAMES:
        return [(OLMO_CORE_NAMES[name], t)]
    if m and m[2] == "feed_forward_moe.experts.mlp":
        w = t.view(E, -1, t.shape[-1])  # (E, d, h) default; (E, h, d) dropless
        if layout == "default" or m[3] == "w2":
            w = w.transpose(1, 2)
        return [(f"model.layers.{m[1]}.mlp.experts.{e}.{EXPERT_NAMES[m[3]]}.weight", w[e].contiguous()) for e in range(E)]
    if m and m[2] in OLMO_CORE_NAMES:
        return [(f"model.layers.{m[1]}.{OLMO_CORE_NAMES[m[2]]}.weight", t.view(E, d) if m[2].endswith("router") else t)]
    raise ValueError(f"{source}: unexpected OLMo-core tensor {name}")


# The classes a .metadata pickle is made of. Unpickling runs whatever a pickle names, so these alone are admitted,
# and none of them is imported: each becomes a plain record of its fields (torch.Size and dtypes are themselves).
DCP_RECORDS = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("olmo_core.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class PickledRecord:
    def __init__(self, *args):  # an enum's value
        self.state = args

    def __setstate__(self, state):  # a dataclass's fields (a dict), or TensorProperties' tuple
        self.state = state


def read_dcp_metadata(path):
    """The index of a torch.distributed.checkpoint folder: {name: (dtype, shape, [(chunk offsets, chunk shape,
    file, byte offset, byte length)])}, read by an unpickler that admits only DCP_RECORDS."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in DCP_RECORDS:
                return type(name, (PickledRecord,), {})
            if module == "torch" and isinstance(vars(torch).get(name), torch.dtype) or (module, name) == ("torch", "Size"):
                return getattr(torch, name)
            if (module, name) == ("torch.serialization", "_get_layout"):
                return str  # the layout's name: every saved tensor is strided
            raise pickle.UnpicklingError(f"{path} asks to load {module}.{name}, which a checkpoint index never "
                                         "needs: refused (a pickle can run code; this one is not trusted)")
    try:
        with open(path, "rb") as f:
            meta = Unpickler(f).load().state
        where = {(i.state["fqn"], tuple(i.state["offset"])): s.state for i, s in meta["storage_data"].items()
                 if i.state.get("offset") is not None}
        index = {}
        for name, entry in meta["state_dict_metadata"].items():
            if type(entry).__name__ != "TensorStorageMetadata":
                continue  # the optimizer's step counts, learning rates, ...
            props = entry.state["properties"].state
            chunks = [(tuple(c.state["offsets"]), tuple(c.state["sizes"]), where[name, tuple(c.state["offsets"])])
                      for c in entry.state["chunks"]]
            index[name] = (props["dtype"] if isinstance(props, dict) else props[0], tuple(entry.state["size"]),
                           [(o, z, w["relative_path"], w["offset"], w["length"]) for o, z, w in chunks])
    except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a torch.distributed.checkpoint index ({type(e).__name__}: {e})") from None
    return index


def dcp_tensors(folder, prefix="model."):
    """(name, tensor) for each tensor whose name starts with prefix (the model's "model."), glued from its chunks,
    one at a time; the bytes of other entries (the optimizer's, two or three times the model's) are never read."""
    folder = Path(folder)
    index = read_dcp_metadata(folder / ".metadata")
    files = {}
    try:
        for name, (dtype, shape, chunks) in index.items():
            if not name.startswith(prefix):
                continue
            t = torch.empty(shape, dtype=dtype)
            for offsets, sizes, file, start, length in chunks:
                if file not in files:
                    if not (folder / file).is_file():
                        raise FileNotFoundError(f"{folder}: {file}, which holds {name}, is missing")
                    files[file] = open(folder / file, "rb")
                files[file].seek(start)
                blob = files[file].read(length)
                if len(blob) != length:
                    raise ValueError(f"{folder / file}: truncated ({name} needs bytes {start}..{start + length})")
                chunk = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
                if tuple(chunk.shape) != sizes:
                    raise ValueError(f"{folder / file}: a chunk of {name} has shape {tuple(chunk.shape)}, the index says {sizes}")
                t[tuple(slice(o, o + z) for o, z in zip(offsets, sizes))] = chunk
            yield name.removeprefix(prefix), t
    finally:
        for f in files.values():
            f.close()
