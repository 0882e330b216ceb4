"""
Quantization: the linear layers' weights in fewer bits. Decoding reads every weight once per token, so fewer bytes
per weight decode faster wherever memory bandwidth is the limit, and a model fits in less memory (half of bfloat16's
in int8, a quarter in int4). Norms and the embedding table stay as they are: the embedding is read one row per
token, so quantizing it would save memory but no time. int8 and int4 are weight-only (activations stay as they are);
w8a8 rounds each layer's input to 7-bit levels too, so the product runs in integers, in a faster kernel on x86 CPUs
but with a larger error (docs/quantization.md).

    model = quantize.load_quantized("path/to/checkpoint", "int8")   # or quantize.quantize(model, "int8")
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import olmo
import speed

QUANTIZATIONS = ("int8", "int4", "w8a8")
INT4_GROUP = 32  # inputs that share an int4 scale and offset
FBGEMM_ROWS = 8192  # rows packed together: fbgemm packs a 100352-row lm_head 3.6x faster in pieces of this size


def load_quantized(folder, mode, device=None, dtype=None):
    """A checkpoint folder's model with its linear layers quantized. The checkpoint is mapped as stored, its linear
    layers quantized one at a time, and the other weights converted to dtype in their own memory, which releases the
    file: the peak is about the quantized model plus one layer's weight, so a model can load quantized on a machine
    that cannot hold it unquantized."""
    if mode in ("int4", "w8a8") and device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"{mode} uses PyTorch's CPU kernels: use int8 on other devices")
    model = olmo.empty_model(olmo.read_config(folder))
    olmo.load_checkpoint(model, folder, place=lambda name, t: t, mapped=True)  # as stored, on the CPU: views of the file
    dtype = dtype or model.model.embed_tokens.weight.dtype
    quantize(model, mode, dtype)
    place = olmo.place_on("cpu", dtype)
    for name, p in model.named_parameters():
        if p.is_floating_point():  # in memory of its own: the file's mapping is released
            t = place(name, p.data)
            p.data = t.clone() if t.data_ptr() == p.data.data_ptr() else t
    model = model.to(device or "cpu")
    if model.model.embed_tokens.weight.device.type == "cpu":
        speed.use_cpu_kernels(model)  # the layers left as they were (a router, a tied head)
    return model.eval()


def quantize(model, mode, dtype=None):
    """Replace the linear layers of every block and an untied lm_head by Int8Linear, Int4Linear or W8A8Linear, one at
    a time: the peak is the quantized model plus one weight being converted. A mixture's router (a small matrix
    whose rounding could flip a close routing decision) stays as it is. int4 needs out % 16 == 0 and in % 32 == 0
    (the kernel's tiles); a layer that is not so shaped (OLMo 3's 100278-row lm_head) gets int8. dtype: the
    activations' (default: the weights')."""
    if mode not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {mode!r}: expected one of {', '.join(QUANTIZATIONS)}")
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or (isinstance(parent, olmo.MoE) and name == "gate") \
                    or (tied and child is model.lm_head):
                continue
            w = child.weight
            if w.device.type not in ("cpu", "meta") and mode in ("int4", "w8a8"):
                raise ValueError(f"{mode} uses PyTorch's CPU kernels: quantize on the CPU, or use int8")
            if mode == "int4" and w.shape[0] % 16 == 0 and w.shape[1] % INT4_GROUP == 0:
                layer = Int4Linear(w, dtype or w.dtype)
            elif mode == "w8a8" and not w.is_meta:
                layer = W8A8Linear(w, dtype or w.dtype)
            else:  # int8, an int4 layer the kernel cannot tile, or w8a8 on the meta device (shapes only)
                layer = Int8Linear(w, dtype or w.dtype)
            setattr(parent, name, layer.to(w.device))
    return model


class Int8Linear(nn.Module):
    """w = s q, q = round(w / s) in [-127, 127], one scale s = max|w| / 127 per output row (symmetric)."""

    def __init__(self, weight, dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with torch.no_grad():
            q, scales = quantize_int8(weight, dtype)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        if x.device.type != "cpu" or torch.is_grad_enabled():
            out = F.linear(x2, self.dequantize())  # the plain math (a GPU compiles it into one kernel)
        elif x2.shape[0] < speed.MANY_ROWS and x.dtype == self.scales.dtype != torch.float32:
            out = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)  # PyTorch's int8 CPU kernel
        else:  # a prompt, or float32 activations (for which that kernel is slow)
            out = speed.matmul_in_float32(x2, self.weight, self.scales)
        return out.view(*x.shape[:-1], self.out_features)

    def dequantize(self):
        return self.weight.to(self.scales.dtype) * self.scales[:, None]


class Int4Linear(nn.Module):
    """w = s (q - 8) + z for each group of 32 inputs of a row: q in [0, 15], s = (max - min) / 15 and z = min + 8 s,
    so the group's range spreads over the 16 levels. Packed two to a byte in the layout of PyTorch's CPU kernel:
    int4 runs on CPUs only."""

    def __init__(self, weight, dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with torch.no_grad():
            packed, scales = quantize_int4(weight, dtype)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)  # (in / 32, out, 2) scale and offset

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, INT4_GROUP, self.scales)
        return out.view(*x.shape[:-1], self.out_features)


class W8A8Linear(nn.Module):
    """int8's weight, packed for fbgemm (PyTorch's x86 integer kernels), and its input rounded too: see int8_product.
    x86 CPUs only. fbgemm keeps the packed copy, outside the module's parameters."""

    def __init__(self, weight, dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with torch.no_grad():
            q, scales = quantize_int8(weight, dtype)
        self.packed = pack_for_fbgemm(q, scales)
        self.scales = nn.Parameter(scales, requires_grad=False)  # the row scales, to look at (packed holds a copy)

    def forward(self, x):
        out = int8_product(x.reshape(-1, self.in_features), self.packed).to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)


def quantize_int8(w, dtype, rows=256):
    """A float weight (out, in) -> int8 q and scales (out,) in dtype, a few rows at a time (the float32 temporaries
    stay in the cache instead of streaming whole matrices through memory). q is rounded against the scale as stored,
    so s q is the nearest level (and the clamp catches a scale that rounding made smaller)."""
    q, scales = torch.empty(w.shape, dtype=torch.int8, device=w.device), torch.empty(w.shape[0], dtype=dtype, device=w.device)
    for i in range(0, w.shape[0], rows):
        block = w[i:i + rows].to(torch.float32, copy=True)  # its own memory: w may be a read-only mapping
        lo, hi = torch.aminmax(block, dim=1)
        s = (torch.maximum(-lo, hi) / 127).clamp_(min=1e-12).to(dtype)
        q[i:i + rows] = block.div_(s.float()[:, None]).round_().clamp_(-127, 127)
        scales[i:i + rows] = s
    return q, scales


def quantize_int4(w, dtype, rows=256):
    """A float weight (out, in) -> int4 levels packed for the CPU kernel, and (in / 32, out, 2) scales and offsets."""
    q = torch.empty(w.shape, dtype=torch.int32, device=w.device)
    s = torch.empty(w.shape[0], w.shape[1] // INT4_GROUP, device=w.device)
    lo = torch.empty_like(s)
    for i in range(0, w.shape[0], rows):
        g = w[i:i + rows].to(torch.float32, copy=True).view(-1, w.shape[1] // INT4_GROUP, INT4_GROUP)  # (rows, groups, 32)
        g_lo, g_hi = torch.aminmax(g, dim=-1)
        g_s = ((g_hi - g_lo) / 15).clamp_(min=1e-6)
        q[i:i + rows] = g.sub_(g_lo[..., None]).div_(g_s[..., None]).round_().clamp_(0, 15).view(-1, w.shape[1])
        s[i:i + rows], lo[i:i + rows] = g_s, g_lo
    if q.is_meta:  # shapes only (counting a model's bytes): two levels to a byte
        packed = torch.empty(w.shape[0], w.shape[1] // 2, dtype=torch.uint8, device="meta")
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    return packed, torch.stack([s, lo + 8 * s], -1).transpose(0, 1).contiguous().to(dtype)


def pack_for_fbgemm(q, scales):
    """int8 levels q (out, in) and their row scales -> fbgemm's packed weight (its own copy, in its tile layout), as
    a list of pieces of at most FBGEMM_ROWS rows."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        raise ValueError(f"w8a8 needs fbgemm, PyTorch's x86 integer kernels (this PyTorch's quantized engine is "
                         f"{torch.backends.quantized.engine!r}): use int8")
    pieces = []
    try:
        with warnings.catch_warnings():  # PyTorch 2.13 deprecates quantized tensors, which only carry q to the packing
            warnings.simplefilter("ignore")
            for i in range(0, q.shape[0], FBGEMM_ROWS):
                s = scales[i:i + FBGEMM_ROWS].double()
                weight = torch._make_per_channel_quantized_tensor(q[i:i + FBGEMM_ROWS], s, torch.zeros(len(s), dtype=torch.long), 0)
                pieces.append(torch.ops.quantized.linear_prepack(weight, None))
    except (AttributeError, RuntimeError) as e:  # a PyTorch that has removed them
        raise ValueError(f"w8a8 needs fbgemm's quantized::linear_prepack, which PyTorch {torch.__version__} does not "
                         f"provide ({type(e).__name__}: {e}): use int8") from None
    return pieces


def int8_product(x, packed):
    """x (rows, in) @ w.T with integer arithmetic. Each row is divided by its largest |value|, so one token's
    outliers do not coarsen another's levels; fbgemm rounds the rows (now within [-1, 1]) to unsigned levels with one
    scale and offset, multiplies them with the int8 weight summing in int32, and scales the sums back; each row's
    maximum is multiplied back. reduce_range: a 7-bit range (0..127; its top may round to 128), since AVX2's kernel
    adds pairs of byte products in 16 bits, which 8-bit levels overflow (2 x 255 x 127 > 32767): the same sums on
    every x86 CPU."""
    x32 = x.float()
    peak = x32.abs().amax(1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
    rows = x32 / peak
    return torch.cat([torch.ops.quantized.linear_dynamic(rows, piece, True) for piece in packed], 1).mul_(peak)
