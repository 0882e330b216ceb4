"""
Generating text with an OLMo model: loading it any way a user asks for (AI2's formats, quantized, split across
devices), the sampling rules, and the decoding loop. sample.py is the command line over this file.

    import generate
    model, tokenizer = generate.load("notebooks/tiny_olmo")
    print(generate.complete(model, tokenizer, "Return the", max_new_tokens=40))
"""

import codecs

import torch

import olmo
import speed


def load(name_or_folder, device=None, dtype=None, quantize=None, mesh=None, revision=None, tokenizer=None,
         attn_implementation=None):
    """(model, tokenizer) of a checkpoint folder or Hub id: load_model's model, and the checkpoint's tokenizer
    (or tokenizer: a folder, a tokenizer.json or a Hub id)."""
    folder = olmo.resolve_checkpoint(name_or_folder, revision)
    tok = olmo.load_tokenizer(tokenizer or folder)
    return load_model(folder, device, dtype, quantize, mesh, attn_implementation=attn_implementation), tok


def load_model(name_or_folder, device=None, dtype=None, quantize=None, mesh=None, revision=None,
               attn_implementation=None):
    """An OlmoForCausalLM from a checkpoint folder or Hub id (olmo.load_model), with its linear layers quantized
    ("int8", "int4" or "w8a8": quantize.py) or split across the ranks of a DeviceMesh (tp.py)."""
    if quantize is not None and mesh is not None:
        raise ValueError("quantization is not combined with tensor parallelism")
    folder, dtype = olmo.resolve_checkpoint(name_or_folder, revision), olmo.as_dtype(dtype)
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
             cuda_graph=False, cache=None, speculate=None):
    """Yield new token ids one at a time; stops after a stop id (which is yielded) or max_new_tokens.
    cuda_graph: replay the decode steps from a CUDA graph (see speed.cuda_graph_decoder). cache: a KVCache that
    holds what came before prompt_ids (a conversation's earlier turns); it holds every token fed when done.
    speculate: a speculate.py guesser (PromptLookup, DraftModel): several tokens per step, the same text."""
    if speculate is not None:
        if cuda_graph:
            raise ValueError("speculate: a CUDA graph replays one-token steps; leave out cuda_graph to speculate")
        yield from speculate.generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, stop_ids,
                                      generator, cache)
        return
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


def complete(model, tokenizer, prompt, max_new_tokens=200, temperature=0.0, top_k=None, top_p=None, seed=None,
             speculate=None):
    """The text that follows prompt: greedy (temperature 0), or sampled (seed: the same text each time); it ends at
    the end-of-text token or after max_new_tokens. speculate: see generate."""
    return "".join(stream(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, speculate))


def stream(model, tokenizer, prompt, max_new_tokens=200, temperature=0.0, top_k=None, top_p=None, seed=None,
           speculate=None):
    """complete()'s text in pieces as the tokens come. A UTF-8 character can span tokens: the incremental decoder
    holds its first bytes back until the rest arrives, so no piece ends in a broken character."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_token_id]  # no prompt: a new document, after an end of text
    if len(ids) >= model.config.max_position_embeddings:
        raise ValueError(f"the prompt is {len(ids)} tokens; the model's context holds "
                         f"{model.config.max_position_embeddings}")
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
    stops = {tokenizer.eos_token_id, model.config.eos_token_id} - {None}
    device = model.model.embed_tokens.weight.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in generate(model, ids, max_new_tokens, temperature, top_k, top_p, stops, generator,
                          speculate=speculate):
        if token not in stops:
            piece = utf8.decode(tokenizer.decode_bytes([token]))
            if piece:
                yield piece
    if rest := utf8.decode(b"", final=True):
        yield rest


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
