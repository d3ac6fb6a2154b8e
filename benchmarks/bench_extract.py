"""Logit extraction and the logits store: cache speed-up, memory, overhead, throughput, checksums.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_extract.py [--quick]

Measures, on this machine, side by side in one run:

(a) **Cache speed-up.** ``SoftmaxScore().fit(model=, loader=, outdir=, prefix=)`` on a
    compute-bound model (a small VGG-style CNN on 3 x 32 x 32 inputs), and on an MLP
    (256 -> 4 x 2048 -> 100) that does far less work per sample: the first fit extracts, the
    next ones are served from the store (they still hash the model's weights, read the loader
    once to fingerprint the data, read the entry (verifying each chunk's checksum as it is
    read) and fit the temperature). Fresh store per repetition; the served time is the median
    of 5 served fits. For the CNN also with ``data_fingerprint=`` given, which skips the loader
    pass.
(b) **Memory.** Peak RSS growth while extracting 2,000,000 x 100 float32 logits (800 MB) from
    a cheap model (one linear layer) into the store, in a fresh subprocess each: after a
    two-batch warm-up of the same path, with record batches of 8,192 rows instead of 65,536,
    without a warm-up (cold), and held in memory (no ``outdir``) for reference. Peak RSS is ``VmHWM``, reset just before the call
    (``/proc/self/clear_refs``); the growth is the peak minus the RSS before the call. Also a
    verified streaming read of the same entry (``iter_chunks(65536)``, summing each chunk): its
    anonymous memory (``RssAnon``, sampled after every chunk) and its peak RSS, which also
    counts the mapped file's pages (clean page cache, not process memory).
(c) **Overhead.** ``extract_logits`` (no store) against a bare ``torch.inference_mode()`` loop
    that calls ``model.logits`` and collects logits and labels, over the same model and
    loader; repetitions interleaved (order alternating), median of the per-pair ratios (and
    the ratio of the fastest runs, robust to stalls from other jobs). Also
    with the store (a miss: hashing the data and writing the file), for reference.
(d) **Store throughput.** Writing 500,000 x 100 logits (200 MB) with labels and ids through
    :class:`seapig_core.store.LogitsWriter` (8,192-row appends gathered into 65,536-row record
    batches, checksummed, fsync'd, with its manifest) against a bare ``pa.ipc.new_file`` loop
    writing the same 65,536-row record batches (interleaved, order alternating); opening; a
    verified chunked read (every logit summed) against pyarrow's unverified chunked read of the
    bare file; materialising ``.logits``; Parquet for reference. Reads come from the page cache.
(e) **A large entry.** 4,000,000 x 100 (1.6 GB): opening it (what a cache hit costs before the
    data is read), a verified chunked read, and, for reference, hashing the whole file with
    SHA-256 (what every read cost with schema version 1) and with xxh3_128.
(f) **Checksums.** Throughput of xxh3_128 (the ``xxhash`` dependency), SHA-256, BLAKE2b and
    CRC-32 over one 256 MB in-memory buffer: why the store depends on ``xxhash``.

torch runs on one intra-op thread by default (``--threads``): on a small shared machine, two
OpenMP threads wait on each other whenever another job holds a core, which made both the
extraction and the temperature fit about 3x slower and swamped every ratio.

Writes ``benchmarks/results/extract.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import xxhash
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import cpu_model  # noqa: E402

from seapig_core import SoftmaxScore  # noqa: E402
from seapig_core._io import file_sha256  # noqa: E402
from seapig_core.extract import extract_logits  # noqa: E402
from seapig_core.store import BATCH_ROWS, LogitsWriter, entry_paths, load_logits  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "extract.md"
MB = 1e6


class MLP(torch.nn.Module):
    def __init__(self, sizes: tuple[int, ...], seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers[:-1])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def batched_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    """A DataLoader that indexes the tensors once per batch (no per-sample collation)."""
    dataset = TensorDataset(x, y)
    sampler = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    return DataLoader(dataset, sampler=sampler, batch_size=None)


def machine() -> str:
    cpu = cpu_model()
    return (
        f"{platform.node()}, {os.cpu_count()} CPUs (nproc), {cpu}, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), pyarrow {pa.__version__}"
    )


# ---------------------------------------------------------------------------- (a)


class CNN(torch.nn.Module):
    """A small VGG-style image classifier for 3 x 32 x 32 inputs: about 190 MFLOP per sample."""

    def __init__(self, n_classes: int = 100) -> None:
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.net = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, n_classes),
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


CACHE_MLP = (256, 2048, 2048, 2048, 2048, 100)


def bench_cache(name: str, model: torch.nn.Module, x: torch.Tensor, repeats: int, named: bool) -> dict:
    """First fit (extracts) against served fits, each repetition in a fresh store."""
    y = torch.randint(0, 100, (len(x),), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, y), batch_size=128)

    def fit(outdir: Path, **kwargs) -> tuple[float, SoftmaxScore]:
        start = time.perf_counter()
        score = SoftmaxScore().fit(model=model, loader=loader, outdir=outdir, prefix="cal", progress=False, **kwargs)
        return time.perf_counter() - start, score

    # Untimed warm-up (thread pools, allocator), so that it does not flatter the first fit.
    SoftmaxScore().fit(model=model, loader=DataLoader(TensorDataset(x[:256], y[:256]), batch_size=128), progress=False)
    rows: dict[str, list[tuple[float, float]]] = {"loader": [], "named": []}
    for _ in range(repeats):
        outdir = Path(tempfile.mkdtemp(prefix="bench-extract-"))
        try:
            for kind, kwargs in (("loader", {}), ("named", {"data_fingerprint": "bench-v1"})):
                if kind == "named" and not named:
                    continue
                t_first, first = fit(outdir / kind, **kwargs)
                # A served fit is short, so one stall of the shared machine would dominate it: median of 5.
                served = [fit(outdir / kind, **kwargs) for _ in range(5)]
                assert all(torch.equal(first.scores, score.scores) for _, score in served)
                rows[kind].append((t_first, statistics.median(t for t, _ in served)))
        finally:
            shutil.rmtree(outdir, ignore_errors=True)
    return {"name": name, "n": len(x), "rows": rows}


# ---------------------------------------------------------------------------- (b)

_RSS_CHILD = r"""
import json, sys, tempfile, shutil, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from seapig_core import store
from seapig_core.extract import extract_logits

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

mode, n, width, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if mode == "store-8192":
    store.BATCH_ROWS = 8192  # smaller record batches: a smaller chunk buffer
torch.manual_seed(0)
model = torch.nn.Linear(8, width)
model.logits = model.forward
x = torch.randn(n, 8)
batches = [(x[i:i + batch],) for i in range(0, n, batch)]
outdir = tempfile.mkdtemp(prefix="bench-rss-") if mode != "memory" else None
if mode != "store-cold":
    # Warm up the same path on two batches: lazy imports, library code pages, allocator pools.
    warm = extract_logits(model, batches[:2], outdir=outdir, prefix="warm" if outdir else None, progress=False)
    if mode == "read":
        sum(float(c.logits.sum()) for c in warm.stored.iter_chunks(65536))
if mode == "read":  # write the entry first, untimed; then measure a verified streaming read of it
    entry = extract_logits(model, batches, outdir=outdir, prefix="big", progress=False).stored
before, anon_before = status("VmRSS"), status("RssAnon")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset VmHWM to the current RSS
start = time.perf_counter()
anon_peak = anon_before
if mode == "read":
    total = 0.0
    for chunk in entry.iter_chunks(65536):  # verified as read
        total += float(chunk.logits.sum())
        anon_peak = max(anon_peak, status("RssAnon"))
    rows, file_bytes = entry.n_samples, entry.path.stat().st_size
else:
    out = extract_logits(model, batches, outdir=outdir, prefix="big" if outdir else None, progress=False)
    rows, file_bytes = out.n_samples, out.path.stat().st_size if out.path else 0
seconds = time.perf_counter() - start
peak = status("VmHWM")
anon_peak = max(anon_peak, status("RssAnon"))
assert rows == n
print(json.dumps({"before": before, "peak": peak, "anon_growth": anon_peak - anon_before, "seconds": seconds,
                  "logits_bytes": n * width * 4, "file_bytes": file_bytes}))
if outdir:
    shutil.rmtree(outdir)
"""


def bench_memory(n: int, width: int, batch: int) -> dict[str, dict]:
    results = {}
    for mode in ("store", "store-8192", "store-cold", "memory", "read"):
        output = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(REPO), mode, str(n), str(width), str(batch)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    return results


# ---------------------------------------------------------------------------- (c)


def bare_loop(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            logits.append(model.logits(x).float().cpu())
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def bench_overhead(n: int, repeats: int) -> dict[str, list[float]]:
    model = MLP((256, 512, 100))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 256, generator=generator)
    y = torch.randint(0, 100, (n,), generator=generator)
    loaders = {
        "DataLoader(TensorDataset, batch_size=256)": DataLoader(TensorDataset(x, y), batch_size=256),
        "batch-indexed DataLoader, 256 rows": batched_loader(x, y, 256),
    }
    ratios: dict[str, list[float]] = {}
    for name, loader in loaders.items():
        expected, _ = bare_loop(model, loader)  # warm up both paths
        got = extract_logits(model, loader, progress=False)
        assert torch.equal(expected, got.logits)
        pairs: list[tuple[float, float]] = []
        store_ratios: list[float] = []
        for rep in range(repeats):
            order = ("bare", "extract") if rep % 2 == 0 else ("extract", "bare")
            times = {}
            for which in order:
                start = time.perf_counter()
                if which == "bare":
                    bare_loop(model, loader)
                else:
                    extract_logits(model, loader, progress=False)
                times[which] = time.perf_counter() - start
            pairs.append((times["bare"], times["extract"]))
        ratios[name] = [e / b for b, e in pairs]
        ratios[name + " times"] = [statistics.median(b for b, _ in pairs), statistics.median(e for _, e in pairs)]
        ratios[name + " min"] = [min(e for _, e in pairs) / min(b for b, _ in pairs)]
        if name.startswith("DataLoader"):
            for rep in range(max(3, repeats // 3)):
                outdir = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
                try:
                    start = time.perf_counter()
                    bare_loop(model, loader)
                    bare = time.perf_counter() - start
                    start = time.perf_counter()
                    extract_logits(model, loader, outdir=outdir, prefix="q", progress=False)
                    store_ratios.append((time.perf_counter() - start) / bare)
                finally:
                    shutil.rmtree(outdir, ignore_errors=True)
            ratios["store"] = store_ratios
    return ratios


# ---------------------------------------------------------------------------- (d)


def _table(logits: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> pa.Table:
    width = logits.shape[1]
    return pa.table(
        {
            "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), width),
            "sample_id": pa.array(ids),
            "label": pa.array(labels),
        }
    )


def _store_write(path: Path, logits: torch.Tensor, labels: torch.Tensor, ids: np.ndarray, block: int) -> None:
    with LogitsWriter(path) as writer:
        for i in range(0, len(ids), block):
            writer.append(logits[i : i + block], labels[i : i + block], ids[i : i + block])
        writer.commit({"key": "bench"})


def _bare_write(path: Path, table: pa.Table) -> None:
    """pyarrow's own IPC writer, the same 64k-row record batches, no checksums, no fsync."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=BATCH_ROWS):
            writer.write_batch(batch)


def bench_throughput(n: int, width: int, block: int, repeats: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n, width)).astype(np.float32)
    labels = rng.integers(0, width, n)
    ids = np.arange(n, dtype=np.int64)
    table = _table(logits, labels, ids)
    tensor_logits, tensor_labels = torch.from_numpy(logits), torch.from_numpy(labels)
    out: dict[str, list[float]] = {k: [] for k in (
        "store write", "pyarrow IPC write (bare loop)", "store open", "pyarrow IPC open (mmap)",
        "store verified chunked read", "pyarrow IPC chunked read (unverified)", "store materialise .logits",
        "Parquet write", "Parquet read",
    )}
    for rep in range(repeats):
        outdir = Path(tempfile.mkdtemp(prefix="bench-store-"))
        try:
            path, _ = entry_paths(outdir, "t")
            plain = outdir / "plain.arrow"
            # Interleaved, order alternating: the machine is shared.
            for which in (("store", "bare") if rep % 2 == 0 else ("bare", "store")):
                start = time.perf_counter()
                if which == "store":
                    _store_write(path, tensor_logits, tensor_labels, ids, block)
                    out["store write"].append(time.perf_counter() - start)
                else:
                    _bare_write(plain, table)
                    out["pyarrow IPC write (bare loop)"].append(time.perf_counter() - start)

            start = time.perf_counter()
            stored = load_logits(path)
            out["store open"].append(time.perf_counter() - start)
            start = time.perf_counter()
            total = sum(float(chunk.logits.sum()) for chunk in stored.iter_chunks(BATCH_ROWS))
            out["store verified chunked read"].append(time.perf_counter() - start)
            assert np.isclose(total, float(logits.sum(dtype=np.float64)), rtol=1e-3)
            start = time.perf_counter()
            materialised = load_logits(path).logits
            out["store materialise .logits"].append(time.perf_counter() - start)
            assert torch.equal(materialised, tensor_logits)
            del stored, materialised

            start = time.perf_counter()
            with pa.memory_map(str(plain), "r") as source:
                reader = pa.ipc.open_file(source)
                out["pyarrow IPC open (mmap)"].append(time.perf_counter() - start)
                start = time.perf_counter()
                total = 0.0
                for i in range(reader.num_record_batches):
                    values = reader.get_batch(i).column(0).values.to_numpy()
                    total += float(torch.from_numpy(values.copy() if not values.flags.writeable else values).sum())
                out["pyarrow IPC chunked read (unverified)"].append(time.perf_counter() - start)

            parquet = outdir / "plain.parquet"
            start = time.perf_counter()
            pq.write_table(table, parquet)
            out["Parquet write"].append(time.perf_counter() - start)
            start = time.perf_counter()
            pq.read_table(parquet)
            out["Parquet read"].append(time.perf_counter() - start)
        finally:
            shutil.rmtree(outdir, ignore_errors=True)
    out["_bytes"] = [float(logits.nbytes)]
    return out


# ---------------------------------------------------------------------------- (e)


def bench_large(n: int, width: int, repeats: int) -> dict[str, list[float]]:
    """A large entry: opening it, reading it verified, and the old whole-file SHA-256 for reference."""
    outdir = Path(tempfile.mkdtemp(prefix="bench-large-"))
    out: dict[str, list[float]] = {"store open": [], "store verified chunked read": [], "whole-file SHA-256": [],
                                   "whole-file xxh3_128": []}
    try:
        path, _ = entry_paths(outdir, "big")
        rng = np.random.default_rng(1)
        block = 1 << 18
        with LogitsWriter(path) as writer:  # generated block by block: never the whole array in memory
            for i in range(0, n, block):
                rows = min(block, n - i)
                values = torch.from_numpy(rng.normal(size=(rows, width)).astype(np.float32))
                writer.append(values, None, np.arange(i, i + rows, dtype=np.int64))
            writer.commit({"key": "bench"})
        size = path.stat().st_size
        for _ in range(repeats):
            start = time.perf_counter()
            stored = load_logits(path)
            out["store open"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for chunk in stored.iter_chunks(BATCH_ROWS):
                chunk.logits.sum()
            out["store verified chunked read"].append(time.perf_counter() - start)
            del stored
            start = time.perf_counter()
            file_sha256(path)  # what every read of schema version 1 cost
            out["whole-file SHA-256"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with open(path, "rb") as handle:
                digest = xxhash.xxh3_128()
                while data := handle.read(1 << 22):
                    digest.update(data)
            out["whole-file xxh3_128"].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    out["_bytes"] = [float(size)]
    return out


# ---------------------------------------------------------------------------- (f)


def bench_checksums(megabytes: int, repeats: int) -> dict[str, float]:
    """Checksum throughput over one in-memory buffer (GB/s, best of ``repeats``): why xxh3_128."""
    data = memoryview(np.random.default_rng(2).integers(0, 255, megabytes << 20, dtype=np.uint8))
    candidates = {
        "xxh3_128 (xxhash)": lambda: xxhash.xxh3_128_hexdigest(data),
        "SHA-256 (hashlib, OpenSSL)": lambda: hashlib.sha256(data).hexdigest(),
        "BLAKE2b (hashlib)": lambda: hashlib.blake2b(data).hexdigest(),
        "CRC-32 (zlib)": lambda: zlib.crc32(data),
    }
    rates = {}
    for name, run in candidates.items():
        best = min(_timed(run) for _ in range(repeats))
        rates[name] = len(data) / best / 1e9
    return rates


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test (not for the table)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: on a shared machine more threads wait on each other)",
    )
    parser.add_argument("--only", default="abcdef", help="sections to run, e.g. 'def' (the table keeps only those)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick, only = args.quick, set(args.only)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    command = "python benchmarks/bench_extract.py" + (" --quick" if quick else "") + (
        f" --threads {args.threads}" if args.threads != 1 else ""
    ) + (f" --only {args.only}" if only != set("abcdef") else "")

    cache, memory, overhead, throughput, large, checksums = [], {}, {}, {}, {}, {}
    if "a" in only:
        print("(a) cache speed-up", flush=True)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(300 if quick else 1_500, 3, 32, 32, generator=generator)
        vectors = torch.randn(2_000 if quick else 20_000, 256, generator=generator)
        repeats = 1 if quick else 3
        cache = [
            bench_cache("VGG-style CNN (4 conv layers, 64-128 channels), 3 x 32 x 32 inputs", CNN(), images, repeats,
                        True),
            bench_cache(f"{'-'.join(map(str, CACHE_MLP))} MLP", MLP(CACHE_MLP), vectors, repeats, False),
        ]
    n_big = 200_000 if quick else 2_000_000
    if "b" in only:
        print("(b) memory", flush=True)
        memory = bench_memory(n=n_big, width=100, batch=8192)
    if "c" in only:
        print("(c) overhead", flush=True)
        overhead = bench_overhead(n=5_000 if quick else 50_000, repeats=3 if quick else 25)
    n_tp = 50_000 if quick else 500_000
    if "d" in only:
        print("(d) throughput", flush=True)
        throughput = bench_throughput(n=n_tp, width=100, block=8192, repeats=1 if quick else 5)
    n_large = 400_000 if quick else 4_000_000
    if "e" in only:
        print("(e) a large entry", flush=True)
        large = bench_large(n=n_large, width=100, repeats=1 if quick else 3)
    if "f" in only:
        print("(f) checksums", flush=True)
        checksums = bench_checksums(32 if quick else 256, repeats=2 if quick else 5)
    elapsed = time.perf_counter() - started
    load = "load average (1 min) %.1f at the start, %.1f at the end" % (load_start, os.getloadavg()[0])

    lines = [
        "## Logit extraction and the logits store",
        "",
        f"Command: `{command}` (from the repository root; {elapsed:.0f} s on {machine()}; {load}).",
        "",
        "Timings are wall-clock medians over repetitions measured in this one run. The machine is shared with "
        "other jobs (see the load average), so single repetitions can be far off; ratios are taken per pair, "
        "interleaved. See the script's docstring for what each row measures.",
        "",
        *(
            [
                f"**Measured under load** (load average {load_start:.1f} on {os.cpu_count()} CPUs): other jobs held the "
                "cores, so absolute times are several times those of a quiet machine and ratios are noisy. Rerun "
                f"`{command}` on a quiet machine before quoting them.",
                "",
            ]
            if load_start > 0.5 * (os.cpu_count() or 1)
            else []
        ),
        "| benchmark | measurement | result | goal |",
        "|---|---|---|---|",
    ]
    for bench in cache:
        for kind, how in (("loader", "data fingerprinted from the loader"), ("named", "`data_fingerprint=` given")):
            rows = bench["rows"][kind]
            if not rows:
                continue
            speedups = [first / served for first, served in rows]
            first_s, served_s = statistics.median(f for f, _ in rows), statistics.median(s for _, s in rows)
            per_store = ", ".join(f"{v:.0f}x" for v in speedups)
            lines.append(
                f"| (a) cache | `SoftmaxScore().fit(model=, loader=, outdir=, prefix=)`, {bench['name']}, "
                f"{bench['n']:,} samples (DataLoader, batch 128), {how}: first fit (extracts) {first_s:.2f} s, "
                f"served fit {served_s:.3f} s | **{statistics.median(speedups):.0f}x** faster (per store: {per_store}) "
                "| >= 10x (compute-bound model) |"
            )
    if memory:
        store, mem, read = memory["store"], memory["memory"], memory["read"]
        logits_mb = store["logits_bytes"] / MB
        lines.append(
            f"| (b) memory | peak RSS growth extracting {n_big:,} x 100 logits ({logits_mb:.0f} MB) from a linear "
            f"layer into the store ({store['seconds']:.1f} s; file {store['file_bytes'] / MB:.0f} MB; record batches "
            f"of {BATCH_ROWS:,} rows) | **{(store['peak'] - store['before']) / MB:.0f} MB** "
            f"({(store['peak'] - store['before']) / store['logits_bytes']:.1%} of the logits) | well below "
            f"{logits_mb:.0f} MB |"
        )
        small = memory["store-8192"]
        lines.append(
            f"| (b) memory, smaller batches | the same with record batches of 8,192 rows ({small['seconds']:.1f} s) | "
            f"{(small['peak'] - small['before']) / MB:.0f} MB | - |"
        )
        cold = memory["store-cold"]
        lines.append(
            f"| (b) memory, cold | the same, as the first extraction of a fresh process (no warm-up: includes paging "
            f"in pyarrow's code and allocator pools once) | {(cold['peak'] - cold['before']) / MB:.0f} MB | - |"
        )
        lines.append(
            f"| (b) memory, reference | the same extraction held in memory (no `outdir`; {mem['seconds']:.1f} s) | "
            f"{(mem['peak'] - mem['before']) / MB:.0f} MB | - |"
        )
        lines.append(
            f"| (b) memory, streaming read | verified `iter_chunks(65536)` over that entry, summing each chunk "
            f"({read['seconds']:.2f} s) | **{read['anon_growth'] / MB:.0f} MB** anonymous memory; peak RSS "
            f"+{(read['peak'] - read['before']) / MB:.0f} MB counting the mapped file's page cache | bounded by a "
            "chunk |"
        )
    for name, values in overhead.items():
        if name.endswith((" times", " min")) or name == "store":
            continue
        bare, ext = overhead[name + " times"]
        fastest = overhead[name + " min"][0]
        lines.append(
            f"| (c) overhead | `extract_logits` / bare `inference_mode` loop, 256-512-100 MLP, "
            f"{5_000 if quick else 50_000:,} samples, {name} (medians {ext:.3f} s vs {bare:.3f} s, {len(values)} "
            f"interleaved pairs) | **{statistics.median(values):.3f}** (pairs {min(values):.3f}-{max(values):.3f}; "
            f"fastest run against fastest run {fastest:.3f}) | <= 1.05 |"
        )
    if overhead:
        lines.append(
            f"| (c) overhead, with store | `extract_logits(outdir=...)` (a miss: hashes the data, streams to disk, "
            f"checksums, fsync) / bare loop, DataLoader(TensorDataset) | {statistics.median(overhead['store']):.3f} | - |"
        )
    if throughput:
        size = throughput.pop("_bytes")[0]
        ratio = [s / b for s, b in zip(throughput["store write"], throughput["pyarrow IPC write (bare loop)"],
                                       strict=True)]
        for name, times in throughput.items():
            t = statistics.median(times)
            if "open" in name:
                result = f"**{t * 1000:.2f} ms** to open (memory-mapped; does not grow with the size)"
            else:
                result = f"**{size / MB / t:,.0f} MB/s** ({t * 1000:.0f} ms)"
            if name == "store write":
                result += f"; {statistics.median(ratio):.2f}x the bare loop's time (median of {len(ratio)} pairs)"
            lines.append(
                f"| (d) throughput | {name}, {n_tp:,} x 100 float32 ({size / MB:.0f} MB of logits) + labels + ids "
                f"| {result} | - |"
            )
    if large:
        size = large.pop("_bytes")[0]
        for name, times in large.items():
            t = statistics.median(times)
            result = f"**{t * 1000:.1f} ms**" if "open" in name else f"**{t:.2f} s** ({size / MB / t:,.0f} MB/s)"
            lines.append(
                f"| (e) large entry | {name}, {n_large:,} x 100 float32 + ids (file {size / MB:,.0f} MB) | {result} "
                f"| {'milliseconds' if 'open' in name else '-'} |"
            )
    for name, rate in checksums.items():
        lines.append(f"| (f) checksum | {name}, one {32 if quick else 256} MB buffer | **{rate:.2f} GB/s** | - |")
    lines += [
        "",
        "Notes: a served fit in (a) reads the loader once (to fingerprint the data; pass `data_fingerprint=` to skip "
        "it), hashes the model's weights, opens the entry (footer checksum), and materialises the logits, verifying "
        "each chunk's xxh3_128 checksum in the same pass. Store writes include the checksums, `fsync` and the "
        "manifest (the bare pyarrow loop does neither). The store's open checks the manifest, the size, the footer's "
        "checksum and the schema; it reads no chunk. A verified read hashes each chunk as it reads it; the "
        "whole-file SHA-256 in (e) is what schema version 1 paid on every read before any data was used.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not quick:
        RESULTS.write_text("\n".join(lines))
        print(f"wrote {RESULTS}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
