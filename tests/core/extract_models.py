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
