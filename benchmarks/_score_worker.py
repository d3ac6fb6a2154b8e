"""One side of ``bench_scores.py``: times or memory-profiles ``score()`` in its own process.

Run by ``benchmarks/bench_scores.py``, never imported by the library. The same file runs under
two interpreters so that both sides load the logits and call ``score()`` the same way:

- ``--impl ours``: the project's ``.venv`` and this working tree's ``seapig_core``;
- ``--impl seapig``: ``benchmarks/.venv-seapig`` with seapig 0.3.0 from PyPI (it must not see
  ``seapig_core``).

Modes
-----
``serve``
    Load the ``.npy`` logits once, print one JSON line describing the process, then answer one
    JSON request per stdin line with one JSON line: ``{"op": "time", "score": NAME, "case": CASE}``
    (seconds of one ``score()`` call, and how many cores other processes used meanwhile),
    ``{"op": "floor", "case": CASE, "repeat": R}`` (the same per row-blocked ``torch.exp`` pass,
    averaged over R passes), ``{"op": "dump", "score": NAME, "path": P}`` (save the
    scores as ``.npy``) or ``{"op": "quit"}``. A ``"threads": n`` field first sets
    ``torch.set_num_threads(n)`` for this and later requests. Ours only (issue 10.1):
    ``{"op": "pass"}`` (one ``score_pass`` of the four scores with prediction, runner-up and
    certainty ratio), ``{"op": "pass_chunks", "rows": R}`` (the same per chunk of R rows, each
    chunk canonicalised on its own, as a streaming reader would) and ``{"op": "separate"}``
    (the four ``score()`` calls, ``predict``, ``alternate_label`` and the certainty ratio's
    ``score()``, each validating its input: what one pass replaces).
``mem``
    In a fresh process: load the logits, warm up on a small slice, reset the peak-RSS counter,
    score the whole input once and print the peak resident memory beyond the baseline and the
    output, as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

SCORES = ("softmax", "entropy", "energy", "margin")
_CLASS_NAMES = {"softmax": "SoftmaxScore", "entropy": "EntropyScore", "energy": "EnergyScore", "margin": "MarginScore"}

# Secondary cases (ours only): the same 1M x 100 float32 values, viewed or converted.
#   name -> (task, per_member, builder)
CASES = {
    "multiclass": ("multiclass", False, lambda x: x),
    "float64": ("multiclass", False, lambda x: x.double()),
    "per_member": ("multiclass", True, lambda x: x.view(x.shape[0] // 10, x.shape[1], 10)),
    "multilabel": ("multilabel", False, lambda x: x),
    "binary_1logit": ("binary", False, lambda x: x.view(-1)),
}

# Rows per block of the floor pass: about 1 MiB of logits, like the kernels' blocks.
_FLOOR_BLOCK_BYTES = 1 << 20


def _score_class(impl: str, name: str):
    if impl == "ours":
        # The working tree, whatever is installed in the environment.
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from seapig_core.scores import logits as module
    else:
        from seapig.scores import logits as module
    return getattr(module, _CLASS_NAMES[name])


def _impl_version(impl: str) -> str:
    from importlib import metadata

    if impl == "seapig":
        return metadata.version("seapig")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import seapig_core

    return getattr(seapig_core, "__version__", "working tree")


def floor_pass(x: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor | None:
    """One row-blocked ``exp`` over ``x`` into reused block buffers: the cost of touching
    every logit once with one transcendental, which no score can beat.

    The blocks are shared out to threads exactly as the kernels share theirs
    (``seapig_core.kernels.run_blocks``: single-threaded ops, one buffer per thread), so the
    floor stays a floor on a busy machine, where torch's own intra-op parallel regions stall.
    """
    rows2d = x.reshape(x.shape[0], -1)
    block = max(64, _FLOOR_BLOCK_BYTES // max(rows2d[0].numel() * rows2d.element_size(), 1))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from seapig_core.kernels import run_blocks

    def one(start: int, stop: int, work) -> None:
        chunk = rows2d[start:stop]
        torch.exp(chunk, out=work.take("floor", chunk))

    run_blocks(rows2d.shape[0], block, one)
    return None


def _load(path: str) -> torch.Tensor:
    # np.load reads the whole file into process memory, the same on both sides.
    return torch.from_numpy(np.load(path))


def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def _reset_peak() -> str:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; returns the method used."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        if _status_kb()["VmHWM"] <= _status_kb()["VmRSS"] + 64:
            return "VmHWM reset via /proc/self/clear_refs"
    except OSError:
        pass
    return "ru_maxrss (peak since start; valid while loading the input was the peak so far)"


def busy_cpu_seconds() -> float:
    """CPU seconds that all processes on the machine have run so far (``/proc/stat``, in ticks)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def _timed(fn) -> dict:
    """Wall seconds of ``fn()``, and the cores that *other* processes kept busy meanwhile.

    Other processes' share = machine-wide busy CPU time (``/proc/stat``, 10 ms ticks) minus this
    process's own CPU time, over the wall time: a noise meter that is blind to how fast ``fn``
    is, so the caller can repeat calls that shared the cores without favouring either side.
    """
    busy0, cpu0, start = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    own, busy = time.process_time() - cpu0, busy_cpu_seconds() - busy0
    return {"seconds": wall, "others_cores": max(0.0, busy - own) / wall}


def _pass_ops(x: torch.Tensor) -> dict:
    """The one-pass workloads (ours only): callables by op name."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from seapig_core.kernels import score_pass
    from seapig_core.layout import canonicalize
    from seapig_core.scores.logits import SCORES as REGISTRY
    from seapig_core.scores.logits import CertaintyRatioScore, SoftmaxScore

    names = list(SCORES)

    def one_pass() -> None:
        score_pass(canonicalize(x), names, 1.0, labels=True)

    def pass_chunks(rows: int) -> None:
        for start in range(0, x.shape[0], rows):
            score_pass(canonicalize(x[start : start + rows]), names, 1.0, labels=True)

    def separate() -> None:
        for name in names:
            REGISTRY[name]().score(x)
        SoftmaxScore().predict(x)
        ratio = CertaintyRatioScore()
        ratio.alternate_label(x)
        ratio.score(x)

    return {"pass": one_pass, "pass_chunks": pass_chunks, "separate": separate}


def serve(args: argparse.Namespace) -> None:
    x = _load(args.input)
    case_tensors: dict[str, torch.Tensor] = {"multiclass": x}
    scorers: dict[tuple[str, str], object] = {}
    floor_bufs: dict[str, torch.Tensor] = {}
    pass_ops: dict = {}

    def case_tensor(case: str) -> torch.Tensor:
        if case not in case_tensors:
            case_tensors[case] = CASES[case][2](x)
        return case_tensors[case]

    def scorer(name: str, case: str):
        key = (name, case)
        if key not in scorers:
            task, per_member = CASES[case][:2]
            scorers[key] = _score_class(args.impl, name)(task=task, per_member=per_member)
        return scorers[key]

    info = {
        "ready": True,
        "impl": args.impl,
        "impl_version": _impl_version(args.impl),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "shape": list(x.shape),
        "dtype": str(x.dtype),
    }
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "quit":
            break
        case = req.get("case", "multiclass")
        if req.get("threads") and req["threads"] != torch.get_num_threads():
            torch.set_num_threads(req["threads"])
        if op == "time":
            score, tensor = scorer(req["score"], case), case_tensor(case)
            reply = _timed(lambda: score.score(tensor))
        elif op == "floor":
            tensor = case_tensor(case)

            repeat = int(req.get("repeat", 1))

            def run() -> None:
                for _ in range(repeat):
                    floor_bufs[case] = floor_pass(tensor, floor_bufs.get(case))

            reply = _timed(run)
            reply["seconds"] /= repeat  # per pass; several passes make the noise meter's window longer
        elif op in ("pass", "pass_chunks", "separate"):
            if args.impl != "ours":
                reply = {"error": f"{op} is ours only"}
            else:
                if not pass_ops:
                    pass_ops.update(_pass_ops(x))
                fn = pass_ops[op]
                reply = _timed(lambda: fn(int(req["rows"])) if op == "pass_chunks" else fn())
        elif op == "dump":
            result = scorer(req["score"], case).score(case_tensor(case))
            np.save(req["path"], result.detach().numpy())
            reply = {"saved": req["path"]}
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply), flush=True)


def mem(args: argparse.Namespace) -> None:
    x = _load(args.input)
    if args.score == "floor":
        run = lambda t: floor_pass(t)  # noqa: E731
    else:
        score = _score_class(args.impl, args.score)()
        run = score.score
    # Warm-up on a small slice: lazy imports and thread pools are set up before the baseline.
    run(x[:256])
    method = _reset_peak()
    base = _status_kb()["VmRSS"]
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run(x)
    peak = _status_kb()["VmHWM"] if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not method.startswith("VmHWM"):
        base = base_maxrss
    out_bytes = result.numel() * result.element_size() if args.score != "floor" else 0
    extra_kb = peak - base - out_bytes / 1024
    print(
        json.dumps(
            {
                "impl": args.impl,
                "score": args.score,
                "baseline_kb": base,
                "peak_kb": peak,
                "output_kb": out_bytes / 1024,
                "extra_mib": extra_kb / 1024,
                "method": method,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("serve", "mem"))
    parser.add_argument("--impl", choices=("ours", "seapig"), required=True)
    parser.add_argument("--input", required=True, help="float32 .npy logits")
    parser.add_argument("--score", choices=(*SCORES, "floor"), help="mem mode: what to run")
    args = parser.parse_args()
    serve(args) if args.mode == "serve" else mem(args)


if __name__ == "__main__":
    main()
