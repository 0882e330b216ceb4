"""tp.py: tensor parallelism in two CPU processes against one, and sample.py under torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import olmo
import tp

from conftest import (DENSE, FIXTURES, MOE, _free_port, assert_close_to_fixture, e2e_checkpoint, load, reference, run_sample


)

def test_hybrid_refuses_tensor_parallelism():
    model = load("olmo_hybrid")
    mesh = type("Mesh", (), {"size": lambda self: 1})()
    with pytest.raises(ValueError, match="does not split Olmo Hybrid's Gated DeltaNet layers"):
        tp.tensor_parallel(model, mesh)


# ---- tensor parallelism ----------------------------------------------------------------------------------------


TP_WORKER = """
import sys, torch, tp
from torch.distributed.device_mesh import init_device_mesh
torch.set_grad_enabled(False)
mesh = init_device_mesh("cpu", (2,))  # the process group comes from the environment: gloo on CPUs
out = {}
for case in sys.argv[2:]:
    model = tp.load_split(f"fixtures/{case}", mesh)
    ids = torch.load(f"fixtures/{case}/reference.pt")["input_ids"]
    cache = model.new_cache(2, 24)
    stepped = [model(ids[:, :7], cache=cache)[0]] + [model(ids[:, t:t + 1], cache=cache)[0] for t in range(7, 24)]
    shares = {name: (p.to_local().numel(), p.numel()) for name, p in model.named_parameters() if hasattr(p, "to_local")}
    out[case] = dict(logits=model(ids)[0], stepped=torch.cat(stepped, 1), shares=shares)
torch.save(out, f"{sys.argv[1]}/rank{mesh.get_rank()}.pt")
torch.distributed.destroy_process_group()
# the results are saved: skip the interpreter's teardown, where once (of many runs, on a loaded machine) a
# thread of the process group aborted the process ("terminate called without an active exception")
import os; os._exit(0)
"""


@pytest.mark.slow
def test_tensor_parallel_two_cpu_processes_match_one(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", TP_WORKER, str(tmp_path), *DENSE, *MOE], cwd=Path(__file__).parent,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=900) == 0, p.stderr.read()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for case in DENSE + MOE:
        ref, config = reference(case), olmo.read_config(FIXTURES / case)
        for out in ranks:
            assert_close_to_fixture(out[case]["logits"], ref["logits"])
            assert_close_to_fixture(out[case]["stepped"], ref["logits"])
            shares = out[case]["shares"]
            # per layer 4 attention projections, 3 per MLP (every expert's), the QK-norms of all but OLMo 1; the
            # untied head: each rank holds exactly half of each (the router stays whole)
            per_layer = 4 + 3 * (config.num_experts or 1) + 2 * config.qk_norm
            expected = config.num_hidden_layers * per_layer + (not config.tie_word_embeddings)
            assert len(shares) == expected, (case, sorted(shares))
            assert all(local * 2 == total for local, total in shares.values()), (case, shares)


@pytest.mark.slow
def test_torchrun_sample_generates_the_single_process_text(tmp_path):
    e2e_checkpoint("olmo3", tmp_path)
    args = ["--model", str(tmp_path), "--prompt", "Tensor parallel", "--temperature", "0", "--max-new-tokens", "20",
            "--dtype", "float32", "--device", "cpu"]
    single = run_sample(*args)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), str(Path(__file__).parent / "sample.py"), *args],
                       capture_output=True, text=True, timeout=900)
    assert single.returncode == 0 and r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == single.stdout  # rank 0 prints, once
