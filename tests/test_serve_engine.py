"""The serving engine without HTTP: batched answers equal llmcore's alone, stops, seeds, limits; text and prompts."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from llmcore.config import GPTConfig
from llmcore.generate import generate
from llmcore.instruct import response_prompt
from llmcore.model import GPTModel
from llmcore.prompts import segments
from llmcore.tokenizer import encode
from serving.engine import Engine, EngineBusy, PromptTooLong, SamplingParams
from serving.text import PromptError, TextStream, render_chat
from tests.conftest import spread_out_model

CFG = GPTConfig(vocab_size=300, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
PROMPTS = [[1, 2, 3], [40, 50, 60, 70, 80, 90, 100], [11, 30, 12, 41, 13, 7, 14, 2, 15, 9, 16, 22], [5]]


@pytest.fixture(scope="module")
def model() -> GPTModel:
    return spread_out_model(CFG)


async def collect(request) -> tuple[str, str, int]:
    parts = []
    async for event in request.stream():
        parts.append(event.text)
        if event.finish_reason:
            return "".join(parts), event.finish_reason, event.completion_tokens
    raise AssertionError("the stream ended without a finish event")


async def settled(engine: Engine) -> dict[str, int]:
    """The engine's stats once nothing is running or waiting (rows leave just after their last event)."""
    for _ in range(500):
        stats = engine.stats()
        if stats["active"] == stats["waiting"] == 0:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"the engine did not settle: {engine.stats()}")


def slowed(engine: Engine, seconds: float) -> Engine:
    """Make each decoding step take ``seconds`` longer, so a test can act mid-generation."""
    step = engine._step
    engine._step = lambda: (time.sleep(seconds), step())
    return engine


def run_engine(model, tokenizer, scenario, step_delay: float = 0.0, **engine_kwargs):
    """Run ``scenario(engine)`` (a coroutine function) with a started engine."""
    engine = slowed(Engine(model, tokenizer, **engine_kwargs), step_delay)
    engine.start()
    try:
        return asyncio.run(scenario(engine))
    finally:
        engine.close()


def test_batched_answers_equal_each_prompt_decoded_alone(model, tokenizer) -> None:
    """Four requests, arriving at different times into two rows, get exactly llmcore's greedy tokens."""
    wanted = [14, 5, 9, 20]

    async def scenario(engine):
        requests = []
        for prompt, n in zip(PROMPTS, wanted):
            requests.append(engine.submit(prompt, SamplingParams(max_tokens=n)))
            await asyncio.sleep(0.01)  # later requests join a batch that is already decoding
        return await asyncio.gather(*(collect(r) for r in requests)), await settled(engine)

    answers, stats = run_engine(model, tokenizer, scenario, step_delay=0.005, max_batch=2, eos_id=299)
    for (text, finish, n_tokens), prompt, n in zip(answers, PROMPTS, wanted):
        expected = generate(model, [prompt], n)[0]
        assert (text, finish, n_tokens) == (tokenizer.decode(expected), "length", n)
    assert stats["peak_batch"] == 2 and stats["finished"] == 4


def test_a_stream_interval_sends_fewer_longer_pieces_with_the_same_answer(model, tokenizer) -> None:
    """Steps 5 ms apart, pieces at most every 40 ms: the first piece comes alone, later ones bundle
    several tokens, and the text is the same as token by token."""

    async def scenario(engine):
        request = engine.submit(PROMPTS[2], SamplingParams(max_tokens=16))
        return [(event.text, event.finish_reason) async for event in request.stream()]

    events = run_engine(model, tokenizer, scenario, step_delay=0.005, eos_id=299, stream_interval=0.04)
    expected = generate(model, [PROMPTS[2]], 16)[0]
    assert "".join(text for text, _ in events) == tokenizer.decode(expected)
    assert events[0][0] == tokenizer.decode(expected[:1]) and events[-1][1] == "length"
    assert len(events) < 16


def test_eos_ends_the_answer_without_being_sent(model, tokenizer) -> None:
    greedy = generate(model, [PROMPTS[1]], 12)[0]
    eos = greedy[4]
    cut = greedy[: greedy.index(eos)]

    async def scenario(engine):
        return await collect(engine.submit(PROMPTS[1], SamplingParams(max_tokens=12)))

    assert run_engine(model, tokenizer, scenario, eos_id=eos) == (tokenizer.decode(cut), "stop", len(cut))


def test_stop_string_ends_the_answer_before_it(model, tokenizer) -> None:
    text = tokenizer.decode(generate(model, [PROMPTS[0]], 16)[0])
    stop = text[len(text) // 2 : len(text) // 2 + 3]

    async def scenario(engine):
        return await collect(engine.submit(PROMPTS[0], SamplingParams(max_tokens=16, stop=("\x00never", stop))))

    answer, finish, _ = run_engine(model, tokenizer, scenario, eos_id=299)
    assert (answer, finish) == (text[: text.index(stop)], "stop")


def test_seeded_sampling_repeats_and_matches_llmcore(model, tokenizer) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)

    async def scenario(engine):
        first = engine.submit(PROMPTS[2], params)
        second = engine.submit(PROMPTS[2], params)  # decoded in the same batch, its own generator
        other = engine.submit(PROMPTS[2], SamplingParams(max_tokens=10, temperature=1.0, seed=8))
        return await asyncio.gather(collect(first), collect(second), collect(other))

    first, second, other = run_engine(model, tokenizer, scenario, eos_id=299)
    expected = generate(model, [PROMPTS[2]], 10, temperature=1.0, top_p=0.9, seed=7)[0]
    assert first == second and first[0] == tokenizer.decode(expected)
    assert other[0] != first[0]


def test_prompt_too_long_and_full_queue_are_refused(model, tokenizer) -> None:
    async def scenario(engine):
        with pytest.raises(PromptTooLong, match="exceed the context of 32 tokens"):
            engine.submit(list(range(30)), SamplingParams(max_tokens=3))
        engine.submit(PROMPTS[0], SamplingParams(max_tokens=2))
        engine.submit(PROMPTS[1], SamplingParams(max_tokens=2))
        with pytest.raises(EngineBusy, match="retry later"):
            engine.submit(PROMPTS[2], SamplingParams(max_tokens=2))

    engine = Engine(model, tokenizer, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    asyncio.run(scenario(engine))


def test_a_request_whose_consumer_leaves_is_cancelled(model, tokenizer) -> None:
    async def scenario(engine):
        request = engine.submit(PROMPTS[3], SamplingParams(max_tokens=25))
        async for _ in request.stream():
            break  # the client went away after the first piece
        return request, await settled(engine)

    request, stats = run_engine(model, tokenizer, scenario, step_delay=0.02, eos_id=299)
    assert request.cancelled and not request.done
    assert stats["cancelled"] == 1 and stats["finished"] == 0 and stats["tokens"] < 25


# ---- text


def test_text_stream_holds_back_a_possible_stop_string(tokenizer) -> None:
    ids = encode(tokenizer, "Hello world. END of text")
    stream = TextStream(tokenizer, stops=["END"])
    pieces = [stream.push(token) for token in ids[: ids.index(encode(tokenizer, " END")[0]) + 1]]
    assert "".join(pieces) == "Hello world. " and stream.stopped

    partial = TextStream(tokenizer, stops=["world!"])
    sent = "".join(partial.push(t) for t in encode(tokenizer, "Hello world"))
    assert sent == "Hello " and not partial.stopped  # " world" might begin "world!"
    assert partial.finish() == "world"  # generation ended: what was held back goes out


def test_text_stream_keeps_multibyte_characters_whole(tokenizer) -> None:
    text = "naïve café 😀 日本語"
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in encode(tokenizer, text)] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_chat_messages_render_as_the_training_prompt() -> None:
    assert render_chat([("user", "Name a color.")]) == response_prompt({"instruction": "Name a color.", "input": ""})
    history = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Translate: good day")]
    context = "system: Be brief.\nuser: Hi\nassistant: Hello"
    expected = response_prompt({"instruction": "Translate: good day", "input": context})
    assert render_chat(history) == expected
    assert render_chat(history, "plain") == "Be brief.\nHi\nHello\nTranslate: good day"
    with pytest.raises(PromptError, match="last message must be the user's"):
        render_chat([("user", "Hi"), ("assistant", "Hello")])


def test_chat_messages_render_in_phi3_as_the_fine_tune_was_trained() -> None:
    """phi3 (llmcore.prompts): the chat's turns with their markers, the training text minus the answer."""
    history = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Translate: good day")]
    chat = [{"role": r, "content": c} for r, c in history] + [{"role": "assistant", "content": "Guten Tag"}]
    training_text = "".join(text for text, _ in segments({"messages": chat}, "phi3"))
    prompt = render_chat(history, "phi3")
    assert training_text == prompt + "Guten Tag"
    assert prompt.endswith("<|user|>\nTranslate: good day\n<|assistant|>\n") and "### Instruction" not in prompt
    with pytest.raises(PromptError, match="role 'user' where 'assistant' was expected"):
        render_chat([("user", "Hi"), ("user", "Hello")], "phi3")
    with pytest.raises(ValueError, match="prompt style must be one of"):
        render_chat([("user", "Hi")], "chatml")


def test_model_calls_run_on_the_engine_thread_between_steps(model, tokenizer) -> None:
    """``call`` runs a job on the engine's own thread (its torch threads as configured), while a
    generation is decoding, and gives back its result or its error."""
    import threading

    def where() -> tuple[str, int]:
        return threading.current_thread().name, torch.get_num_threads()

    def broken() -> None:
        raise ValueError("bad input")

    async def scenario(engine):
        running = engine.submit(PROMPTS[0], SamplingParams(max_tokens=20))
        place = await engine.call(where)
        with pytest.raises(ValueError, match="bad input"):
            await engine.call(broken)
        return place, await collect(running)

    before = torch.get_num_threads()
    try:
        (thread, threads), (_, finish, tokens) = run_engine(model, tokenizer, scenario, step_delay=0.005, threads=1)
    finally:
        torch.set_num_threads(before)  # torch's default for threads started later, which the engine's changed
    assert (thread, threads) == ("llm-engine", 1) and (finish, tokens) == ("length", 20)


def test_a_closed_engine_takes_no_more_calls(model, tokenizer) -> None:
    engine = Engine(model, tokenizer)
    engine.start()
    engine.close()

    async def scenario():
        with pytest.raises(RuntimeError, match="closed"):
            engine.call(print)

    asyncio.run(scenario())
