"""The Ollama judge client against a local fake of Ollama's /api/chat: good, garbage, down."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from llmpipe.judge import (
    JudgeParams,
    JudgeUnavailableError,
    OllamaJudge,
    judge_prompt,
    judge_responses,
    parse_score,
)
from tests.fake_ollama import FakeOllama, Responder, closed_port_url, ollama_reply
from tests.params_values import params_for

ENTRY = {"instruction": "Name a primary color.", "input": "", "output": "Red."}


@pytest.fixture
def fake_ollama() -> Iterator[Callable[[Responder], FakeOllama]]:
    servers: list[FakeOllama] = []

    def start(responder: Responder) -> FakeOllama:
        servers.append(FakeOllama(responder))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def params(url: str, **overrides) -> JudgeParams:
    return params_for(JudgeParams, url=url, backoff_factor=0, connect_timeout_s=2, read_timeout_s=5, **overrides)


def test_parse_score_accepts_only_integers_0_to_100() -> None:
    assert parse_score("85") == 85
    assert parse_score(" 100\n") == 100
    assert parse_score("0.") == 0
    for garbage in ("", "eighty", "85/100", "Score: 85", "101", "-5", "7.5"):
        assert parse_score(garbage) is None, garbage


def test_prompt_is_the_books() -> None:
    assert judge_prompt(ENTRY, "Blue.") == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a primary color.` and correct output `Red.`, "
        "score the model response `Blue.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


def test_numeric_answers_are_scored_with_deterministic_options(fake_ollama) -> None:
    answers = iter(["85", " 40\n"])
    server = fake_ollama(lambda n, body: ollama_reply(next(answers)))
    result = judge_responses([ENTRY, ENTRY], ["Red.", "Blue."], params(server.url, seed=7))
    assert result.scores == [85, 40] and result.available and result.n_scored == 2
    assert result.mean_score == 62.5
    first = server.requests[0]
    assert first["path"] == "/api/chat" and first["model"] == "llama3" and first["stream"] is False
    assert first["messages"] == [{"role": "user", "content": judge_prompt(ENTRY, "Red.")}]
    assert first["options"] == {"seed": 7, "temperature": 0, "num_ctx": 2048}


def test_garbage_is_asked_again_with_another_seed_then_unscored(fake_ollama) -> None:
    server = fake_ollama(lambda n, body: ollama_reply("I would rate it highly!"))
    result = judge_responses([ENTRY], ["Red."], params(server.url, retries=2))
    assert result.scores == [None] and result.n_scored == 0 and result.mean_score is None
    assert result.available  # a judge that answers is available, even if unhelpful
    assert [r["options"]["seed"] for r in server.requests] == [123, 124, 125]


def test_a_retry_can_recover_a_score(fake_ollama) -> None:
    server = fake_ollama(lambda n, body: ollama_reply("Sure! Here is my score" if n == 0 else "90"))
    assert judge_responses([ENTRY], ["Red."], params(server.url)).scores == [90]
    assert len(server.requests) == 2


def test_a_reply_that_is_not_ollama_json_counts_as_garbage(fake_ollama) -> None:
    server = fake_ollama(lambda n, body: (200, "<html>proxy page</html>"))
    result = judge_responses([ENTRY], ["Red."], params(server.url, retries=1))
    assert result.scores == [None] and len(server.requests) == 2


def test_server_errors_are_retried_by_urllib3(fake_ollama) -> None:
    server = fake_ollama(lambda n, body: (503, "{}") if n < 2 else ollama_reply("75"))
    assert judge_responses([ENTRY], ["Red."], params(server.url, connect_retries=2)).scores == [75]
    assert len(server.requests) == 3


def test_unknown_model_makes_the_judge_unavailable_with_a_hint(fake_ollama) -> None:
    server = fake_ollama(lambda n, body: (404, json.dumps({"error": "model 'llama3' not found"})))
    with pytest.warns(RuntimeWarning, match="ollama pull llama3"):
        result = judge_responses([ENTRY, ENTRY], ["Red.", "Blue."], params(server.url))
    assert not result.available and result.scores == [None, None]
    assert "HTTP 404" in result.error and len(server.requests) == 1  # stops asking


def test_server_down_leaves_scores_out_and_warns() -> None:
    with pytest.warns(RuntimeWarning, match="LLM judge unavailable after 0 of 2"):
        result = judge_responses([ENTRY, ENTRY], ["Red.", "Blue."], params(closed_port_url(), connect_retries=1))
    assert not result.available and result.scores == [None, None] and result.mean_score is None
    assert "unreachable" in result.error


def test_server_down_fails_when_the_judge_is_required() -> None:
    with pytest.raises(JudgeUnavailableError, match="unreachable"):
        judge_responses([ENTRY], ["Red."], params(closed_port_url(), connect_retries=0, required=True))


def test_judge_stopping_midway_keeps_the_scores_so_far(fake_ollama) -> None:
    server = fake_ollama(lambda n, body: ollama_reply("60") if n == 0 else (500, "{}"))
    with pytest.warns(RuntimeWarning, match="after 1 of 3"):
        result = judge_responses([ENTRY] * 3, ["a", "b", "c"], params(server.url, connect_retries=1))
    assert result.scores == [60, None, None] and result.mean_score == 60 and not result.available


def test_client_retries_connection_errors_before_giving_up() -> None:
    judge = OllamaJudge(params(closed_port_url(), connect_retries=3))
    adapter = judge.session.get_adapter("http://127.0.0.1")
    assert adapter.max_retries.connect == 3 and "POST" in adapter.max_retries.allowed_methods
    with pytest.raises(JudgeUnavailableError):
        judge.ask("hi", seed=1)
    judge.close()


def test_unusable_answers_are_counted_and_warned_with_an_example(fake_ollama) -> None:
    server = fake_ollama(lambda n, body: ollama_reply("I would say 150 out of 100!"))
    with pytest.warns(RuntimeWarning, match=r"2 of 2 responses unscored.*no integer 0\.\.100.*'I would say 150"):
        result = judge_responses([ENTRY, ENTRY], ["Blue.", "Red."], params(server.url, retries=1))
    assert result.scores == [None, None] and result.n_unusable == 2 and result.n_unreachable == 0
    assert result.available and len(server.requests) == 4  # each asked 1 + retries times


def test_a_required_judge_fails_on_any_unscored_response(fake_ollama) -> None:
    server = fake_ollama(lambda n, body: ollama_reply("85" if n == 0 else "not a number"))
    with pytest.raises(JudgeUnavailableError, match=r"1 of 2 responses unscored.*required is true"):
        judge_responses([ENTRY, ENTRY], ["Red.", "Blue."], params(server.url, retries=0, required=True))


def test_credentials_come_from_the_environment_and_urls_are_redacted(fake_ollama, monkeypatch) -> None:
    from llmpipe.secrets import redact

    monkeypatch.setenv("LLMPIPE_JUDGE_API_KEY", "sk-planted-secret")
    server = fake_ollama(lambda n, body: ollama_reply("90"))
    assert judge_responses([ENTRY], ["Red."], params(server.url)).scores == [90]
    assert server.requests[0]["authorization"] == "Bearer sk-planted-secret"
    assert (
        redact("http://user:KEY@host:1/api?x=1&api_key=KEY&token=KEY2")
        == "http://***@host:1/api?x=1&api_key=***&token=***"
    )
    from llmpipe.tracking import flatten  # what every MLflow params dict goes through

    assert flatten({"judge": {"url": "https://u:KEY@ollama.example/x"}}) == {
        "judge.url": "https://***@ollama.example/x"
    }
    url = closed_port_url() + "/?token=hunter3"
    with pytest.warns(RuntimeWarning) as caught:
        judge_responses([ENTRY], ["Red."], params(url, connect_retries=0))
    message = str(caught[0].message)
    assert "hunter3" not in message and "token=***" in message


def test_url_credentials_are_refused_in_one_line_that_does_not_show_them() -> None:
    from llmpipe.params import ParamsError, validate_section

    data = {"judge": {"url": "http://admin:hunter2@ollama.example:11434"}}
    with pytest.raises(ParamsError) as caught:
        validate_section(data, "judge", JudgeParams, "params.yaml")
    message = str(caught.value)
    assert (
        "judge.url: Value error, holds credentials (user:password@): remove them and put the key in "
        "LLMPIPE_JUDGE_API_KEY (sent as a bearer token)" in message
    )
    assert "hunter2" not in message and "http://***@ollama.example:11434" in message


def test_the_bearer_key_is_sent_and_the_api_path_goes_before_the_query(fake_ollama, monkeypatch) -> None:
    from llmpipe.judge import chat_url

    assert chat_url("http://h:1/ollama/?tenant=a") == "http://h:1/ollama/api/chat?tenant=a"
    assert chat_url("http://h:1") == "http://h:1/api/chat" and chat_url("https://h/x/") == "https://h/x/api/chat"
    monkeypatch.setenv("LLMPIPE_JUDGE_API_KEY", "sk-planted-secret")
    server = fake_ollama(lambda n, body: ollama_reply("70"))
    assert judge_responses([ENTRY], ["Red."], params(server.url + "/?tenant=a")).scores == [70]
    assert server.requests[0]["authorization"] == "Bearer sk-planted-secret"
    assert server.requests[0]["path"] == "/api/chat?tenant=a"
