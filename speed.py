"""
How fast the model computes, never what: olmo.py's model is plain PyTorch, and this file holds the tricks that make
it run faster on a given device. Each is applied from outside, in one visible place:

  use_cpu_kernels(model)     CPU matrix products: one row by PyTorch's matrix-vector kernel, and on CPUs without
                             fast bfloat16 arithmetic a prompt's products in float32. OlmoForCausalLM.from_pretrained
                             applies it to a model on the CPU.
  compile_blocks(model)      torch.compile every block (one graph shared by all of them).
  cuda_graph_decoder(...)    replay decode steps from a CUDA graph on a GPU.
  release_freed_memory()     hand back what loading freed (generate.load_model); keep_freed_memory(): the C
                             allocator's setting for a process that then runs the model (sample.py).

Nothing here imports olmo.py: the model file may use this one, and the files that build on both (generate.py,
quantize.py) import each.
"""

import ctypes
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

MANY_ROWS = 32  # tokens per step from which float32 products win on CPUs without fast bfloat16 (fewer: ~matvec)


# -----------------------------------------------------------------------------------------------------------
# CPU matrix products
#
# Decoding one token is a matrix-VECTOR product per layer, and its speed is how fast it streams the weight. On CPUs
# with AVX512, PyTorch hands bfloat16 products (torch.mv and F.linear alike) to oneDNN, which runs one row as a small
# matrix product, several times slower on some CPUs (docs/speed.md); its own matrix-vector kernel streams the
# weight at memory speed. And bfloat16 matrix products are fast only on CPUs with AMX or AVX512-BF16: on the others
# (AVX2 and plain AVX512 hosts, most laptops) a prompt's products run faster in float32, converting each weight block
# as it is used (memory and decoding stay bfloat16; the logits differ from the bfloat16 kernel's in the last bits).


def prompt_matmul(choice=None):
    """'bfloat16' or 'float32': how a CPU multiplies a bfloat16 step of MANY_ROWS tokens or more. choice: 'auto' (the
    CPU decides), 'bfloat16' (the model's dtype, the reference's kernels) or 'float32'; None reads the environment
    variable OLMO_PROMPT_MATMUL (default auto), so a whole process can be made to compute as another CPU would."""
    choice = choice or os.environ.get("OLMO_PROMPT_MATMUL", "auto")
    if choice not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"OLMO_PROMPT_MATMUL must be auto, bfloat16 or float32, got {choice!r}")
    if choice == "auto":
        fast = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        return "bfloat16" if fast else "float32"
    return choice


class CPULinear(nn.Linear):
    """nn.Linear (no bias) with the CPU's fastest products: use_cpu_kernels turns a model's nn.Linear layers into
    these in place (same parameters, same state_dict). prompts_in_float32: a bfloat16 prompt multiplies in float32."""

    prompts_in_float32 = False

    def forward(self, x):
        if x.device.type == "cpu":
            if x.numel() == x.shape[-1]:  # a single row: decoding
                return matvec(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
            if self.prompts_in_float32 and x.dtype == torch.bfloat16 and x.numel() >= MANY_ROWS * x.shape[-1] \
                    and not torch.is_grad_enabled():  # (the conversion buffer is reused: not for training)
                return matmul_in_float32(x, self.weight)
        return F.linear(x, self.weight)


def use_cpu_kernels(model, prompt_matmul_choice=None):
    """Make every bias-free nn.Linear of the model a CPULinear (prompt_matmul_choice: see prompt_matmul). Returns the
    model. The parameters stay where they are: on another device the layers compute as nn.Linear does."""
    in_float32 = prompt_matmul(prompt_matmul_choice) == "float32"
    for m in model.modules():
        if type(m) in (nn.Linear, CPULinear) and m.bias is None:
            m.__class__ = CPULinear
            m.prompts_in_float32 = in_float32
    return model


def matvec(weight, x):
    """weight @ x on a CPU by PyTorch's own matrix-vector kernel. oneDNN is switched off for this product alone (the
    switch is process-wide: PyTorch has no per-call way to pick the kernel) and back on for everything else."""
    if torch.compiler.is_compiling():  # the compiler makes kernels of its own
        return torch.mv(weight, x)
    was, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        return torch.mv(weight, x)
    finally:
        torch.backends.mkldnn.enabled = was


FLOAT32_BLOCK = 1 << 24  # elements of weight converted at a time: 64 MB, allocated once per process
_float32_buffer = None


def matmul_in_float32(x, weight, scales=None):
    """x @ (weight * scales[:, None]).T with float32 arithmetic, for a bfloat16 (or int8, with scales) weight: a block
    of its rows at a time is converted into one reused float32 buffer (converting into fresh memory costs more in
    page faults than the conversion itself). Rounded to x's dtype once."""
    global _float32_buffer
    if _float32_buffer is None or _float32_buffer.numel() != FLOAT32_BLOCK:
        _float32_buffer = torch.empty(FLOAT32_BLOCK)
    x32 = x.reshape(-1, x.shape[-1]).float()
    out = torch.empty(x32.shape[0], weight.shape[0])
    rows = max(1, FLOAT32_BLOCK // weight.shape[1])
    for i in range(0, weight.shape[0], rows):
        w = weight[i:i + rows]
        block = _float32_buffer[:w.numel()].view(w.shape)
        block.copy_(w)
        out[:, i:i + rows] = x32 @ block.t()
    if scales is not None:
        out *= scales.float()
    return out.to(x.dtype).view(*x.shape[:-1], -1)


# -----------------------------------------------------------------------------------------------------------
# torch.compile and CUDA graphs


def compile_blocks(model):
    """torch.compile every block: fuses the norms, RoPE and element-wise work of a step into few kernels (the
    launch overhead that dominates small-batch decoding on a GPU). All blocks share one graph, because a block
    gets its own LayerKV rather than a layer index. The model-level code (cache slots, masks) stays eager:
    Inductor fails on its dynamic ring-slot arithmetic. On a CPU it does not speed up decoding: a step is the
    weight stream, and Inductor's generated matrix-vector loops stream it no faster than torch.mv."""
    for layer in model.model.layers:
        layer.compile(dynamic=True)  # dynamic: the cache grows every step; one graph instead of one per length
    return model


def can_replay_graph(model):
    """Whether decode steps can be replayed from a CUDA graph (cuda_graph_decoder): on a GPU, in one process (not
    tried under tensor parallelism), and not a mixture of experts, which picks its experts on the host every step."""
    return model.model.embed_tokens.weight.device.type == "cuda" and not torch.distributed.is_initialized() \
        and not model.config.num_experts


def cuda_graph_decoder(model, cache):
    """A function for decode steps, token ids (B, 1) -> next-token logits (B, 1, vocab), that records the step
    as a CUDA graph on its third call and from then on replays it. At small batch a GPU decode step is hundreds
    of small kernels whose launches take longer than their work; a replay launches them all at once. The first
    two calls run normally: they compile (after compile_blocks) and set up cuBLAS, which recording cannot do.
    A replay returns the same tensor every time, overwritten by the next step."""
    if not cache.static:
        raise ValueError("a CUDA graph replays fixed shapes: make the cache with new_cache(..., static=True)")
    if model.config.num_experts:
        raise ValueError("a mixture of experts picks its experts on the host every step: it cannot be replayed "
                         "from a CUDA graph")
    graph, calls, token_in, logits_out = torch.cuda.CUDAGraph(), 0, None, None

    def step(token):
        nonlocal calls, token_in, logits_out
        calls += 1
        if calls < 3:
            return model(token, cache=cache, last_only=True)[0]
        if token_in is None:  # record: forward's Python runs (so the host-side length advances), its kernels wait
            token_in = token.clone()
            with torch.cuda.graph(graph):
                logits_out = model(token_in, cache=cache, last_only=True)[0]
        else:  # the replay advances the cache's device copy of the length; the host's advances here
            cache.check_room(1)
            cache.advance(1, on_device=False)
        token_in.copy_(token)
        graph.replay()
        return logits_out
    return step


# -----------------------------------------------------------------------------------------------------------
# Memory


def release_freed_memory():
    """Hand the memory that loading freed back to the system: loading frees many pieces (float32 blocks being
    quantized, tensors being converted), and glibc's allocator keeps freed heap pages resident for reuse. Where the C
    library has no malloc_trim (macOS, Windows, musl) there is nothing to call."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def keep_freed_memory():
    """For a process that runs a model after loading it (sample.py; a library leaves its host's allocator alone): let
    glibc's allocator keep what running frees. Each operation on a prompt allocates its output afresh, megabytes at a
    time, and by default glibc maps every such block from the system and unmaps it when freed, so each one faults its
    pages in anew (docs/speed.md measures a process's first long prompt)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks below 32 MB come from the heap (its maximum)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap
    except (OSError, AttributeError, TypeError):
        pass
