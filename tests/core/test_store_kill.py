"""Writers killed with SIGKILL (kill -9) at any point of an extraction into the store (issue 8.4).

Each writer is a real process (forked from a forkserver that has imported torch once), paused at
a chosen point by its loader or just before its manifest, or stopped at a random moment, then
killed. Afterwards no partial entry is ever served, and the next write in the directory leaves
no temporary file behind; a live writer's temporaries are never touched by another's write.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
import warnings

import pytest
import torch

from seapig_core._io import is_temporary_name
from seapig_core.extract import extract_logits
from seapig_core.store import CorruptEntryWarning, entry_paths, is_entry, load_logits, lookup
from tests.core.extract_models import LinearNet, extract_in_child, tensor_loader, wait_for

pytestmark = pytest.mark.slow

N, BATCH = 96, 8  # 12 batches; the writers write record batches of 16 rows


@pytest.fixture(scope="module")
def context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.core.extract_models", "seapig_core.extract"])
    return ctx


def expected(seed: int) -> torch.Tensor:
    return extract_logits(LinearNet(seed=seed), tensor_loader(N, BATCH), progress=False).logits


def temporaries(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if is_temporary_name(p.name))


def visible(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def start(context, tmp_path, name="w", **options):
    ready, go = str(tmp_path / f"{name}.ready"), str(tmp_path / f"{name}.go")
    kwargs = {"outdir": str(tmp_path / "store"), "prefix": "cal", "seed": 0, "n": N, "batch_size": BATCH,
              "ready": ready, "go": go, **options}
    process = context.Process(target=extract_in_child, kwargs=kwargs)
    process.start()
    return process, ready, go


def kill(process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(30)
    assert process.exitcode == -signal.SIGKILL


def run(outdir, seed: int = 0, prefix: str = "cal", **options):
    return extract_logits(LinearNet(seed=seed), tensor_loader(N, BATCH), outdir=outdir, prefix=prefix, progress=False,
                          **options)


def served_now(outdir):
    """What a reader asking for the recorded fingerprint would be served (None: nothing)."""
    _, manifest_path = entry_paths(outdir, "cal")
    try:
        recorded = json.loads(manifest_path.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptEntryWarning)
        return lookup(outdir, "cal", recorded)


def check_nothing_partial(outdir, valid: list[torch.Tensor]) -> None:
    assert all(is_entry(outdir / name) or name.endswith(".logits.json") for name in visible(outdir))
    served = served_now(outdir)
    if served is not None:  # whatever is served under the entry's name is one complete extraction, verified
        assert any(torch.equal(served.logits, v) for v in valid)


def check_recovers(outdir, seed: int) -> None:
    """The next run gives the right entry; the next write leaves no temporary file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptEntryWarning)
        out = run(outdir, seed)
    assert torch.equal(out.logits, expected(seed))
    if out.from_cache:  # nothing was written: write another entry in the directory
        run(outdir, seed, prefix="other")
    assert temporaries(outdir) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(outdir, seed).from_cache


POINTS = {
    # name: (writer options, seed of an entry written first or None)
    "fingerprinting the data for a lookup": ({"pause_pass": 1, "pause_at": 2}, 0),
    "mid-extraction, no entry yet": ({"pause_pass": 1, "pause_at": 5}, None),
    "mid-refresh over an existing entry": ({"pause_pass": 1, "pause_at": 5, "refresh": True, "seed": 2}, 1),
    "after the last batch, before the footer": ({"pause_pass": 1, "pause_at": 12, "refresh": True}, None),
    "after the data file, before its manifest": ({"pause_before_manifest": True, "refresh": True, "seed": 2}, 1),
}


@pytest.mark.parametrize("point", sorted(POINTS))
def test_kill_minus_9_at_each_point_never_serves_a_partial_entry(context, tmp_path, point):
    outdir = tmp_path / "store"
    options, existing = POINTS[point]
    if existing is not None:
        run(outdir, seed=existing)
    process, ready, _ = start(context, tmp_path, **options)
    wait_for(ready)
    if "footer" in point or "mid-" in point:
        assert temporaries(outdir)  # killed while writing its temporary data file
    kill(process)
    data_path, manifest_path = entry_paths(outdir, "cal")
    if "manifest" in point:
        # The new data file is in place without a manifest: never read unverified, never served.
        assert data_path.exists() and not manifest_path.exists()
        with pytest.raises(ValueError, match=r"has no manifest"):
            load_logits(data_path)
        with pytest.warns(CorruptEntryWarning, match=r"has no manifest"):
            run(outdir, seed=options.get("seed", 0))
    check_nothing_partial(outdir, [expected(0), expected(1), expected(2)])
    check_recovers(outdir, options.get("seed", 0))


def test_kill_minus_9_at_random_moments(context, tmp_path):
    outdir = tmp_path / "store"
    rng = random.Random(8)
    valid = [expected(0), expected(3)]
    run(outdir, seed=3)
    for attempt in range(4):
        # A slow writer (5 ms a batch) refreshing the entry, with one model or the other, killed at a random moment.
        process, ready, go = start(context, tmp_path, name=f"r{attempt}", seed=3 * (attempt % 2), refresh=True,
                                   sleep=0.005, pause_pass=1, pause_at=0)
        wait_for(ready)  # forked and ready: let it run, and kill it somewhere
        open(go, "w").close()
        time.sleep(rng.uniform(0.0, 0.3))
        if process.is_alive():
            kill(process)
        process.join(60)
        check_nothing_partial(outdir, valid)
    check_recovers(outdir, 3)


def test_a_live_writers_temporaries_are_never_removed_by_another_write(context, tmp_path):
    outdir = tmp_path / "store"
    outdir.mkdir()
    process, ready, go = start(context, tmp_path, pause_pass=1, pause_at=6)
    wait_for(ready)
    mine = temporaries(outdir)
    assert mine  # the paused writer's data file in progress
    run(outdir, seed=5, prefix="other")  # another process writes in the same directory (and sweeps)
    assert set(mine) <= set(temporaries(outdir))
    open(go, "w").close()  # the first writer goes on and finishes
    process.join(120)
    assert process.exitcode == 0
    out = run(outdir, seed=0)
    assert out.from_cache and torch.equal(out.logits, expected(0))
    assert temporaries(outdir) == []
    assert visible(outdir) == ["cal.logits.arrow", "cal.logits.json", "other.logits.arrow", "other.logits.json"]
