"""llmcore.hugepages: one huge-page region for the int8 weights a decoding step streams."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch

from llmcore import hugepages
from llmcore.config import GPTConfig
from llmcore.model import GPTModel
from llmcore.quantize import Int8Linear, quantize_int8_weight_only

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_bytes() -> int | None:
    """Bytes of this process's anonymous memory on huge pages (``/proc/self/smaps_rollup``), or None
    where the kernel does not report it."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def thp_mode() -> str | None:
    """The selected mode of transparent huge pages (always, madvise, never), or None off Linux."""
    try:
        return THP.read_text().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return None


def test_gather_copies_tensors_into_one_aligned_region_in_order() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randint(-127, 128, (3 << 20,), dtype=torch.int8, generator=g),
        torch.randn(5, 7, generator=g),
        torch.randint(0, 9, (2, 3), dtype=torch.int64, generator=g),
    ]
    views = hugepages.gather(tensors)
    for t, v in zip(tensors, views):
        assert torch.equal(t, v) and v.dtype == t.dtype and v.is_contiguous()
        assert v.data_ptr() != t.data_ptr() and v.data_ptr() % hugepages.ALIGN == 0
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1
    assert [v.data_ptr() for v in views] == sorted(v.data_ptr() for v in views)
    assert views[0].data_ptr() % hugepages.HUGE_PAGE == 0  # the region starts on a huge page
    views[1].fill_(2.0)  # writable, and the views do not overlap
    assert torch.equal(views[0], tensors[0]) and torch.equal(views[2], tensors[2])


def test_gather_rejects_tensors_off_the_cpu() -> None:
    with pytest.raises(ValueError, match="must be on the CPU"):
        hugepages.gather([torch.empty(4, device="meta")])


def test_the_region_is_backed_by_huge_pages_where_the_kernel_allows_them() -> None:
    mode = thp_mode()
    if mode is None or huge_page_bytes() is None:
        pytest.skip("transparent huge pages are a Linux feature")
    before = huge_page_bytes()
    region = hugepages.huge_page_buffer(8 * hugepages.HUGE_PAGE)
    region.fill_(1)  # pages are given on first touch
    grown = huge_page_bytes() - before
    if mode == "never":
        assert grown == 0
    else:  # always / madvise: at least one 2 MB page (the kernel may fall back for some)
        assert grown >= hugepages.HUGE_PAGE
    assert hugepages.huge_page_buffer(100).numel() == 100  # small: ordinary memory


def test_weight_only_int8_layers_share_one_region_and_compute_the_same() -> None:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("cpu-tiny")).eval()
    quantized = quantize_int8_weight_only(model)
    layers = [m for m in quantized.modules() if isinstance(m, Int8Linear)]
    if not all(layer.kernel for layer in layers):
        pytest.skip("the int8 kernel is not built on this machine (the weights stay (out, in))")
    weights = [layer.weight_int8 for layer in layers]
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1
    assert [w.data_ptr() for w in weights] == sorted(w.data_ptr() for w in weights)  # module order
    # The same products as layers whose weights sit in their own allocations.
    separate = copy.deepcopy(quantized)
    for layer in separate.modules():
        if isinstance(layer, Int8Linear):
            layer.weight_int8 = layer.weight_int8.clone()
    idx = torch.randint(0, quantized.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(quantized(idx), separate(idx))
        # A state dict round trip keeps every view's values.
        buffer = io.BytesIO()
        torch.save(quantized.state_dict(), buffer)
        buffer.seek(0)
        loaded = quantize_int8_weight_only(model)
        loaded.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(loaded(idx), quantized(idx))


def test_kv_caches_of_a_generation_are_zeroed_views_of_one_region() -> None:
    from llmcore.generate import new_kv_caches

    model = GPTModel(GPTConfig.from_preset("cpu-tiny")).eval()
    cfg = model.cfg
    caches = new_kv_caches(model, batch=3, max_len=40)
    assert len(caches) == cfg.n_layers
    shape = (3, cfg.n_heads, 40, cfg.head_dim)
    tensors = [t for cache in caches for t in (cache.k, cache.v)]
    assert all(t.shape == shape and t.is_contiguous() and not t.any() for t in tensors)
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    assert len({t.data_ptr() for t in tensors}) == len(tensors)  # no two overlap
    k, v = caches[0].update(torch.ones(3, cfg.n_heads, 2, cfg.head_dim), torch.ones(3, cfg.n_heads, 2, cfg.head_dim), 0)
    assert k.shape[2] == v.shape[2] == 2 and not caches[1].k.any() and not caches[0].k[:, :, 2:].any()
