"""Generation: KV cache vs the book's loop, left-padded batches, eos, sampling, cache allocation."""

from __future__ import annotations

import pytest
import torch

from llmcore import GPTConfig, GPTModel
from llmcore import generate as gen
from llmcore.generate import generate, generate_stream, generate_text, sample_next_token
from llmcore.slot_cache import SlotKVCache
from tests.conftest import spread_out_model

CFG = GPTConfig(vocab_size=50, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 30, 12, 41, 13, 7, 14, 2, 15, 9, 16, 22]]


@pytest.fixture(scope="module")
def model() -> GPTModel:
    return spread_out_model(CFG)


@torch.no_grad()
def book_greedy(model: GPTModel, prompt: list[int], n: int) -> list[int]:
    """The book's generate_text_simple: crop to the context, argmax of the last position."""
    idx = torch.tensor([prompt])
    for _ in range(n):
        logits = model(idx[:, -model.cfg.context_length :])[:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(prompt) :].tolist()


@pytest.mark.parametrize("n_new", [5, 30])  # 30 runs past context_length=16: the window is cropped
def test_cached_and_uncached_greedy_match_the_book_loop(model: GPTModel, n_new: int) -> None:
    for prompt in PROMPTS:
        expected = book_greedy(model, prompt, n_new)
        assert generate(model, [prompt], n_new, use_cache=True) == [expected]
        assert generate(model, [prompt], n_new, use_cache=False) == [expected]


def test_prompt_longer_than_context_is_cropped(model: GPTModel) -> None:
    prompt = list(range(1, 21))  # 20 tokens > 16
    expected = book_greedy(model, prompt, 6)
    assert generate(model, [prompt], 6) == [expected]
    assert generate(model, torch.tensor([prompt]), 6, use_cache=False) == [expected]


@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_of_different_lengths_matches_each_prompt_alone(model: GPTModel, use_cache: bool) -> None:
    alone = [generate(model, [p], 12)[0] for p in PROMPTS]  # 12 + 12 > 16: cropping with padding too
    assert generate(model, PROMPTS, 12, use_cache=use_cache) == alone
    assert generate(model, PROMPTS[::-1], 12, use_cache=use_cache) == alone[::-1]


def test_cache_decodes_one_position_per_step(model: GPTModel) -> None:
    widths = []
    hook = model.register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[1]))
    try:
        generate(model, [PROMPTS[1]], 5, use_cache=True)
        assert widths == [7, 1, 1, 1, 1]
        widths.clear()
        generate(model, [PROMPTS[1]], 5, use_cache=False)
        assert widths == [7, 8, 9, 10, 11]
    finally:
        hook.remove()


def test_kv_cache_is_allocated_once(model: GPTModel, monkeypatch: pytest.MonkeyPatch) -> None:
    caches = []

    class RecordingCache(gen.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pointers = {(self.k.data_ptr(), self.v.data_ptr())}
            caches.append(self)

        def update(self, k, v, start_pos):
            out = super().update(k, v, start_pos)
            self.pointers.add((self.k.data_ptr(), self.v.data_ptr()))
            assert out[0].data_ptr() == self.k.data_ptr()  # a view of the buffer, not a copy
            return out

    monkeypatch.setattr(gen, "KVCache", RecordingCache)
    generate(model, PROMPTS, 20)  # runs past the context, so the window is refilled too
    assert len(caches) == CFG.n_layers
    for cache in caches:
        assert len(cache.pointers) == 1
        assert cache.k.shape == (len(PROMPTS), CFG.n_heads, CFG.context_length, CFG.head_dim)


def test_stream_yields_one_tensor_per_step(model: GPTModel) -> None:
    steps = list(generate_stream(model, PROMPTS, 4))
    assert len(steps) == 4
    assert all(s.shape == (len(PROMPTS),) and s.dtype == torch.long for s in steps)
    assert torch.stack(steps, dim=1).tolist() == generate(model, PROMPTS, 4)


def test_eos_finishes_rows_and_generate_trims(model: GPTModel) -> None:
    free = generate(model, PROMPTS[:2], 10)
    # eos := the first token row 0 produces at a step k > 0 that it never produced before.
    k = next(i for i in range(1, 10) if free[0][i] not in free[0][:i])
    eos = free[0][k]
    steps = torch.stack(list(generate_stream(model, PROMPTS[:2], 10, eos_id=eos)), dim=1).tolist()
    assert steps[0][: k + 1] == free[0][: k + 1]
    assert all(t == eos for t in steps[0][k:])  # a finished row keeps yielding eos
    row1_end = free[1].index(eos) + 1 if eos in free[1] else 10
    assert len(steps[0]) == max(k + 1, row1_end)  # stops once every row has finished
    assert steps[1][:row1_end] == free[1][:row1_end]
    trimmed = [row[: row.index(eos)] if eos in row else row for row in free]
    assert generate(model, PROMPTS[:2], 10, eos_id=eos) == trimmed
    assert len(trimmed[0]) == k


def test_stream_stops_when_every_row_hit_eos(model: GPTModel) -> None:
    first = generate(model, [PROMPTS[0]], 1)[0][0]
    assert len(list(generate_stream(model, [PROMPTS[0]], 10, eos_id=first))) == 1
    assert generate(model, [PROMPTS[0]], 10, eos_id=first) == [[]]


def test_seeded_sampling_is_reproducible_and_seed_dependent(model: GPTModel) -> None:
    kwargs = dict(temperature=1.5, top_k=20, top_p=0.95)
    a = generate(model, PROMPTS, 12, seed=1, **kwargs)
    assert generate(model, PROMPTS, 12, seed=1, **kwargs) == a
    assert generate(model, PROMPTS, 12, seed=2, **kwargs) != a
    assert a != generate(model, PROMPTS, 12)  # sampling is not greedy


def test_top_k_1_and_tiny_top_p_are_greedy(model: GPTModel) -> None:
    greedy = generate(model, PROMPTS, 10)
    assert generate(model, PROMPTS, 10, temperature=2.0, top_k=1, seed=3) == greedy
    assert generate(model, PROMPTS, 10, temperature=2.0, top_p=1e-6, seed=3) == greedy


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    by_k = sample_next_token(logits, temperature=1.0, top_k=2, generator=g)
    assert set(by_k.tolist()) == {0, 1}
    # 0.5 + 0.3 reaches 0.6 by the second token: only the two most likely remain.
    by_p = sample_next_token(logits, temperature=1.0, top_p=0.6, generator=g)
    assert set(by_p.tolist()) == {0, 1}
    everything = sample_next_token(logits, temperature=1.0, generator=g)
    assert set(everything.tolist()) == {0, 1, 2, 3}
    assert 0.45 < (everything == 0).float().mean().item() < 0.55


def test_greedy_picks_what_torch_argmax_picks_ties_nan_and_strided_rows_included() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50257)
    logits[1, [7, 9, 4000]] = 50.0  # a tie: the first maximum
    logits[2, :] = 0.0  # all equal
    logits[3, [11, 30]] = float("nan")  # NaN counts as the maximum, the first one
    logits[4, [2, 8]] = float("inf")
    for case in (logits, logits[:, ::3], logits.double(), logits.requires_grad_()):
        assert torch.equal(sample_next_token(case), case.argmax(dim=-1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 1.0, "top_k": 0}, "top_k"),
        ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
        ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
    ],
)
def test_sample_next_token_rejects_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample_next_token(torch.zeros(1, 5), **kwargs)


def test_invalid_prompts_and_lengths(model: GPTModel) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1, 2]], -1)
    assert generate(model, [[1, 2], [3]], 0) == [[], []]


def test_generation_restores_training_mode() -> None:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**{**CFG.to_dict(), "drop_rate": 0.5}))
    model.train()
    a = generate(model, [PROMPTS[0]], 6)
    assert model.training
    assert generate(model, [PROMPTS[0]], 6) == a  # dropout was off while generating


def test_generate_text_decodes_only_the_continuation(tokenizer) -> None:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("cpu-tiny")).eval()
    prompt = "Every effort moves you"
    ids = tokenizer.encode(prompt)
    text = generate_text(model, tokenizer, prompt, 5)
    assert text == tokenizer.decode(generate(model, [ids], 5)[0])
    assert len(tokenizer.encode(text)) > 0


def test_slot_cache_decodes_sequences_that_join_and_leave_like_generate_alone(model: GPTModel) -> None:
    """Continuous batching: prompts join at different steps and finish at different lengths, a
    finished row is refilled by moving the last active row into it; each gets its tokens alone."""
    # New tokens per prompt (prompt + new stays within context_length=16). 1 leaves at step 6, 2 takes its
    # row, 0 leaves at step 7 and 2 moves into row 0.
    wanted = {0: 8, 1: 6, 2: 5}
    joins_at = {0: 0, 1: 1, 3: 2}  # step -> prompt
    cache = SlotKVCache(model, slots=2)  # fewer slots than prompts: 2 waits for a free row
    active: list[dict] = []  # row r holds active[r]
    results: dict[int, list[int]] = {}
    for step in range(20):
        for row in reversed(range(len(active))):  # retire finished rows, keeping rows packed
            if len(active[row]["out"]) == wanted[active[row]["i"]]:
                results[active[row]["i"]] = active[row]["out"]
                last = len(active) - 1
                if row != last:
                    cache.move(last, row, active[last]["length"])
                    active[row] = active[last]
                active.pop()
        waiting = [
            i for s, i in joins_at.items() if s <= step and i not in results and all(a["i"] != i for a in active)
        ]
        for i in waiting[: 2 - len(active)]:
            logits = cache.prefill(model, len(active), PROMPTS[i])
            active.append({"i": i, "length": len(PROMPTS[i]), "out": [int(logits.argmax())]})
        if not active:
            break
        lengths = torch.tensor([seq["length"] for seq in active])
        logits = cache.decode(model, torch.tensor([seq["out"][-1] for seq in active]), lengths)
        for seq, token in zip(active, logits.argmax(-1).tolist()):
            seq["length"] += 1
            seq["out"].append(token)
    assert results == {i: generate(model, [PROMPTS[i]], n)[0] for i, n in wanted.items()}


def test_slot_cache_prefills_prompts_of_different_lengths_together_like_each_alone(model: GPTModel) -> None:
    """One right-padded prefill of three prompts into rows 1-3: each row's logits and the tokens
    decoded after it are the ones the prompt gets alone."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2][:9]]
    cache = SlotKVCache(model, slots=4)
    logits = cache.prefill_rows(model, 1, prompts)
    alone = torch.stack([SlotKVCache(model, slots=1).prefill(model, 0, p) for p in prompts])
    torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-5)
    out = [[int(t)] for t in logits.argmax(-1)]
    lengths = torch.tensor([0] + [len(p) for p in prompts])  # row 0: an idle row, decoded along
    for _ in range(4):
        step = cache.decode(model, torch.tensor([0] + [o[-1] for o in out]), lengths)[1:]
        lengths[1:] += 1
        for o, token in zip(out, step.argmax(-1).tolist()):
            o.append(token)
    assert out == [generate(model, [p], 5)[0] for p in prompts]


def test_slot_cache_refuses_to_outgrow_its_length(model: GPTModel) -> None:
    cache = SlotKVCache(model, slots=1)
    with pytest.raises(ValueError, match="exceeds the cache's 16"):
        cache.prefill(model, 0, list(range(1, 18)))
