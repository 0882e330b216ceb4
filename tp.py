"""
Tensor parallelism: each block split across the devices of a 1-D DeviceMesh with PyTorch's DTensor, so a model
too large for one device runs on several (one process per device, started by torchrun; sample.py does this).

    mesh = torch.distributed.device_mesh.init_device_mesh("cuda", (world_size,))
    model = tp.load_split("path/to/checkpoint", mesh, device, torch.bfloat16)
"""

import torch
import torch.nn as nn
from torch.distributed._functional_collectives import all_reduce
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import olmo
import speed


def load_split(folder, mesh, device=None, dtype=None):
    """A checkpoint folder's model split across the mesh's ranks: each rank reads every tensor and keeps only its
    share of each split weight as it is read, so no rank ever holds the whole model."""
    model = tensor_parallel(olmo.empty_model(olmo.read_config(folder)), mesh)
    params = dict(model.state_dict(keep_vars=True))
    on_device = olmo.place_on(device, dtype)

    def place(name, t):
        t, p = on_device(name, t), params.get(name)
        return distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else t

    olmo.load_checkpoint(model, folder, place)
    if model.model.embed_tokens.weight.device.type == "cpu":
        speed.use_cpu_kernels(model)
    return model.eval()


def tensor_parallel(model, mesh):
    """Megatron-style tensor parallelism: q/k/v and gate/up split by output rows (each rank owns whole heads
    and a slice of the MLP), o_proj and down_proj by input columns (their partial sums are all-reduced), an
    untied lm_head by vocabulary rows (logits all-gathered). Embedding, residual stream and norms stay whole."""
    c, n = model.config, mesh.size()
    if c.num_attention_heads % n or c.num_key_value_heads % n:
        raise ValueError(f"{n} ranks cannot split {c.num_attention_heads} query / {c.num_key_value_heads} key-value heads evenly")
    if "linear_attention" in c.layer_types:
        raise ValueError("tensor parallelism does not split Olmo Hybrid's Gated DeltaNet layers; run it on one device")
    plan = {}
    for i in range(c.num_hidden_layers):
        plan |= {f"model.layers.{i}.self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")}
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        # a mixture of experts: the router stays whole (every rank routes alike), each expert is split as an MLP
        mlps = [f"model.layers.{i}.mlp.experts.{e}" for e in range(c.num_experts)] if c.num_experts else [f"model.layers.{i}.mlp"]
        for mlp in mlps:
            plan |= {f"{mlp}.gate_proj": ColwiseParallel(), f"{mlp}.up_proj": ColwiseParallel(), f"{mlp}.down_proj": RowwiseParallel()}
    if not c.tie_word_embeddings:  # a tied head is the embedding, which stays whole
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, mesh, plan)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.n_head, attn.n_kv_head = attn.n_head // n, attn.n_kv_head // n  # the heads on this rank (as gpt-fast's tp.py)
        if isinstance(attn.q_norm, olmo.RMSNorm):
            attn.q_norm, attn.k_norm = ShardedRMSNorm(attn.q_norm, mesh), ShardedRMSNorm(attn.k_norm, mesh)
    return model


class ShardedRMSNorm(olmo.RMSNorm):
    """The QK-norm of a rank that holds only some heads: the mean square runs over the FULL width, so the
    ranks all-reduce their sums of squares; the weight is sharded like the heads."""

    def __init__(self, norm, mesh):
        super().__init__(norm.weight.shape[0], norm.eps, norm.rounds_first)
        self.weight = nn.Parameter(distribute_tensor(norm.weight.data, mesh, [Shard(0)]))
        self.mesh, self.width = mesh, norm.weight.shape[0]

    def forward(self, x):  # x: (B, T, width / ranks), this rank's heads
        xf = x.float()
        squares = all_reduce(xf.pow(2).sum(-1, keepdim=True), "sum", self.mesh)
        return self.times_weight(xf * torch.rsqrt(squares / self.width + self.eps), self.weight.to_local(), x.dtype)
