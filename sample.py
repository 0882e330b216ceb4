"""
Generate text with an OLMo checkpoint.

    python sample.py --model allenai/OLMo-2-0425-1B --prompt "Language models are"
    python sample.py --model path/to/checkpoint --prompt - --temperature 0 < prompt.txt
    python sample.py --model allenai/Olmo-3-1025-7B-Instruct --chat --prompt "Who are you?"
    torchrun --nproc-per-node 2 sample.py --model allenai/OLMo-2-0325-32B --prompt "..."   # tensor parallel
"""

import argparse
import codecs
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

import generate
import olmo
import speculate
import speed


EXIT_STATUS = """exit status:
  0    done
  1    the command cannot be carried out (one line on stderr): no such checkpoint,
       tokenizer or prompt file, no such device here, no chat template, a prompt
       that fills the model's context, ...
  2    the command line is malformed (with the usage): an unknown option, a
       missing or invalid value, --prompt with --prompt-file, ...
  130  interrupted by Ctrl-C (in a conversation, Ctrl-C stops only the reply)"""


def parse_args(argv=None):
    """The parser and its arguments; a malformed command line exits here (status 2, with the usage)."""
    p = argparse.ArgumentParser(description="Generate text with an OLMo checkpoint (olmo.py).", epilog=EXIT_STATUS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # the epilog's lines as written
    p.add_argument("--model", help=f"checkpoint folder or Hugging Face Hub id (default: {DEFAULT_MODEL}, from the "
                   f"Hugging Face cache or the Hub; where neither can be had, the demo model {DEMO_MODEL_NAME})")
    p.add_argument("--revision", help="with a Hub id: a branch (e.g. an intermediate checkpoint such as "
                   "stage1-step10000-tokens42B), tag or commit (default: main)")
    p.add_argument("--tokenizer", help="tokenizer folder, tokenizer.json file or Hub id (default: the checkpoint's, "
                   "or for an OLMo-core checkpoint the one its config names)")
    source = p.add_mutually_exclusive_group()  # two prompts: which one was meant?
    source.add_argument("--prompt", help="the prompt text; '-' reads it from stdin; empty: start a new document; "
                                         "with --chat and neither --prompt nor --prompt-file: a conversation, one "
                                         "message per line (default: empty)")
    source.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="the most tokens to generate, fewer where the model's context ends first "
                        "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0 means greedy (always the most likely token) (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches p (default: 1, all)")
    p.add_argument("--seed", type=int, default=None,
                   help="the random seed, for repeatable samples (default: a fresh one each run)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="samples of the prompt, one after another (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 (float16 on mps) (default: %(default)s)")
    p.add_argument("--quantize", choices=["int8", "int4", "w8a8"],
                   help="store the linear layers' weights in 8 or 4 bits (int4: CPU only): less memory, faster decoding; "
                        "w8a8: int8 weights and inputs rounded to 7 bits too, integer products (x86 CPUs): faster "
                        "still, less exact (default: the checkpoint's weights as they are)")
    p.add_argument("--chat", action="store_true",
                   help="talk with an instruct model through its chat template: one reply to --prompt, or, without "
                        "--prompt, a conversation (/reset, /system TEXT, /quit; Ctrl-C stops a reply, Ctrl-D quits)")
    p.add_argument("--system", help="with --chat: the system message (default: the template's own)")
    p.add_argument("--max-context", type=int, default=4096,
                   help="a conversation's length limit in tokens (at most the model's context), which sizes its cache "
                        "(default: %(default)s)")
    p.add_argument("--speculate", type=speculation, default=0, metavar="K",
                   help="guess K tokens per step and check them all in one step of the model: the same text (greedy) "
                        f"or the same distribution (sampling), fewer steps where the guesses hit; auto: up to "
                        f"{AUTO_K}, only where measured to be faster here (default: 0, off)")
    p.add_argument("--lookup", type=int, metavar="N",
                   help=f"with --speculate: guess what followed the last N tokens where they occurred before in the "
                        f"text (prompt lookup) (default: {speculate.LOOKUP_N})")
    p.add_argument("--draft-model", metavar="PATH",
                   help="with --speculate: guess with this checkpoint (folder or Hub id) instead, a smaller OLMo with "
                        "the same tokenizer; loaded as --model is (--device, --dtype, --quantize)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks and, on a GPU, replay decode steps as a CUDA graph "
                        "(no gain on a CPU, where compiling takes a while)")
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.max_new_tokens < 1 or args.num_samples < 1 or args.max_context < 2:
        p.error("--max-new-tokens and --num-samples must be >= 1, --max-context >= 2")
    if args.system is not None and not args.chat:
        p.error("--system needs --chat")
    if args.lookup is not None and args.lookup < 1:
        p.error(f"--lookup must be >= 1, got {args.lookup}")
    if not args.speculate and (args.lookup is not None or args.draft_model):
        p.error("--lookup and --draft-model choose --speculate's guesses: give --speculate K too")
    if args.lookup is not None and args.draft_model:
        p.error("--lookup (prompt lookup) and --draft-model are two ways to guess: give one")
    args.conversation = args.chat and args.prompt is None and args.prompt_file is None  # messages from stdin
    try:
        args.device = parse_device(args.device)
    except ValueError as e:
        p.error(f"--device {args.device}: {e}")
    args.dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.float16 if args.device.type == "mps" else torch.bfloat16)
    return p, args


AUTO_K = 4  # --speculate auto's guesses per step


def speculation(value):
    """--speculate's value: 'auto' or K >= 0."""
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        k = -1
    if k < 0:
        raise argparse.ArgumentTypeError(f"expected auto or a number of guesses >= 0 (0: off), got {value!r}")
    return k


def read_prompt(args):
    """The prompt text: --prompt's, stdin's (--prompt -), --prompt-file's, or empty."""
    if args.prompt_file:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise OSError(f"--prompt-file: {e}") from None
    if args.prompt == "-":
        return sys.stdin.read()
    return args.prompt or ""


def parse_device(name):
    """The torch.device that --device names (auto: cuda, then mps, then cpu); ValueError for a name that is none."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # an unknown device type
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
    return device


def check_device(device):
    """ValueError where this machine lacks the device (a well-formed name, unlike parse_device's errors)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"this machine has {torch.cuda.device_count()} CUDA device(s), from cuda:0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("MPS is not available on this machine")
    return device


def pick_device(name):
    """parse_device, then check_device (bench.py)."""
    return check_device(parse_device(name))


def setup_tensor_parallel(device):
    """Under torchrun (WORLD_SIZE > 1): one process per device, each holding a slice of every block.
    Returns the DeviceMesh (None when alone) and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None, device
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return init_device_mesh(device.type, (world,)), device  # the process group: nccl on GPUs, gloo on CPUs


# ---- chat template -------------------------------------------------------------------------------------------


def chat_template(folder):
    """The checkpoint's chat template (chat_template.jinja, or tokenizer_config.json's chat_template)
    and the special tokens it may refer to (bos_token, eos_token, ...)."""
    config = folder / "tokenizer_config.json"
    config = json.loads(config.read_text()) if config.is_file() else {}
    specials = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items()
                if k.endswith("_token") and isinstance(v, (str, dict))}
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(), specials
    return config.get("chat_template"), specials


def render_chat(template, specials, messages):
    """A conversation ({"role", "content"} dicts) as the model reads it, ready for the assistant's next reply;
    rendered as transformers' apply_chat_template(messages, add_generation_prompt=True) does."""
    from jinja2.ext import loopcontrols  # jinja2 comes with torch
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **specials)


def stop_tokens(folder, config, tokenizer, chat):
    """End-of-text ids from the tokenizer, config.json and generation_config.json; with --chat, the
    template's end-of-turn token too (ChatML's <|im_end|>; Tulu ends a turn with <|endoftext|>)."""
    ids = {tokenizer.eos_token_id, config.eos_token_id}
    if (folder / "generation_config.json").is_file():
        eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    if chat and "<|im_end|>" in tokenizer.added:
        ids.add(tokenizer.added["<|im_end|>"])
    return ids - {None}


# ---- main ----------------------------------------------------------------------------------------------------


def fail(parser, message):
    """A command that cannot be carried out: one line on stderr (the command line itself is well formed: no usage),
    and its exit status, 1."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 1


DEFAULT_MODEL = "allenai/OLMo-2-0425-1B"
DEMO_MODEL = Path(__file__).resolve().parent / "notebooks" / "tiny_olmo"  # trained by notebooks/train_tiny_olmo.py
DEMO_MODEL_NAME = "notebooks/tiny_olmo"


def resolve_model(args):
    """--model's checkpoint folder. Without --model: the released OLMo 2 1B, from the Hugging Face cache or the Hub;
    where it cannot be had (offline with nothing cached, or no huggingface_hub), the demo model in this repository,
    with one line saying so, so that `python sample.py` runs anywhere."""
    if args.model is not None or args.revision is not None:
        return olmo.resolve_checkpoint(args.model or DEFAULT_MODEL, args.revision)
    try:
        folder, args.model = olmo.resolve_checkpoint(DEFAULT_MODEL), DEFAULT_MODEL  # args.model: what "loaded" names
        return folder
    except (OSError, ImportError) as e:
        why = ("huggingface_hub is not installed" if isinstance(e, ImportError)
               else "it is not cached and the Hub is out of reach")
        print(f"({DEFAULT_MODEL}: {why}; running the small demo model {DEMO_MODEL_NAME} instead. For the real one: "
              f"pip install huggingface_hub, then online once: python sample.py --model {DEFAULT_MODEL})",
              file=sys.stderr)
        args.model = DEMO_MODEL_NAME
        return DEMO_MODEL


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        check_device(args.device)
    except ValueError as e:
        return fail(parser, f"--device {args.device}: {e}")
    mesh, args.device = setup_tensor_parallel(args.device)
    if mesh is not None:
        if mesh.get_rank() != 0:  # every rank computes, rank 0 alone prints
            sys.stdout = open(os.devnull, "w")
            sys.stderr = open(os.devnull, "w")
        if args.seed is None:  # the ranks must sample the same tokens: one seed for all
            seed = [torch.seed() % 2**31]
            torch.distributed.broadcast_object_list(seed, src=0)
            args.seed = seed[0]
    try:
        prompt = read_prompt(args)  # before loading: a missing file should not wait for a large checkpoint
        folder = resolve_model(args)
        tokenizer_path = args.tokenizer or folder
        try:
            tokenizer = olmo.load_tokenizer(tokenizer_path)
        except (OSError, ImportError) as e:
            if not args.tokenizer:
                raise
            raise type(e)(f"--tokenizer {args.tokenizer}: {e}") from None
        template, specials = chat_template(folder) if args.chat else (None, {})
        if args.chat and not template:  # before loading the weights, which can take minutes
            raise ValueError(f"--chat: {folder} has no chat template (chat_template.jinja, or chat_template in "
                             "tokenizer_config.json): pass an instruct checkpoint, or leave out --chat")
        t0 = time.perf_counter()
        model = generate.load_model(folder, device=args.device, dtype=args.dtype, quantize=args.quantize, mesh=mesh)
        speculator = load_speculator(args, model, tokenizer, mesh)
        speed.keep_freed_memory()
        load_s = time.perf_counter() - t0
        if args.compile:
            speed.compile_blocks(model)
    except (OSError, ValueError, ImportError) as e:
        return fail(parser, e)
    stops = stop_tokens(folder, model.config, tokenizer, args.chat)
    generator = torch.Generator(args.device).manual_seed(args.seed) if args.seed is not None else None
    quantized = f", {args.quantize} weights" if args.quantize else ""
    print(f"loaded {args.model} ({model.config.model_type}, {args.dtype}{quantized}, {args.device}) in {load_s:.1f}s",
          file=sys.stderr)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.conversation:
        return converse(model, tokenizer, template, specials, args.system, args.max_context, args.max_new_tokens,
                        sampling, stops, generator, speculator=speculator)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    text = render_chat(template, specials, system + [{"role": "user", "content": prompt}]) if args.chat else prompt
    prompt_ids = tokenizer.encode(text)
    if not prompt_ids:  # OLMo has no start token: begin a new document after an end-of-text token
        if tokenizer.eos_token_id is None:
            return fail(parser, f"the prompt is empty and the tokenizer ({tokenizer_path}) has no end-of-text token "
                                "to start a document from: pass a prompt")
        prompt_ids = [tokenizer.eos_token_id]
    context = model.config.max_position_embeddings
    room = context - len(prompt_ids)
    if room < 1:
        return fail(parser, f"the prompt is {len(prompt_ids)} tokens{' with the chat template' if args.chat else ''} "
                            f"and the model's context holds {context}: shorten it to fewer than {context}")
    max_new_tokens = min(args.max_new_tokens, room)
    if max_new_tokens < args.max_new_tokens:  # what a user wants from a long prompt: as much as fits
        print(f"(the context holds {context} tokens and the prompt takes {len(prompt_ids)}: generating at most "
              f"{max_new_tokens} instead of --max-new-tokens {args.max_new_tokens})", file=sys.stderr)
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40)
        echo = "" if args.chat else prompt  # echo the prompt, then stream the continuation after it
        # --compile on a GPU: decode steps replayed from a CUDA graph where the model allows it
        if stream(model, tokenizer, prompt_ids, max_new_tokens, sampling, stops, generator, echo=echo,
                  cuda_graph=args.compile and not speculator and speed.can_replay_graph(model),
                  speculator=speculator)[1]:
            return 130
    return 0


def load_speculator(args, model, tokenizer, mesh):
    """--speculate's guesser: prompt lookup, or a draft model that shares the model's tokenizer; None when off."""
    if not args.speculate:
        return None
    k, auto = (AUTO_K, True) if args.speculate == "auto" else (args.speculate, False)
    if not args.draft_model:
        return speculate.PromptLookup(k, args.lookup or speculate.LOOKUP_N, auto)
    try:
        folder = olmo.resolve_checkpoint(args.draft_model)
        own = olmo.load_tokenizer(folder)
    except (OSError, ImportError) as e:
        raise type(e)(f"--draft-model {args.draft_model}: {e}") from None
    if not speculate.same_token_ids(tokenizer, own):
        raise ValueError(f"--draft-model {args.draft_model}: its tokenizer gives other tokens than the model's; a "
                         "draft must share the model's token ids (take one of the same family)")
    draft = generate.load_model(folder, device=args.device, dtype=args.dtype, quantize=args.quantize, mesh=mesh)
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"--draft-model {args.draft_model}: its vocabulary has {draft.config.vocab_size} ids and "
                         f"the model's {model.config.vocab_size}; a draft must share the model's token ids")
    return speculate.DraftModel(draft, k, auto)


def stream(model, tokenizer, prompt_ids, max_new_tokens, sampling, stops=(), generator=None, cache=None, echo="",
           cuda_graph=False, speculator=None):
    """Print echo and then up to max_new_tokens tokens as they come, then a statistics line on stderr; returns (the
    new tokens, interrupted). sampling: generate's temperature, top_k and top_p. A UTF-8 character can span tokens:
    the incremental decoder holds its first bytes back until the rest arrives, so no broken character is ever
    printed. cache: a conversation's, holding its earlier turns. Ctrl-C from the echo on stops the reply and still
    gives the statistics line. speculator: a speculate.py guesser, or None."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    device = model.model.embed_tokens.weight.device
    tokens, sync = [], torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    t1, interrupted = t0, False
    try:
        print(echo, end="", flush=True)
        for token in generate.generate(model, prompt_ids, max_new_tokens, **sampling, stop_ids=stops, generator=generator,
                              cuda_graph=cuda_graph, cache=cache, speculate=speculator):
            if not tokens:
                t1 = time.perf_counter()  # the prompt is processed and the first token sampled
            tokens.append(token)
            if token not in stops:
                print(utf8.decode(tokenizer.decode_bytes([token])), end="", flush=True)
    except KeyboardInterrupt:
        interrupted = True
    print(utf8.decode(b"", final=True), flush=True)
    t2, n = time.perf_counter(), len(tokens)
    prefill_rate = len(prompt_ids) / (t1 - t0) if n else 0.0
    decode_rate = (n - 1) / (t2 - t1) if n > 1 else 0.0
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB GPU"
    else:
        per_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * per_unit / 1e9:.2f} GB RSS"
    weights = sum(p.nbytes for p in generate.weights_read_per_token(model))
    print(f"{'interrupted; ' if interrupted else ''}prompt {len(prompt_ids)} tokens, prefill {prefill_rate:.1f} "
          f"tok/s, decode {n} tokens at {decode_rate:.1f} tok/s ({decode_rate * weights / 1e9:.1f} GB/s of weights), "
          + (f"{speculator.tokens / speculator.steps:.2f} tokens per step, " if speculator and speculator.steps else "")
          + f"peak {peak}",
          file=sys.stderr)
    return tokens, interrupted


# ---- a conversation ------------------------------------------------------------------------------------------

HELP = "/reset starts a new conversation, /system TEXT sets the system message, /quit (or Ctrl-D) ends; Ctrl-C stops a reply"


def converse(model, tokenizer, template, specials, system, max_context, max_new_tokens, sampling, stops=(),
             generator=None, keep_cache=True, speculator=None):
    """A conversation: each message read from stdin (one per line; a terminal gets line editing and history from
    readline) is added to the history, the whole history is rendered with the chat template as transformers
    renders it, and the reply streams. The KV cache outlives the turns: a turn feeds only the tokens that follow
    the longest prefix it shares with what the cache holds (the template may render earlier turns differently,
    e.g. drop a Think model's reasoning: the cache is rewound to where they part). keep_cache=False recomputes
    every turn from scratch (tests compare the two). system: the first system message; max_context: the
    conversation's length limit in tokens; max_new_tokens, sampling, speculator: each reply's, as stream() takes
    them."""
    terminal = sys.stdin.isatty()
    if terminal:
        try:
            import readline  # noqa: F401  (input() gets line editing and history)
        except ImportError:
            pass
        print(HELP, file=sys.stderr)
    max_len = min(max_context, model.config.max_position_embeddings)
    messages = []
    cache, cached = None, []  # the KV cache and the token ids whose keys and values it holds
    while True:
        try:
            line = input("> ") if terminal else sys.stdin.readline() or None  # None: the end of the input
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a new line, as a shell does
            print(file=sys.stderr)
            continue
        except EOFError:  # Ctrl-D
            line = None
        if line is None or line.strip() == "/quit":
            return 0
        line = line.rstrip("\n")
        if line.startswith("/reset"):
            messages, cache, cached = [], None, []
            print("(a new conversation)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            print(f"(system message: {system!r}; the conversation continues)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history = ([{"role": "system", "content": system}] if system else []) + messages
        history.append({"role": "user", "content": line})
        ids = tokenizer.encode(render_chat(template, specials, history))
        if len(ids) >= max_len:
            print(f"(the conversation would be {len(ids)} tokens; the context holds {max_len} (--max-context): "
                  "/reset starts a new one)", file=sys.stderr)
            continue
        keep = 0
        while keep < min(len(cached), len(ids) - 1) and cached[keep] == ids[keep]:
            keep += 1
        if cache is None or not keep_cache or not cache.rewind(keep):
            cache, keep = (speculator.new_cache(model, max_len) if speculator else model.new_cache(1, max_len)), 0
        room = max_len - len(ids)
        reply, interrupted = stream(model, tokenizer, ids[keep:], min(max_new_tokens, room), sampling, stops,
                                    generator, cache, speculator=speculator)
        if len(reply) == room and reply[-1] not in stops:
            print("(the context is full: /reset starts a new conversation)", file=sys.stderr)
        cached = (ids + reply)[:cache.length]
        if interrupted and "linear_attention" in model.config.layer_types:
            cache = None  # a Gated DeltaNet state cut off mid-step is not to be trusted
        messages += [history[-1], {"role": "assistant", "content": tokenizer.decode([t for t in reply if t not in stops])}]


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C while loading: stop quietly (during generation, stream() handles it)
        print("interrupted", file=sys.stderr)
        code = 130
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)
