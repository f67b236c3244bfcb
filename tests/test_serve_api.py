"""``python -m serving`` over HTTP, called with OpenAI's own client: answers, streams, errors, concurrency.

The answers are checked against llmcore decoding the same checkpoint in this process (greedy), so
batching, streaming and the prompt format are all held to what the model gives alone.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from llmcore.checkpoint import load_checkpoint
from llmcore.classifier import classify_texts, load_classifier, predict_proba
from llmcore.generate import generate
from llmcore.instruct import response_prompt
from llmcore.tokenizer import ENDOFTEXT_ID, encode
from tests.serve_helpers import serve_process, tiny_classifier, tiny_generator

openai = pytest.importorskip("openai")

MAX_TOKENS = 64  # the server's cap in these tests


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {"generator": tiny_generator(root / "tiny-instruct"), "classifier": tiny_classifier(root / "tiny-spam")}


@pytest.fixture(scope="module")
def server(model_dirs: dict[str, Path], gpt2_encoding_dir: Path):
    with serve_process(
        "--model",
        str(model_dirs["generator"]),
        "--classifier",
        str(model_dirs["classifier"]),
        "--max-tokens",
        str(MAX_TOKENS),
        encoding_dir=gpt2_encoding_dir,
    ) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def greedy(model_dirs: dict[str, Path], tokenizer):
    """(text, tokens, finish_reason) llmcore gives a prompt alone, decoded greedily until eos."""
    model = load_checkpoint(model_dirs["generator"]).eval()

    def answer(prompt: str, max_tokens: int) -> tuple[str, int, str]:
        ids = generate(model, [encode(tokenizer, prompt)], max_tokens, eos_id=ENDOFTEXT_ID)[0]
        return tokenizer.decode(ids), len(ids), "length" if len(ids) == max_tokens else "stop"

    return answer


def chat_prompt(question: str) -> str:
    return response_prompt({"instruction": question, "input": ""})


def test_openai_client_gets_a_chat_completion(client, greedy, tokenizer) -> None:
    reply = client.chat.completions.create(
        model="tiny-instruct", max_tokens=12, temperature=0, messages=[{"role": "user", "content": "Name a color."}]
    )
    text, n_tokens, finish = greedy(chat_prompt("Name a color."), 12)
    assert reply.object == "chat.completion" and reply.model == "tiny-instruct"
    assert (reply.choices[0].message.role, reply.choices[0].message.content) == ("assistant", text)
    assert reply.choices[0].finish_reason == finish
    prompt_tokens = len(encode(tokenizer, chat_prompt("Name a color.")))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, n_tokens)


def test_openai_client_streams_a_chat_completion(client, greedy) -> None:
    stream = client.chat.completions.create(
        model="tiny-instruct",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text, n_tokens, finish = greedy(chat_prompt("Say hi."), 20)
    assert len(pieces) > 1 and "".join(pieces) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].usage.completion_tokens == n_tokens and not chunks[-1].choices


def test_openai_client_completions_whole_streamed_and_stopped(client, greedy) -> None:
    prompt = "Every effort moves you"
    text, _, _ = greedy(prompt, 16)
    whole = client.completions.create(model="tiny-instruct", prompt=prompt, max_tokens=16, temperature=0)
    assert whole.choices[0].text == text
    streamed = client.completions.create(
        model="tiny-instruct", prompt=prompt, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text
    stop = text[len(text) // 2 :][:4]
    stopped = client.completions.create(model="tiny-instruct", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (text[: text.index(stop)], "stop")


def test_seed_makes_sampling_repeatable(client) -> None:
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model="tiny-instruct", prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.95, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(5) == sample(5) != sample(6)


@pytest.mark.parametrize(
    ("path", "body", "status", "message", "param"),
    [
        (
            "/v1/chat/completions",
            {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "the model 'gpt-4' does not exist here",
            "model",
        ),
        ("/v1/completions", {"model": "tiny-spam", "prompt": "hi"}, 404, "'tiny-spam' is the classifier", "model"),
        (
            "/v1/completions",
            {"prompt": "word " * 300},
            400,
            "the prompt has 301 tokens; this model's context is 256",
            "prompt",
        ),
        ("/v1/completions", {"prompt": "word " * 230, "max_tokens": 40}, 400, "but 271 were asked for", "max_tokens"),
        (
            "/v1/completions",
            {"prompt": "hi", "max_tokens": 0},
            400,
            "max_tokens: Input should be greater than 0",
            "max_tokens",
        ),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 65}, 400, "above this server's limit of 64", "max_tokens"),
        (
            "/v1/completions",
            {"prompt": "hi", "max_tokens": "5"},
            400,
            "max_tokens: Input should be a valid integer",
            "max_tokens",
        ),
        (
            "/v1/completions",
            {"prompt": "hi", "temperature": 3},
            400,
            "temperature: Input should be less than",
            "temperature",
        ),
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "only n=1 is supported", "n"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt: Field required", "prompt"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            400,
            "the last message must be the user's",
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "hi"}]},
            400,
            "messages.0.role",
            "messages.0.role",
        ),
        ("/v1/chat/completions", '{"messages": [', 400, "the request body is not valid JSON", None),
        ("/v1/classify", {"input": []}, 400, "give 1 to 256 texts, got 0", "input"),
        (
            "/v1/classify",
            {"dataframe_split": {"columns": ["body"], "data": [["x"]]}},
            400,
            "needs a 'text' column",
            "input",
        ),
        ("/v1/nothing", {}, 404, "POST /v1/nothing: Not Found", None),
    ],
)
def test_bad_requests_get_openai_style_errors(server, path, body, status, message, param) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param and "\n" not in error["message"]
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]


def test_openai_client_raises_its_typed_errors(client) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|context is 256"):
        client.completions.create(model="tiny-instruct", prompt="word " * 300)


def test_sixteen_concurrent_streams_all_complete(server, client, greedy) -> None:
    questions = [f"Give me {i} reasons to smile." for i in range(16)]
    before = httpx.get(f"{server}/health").json()["engine"]

    def ask(question: str) -> tuple[str, str]:
        stream = client.chat.completions.create(
            model="tiny-instruct",
            messages=[{"role": "user", "content": question}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        chunks = [c.choices[0] for c in stream if c.choices]
        return "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, q) for q in questions]
        answers = [f.result(timeout=120) for f in futures]
    assert answers == [(text, finish) for text, _, finish in (greedy(chat_prompt(q), 24) for q in questions)]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["engine"]["finished"] - before["finished"] == 16
    assert health["engine"]["peak_batch"] > 1  # requests were decoded together, not one by one


def test_classify_and_mlflow_scoring_input(server, model_dirs, tokenizer) -> None:
    texts = ["WINNER! Claim your free prize now", "see you at lunch", ""]
    model = load_classifier(model_dirs["classifier"]).eval()
    response = httpx.post(f"{server}/v1/classify", json={"input": texts}, timeout=30).json()
    expected = predict_proba(model, tokenizer, texts)
    assert [d["index"] for d in response["data"]] == [0, 1, 2] and response["model"] == "tiny-spam"
    for row, probs in zip(response["data"], expected.tolist()):
        assert row["probabilities"] == pytest.approx(dict(zip(model.labels, probs)), abs=1e-5)
    pyfunc = [
        {"label": label, "spam_probability": pytest.approx(p, abs=1e-5)}
        for label, p in classify_texts(model, tokenizer, texts)
    ]
    for body in (
        {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}},
        {"dataframe_records": [{"text": t} for t in texts]},
        {"inputs": {"text": texts}},
    ):
        assert httpx.post(f"{server}/invocations", json=body, timeout=30).json() == {"predictions": pyfunc}


def test_models_health_and_the_chat_page(server, client) -> None:
    listed = {(m.id, m.kind) for m in client.models.list()}
    assert listed == {("tiny-instruct", "generator"), ("tiny-spam", "classifier")}
    assert client.models.retrieve("tiny-spam").context_length == 64
    health = httpx.get(f"{server}/health").json()
    assert (health["status"], health["generator"], health["classifier"]) == ("ok", "tiny-instruct", "tiny-spam")
    page = httpx.get(f"{server}/")
    assert page.headers["content-type"].startswith("text/html") and "/v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
