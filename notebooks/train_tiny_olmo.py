"""Train a tiny OLMo 2 on Python's documentation, one byte a token, with OLMo 2's recipe: the demo model of the
README's first command (notebooks/tiny_olmo) and the draft that guesses for it (notebooks/tiny_draft).

    python notebooks/train_tiny_olmo.py --preset demo --steps 1533 --out notebooks/tiny_olmo
    python notebooks/train_tiny_olmo.py --preset draft --steps 1500 --out notebooks/tiny_draft

made the committed ones (tens of minutes each on one CPU core; --minutes N instead takes as many steps as fit in N
minutes here). The same seed and steps give the same weights again, with the same Python (its documentation is the
text) and torch.

Notebook 6 trains the same way, and takes from here what both need: the text, the model's shape, OLMo 2's parameter
groups and learning-rate schedule, batches and bits per byte. It writes its own training loop, the one below.
The recipe, as AI2's OLMo 2 stage-1 configs set it: AdamW with betas (0.9, 0.95) and eps 1e-8, weight decay 0.1 on
every parameter but the embeddings (decay_embeddings: false, decay_norm_and_bias: true), gradients clipped to a norm
of 1.0, a linear warm-up and a cosine decay to a tenth of the peak learning rate.
"""

import argparse
import contextlib
import importlib
import io
import math
import pydoc
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # olmo.py lives one folder up
import generate  # noqa: E402
import olmo  # noqa: E402

# The standard library's documentation ships with Python: text to train on, offline. The modules at the end of the
# list (from numbers on, about 5% of the text) are held out; any Python >= 3.9 has them all (its version changes
# the text a little).
MODULES = """builtins os os.path sys json re collections collections.abc functools itertools operator pathlib shutil
glob fnmatch tempfile io subprocess threading queue asyncio concurrent.futures contextlib typing dataclasses enum abc
types copy reprlib unicodedata codecs struct datetime time zoneinfo math cmath decimal array weakref gc inspect
traceback warnings logging logging.handlers argparse getopt configparser sqlite3 pickle shelve zlib gzip bz2 lzma
zipfile tarfile hashlib hmac base64 binascii html html.parser xml.etree.ElementTree urllib.parse urllib.request
http.client http.server email email.message smtplib socket ssl select selectors signal mmap ctypes unittest
unittest.mock doctest timeit pdb cProfile profile tracemalloc importlib importlib.resources pkgutil zipimport sysconfig
platform locale gettext uuid ipaddress mimetypes webbrowser sched atexit keyword token tokenize ast dis graphlib
contextvars numbers random calendar secrets fractions bisect heapq statistics pprint string textwrap difflib shlex
csv""".split()
HELD_OUT = 0.05

# Model shapes. Every one is an OLMo 2 reading bytes: 256 of them and <|endoftext|> (id 256), a context of 256.
PRESETS = {
    "notebook": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),  # 0.9 M
    "demo": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6),  # 1.9 M
    "draft": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=3),  # 0.3 M
}
TOKENIZER = Path(__file__).resolve().parent / "tiny_olmo"  # its tokenizer files: a byte-level BPE with no merges


def python_docs(modules=MODULES):
    """pydoc's plain-text pages of the modules, one after another."""
    pages = []
    for name in modules:
        with contextlib.redirect_stdout(io.StringIO()):  # a module may print when imported
            pages.append(pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext))
    text = re.sub(r" at 0x[0-9a-f]+", "", "\n\n".join(pages))  # objects' memory addresses differ from run to run
    # os's page lists this machine's environment variables and sys's its paths: text about the machine, not Python
    text = re.sub(r"\n *environb? = environ\(.*", "", text)
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return "\n".join(line for line in text.split("\n") if not any(prefix in line for prefix in prefixes))


def train_and_held_out(text):
    """The text's UTF-8 bytes as token ids, split into what is trained on and the last HELD_OUT, never seen."""
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    split = int((1 - HELD_OUT) * len(data))
    return data[:split], data[split:]


def config(preset):
    shape = PRESETS[preset]
    return olmo.OlmoConfig(model_type="olmo2", vocab_size=257, max_position_embeddings=256, rope_theta=10000.0,
                           num_key_value_heads=shape["num_attention_heads"], eos_token_id=256, pad_token_id=256,
                           **shape)


def batch(data, T, B, generator=None):
    """B windows of T bytes at random places, and the byte after each byte: the targets."""
    i = torch.randint(len(data) - T - 1, (B,), generator=generator)
    x = torch.stack([data[j:j + T] for j in i])
    return x, torch.stack([data[j + 1:j + T + 1] for j in i])


def param_groups(model, weight_decay=0.1):
    """OLMo 2's two groups, as AI2's get_param_groups makes them with decay_embeddings false and decay_norm_and_bias
    true: the embedding table is not decayed, everything else is (the linear layers, the output layer, the norms)."""
    embeddings = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n not in embeddings], "weight_decay": weight_decay,
             "names": [n for n, _ in named if n not in embeddings]},
            {"params": [p for n, p in named if n in embeddings], "weight_decay": 0.0,
             "names": [n for n, _ in named if n in embeddings]}]


def adamw(model, peak_lr):
    return torch.optim.AdamW(param_groups(model), lr=peak_lr, betas=(0.9, 0.95), eps=1e-8)


def learning_rate(step, steps, peak_lr):
    """A linear warm-up over the first tenth of the steps, then a cosine from the peak down to a tenth of it."""
    warmup = max(1, steps // 10)
    return peak_lr * min(1, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


@torch.no_grad()
def bits_per_byte(model, data, T, windows=None, B=16):
    """The mean cross-entropy, in bits, of predicting each byte of data from the ones before it in its window of T.
    windows=None: every non-overlapping window (the held-out score); a number: that many, evenly spaced (the same
    ones every time, so that a curve's points compare)."""
    n = (len(data) - 1) // T
    starts = torch.arange(n) * T if windows is None else torch.linspace(0, len(data) - T - 1, windows).long()
    total = 0.0
    for chunk in starts.split(B):
        x = torch.stack([data[s:s + T] for s in chunk])
        y = torch.stack([data[s + 1:s + T + 1] for s in chunk])
        total += model(x, y)[1].item() * len(chunk)
    return total / len(starts) / math.log(2)


def save(model, folder):
    """A Hugging Face checkpoint folder (olmo.py's save_pretrained) with tiny_olmo's tokenizer files."""
    model.save_pretrained(folder, tokenizer=olmo.load_tokenizer(TOKENIZER))


def steps_in(minutes, model, T, B):
    """How many steps fit in `minutes`, from the time of a few forward and backward passes (no update)."""
    x, y = batch(torch.randint(256, (T + B + 1,)), T, B)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        model(x, y)[1].backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return max(1, int(minutes * 60 / (1.15 * min(times[1:]))))  # 15% for the optimizer and the evaluations


def train(model, data, held_out, steps, T, B, peak_lr, generator, log_every=100):
    """The loop notebook 6 writes out: batch, loss, backward, clip, step, with OLMo 2's groups and schedule."""
    opt = adamw(model, peak_lr)
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr)
        _, loss = model(*batch(data, T, B, generator))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            model.eval()
            score = bits_per_byte(model, held_out, T, windows=32)
            model.train()
            print(f"step {step:5d}/{steps}  lr {opt.param_groups[0]['lr']:.2e}  batch {loss.item() / math.log(2):.3f}"
                  f"  held out {score:.3f} bits per byte  {time.perf_counter() - t0:5.0f}s", flush=True)
    model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="demo", help="the model's shape (default: %(default)s)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps (default: 400)")
    length.add_argument("--minutes", type=float, help="as many steps as fit in this many minutes here, measured first")
    p.add_argument("--out", type=Path, help="checkpoint folder to write (default: none, nothing is saved)")
    p.add_argument("--seed", type=int, default=0, help="the initial weights and the batches (default: %(default)s)")
    p.add_argument("--context", type=int, default=256, help="bytes per training window (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="the peak learning rate (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads: on a busy machine a second one can make the steps "
                   "of a model this small many times slower (default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data, held_out = train_and_held_out(python_docs())
    model = olmo.OlmoForCausalLM(config(args.preset))
    n_params = sum(p.numel() for p in model.parameters())
    steps = args.steps or (steps_in(args.minutes, model, args.context, args.batch_size) if args.minutes else 400)
    print(f"{args.preset}: {n_params / 1e6:.2f} M parameters; {len(data) / 1e6:.2f} M bytes to train on, "
          f"{len(held_out) / 1e3:.0f} K held out; {steps} steps of {args.batch_size} x {args.context} bytes "
          f"(repeat with --steps {steps})", flush=True)
    t0 = time.perf_counter()
    train(model, data, held_out, steps, args.context, args.batch_size, args.lr,
          torch.Generator().manual_seed(args.seed))
    minutes = (time.perf_counter() - t0) / 60
    score = bits_per_byte(model, held_out, args.context)
    print(f"trained in {minutes:.1f} minutes; held out: {score:.3f} bits per byte (every window of {args.context})")
    if args.out:
        save(model, args.out)
        size = (args.out / "model.safetensors").stat().st_size
        print(f"saved {args.out}: model.safetensors {size / 1e6:.1f} MB")
    ids = list(b"Return the ")  # greedy: what `sample.py --temperature 0` writes
    new = [t for t in generate.generate(model, ids, 150, temperature=0) if t < 256]
    print(bytes(ids + new).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
