"""Bounded memory (issue 10 item 2): peak memory follows the chunk size, not the batch; concurrent batches share a budget.

Memory is measured as RssAnon (anonymous resident memory) in a fresh process, sampled by a
thread: reading a memory-mapped file raises VmHWM by every page it touches, but those pages are
the page cache's. Sizes are small here (tens of MB); ``benchmarks/bench_pipeline.py`` measures
1M-4M x 100.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from seapig_core.pipeline import MemoryBudget, memory_budget, score_file

REPO = Path(__file__).resolve().parents[2]

_WORKER = r"""
import json, sys, threading, time, warnings
from pathlib import Path
import numpy as np
warnings.simplefilter("ignore")
import pyarrow as pa, pyarrow.parquet as pq
import torch
from seapig_core.bundle import fit_selector
from seapig_core.pipeline import score_file

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

root = Path(sys.argv[1]); sizes = [int(s) for s in sys.argv[2].split(",")]; chunk = int(sys.argv[3])
g = torch.Generator().manual_seed(0)
labels = torch.randint(0, 100, (5000,), generator=g)
cal = torch.randn(5000, 100, generator=g); cal[torch.arange(5000), labels] += 4.0
fit_selector(cal, labels, scores=["softmax", "energy"], q=0.9, temperature=1.0).save(root / "bundle")
del cal

def write(rows, name, kind):
    rng = np.random.default_rng(rows)
    if kind == "npy":
        path = root / f"{name}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, 100))
        for a in range(0, rows, 50_000):
            out[a:a + 50_000] = rng.standard_normal((min(50_000, rows - a), 100), dtype=np.float32)
        out.flush(); del out
        return path
    path = root / f"{name}.parquet"
    schema = pa.schema([("logits", pa.list_(pa.float32(), 100))])
    with pq.ParquetWriter(str(path), schema) as writer:
        for a in range(0, rows, 50_000):
            block = rng.standard_normal((min(50_000, rows - a), 100), dtype=np.float32)
            writer.write_table(pa.table({"logits": pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), 100)}))
    return path

warm = write(2000, "warm", "npy")
score_file(root / "bundle", warm, root / "out", "warm", chunk_rows=chunk, logits_sha256="0" * 64)
peaks = {}
for kind in ("npy", "parquet"):
  for n in sizes:
    path = write(n, f"q{n}", kind)
    base = peak = rss_anon(); done = False
    def sample():
        global peak
        while not done:
            peak = max(peak, rss_anon()); time.sleep(0.001)
    thread = threading.Thread(target=sample); thread.start()
    result = score_file(root / "bundle", path, root / "out", f"q{n}", chunk_rows=chunk, logits_sha256="0" * 64)
    done = True; thread.join()
    assert result["samples"] == n
    peaks[f"{kind}-{n}"] = (max(peak, rss_anon()) - base) / 2**20
    path.unlink()
print(json.dumps(peaks))
"""


@pytest.mark.slow
def test_peak_memory_follows_the_chunk_size_not_the_batch(tmp_path: Path) -> None:
    small, large = 100_000, 400_000  # 40 and 160 MB of logits
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, str(tmp_path), f"{small},{large}", "16384"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    logits_mb = large * 100 * 4 / 2**20
    for kind, bound in (("npy", 40), ("parquet", 80)):  # MB: a 16k-row chunk's working set and allocator slack
        assert peaks[f"{kind}-{large}"] < bound, peaks
        assert peaks[f"{kind}-{large}"] < logits_mb / 2, peaks  # well under the batch's logits
        assert peaks[f"{kind}-{large}"] < peaks[f"{kind}-{small}"] + 16, peaks  # flat: 4x the rows, the same peak


def test_concurrent_scoring_stays_within_the_memory_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four batches scored by four threads of one process (as the flow's task runner does) share one budget."""
    import torch

    from seapig_core.bundle import fit_selector

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (500,), generator=g)
    cal = torch.randn(500, 10, generator=g)
    cal[torch.arange(500), labels] += 3.0
    fit_selector(cal, labels, scores=["softmax"], q=0.9).save(tmp_path / "bundle")
    for i in range(4):
        np.save(tmp_path / f"q{i}.npy", np.random.default_rng(i).standard_normal((20_000, 10)).astype(np.float32))
    budget = memory_budget(7)  # MB: room for one 4,096-row working set at a time, not two
    import seapig_core.pipeline as pipeline

    holding: list[int] = []
    most = [0]
    lock = threading.Lock()
    real_reserve = MemoryBudget.reserve

    def reserve(self, nbytes):  # type: ignore[no-untyped-def]
        manager = real_reserve(self, nbytes)

        class Counted:
            def __enter__(self_inner):  # noqa: N805
                granted = manager.__enter__()
                with lock:
                    holding.append(granted)
                    most[0] = max(most[0], len(holding))
                time.sleep(0.05)  # let the others try meanwhile
                return granted

            def __exit__(self_inner, *exc):  # noqa: N805
                with lock:
                    holding.pop()
                return manager.__exit__(*exc)

        return Counted()

    monkeypatch.setattr(pipeline.MemoryBudget, "reserve", reserve)
    budget.peak = 0
    results: list[dict] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(
            score_file(tmp_path / "bundle", tmp_path / f"q{i}.npy", tmp_path / "out", f"q{i}", chunk_rows=4096, memory_budget_mb=7)
        ))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(r["samples"] == 20_000 for r in results)
    assert budget.peak <= budget.limit and budget.in_use == 0
    assert most[0] == 1  # each working set is over half the budget: the batches took turns


def test_a_working_set_larger_than_the_budget_scores_smaller_chunks(tmp_path: Path) -> None:
    import torch

    from seapig_core.bundle import fit_selector

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 1000, (3000,), generator=g)
    fit_selector(torch.randn(3000, 1000, generator=g), labels, scores=["softmax"], temperature=1.0).save(tmp_path / "bundle")
    np.savez_compressed(tmp_path / "q.npz", logits=np.zeros((5000, 1000), dtype=np.float32))  # decompressed: a copy per chunk
    wide = score_file(tmp_path / "bundle", tmp_path / "q.npz", tmp_path / "out", "q", memory_budget_mb=64)
    assert wide["chunk_rows"] < 65_536 and wide["samples"] == 5000
    assert score_file(tmp_path / "bundle", tmp_path / "q.npz", tmp_path / "out", "q", memory_budget_mb=4096)["chunk_rows"] == 65_536
    budget = MemoryBudget(100)
    with budget.reserve(10**9) as granted:  # more than the whole budget: clipped (the caller runs alone)
        assert granted == 100 and budget.in_use == 100
    assert budget.in_use == 0 and budget.peak == 100
    with pytest.raises(ValueError, match="SEAPIG_MEMORY_BUDGET_MB"):
        import os

        os.environ["SEAPIG_MEMORY_BUDGET_MB"] = "lots"
        try:
            memory_budget()
        finally:
            del os.environ["SEAPIG_MEMORY_BUDGET_MB"]
