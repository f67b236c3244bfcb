"""The app in this process: API key, disconnects, the bounded queue, a missing model, registry URIs, the CLI."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import torch

from cli import llm as cli
from llmcore.checkpoint import load_checkpoint, save_checkpoint
from llmcore.classifier import GPTClassifier, predict_proba, save_classifier
from llmcore.generate import generate
from llmcore.instruct import response_prompt
from llmcore.tokenizer import ENCODING_DIR_ENV, ENDOFTEXT_ID, encode
from llmpipe.model_dirs import UsageError
from serving import __main__ as serve_cli
from serving.app import ServeConfig, create_app
from serving.models import CLASSIFIER, GENERATOR, load_served
from tests.serve_helpers import app_server, tiny_classifier, tiny_generator, tiny_gpt

CHAT = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0}


@pytest.fixture
def generator_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpt2_encoding_dir: Path) -> Path:
    monkeypatch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))
    return tiny_generator(tmp_path / "tiny-instruct")


def slow_app(generator_dir: Path, step_seconds: float, **config):
    """An app whose decoding steps each take ``step_seconds`` longer, so tests can act mid-answer."""
    app = create_app(load_served(str(generator_dir), GENERATOR), None, ServeConfig(**config))
    engine = app.state.serve.engine
    step = engine._step
    engine._step = lambda: (time.sleep(step_seconds), step())
    return app


def engine_stats(url: str, settled: bool = True) -> dict:
    """/health's engine figures, once nothing runs or waits (a cancelled row leaves at the next step)."""
    for _ in range(300):
        stats = httpx.get(f"{url}/health").json()["engine"]
        if not settled or stats["active"] == stats["waiting"] == 0:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"the engine did not settle: {stats}")


def test_api_key_is_required_when_set(generator_dir: Path) -> None:
    openai = pytest.importorskip("openai")
    app = create_app(load_served(str(generator_dir), GENERATOR), None, ServeConfig(api_key="s3cret"))
    with app_server(app) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(f"{url}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # liveness probes need no key
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        reply = client.chat.completions.create(model="tiny-instruct", messages=CHAT["messages"], max_tokens=3)
        assert reply.usage.completion_tokens == 3


def test_a_client_that_disconnects_stops_its_generation(generator_dir: Path) -> None:
    with app_server(slow_app(generator_dir, 0.02)) as url:
        body = {**CHAT, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            received = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert len(received) >= 3  # role chunk + text: generation had started
        stats = engine_stats(url)  # 200 tokens would take 4 s; the cancelled row leaves at once
        assert stats["cancelled"] == 1 and stats["finished"] == 0 and stats["tokens"] < 50


def test_a_full_queue_answers_429_instead_of_growing(generator_dir: Path) -> None:
    with app_server(slow_app(generator_dir, 0.05, max_batch=1, max_queue=1)) as url:
        body = {**CHAT, "max_tokens": 100, "stream": True}
        with (
            httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as running,
            httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as waiting,
        ):
            assert running.status_code == waiting.status_code == 200
            refused = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 5}, timeout=30)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert "1 requests are running and 1 waiting" in refused.json()["error"]["message"]
        assert engine_stats(url)["cancelled"] == 2  # both clients left: the server is free again
        assert httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=30).status_code == 200


def test_a_model_not_served_gets_a_404_naming_the_option(generator_dir: Path) -> None:
    app = create_app(load_served(str(generator_dir), GENERATOR), None)
    with app_server(app) as url:
        response = httpx.post(f"{url}/v1/classify", json={"input": "hi"})
        assert response.status_code == 404
        assert "no classifier model: start it with --classifier" in response.json()["error"]["message"]
        assert httpx.get(f"{url}/health").json()["classifier"] is None


def test_registry_aliases_are_downloaded_and_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpt2_encoding_dir: Path
) -> None:
    """As the pipeline logs them: pyfuncs with checkpoint + tokenizer artifacts, registered, aliased."""
    mlflow = pytest.importorskip("mlflow")
    from llmpipe.mlflow_models import log_code_model
    from llmpipe.tracking import configure_tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(ENCODING_DIR_ENV, raising=False)  # the tokenizer must come from the artifacts
    dirs = {
        "instruct-gpt": tiny_generator(tmp_path / "instruct"),
        "spam-classifier": tiny_classifier(tmp_path / "spam"),
    }
    configure_tracking()  # mlflow keeps the store and the experiment of earlier tests process-wide
    mlflow.set_experiment("serving-test")
    client = mlflow.MlflowClient()
    with mlflow.start_run():
        for name, code in (("instruct-gpt", "generator.py"), ("spam-classifier", "spam_classifier.py")):
            info = log_code_model(name, code, dirs[name], encoding_dir=gpt2_encoding_dir, registered_model_name=name)
            client.set_registered_model_alias(name, "champion", info.registered_model_version)
    generator = load_served("models:/instruct-gpt@champion", GENERATOR)
    classifier = load_served("models:/spam-classifier@champion", CLASSIFIER, int8=True)
    assert (generator.name, classifier.name, classifier.int8) == ("instruct-gpt", "spam-classifier", True)
    for a, b in zip(generator.model.state_dict().values(), load_checkpoint(dirs["instruct-gpt"]).state_dict().values()):
        assert torch.equal(a, b)
    assert generator.tokenizer.encode("Hello world") == [15496, 995]
    with pytest.raises(UsageError, match="models:/nope@champion"):
        load_served("models:/nope@champion", GENERATOR)


def test_command_line_refuses_what_it_cannot_serve(
    generator_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.delenv(serve_cli.API_KEY_ENV, raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--model", str(generator_dir)]) == 1
    assert f"reachable from other machines: set {serve_cli.API_KEY_ENV}" in capsys.readouterr().err
    assert cli.main(["serve", "--classifier", str(tmp_path / "missing"), "--model", ""]) == 1
    assert "missing is not a checkpoint directory" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no models/ here: nothing to serve by default
    assert serve_cli.main([]) == 1
    assert "nothing to serve" in capsys.readouterr().err


def test_a_failing_step_is_a_500_for_its_requests_and_the_server_keeps_serving(generator_dir: Path) -> None:
    app = create_app(load_served(str(generator_dir), GENERATOR), None)
    cache = app.state.serve.engine.cache
    real_decode = cache.decode

    def broken(*args, **kwargs):
        cache.decode = real_decode  # fails once
        raise RuntimeError("simulated kernel failure")

    cache.decode = broken
    with app_server(app) as url:
        failed = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 5}, timeout=30)
        assert failed.status_code == 500
        assert failed.json()["error"] == {
            "message": "generation failed: simulated kernel failure",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        ok = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 5}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5


def test_chat_uses_the_prompt_style_of_the_models_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpt2_encoding_dir: Path, tokenizer
) -> None:
    monkeypatch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))
    pretrained = save_checkpoint(tiny_gpt(), tmp_path / "pretrained", extra={"stage": "pretrain"})
    assert load_served(str(pretrained), GENERATOR).prompt_style == "plain"
    assert load_served(str(pretrained), GENERATOR, prompt_style="alpaca").prompt_style == "alpaca"
    with app_server(create_app(load_served(str(pretrained), GENERATOR), None)) as url:
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["prompt_style"] == "plain"
        body = {"messages": [{"role": "user", "content": "Every effort moves you"}], "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()
    expected = generate(tiny_gpt(), [encode(tokenizer, "Every effort moves you")], 8, eos_id=ENDOFTEXT_ID)[0]
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(expected)


def test_chat_uses_the_prompt_style_the_checkpoint_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpt2_encoding_dir: Path, tokenizer
) -> None:
    """A phi3 fine-tune is chatted in phi3 (as llm chat, scoring and the pyfunc do), whatever its stage."""
    monkeypatch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))
    phi3 = save_checkpoint(tiny_gpt(), tmp_path / "phi3", extra={"stage": "finetune_instruct", "prompt_style": "phi3"})
    assert load_served(str(phi3), GENERATOR).prompt_style == "phi3"
    with app_server(create_app(load_served(str(phi3), GENERATOR), None)) as url:
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["prompt_style"] == "phi3"
        body = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 6, "temperature": 0}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()
    prompt = response_prompt({"instruction": "Name a color.", "input": ""}, "phi3")
    assert prompt == "<|user|>\nName a color.\n<|assistant|>\n"
    expected = generate(tiny_gpt(), [encode(tokenizer, prompt)], 6, eos_id=ENDOFTEXT_ID)[0]
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(expected)
    bad = save_checkpoint(tiny_gpt(), tmp_path / "bad", extra={"prompt_style": "chatml"})
    with pytest.raises(
        UsageError, match=r"bad/config.json: the checkpoint's prompt_style must be one of .* got 'chatml'"
    ):
        load_served(str(bad), GENERATOR)


def test_invocations_names_the_positive_class_from_the_models_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpt2_encoding_dir: Path, tokenizer
) -> None:
    monkeypatch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))
    torch.manual_seed(2)
    model = GPTClassifier.from_gpt(tiny_gpt(2, 64), max_length=32, labels=["routine", "urgent"])
    served = load_served(str(save_classifier(model, tmp_path / "urgency")), CLASSIFIER)
    texts = ["The server is down!", "lunch at noon"]
    expected = predict_proba(served.model, tokenizer, texts)
    with app_server(create_app(None, served)) as url:
        answer = httpx.post(f"{url}/invocations", json={"inputs": {"text": texts}}, timeout=30).json()
    assert [set(p) for p in answer["predictions"]] == [{"label", "urgent_probability"}] * 2
    for prediction, probs in zip(answer["predictions"], expected.tolist()):
        assert prediction["urgent_probability"] == pytest.approx(probs[1], abs=1e-5)
        assert prediction["label"] == ["routine", "urgent"][probs.index(max(probs))]


def test_int8_weights_are_served(generator_dir: Path) -> None:
    served = load_served(str(generator_dir), GENERATOR, int8=True)
    assert ".quantized." in type(served.model.trf_blocks[0].att.qkv).__module__
    with app_server(create_app(served, None)) as url:
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["int8"] is True
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 6}, timeout=30).json()
        assert reply["usage"]["completion_tokens"] == 6 and reply["choices"][0]["text"]


def test_classification_runs_on_the_one_torch_thread(
    tmp_path: Path, monkeypatch, gpt2_encoding_dir, generator_dir
) -> None:
    """Every model call of the server runs on one thread (two OpenMP pools on few cores slow
    decoding 2-2.5x: serving.engine): with a generator, the engine's; without, the executor's."""
    import threading

    import serving.app

    monkeypatch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))
    classifier = load_served(str(tiny_classifier(tmp_path / "spam")), CLASSIFIER)
    threads: list[str] = []
    real = serving.app.predict_proba
    monkeypatch.setattr(
        serving.app, "predict_proba", lambda *a: (threads.append(threading.current_thread().name), real(*a))[1]
    )
    for generator, expected in ((load_served(str(generator_dir), GENERATOR), "llm-engine"), (None, "llm-torch")):
        with app_server(create_app(generator, classifier)) as url:
            for _ in range(2):
                reply = httpx.post(f"{url}/v1/classify", json={"input": ["win a prize", "hi"]}, timeout=60)
                assert reply.status_code == 200 and len(reply.json()["data"]) == 2
        assert threads[-1].startswith(expected) and len(set(threads[-2:])) == 1, threads
        threads.clear()


def test_classification_requests_have_their_own_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpt2_encoding_dir: Path
) -> None:
    """--max-classify bounds classifications in flight; --max-batch (generation rows) does not."""
    import threading

    import serving.app

    monkeypatch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))
    classifier = load_served(str(tiny_classifier(tmp_path / "spam")), CLASSIFIER)
    gate = threading.Event()
    slow = serving.app.predict_proba
    monkeypatch.setattr(serving.app, "predict_proba", lambda *args: (gate.wait(30), slow(*args))[1])
    app = create_app(None, classifier, ServeConfig(max_batch=1, max_classify=2))
    with app_server(app) as url:
        answers: list[int] = []
        running = [
            threading.Thread(
                target=lambda: answers.append(
                    httpx.post(f"{url}/v1/classify", json={"input": "win a prize"}, timeout=60).status_code
                )
            )
            for _ in range(2)
        ]
        for thread in running:
            thread.start()
        for _ in range(200):  # both are in flight (waiting on the gate)
            if app.state.serve.classifying == 2:
                break
            time.sleep(0.02)
        refused = httpx.post(f"{url}/v1/classify", json={"input": "third"}, timeout=30)
        gate.set()
        for thread in running:
            thread.join()
        assert answers == [200, 200]
        assert refused.status_code == 429 and "too many classification requests" in refused.json()["error"]["message"]
