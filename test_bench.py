"""bench.py runs and reports (its figures are measurements, never asserted here)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import olmo

from conftest import FIXTURES, e2e_checkpoint


# ---- bench.py --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--no-reference", "--profile", "--quantize", "w8a8"]])
def test_bench_runs_and_reports(extra, tmp_path):
    # a smoke test of the benchmark's code paths on a tiny checkpoint (its timings mean nothing here); --doc writes
    # the report into a copy of docs/speed.md, between its markers, and leaves the rest of the page as it was
    doc = tmp_path / "speed.md"
    doc.write_text((Path(__file__).parent / "docs" / "speed.md").read_text())
    before, after = doc.read_text().split("<!-- bench.py --doc: start -->")[0], doc.read_text().split("<!-- bench.py --doc: end -->")[1]
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "bench.py"), "--model", str(FIXTURES / "olmo2"),
                        "--dtype", "float32", "--device", "cpu", "--rounds", "1", "--max-new-tokens", "4",
                        "--prefill-len", "8", "--batch", "2", "--parts", "inprocess", "--doc", str(doc), *extra],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr
    written = doc.read_text()
    assert written.startswith(before) and written.endswith(after) and r.stdout.strip().splitlines()[-1] in written
    assert "Written by `python bench.py --model" in written and "cores; torch " in written
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("KEY ") and "of read bandwidth" in lines[-1]
    with_reference = not extra and importlib.util.find_spec("transformers") is not None
    assert ("transformers" in lines[-1]) == with_reference
    assert any(line.startswith("peak RSS GB") for line in lines) and "linear layers alone" in r.stdout
    assert ("profile of ours, decode at batch 1" in r.stdout and "aten::" in r.stdout) == ("--profile" in extra)


def test_bench_preset_keeps_its_first_layers():
    import bench
    full, cut = olmo.OlmoConfig.from_name("Olmo-3-1025-7B"), bench.preset("Olmo-3-1025-7B:5")
    assert cut.num_hidden_layers == 5 and cut.layer_types == full.layer_types[:5] and cut.hidden_size == full.hidden_size
    assert "sliding_attention" in cut.layer_types and "full_attention" in cut.layer_types


@pytest.mark.slow
def test_bench_whole_processes_run_and_report(tmp_path):
    # sample.py and the transformers script as whole processes, bf16, int8 and w8a8 (their peers need torchao)
    e2e_checkpoint("olmo2", tmp_path)
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "bench.py"), "--model", str(tmp_path),
                        "--parts", "processes", "--variants", "bf16,int8,w8a8", "--process-rounds", "1", "--max-new-tokens", "6",
                        "--prefill-len", "32"], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip().splitlines()[-1]
    assert key.startswith("KEY processes") and "bf16" in key and "x transformers" in key and "x our bf16" in key
    assert "olmo.py int8" in r.stdout and "olmo.py w8a8" in r.stdout and "transformers bf16" in r.stdout
    # N chosen for each run from a first process's own rate: at least 17, within the context (256)
    n = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(olmo\.py \w+|transformers \w+) +(\d+) ", r.stdout, re.M)}
    assert len(n) >= 4 and all(17 <= v <= 256 for v in n.values()), r.stdout


@pytest.mark.slow
def test_bench_speculation_runs_and_reports(tmp_path):
    # sample.py --speculate (lookup, auto, a draft) and transformers' prompt lookup and assisted generation as whole
    # processes; --doc writes the report into the speculation block of a copy of docs/speed.md, and only there
    e2e_checkpoint("olmo2", tmp_path / "model")
    doc = tmp_path / "speed.md"
    start, end = (f"<!-- bench.py --doc speculation {tmp_path / 'model'}: {m} -->" for m in ("start", "end"))
    doc.write_text((Path(__file__).parent / "docs" / "speed.md").read_text() + f"\n{start}\n{end}\n")
    before, after = doc.read_text().split(start)[0], doc.read_text().split(end)[1]
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "bench.py"), "--model", str(tmp_path / "model"),
                        "--parts", "speculation", "--variants", "bf16", "--process-rounds", "1", "--max-new-tokens", "12",
                        "--samples", "2", "--draft-model", str(tmp_path / "model"), "--doc", str(doc)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^(\w+: [\w.]+ bfloat16 [\w ,]+?) {2,}(.*)$", r.stdout, re.M)}
    with_reference = importlib.util.find_spec("transformers") is not None
    assert len(rows) == 2 * (4 + 3 * with_reference), r.stdout  # 2 tasks; ours: plain, lookup, auto, draft
    # what a step of several rows costs, per kind of CPU kernels
    assert all(re.search(rf"^bfloat16, {kernels} kernels +[\d.]+ \(1\.00x\)( +[\d.]+ \([\d.]+x\)){{4}}$", r.stdout, re.M)
               for kernels in ("native", "AVX512 without BF16", "AVX2")), r.stdout
    for task in ("copy", "write"):
        # a draft that is the model itself: every guess kept, so the 11 tokens after the first come 5, 5 and 1 a step
        draft = rows[f"{task}: olmo.py bfloat16 draft model"].split()
        assert draft[5] == f"{11 / 3:.2f}" and draft[-1] == "yes", r.stdout  # N, rate, min, "to", max, tokens/step
        assert rows[f"{task}: olmo.py bfloat16 prompt lookup"].split()[-1] == "yes"
    written = doc.read_text()
    assert written.startswith(before) and written.endswith(after) and "Written by `python bench.py --model" in written
    assert r.stdout.strip().splitlines()[-1] in written.split(start)[1].split(end)[0]
