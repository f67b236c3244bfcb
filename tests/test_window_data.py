"""Sliding next-token windows (the book's chapter 2 dataloader) and the resumable sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmcore.data import RandomWindowDataset, ResumableSampler, SlidingWindowDataset, TokenShards, create_dataloader


def test_book_example_stride_equals_length(tokenizer, mirror: Path) -> None:
    ids = tokenizer.encode((mirror / "the-verdict.txt").read_text(encoding="utf-8"))
    loader = create_dataloader(ids, batch_size=8, max_length=4, stride=4, shuffle=False, drop_last=False)
    inputs, targets = next(iter(loader))
    # The book prints exactly these first two rows for the-verdict.txt.
    assert inputs[:2].tolist() == [[40, 367, 2885, 1464], [1807, 3619, 402, 271]]
    assert targets[:2].tolist() == [[367, 2885, 1464, 1807], [3619, 402, 271, 10899]]
    assert torch.equal(inputs[1:, 0], targets[:-1, -1])  # non-overlapping windows
    assert len(loader.dataset) == 1286  # range(0, 5145 - 4, 4)


def test_stride_one_counts_and_shift() -> None:
    ids = list(range(100, 110))  # 10 tokens
    dataset = SlidingWindowDataset(ids, max_length=4, stride=1)
    assert len(dataset) == 6
    for i in range(len(dataset)):
        x, y = dataset[i]
        assert x.tolist() == list(range(100 + i, 104 + i))
        assert torch.equal(y[:-1], x[1:]) and y[-1].item() == 104 + i
        assert x.dtype == torch.long
    assert len(SlidingWindowDataset(ids, max_length=4, stride=4)) == 2  # starts 0 and 4
    assert len(SlidingWindowDataset(ids, max_length=9, stride=3)) == 1
    with pytest.raises(IndexError):
        dataset[6]


def test_numpy_memmap_is_sliced_on_demand(tmp_path: Path) -> None:
    path = tmp_path / "tokens.bin"
    tokens = np.arange(1000, dtype=np.uint16) * 50
    tokens.tofile(path)
    memmap = np.memmap(path, dtype=np.uint16, mode="r")
    dataset = SlidingWindowDataset(memmap, max_length=8, stride=8)
    assert dataset.token_ids is memmap  # not copied into memory
    assert len(dataset) == 124
    x, y = dataset[3]
    assert x.tolist() == (np.arange(24, 32) * 50).tolist()
    assert y.tolist() == (np.arange(25, 33) * 50).tolist()


def test_too_short_array_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="5 tokens.*max_length=8.*at least 9"):
        SlidingWindowDataset(np.arange(5), max_length=8, stride=1)
    with pytest.raises(ValueError, match="positive"):
        SlidingWindowDataset(np.arange(50), max_length=8, stride=0)
    with pytest.raises(ValueError, match="1-D"):
        SlidingWindowDataset(np.zeros((4, 20), dtype=np.int64), max_length=8, stride=1)


def test_sampler_same_seed_same_order_new_epoch_new_order() -> None:
    data = range(50)
    a, b = ResumableSampler(data, seed=7), ResumableSampler(data, seed=7)
    assert list(a) == list(b)
    assert sorted(a) == list(range(50))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(ResumableSampler(data, seed=8)) != first
    assert list(ResumableSampler(data, shuffle=False)) == list(range(50))


def test_sampler_set_epoch_start_skips_exactly() -> None:
    sampler = ResumableSampler(range(30), seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, 12)
    assert list(sampler) == full[12:]
    assert len(sampler) == 18


def test_two_ranks_partition_an_epoch() -> None:
    data = range(40)
    shards = [ResumableSampler(data, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    for s in shards:
        s.set_epoch(3)
    seen = [list(s) for s in shards]
    assert len(seen[0]) == len(seen[1]) == 20
    assert sorted(seen[0] + seen[1]) == list(range(40))  # each index exactly once


def test_ranks_pad_or_drop_when_not_divisible() -> None:
    padded = [list(ResumableSampler(range(11), num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(padded[0]) == len(padded[1]) == 6 and set(padded[0] + padded[1]) == set(range(11))
    dropped = [list(ResumableSampler(range(11), num_replicas=2, rank=r, drop_last=True)) for r in (0, 1)]
    assert len(dropped[0]) == len(dropped[1]) == 5 and len(set(dropped[0] + dropped[1])) == 10
    with pytest.raises(ValueError, match="rank 2"):
        ResumableSampler(range(11), num_replicas=2, rank=2)


def test_dataloader_resumes_mid_epoch() -> None:
    loader = create_dataloader(np.arange(200), batch_size=4, max_length=8, stride=4, seed=1)
    loader.sampler.set_epoch(1)
    batches = [x for x, _ in loader]
    loader.sampler.set_epoch(1, 3 * 4)  # skip three batches
    resumed = [x for x, _ in loader]
    assert len(resumed) == len(batches) - 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, batches[3:]))


def test_sampler_skipping_past_a_partial_last_batch_is_empty() -> None:
    # train() resumes at micro_batch * batch_size, which passes the end when the last batch was partial.
    sampler = ResumableSampler(range(10), seed=0)
    sampler.set_epoch(0, 12)
    assert list(sampler) == [] and len(sampler) == 0


def test_token_shards_read_as_one_array_without_copying(tmp_path: Path) -> None:
    whole = np.arange(100, dtype=np.uint16)
    for name, part in (("a", whole[:30]), ("b", whole[30:31]), ("c", whole[31:])):
        part.tofile(tmp_path / f"{name}.bin")
    maps = [np.memmap(tmp_path / f"{name}.bin", dtype=np.uint16, mode="r") for name in "abc"]
    shards = TokenShards(maps)
    assert len(shards) == 100 and shards.arrays[0] is maps[0]
    for first, last in ((0, 100), (25, 35), (29, 32), (30, 31), (99, 100), (40, 40)):
        assert np.array_equal(shards[first:last], whole[first:last])
    view = shards.view(28, 90)
    assert len(view) == 62 and np.array_equal(view[0:5], whole[28:33]) and np.array_equal(view[-3:], whole[87:90])
    assert np.array_equal(view.view(2, 4)[0:2], whole[30:32])
    with pytest.raises(ValueError, match="outside"):
        shards.view(10, 101)
    with pytest.raises(TypeError, match="contiguous"):
        shards[::2]


def test_windows_over_shards_equal_windows_over_the_concatenation() -> None:
    whole = np.arange(1000, dtype=np.uint16) * 7
    shards = TokenShards([whole[:333], whole[333:334], whole[334:700], whole[700:]])
    for length, stride in ((16, 16), (16, 5), (4, 1)):
        over_shards, over_array = (
            SlidingWindowDataset(shards, length, stride),
            SlidingWindowDataset(whole, length, stride),
        )
        assert len(over_shards) == len(over_array)
        for i in range(len(over_array)):
            assert all(torch.equal(a, b) for a, b in zip(over_shards[i], over_array[i]))


def test_random_windows_are_seeded_in_range_and_the_same_when_asked_again() -> None:
    tokens = np.arange(500, dtype=np.uint16)
    data = RandomWindowDataset(TokenShards([tokens[:100], tokens[100:]]), max_length=16, n_samples=200, seed=3)
    assert len(data) == 200 and data.context_length == 16
    offsets = [data.offset(i) for i in range(200)]
    assert all(0 <= o <= 500 - 17 for o in offsets) and len(set(offsets)) > 150  # not the stride grid
    assert any(o % 16 for o in offsets)
    x, y = data[7]
    assert x.tolist() == list(range(offsets[7], offsets[7] + 16)) and y.tolist() == list(
        range(offsets[7] + 1, offsets[7] + 17)
    )
    again = RandomWindowDataset(tokens, max_length=16, n_samples=200, seed=3)
    assert [again.offset(i) for i in range(200)] == offsets  # a function of (seed, index): resume replays it
    assert [RandomWindowDataset(tokens, 16, 200, seed=4).offset(i) for i in range(200)] != offsets
    with pytest.raises(IndexError):
        data[200]
    with pytest.raises(ValueError, match="at least 17"):
        RandomWindowDataset(tokens[:16], 16, 10, seed=0)


def test_random_windows_resume_mid_epoch_exactly() -> None:
    data = RandomWindowDataset(np.arange(2000), max_length=8, n_samples=64, seed=1)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=5))
    loader.sampler.set_epoch(2)
    batches = [x for x, _ in loader]
    loader.sampler.set_epoch(2, 5 * 4)
    assert all(torch.equal(a, b) for a, b in zip([x for x, _ in loader], batches[5:]))
