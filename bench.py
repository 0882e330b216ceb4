"""
Benchmark olmo.py side by side with Hugging Face transformers, in one run, on identical weights.

    python bench.py                                  # OLMo-2-0425-1B shape, random weights, bfloat16
    python bench.py --model path/to/checkpoint       # a real checkpoint
    python bench.py --model OLMoE-1B-7B-0924:4 --variants bf16  # its first 4 layers
    python bench.py --model Olmo-3-1025-7B --device cuda --compile

Two parts. processes (CPU): whole `python sample.py` processes against whole processes of a transformers script,
generating N and 1 new tokens from the same prompt, (N - 1) / (time(N) - time(1)) as the decode rate (N for each run
such that it decodes for about --decode-seconds), alternating, medians over rounds; for bfloat16 weights and, with
--variants, int8 and w8a8 (against transformers + torchao) and int4.
inprocess: decode tokens/s at batch 1 and batch 8 (greedy), prefill tokens/s, from_pretrained time and peak
memory (each in a fresh process), and the weight bandwidth that decoding achieves as a fraction of the
machine's memory bandwidth, measured in this run (also step by step, each step paired with its own read, which
cancels the drift of a shared machine). Without transformers it reports our numbers only. On a GPU it also
times decoding replayed from a CUDA graph ("+graph"), eager and (with --compile) compiled.
"""

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import re
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import generate
import olmo
import quantize as quantization
import sample
import speed

TOKENIZERS = Path(__file__).parent / "fixtures" / "tokenizers"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="OLMo-2-0425-1B",
                   help="a preset name (random weights; NAME:L for its first L layers) or a checkpoint folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="tokens decoded per in-process measurement (as sample.py's; the processes part's N with "
                        "--decode-seconds 0)")
    p.add_argument("--batch", type=int, default=8, help="the second decode batch size")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    p.add_argument("--skip-load", action="store_true", help="skip the from_pretrained measurements")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per measurement (best is kept)")
    p.add_argument("--no-reference", action="store_true", help="do not run transformers even if installed")
    p.add_argument("--profile", action="store_true", help="also print where our decode steps spend their time, by kernel")
    p.add_argument("--quantize", choices=["int8", "int4", "w8a8"], help="in-process part: our model quantized")
    p.add_argument("--parts", default="inprocess,processes",
                   help="inprocess (the table of in-process timings), processes (whole sample.py processes against a "
                        "transformers script; CPU only), speculation (the same, decoding with guesses), or several")
    p.add_argument("--speculate", type=int, default=4, metavar="K",
                   help="speculation part: guesses per step, for sample.py --speculate and transformers' prompt lookup "
                        "and assisted generation")
    p.add_argument("--draft-model", type=Path, help="speculation part: also guess with this draft checkpoint (sample.py "
                   "--draft-model against transformers' assisted generation)")
    p.add_argument("--samples", type=int, default=1,
                   help="speculation part: texts each process generates (sample.py --num-samples), so that a small "
                        "model decodes for longer than a process takes to start")
    p.add_argument("--tasks", default="copy,write",
                   help="speculation part: copy (the prompt is a function, then the start of a copy of it) and/or write "
                        "(a sentence of prose to go on from)")
    p.add_argument("--variants", default="bf16,int8",
                   help="processes part: weight formats, each against its transformers peer (int8: torchao's "
                        "int8 weight-only, w8a8: torchao's int8 dynamic activations and int8 weights, where torchao "
                        "is installed; int4: ours alone)")
    p.add_argument("--process-rounds", type=int, default=3, help="processes part: rounds (medians are reported)")
    p.add_argument("--decode-seconds", type=float, default=20,
                   help="processes part: each run generates enough tokens to decode for about this long (at least "
                        f"{PILOT_TOKENS}), as a first process of it measures; 0: --max-new-tokens for all")
    p.add_argument("--doc", type=Path, help="also write this run's report into FILE (docs/speed.md), between its "
                   f"lines {DOC_START!r} and {DOC_END!r} (--parts speculation: its own block per --model), with "
                        "the host, the versions and the command")
    p.add_argument("--load-child", nargs=4, metavar=("IMPL", "FOLDER", "DTYPE", "QUANTIZE"), help=argparse.SUPPRESS)
    p.add_argument("--rows-child", nargs=3, metavar=("FOLDER", "DTYPE", "QUANTIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.device = sample.pick_device(args.device)
    args.dtype_name, args.dtype = args.dtype, getattr(torch, args.dtype)
    args.parts = set(args.parts.split(","))
    if args.parts - {"inprocess", "processes", "speculation"}:
        p.error(f"--parts: expected inprocess, processes and/or speculation, got {','.join(args.parts)}")
    args.tasks = args.tasks.split(",")
    if set(args.tasks) - set(TASKS):
        p.error(f"--tasks: expected copy and/or write, got {','.join(args.tasks)}")
    if args.draft_model and not args.draft_model.is_dir():
        p.error(f"--draft-model: no such checkpoint folder: {args.draft_model}")
    args.variants = args.variants.split(",")
    if set(args.variants) - {"bf16", "int8", "int4", "w8a8"}:
        p.error(f"--variants: expected bf16, int8, int4 and/or w8a8, got {','.join(args.variants)}")
    return args


def elapsed(fn, device):
    """Seconds that fn() takes. On a GPU, between CUDA events: a GPU reads 1 GiB in a quarter of a millisecond,
    and the host's timer and synchronisation would add tens of microseconds to that."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def timed(fn, device, repeats=3, warmup=True):
    """Best time of fn() over repeats (after one warm-up call)."""
    if warmup:
        fn()
    return min(elapsed(fn, device) for _ in range(repeats))


def reads(device):
    """How many 1 GiB passes make one bandwidth measurement: one on a CPU (~50 ms), 20 on a GPU, whose single
    pass (~0.25 ms) is too short to keep its clocks up."""
    return 20 if device.type == "cuda" else 1


def memory_bandwidth(device):
    """Bytes/s the machine moves: a streaming read (sum) and a copy (read + write), on 1 GiB tensors."""
    n, r = 256 * 1024 * 1024, reads(device)  # float32 elements: 1 GiB, far larger than any cache
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    read = r * a.nbytes / timed(lambda: [a.sum() for _ in range(r)], device)
    copy = r * 2 * a.nbytes / timed(lambda: [b.copy_(a) for _ in range(r)], device)
    return read, copy


# ---- a checkpoint on disk, written without extra packages ---------------------------------------------------


def save_random_checkpoint(config, folder, dtype):
    """A checkpoint of config's shape with random weights (normal, std 0.02): config.json (Hugging Face keys) and
    model.safetensors, written one tensor at a time, so a 7B model never sits in memory whole (on a 24 GB machine
    the benchmark's processes need that memory)."""
    (folder / "config.json").write_text(json.dumps(olmo.config_json(config), indent=2))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in olmo.OlmoForCausalLM(config).state_dict().items()
                  if not (config.tie_word_embeddings and k == "lm_head.weight")}
    header, offset, name = {"__metadata__": {"format": "pt"}}, 0, {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    for k, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[k] = {"dtype": name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    g = torch.Generator().manual_seed(0)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for shape in shapes.values():
            f.write((0.02 * torch.randn(shape, generator=g)).to(dtype).view(torch.uint8).numpy().tobytes())
    # the family's real tokenizer, for the whole-process runs (OLMo 1 and OLMoE: GPT-NeoX; the others: dolma2)
    neox = config.model_type in ("olmo", "olmoe")
    tokenizer = TOKENIZERS / ("allenai_gpt-neox-olmo-dolma-v1_5.json" if neox else "allenai_dolma2.json")
    shutil.copy(tokenizer, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|pad|>" if not neox else "<|padding|>",
                                                            "tokenizer_class": "PreTrainedTokenizerFast"}))


def load_child(impl, folder, dtype, quantize):
    """Run in a fresh process: load, run one token, report."""
    dtype, quantize = getattr(torch, dtype), None if quantize == "None" else quantize
    if impl == "hf":  # imported before the clock starts, as olmo is
        from transformers import AutoModelForCausalLM
    t = time.perf_counter()
    if impl == "ours":
        model = generate.load_model(folder, dtype=dtype, quantize=quantize)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    loaded = time.perf_counter() - t
    with torch.inference_mode():
        model(torch.tensor([[1]]))
    first = time.perf_counter() - t
    # VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts at its parent's peak (this benchmark's)
    peak_kb = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])
    print(json.dumps({"load_s": loaded, "load_and_first_token_s": first, "peak_rss_gb": peak_kb * 1024 / 1e9}))


def measure_load(impl, folder, dtype_name, quantize=None):
    r = subprocess.run([sys.executable, __file__, "--load-child", impl, str(folder), dtype_name,
                        str(quantize)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"loading with {impl} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the two implementations behind one small interface ------------------------------------------------------


WARMUP_STEPS = 3  # enough for compiling, cuBLAS's set-up and, with a CUDA graph, its recording (third step)


class Ours:
    name = "olmo.py"

    def __init__(self, model, cuda_graph=False):
        self.model, self.cuda_graph = model, cuda_graph

    @torch.inference_mode()
    def prefill(self, ids):
        return self.model(ids, last_only=True)[0]

    def stepper(self, ids, n):
        """Prefill ids and decode WARMUP_STEPS tokens, then return a function that decodes one more token
        (greedy) per call, n calls at most."""
        model = self.model
        cache = model.new_cache(ids.shape[0], ids.shape[1] + WARMUP_STEPS + n, static=self.cuda_graph)
        forward = generate.decode_step(model, cache)
        with torch.inference_mode():
            logits = [model(ids, cache=cache, last_only=True)[0]]

        @torch.inference_mode()
        def step():
            logits[0] = forward(logits[0].argmax(-1))
        for _ in range(WARMUP_STEPS):
            step()
        return step

    def weights_alone(self):
        """A function that runs every linear layer a decode step reads on one row and does nothing else: the floor
        of a decode step's time, for comparison with the step."""
        read = {id(w) for w in generate.weights_read_per_token(self.model)}
        linear = (torch.nn.Linear, quantization.Int8Linear, quantization.Int4Linear, quantization.W8A8Linear)
        layers = [m for m in self.model.modules()  # a layer's first parameter: its weight (w8a8: its scales)
                  if isinstance(m, linear) and id(next(m.parameters(recurse=False))) in read]
        p = self.model.model.embed_tokens.weight
        xs = {m.in_features: torch.randn(1, m.in_features, device=p.device, dtype=p.dtype) for m in layers}

        @torch.inference_mode()
        def run():
            for m in layers:
                m(xs[m.in_features])
        return run


class Reference:
    name = "transformers"

    def __init__(self, folder, device, dtype):
        import transformers
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()

    @torch.inference_mode()
    def decode(self, ids, n):
        return self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)

    @torch.inference_mode()
    def prefill(self, ids):
        return self.model(ids, logits_to_keep=1, use_cache=False).logits


def random_ids(args, shape):  # token ids that every vocabulary has
    return torch.randint(0, min(1000, args.vocab_size), shape, device=args.device)


def decode_rate(impl, batch, args):
    """Tokens/s of the decode steps alone, the prefill left out. transformers: generate() as a user calls it,
    (time for n tokens - time for 1) / (n - 1). Ours: n - 1 steps timed after the warm-up steps."""
    ids, n = random_ids(args, (batch, args.prompt_len)), args.max_new_tokens
    if isinstance(impl, Reference):
        t_1 = timed(lambda: impl.decode(ids, 1), args.device, repeats=2)
        t_n = timed(lambda: impl.decode(ids, n), args.device, repeats=1, warmup=False)
        return batch * (n - 1) / (t_n - t_1)
    step = impl.stepper(ids, n - 1)
    return batch * (n - 1) / elapsed(lambda: [step() for _ in range(n - 1)], args.device)


def paired_fractions(impl, args, per_token, steps=24):
    """Decode steps at batch 1 as a fraction of the memory bandwidth, robust to drift: each step is timed right
    after a 1 GiB read, and the fraction is the median over steps of (weight bytes / step time) / (read speed).
    The same for the linear layers alone, without the rest of the step (norms, RoPE, attention, cache)."""
    buf = torch.ones(256 * 1024 * 1024, device=args.device)  # float32, 1 GiB
    ids = random_ids(args, (1, args.prompt_len))
    step, alone = impl.stepper(ids, steps), impl.weights_alone()
    alone()
    fractions = {"step": [], "weights alone": []}
    r = reads(args.device)
    for _ in range(steps):
        for key, fn in (("step", step), ("weights alone", alone)):
            read_s = elapsed(lambda: [buf.sum() for _ in range(r)], args.device) / r
            fractions[key].append((per_token / elapsed(fn, args.device)) / (buf.nbytes / read_s))
    return {k: statistics.median(v) for k, v in fractions.items()}


def profile_steps(impl, args, steps=10):
    """The kernels (GPU) or operators (CPU) of our decode steps at batch 1, by total time, per step."""
    from torch.profiler import ProfilerActivity, profile

    step = impl.stepper(random_ids(args, (1, args.prompt_len)), steps)
    gpu = args.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if gpu:
            torch.cuda.synchronize(args.device)  # the last kernels finish inside the profile
    rows = [(getattr(e, "self_device_time_total" if gpu else "self_cpu_time_total") / steps, e.count / steps, e.key)
            for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[0] > 0), reverse=True)
    lines = [f"{sum(r[0] for r in rows) / 1e3:9.3f} ms per step in {sum(r[1] for r in rows):.0f} "
             f"{'kernels' if gpu else 'operator calls'}; the largest:"]
    return lines + [f"{us / 1e3:9.3f} ms {n:6.0f}x  {name[:100]}" for us, n, name in rows[:12]]


def prefill_rate(impl, args):
    ids = random_ids(args, (1, args.prefill_len))
    return args.prefill_len / timed(lambda: impl.prefill(ids), args.device)


DOC_START, DOC_END = "<!-- bench.py --doc: start -->", "<!-- bench.py --doc: end -->"  # --parts speculation alone
# writes into a block of its own per --model, "<!-- bench.py --doc speculation MODEL: start -->" to "... end -->"


def host():
    """The CPU by name, with the instructions that decide which kernels run, and the versions that ran."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    flags = [name for name, ok in (("AVX512", torch.backends.cpu.get_cpu_capability() == "AVX512"),
                                   ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                   ("AMX", torch.cpu._is_amx_tile_supported())) if ok]
    versions = [f"torch {torch.__version__}"] + [f"{m} {importlib.metadata.version(m)}" for m in ("transformers", "torchao")
                                                   if importlib.util.find_spec(m)]
    return f"{cpu} ({', '.join(flags) or 'no AVX512'}), {os.cpu_count()} cores; {', '.join(versions)}"


def write_doc(path, report_text, block=""):
    """Replace the block between DOC_START and DOC_END (or a named block's markers) in path with this run's report."""
    text = path.read_text()
    start, end = (DOC_START, DOC_END) if not block else (m.replace("--doc:", f"--doc {block}:") for m in (DOC_START, DOC_END))
    if start not in text or end not in text:
        raise SystemExit(f"bench.py: {path} has no {start} ... {end} block to write the report into")
    env = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                                     "FBGEMM_ENABLE_INSTRUCTIONS", "OLMO_PROMPT_MATMUL") if k in os.environ)
    written = (f"{start}\nWritten by `{(env + ' ') if env else ''}python bench.py {' '.join(sys.argv[1:])}` on "
               f"{time.strftime('%Y-%m-%d')}, {host()}:\n\n```\n{report_text.strip()}\n```\n{end}")
    head, rest = text.split(start, 1)
    path.write_text(head + written + rest.split(end, 1)[1])


def main():
    args = parse_args()
    if args.doc:  # the report goes to stdout as always, and into the doc
        sys.stdout = Tee(sys.stdout)
    torch.manual_seed(0)
    have_reference = not args.no_reference
    if have_reference:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: reporting olmo.py alone", file=sys.stderr)
            have_reference = False
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model)
        if not folder.is_dir():  # a preset: random weights, saved so that both implementations load the same file
            folder = Path(tmp)
            save_random_checkpoint(preset(args.model), folder, args.dtype)
        if "inprocess" in args.parts:
            in_process(args, folder, have_reference)
        if "processes" in args.parts and args.device.type == "cpu":
            whole_processes(args, folder, have_reference)
        if "speculation" in args.parts and args.device.type == "cpu":
            step_costs(args, folder)
            speculation_processes(args, folder, have_reference)
    if args.doc:
        write_doc(args.doc, sys.stdout.text.getvalue(), f"speculation {args.model}" if args.parts == {"speculation"} else "")


class Tee:
    """stdout that keeps a copy of what is printed."""

    def __init__(self, out):
        self.out, self.text = out, io.StringIO()

    def write(self, s):
        self.text.write(s)
        return self.out.write(s)

    def flush(self):
        self.out.flush()


def preset(name):
    """A preset's config; NAME:L keeps its first L layers (a model whose checkpoint, beside transformers' mapping of
    the same file, would not fit this machine's memory)."""
    name, _, layers = name.partition(":")
    config = olmo.OlmoConfig.from_name(name)
    if layers:
        L = int(layers)
        config = dataclasses.replace(config, num_hidden_layers=L, layer_types=config.layer_types[:L])
    return config


def in_process(args, folder, have_reference):
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    read_bw, copy_bw = memory_bandwidth(args.device)
    ckpt_gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
    load = lambda: generate.load_model(folder, device=args.device, dtype=args.dtype, quantize=args.quantize)
    impls = {"ours": Ours(load())}
    args.vocab_size = impls["ours"].model.config.vocab_size
    graph = speed.can_replay_graph(impls["ours"].model)
    if graph:  # the same model, decode steps replayed from a CUDA graph
        impls["ours+graph"] = Ours(impls["ours"].model, cuda_graph=True)
    if args.compile:
        impls["ours+compile+graph" if graph else "ours+compile"] = Ours(speed.compile_blocks(load()), cuda_graph=graph)
    if have_reference:
        impls["transformers"] = Reference(folder, args.device, args.dtype)
    model = impls["ours"].model
    per_token = sum(p.nbytes for p in generate.weights_read_per_token(model))  # each weight once, and one row of
    # the embedding table (of a mixture of experts, only the experts a token is routed to)
    # Alternate the implementations for every measurement and keep each one's best: on a shared machine
    # the speed drifts by 10-20% over minutes, and back-to-back blocks would turn that drift into a ratio.
    rows = {key: {} for key in impls}
    measurements = [("decode_b1", lambda impl: decode_rate(impl, 1, args)),
                    (f"decode_b{args.batch}", lambda impl: decode_rate(impl, args.batch, args)),
                    ("prefill", lambda impl: prefill_rate(impl, args))]
    for name, measure in measurements:
        for _ in range(args.rounds):
            read_bw, copy_bw = (max(a, b) for a, b in zip((read_bw, copy_bw), memory_bandwidth(args.device)))
            for key, impl in impls.items():
                rows[key][name] = max(rows[key].get(name, 0.0), measure(impl))
        print(f"{name}: " + ", ".join(f"{k} {r[name]:.2f}" for k, r in rows.items()), file=sys.stderr, flush=True)
    for r in rows.values():
        r["bandwidth"] = r["decode_b1"] * per_token
    variants = {key: impl for key, impl in impls.items() if isinstance(impl, Ours)}
    paired = {key: paired_fractions(impl, args, per_token) for key, impl in variants.items()}
    if args.profile:
        for key, impl in variants.items():
            print(f"\nprofile of {key}, decode at batch 1:\n" + "\n".join(profile_steps(impl, args)))
    del impls, model
    if not args.skip_load and args.device.type == "cpu":
        for _ in range(args.rounds):
            for key, child in [("ours", "ours"), ("transformers", "hf")]:
                if key in rows:
                    m = measure_load(child, folder, args.dtype_name, args.quantize if key == "ours" else None)
                    for k, v in m.items():
                        rows[key][k] = min(rows[key].get(k, float("inf")), v)
    report(rows, paired, args, device_name, read_bw, copy_bw, ckpt_gb, per_token)


# ---- whole processes: the speed a user sees ------------------------------------------------------------------

PROMPT = ("The Open Language Model project publishes everything needed to study a language model: the data, the "
          "training code, the checkpoints along the way and the evaluations. ")

PEER = """
import sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt_file, n, dtype, variant = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
samples, guessing = int(sys.argv[6]), sys.argv[7:]  # guessing: [], ["lookup", K] or ["draft", K, FOLDER]
kwargs, generating = {}, {}
if variant in ("int8", "w8a8"):  # torchao's int8 quantization, as transformers offers it
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig
    config = Int8WeightOnlyConfig() if variant == "int8" else Int8DynamicActivationInt8WeightConfig()
    kwargs["quantization_config"] = TorchAoConfig(quant_type=config)
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs)
if guessing[:1] == ["lookup"]:
    generating["prompt_lookup_num_tokens"] = int(guessing[1])
elif guessing[:1] == ["draft"]:  # K guesses each step, as sample.py --speculate K makes
    generating.update(assistant_model=AutoModelForCausalLM.from_pretrained(guessing[2], dtype=getattr(torch, dtype)),
                      num_assistant_tokens=int(guessing[1]), num_assistant_tokens_schedule="constant",
                      assistant_confidence_threshold=0.0)
ids = tokenizer(open(prompt_file).read(), return_tensors="pt").input_ids
t = time.perf_counter()
for _ in range(samples):  # as sample.py --num-samples: the same greedy text again
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or 0, **generating)
seconds = time.perf_counter() - t
print(tokenizer.decode(out[0, ids.shape[1]:]))
print(f"prompt {ids.shape[1]} tokens, generated {out.shape[1] - ids.shape[1]} in {seconds:.3f}s", file=sys.stderr)
"""


def process_command(impl, variant, folder, prompt_file, n, dtype_name, guessing=(), samples=1):
    """guessing: () to decode plainly, ("lookup", K) or ("draft", K, FOLDER); samples: texts generated, one after
    the other (a small model's text decodes in less time than a process takes to start)."""
    guessing = [str(g) for g in guessing]
    if impl == "transformers":
        return [sys.executable, "-c", PEER, str(folder), str(prompt_file), str(n), dtype_name, variant, str(samples)] + guessing
    command = [sys.executable, str(Path(__file__).parent / "sample.py"), "--model", str(folder), "--prompt-file",
               str(prompt_file), "--max-new-tokens", str(n), "--temperature", "0", "--device", "cpu", "--dtype", dtype_name,
               "--num-samples", str(samples)]
    command += ["--speculate", guessing[1]] + (["--draft-model", guessing[2]] if guessing[0] == "draft" else []) if guessing else []
    return command + (["--quantize", variant] if variant != "bf16" else [])


def run_process(command, what):
    """Wall seconds of a whole process, what it said on stderr (sample.py: its statistics line) and on stdout (the
    text). what: the run, as an error names it."""
    t = time.perf_counter()
    r = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if r.returncode:
        raise RuntimeError(f"{what} failed:\n{r.stderr[-2000:]}")
    return seconds, r.stderr, r.stdout


def whole_processes(args, folder, have_reference):
    """Decoding as a user meets it: whole `python sample.py` processes and whole processes of a transformers script
    (generate(), as its documentation shows), both generating N and 1 new tokens from the same prompt; the decode
    rate is (N - 1) / (time(N) - time(1)), which leaves out starting, loading and the prompt. The processes run
    one after the other, alternating, round after round (the machine drifts by the minute); medians are reported,
    with the read bandwidth measured between them. Each run's N is chosen for it (new_tokens): loading varies by
    seconds from process to process, and the difference of two processes is only as steady as decoding is long.
    Prefill: a 512-token prompt and 1 new token, as each process times it itself (sample.py's statistics line; the
    script times its generate() call)."""
    torchao = have_reference and importlib.util.find_spec("torchao") is not None
    peers = {"bf16": have_reference, "int8": torchao, "w8a8": torchao, "int4": False}
    runs = [(impl, v) for v in args.variants for impl in (["olmo.py"] + (["transformers"] if peers[v] else []))]
    with tempfile.TemporaryDirectory() as tmp:
        short, long = Path(tmp) / "short.txt", Path(tmp) / "long.txt"
        tokenizer = olmo.load_tokenizer(folder)
        short.write_text(PROMPT)
        prompt_len = len(tokenizer.encode(PROMPT))
        text = PROMPT * (args.prefill_len // prompt_len + 2)
        long.write_text(tokenizer.decode(tokenizer.encode(text)[:args.prefill_len]))
        room = olmo.read_config(folder).max_position_embeddings - prompt_len - 8
        n = {run: new_tokens(run, folder, short, args, room) for run in runs}
        times = {run: {"n": [], "1": [], "prefill": []} for run in runs}
        reads = []
        for r in range(args.process_rounds):
            for run in runs:
                reads.append(memory_bandwidth(torch.device("cpu"))[0])
                for key, prompt, count in (("n", short, n[run]), ("1", short, 1), ("prefill", long, 1)):
                    seconds, err, _ = run_process(process_command(*run, folder, prompt, count, args.dtype_name),
                                                  " ".join(run))
                    times[run][key].append(seconds if key != "prefill" else prefill_from(err, run[0]))
                decode = (n[run] - 1) / (times[run]["n"][-1] - times[run]["1"][-1])
                print(f"round {r + 1}: {run[0]} {run[1]}: decode {decode:.2f} tok/s", file=sys.stderr, flush=True)
    model_bytes = {}
    for v in args.variants:  # shapes only, on the meta device
        with torch.device("meta"):
            meta = olmo.OlmoForCausalLM(olmo.read_config(folder)).to(args.dtype)
        if v != "bf16":
            quantization.quantize(meta, v, args.dtype)
        model_bytes[v] = sum(p.nbytes for p in generate.weights_read_per_token(meta))
    read_bw = statistics.median(reads)
    print(f"\nwhole processes, {args.model}, {args.dtype_name} activations, CPU, "
          f"{args.process_rounds} rounds, medians; read bandwidth {read_bw / 1e9:.1f} GB/s (median of the run)")
    print("weights read per decoded token: " + ", ".join(f"{v} {b / 1e9:.2f} GB" for v, b in model_bytes.items())
          + "; cache per sequence (keys and values in the activations' dtype, and Gated DeltaNet states): "
          + ", ".join(f"{t} tokens {cache_bytes(folder, t, args.dtype) / 2**20:.0f} MiB" for t in (4096, 65536)))
    print(f"{'':28s}{'N':>6s}{'decode tok/s':>14s}{'rounds: min-max':>17s}{'of read bw':>12s}{'load+1st tok s':>16s}"
          f"{'prefill tok/s':>15s}{'vs transformers':>17s}")
    rates = {run: [(n[run] - 1) / (a - b) for a, b in zip(times[run]["n"], times[run]["1"])] for run in runs}
    decode = {run: statistics.median(r) for run, r in rates.items()}
    for impl, v in runs:
        t, peer = times[impl, v], decode.get(("transformers", v))
        ratio = f"{decode[impl, v] / peer:17.2f}" if impl == "olmo.py" and peer else ""
        spread = f"{min(rates[impl, v]):.2f}-{max(rates[impl, v]):.2f}"
        print(f"{impl + ' ' + v:28s}{n[impl, v]:6d}{decode[impl, v]:14.2f}{spread:>17s}{decode[impl, v] * model_bytes[v] / read_bw:12.0%}"
              f"{statistics.median(t['1']):16.2f}{statistics.median(t['prefill']):15.1f}{ratio}")
    key = f"KEY processes {args.model}:"
    for v in args.variants:
        key += f" {v} {decode['olmo.py', v]:.2f} tok/s ({decode['olmo.py', v] * model_bytes[v] / read_bw:.0%} of read bandwidth"
        key += f", {decode['olmo.py', v] / decode['transformers', v]:.2f}x transformers" if ("transformers", v) in decode else ""
        key += f", {decode['olmo.py', v] / decode['olmo.py', 'bf16']:.2f}x our bf16)," if v != "bf16" and "bf16" in args.variants else "),"
    print(key)


# ---- speculative decoding, in whole processes ----------------------------------------------------------------

COPY_SOURCE = """def moving_average(values, width):
    \"\"\"The mean of each run of `width` consecutive values.\"\"\"
    total, means = 0.0, []
    for i, value in enumerate(values):
        total += value
        if i >= width:
            total -= values[i - width]
        if i >= width - 1:
            means.append(total / width)
    return means
"""
TASKS = ("copy", "write")  # copy: the output repeats the prompt, where guesses from the prompt are right; write: not


def task_prompt(task, tokenizer, context):
    """write: PROMPT. copy: COPY_SOURCE, then the first line of a copy of it; as many of its lines as keep the prompt
    within a third of the model's context (the tiny model's context holds 256 bytes), so the copy fits after it."""
    if task == "write":
        return PROMPT
    lines = COPY_SOURCE.splitlines(keepends=True)
    for n in range(len(lines), 1, -1):
        prompt = "".join(lines[:n]) + "\n# The same again, unchanged:\n" + lines[0]
        if len(tokenizer.encode(prompt)) <= context // 3:
            break
    return prompt


ROW_COUNTS = (1, 2, 3, 5, 9)  # a plain step, and a step over the last token and 1, 2, 4 or 8 guesses
KERNELS = {  # the CPU kernels PyTorch picks on other hosts, chosen on this one by its environment variables
    "native": {},
    "AVX512 without BF16": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "OLMO_PROMPT_MATMUL": "float32"},
}


def rows_child(folder, dtype, quantize):
    """Run in a fresh process (its kernels chosen by its environment): the seconds of one decode step over each of
    ROW_COUNTS new rows after a 128-token prompt, medians of 8, as JSON on stdout."""
    model = generate.load_model(folder, dtype=getattr(torch, dtype), quantize=None if quantize == "None" else quantize)
    ids = min(model.config.vocab_size, 50000)  # token ids that every vocabulary has, a byte-level one too
    prompt = torch.randint(0, ids, (1, 128))
    seconds = {}
    with torch.inference_mode():
        for rows in (1,) + ROW_COUNTS:  # the first plain step again: warm-up
            times = []
            for _ in range(8):
                cache = model.new_cache(1, 128 + rows)
                model(prompt, cache=cache, last_only=True)
                new = torch.randint(0, ids, (1, rows))
                t = time.perf_counter()
                model(new, cache=cache)
                times.append(time.perf_counter() - t)
            seconds[rows] = statistics.median(times)
    print(json.dumps(seconds))


def step_costs(args, folder):
    """What a step over several rows costs against a step over one, per weight format and per kind of CPU kernels
    (KERNELS, each in a process of its own): where it is not much more, checking guesses in one step pays."""
    print(f"\none decode step over R rows after a 128-token prompt, in process, {args.model}, medians of 8 "
          "(R = 1 + the guesses checked); ms, and in brackets the cost against one row")
    print(f"{'':30s}" + "".join(f"{'R = ' + str(r):>18s}" for r in ROW_COUNTS))
    for v in args.variants:
        for kernels, env in KERNELS.items():
            r = subprocess.run([sys.executable, __file__, "--rows-child", str(folder), args.dtype_name,
                                "None" if v == "bf16" else v], capture_output=True, text=True, env={**os.environ, **env})
            if r.returncode:
                raise RuntimeError(f"the rows child ({v}, {kernels}) failed:\n{r.stderr[-2000:]}")
            seconds = {int(k): t for k, t in json.loads(r.stdout.strip().splitlines()[-1]).items()}
            weights = args.dtype_name if v == "bf16" else v  # unquantized: the weights in the activations' dtype
            print(f"{weights + ', ' + kernels + ' kernels':30s}" + "".join(
                f"{f'{1e3 * seconds[n]:.1f} ({seconds[n] / seconds[1]:.2f}x)':>18s}" for n in ROW_COUNTS))


def speculation_processes(args, folder, have_reference):
    """Decoding with guesses as a user meets it: whole `python sample.py --speculate K` processes (prompt lookup, the
    same with --speculate auto, and a draft model with --draft-model) against plain sample.py and against a
    transformers script with its prompt lookup (prompt_lookup_num_tokens=K) and assisted generation (K guesses a
    step), per task and weight format. Each run generates N and 1 new tokens, greedy, --samples times;
    samples * (N - 1) / (time(N) - time(1)) is its decode rate; rounds alternate, medians. Ours also report the
    tokens each step gave (sample.py's statistics line), and whether the text equals plain decoding's."""
    torchao = have_reference and importlib.util.find_spec("torchao") is not None
    peers = {"bf16": have_reference, "int8": torchao, "w8a8": torchao, "int4": False}
    guessings = [(), ("lookup", args.speculate), ("lookup", "auto")]  # auto: sample.py guesses only where it pays
    guessings += [("draft", args.speculate, args.draft_model)] if args.draft_model else []
    runs = [(impl, v, g) for v in args.variants for g in guessings
            for impl in (["olmo.py"] + (["transformers"] if peers[v] and "auto" not in g else []))]
    tokenizer, config = olmo.load_tokenizer(folder), olmo.read_config(folder)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            text = task_prompt(task, tokenizer, config.max_position_embeddings)
            prompt = Path(tmp) / f"{task}.txt"
            prompt.write_text(text)
            n = max(2, min(args.max_new_tokens, config.max_position_embeddings - len(tokenizer.encode(text)) - 1))
            times = {run: {"n": [], "1": []} for run in runs}
            per_step, texts = {run: [] for run in runs}, {}
            for r in range(args.process_rounds):
                for run in runs:
                    impl, v, g = run
                    for key, count in (("n", n), ("1", 1)):
                        seconds, err, text = run_process(
                            process_command(impl, v, folder, prompt, count, args.dtype_name, g, args.samples),
                            f"{impl} {v} {' '.join(map(str, g))}")
                        times[run][key].append(seconds)
                        if key == "n":
                            texts[run] = text
                            per_step[run] += [float(x) for x in re.findall(r"([\d.]+) tokens per step", err)]
                    rate = args.samples * (n - 1) / (times[run]["n"][-1] - times[run]["1"][-1])
                    print(f"round {r + 1}: {task} {impl} {v} {' '.join(map(str, g[:2])) or 'plain'}: {rate:.2f} tok/s",
                          file=sys.stderr, flush=True)
            for run in runs:
                rates = [args.samples * (n - 1) / (a - b) for a, b in zip(times[run]["n"], times[run]["1"])]
                rows.append((task, n, run, statistics.median(rates), min(rates), max(rates),
                             statistics.median(per_step[run]) if per_step[run] else None,
                             texts[run] == texts[run[0], run[1], ()]))
    print(f"\nspeculative decoding in whole processes, {args.model}, {args.dtype_name} activations, CPU, greedy, "
          f"K = {args.speculate} guesses per step, {args.samples} text(s) of N tokens per process, "
          f"{args.process_rounds} rounds, medians")
    print(f"{'':44s}{'N':>5s}{'decode tok/s':>14s}{'min-max':>16s}{'tokens/step':>13s}{'vs plain':>10s}"
          f"{'vs transformers':>17s}{'same text':>11s}")
    rate = {(task, run): r for task, _, run, r, *_ in rows}
    for task, n, (impl, v, g), r, lo, hi, steps, same in rows:
        weights = args.dtype_name if v == "bf16" else f"{v}"  # unquantized: the weights in the activations' dtype
        name = f"{task}: {impl} {weights} " + ({"lookup": "prompt lookup", "draft": "draft model"}[g[0]] if g else "plain")
        name += ", auto" if "auto" in g else ""
        peer = rate.get((task, ("transformers", v, g))) if impl == "olmo.py" else None
        print(f"{name:44s}{n:5d}{r:14.2f}  {f'{lo:.2f} to {hi:.2f}':>14s}{f'{steps:.2f}' if steps else '':>13s}"
              f"{r / rate[task, (impl, v, ())]:10.2f}{f'{r / peer:.2f}' if peer else '':>17s}"
              f"{('yes' if same else 'no') if g else '':>11s}")


PILOT_TOKENS = 17  # new tokens of the first process that measures a run's rate, and the least N


def new_tokens(run, folder, prompt, args, room):
    """N for one run: enough new tokens that its decoding lasts about --decode-seconds, at the rate that a first
    process of PILOT_TOKENS reports itself (sample.py's statistics line; the script's generate() time, which
    includes its short prompt); at least PILOT_TOKENS, and no more than the model's context allows."""
    if args.decode_seconds <= 0:
        return args.max_new_tokens
    _, err, _ = run_process(process_command(*run, folder, prompt, PILOT_TOKENS, args.dtype_name), " ".join(run))
    if run[0] == "olmo.py":
        rate = float(re.search(r"decode \d+ tokens at ([\d.]+) tok/s", err).group(1))
    else:
        _, generated, seconds = peer_report(err)
        rate = (generated - 1) / seconds
    return max(PILOT_TOKENS, min(room, round(rate * args.decode_seconds)))


def cache_bytes(folder, tokens, dtype):
    config = olmo.read_config(folder)
    cache = olmo.KVCache(config, 1, tokens, config.num_key_value_heads, "meta", dtype)  # shapes, no memory
    return sum(t.nbytes for layer in cache.layers for t in ((layer.S, layer.conv) if isinstance(layer, olmo.GDNState)
                                                            else (layer.k, layer.v)))


def prefill_from(stderr, impl):
    """Prefill tokens/s from a process's own report of its 512-token prompt."""
    if impl == "olmo.py":
        return float(re.search(r"prefill ([\d.]+) tok/s", stderr).group(1))
    prompt, _, seconds = peer_report(stderr)
    return prompt / seconds


def peer_report(stderr):
    """The transformers script's own line: prompt tokens, tokens generated, seconds of its generate() call."""
    m = re.search(r"prompt (\d+) tokens, generated (\d+) in ([\d.]+)s", stderr)
    return int(m.group(1)), int(m.group(2)), float(m.group(3))


def report(rows, paired, args, device_name, read_bw, copy_bw, ckpt_gb, per_token):
    for key, r in rows.items():  # (N - 1) / (time(N) - time(1)) of a few tokens on a busy machine can come out <= 0
        for m in [m for m, v in r.items() if v <= 0]:
            print(f"{key}: {m} not measured (time(N) - time(1) was not positive: the machine was busy)", file=sys.stderr)
            del r[m]
    print(f"memory bandwidth (best of the run): read {read_bw / 1e9:.1f} GB/s, copy {copy_bw / 1e9:.1f} GB/s (read+write); "
          f"weights read per decoded token: {per_token / 1e9:.2f} GB; checkpoint {ckpt_gb:.2f} GB")
    keys = list(rows)
    metrics = [("decode_b1", "decode tok/s, batch 1"), (f"decode_b{args.batch}", f"decode tok/s, batch {args.batch}"),
               ("prefill", f"prefill tok/s, {args.prefill_len} tokens"), ("bandwidth", "decode weight bandwidth GB/s"),
               ("load_s", "from_pretrained s"), ("load_and_first_token_s", "load + first token s"),
               ("peak_rss_gb", "peak RSS GB")]
    ref = rows.get("transformers")
    print(f"\n{'':34s}" + "".join(f"{k:>16s}" for k in keys) + (f"{'ours/transformers':>20s}" if ref else ""))
    for m, label in metrics:
        if not any(m in r for r in rows.values()):
            continue
        scale = 1e-9 if m == "bandwidth" else 1
        line = f"{label:34s}" + "".join(f"{r[m] * scale:16.2f}" if m in r else f"{'-':>16s}" for r in rows.values())
        if ref and m in ref and m in rows["ours"]:
            line += f"{rows['ours'][m] / ref[m]:20.2f}"
        print(line)
    ours = rows["ours"]
    print(f"\ndecode at batch 1, fraction of the read bandwidth: best rate / best bandwidth of the run "
          f"{ours['bandwidth'] / read_bw:.0%} ({ours['bandwidth'] / copy_bw:.0%} of the copy bandwidth)")
    for key, f in paired.items():
        print(f"  {key}: each step timed right after a 1 GiB read, median of the pairs: {f['step']:.0%}; "
              f"the linear layers alone (one row each, nothing else): {f['weights alone']:.0%}")
    key = f"KEY {args.model} {args.dtype_name} {args.device.type}: decode b1"
    for name, f in paired.items():  # each of our variants: tok/s (ratio to transformers, paired bandwidth fraction)
        key += f" {name} {rows[name]['decode_b1']:.2f} tok/s ("
        key += f"{rows[name]['decode_b1'] / ref['decode_b1']:.2f}x transformers, " if ref and "decode_b1" in ref else ""
        key += f"{f['step']:.0%} of read bandwidth paired),"
    key += f" prefill {ours['prefill']:.0f} tok/s"
    if ref:
        key += f" ({ours['prefill'] / ref['prefill']:.2f}x)" if "prefill" in ref else ""
    if "peak_rss_gb" in ours:
        key += f", load {ours['load_s']:.2f}s peak {ours['peak_rss_gb'] / ckpt_gb:.2f}x checkpoint"
        if ref and "load_s" in ref:
            key += f" (transformers {ref['load_s']:.2f}s, {ref['peak_rss_gb'] / ckpt_gb:.2f}x)"
    print(key)


if __name__ == "__main__":
    if "--load-child" in sys.argv:
        i = sys.argv.index("--load-child")
        load_child(*sys.argv[i + 1:i + 5])
    elif "--rows-child" in sys.argv:
        i = sys.argv.index("--rows-child")
        rows_child(*sys.argv[i + 1:i + 4])
    else:
        main()
