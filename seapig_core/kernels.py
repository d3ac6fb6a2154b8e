"""Pure score kernels on the canonical logit layout, and the one pass that runs them.

:func:`score_pass` walks the rows of validated :class:`~seapig_core.layout.CanonicalLogits` once,
block by block, and produces every requested score, and (with ``labels=True``) the predicted
label, the runner-up label and the top-2 certainty ratio: one finiteness test, one row max and
one top-2 per block, whatever is requested. :func:`compute_scores`, :func:`predict` and
:func:`runner_up` are that pass with one output.

Each score is a :class:`ScoreKernel`: two small functions of one block, one for the categorical
family (softmax over the K units) and one for the bernoulli family (K independent sigmoids).
They read what they need from a block object (:class:`CategoricalBlock`,
:class:`BernoulliBlock`) that computes each shared quantity once per block (the row max, the
top-2 gap, the exponential sum, the smallest logit magnitude), so that asking for several
scores costs little more than asking for one, and a score's value does not depend on what else
was asked for.

One score reads no class logits: ``confidence``, ``-sigmoid(c)`` of a learned confidence head's
logit ``c`` (:attr:`seapig_core.layout.CanonicalLogits.confidence`, present when the logits
were validated with ``confidence_head=True``). Its kernel is a function of the confidence block
alone (:attr:`ScoreKernel.confidence`); the pass runs it beside the class-logit kernels.

Conventions: ``beta = 1 / T`` is the inverse temperature; every score is *higher when more
uncertain*. Bernoulli blocks hold ``|z|`` for single-logit binary (see
:meth:`seapig_core.layout.CanonicalLogits.scoring_block`) and signed logits for multilabel.

Numerics. Scores are computed from logit differences, never from rounded probabilities, so
they keep their ranking where float32 probabilities round to exactly 0 or 1 whenever the
returned value can represent it: the certainty ratio is ``exp(-(z_(1) - z_(2)) / T)`` (distinct
down to about 1e-45 in float32), the entropy sums the non-top terms separately
(``log1p(t) + ...`` with ``t = sum_{k != top} exp(beta (z_k - z_max))``) instead of subtracting
from ``log 1``. A value that cannot be represented distinctly (``-max p`` within 6e-8 of -1 in
float32) ties; thresholds then warn (see :mod:`seapig_core.scores.thresholds`).

Performance (1M x 100 float32 on the project's 2-core machines; ``benchmarks/bench_scores.py``):

- Blocks of about 2 MiB of logits (:func:`pass_block_rows`) keep the per-op overhead of a
  Python-driven loop small while their temporaries stay in the last-level cache; temporaries
  are written into per-thread :class:`Workspace` buffers reused across blocks and calls (a
  fresh block-sized temporary costs more than the arithmetic on it: new pages, page faults).
- Transcendental functions run on lengths that are multiples of :data:`LANES`, so a value
  never depends on where its row falls in a block: chunks give the whole tensor's values.
- ``torch.topk``, torch's ``argmax``, ``max(dim)`` with indices and ``isfinite`` along rows
  each cost several to tens of plain float passes here. Label indices are NumPy's first-index
  searches (:func:`_argmax_rows`, exact at any width), the top-2 is one more search with the
  first maximum set aside, and the finiteness test is one ``sum`` per block.
- Robust speed on a busy host: torch runs every op on a block as a short OpenMP parallel
  region, and each region waits for its slowest thread; when other processes hold the cores,
  that thread is often descheduled, and the kernels slowed 20x and more. Instead, blocks are
  shared out to a few Python threads (the calling thread and helpers from a small pool; torch
  ops release the GIL), each running its ops single-threaded: a descheduled thread delays
  only its own block while the others take the remaining ones. The number of threads is the
  caller's ``torch.get_num_threads()``. Single-threaded ops are obtained by setting the
  OpenMP thread count *of those threads only* (``omp_set_num_threads`` of the OpenMP runtime
  torch loaded, restored afterwards); ``torch.set_num_threads`` is never called, so the
  process-wide settings are untouched and concurrent callers cannot disturb each other. Where
  that runtime cannot be found (another torch build), or the tensors are not on the CPU, the
  blocks run in the calling thread with torch's own intra-op threads.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from seapig_core.layout import CanonicalLogits, block_finite, iter_row_blocks

__all__ = [
    "KERNELS",
    "BernoulliBlock",
    "CategoricalBlock",
    "PassOutputs",
    "ScoreKernel",
    "Workspace",
    "compute_scores",
    "predict",
    "run_blocks",
    "runner_up",
    "score_pass",
]


# =========================================================================== workspace


#: Transcendental functions (exp, log, sigmoid, ...) are applied to lengths that are multiples
#: of this: torch computes full SIMD vectors with one formula (SLEEF) and a remainder with
#: another (libm), which can differ in the last bit; on such lengths every element takes the
#: vector path, so a value never depends on where its row sits in a block or chunk.
LANES = 64


#: Logits per block of the pass: about 2 MiB (with its temporaries, a few MiB per thread). Blocks
#: much smaller cost more in per-op overhead than they gain in cache.
_PASS_BLOCK_BYTES = 2 << 20


def _padded(n: int) -> int:
    return -(-n // LANES) * LANES


class Workspace:
    """Scratch buffers for block temporaries, reused across row blocks (and calls).

    Slot ``key`` is one flat buffer (its length a multiple of :data:`LANES`); :meth:`take`
    returns a contiguous view of it shaped like the requested block, growing the buffer only
    when a block is larger than any before.
    """

    def __init__(self) -> None:
        self._slots: dict[Any, torch.Tensor] = {}

    def flat(self, slot: Any, like: torch.Tensor, n: int) -> torch.Tensor:
        """The first ``_padded(n)`` entries of slot ``slot`` (dtype and device of ``like``)."""
        size = _padded(n)
        buf = self._slots.get(slot)
        if buf is None or buf.numel() < size or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(size, dtype=like.dtype, device=like.device)
            self._slots[slot] = buf
        return buf[:size]

    def take(self, slot: Any, like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """A contiguous scratch tensor with the dtype and device of ``like`` and its shape (or
        ``shape``); its contents are undefined."""
        shape = tuple(like.shape) if shape is None else tuple(shape)
        n = math.prod(shape)
        return self.flat(slot, like, n)[:n].view(shape)


def _scratch(work: Workspace, slot: Any, like: torch.Tensor) -> torch.Tensor:
    """Slot ``slot`` of ``work``, shaped like ``like``."""
    return work.take(slot, like)


def _vectorised(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an elementwise transcendental ``fn``, on a length that is a multiple of
    :data:`LANES` (see there), so each value is the same wherever ``x`` was cut from."""
    n = x.numel()
    if n % LANES == 0:
        return fn(x)
    padded = x.new_zeros(_padded(n))
    padded[:n] = x.reshape(-1)
    return fn(padded)[:n].view(x.shape)


# =========================================================================== block runner


class _OpenMP:
    """Per-thread thread counts of the OpenMP runtime (and MKL) that torch loaded.

    ``omp_set_num_threads`` acts on the calling thread only (the OpenMP ``nthreads-var`` ICV is
    per thread) and torch's ``get_num_threads`` reads it, so a thread that sets 1 runs every
    torch op inline. MKL's vector math (torch's ``exp``, ``log``, ... on the CPU) has its own
    per-thread count, which ``torch.set_num_threads`` sets in the calling thread
    (``mkl_set_num_threads_local``); it is set to 1 as well. Both are restored afterwards and no
    process-wide setting is touched. The libraries are found among those the process mapped
    (never loading a second runtime); ``available`` is False without an OpenMP runtime.
    """

    def __init__(self) -> None:
        self.available = False
        self._get: Callable[[], int] | None = None
        self._set: Callable[[int], None] | None = None
        self._mkl_local: Callable[[int], int] | None = None
        if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
            return
        libraries = self._mapped_libraries()
        # Several OpenMP runtimes can be mapped (scikit-learn vendors its own libgomp): take
        # the one whose setting torch reads, tried in a throwaway thread.
        for path in libraries:
            if os.path.basename(path).startswith(("libgomp", "libomp", "libiomp5")):
                lib = self._open(path)
                if lib is None or not hasattr(lib, "omp_set_num_threads"):
                    continue
                get, set_ = lib.omp_get_max_threads, lib.omp_set_num_threads
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                if self._drives_torch(set_):
                    self._get, self._set = get, set_
                    break
        if self._get is None:
            return
        for path in libraries:
            if "torch_cpu" in path or "mkl" in os.path.basename(path):
                lib = self._open(path)
                if lib is not None and hasattr(lib, "MKL_Set_Num_Threads_Local"):  # the C interface
                    self._mkl_local = lib.MKL_Set_Num_Threads_Local
                    self._mkl_local.restype, self._mkl_local.argtypes = ctypes.c_int, [ctypes.c_int]
                    break
        self.available = True

    @staticmethod
    def _drives_torch(set_num_threads: Callable[[int], None]) -> bool:
        """Whether ``set_num_threads`` in a thread changes that thread's torch.get_num_threads()."""
        seen: list[int] = []

        def probe() -> None:
            probe_value = torch.get_num_threads() + 3
            set_num_threads(probe_value)
            seen.append(int(torch.get_num_threads() == probe_value))

        thread = threading.Thread(target=probe, name="seapig-openmp-probe")
        thread.start()
        thread.join()
        return seen == [1]

    @staticmethod
    def _open(path: str) -> ctypes.CDLL | None:
        try:
            return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            return None

    @staticmethod
    def _mapped_libraries() -> list[str]:
        found: dict[str, None] = {}
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    path = line.rsplit(None, 1)[-1]
                    if path.startswith("/") and ".so" in os.path.basename(path):
                        found[path] = None
        except OSError:
            return []
        return list(found)

    @contextmanager
    def single_threaded(self):
        """Run torch ops of the calling thread on that thread alone, restoring its settings after."""
        previous = self._get()
        if previous != 1:
            self._set(1)
        previous_mkl = None if self._mkl_local is None else self._mkl_local(1)
        try:
            yield
        finally:
            if previous_mkl is not None:
                self._mkl_local(previous_mkl)
            if previous != 1:
                self._set(previous)


_OMP: _OpenMP | None = None
_POOL: ThreadPoolExecutor | None = None
_POOL_PID: int | None = None
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _openmp() -> _OpenMP:
    global _OMP
    if _OMP is None:
        _OMP = _OpenMP()
    return _OMP


def _pool() -> ThreadPoolExecutor:
    """The helper threads (created on first use; recreated in a forked child)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="seapig-blocks")
            _POOL_PID = os.getpid()
        return _POOL


def _workspace() -> Workspace:
    """This thread's workspace, kept between calls (a few MiB per thread)."""
    work = getattr(_LOCAL, "work", None)
    if work is None:
        work = _LOCAL.work = Workspace()
    return work


BlockFn = Callable[[int, int, Workspace], None]


def run_blocks(n_rows: int, block_rows: int, fn: BlockFn, *, device: torch.device | str = "cpu") -> None:
    """Call ``fn(start, stop, workspace)`` for every row block of ``range(n_rows)``.

    On the CPU, blocks are shared out dynamically to the calling thread and up to
    ``torch.get_num_threads() - 1`` helper threads, each running torch ops single-threaded
    (see the module docstring); ``fn`` must only write to its own rows. Returns when every
    block is done; the first exception raised by ``fn`` is re-raised here (remaining blocks
    are skipped).
    """
    blocks = list(iter_row_blocks(n_rows, block_rows))
    if not blocks:
        return
    omp = _openmp()
    threads = min(torch.get_num_threads(), len(blocks))
    if torch.device(device).type != "cpu" or not omp.available or threads < 1:
        work = _workspace()
        for start, stop in blocks:
            fn(start, stop, work)
        return

    counter = itertools.count()
    failed: list[BaseException] = []
    stop = threading.Event()

    def worker() -> None:
        work = _workspace()
        with omp.single_threaded():
            while not stop.is_set():
                i = next(counter)
                if i >= len(blocks):
                    return
                try:
                    fn(*blocks[i], work)
                except BaseException as exc:
                    failed.append(exc)
                    stop.set()
                    raise

    helpers = [_pool().submit(worker) for _ in range(threads - 1)]
    try:
        worker()
    finally:
        stop.set()  # on an interrupt in this thread, helpers stop after their current block
        for future in helpers:
            if not future.cancel():  # started: wait for it, it writes the caller's outputs
                future.exception()
    if failed:
        raise failed[0]


# =========================================================================== blocks


def _argmax_rows(x: torch.Tensor, *, smallest: bool = False) -> torch.Tensor:
    """Index of the first maximum (``smallest``: minimum) of each row of a 2-D ``x`` (int64).

    numpy's on the CPU: torch's ``argmax(dim=1)`` is about 6x slower there (a 5k x 100 float32
    block: 1.7 ms against 0.29 ms) and it is what the labels of every block need. Both return
    the first of tied extremes, exactly at any width, and a NaN's index in a row with one.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        found = x.numpy().argmin(axis=1) if smallest else x.numpy().argmax(axis=1)
        return torch.from_numpy(found.astype(np.int64, copy=False))
    return x.argmin(dim=1) if smallest else x.argmax(dim=1)


_ROW_STARTS = threading.local()


def _row_starts(n: int, k: int, device: torch.device) -> torch.Tensor:
    """``[0, k, 2k, ...]`` (``n`` entries, int64): the flat position of each row's first entry.

    Kept per thread for the last shape asked (every block of a pass but the last has the same
    shape), since building it costs as much as the gather it serves.
    """
    key = (n, k, device)
    cached = getattr(_ROW_STARTS, "value", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.arange(0, n * k, k, device=device))
        _ROW_STARTS.value = cached
    return cached[1]


def _entry_positions(x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor | None:
    """Flat positions of ``x[i, columns[i]]`` in ``x.view(-1)``; None if ``x`` is not contiguous.

    One gather or fill through flat positions (``index_select``/``index_fill_``) costs about a
    third of advanced indexing ``x[rows, columns]`` on a block, which builds both index tensors.
    """
    if not x.is_contiguous():
        return None
    n, k = x.shape
    return torch.add(_row_starts(n, k, x.device), columns)


def _entries(x: torch.Tensor, columns: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """``x[i, columns[i]]`` for every row ``i`` (``positions`` from :func:`_entry_positions`)."""
    if positions is None:
        return x[torch.arange(x.shape[0], device=x.device), columns]
    return x.view(-1).index_select(0, positions)


def _fill_entries(x: torch.Tensor, columns: torch.Tensor, positions: torch.Tensor | None, value: float) -> None:
    """``x[i, columns[i]] = value`` for every row ``i``, in place."""
    if positions is None:
        x[torch.arange(x.shape[0], device=x.device), columns] = value
    else:
        x.view(-1).index_fill_(0, positions, value)


class CategoricalBlock:
    """One ``(R, K)`` block of categorical logits and the quantities scores share.

    Each quantity is computed on first use and kept for the block. Buffers come from the
    thread's :class:`Workspace` (slots ``"a"``, ``"d"``, ``"e"``, ``"w"``).

    Attributes
    ----------
    z : torch.Tensor
        The logits ``(R, K)`` (rows are samples, or sample-member pairs).
    beta, T : float
        Inverse temperature and temperature.
    """

    def __init__(
        self,
        z: torch.Tensor,
        beta: float,
        T: float,
        work: Workspace | None = None,
        *,
        keep_shift: bool = True,
        runner_up: bool = True,
    ) -> None:
        self.z, self.beta, self.T = z, beta, T
        self.work = Workspace() if work is None else work
        self.keep_shift = keep_shift  # False: the exponential overwrites the shift (no entropy then)
        self.runner_up = runner_up  # False: the top-2 skips the runner-up's index (scores only)
        self._z_max: torch.Tensor | None = None
        self._is_max: torch.Tensor | None = None
        self._n_max: torch.Tensor | None = None
        self._shifted: torch.Tensor | None = None
        self._scaled = False
        self._first: torch.Tensor | None = None
        self._runner: torch.Tensor | None = None
        self._second: torch.Tensor | None = None
        self._gap: torch.Tensor | None = None
        self._exp: torch.Tensor | None = None
        self._exp_sum: torch.Tensor | None = None
        self._entropy: torch.Tensor | None = None

    @property
    def z_max(self) -> torch.Tensor:
        """Row max ``z_(1)``, ``(R,)``."""
        if self._z_max is None:
            self._z_max = self.z.amax(dim=1)
        return self._z_max

    @property
    def is_max(self) -> torch.Tensor:
        """``(R, K)`` float 0/1: 1 at every entry equal to the row max."""
        if self._is_max is None:
            self._is_max = torch.eq(self.z, self.z_max.unsqueeze(1), out=_scratch(self.work, "a", self.z))
        return self._is_max

    @property
    def n_max(self) -> torch.Tensor:
        """How many entries of each row equal its max (``> 1``: a tie at the top)."""
        if self._n_max is None:
            self._n_max = self.is_max.sum(dim=1)
        return self._n_max

    def _shift(self) -> torch.Tensor:
        """``z - z_max`` (non-positive, 0 at the maxima), unscaled until :meth:`_scaled_shift`."""
        if self._shifted is None:
            self._shifted = torch.sub(self.z, self.z_max.unsqueeze(1), out=_scratch(self.work, "d", self.z))
        return self._shifted

    def _top2(self) -> None:
        # First maximum of the unscaled shift d = z - z_max (0 there, < 0 elsewhere: distinct
        # floats never subtract to 0), pushed to -inf while the row max is taken again: that
        # is z_(2) - z_(1), exactly 0 when the top is tied, and the first index of it is the
        # runner-up (the second maximum when tied). The entry is put back (exactly 0) before
        # anything else reads the shift. Two first-index searches (the maxima are read off
        # them), instead of 0/1 masks of the maxima (torch's argmax is slow on the CPU, numpy's
        # is not). A first-index search returns a NaN's index in a row with one, so the values
        # read off it are NaN exactly when a max would be.
        if self._scaled:
            raise RuntimeError("CategoricalBlock: the top-2 must be taken before the exponential sum.")
        if self._z_max is None:  # the row max read off the first maximum: one pass fewer
            first = _argmax_rows(self.z)
            self._z_max = _entries(self.z, first, _entry_positions(self.z, first))
            d = self._shift()
        else:
            d = self._shift()
            first = _argmax_rows(d)
        at_first = _entry_positions(d, first)
        _fill_entries(d, first, at_first, -math.inf)
        if self.runner_up:
            runner = _argmax_rows(d)
            self._runner = runner
            self._second = _entries(d, runner, _entry_positions(d, runner))  # z_(2) - z_(1) <= 0; 0 when tied
        else:
            self._second = d.amax(dim=1)
            self._runner = None
        _fill_entries(d, first, at_first, 0.0)
        self._first = first
        self._gap = self._second * self.beta if self.beta != 1.0 else self._second.clone()

    @property
    def scaled_gap(self) -> torch.Tensor:
        """``-(z_(1) - z_(2)) / T`` (``<= 0``; 0 when the top is tied), ``(R,)``."""
        if self._gap is None:
            self._top2()
        return self._gap

    def _scaled_shift(self) -> torch.Tensor:
        """``beta * (z - z_max)`` in slot ``"d"``: non-positive, so ``exp`` never overflows."""
        shifted = self._shift()
        if not self._scaled:
            if self.beta != 1.0:
                shifted.mul_(self.beta)
            self._scaled = True
        return shifted

    @property
    def exp(self) -> torch.Tensor:
        """``exp(beta (z - z_max))``, ``(R, K)`` (1 at the maxima)."""
        if self._exp is None:
            self._scaled_shift()
            n, slot = self.z.numel(), "e" if self.keep_shift else "d"
            # On the padded slots (see LANES); the padding holds stale values, never read.
            torch.exp(self.work.flat("d", self.z, n), out=self.work.flat(slot, self.z, n))
            self._exp = self.work.take(slot, self.z)
        return self._exp

    @property
    def exp_sum(self) -> torch.Tensor:
        """``S = sum_k exp(beta (z_k - z_max))`` (``>= 1``), so ``max_k p_k = 1 / S``."""
        if self._exp_sum is None:
            self._exp_sum = self.exp.sum(dim=1)
        return self._exp_sum

    @property
    def entropy(self) -> torch.Tensor:
        """Entropy of ``softmax(beta z)`` in nats, without cancellation near 0.

        With ``d = beta (z - z_max)``, ``e = exp(d)``, ``n`` maxima and ``t`` the sum of ``e``
        over the other entries: ``S = n + t`` and ``H = log S - sum_k e_k d_k / S``
        = ``log1p(n - 1 + t) + sum_k e_k |d_k| / S``; both terms are non-negative and ``t`` is
        summed on its own, so a near-certain row keeps its tiny, distinct entropy in float32
        (``log S`` of a rounded ``S`` would be exactly 0 there).
        """
        if self._entropy is None:
            if not self.keep_shift:
                raise RuntimeError("CategoricalBlock: the entropy needs keep_shift=True.")
            e, d = self.exp, self._scaled_shift()
            others = torch.sub(e, self.is_max, out=_scratch(self.work, "w", self.z))  # 0 at the maxima
            t = others.sum(dim=1)
            weighted = others.mul_(d).sum(dim=1)  # sum e_k d_k <= 0 (d = 0 at the maxima)
            n_extra = self.n_max - 1.0
            total = n_extra + 1.0 + t
            self._entropy = _vectorised(torch.log1p, n_extra.add_(t)).sub_(weighted.div_(total))
        return self._entropy

    def first_max(self) -> torch.Tensor:
        """Index of the first maximum of each row (int64)."""
        return self._first if self._first is not None else _argmax_rows(self.z)

    def top2_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first, second)`` int64 class indices: the first maximum, and the runner-up.

        The runner-up is the second maximum when the top is tied, else the first index of the
        second-largest value.
        """
        if self._first is None:
            self._top2()
        if self._runner is None:
            raise RuntimeError("CategoricalBlock: the runner-up needs runner_up=True.")
        return self._first, self._runner


class BernoulliBlock:
    """One ``(R, K)`` block of bernoulli logits (``|z|`` for single-logit binary).

    Attributes
    ----------
    z : torch.Tensor
        The logits ``(R, K)``.
    beta, T : float
        Inverse temperature and temperature.
    single_logit : bool
        True when ``z`` holds single-logit magnitudes ``|z|``.
    """

    def __init__(
        self, z: torch.Tensor, beta: float, T: float, work: Workspace | None = None, *, single_logit: bool = False
    ) -> None:
        self.z, self.beta, self.T, self.single_logit = z, beta, T, single_logit
        self.work = Workspace() if work is None else work
        self._abs: torch.Tensor | None = None
        self._min_abs: torch.Tensor | None = None

    @property
    def abs(self) -> torch.Tensor:
        """``|z|``, ``(R, K)``."""
        if self._abs is None:
            self._abs = self.z if self.single_logit else torch.abs(self.z, out=_scratch(self.work, "a", self.z))
        return self._abs

    @property
    def min_abs(self) -> torch.Tensor:
        """Smallest logit magnitude of each row: the label closest to its decision boundary."""
        if self._min_abs is None:
            self._min_abs = self.abs.amin(dim=1)
        return self._min_abs

    @property
    def scaled_min_abs(self) -> torch.Tensor:
        """``beta * min_c |z_c|`` (a new tensor)."""
        return self.min_abs * self.beta

    def closest_label(self) -> torch.Tensor:
        """First index of the smallest ``|z|`` of each row (int64)."""
        return _argmax_rows(self.abs, smallest=True)


# =========================================================================== score kernels


CategoricalFn = Callable[[CategoricalBlock], torch.Tensor]
BernoulliFn = Callable[[BernoulliBlock], torch.Tensor]
ConfidenceFn = Callable[[torch.Tensor, "Workspace"], torch.Tensor]


@dataclass(frozen=True)
class ScoreKernel:
    """A score as a pair of block functions (or one function of the confidence logits).

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"softmax"``.
    categorical : callable or None
        ``(CategoricalBlock) -> (R,)``.
    bernoulli : callable or None
        ``(BernoulliBlock) -> (R,)``.
    top2 : bool
        Whether the categorical function reads the top-2 gap (it must then be taken before
        the exponential sum; :func:`score_pass` orders that).
    confidence : callable or None
        For a score of a learned confidence head instead of the class logits:
        ``(c, workspace) -> (rows * M,)`` of a block ``c`` of confidence logits ``(rows, M)``
        (members unrolled row-major, like the class blocks). None for class-logit scores.
    """

    name: str
    categorical: CategoricalFn | None
    bernoulli: BernoulliFn | None
    top2: bool = False
    confidence: ConfidenceFn | None = None


def _bernoulli_entropy_of_abs(a: torch.Tensor) -> torch.Tensor:
    """Entropy of ``Bernoulli(sigmoid(a))`` for ``a >= 0``, without cancellation.

    ``H = softplus(-a) + a * sigmoid(-a)``; both terms decay like ``a * exp(-a)``.
    """
    return _vectorised(lambda v: F.softplus(-v) + v * torch.sigmoid(-v), a)


# softmax: -max_k softmax(beta z)_k = -1 / S; bernoulli: -min_c max(p_c, 1 - p_c) = -sigmoid(beta min|z|)
def _softmax_categorical(b: CategoricalBlock) -> torch.Tensor:
    return b.exp_sum.reciprocal().neg_()


def _softmax_bernoulli(b: BernoulliBlock) -> torch.Tensor:
    return _vectorised(torch.sigmoid, b.scaled_min_abs).neg_()


# entropy: H(softmax(beta z)); bernoulli: the largest per-label entropy (smallest |z|)
def _entropy_categorical(b: CategoricalBlock) -> torch.Tensor:
    return b.entropy


def _entropy_bernoulli(b: BernoulliBlock) -> torch.Tensor:
    return _bernoulli_entropy_of_abs(b.scaled_min_abs)


# energy: -T logsumexp(beta z) = -(z_max + T log S); bernoulli: -T sum_c softplus(beta z_c)
def _energy_categorical(b: CategoricalBlock) -> torch.Tensor:
    return _vectorised(torch.log, b.exp_sum).mul_(b.T).add_(b.z_max).neg_()


def _energy_bernoulli(b: BernoulliBlock) -> torch.Tensor:
    # softplus(x) = logaddexp(x, 0), which (unlike F.softplus) can write into scratch.
    z, work, n = b.z, b.work, b.z.numel()
    torch.mul(z, b.beta, out=work.take("d", z))  # into the padded slot (see LANES)
    torch.logaddexp(work.flat("d", z, n), z.new_zeros(()), out=work.flat("e", z, n))
    return work.take("e", z).sum(dim=1).mul_(-b.T)


# margin: -(z_(1) - z_(2)) / T; bernoulli: -min_c |z_c| / T
def _margin_categorical(b: CategoricalBlock) -> torch.Tensor:
    return b.scaled_gap


def _margin_bernoulli(b: BernoulliBlock) -> torch.Tensor:
    return b.min_abs.mul(-b.beta)


# max logit: -max_k z_k / T (single-logit binary: -|z| / T)
def _max_logit_categorical(b: CategoricalBlock) -> torch.Tensor:
    return b.z_max * (-b.beta)


def _max_logit_bernoulli(b: BernoulliBlock) -> torch.Tensor:
    return b.z.amax(dim=1).mul_(-b.beta)


# certainty ratio: p_(2) / p_(1) = exp(-beta (z_(1) - z_(2))); bernoulli: exp(-beta min|z|)
def _certainty_ratio_categorical(b: CategoricalBlock) -> torch.Tensor:
    return _vectorised(torch.exp, b.scaled_gap)


def _certainty_ratio_bernoulli(b: BernoulliBlock) -> torch.Tensor:
    return _vectorised(torch.exp, b.min_abs.mul(-b.beta))


# probability margin: -(p_(1) - p_(2)) = -(1 - exp(-beta gap)) / S = expm1(-beta gap) / S;
# bernoulli: -|2 sigmoid(beta z) - 1| = -tanh(beta |z| / 2), the smallest over labels.
def _probability_margin_categorical(b: CategoricalBlock) -> torch.Tensor:
    return _vectorised(torch.expm1, b.scaled_gap).div_(b.exp_sum)


def _probability_margin_bernoulli(b: BernoulliBlock) -> torch.Tensor:
    return _vectorised(torch.tanh, b.min_abs * (0.5 * b.beta)).neg_()


# confidence: -sigmoid(c) of the confidence head's logit c. The class temperature does not
# apply (it is fitted on the class logits; see seapig_core.scores.logits.ConfidenceScore).
def _confidence_scores(c: torch.Tensor, work: Workspace) -> torch.Tensor:
    # Copied into a contiguous, LANES-padded slot so every value takes the same (vector) path,
    # whatever the block's cut or the column's stride in the caller's tensor (see LANES).
    n = c.numel()
    buf = work.flat("c", c, n)
    buf[:n].view(c.shape).copy_(c)
    return torch.sigmoid(buf, out=buf)[:n].neg_()


KERNELS: dict[str, ScoreKernel] = {
    kernel.name: kernel
    for kernel in (
        ScoreKernel("softmax", _softmax_categorical, _softmax_bernoulli),
        ScoreKernel("entropy", _entropy_categorical, _entropy_bernoulli),
        ScoreKernel("energy", _energy_categorical, _energy_bernoulli),
        ScoreKernel("margin", _margin_categorical, _margin_bernoulli, top2=True),
        ScoreKernel("max_logit", _max_logit_categorical, _max_logit_bernoulli),
        ScoreKernel("certainty_ratio", _certainty_ratio_categorical, _certainty_ratio_bernoulli, top2=True),
        ScoreKernel("probability_margin", _probability_margin_categorical, _probability_margin_bernoulli, top2=True),
        ScoreKernel("confidence", None, None, confidence=_confidence_scores),
    )
}


# =========================================================================== the pass


@dataclass(frozen=True)
class PassOutputs:
    """What one :func:`score_pass` produced.

    Attributes
    ----------
    scores : dict of str to torch.Tensor
        ``(N,)`` per requested score name, in the logits' float dtype; NaN for a sample with a
        non-finite logit; the mean over members when ``M > 1``.
    prediction : torch.Tensor or None
        int64 ``(N,)`` predicted class (multilabel: ``(N, K)`` 0/1); -1 for a non-finite sample.
        None unless ``labels=True``.
    runner_up : torch.Tensor or None
        int64 ``(N,)`` alternate label (see :func:`runner_up`); -1 for a non-finite sample.
    certainty_ratio : torch.Tensor or None
        ``(N,)`` ``p_(2) / p_(1)`` at the temperature (the ``certainty_ratio`` score).
    finite : torch.Tensor
        bool ``(N,)``: True where every logit of the sample is finite.
    """

    scores: dict[str, torch.Tensor]
    prediction: torch.Tensor | None
    runner_up: torch.Tensor | None
    certainty_ratio: torch.Tensor | None
    finite: torch.Tensor


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if not isinstance(n, str) or n not in KERNELS]
    if unknown:
        raise ValueError(f"The 'names' parameter must hold score names among {sorted(KERNELS)}. Got {unknown!r} instead.")
    return list(dict.fromkeys(names))


class _Pass:
    """The per-block work of :func:`score_pass`; writes only the rows of its block."""

    def __init__(
        self,
        canon: CanonicalLogits,
        names: list[str],
        temperature: float,
        *,
        prediction: bool,
        runner: bool,
        ratio: bool,
    ) -> None:
        values = canon.values
        self.canon, self.names = canon, names
        self.T = float(temperature)
        self.beta = 1.0 / self.T
        self.categorical = canon.family == "categorical"
        self.multilabel = canon.family == "bernoulli" and not canon.single_logit
        self.want_prediction, self.want_runner, self.want_ratio = prediction, runner, ratio
        n, k, m = canon.n_samples, canon.n_units, canon.n_members
        device, dtype = values.device, values.dtype
        self.scores = {name: torch.empty(n, dtype=dtype, device=device) for name in names}
        self.prediction = None
        if prediction:
            shape = (n, k) if self.multilabel else (n,)
            self.prediction = torch.empty(shape, dtype=torch.int64, device=device)
        self.runner = torch.empty(n, dtype=torch.int64, device=device) if runner else None
        self.ratio = None
        if ratio:
            self.ratio = self.scores.get("certainty_ratio")
            if self.ratio is None:
                self.ratio = torch.empty(n, dtype=dtype, device=device)
        # (numpy on the CPU: torch's fill of a chunk-sized tensor wakes the OpenMP team, about
        # a millisecond per chunk on a busy host)
        self.finite = (
            torch.from_numpy(np.ones(n, dtype=bool)) if device.type == "cpu" else torch.ones(n, dtype=torch.bool, device=device)
        )
        self.kernels = [KERNELS[name] for name in names if KERNELS[name].confidence is None]
        self.confidence_kernels = [KERNELS[name] for name in names if KERNELS[name].confidence is not None]
        if self.confidence_kernels and canon.confidence is None:
            wanted = [kernel.name for kernel in self.confidence_kernels]
            raise ValueError(
                f"The score(s) {wanted} read a learned confidence head: validate the logits with "
                f"confidence_head=True (their last unit is then the confidence logit). Got logits without one."
            )
        if ratio and "certainty_ratio" not in names:
            self.kernels.append(KERNELS["certainty_ratio"])
        self.wants_labels = prediction or runner
        self.members = m

    def outputs(self) -> PassOutputs:
        return PassOutputs(
            scores=self.scores,
            prediction=self.prediction,
            runner_up=self.runner,
            certainty_ratio=self.ratio,
            finite=self.finite,
        )

    # ------------------------------------------------------------------ one block

    def __call__(self, start: int, stop: int, work: Workspace) -> None:
        canon, m = self.canon, self.members
        rows = stop - start
        unrolled = None if m == 1 else work.take("unrolled", canon.values, (rows * m, canon.n_units))
        z = canon.scoring_block(start, stop, out=unrolled)
        bad_rows = None if canon.all_finite else block_finite(z)
        if bad_rows is not None:
            bad_rows = ~(bad_rows if m == 1 else bad_rows.view(rows, m).all(dim=1))
        confidence = None if canon.confidence is None else canon.confidence[start:stop]
        if confidence is not None and not canon.all_finite:
            confident = block_finite(confidence)  # a sample is finite only with a finite confidence
            if confident is not None:
                bad_rows = ~confident if bad_rows is None else bad_rows.logical_or_(~confident)

        if self.categorical:
            block = CategoricalBlock(
                z, self.beta, self.T, work, keep_shift="entropy" in self.names, runner_up=self.want_runner and m == 1
            )
            # The top-2 reads the unscaled shift, so it comes before any exponential.
            if any(kernel.top2 for kernel in self.kernels) or (self.want_runner and m == 1):
                block.scaled_gap  # noqa: B018
            results = [(kernel.name, kernel.categorical(block)) for kernel in self.kernels]
        else:
            block = BernoulliBlock(z, self.beta, self.T, work, single_logit=canon.single_logit)
            results = [(kernel.name, kernel.bernoulli(block)) for kernel in self.kernels]
        for name, values in results:
            self._store(self.scores.get(name, self.ratio)[start:stop], values, m)
        for kernel in self.confidence_kernels:
            self._store(self.scores[kernel.name][start:stop], kernel.confidence(confidence, work), m)

        if self.wants_labels:
            self._labels(block, start, stop, work)

        if bad_rows is not None:
            self.finite[start:stop] = ~bad_rows
            for out in (*self.scores.values(), *([self.ratio] if self.ratio is not None else [])):
                out[start:stop].masked_fill_(bad_rows, float("nan"))
            if self.prediction is not None:
                target = self.prediction[start:stop]
                target.masked_fill_(bad_rows.view(-1, 1) if self.multilabel else bad_rows, -1)
            if self.runner is not None:
                self.runner[start:stop].masked_fill_(bad_rows, -1)

    @staticmethod
    def _store(target: torch.Tensor, values: torch.Tensor, m: int) -> None:
        if m == 1:
            target.copy_(values)
        else:
            torch.mean(values.view(-1, m), dim=1, out=target)

    def _labels(self, block: CategoricalBlock | BernoulliBlock, start: int, stop: int, work: Workspace) -> None:
        canon, m, beta = self.canon, self.members, self.beta
        pred = runner = None
        if self.categorical:
            if m == 1:
                if self.want_runner:
                    pred, runner = block.top2_labels()
                else:  # the first maximum alone needs no top 2
                    pred = block.first_max()
            else:
                # Member-averaged probabilities, then their top 2.
                probs = block.exp.div_(block.exp_sum.unsqueeze(1))  # the scores are done with it
                mean = probs.view(stop - start, m, -1).mean(dim=1)
                pred, runner = _top2_labels_of(mean)
        elif canon.single_logit:
            signed = canon.values[start:stop].reshape(stop - start, m)
            if m == 1:
                pred = (signed[:, 0] > 0).to(torch.int64)  # p > 0.5 exactly when z > 0
            else:
                pred = (_vectorised(torch.sigmoid, signed * beta).mean(dim=1) > 0.5).to(torch.int64)
            runner = 1 - pred
        else:
            if m == 1:
                if self.want_prediction:
                    self.prediction[start:stop].copy_(block.z > 0)  # p > 0.5 exactly when z > 0
                if self.want_runner:
                    runner = block.closest_label()
            else:
                mean = _vectorised(torch.sigmoid, block.z * beta).view(stop - start, m, -1).mean(dim=1)
                if self.want_prediction:
                    self.prediction[start:stop].copy_(mean > 0.5)
                if self.want_runner:
                    closeness = torch.minimum(mean, 1.0 - mean)
                    runner = _argmax_rows(closeness)
        if pred is not None and self.want_prediction:
            self.prediction[start:stop] = pred
        if runner is not None and self.want_runner:
            self.runner[start:stop] = runner


def _top2_labels_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)`` indices of the two largest entries of each row of ``x``."""
    return CategoricalBlock(x, 1.0, 1.0, None).top2_labels()


def score_pass(
    canon: CanonicalLogits,
    names: Sequence[str],
    temperature: float = 1.0,
    *,
    labels: bool = True,
) -> PassOutputs:
    """Every requested score, and the labels, in one pass over validated logits.

    One walk over row blocks: per block one finiteness test, one row max and (when a score or
    the labels need it) one top-2, then every requested score from the shared quantities, and
    with ``labels=True`` the prediction, the runner-up label and the certainty ratio. Blocks
    are shared out to a few threads (see the module docstring). Values do not depend on the
    blocking, on what else is requested, or on the threads: scoring a tensor in chunks gives
    the same values as scoring it whole.

    Parameters
    ----------
    canon : CanonicalLogits
        Logits validated by :func:`seapig_core.layout.canonicalize` (never validated again
        here); may hold zero samples and non-finite rows.
    names : sequence of str
        Score registry names (:data:`KERNELS`), e.g. ``["softmax", "energy"]``; may be empty.
        ``"confidence"`` needs logits validated with ``confidence_head=True``.
    temperature : float
        ``T > 0``; logits are divided by it.
    labels : bool, default True
        Also produce the prediction, the runner-up label and the certainty ratio.

    Returns
    -------
    PassOutputs

    Raises
    ------
    ValueError
        For an unknown score name, a temperature that is not positive and finite, or the
        ``confidence`` score of logits without a confidence head.

    Examples
    --------
    >>> import torch
    >>> from seapig_core.layout import canonicalize
    >>> out = score_pass(canonicalize(torch.tensor([[3.0, 1.0, 0.0]])), ["softmax", "margin"])
    >>> out.scores["margin"], out.prediction, out.runner_up
    (tensor([-2.]), tensor([0]), tensor([1]))
    """
    names = _check_names(names)
    return _run_pass(canon, names, temperature, prediction=labels, runner=labels, ratio=labels)


def _run_pass(
    canon: CanonicalLogits, names: list[str], temperature: float, *, prediction: bool, runner: bool, ratio: bool
) -> PassOutputs:
    T = float(temperature)
    if not (math.isfinite(T) and T > 0.0):
        raise ValueError(f"The 'temperature' parameter must be a positive finite float. Got {temperature!r} instead.")
    work = _Pass(canon, names, T, prediction=prediction, runner=runner, ratio=ratio)
    run_blocks(canon.n_samples, pass_block_rows(canon), work, device=canon.values.device)
    return work.outputs()


def pass_block_rows(canon: CanonicalLogits) -> int:
    """Rows per block of :func:`score_pass`: about 2 MiB of logits, a multiple of :data:`LANES`
    rows (whole blocks then need no padding for their transcendental ops). An input of only a
    few such blocks per thread (a streamed chunk) is cut finer, down to a quarter, so that the
    threads finish together."""
    rows = max(LANES, canon.block_rows(_PASS_BLOCK_BYTES) // LANES * LANES)
    threads = torch.get_num_threads()
    wanted = 4 * threads  # blocks per call that keep the threads busy to the end
    if canon.n_samples < rows * wanted:
        finer = -(-canon.n_samples // wanted)
        return max(rows // 4, -(-finer // LANES) * LANES, LANES)
    # As many blocks for each thread (a streamed chunk is a dozen blocks: one block more for
    # one thread would leave the other idle for that long, every chunk).
    blocks = -(-canon.n_samples // rows)
    blocks = -(-blocks // threads) * threads
    per_block = -(-canon.n_samples // blocks)
    return max(LANES, -(-per_block // LANES) * LANES)


# =========================================================================== one output each


def compute_scores(canon: CanonicalLogits, kernel: ScoreKernel | str, temperature: float = 1.0) -> torch.Tensor:
    """Score every sample of ``canon`` with one score at ``temperature`` (see :func:`score_pass`).

    Returns
    -------
    torch.Tensor
        ``(N,)`` scores in the logits' float dtype and device; NaN for a sample with any
        non-finite logit; the mean over members when ``M > 1``.
    """
    name = kernel if isinstance(kernel, str) else kernel.name
    return _run_pass(canon, _check_names([name]), temperature, prediction=False, runner=False, ratio=False).scores[name]


def predict(canon: CanonicalLogits, temperature: float = 1.0) -> torch.Tensor:
    """Predicted labels from the member-averaged probabilities.

    Returns
    -------
    torch.Tensor
        int64. Categorical and binary: ``(N,)`` class indices (the first on ties; single-logit
        binary: 1 where ``p > 0.5``, i.e. ``z > 0``). Multilabel: ``(N, K)`` 0/1. ``-1`` marks
        samples with non-finite logits.
    """
    return _run_pass(canon, [], temperature, prediction=True, runner=False, ratio=False).prediction


def runner_up(canon: CanonicalLogits, temperature: float = 1.0) -> torch.Tensor:
    """The alternate label: the class a sample would flip to, ``(N,)`` int64.

    Categorical: the second most probable class of the member-averaged distribution (when
    the top is tied, the other tied class). Single-logit binary: the class not predicted.
    Multilabel: the label closest to its decision boundary (largest ``min(p, 1 - p)``, i.e.
    smallest ``|z|`` with one member). ``-1`` marks non-finite samples.
    """
    return _run_pass(canon, [], temperature, prediction=False, runner=True, ratio=False).runner_up
