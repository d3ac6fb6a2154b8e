"""Small models and loaders shared by the extraction and store tests."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset


class LinearNet(torch.nn.Module):
    """``logits(x) = W x + b``, counting calls and recording what each call saw."""

    def __init__(self, in_features: int = 6, n_classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.linear = torch.nn.Linear(in_features, n_classes)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(n_classes, in_features, generator=generator))
            self.linear.bias.copy_(torch.randn(n_classes, generator=generator))
        self.calls = 0
        self.seen: list[dict] = []

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen.append(
            {
                "training": self.training,
                "inference": torch.is_inference_mode_enabled(),
                "device": x.device,
                "rows": x.shape[0],
            }
        )
        return self.linear(x)


class DropoutNet(torch.nn.Module):
    """Batch norm and dropout: its outputs are deterministic only in eval mode."""

    def __init__(self, in_features: int = 6, n_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(in_features, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.5)
        )
        self.head = torch.nn.Linear(16, n_classes)
        with torch.no_grad():
            self.body[1].running_mean.uniform_(-1, 1)
            self.body[1].running_var.uniform_(0.5, 2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def tensor_data(n: int = 50, in_features: int = 6, n_classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_features, generator=generator), torch.randint(0, n_classes, (n,), generator=generator)


def tensor_loader(n: int = 50, batch_size: int = 8, seed: int = 0, **kwargs) -> DataLoader:
    x, y = tensor_data(n, seed=seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, **kwargs)


class CountingLoader:
    """A re-iterable list of batches that counts how often it is iterated."""

    def __init__(self, batches: list) -> None:
        self.batches = batches
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


# ---------------------------------------------------------------------------- writer processes for kill -9 tests


def wait_for(path: str, timeout: float = 120.0) -> None:
    """Block until ``path`` exists (another process's signal)."""
    import os
    import time

    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def pause(ready: str, go: str) -> None:
    """Say "ready" (create ``ready``), then wait for ``go``: a point where a test kills or resumes us."""
    open(ready, "w").close()
    wait_for(go, timeout=600.0)


class PausingLoader:
    """The batches of ``tensor_loader(n, batch_size)``; pauses on pass ``pause_pass`` before batch
    ``pause_at`` (the number of batches: after the last one), and sleeps ``sleep`` s per batch."""

    def __init__(self, n: int, batch_size: int, ready: str, go: str, pause_pass: int = 0, pause_at: int = 0,
                 sleep: float = 0.0) -> None:
        x, y = tensor_data(n)
        self.batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]
        self.ready, self.go, self.pause_pass, self.pause_at, self.sleep = ready, go, pause_pass, pause_at, sleep
        self.passes = 0

    def __iter__(self):
        import time

        self.passes += 1
        for index, batch in enumerate(self.batches):
            if self.passes == self.pause_pass and index == self.pause_at:
                pause(self.ready, self.go)
            if self.sleep:
                time.sleep(self.sleep)
            yield batch
        if self.passes == self.pause_pass and self.pause_at == len(self.batches):
            pause(self.ready, self.go)


def extract_in_child(outdir: str, prefix: str, seed: int, n: int, batch_size: int, ready: str, go: str,
                     pause_pass: int = 0, pause_at: int = 0, refresh: bool = False,
                     pause_before_manifest: bool = False, sleep: float = 0.0, batch_rows: int = 16) -> None:
    """A writer process: extract ``LinearNet(seed)`` over a :class:`PausingLoader` into the store,
    in record batches of ``batch_rows`` rows (so that a pause finds some already written)."""
    torch.set_num_threads(1)
    from seapig_core import store
    from seapig_core.extract import extract_logits

    store.BATCH_ROWS = batch_rows
    if pause_before_manifest:
        write_manifest = store._write_manifest

        def paused(path, manifest):
            pause(ready, go)
            write_manifest(path, manifest)

        store._write_manifest = paused
    loader = PausingLoader(n, batch_size, ready, go, pause_pass, pause_at, sleep)
    extract_logits(LinearNet(seed=seed), loader, outdir=outdir, prefix=prefix, refresh=refresh, progress=False)
