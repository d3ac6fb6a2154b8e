"""Extraction from model + loader: batch forms, ids, labels, device, modes, and bad input."""

from __future__ import annotations

import collections
import io
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler, TensorDataset

from seapig_core.extract import Extraction, extract_logits
from tests.core.extract_models import CountingLoader, DropoutNet, LinearNet, tensor_data, tensor_loader


def direct(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference: one forward pass in eval mode, outside the library."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model.logits(x)
    model.train(was)
    return out


# ---------------------------------------------------------------------------- batch forms


def _batches(form: str, x: torch.Tensor, y: torch.Tensor, size: int = 8) -> list:
    out = []
    for start in range(0, len(x), size):
        xb, yb = x[start : start + size], y[start : start + size]
        ib = torch.arange(start, start + len(xb)) + 1000
        out.append(
            {
                "tensor": xb,
                "tuple1": (xb,),
                "tuple2": (xb, yb),
                "tuple3": (xb, yb, ib),
                "list2": [xb, yb],
                "list3": [xb, yb, ib],
                "dict_image": {"image": xb, "label": yb, "id": ib},
                "dict_input": {"input": xb, "y": yb, "sample_id": ib},
                "dict_x": {"x": xb, "target": yb},
                "dict_plural": {"inputs": xb, "labels": yb, "ids": ib},
            }[form]
        )
    return out


FORMS = {
    # form: (has labels, has batch ids)
    "tensor": (False, False),
    "tuple1": (False, False),
    "tuple2": (True, False),
    "tuple3": (True, True),
    "list2": (True, False),
    "list3": (True, True),
    "dict_image": (True, True),
    "dict_input": (True, True),
    "dict_x": (True, False),
    "dict_plural": (True, True),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_batch_form(form):
    x, y = tensor_data(27)
    model = LinearNet()
    has_labels, has_ids = FORMS[form]
    out = extract_logits(model, _batches(form, x, y), progress=False)
    assert isinstance(out, Extraction) and not out.from_cache and out.path is None
    torch.testing.assert_close(out.logits, direct(model, x), rtol=0, atol=1e-6)
    if has_labels:
        assert torch.equal(out.labels, y)
    else:
        assert out.labels is None
    expected_ids = np.arange(27) + (1000 if has_ids else 0)
    assert out.sample_ids.dtype == np.int64
    np.testing.assert_array_equal(out.sample_ids, expected_ids)


def test_tensor_dataset_loader_gives_labels_and_running_ids():
    x, y = tensor_data(50)
    model = LinearNet()
    out = extract_logits(model, DataLoader(TensorDataset(x, y), batch_size=16), progress=False)
    assert out.n_samples == 50
    assert torch.equal(out.labels, y)
    np.testing.assert_array_equal(out.sample_ids, np.arange(50))


def test_configurable_dict_keys():
    x, y = tensor_data(20)
    batches = [{"pixels": x[i : i + 5], "cls": y[i : i + 5], "uid": torch.arange(i, i + 5) * 7} for i in range(0, 20, 5)]
    out = extract_logits(LinearNet(), batches, input_key="pixels", label_key="cls", id_key="uid", progress=False)
    assert torch.equal(out.labels, y)
    np.testing.assert_array_equal(out.sample_ids, np.arange(20) * 7)


def test_int_keys_index_tuple_batches():
    x, y = tensor_data(12)
    ids = torch.arange(12) + 5
    batches = [(ids[i : i + 4], x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    model = LinearNet()
    out = extract_logits(model, batches, input_key=1, label_key=2, id_key=0, progress=False)
    torch.testing.assert_close(out.logits, direct(model, x), rtol=0, atol=1e-6)
    assert torch.equal(out.labels, y)
    np.testing.assert_array_equal(out.sample_ids, ids.numpy())


def test_nested_dict_input_is_passed_whole():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)

        def logits(self, x):
            return self.a(x["left"]) + self.b(x["right"])

    left, right = torch.randn(10, 3), torch.randn(10, 4)
    batches = [{"input": {"left": left[i : i + 5], "right": right[i : i + 5]}} for i in (0, 5)]
    model = TwoInputs()
    out = extract_logits(model, batches, progress=False)
    torch.testing.assert_close(out.logits, direct(model, {"left": left, "right": right}), rtol=0, atol=1e-6)


class _Named(Dataset):
    """Samples with string ids, as file-backed data sets give them."""

    def __init__(self, n: int) -> None:
        self.x, self.y = tensor_data(n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "id": f"img_{i:04d}.png"}


def test_string_ids_from_the_default_collate():
    out = extract_logits(LinearNet(), DataLoader(_Named(10), batch_size=4), progress=False)
    assert out.sample_ids.dtype == object
    assert out.sample_ids.tolist() == [f"img_{i:04d}.png" for i in range(10)]


def test_output_shape_is_kept_and_labels_can_be_vectors():
    class PerMember(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(6, 4 * 3)

        def logits(self, x):
            return self.linear(x).reshape(len(x), 4, 3)

    x, _ = tensor_data(10)
    targets = torch.rand(10, 4) > 0.5
    out = extract_logits(PerMember(), [(x[:6], targets[:6]), (x[6:], targets[6:])], progress=False)
    assert out.logits.shape == (10, 4, 3) and out.logits.dtype == torch.float32
    assert torch.equal(out.labels, targets)


def test_single_logit_models_give_one_dimensional_logits():
    class Binary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(6, 1)

        def logits(self, x):
            return self.linear(x).squeeze(1)

    out = extract_logits(Binary(), tensor_loader(9, batch_size=4), progress=False)
    assert out.logits.shape == (9,)


# ---------------------------------------------------------------------------- model handling


def test_logits_equal_a_direct_forward_pass_batch_by_batch():
    x, y = tensor_data(40)
    model = DropoutNet()
    out = extract_logits(model, DataLoader(TensorDataset(x, y), batch_size=16), progress=False)
    per_batch = torch.cat([direct(model, x[i : i + 16]) for i in range(0, 40, 16)])
    assert torch.equal(out.logits, per_batch)  # the same computation, bit for bit
    torch.testing.assert_close(out.logits, direct(model, x))


def test_runs_in_eval_and_inference_mode_and_restores_every_training_flag():
    model = torch.nn.Module()
    model.net = LinearNet()
    model.frozen = torch.nn.BatchNorm1d(3)
    model.logits = lambda x: model.net.logits(x)  # an instance attribute works too
    model.train()
    model.frozen.eval()  # a submodule deliberately left in eval, e.g. frozen batch norm
    extract_logits(model, tensor_loader(20), progress=False)
    assert all(seen["training"] is False and seen["inference"] for seen in model.net.seen)
    assert model.training and model.net.training and not model.frozen.training


def test_training_flags_are_restored_after_an_error():
    class Failing(LinearNet):
        def logits(self, x):
            if self.calls == 2:
                raise RuntimeError("out of memory, say")
            return super().logits(x)

    model = Failing()
    model.train()
    with pytest.raises(RuntimeError, match="out of memory"):
        extract_logits(model, tensor_loader(40), progress=False)
    assert model.training and model.linear.training
    model.eval()
    with pytest.raises(RuntimeError, match="out of memory"):
        extract_logits(model, tensor_loader(40), progress=False)
    assert not model.training


def test_cpu_logits_in_float32_whatever_the_model_returns():
    class Double(LinearNet):
        def logits(self, x):
            return super().logits(x).double()

    model = Double()
    out = extract_logits(model, tensor_loader(20), progress=False)
    assert out.logits.dtype == torch.float32 and out.logits.device.type == "cpu"
    assert all(seen["device"].type == "cpu" for seen in model.seen)


def test_model_without_parameters_runs_on_cpu():
    class Identity(torch.nn.Module):
        def logits(self, x):
            return x * 2

    out = extract_logits(Identity(), [torch.ones(3, 2)], progress=False)
    assert torch.equal(out.logits, torch.full((3, 2), 2.0))


@pytest.mark.parametrize("sized", [True, False], ids=["preallocated", "chunks"])
def test_models_that_reuse_their_output_buffer_keep_every_row(sized):
    class Reusing(LinearNet):
        def __init__(self):
            super().__init__()
            self.out = torch.empty(8, 4)

        def logits(self, x):
            self.out[: len(x)] = super().logits(x)
            return self.out[: len(x)]  # the same memory every batch, as static-shape runtimes do

    x, y = tensor_data(20)
    model = Reusing()
    loader = DataLoader(TensorDataset(x, y), batch_size=8) if sized else [x[i : i + 8] for i in range(0, 20, 8)]
    out = extract_logits(model, loader, progress=False)
    torch.testing.assert_close(out.logits, direct(LinearNet(), x), rtol=0, atol=1e-6)


def test_a_loader_that_yields_more_rows_than_it_announces_still_gives_every_row():
    class Understated(SequentialSampler):
        def __len__(self):
            return 5  # the DataLoader sizes its result from this; 23 rows follow

    x, y = tensor_data(23)
    dataset = TensorDataset(x, y)
    model = LinearNet()
    out = extract_logits(model, DataLoader(dataset, batch_size=4, sampler=Understated(dataset)), progress=False)
    torch.testing.assert_close(out.logits, direct(model, x), rtol=0, atol=1e-6)
    assert torch.equal(out.labels, y)


def test_results_are_ordinary_tensors_that_autograd_accepts():
    out = extract_logits(LinearNet(), tensor_loader(20), progress=False)
    assert not out.logits.is_inference() and not out.labels.is_inference()
    weight = torch.ones(1, requires_grad=True)
    (out.logits * weight).sum().backward()
    out.logits[0, 0] = 1.0  # in-place updates work outside inference mode
    assert weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_gets_cuda_inputs_and_returns_cpu_logits():
    model = LinearNet().cuda()
    x, y = tensor_data(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, pin_memory=True)
    direct(model, x[:16].cuda())  # the first matrix product allocates cuBLAS's workspace, which stays
    before = torch.cuda.memory_allocated()
    out = extract_logits(model, loader, progress=False)
    assert torch.cuda.memory_allocated() == before  # nothing kept on the accelerator
    assert all(seen["device"].type == "cuda" for seen in model.seen)
    assert out.logits.device.type == "cpu" and out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, direct(model, x.cuda()).cpu())


# ---------------------------------------------------------------------------- progress


def test_progress_callback_reports_rows_done_and_total():
    calls = []
    extract_logits(LinearNet(), tensor_loader(20, batch_size=8), progress=False, progress_callback=lambda *a: calls.append(a))
    assert calls == [(8, 20), (16, 20), (20, 20)]
    calls.clear()
    extract_logits(LinearNet(), tensor_loader(20, batch_size=8, drop_last=True), progress=False,
                   progress_callback=lambda *a: calls.append(a))
    assert calls == [(8, 16), (16, 16)]
    calls.clear()
    dataset = TensorDataset(*tensor_data(20))  # batch-indexed: one __getitem__ per batch
    batched = DataLoader(dataset, sampler=BatchSampler(SequentialSampler(dataset), 8, False), batch_size=None)
    out = extract_logits(LinearNet(), batched, progress=False, progress_callback=lambda *a: calls.append(a))
    assert calls == [(8, 20), (16, 20), (20, 20)] and out.n_samples == 20
    calls.clear()
    extract_logits(LinearNet(), [torch.randn(3, 6)] * 2, progress=False, progress_callback=lambda *a: calls.append(a))
    assert calls == [(3, None), (6, None)]  # a plain iterable does not say its size


def test_progress_bar_is_drawn_on_request_and_silent_off_a_terminal(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    extract_logits(LinearNet(), tensor_loader(20), progress=False)
    extract_logits(LinearNet(), tensor_loader(20))  # default: stderr is not a terminal here
    assert stream.getvalue() == ""
    extract_logits(LinearNet(), tensor_loader(20), progress=True)
    assert "extracting logits" in stream.getvalue()


# ---------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
    n_classes=st.integers(1, 5),
    with_labels=st.booleans(),
)
def test_any_batching_gives_the_concatenated_per_batch_outputs(sizes, n_classes, with_labels):
    model = LinearNet(n_classes=n_classes)
    batches, expected, labels = [], [], []
    for i, size in enumerate(sizes):
        xb = torch.randn(size, 6, generator=torch.Generator().manual_seed(i))
        yb = torch.arange(size) % n_classes
        batches.append((xb, yb) if with_labels else (xb,))
        expected.append(direct(model, xb))
        labels.append(yb)
    out = extract_logits(model, batches, progress=False)
    assert torch.equal(out.logits, torch.cat(expected))
    np.testing.assert_array_equal(out.sample_ids, np.arange(sum(sizes)))
    assert (out.labels is None) != with_labels
    if with_labels:
        assert torch.equal(out.labels, torch.cat(labels))


# ---------------------------------------------------------------------------- bad input


class _NoLogits(torch.nn.Module):
    def forward(self, x):
        return x


class _AttrLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logits = torch.zeros(3)  # a tensor, not a method


def _returns(value):
    class Model(torch.nn.Module):
        def logits(self, x):
            return value(x)

    return Model()


BAD_MODELS = [
    (lambda: object(), TypeError, r"'model' parameter must be a torch\.nn\.Module.*Got object"),
    (_NoLogits, TypeError, r"callable logits\(x\).*Got _NoLogits with no 'logits' attribute"),
    (_AttrLogits, TypeError, r"callable logits\(x\).*non-callable 'logits' \(Tensor\)"),
]


@pytest.mark.parametrize(("make", "error", "message"), BAD_MODELS, ids=["not-module", "no-logits", "logits-attr"])
def test_models_without_usable_logits_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        extract_logits(make(), tensor_loader(8), progress=False)


def _ragged_logits():
    calls = collections.Counter()

    def out(x):
        calls["n"] += 1
        return torch.zeros(len(x), 3 if calls["n"] == 1 else 4)

    return out


BAD_OUTPUTS = [
    # A pair is (logits, confidence logit) of a learned confidence head (tests/core/test_confidence.py).
    (lambda x: (x, x), ValueError, r"confidence logit .* must be shaped like the logits without their unit axis .* in batch 0"),
    (lambda x: x.tolist(), TypeError, r"must return a torch\.Tensor, or a \(logits, confidence_logit\) pair of tensors .* "
                                      r"Got a list of 8 item"),
    (lambda x: {"logits": x}, TypeError, r"must return a torch\.Tensor \(or a \(logits, confidence_logit\) pair .*\)\. Got dict"),
    (lambda x: torch.zeros(len(x) - 1, 3), ValueError, r"one row per input\. Got shape \(7, 3\) for 8 inputs in batch 0"),
    (lambda x: torch.tensor(1.0), ValueError, r"one row per input\. Got shape \(\)"),
    (_ragged_logits(), ValueError, r"keep its trailing shape.*Got \(4,\) in batch 1 instead of \(3,\)"),
    (lambda x: torch.zeros(len(x), 2, dtype=torch.bool), TypeError, r"real numbers\. Got dtype torch\.bool"),
    (lambda x: torch.zeros(len(x), 0), ValueError, r"at least one logit per input\. Got shape \(8, 0\)"),
]


@pytest.mark.parametrize(
    ("fn", "error", "message"), BAD_OUTPUTS,
    ids=["tuple", "list", "dict", "rows", "scalar", "ragged", "bool", "empty-rows"],
)
def test_bad_model_outputs_are_refused(fn, error, message):
    with pytest.raises(error, match=message):
        extract_logits(_returns(fn), tensor_loader(20, batch_size=8), progress=False)


def test_empty_loaders_are_refused():
    empty = DataLoader(TensorDataset(torch.zeros(0, 6), torch.zeros(0)), batch_size=4)
    with pytest.raises(ValueError, match=r"'loader' parameter must yield at least one batch\. Got an empty loader"):
        extract_logits(LinearNet(), empty, progress=False)
    with pytest.raises(ValueError, match=r"at least one sample\. Got 2 empty batches"):
        extract_logits(LinearNet(), [torch.zeros(0, 6)] * 2, progress=False)


x8, y8 = tensor_data(8)
BAD_BATCHES = [
    ([(x8, y8[:7])], ValueError, r"labels of each batch must have one row per input\. Got \(7,\) labels for 8 inputs in batch 0 of 'loader'"),
    ([(x8, y8, torch.arange(9))], ValueError, r"ids of each batch must be one per input\. Got ids of shape \(9,\) for 8"),
    ([(x8, y8, torch.rand(8))], TypeError, r"ids must be integers or strings\. Got dtype float32"),
    ([(x8, y8), (x8,)], ValueError, r"must carry labels and ids like the first batch.*Got \('labels', None.*in batch 1"),
    ([(x8, y8), (x8, y8.int())], ValueError, r"like the first batch.*torch\.int64 \(\).*Got .*torch\.int32 \(\).* in batch 1"),
    ([(x8, y8, torch.arange(8)), (x8, y8, [str(i) for i in range(8)])], ValueError, r"'ids', 'int'.*Got .*'ids', 'str'"),
    ([(x8, y8, y8, y8)], ValueError, r"\(x,\), \(x, y\) or \(x, y, ids\).*Got 4 items in batch 0"),
    (["not a batch"], TypeError, r"must yield tensors, \(x, y\[, ids\]\) tuples/lists or dicts\. Got a str in batch 0"),
    ([{"pixels": x8}], ValueError, r"no input under the default keys.*Pass 'input_key'.*\['pixels'\]"),
    ([{"image": x8, "x": x8}], ValueError, r"several candidate input keys \['image', 'x'\]; pass 'input_key'"),
    ([(torch.tensor(1.0),)], TypeError, r"tensor with a batch axis.*Got a 0-d tensor in batch 0"),
    ([("abc",)], TypeError, r"tensor with a batch axis.*Got str in batch 0"),
]


@pytest.mark.parametrize(("batches", "error", "message"), BAD_BATCHES, ids=lambda v: None)
def test_bad_batches_are_refused(batches, error, message):
    with pytest.raises(error, match=message):
        extract_logits(LinearNet(), batches, progress=False)


def test_bad_keys_and_options_are_refused():
    model = LinearNet()
    with pytest.raises(ValueError, match=r"'input_key' parameter names 'pix', which batch 0 lacks"):
        extract_logits(model, [{"image": x8}], input_key="pix", progress=False)
    with pytest.raises(ValueError, match=r"'label_key' parameter is position 5, outside batch 0's 2 items"):
        extract_logits(model, [(x8, y8)], label_key=5, progress=False)
    with pytest.raises(ValueError, match=r"must be int positions"):
        extract_logits(model, [(x8, y8)], label_key="label", progress=False)
    with pytest.raises(TypeError, match=r"'input_key' parameter must be a str, an int or None\. Got float"):
        extract_logits(model, [x8], input_key=1.5, progress=False)
    with pytest.raises(TypeError, match=r"'loader' parameter must be an iterable of batches.*Got Tensor"):
        extract_logits(model, x8, progress=False)
    with pytest.raises(TypeError, match=r"'loader' parameter must be an iterable.*Got int"):
        extract_logits(model, 3, progress=False)
    with pytest.raises(TypeError, match=r"'progress' parameter must be a bool or None\. Got str"):
        extract_logits(model, [x8], progress="yes")
    with pytest.raises(TypeError, match=r"'progress_callback' parameter must be callable\. Got int"):
        extract_logits(model, [x8], progress=False, progress_callback=3)
    with pytest.raises(TypeError, match=r"'data_fingerprint' parameter must be a non-empty str\. Got ''"):
        extract_logits(model, [x8], outdir=None, data_fingerprint="", progress=False)


@pytest.mark.parametrize("option", [{"prefix": "cal"}, {"refresh": True}, {"data_fingerprint": "v1"}])
def test_store_options_need_an_outdir(option):
    with pytest.raises(ValueError, match=r"only apply with 'outdir'"):
        extract_logits(LinearNet(), [x8], progress=False, **option)


def test_loader_is_read_once_without_a_store():
    loader = CountingLoader([x8, x8])
    extract_logits(LinearNet(), loader, progress=False)
    assert loader.passes == 1
