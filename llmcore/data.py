"""Next-token datasets over token-id arrays, and a seeded sampler that can resume mid-epoch.

Windows are views: a dataset holds the token array (or ``TokenShards``, several memory-mapped
arrays read as one) and slices a window when asked, so memory and time per sample do not depend
on the corpus's size.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

if TYPE_CHECKING:
    from llmcore.train import TrainConfig
    from llmcore.train_state import TrainState


class TokenShards:
    """Several 1-D token arrays (e.g. memory-mapped shard files) read as one sequence, uncopied.

    ``tokens[a:b]`` returns that range as a new array (joining shards where it crosses one);
    ``view(a, b)`` returns a ``TokenShards`` over the range, copying nothing.
    """

    ndim = 1

    def __init__(self, arrays: Sequence[np.ndarray], start: int = 0, stop: int | None = None):
        self.arrays = [a for a in arrays if len(a)]
        if any(a.ndim != 1 for a in self.arrays):
            raise ValueError("token shards must be 1-D arrays")
        self.offsets = [0]
        for array in self.arrays:
            self.offsets.append(self.offsets[-1] + len(array))
        total = self.offsets[-1]
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"range [{start}, {stop}) is outside the {total} tokens")

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, start: int, stop: int) -> TokenShards:
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"range [{start}, {stop}) is outside the {len(self)} tokens")
        return TokenShards(self.arrays, self.start + start, self.start + stop)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenShards supports contiguous slices only")
        first, last, _ = key.indices(len(self))
        first, last = self.start + first, self.start + max(first, last)
        parts = []
        shard = bisect.bisect_right(self.offsets, first) - 1
        while first < last:
            base = self.offsets[shard]
            end = min(last, self.offsets[shard + 1])
            parts.append(self.arrays[shard][first - base : end - base])
            first, shard = end, shard + 1
        if not parts:
            return np.empty(0, dtype=self.arrays[0].dtype if self.arrays else np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


TokenIds = np.ndarray | TokenShards


def _as_token_ids(token_ids: TokenIds | torch.Tensor | list[int]) -> TokenIds:
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.cpu().numpy()
    ids = token_ids if isinstance(token_ids, (np.ndarray, TokenShards)) else np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {ids.shape}")
    return ids


def _window(token_ids: TokenIds, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(np.asarray(token_ids[start : start + length + 1], dtype=np.int64))
    return chunk[:-1], chunk[1:]


class SlidingWindowDataset(Dataset):
    """Windows of ``max_length`` tokens every ``stride`` tokens; targets are inputs shifted by one.

    ``token_ids`` may be any 1-D integer array, including a ``numpy.memmap`` of a corpus larger
    than RAM, or ``TokenShards``: windows are sliced on demand, never materialised.
    """

    def __init__(self, token_ids: TokenIds | torch.Tensor | list[int], max_length: int, stride: int):
        if max_length <= 0 or stride <= 0:
            raise ValueError(f"max_length and stride must be positive, got {max_length} and {stride}")
        self.token_ids = _as_token_ids(token_ids)
        n_tokens = len(self.token_ids)
        if n_tokens < max_length + 1:
            raise ValueError(
                f"token array has {n_tokens} tokens; one window of max_length={max_length} "
                f"needs at least {max_length + 1}"
            )
        self.max_length = self.context_length = max_length
        self.stride = stride
        # Same windows as the book: starts at 0, stride, ... while start < n_tokens - max_length.
        self._n_windows = math.ceil((n_tokens - max_length) / stride)

    def __len__(self) -> int:
        return self._n_windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self._n_windows:
            raise IndexError(f"window {index} out of range [0, {self._n_windows})")
        return _window(self.token_ids, index * self.stride, self.max_length)


class RandomWindowDataset(Dataset):
    """``n_samples`` windows at seeded random offsets (nanoGPT's sampling), sliced on demand.

    Sample ``i`` starts at an offset hashed from ``(seed, i)``, so it is the same window whenever
    it is asked for: a resumed run (``ResumableSampler``) sees exactly the windows it would have.
    """

    def __init__(self, token_ids: TokenIds | torch.Tensor | list[int], max_length: int, n_samples: int, seed: int):
        if max_length <= 0 or n_samples <= 0:
            raise ValueError(f"max_length and n_samples must be positive, got {max_length} and {n_samples}")
        self.token_ids = _as_token_ids(token_ids)
        self.positions = len(self.token_ids) - max_length  # valid starts: [0, positions)
        if self.positions < 1:
            raise ValueError(
                f"token array has {len(self.token_ids)} tokens; one window of "
                f"max_length={max_length} needs at least {max_length + 1}"
            )
        self.max_length = self.context_length = max_length
        self.n_samples, self.seed = n_samples, seed

    def __len__(self) -> int:
        return self.n_samples

    def offset(self, index: int) -> int:
        state = np.random.SeedSequence([self.seed, index]).generate_state(1, np.uint64)[0]
        return int(state) % self.positions

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.n_samples:
            raise IndexError(f"sample {index} out of range [0, {self.n_samples})")
        return _window(self.token_ids, self.offset(index), self.max_length)


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
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers)


@dataclass
class TrainLoaders:
    """The training batches of this rank (``llmcore.train``'s) and its share of every evaluated split."""

    sampler: ResumableSampler
    train: DataLoader
    eval: dict[str, DataLoader]
    eval_samples: dict[str, int]  # samples one evaluation covers, over all ranks

    def epoch_batches(self, state: TrainState) -> Iterator[Sequence[torch.Tensor]]:
        """The epoch's batches from where ``state`` stopped (exact resume)."""
        self.sampler.set_epoch(state.epoch, state.micro_batch * self.train.batch_size)
        return iter(self.train)


def make_train_loaders(
    train_data: Dataset,
    val_data: Dataset | None,
    config: TrainConfig,
    collate_fn: Callable | None,
    device: torch.device,
) -> TrainLoaders:
    """The training loop's loaders: ``config.batch_size`` split over the ranks, each loader with its own
    seeded generator, evaluation capped at ``config.eval_batches`` batches and sharded over the ranks."""
    from llmcore import distributed  # deferred: the datasets need no process group

    rank_batch = distributed.local_batch_size(config.batch_size)

    def loader(data: Dataset, **kwargs) -> DataLoader:
        # Its own generator: creating an iterator would otherwise draw from the global RNG
        # (which dropout uses) and a resumed run would see different dropout masks.
        return DataLoader(
            data,
            batch_size=rank_batch,
            collate_fn=collate_fn,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(config.seed),
            **kwargs,
        )

    sampler = ResumableSampler(
        train_data,
        shuffle=config.shuffle,
        seed=config.seed,
        num_replicas=distributed.world_size(),
        rank=distributed.rank(),
        drop_last=config.drop_last,
    )
    train_loader = loader(train_data, sampler=sampler, drop_last=config.drop_last)
    if len(train_loader) == 0:
        raise ValueError(f"training data has {len(train_data)} samples: not one batch of {config.batch_size}")
    splits = {"train": train_data} if val_data is None else {"train": train_data, "val": val_data}
    samples = {
        split: len(data) if config.eval_batches is None else min(len(data), config.eval_batches * config.batch_size)
        for split, data in splits.items()
    }
    evals = {split: loader(distributed.shard(data, samples[split])) for split, data in splits.items()}
    return TrainLoaders(sampler, train_loader, evals, samples)
