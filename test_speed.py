"""speed.py: the CPU products, torch.compile and CUDA graphs compute what the plain model computes."""

import copy

import pytest
import torch

import olmo
import speed

from conftest import F32_TOL, load, max_diff, reference


def test_moe_is_not_replayed_from_a_cuda_graph():
    model = load("olmoe")
    with pytest.raises(ValueError, match="mixture of experts picks its experts on the host"):
        speed.cuda_graph_decoder(model, model.new_cache(1, 8, static=True))


# ---- runtime: float32 prompt products, the KV cache, torch.compile, CUDA graphs --------------------------------


def test_matmul_in_float32_block_by_block(monkeypatch):
    monkeypatch.setattr(speed, "FLOAT32_BLOCK", 3 * 40)  # three rows of 40 at a time: 7 blocks for 20 rows
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 40).bfloat16(), torch.randn(20, 40).bfloat16()
    expected = (x.float() @ w.float().t()).bfloat16()
    assert max_diff(speed.matmul_in_float32(x, w), expected) == 0
    q, s = torch.randint(-127, 128, (20, 40), dtype=torch.int8), torch.rand(20)
    expected = x.float() @ (q.float() * s[:, None]).t()
    assert max_diff(speed.matmul_in_float32(x.float(), q, s), expected) < 1e-6 * expected.abs().max()


def test_one_row_products_leave_onednn_on():
    # matvec turns oneDNN off for its own product only, even when the product fails
    torch.manual_seed(0)
    w, x = torch.randn(64, 32).bfloat16(), torch.randn(32).bfloat16()
    expected = w.float() @ x.float()
    assert max_diff(speed.matvec(w, x), expected) <= expected.abs().max() / 128  # bfloat16's rounding
    with pytest.raises(RuntimeError):
        speed.matvec(w, x[:31])
    assert torch.backends.mkldnn.enabled


@pytest.mark.slow
def test_compiled_blocks_share_one_graph_and_match_eager():
    # 10 layers, more than torch's recompile limit (8): had each layer compiled its own graph, the rest would
    # silently run eagerly. Graphs: the prefill, decode steps while a ring still has room, decode steps after.
    from torch._dynamo.utils import counters

    # OLMo 3's pattern again: sliding layers with rings of 8, every 4th layer full
    config = load("olmo3").config.replace(num_hidden_layers=10, layer_types=None)
    torch.manual_seed(0)
    eager = olmo.OlmoForCausalLM(config).eval()
    compiled = speed.compile_blocks(copy.deepcopy(eager))
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, config.vocab_size, (2, 18))
    outs = []
    for model in (eager, compiled):  # prefill 6 tokens, then decode 12 one by one: the rings wrap
        cache = model.new_cache(2, 18)
        steps = [model(ids[:, :6], cache=cache)[0]] + [model(ids[:, i:i + 1], cache=cache)[0] for i in range(6, 18)]
        outs.append(torch.cat(steps, 1))
    assert max_diff(outs[0], outs[1]) < F32_TOL
    assert 1 <= counters["stats"]["unique_graphs"] <= 3
    cache = compiled.new_cache(2, 18, static=True)  # as for CUDA graphs: all slots every step, length on the device
    steps = [compiled(ids[:, :6], cache=cache)[0]] + [compiled(ids[:, i:i + 1], cache=cache)[0] for i in range(6, 18)]
    assert max_diff(outs[0], torch.cat(steps, 1)) < F32_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by hand where one is)")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_graph_decoding_matches_eager(compiled):
    # recorded on the third step, replayed for the rest; olmo3's rings of 8 wrap during the replays
    model = load("olmo3").to("cuda")
    graphed = speed.compile_blocks(copy.deepcopy(model)) if compiled else model
    ids = reference("olmo3")["input_ids"].to("cuda")
    with torch.inference_mode():
        full, _ = model(ids)
        cache = graphed.new_cache(2, 24, static=True)
        step = speed.cuda_graph_decoder(graphed, cache)
        out = [graphed(ids[:, :4], cache=cache)[0]] + [step(ids[:, i:i + 1]).clone() for i in range(4, 24)]
        assert max_diff(torch.cat(out, 1), full) < F32_TOL
        assert cache.length == 24 and cache.device_length.item() == 24
        with pytest.raises(ValueError, match="KV cache holds 24 tokens; 24 are in it"):
            step(ids[:, :1])
