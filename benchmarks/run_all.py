"""Run every benchmark and collect their Markdown tables into benchmarks/RESULTS.md.

Usage (from the repository root)::

    make bench                          # or:
    .venv/bin/python benchmarks/run_all.py [--only scores extract risk metrics inbox pipeline dask]

Each ``benchmarks/bench_<name>.py`` writes its own table, with the command that produced it,
to ``benchmarks/results/<name>.md``; this script runs them one after the other (never in
parallel: they time things) and concatenates the tables.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ORDER = ("scores", "extract", "risk", "metrics", "inbox", "pipeline", "dask")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=ORDER, default=list(ORDER), help="benchmarks to run")
    parser.add_argument("--collect-only", action="store_true", help="only rebuild RESULTS.md from results/")
    args = parser.parse_args()

    failed = []
    if not args.collect_only:
        for name in args.only:
            script = HERE / f"bench_{name}.py"
            print(f"== {script.relative_to(HERE.parent)}", flush=True)
            start = time.perf_counter()
            code = subprocess.call([sys.executable, str(script)], cwd=HERE.parent)
            print(f"== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
            if code:
                failed.append(name)

    parts = [
        "# Benchmark results\n",
        "Produced by `make bench` (`.venv/bin/python benchmarks/run_all.py`); each section names the "
        "exact command that produced it and the machine it ran on. Ratios are measured side by side, "
        "interleaved, in one run on one machine.\n",
    ]
    for name in ORDER:
        table = RESULTS / f"{name}.md"
        if table.is_file():
            parts.append(table.read_text().strip() + "\n")
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'} ({platform.node()})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
