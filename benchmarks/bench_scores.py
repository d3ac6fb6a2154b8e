"""Benchmark ``score()`` of seapig-core against seapig 0.3.0 from PyPI on the same logits.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_scores.py            # the full run, a few minutes
    .venv/bin/python benchmarks/bench_scores.py --rows 100000 --reps 3   # a quick look

What it does, in one run:

1. Creates ``benchmarks/.venv-seapig`` once (idempotent): ``python -m venv``, then
   ``pip install torch==2.13.0`` first (the CPU wheel that lies on these machines; an unpinned
   torch would pull the CUDA build), then ``pip install seapig==0.3.0`` with its dependencies
   (faiss-cpu, lightning, torchmetrics, tqdm, pandas). seapig is never a project dependency.
2. Draws seeded ``N(0, 3^2)`` float32 logits (default 1,000,000 x 100) once and saves them as
   ``.npy`` in a temporary directory; both sides load that file with ``np.load``.
3. Starts one worker process per side (``benchmarks/_score_worker.py``), each in its own
   environment, and times ``score()`` of Softmax, Entropy, Energy and Margin interleaved:
   every repetition runs ours and seapig's back to back (the order alternates), plus the
   "floor", one row-blocked ``torch.exp`` pass over the same tensor, at torch's default thread
   count and again at 1 thread. Reports medians, and speedups as medians of the
   per-repetition ratios. The machine is shared: calls wait for idle cores and a call that
   other processes disturbed is repeated (:class:`NoiseGuard`); the report says how often.
4. Measures the peak extra resident memory of each ``score()`` call in a fresh process per
   measurement (see the method note in the output).
5. Times ours on the other layouts (float64, per-member, multilabel, single-logit binary).
6. Writes a Markdown table, with the command that produced it, to
   ``benchmarks/results/scores.md`` and prints it.

Targets (issue 2, acceptance item 5): each score at least 3x faster than seapig 0.3.0, and at
most 64 MiB of memory beyond the input and the output while scoring. ``--strict`` makes a
missed target exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402
from _score_worker import _FLOOR_BLOCK_BYTES, busy_cpu_seconds  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "_score_worker.py"
SEAPIG_VENV = HERE / ".venv-seapig"
RESULTS = HERE / "results" / "scores.md"

SEAPIG_SPEC = "seapig==0.3.0"
TORCH_SPEC = "torch==2.13.0"
SCORES = ("softmax", "entropy", "energy", "margin")
SECONDARY = ("float64", "per_member", "multilabel", "binary_1logit")
SPEEDUP_TARGET = 3.0
MEMORY_TARGET_MIB = 64.0
# Imported after install to check that seapig's declared dependencies really work.
SEAPIG_IMPORT_CHECK = "import seapig.scores.logits, faiss, lightning, torchmetrics, tqdm, pandas"


def log(message: str) -> None:
    print(f"[bench_scores] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- seapig's environment


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _seapig_env_ok(python: Path) -> bool:
    if not python.exists():
        return False
    check = (
        "from importlib import metadata as m; "
        f"assert m.version('seapig') == '{SEAPIG_SPEC.split('==')[1]}'; "
        f"assert m.version('torch').split('+')[0] == '{TORCH_SPEC.split('==')[1]}'; "
        f"{SEAPIG_IMPORT_CHECK}"
    )
    return subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0


def ensure_seapig_env(venv: Path = SEAPIG_VENV) -> Path:
    """Create ``venv`` with torch and seapig 0.3.0 unless it already works; return its python."""
    python = _venv_python(venv)
    if _seapig_env_ok(python):
        return python
    log(f"creating {venv} (once; about a minute)")
    if not python.exists():
        # The same interpreter version as ours, so both sides run the same Python.
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    # torch first and pinned: seapig's unpinned torch requirement would otherwise resolve to the
    # newest CUDA build (several GB).
    for spec in (TORCH_SPEC, SEAPIG_SPEC):
        log(f"pip install {spec}")
        result = subprocess.run([*pip, spec], capture_output=True, text=True)
        if result.returncode:
            sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
            raise SystemExit(f"pip install {spec} failed in {venv}")
    if not _seapig_env_ok(python):
        check = subprocess.run([str(python), "-c", SEAPIG_IMPORT_CHECK], capture_output=True, text=True)
        raise SystemExit(f"seapig's environment does not import cleanly:\n{check.stderr[-4000:]}")
    return python


# --------------------------------------------------------------------------- workers


class Worker:
    """A ``_score_worker.py serve`` process answering one JSON request per line."""

    def __init__(self, python: Path | str, impl: str, data: Path) -> None:
        cmd = [str(python), str(WORKER), "serve", "--impl", impl, "--input", str(data)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def measure_memory(python: Path | str, impl: str, score: str, data: Path) -> dict:
    """Peak extra RSS of one ``score()`` call, in a fresh process."""
    cmd = [str(python), str(WORKER), "mem", "--impl", impl, "--score", score, "--input", str(data)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"memory probe {impl}/{score} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- measurement


def machine() -> dict[str, str]:
    model = cpu_model()
    return {"nproc": str(os.cpu_count()), "cpu": model, "platform": platform.platform()}


def make_logits(path: Path, rows: int, cols: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols), dtype=np.float32)
    x *= 3.0
    np.save(path, x)


def _median(values: list[float]) -> float:
    return statistics.median(values)


class NoiseGuard:
    """Keeps timed calls off a busy machine, by the same rule for both sides.

    Before a call it waits (within a total budget) until other processes leave the cores idle;
    a call during which other processes kept more than ``QUIET_CORES`` cores busy on average
    (``/proc/stat`` minus the worker's own CPU time) is repeated, up to ``MAX_RETRIES`` times
    within a budget, and the last attempt is kept. Every kept call's reading is reported.
    """

    QUIET_CORES = 0.5
    MAX_RETRIES = 2

    def __init__(self, wait_budget: float = 90.0, retry_budget: float = 120.0) -> None:
        self.wait_left, self.retry_left = wait_budget, retry_budget
        self.calls = self.retried = self.noisy = 0
        self.others: list[float] = []
        self.waited = 0.0

    def _wait_quiet(self, window: float = 0.2, max_wait: float = 3.0) -> None:
        deadline = time.perf_counter() + min(max_wait, self.wait_left)
        while time.perf_counter() < deadline:
            start, busy0 = time.perf_counter(), busy_cpu_seconds()
            time.sleep(window)
            elapsed = time.perf_counter() - start
            if (busy_cpu_seconds() - busy0) / elapsed <= self.QUIET_CORES:
                break
        spent = min(max_wait, self.wait_left) - max(0.0, deadline - time.perf_counter())
        self.wait_left -= spent
        self.waited += spent

    def time(self, worker: Worker, **request) -> float:
        for attempt in range(self.MAX_RETRIES + 1):
            self._wait_quiet()
            reply = worker.ask(**request)
            if reply["others_cores"] <= self.QUIET_CORES or attempt == self.MAX_RETRIES:
                break
            if self.retry_left <= 0:
                break
            self.retry_left -= reply["seconds"] * request.get("repeat", 1)
            self.retried += 1
        self.calls += 1
        self.others.append(reply["others_cores"])
        self.noisy += reply["others_cores"] > self.QUIET_CORES
        return reply["seconds"]

    def summary(self) -> str:
        others = sorted(self.others)
        return (
            f"{self.calls} timed calls; other processes kept a median of {statistics.median(others):.2f} "
            f"and at most {others[-1]:.2f} of the cores busy during a kept call; {self.retried} calls "
            f"were repeated because others used more than {self.QUIET_CORES:g} core, {self.noisy} kept "
            f"calls still exceeded that; {self.waited:.0f} s spent waiting for idle cores"
        )


FLOOR_REPEAT = 4  # passes per floor measurement: a ~0.1 s window for the noise meter


def time_main(ours: Worker, theirs: Worker, reps: int, threads: list[int], guard: NoiseGuard) -> dict:
    """Interleaved timings: per repetition and thread count, the floor and each score on both sides."""
    times: dict[str, list[float]] = {}
    for rep in range(reps):
        for th in threads:
            floor = guard.time(ours, op="floor", threads=th, repeat=FLOOR_REPEAT)
            times.setdefault(f"floor:{th}", []).append(floor)
            for i, name in enumerate(SCORES):
                # Alternate who goes first, so a slow drift of the machine hits both sides alike.
                pair = ((ours, "ours"), (theirs, "seapig"))
                for worker, side in pair if (rep + i) % 2 == 0 else pair[::-1]:
                    seconds = guard.time(worker, op="time", score=name, threads=th)
                    times.setdefault(f"{side}:{name}:{th}", []).append(seconds)
            floor = guard.time(ours, op="floor", threads=th, repeat=FLOOR_REPEAT)
            times[f"floor:{th}"].append(floor)
        log(f"rep {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()))
    return times


def time_secondary(ours: Worker, reps: int, threads: list[int], guard: NoiseGuard) -> dict:
    times: dict[str, list[float]] = {}
    for rep in range(reps):
        for th in threads:
            for case in SECONDARY:
                floor = guard.time(ours, op="floor", case=case, threads=th, repeat=FLOOR_REPEAT)
                times.setdefault(f"floor:{case}:{th}", []).append(floor)
                for name in SCORES:
                    seconds = guard.time(ours, op="time", score=name, case=case, threads=th)
                    times.setdefault(f"{name}:{case}:{th}", []).append(seconds)
        log(f"other layouts: rep {rep + 1}/{reps} done")
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-repetition ratios ``num / den`` (measured side by side)."""
    return _median([a / b for a, b in zip(num, den, strict=True)])


def floor_per_rep(floor: list[float]) -> list[float]:
    """The two floor passes of a repetition (before and after), averaged."""
    return [(floor[i] + floor[i + 1]) / 2 for i in range(0, len(floor), 2)]


# --------------------------------------------------------------------------- report


def render(ctx: dict) -> str:
    t, mem, th = ctx["times"], ctx["memory"], ctx["threads"]
    default = th[0]
    floor = floor_per_rep(t[f"floor:{default}"])
    one = 1 if 1 in th and default != 1 else None
    lines = [
        "## Scores: seapig-core vs seapig 0.3.0",
        "",
        f"Command: `{ctx['command']}` (from the repository root)  ",
        f"Date: {ctx['date']}  ",
        f"Machine: {ctx['machine']['cpu']}, nproc = {ctx['machine']['nproc']}, {ctx['machine']['platform']}  ",
        f"torch threads (torch.get_num_threads()): ours {ctx['ours']['threads']}, seapig {ctx['seapig']['threads']}; "
        f"torch {ctx['ours']['torch']} (both), numpy {ctx['ours']['numpy']}, Python {ctx['ours']['python']}; "
        f"seapig-core {ctx['ours']['impl_version']}, seapig {ctx['seapig']['impl_version']}  ",
        f"Input: {ctx['rows']:,} x {ctx['cols']} float32 logits, N(0, 3^2), seed {ctx['seed']}, "
        "one `.npy` file that both sides `np.load`.  ",
        f"Noise: {ctx['noise_main']}.",
        "",
        f"| score | ours (ms) | seapig 0.3.0 (ms) | speedup, {default} threads "
        + ("| speedup, 1 thread (ours / seapig ms) " if one else "")
        + "| ours / floor | ours peak extra (MiB) | seapig peak extra (MiB) | max abs diff vs seapig | target met |",
        "|---|---:|---:|---:|" + ("---:|" if one else "") + "---:|---:|---:|---:|---|",
    ]
    all_fast, all_small = True, True
    for name in SCORES:
        ours_t, theirs_t = t[f"ours:{name}:{default}"], t[f"seapig:{name}:{default}"]
        speedup = paired_ratio(theirs_t, ours_t)
        vs_floor = paired_ratio(ours_t, floor)
        ours_mem, theirs_mem = mem[f"ours:{name}"]["extra_mib"], mem[f"seapig:{name}"]["extra_mib"]
        fast, small = speedup >= SPEEDUP_TARGET, ours_mem < MEMORY_TARGET_MIB
        all_fast &= fast
        all_small &= small
        misses = [*(["< 3x"] if not fast else []), *(["memory"] if not small else [])]
        single = ""
        if one:
            o1, s1 = t[f"ours:{name}:1"], t[f"seapig:{name}:1"]
            single = f"| {paired_ratio(s1, o1):.1f}x ({_median(o1) * 1e3:.0f} / {_median(s1) * 1e3:.0f}) "
        lines.append(
            f"| {name} | {_median(ours_t) * 1e3:.1f} | {_median(theirs_t) * 1e3:.1f} | {speedup:.1f}x {single}"
            f"| {vs_floor:.1f}x | {ours_mem:.1f} | {theirs_mem:.1f} | {ctx['diffs'][name]:.2g} "
            f"| {'yes' if not misses else 'no: ' + ', '.join(misses)} |"
        )
    floor_single = f"| 1 thread: {_median(floor_per_rep(t['floor:1'])) * 1e3:.1f} ms " if one else ""
    lines.append(
        f"| floor: one row-blocked `torch.exp` pass | {_median(floor) * 1e3:.1f} | | {floor_single}"
        f"| 1.0x | {mem['ours:floor']['extra_mib']:.1f} | | | |"
    )
    lines += [
        "",
        f"Targets ({default} threads, the default): every score >= {SPEEDUP_TARGET:g}x faster than seapig 0.3.0: "
        f"**{'met' if all_fast else 'MISSED'}**; peak extra memory < {MEMORY_TARGET_MIB:g} MiB: "
        f"**{'met' if all_small else 'MISSED'}**.",
        "",
        "Method:",
        "",
        f"- Time: wall clock of one `Score().score(logits)` call (the score object built once per side), "
        f"{ctx['reps']} repetitions after one warm-up call. Each side runs in its own persistent worker "
        "process and environment; within a repetition each score runs on both sides back to back, "
        "the order alternating, and the floor runs at the start and the end of the repetition. "
        "Times are medians; speedup (seapig / ours) and ours / floor are medians of the "
        "per-repetition ratios."
        + (
            f" Every repetition runs at the default {default} threads and again at 1 thread "
            "(`torch.set_num_threads(1)` on both sides)."
            if one
            else ""
        ),
        f"- Noise: the machine is shared. Before each call the benchmark waits (within a budget) "
        f"for the cores to go idle, and a call during which other processes kept more than "
        f"{NoiseGuard.QUIET_CORES:g} core busy is repeated (at most {NoiseGuard.MAX_RETRIES} times, "
        "within a budget; the last attempt is kept). The meter is machine-wide busy CPU time from "
        "`/proc/stat` minus the worker's own CPU time, and the same rule applies to both sides; it "
        "helps ours more, because ours is the more sensitive to a busy machine at the default "
        "thread count: when another process "
        "holds a core, every short parallel region of a row-blocked kernel (a few per block of "
        "~2,600 rows) can wait a scheduler slice for its second thread, which has slowed ours "
        "tenfold and more here, while seapig's few whole-tensor operations slowed about 2x. At 1 "
        "thread there are no such stalls.",
        "- Floor: `torch.exp(block, out=buf)` over the same tensor in blocks of about 1 MiB "
        f"({ctx['floor_rows']:,} rows), into one reused buffer: touching every logit once with one "
        "transcendental, which no score can beat.",
        f"- Memory: a fresh process per measurement loads the input, warms up on 256 rows, then resets "
        f"the peak counter ({ctx['memory_method']}); peak extra = peak RSS during one `score()` call "
        "- RSS before it - the output's bytes (4 B x N).",
        "- Max abs diff: largest |ours - seapig| over all samples (seapig's entropy clamps "
        "probabilities at 1e-12, so small differences there are seapig's).",
        "",
        "### Other layouts (seapig-core only)",
        "",
        "The same 100M float32 values, viewed or converted; median ms, and in parentheses the "
        "median ratio to a floor pass over the same tensor. "
        f"Noise: {ctx['noise_secondary']}.",
        "",
        "| layout | shape | threads | " + " | ".join(SCORES) + " | floor (ms) |",
        "|---|---|---:|" + "---:|" * (len(SCORES) + 1),
    ]
    shapes = {
        "float64": f"({ctx['rows']:,}, {ctx['cols']}) float64",
        "per_member": f"({ctx['rows'] // 10:,}, {ctx['cols']}, 10), per_member=True",
        "multilabel": f"({ctx['rows']:,}, {ctx['cols']}), task='multilabel'",
        "binary_1logit": f"({ctx['rows'] * ctx['cols']:,},), task='binary'",
    }
    sec = ctx["secondary"]
    for case in SECONDARY:
        for n_threads in th:
            f = sec[f"floor:{case}:{n_threads}"]
            cells = [
                f"{_median(v) * 1e3:.1f} ({paired_ratio(v, f):.1f}x)"
                for v in (sec[f"{name}:{case}:{n_threads}"] for name in SCORES)
            ]
            lines.append(
                f"| {case} | {shapes[case]} | {n_threads} | " + " | ".join(cells) + f" | {_median(f) * 1e3:.1f} |"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="samples (default 1,000,000)")
    parser.add_argument("--cols", type=int, default=100, help="classes (default 100)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    parser.add_argument("--secondary-reps", type=int, default=3, help="repetitions of the other layouts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS, help="Markdown file to write")
    parser.add_argument("--no-single", action="store_true", help="skip the 1-thread repetitions")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    if args.rows % 10:
        parser.error("--rows must be a multiple of 10 (the per-member layout uses 10 members)")

    command = " ".join([".venv/bin/python", "benchmarks/bench_scores.py", *map(shlex.quote, sys.argv[1:])])
    started = time.perf_counter()
    seapig_python = ensure_seapig_env()

    with tempfile.TemporaryDirectory(prefix="bench_scores_") as tmp:
        data = Path(tmp) / "logits.npy"
        log(f"drawing {args.rows:,} x {args.cols} logits (seed {args.seed})")
        make_logits(data, args.rows, args.cols, args.seed)

        ours = Worker(sys.executable, "ours", data)
        theirs = Worker(seapig_python, "seapig", data)
        threads = [ours.info["threads"], *([1] if ours.info["threads"] != 1 and not args.no_single else [])]
        try:
            # Warm-up calls also save each side's scores, to check that both compute the same thing.
            diffs = {}
            for name in SCORES:
                paths = [Path(tmp) / f"{side}_{name}.npy" for side in ("ours", "seapig")]
                ours.ask(op="dump", score=name, path=str(paths[0]))
                theirs.ask(op="dump", score=name, path=str(paths[1]))
                a, b = (np.load(p).astype(np.float64).reshape(-1) for p in paths)
                diffs[name] = float(np.nanmax(np.abs(a - b)))
            ours.ask(op="floor")
            guard = NoiseGuard()
            times = time_main(ours, theirs, args.reps, threads, guard)
            noise_main = guard.summary()
            theirs.close()
            for name in SCORES:
                ours.ask(op="time", score=name, case=SECONDARY[0], threads=threads[0])  # builds the float64 copy
            guard = NoiseGuard(wait_budget=30.0, retry_budget=30.0)
            secondary = time_secondary(ours, args.secondary_reps, threads, guard)
            noise_secondary = guard.summary()
        finally:
            ours.close()
            theirs.close()

        memory = {}
        for side, python in (("ours", sys.executable), ("seapig", seapig_python)):
            for name in (*SCORES, "floor") if side == "ours" else SCORES:
                memory[f"{side}:{name}"] = measure_memory(python, side, name, data)
                log(f"memory {side}:{name}: {memory[f'{side}:{name}']['extra_mib']:.1f} MiB")

    ctx = {
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "ours": ours.info,
        "seapig": theirs.info,
        "rows": args.rows,
        "cols": args.cols,
        "seed": args.seed,
        "reps": args.reps,
        "threads": threads,
        "times": times,
        "secondary": secondary,
        "memory": memory,
        "memory_method": memory["ours:softmax"]["method"],
        "noise_main": noise_main,
        "noise_secondary": noise_secondary,
        "diffs": diffs,
        "floor_rows": max(64, _FLOOR_BLOCK_BYTES // (args.cols * 4)),
    }
    table = render(ctx)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    print(table)
    log(f"wrote {args.output} in {time.perf_counter() - started:.0f} s")
    missed = "MISSED" in table.split("Method:")[0]
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
