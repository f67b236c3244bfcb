"""Next-token datasets over token-id arrays, and a seeded sampler that can resume mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class SlidingWindowDataset(Dataset):
    """Windows of ``max_length`` tokens every ``stride`` tokens; targets are inputs shifted by one.

    ``token_ids`` may be any 1-D integer array, including a ``numpy.memmap`` of a corpus larger
    than RAM: windows are sliced on demand, never materialised.
    """

    def __init__(self, token_ids: np.ndarray | torch.Tensor | list[int], max_length: int, stride: int):
        if max_length <= 0 or stride <= 0:
            raise ValueError(f"max_length and stride must be positive, got {max_length} and {stride}")
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.cpu().numpy()
        self.token_ids = token_ids if isinstance(token_ids, np.ndarray) else np.asarray(token_ids)
        if self.token_ids.ndim != 1:
            raise ValueError(f"token_ids must be 1-D, got shape {self.token_ids.shape}")
        n_tokens = len(self.token_ids)
        if n_tokens < max_length + 1:
            raise ValueError(
                f"token array has {n_tokens} tokens; one window of max_length={max_length} "
                f"needs at least {max_length + 1}"
            )
        self.max_length = max_length
        self.stride = stride
        # Same windows as the book: starts at 0, stride, ... while start < n_tokens - max_length.
        self._n_windows = math.ceil((n_tokens - max_length) / stride)

    def __len__(self) -> int:
        return self._n_windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self._n_windows:
            raise IndexError(f"window {index} out of range [0, {self._n_windows})")
        start = index * self.stride
        chunk = np.asarray(self.token_ids[start : start + self.max_length + 1], dtype=np.int64)
        chunk_t = torch.from_numpy(chunk)
        return chunk_t[:-1], chunk_t[1:]


class WindowArrayDataset(Dataset):
    """Pre-cut windows: each row of a 2-D array holds ``context_length + 1`` token ids.

    The pipeline stores windows this way (``data/windows/*.npy``, uint16); a row gives inputs
    ``row[:-1]`` and targets ``row[1:]`` as int64, like ``SlidingWindowDataset``.
    """

    def __init__(self, windows: np.ndarray):
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise ValueError(f"windows must be 2-D with at least 2 tokens per row, got shape {windows.shape}")
        self.windows = windows
        self.context_length = windows.shape[1] - 1

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = torch.from_numpy(np.asarray(self.windows[index], dtype=np.int64))
        return row[:-1], row[1:]


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch shuffling, sharded across ranks, that can start at a given batch.

    Epoch ``e`` uses the permutation drawn from ``seed + e`` (the DistributedSampler convention),
    so a resumed run replays exactly the order of an uninterrupted one. Each rank takes every
    ``num_replicas``-th index of the (padded) permutation, so each sample is seen once per epoch
    across ranks.
    """

    def __init__(
        self,
        data: Sized,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.n = len(data)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        if drop_last:
            self.per_rank = self.n // num_replicas
        else:
            self.per_rank = math.ceil(self.n / num_replicas)
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Choose the epoch's permutation and skip its first ``start_index`` samples of this rank."""
        self.epoch, self.start_index = epoch, start_index

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.num_replicas
        if total > len(order):  # pad by wrapping so every rank gets the same count
            order += order[: total - len(order)]
        return order[:total][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start_index :])

    def __len__(self) -> int:
        # A resumed epoch may skip past the end (its last batch was partial): nothing is left.
        return max(0, self.per_rank - self.start_index)


def create_dataloader(
    token_ids: np.ndarray | torch.Tensor | list[int],
    *,
    batch_size: int,
    max_length: int,
    stride: int,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """The book's ``create_dataloader_v1``, over token ids, with seeded, resumable shuffling."""
    dataset = SlidingWindowDataset(token_ids, max_length, stride)
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers
    )
