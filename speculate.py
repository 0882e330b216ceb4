"""
Speculative decoding: several tokens per read of the weights, and the same text. A decode step streams every
weight once to compute one row; where the products are memory-bound, a step over a few rows costs little more.
So: guess k tokens cheaply, feed the last token and the k guesses in one step, keep the longest prefix of guesses
the model agrees with, and take one token more from the model's own prediction after it.

    import generate, speculate
    model, tokenizer = generate.load("notebooks/tiny_olmo")
    print(generate.complete(model, tokenizer, "Return the", speculate=speculate.PromptLookup(k=4)))

Guesses come from prompt lookup (what followed the last n tokens where they occurred before; no second model) or
from a draft model (a smaller OLMo with the same token ids). Greedy decoding keeps the guesses that equal the
argmax, so the text is plain greedy decoding's; sampling keeps a guess with probability min(1, p/q) and otherwise
draws from max(0, p - q) normalised, which makes each token's distribution the model's own (Leviathan et al. 2023,
Chen et al. 2023). Rejected guesses are taken back from the KV cache (KVCache.rewind).
"""

import time

import torch

import generate

LOOKUP_N = 3  # prompt lookup matches the last 3 tokens (then 2, then 1) unless told otherwise
PROBE_EVERY = 16  # auto: after this many plain steps, one step of guesses again (the text may have changed)


class Speculator:
    """Checks k guesses per step against the model (generate); a subclass makes the guesses (guess) and takes back
    its own state for the guesses the model rejected (step_back).

    auto=True guesses only where it pays. A step over k + 1 rows costs from about one row's time (GPUs, memory-
    bound products) to twice that or more (CPUs whose kernels for a few rows are slow), and how many guesses are
    kept depends on the text. So both are measured as decoding goes: the seconds of a step with k guesses and of a
    plain step (moving averages), and the share of guesses kept. Each step guesses k tokens where the expected
    tokens per second beat a plain step's, and otherwise decodes plainly, trying guesses again every PROBE_EVERY
    steps. What it measured carries over to the next text (a conversation's next turn, the next sample)."""

    def __init__(self, k=4, auto=False):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k (the guesses per step) must be an int >= 1, got {k!r}")
        self.k, self.auto = k, auto
        self.seconds = {}  # auto: guesses per step (0 or k) -> a step's seconds, guessing included
        self.kept, self.offered = 1.0, 2.0  # auto: guesses kept of those made, decaying sums (a prior of 1 in 2)
        self.plain_steps = 0
        self.steps = self.tokens = 0  # the last text's model steps after the prompt, and the tokens they gave

    def choose(self, left):
        """How many guesses the next step makes, when `left` tokens remain to be generated."""
        k = min(self.k, left - 1)  # the step yields up to k + 1 tokens
        if not self.auto or not k:
            return k
        if self.k not in self.seconds or 0 not in self.seconds:  # measure both kinds of step first
            return k if self.k not in self.seconds else 0
        a = self.kept / self.offered  # the chance that a guess is kept
        tokens = sum(a ** i for i in range(self.k + 1))  # expected tokens per step: 1 + a + a^2 + ... + a^k
        if tokens / self.seconds[self.k] > 1 / self.seconds[0]:
            return k
        self.plain_steps += 1
        return k if self.plain_steps % PROBE_EVERY == 0 else 0

    def measured(self, k, seconds, kept):
        """auto: a step with k guesses took `seconds` and kept `kept` of them."""
        if k:
            self.kept, self.offered = 0.9 * self.kept + kept, 0.9 * self.offered + k
        if k in (0, self.k):  # not the shorter steps at the end of a text, or of a short lookup
            old = self.seconds.get(k)
            self.seconds[k] = seconds if old is None else 0.7 * old + 0.3 * seconds

    def new_cache(self, model, max_len):
        """model.new_cache(1, max_len) whose sliding-window rings can step back over a step's rejected guesses. A
        step feeds at most 2k + 1 tokens (k + 1 a Gated DeltaNet state stepped back over, k guesses); a cache with
        Gated DeltaNet layers goes back over all of them, one without over the k guesses."""
        return model.new_cache(1, max_len, spare=self.spare)

    @property
    def spare(self):  # ring slots beyond the window that new_cache gives and check_cache asks for
        return 2 * self.k + 1

    def check_cache(self, cache):
        for layer in cache.layers:
            if getattr(layer, "window", None) and layer.k.shape[2] < min(cache.max_len, layer.window + self.spare):
                raise ValueError("cache: its sliding-window rings keep no room to take back rejected guesses; make "
                                 "it with speculator.new_cache(model, max_len)")

    def start(self, model, prompt_ids, max_len):
        """A new text begins (prompt_ids); its tokens will number at most max_len."""

    def guess(self, seq, k, temperature, top_k, top_p, generator):
        """Up to k tokens that may follow seq (a list of ids), and the probabilities (k, vocab) they were drawn
        from, or None where the guesses are certain (a point mass: prompt lookup, or a greedy draft)."""
        raise NotImplementedError

    def step_back(self, seq_len, accepted):
        """The model kept `accepted` of the guesses made after seq_len tokens."""

    @torch.inference_mode()
    def generate(self, model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=(),
                 generator=None, cache=None):
        """generate.generate's tokens, yielded one at a time, several computed per step. cache: a KVCache (from
        new_cache) holding what came before prompt_ids; it holds every token fed when done, as with plain decoding.
        The guesses see only prompt_ids and what follows."""
        device = model.model.embed_tokens.weight.device
        if cache is None:
            cache = self.new_cache(model, len(prompt_ids) + max_new_tokens)
        self.check_cache(cache)
        self.start(model, prompt_ids, len(prompt_ids) + max_new_tokens + self.k)
        before, seq = cache.length, list(prompt_ids)  # the cache holds before + a prefix of seq
        self.steps = self.tokens = 0
        logits, _ = model(torch.tensor([seq], device=device), cache=cache, last_only=True)  # prefill
        if not max_new_tokens:
            return
        token = generate.sample_next(logits[:, -1], temperature, top_k, top_p, generator).item()
        seq.append(token)
        yield token
        left = max_new_tokens - 1
        while left and token not in stop_ids:
            t0, k = time.perf_counter(), self.choose(left)
            guesses, q = self.guess(seq, k, temperature, top_k, top_p, generator) if k else ([], None)
            start = cache.length
            pending = seq[start - before:]  # the last token, and more where a Gated DeltaNet state stepped back
            cache.snapshot()
            logits, _ = model(torch.tensor([pending + guesses], device=device), cache=cache)
            new = verify(logits[0, len(pending) - 1:], guesses, q, temperature, top_k, top_p, generator)
            stop = next((i for i, t in enumerate(new) if t in stop_ids), None)
            new = new if stop is None else new[:stop + 1]
            # as plain decoding: every token but the last is fed; a Gated DeltaNet state goes back to the step's
            # start instead, and the next step feeds the kept tokens again
            if not cache.rewind(start + len(pending) + len(new) - 1) and not cache.rewind(start):
                raise RuntimeError("the KV cache cannot take back the rejected guesses")  # new_cache makes room
            self.step_back(len(seq), len(new) - 1)
            self.measured(len(guesses), time.perf_counter() - t0, len(new) - 1)  # verify synced with the device
            seq += new
            left -= len(new)
            self.steps, self.tokens = self.steps + 1, self.tokens + len(new)
            token = new[-1]
            if (not left or token in stop_ids) and cache.length < before + len(seq) - 1:  # the end: catch up
                model(torch.tensor([seq[cache.length - before:-1]], device=device), cache=cache, last_only=True)
            yield from new


def verify(logits, guesses, q, temperature, top_k, top_p, generator):
    """logits (k + 1, vocab): the model's next-token logits after the last known token and after each of the k
    guesses; q (k, vocab): the probabilities the guesses were drawn from, None for certain guesses. Returns the
    guesses kept and one token more (the model's own, where it rejected a guess or after the last)."""
    if temperature == 0:  # keep the guesses that equal the argmax; then the argmax after the last one kept
        best = logits.argmax(-1).tolist()
        a = 0
        while a < len(guesses) and guesses[a] == best[a]:
            a += 1
        return guesses[:a] + [best[a]]
    p = generate.filtered_probs(logits, temperature, top_k, top_p)  # (k + 1, vocab), as sample_next draws
    g = torch.tensor(guesses, device=p.device, dtype=torch.long)
    if q is None:  # a certain guess: q is the point mass at it
        q = torch.zeros_like(p[:-1]).scatter_(-1, g[:, None], 1.0)
    u = torch.rand(len(guesses), generator=generator, device=p.device)
    a = int((u < acceptance(p[:-1], q, g)).cumprod(0).sum()) if guesses else 0  # the first rejection ends it
    rest = residual(p[a], q[a]) if a < len(guesses) else p[a]
    return guesses[:a] + [torch.multinomial(rest, 1, generator=generator).item()]


def acceptance(p, q, guesses):
    """The probability of keeping each guess, min(1, p(g) / q(g)); p, q (k, vocab), guesses (k,)."""
    pick = lambda probs: probs.gather(-1, guesses[:, None])[:, 0]
    return (pick(p) / pick(q)).clamp(max=1)


def residual(p, q):
    """What a rejected guess is replaced with: max(0, p - q), normalised (vocab,). Where p == q nothing is ever
    rejected; then p itself keeps the division finite."""
    r = (p - q).clamp(min=0)
    total = r.sum()
    return r / total if total > 0 else p


class PromptLookup(Speculator):
    """Guesses what followed the last n tokens (or fewer, down to 1) where they occurred before in the text: code,
    quotes, names and lists repeat. Costs no model step; most useful where the output copies from the prompt."""

    def __init__(self, k=4, n=LOOKUP_N, auto=False):
        super().__init__(k, auto)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (the tokens matched) must be an int >= 1, got {n!r}")
        self.n = n

    def guess(self, seq, k, temperature, top_k, top_p, generator):
        for n in range(min(self.n, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            for i in range(len(seq) - n - 1, -1, -1):  # the latest earlier occurrence
                if seq[i + n - 1] == tail[-1] and seq[i:i + n] == tail:
                    return seq[i + n:i + n + k], None
        return [], None


class DraftModel(Speculator):
    """Guesses from a draft model: any OLMo checkpoint with the model's token ids, smaller so that its k steps cost
    less than the model's steps they save. It samples as the model does (temperature, top_k, top_p), with a KV cache
    of its own."""

    def __init__(self, draft, k=4, auto=False):
        super().__init__(k, auto)
        self.draft, self.cache = draft, None

    def start(self, model, prompt_ids, max_len):
        if self.draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"draft: its vocabulary has {self.draft.config.vocab_size} ids and the model's "
                             f"{model.config.vocab_size}; a draft must use the model's token ids (a checkpoint with "
                             "the same tokenizer)")
        self.cache = self.new_cache(self.draft, max_len)

    def guess(self, seq, k, temperature, top_k, top_p, generator):
        device = self.draft.model.embed_tokens.weight.device
        step = lambda ids: self.draft(torch.tensor([ids], device=device), cache=self.cache, last_only=True)[0][:, -1]
        logits = step(seq[self.cache.length:])  # what the draft has not seen yet
        self.cache.snapshot()
        guesses, qs = [], []
        for i in range(k):
            if temperature == 0:
                guesses.append(logits.argmax(-1).item())
            else:
                qs.append(generate.filtered_probs(logits, temperature, top_k, top_p)[0])
                guesses.append(torch.multinomial(qs[-1], 1, generator=generator).item())
            if i < k - 1:
                logits = step([guesses[-1]])
        return guesses, torch.stack(qs) if qs else None

    def step_back(self, seq_len, accepted):
        """The draft fed seq and the guesses but the last (none where it made none): it keeps the accepted ones."""
        keep = min(self.cache.length, seq_len + accepted)
        if not self.cache.rewind(keep) and not self.cache.rewind(seq_len):
            raise RuntimeError("the draft's KV cache cannot take back the rejected guesses")


def same_token_ids(tokenizer, other):
    """Do two olmo.Tokenizers give every id the same token? (A draft must: its guesses are ids of the model's.)"""
    n = tokenizer.enc.n_vocab
    return (tokenizer.added == other.added and other.enc.n_vocab == n
            and all(tokenizer.decode_bytes([i]) == other.decode_bytes([i]) for i in range(n)))
