"""
Generating text with an OLMo model: loading it any way a user asks for (AI2's formats, quantized, split across
devices), the sampling rules, and the decoding loop. sample.py is the command line over this file.

    import generate, olmo
    model = generate.load_model("notebooks/tiny_olmo")
    tokenizer = olmo.load_tokenizer("notebooks/tiny_olmo")
    ids = generate.generate(model, tokenizer.encode("Return the"), max_new_tokens=40)
    print(tokenizer.decode(list(ids)))
"""

import torch

import olmo
import speed


def load_model(name_or_folder, device=None, dtype=None, quantize=None, mesh=None, revision=None,
               attn_implementation=None):
    """An OlmoForCausalLM from a checkpoint folder or Hub id (olmo.load_model), with its linear layers quantized
    ("int8", "int4" or "w8a8": quantize.py) or split across the ranks of a DeviceMesh (tp.py)."""
    if quantize is not None and mesh is not None:
        raise ValueError("quantization is not combined with tensor parallelism")
    folder = olmo.resolve_checkpoint(name_or_folder, revision)
    if quantize is not None:
        import quantize as quantization

        model = quantization.load_quantized(folder, quantize, device, dtype)
    elif mesh is not None:
        import tp

        model = tp.load_split(folder, mesh, device, dtype)
    else:
        model = olmo.load_model(folder, device, dtype, attn_implementation=attn_implementation)
    speed.release_freed_memory()
    return model


# -----------------------------------------------------------------------------------------------------------
# Sampling: logits -> the next token


def sample_next(logits, temperature, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(filtered_probs(logits, temperature, top_k, top_p), 1, generator=generator)


def filtered_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> the probabilities (B, V) that sample_next draws from: temperature, then the filters."""
    logits = logits.float() / temperature
    if top_k is not None:  # drop everything below the k-th largest logit
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:  # keep the most likely tokens until their probability mass reaches top_p
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reached p (keeps >= 1)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


# -----------------------------------------------------------------------------------------------------------
# The decoding loop


def decode_step(model, cache):
    """A decode step, token ids (B, 1) -> next-token logits (B, 1, vocab), keys from the cache; with a static
    cache, replayed from a CUDA graph (speed.cuda_graph_decoder)."""
    if cache.static:
        return speed.cuda_graph_decoder(model, cache)
    return lambda token: model(token, cache=cache, last_only=True)[0]


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=(), generator=None,
             cuda_graph=False, cache=None):
    """Yield new token ids one at a time; stops after a stop id (which is yielded) or max_new_tokens.
    cuda_graph: replay the decode steps from a CUDA graph (see speed.cuda_graph_decoder). cache: a KVCache that
    holds what came before prompt_ids (a conversation's earlier turns); it holds every token fed when done."""
    device = model.model.embed_tokens.weight.device
    ids = torch.tensor([prompt_ids], device=device)
    if cache is None:
        cache = model.new_cache(1, len(prompt_ids) + max_new_tokens, static=cuda_graph)
    step = decode_step(model, cache)
    logits, _ = model(ids, cache=cache, last_only=True)  # prefill: the whole prompt in one pass
    for _ in range(max_new_tokens):
        next_id = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        token = next_id.item()  # the one host sync per step: we print the token now
        yield token
        if token in stop_ids:
            return
        logits = step(next_id)


def weights_read_per_token(model):
    """The weights that one decode step at batch 1 reads: every parameter but the embedding table (of which it
    reads one row; a tied head reads all of it), and of a mixture of experts only num_experts_per_tok experts per
    layer (here the first ones, standing in for the chosen ones, which have the same sizes). w8a8's weights are
    packed for fbgemm, outside the parameters: a shape-only int8 tensor stands for each."""
    k = model.config.num_experts_per_tok or 0
    unchosen = lambda name: ".experts." in name and int(name.split(".experts.")[1].split(".")[0]) >= k
    embedding = "model.embed_tokens.weight" if not model.config.tie_word_embeddings else None
    packed = [torch.empty(m.out_features, m.in_features, dtype=torch.int8, device="meta")
              for name, m in model.named_modules() if hasattr(m, "packed") and not unchosen(name)]
    return [p for name, p in model.named_parameters() if name != embedding and not unchosen(name)] + packed
