"""Logit files of every supported format, directories of batches, import paths and extraction from factories."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch

from seapig_core.sources import (
    call_factory,
    check_source,
    extract_from_factories,
    list_logit_files,
    read_logits_file,
    resolve_import_path,
)

LOGITS = np.arange(12, dtype=np.float32).reshape(4, 3)
LABELS = np.array([2, 1, 0, 2])
IDS = np.array(["a", "b", "c", "d"])


def _table(with_labels: bool = True) -> pa.Table:
    columns = {"logits": pa.FixedSizeListArray.from_arrays(pa.array(LOGITS.reshape(-1)), 3), "sample_id": pa.array(IDS)}
    if with_labels:
        columns["label"] = pa.array(LABELS)
    return pa.table(columns)


@pytest.mark.parametrize("suffix", [".npz", ".parquet", ".arrow", ".feather"])
def test_formats_with_labels_and_ids(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"batch{suffix}"
    if suffix == ".npz":
        np.savez(path, logits=LOGITS, labels=LABELS, sample_ids=IDS)
    elif suffix == ".parquet":
        pq.write_table(_table(), path)
    else:
        feather.write_feather(_table(), path)
    data = read_logits_file(path)
    np.testing.assert_array_equal(data.logits.numpy(), LOGITS)
    np.testing.assert_array_equal(data.labels.numpy(), LABELS)
    assert data.sample_ids.tolist() == IDS.tolist() and len(data) == 4


def test_npy_and_variable_list_columns(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", LOGITS)
    data = read_logits_file(tmp_path / "x.npy")
    assert data.labels is None and data.sample_ids.tolist() == [0, 1, 2, 3]
    pq.write_table(pa.table({"logits": pa.array(LOGITS.tolist())}), tmp_path / "lists.parquet")
    np.testing.assert_array_equal(read_logits_file(tmp_path / "lists.parquet").logits.numpy(), LOGITS)
    pq.write_table(pa.table({"logits": pa.array([[1.0, 2.0], [3.0]])}), tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match="same length"):
        read_logits_file(tmp_path / "ragged.parquet")


def test_store_entries_are_read_and_verified(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from seapig_core.extract import extract_logits

    class Net(torch.nn.Linear):
        def logits(self, x):
            return self(x)

    loader = DataLoader(TensorDataset(torch.randn(10, 4), torch.arange(10) % 3), batch_size=4)
    out = extract_logits(Net(4, 3), loader, outdir=tmp_path, prefix="cal", progress=False)
    data = read_logits_file(out.path)
    assert torch.equal(data.logits, out.logits) and torch.equal(data.labels, out.labels)
    assert list_logit_files(tmp_path) == {"cal": out.path}
    out.path.write_bytes(out.path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="could not be read as logits|valid logits store file"):
        read_logits_file(out.path)


def test_pickles_and_bad_files_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="could not be read as logits"):
        read_logits_file(tmp_path / "objects.npy")
    (tmp_path / "evil.npz").write_bytes(pickle.dumps({"logits": LOGITS}))
    with pytest.raises(ValueError, match="could not be read as logits"):
        read_logits_file(tmp_path / "evil.npz")
    np.savez(tmp_path / "nologits.npz", scores=LOGITS)
    with pytest.raises(ValueError, match="named 'logits'"):
        read_logits_file(tmp_path / "nologits.npz")
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="holds no samples"):
        read_logits_file(tmp_path / "empty.npy")
    np.savez(tmp_path / "ints.npz", logits=np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="float logits"):
        read_logits_file(tmp_path / "ints.npz")
    np.savez(tmp_path / "short.npz", logits=LOGITS, labels=LABELS[:2])
    with pytest.raises(ValueError, match="one label per sample"):
        read_logits_file(tmp_path / "short.npz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="must be a logits file"):
        read_logits_file(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="does not exist"):
        read_logits_file(tmp_path / "missing.npz")


def test_directories_of_batches(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        list_logit_files(tmp_path / "inbox")
    (tmp_path / "inbox").mkdir()
    with pytest.raises(ValueError, match="holds none"):
        list_logit_files(tmp_path / "inbox")
    np.save(tmp_path / "inbox" / "b.npy", LOGITS)
    np.savez(tmp_path / "inbox" / "a.npz", logits=LOGITS)
    (tmp_path / "inbox" / ".a-partial.npz.tmp").write_bytes(b"")
    (tmp_path / "inbox" / "readme.md").write_text("")
    assert list(list_logit_files(tmp_path / "inbox")) == ["a", "b"]
    np.save(tmp_path / "inbox" / "a.npy", LOGITS)
    with pytest.raises(ValueError, match="two files for batch 'a'"):
        list_logit_files(tmp_path / "inbox")


def test_import_paths() -> None:
    assert resolve_import_path("seapig_core.examples.digits:digits_loader").__name__ == "digits_loader"
    assert resolve_import_path("seapig_core.examples.digits:TrainConfig.fingerprint").__name__ == "fingerprint"
    assert call_factory("seapig_core.examples.digits:TrainConfig", {"epochs": 2}).epochs == 2
    with pytest.raises(ValueError, match="of the form 'package.module:function'"):
        resolve_import_path("seapig_core.examples.digits.digits_loader")
    with pytest.raises(ValueError, match="cannot import module 'seapig_core.examples.nothing'"):
        resolve_import_path("seapig_core.examples.nothing:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        resolve_import_path("seapig_core.examples.digits:nope")
    with pytest.raises(TypeError, match="must be an import path"):
        resolve_import_path(42)
    with pytest.raises(ValueError, match="type 'int', not a function or class"):
        call_factory("seapig_core.examples.digits:CLASSES")
    with pytest.raises(TypeError, match="'factory_kwargs' parameter must be a dict"):
        call_factory("seapig_core.examples.digits:TrainConfig", [1])


def test_check_source() -> None:
    assert check_source("x.npz", None, None) == "files"
    assert check_source(None, "a:b", "c:d") == "model"
    with pytest.raises(ValueError, match="not both"):
        check_source("x", "a:b", "c:d")
    with pytest.raises(ValueError, match="Got no 'model' and 'data'"):
        check_source(None, None, None)
    with pytest.raises(ValueError, match="Got no 'model'"):
        check_source(None, None, "c:d")


def tiny_model() -> torch.nn.Module:
    """A factory for the test below."""

    class Net(torch.nn.Linear):
        def logits(self, x):
            return self(x)

    torch.manual_seed(0)
    return Net(4, 3)


def tiny_batches(n: int = 2):
    """A factory returning named DataLoaders."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(1)
    return {f"part-{i}": DataLoader(TensorDataset(torch.randn(5 + i, 4, generator=g)), batch_size=2) for i in range(n)}


def test_extract_from_factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEAPIG_ALLOWED_MODULES", "tests.core.test_sources, torch.nn")
    seen = []
    here = "tests.core.test_sources"
    batches = extract_from_factories(
        f"{here}:tiny_model", f"{here}:tiny_batches", tmp_path, data_kwargs={"n": 2},
        progress_callback=lambda done, total: seen.append((done, total)), progress=False,
    )
    assert [(b.batch, b.samples, b.from_cache) for b in batches] == [("part-0", 5, False), ("part-1", 6, False)]
    assert seen[-1] == (11, 11) and all(total == 11 for _, total in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    again = extract_from_factories(f"{here}:tiny_model", f"{here}:tiny_batches", tmp_path, data_kwargs={"n": 2}, progress=False)
    assert all(b.from_cache for b in again)
    with pytest.raises(ValueError, match="empty mapping"):
        extract_from_factories(f"{here}:tiny_model", f"{here}:tiny_batches", tmp_path, data_kwargs={"n": 0})
    with pytest.raises(ValueError, match="must return a torch.nn.Module"):
        extract_from_factories(f"{here}:tiny_batches", f"{here}:tiny_batches", tmp_path)
    with pytest.raises(ValueError, match=r"must return a torch.nn.Module with .logits\(x\)\. Got a Linear"):
        extract_from_factories("torch.nn:Linear", f"{here}:tiny_batches", tmp_path, model_kwargs={"in_features": 3, "out_features": 2})


# ----------------------------------------------------------------------------- import allowlist


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        ("os:system", {"command": "touch {marker}"}),
        ("subprocess:run", {"args": ["touch", "{marker}"]}),
        ("builtins:exec", {"source": "open('{marker}', 'w')"}),
        ("posix:system", {"command": "touch {marker}"}),
    ],
)
def test_the_standard_library_is_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, kwargs: dict
) -> None:
    """The issue's attack: model="os:system" with model_kwargs={"command": ...} ran a shell command."""
    marker = tmp_path / "pwned"
    kwargs = {k: [a.format(marker=marker) for a in v] if isinstance(v, list) else v.format(marker=marker) for k, v in kwargs.items()}
    monkeypatch.setenv("SEAPIG_ALLOWED_MODULES", path.split(":")[0])  # even when listed
    with pytest.raises(ValueError, match="standard library or its builtins") as info:
        call_factory(path, kwargs, name="model")
    assert "The 'model' parameter" in str(info.value)
    with pytest.raises(ValueError, match="standard library"):
        extract_from_factories(path, "seapig_core.examples.digits:digits_loader", tmp_path / "store", model_kwargs=kwargs)
    assert not marker.exists()


def test_only_allowlisted_modules_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "mypkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import os\nfrom os import system\nfrom functools import partial\n"
        "def make():\n    return 'made'\nclass Factory:\n    @staticmethod\n    def build():\n        return 'built'\n"
        "curried = partial(make)\nCONSTANT = 3\n"
    )
    (tmp_path / "site" / "mypkg_evil.py").write_text("def make():\n    return 'evil'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("SEAPIG_ALLOWED_MODULES", raising=False)
    with pytest.raises(ValueError, match="'mypkg', which is not allowed.*SEAPIG_ALLOWED_MODULES"):
        resolve_import_path("mypkg:make", "model")
    assert "mypkg" not in sys.modules  # refused on the name, before importing
    monkeypatch.setenv("SEAPIG_ALLOWED_MODULES", "mypkg")
    assert call_factory("mypkg:make") == "made"
    assert call_factory("mypkg:Factory.build") == "built"
    with pytest.raises(ValueError, match="not allowed"):
        resolve_import_path("mypkg_evil:make")  # a prefix of the name is not its package
    with pytest.raises(ValueError, match="reaches the module 'os'"):
        resolve_import_path("mypkg:os.system")
    with pytest.raises(ValueError, match="type 'builtin_function_or_method', not a function or class"):
        resolve_import_path("mypkg:system")  # re-exported from the standard library
    with pytest.raises(ValueError, match="type 'partial', not a function or class"):
        resolve_import_path("mypkg:curried")
    with pytest.raises(ValueError, match="type 'int', not a function or class"):
        resolve_import_path("mypkg:CONSTANT")
    monkeypatch.setenv("SEAPIG_ALLOWED_MODULES", "mypkg; rm -rf /")
    with pytest.raises(ValueError, match="must list module names"):
        resolve_import_path("mypkg:make")
