"""Issue 10, items 1 and 4 (library side): one validated pass, and the block runner behind it."""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import expit, softmax
from torch.overrides import TorchFunctionMode

from seapig_core import SCORES, CertaintyRatioScore, SoftmaxScore
from seapig_core import kernels as kernels_module
from seapig_core.kernels import KERNELS, pass_block_rows, run_blocks, score_pass
from seapig_core.layout import canonicalize
from seapig_core.scores import logits as logits_module
from tests.core.reference import LAYOUTS, SCORE_NAMES, layout_id, member_vectors, random_labels, reference_scores

LAYOUT_IDS = [layout_id(layout) for layout in LAYOUTS]


def _query(task, per_member, shape, n=300, seed=0, non_finite=True):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape(n, 6, 3)) * 3).astype(np.float32)
    if non_finite:
        flat = x.reshape(n, -1)
        flat[3, 0], flat[10, -1], flat[11, 0] = np.nan, np.inf, -np.inf
    return x


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_one_pass_equals_the_separate_public_calls(layout):
    task, per_member, shape = layout
    x = _query(task, per_member, shape)
    T = 0.8
    out = score_pass(canonicalize(x, task, per_member), SCORE_NAMES, T, labels=True)
    for name in SCORE_NAMES:
        separate = SCORES[name](temperature=T, task=task, per_member=per_member).score(x)
        torch.testing.assert_close(out.scores[name], separate, rtol=0, atol=0, equal_nan=True)
    ratio = CertaintyRatioScore(temperature=T, task=task, per_member=per_member)
    torch.testing.assert_close(out.certainty_ratio, ratio.score(x), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out.runner_up, ratio.alternate_label(x), rtol=0, atol=0)
    torch.testing.assert_close(out.prediction, ratio.predict(x), rtol=0, atol=0)
    bad = np.zeros(len(x), dtype=bool)
    bad[[3, 10, 11]] = True
    np.testing.assert_array_equal(out.finite.numpy(), ~bad)
    assert (out.runner_up.numpy()[bad] == -1).all()
    assert (out.prediction.numpy().reshape(len(x), -1)[bad] == -1).all()
    assert np.isnan(out.certainty_ratio.numpy()[bad]).all()


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_each_value_does_not_depend_on_what_else_is_asked_for(layout):
    task, per_member, shape = layout
    canon = canonicalize(_query(task, per_member, shape, seed=1), task, per_member)
    everything = score_pass(canon, SCORE_NAMES, 1.3, labels=True)
    for name in SCORE_NAMES:
        alone = score_pass(canon, [name], 1.3, labels=False)
        torch.testing.assert_close(alone.scores[name], everything.scores[name], rtol=0, atol=0, equal_nan=True)
        assert alone.prediction is None and alone.runner_up is None and alone.certainty_ratio is None


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_chunks_give_the_values_of_the_whole_tensor(layout):
    task, per_member, shape = layout
    canon = canonicalize(_query(task, per_member, shape, n=2001, seed=2), task, per_member)
    whole = score_pass(canon, SCORE_NAMES, 0.6)
    for chunk in (13, 256, 1000):
        parts = [score_pass(canon.rows(s, min(s + chunk, 2001)), SCORE_NAMES, 0.6) for s in range(0, 2001, chunk)]
        for name in SCORE_NAMES:
            joined = torch.cat([p.scores[name] for p in parts])
            torch.testing.assert_close(joined, whole.scores[name], rtol=0, atol=0, equal_nan=True)
        for field in ("prediction", "runner_up", "certainty_ratio", "finite"):
            joined = torch.cat([getattr(p, field) for p in parts])
            torch.testing.assert_close(joined, getattr(whole, field), rtol=0, atol=0, equal_nan=True)


def test_large_chunks_give_the_values_of_the_whole_tensor():
    # Many row blocks per call, chunks of the pipeline's size, a ragged tail, non-finite rows.
    x = (torch.randn(200_003, 10, generator=torch.Generator().manual_seed(0)) * 3).float()
    x[[5, 70_000, 200_002], 2] = float("nan")
    canon = canonicalize(x)
    whole = score_pass(canon, SCORE_NAMES, 0.9)
    parts = [score_pass(canon.rows(s, min(s + 65_536, len(x))), SCORE_NAMES, 0.9) for s in range(0, len(x), 65_536)]
    for name in SCORE_NAMES:
        torch.testing.assert_close(torch.cat([p.scores[name] for p in parts]), whole.scores[name], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(torch.cat([p.runner_up for p in parts]), whole.runner_up, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p.prediction for p in parts]), whole.prediction, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_labels_match_a_float64_reference(layout):
    task, per_member, shape = layout
    x = _query(task, per_member, shape, n=400, seed=3, non_finite=False)
    T = 1.7
    out = score_pass(canonicalize(x, task, per_member), ["probability_margin"], T)
    samples, family, single = member_vectors(x, task, per_member)
    for i, members in enumerate(samples):
        if family == "categorical":
            p = np.mean([softmax(z / T) for z in members], axis=0)
            order = np.argsort(-p, kind="stable")
            assert out.prediction[i] == order[0] and out.runner_up[i] == order[1], (i, p)
        else:
            p = np.mean([expit(z / T) for z in members], axis=0)
            np.testing.assert_array_equal(np.reshape(out.prediction[i].numpy(), -1), (p > 0.5).astype(int))
            expected = 1 - int(p[0] > 0.5) if single else int(np.argmax(np.minimum(p, 1 - p)))
            assert out.runner_up[i] == expected
    ratio = reference_scores(x, "certainty_ratio", task, per_member, T)
    np.testing.assert_allclose(out.certainty_ratio.numpy(), ratio, rtol=2e-5, atol=2e-6)


def test_ties_at_the_top_predict_the_first_and_name_the_other_as_runner_up():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 5.0, 1.0], [7.0, -1.0, 7.0, 7.0]])
    out = score_pass(canonicalize(x), ["margin", "certainty_ratio", "probability_margin"])
    assert out.prediction.tolist() == [1, 0, 2, 0]
    assert out.runner_up.tolist() == [2, 1, 1, 2]
    assert out.scores["margin"].tolist() == [0.0, 0.0, -4.0, 0.0]
    assert out.scores["certainty_ratio"][[0, 1, 3]].tolist() == [1.0, 1.0, 1.0]
    assert out.scores["probability_margin"][[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]


def test_multilabel_runner_up_is_the_first_label_closest_to_its_boundary_on_ties():
    # |z| tied between labels (and between members' mean probabilities): the first of them.
    x = torch.tensor([[3.0, -1.0, 1.0, 2.0], [0.5, -0.5, 4.0, 0.5], [2.0, 2.0, -2.0, 2.0]])
    assert score_pass(canonicalize(x, "multilabel"), ["margin"]).runner_up.tolist() == [1, 0, 0]
    # Members' mean probabilities: ties of the same sign are exact there (sigmoid(-z) and
    # 1 - sigmoid(z) may differ in the last bit, as in any probability-space reference).
    y = torch.tensor([[3.0, 1.0, 1.0, 2.0], [0.5, 4.0, 0.5, 0.5], [-2.0, -2.0, 3.0, -2.0]])
    members = torch.stack([y, y], dim=2)  # (N, K, 2): two identical members
    assert score_pass(canonicalize(members, "multilabel", per_member=True), ["margin"]).runner_up.tolist() == [1, 0, 0]


@settings(max_examples=200, deadline=None)
@given(
    values=hnp.arrays(np.int8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=9), elements=st.integers(-2, 2)),
    dtype=st.sampled_from([np.float32, np.float64]),
    T=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_labels_and_gap_on_tie_heavy_rows_match_a_stable_sort(values, dtype, T):
    # Few distinct values per row: ties at the top and at the second place are the rule here.
    x = torch.from_numpy(values.astype(dtype))
    out = score_pass(canonicalize(x), ["margin", "softmax"], T)
    order = np.argsort(-values, axis=1, kind="stable")  # ties keep their index order
    np.testing.assert_array_equal(out.prediction.numpy(), order[:, 0])
    np.testing.assert_array_equal(out.runner_up.numpy(), order[:, 1])
    top = np.take_along_axis(values, order[:, :2], axis=1).astype(dtype)
    np.testing.assert_array_equal(out.scores["margin"].numpy(), ((top[:, 1] - top[:, 0]) / dtype(T)).astype(dtype))
    # The top-2 leaves the shift intact for the exponential: softmax as computed without labels.
    alone = score_pass(canonicalize(x), ["softmax"], T, labels=False)
    torch.testing.assert_close(out.scores["softmax"], alone.scores["softmax"], rtol=0, atol=0)


class _Ops(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_the_pass_uses_no_topk_argmax_or_isfinite_and_one_finiteness_test_per_block(monkeypatch):
    x = torch.randn(60_000, 50)
    canon = canonicalize(x)
    tests = []
    original = kernels_module.block_finite
    monkeypatch.setattr(kernels_module, "block_finite", lambda z: tests.append(len(z)) or original(z))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # every block in this thread, where the mode sees its ops
    try:
        n_blocks = -(-len(x) // pass_block_rows(canon))
        with _Ops() as ops:
            score_pass(canon, SCORE_NAMES, 0.5, labels=True)
    finally:
        torch.set_num_threads(previous)
    assert len(tests) == n_blocks > 1
    assert not {"topk", "argmax", "argmin", "isfinite", "sort", "max", "min"} & set(ops.names), set(ops.names)
    # One row max and one top-2 per block: two `amax` over each block (the label indices are
    # numpy's first-index searches).
    assert ops.names.count("amax") <= 4 * n_blocks


def test_each_public_call_canonicalises_once(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 5)).astype(np.float32)
    y = rng.integers(0, 5, 500)
    calls = []
    original = logits_module.canonicalize
    monkeypatch.setattr(logits_module, "canonicalize", lambda *a, **k: calls.append(k.get("name")) or original(*a, **k))
    seen = {}
    original_fit = logits_module.fit_temperature
    original_pass = logits_module._run_pass

    def fit_spy(canon, labels, *args, **kwargs):
        seen["fit"] = canon
        return original_fit(canon, labels, *args, **kwargs)

    def pass_spy(canon, *args, **kwargs):
        seen.setdefault("pass", []).append(canon)
        return original_pass(canon, *args, **kwargs)

    monkeypatch.setattr(logits_module, "fit_temperature", fit_spy)
    monkeypatch.setattr(logits_module, "_run_pass", pass_spy)
    score = CertaintyRatioScore().fit(x, y)
    assert calls == ["X"] and seen["pass"] == [seen["fit"]]  # one validation feeds both
    assert seen["fit"].all_finite  # validated finite: the pass skips its finiteness test
    for method in ("score", "predict", "alternate_label"):
        calls.clear()
        getattr(score, method)(x)
        assert calls == ["query_logits"], method
    score.set_threshold(0.9)
    calls.clear()
    seen["pass"].clear()
    out = score.select(x)
    assert calls == ["query_logits"] and len(seen["pass"]) == 1  # score and alternate label together
    assert set(out) == {"score", "selected", "alternate_label"}
    calls.clear()
    score.calibrate(x, y)
    assert calls == ["X"]


# --------------------------------------------------------------------------- the block runner


def test_run_blocks_shares_blocks_between_threads_that_run_ops_single_threaded():
    if torch.get_num_threads() < 2 or not kernels_module._openmp().available:
        pytest.skip("needs torch's OpenMP runtime and at least 2 torch threads")
    seen, inner = set(), set()
    lock = threading.Lock()

    def fn(start, stop, work):
        with lock:
            seen.add(threading.get_ident())
            inner.add(torch.get_num_threads())
        time.sleep(0.002)

    before = torch.get_num_threads()
    run_blocks(64 * 40, 64, fn)
    assert len(seen) >= 2 and inner == {1}
    assert torch.get_num_threads() == before  # the caller's setting is restored


def test_run_blocks_respects_the_callers_thread_count_and_leaves_it_alone():
    results = {}

    def caller(k):
        torch.set_num_threads(k)  # per thread under OpenMP
        seen = set()
        run_blocks(64 * 20, 64, lambda s, e, w: seen.add(threading.get_ident()))
        results[k] = (len(seen), torch.get_num_threads())

    thread = threading.Thread(target=caller, args=(1,))
    before = torch.get_num_threads()
    thread.start()
    thread.join()
    assert results[1] == (1, 1)
    assert torch.get_num_threads() == before


def test_concurrent_callers_get_the_sequential_results():
    rng = np.random.default_rng(4)
    batches = [torch.from_numpy((rng.standard_normal((30_000, 20)) * 3).astype(np.float32)) for _ in range(4)]
    expected = [score_pass(canonicalize(b), SCORE_NAMES, 0.7) for b in batches]
    got: dict[int, object] = {}
    errors = []

    def work(i):
        try:
            for _ in range(3):
                got[i] = score_pass(canonicalize(batches[i]), SCORE_NAMES, 0.7)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    before = torch.get_num_threads()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for i, want in enumerate(expected):
        for name in SCORE_NAMES:
            torch.testing.assert_close(got[i].scores[name], want.scores[name], rtol=0, atol=0)
        torch.testing.assert_close(got[i].runner_up, want.runner_up, rtol=0, atol=0)
    assert torch.get_num_threads() == before


def test_run_blocks_reraises_the_first_error_and_stops():
    done = []

    def fn(start, stop, work):
        if start == 64 * 3:
            raise RuntimeError("block 3 failed")
        done.append(start)

    with pytest.raises(RuntimeError, match="block 3 failed"):
        run_blocks(64 * 500, 64, fn)
    assert len(done) < 500


def _fork_data() -> torch.Tensor:
    # Built without transcendental ops: after any torch.set_num_threads() call (an earlier test
    # makes one), MKL's vector math runs small inputs on an OpenMP team, which hangs in a
    # forked child (libgomp is not fork-safe); that is torch's, not this pass's, behaviour.
    return ((torch.arange(600.0) * 7) % 11 - 5).reshape(200, 3)


def _score_in_child(queue):
    import faulthandler

    faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the test with a traceback
    queue.put(SoftmaxScore().score(_fork_data()).sum().item())


def test_scoring_works_in_a_forked_child_after_the_parent_used_the_pool():
    x = _fork_data()
    expected = SoftmaxScore().score(torch.cat([x] * 100)).sum().item() / 100  # warms the pool
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_score_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_unknown_names_and_bad_temperatures_are_refused(name):
    canon = canonicalize(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"The 'names' parameter must hold score names"):
        score_pass(canon, [name, "msp"])
    with pytest.raises(ValueError, match=r"The 'temperature' parameter must be a positive finite float"):
        score_pass(canon, [name], 0.0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fit_then_query_pipeline_per_layout_is_unchanged_by_threads():
    # Same results at 1 thread and at the default: the threads only share out blocks.
    for task, per_member, shape in LAYOUTS:
        rng = np.random.default_rng(6)
        x = (rng.standard_normal(shape(5000, 5, 3)) * 2).astype(np.float32)
        y = random_labels(rng, task, x.shape, per_member)
        default = SoftmaxScore(task=task, per_member=per_member).fit(x, y)
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = SoftmaxScore(task=task, per_member=per_member).fit(x, y)
        finally:
            torch.set_num_threads(previous)
        assert single.temperature == default.temperature
        torch.testing.assert_close(single.scores, default.scores, rtol=0, atol=0)
