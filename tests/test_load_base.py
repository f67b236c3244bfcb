"""load_base: a Hugging Face base (tiny random Qwen3 + tokenizer) -> models/base, usable offline."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from llmcore.checkpoint import load_checkpoint
from llmcore.generate import generate
from llmcore.hf_tokenizer import HFTokenizer
from llmpipe.models import BaseModelError, BaseModelSectionParams, load_base_model
from steps.load_base import load_base_stage
from tests.bases_helpers import hf_model, save_chatml_tokenizer, save_hf
from tests.params_values import params_for

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mlflow_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # one store for the module: creating one takes seconds
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
        yield


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3") / "hf"
    hf = hf_model("qwen3", vocab=320)
    save_hf(hf, directory)
    save_chatml_tokenizer(directory)
    return directory, hf


def test_stage_converts_model_and_tokenizer(hf_dir, tmp_path, mlflow_env):
    directory, hf = hf_dir
    status = load_base_stage(
        params_for(BaseModelSectionParams, dir="models/base", source=str(directory)), out_dir=tmp_path / "base"
    )
    assert status["loaded"] and status["family"] == "qwen3" and status["chat_template"]
    out = tmp_path / "base"
    assert {"tokenizer.json", "tokenizer_config.json", "status.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    model = load_checkpoint(out).eval()
    with pytest.raises(BaseModelError, match="do not support it yet"):
        load_base_model(out)  # without decoder_ok (DPO, adapt_pretrain) it is refused: GPT-2 ids
    tokenizer = HFTokenizer(out)
    assert status["eos_ids"] == [tokenizer.eos_id] == [tokenizer.token_to_id("<|im_end|>")]
    ids = tokenizer.chat_ids([{"role": "user", "content": "Win a free prize?"}])
    expected = hf.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=8, do_sample=False
    )[0, len(ids) :].tolist()
    assert generate(model, [ids], 8) == [expected]  # the converted checkpoint decodes as transformers
    assert isinstance(tokenizer.decode(expected), str)


def test_bfloat16_conversion(hf_dir, tmp_path, mlflow_env):
    directory, _ = hf_dir
    from safetensors import safe_open

    load_base_stage(
        params_for(BaseModelSectionParams, dir="x", source=str(directory), dtype="bfloat16"), out_dir=tmp_path / "base"
    )
    with safe_open(tmp_path / "base" / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("tok_emb.weight").dtype == torch.bfloat16  # stored at half the size
    assert (
        load_checkpoint(tmp_path / "base").tok_emb.weight.dtype == torch.float32
    )  # trained in fp32, as any checkpoint


def test_empty_source_writes_status_only_and_fine_tunes_refuse_it(tmp_path, mlflow_env):
    status = load_base_stage(params_for(BaseModelSectionParams, dir="models/base"), out_dir=tmp_path / "base")
    assert status["loaded"] is False and [p.name for p in (tmp_path / "base").iterdir()] == ["status.json"]
    with pytest.raises(BaseModelError, match="base_model.source is empty"):
        load_base_model(tmp_path / "base")


def test_bad_source_is_a_one_line_error_and_writes_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(f"base_model:\n  dir: models/base\n  source: {tmp_path / 'missing'}\n  dtype: float32\n")
    result = subprocess.run(
        [sys.executable, "-m", "steps.load_base", "--params", str(params), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert (
        result.stderr.strip().count("\n") == 0 and "load_base: error:" in result.stderr and "missing" in result.stderr
    )
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_through_the_stage(hf_dir, tmp_path, mlflow_env):
    import shutil

    directory = tmp_path / "hf"
    shutil.copytree(hf_dir[0], directory)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["Phi3ForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    from llmcore.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="Phi3ForCausalLM"):
        load_base_stage(params_for(BaseModelSectionParams, dir="x", source=str(directory)), out_dir=tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_llm_generate_and_chat_use_the_base_tokenizer_and_template(hf_dir, tmp_path, mlflow_env, monkeypatch, capsys):
    from cli import llm as cli

    directory, hf = hf_dir
    load_base_stage(params_for(BaseModelSectionParams, dir="x", source=str(directory)), out_dir=tmp_path / "base")
    tokenizer = HFTokenizer(tmp_path / "base")

    def hf_reply(ids: list[int]) -> str:
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
        )[0, len(ids) :].tolist()
        if tokenizer.eos_id in out:
            out = out[: out.index(tokenizer.eos_id)]
        return tokenizer.decode(out)

    args = ["--model", str(tmp_path / "base"), "--max-new-tokens", "6", "--temperature", "0"]
    assert cli.main(["generate", "Win a free prize", *args]) == 0
    assert capsys.readouterr().out == "Win a free prize" + hf_reply(tokenizer.encode("Win a free prize")) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("Is this spam?\n"))  # piped: one instruction per line
    assert cli.main(["chat", *args]) == 0
    expected = hf_reply(tokenizer.chat_ids([{"role": "user", "content": "Is this spam?"}]))
    assert f"Response: {expected}\n" in capsys.readouterr().out


def test_served_over_the_openai_api_with_the_base_chat_template(hf_dir, tmp_path, mlflow_env):
    openai = pytest.importorskip("openai")
    from serving.app import create_app
    from serving.models import GENERATOR, load_served
    from tests.serve_helpers import app_server

    directory, hf = hf_dir
    load_base_stage(params_for(BaseModelSectionParams, dir="x", source=str(directory)), out_dir=tmp_path / "base")
    served = load_served(str(tmp_path / "base"), GENERATOR)
    assert served.prompt_style == "template"
    tokenizer = served.tokenizer
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Win a free prize?"}]
    ids = tokenizer.chat_ids(messages)
    out = hf.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=6, do_sample=False
    )[0, len(ids) :].tolist()
    finish = "stop" if tokenizer.eos_id in out else "length"
    out = out[: out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out
    expected = b"".join(tokenizer.decode_single_token_bytes(t) for t in out).decode("utf-8", errors="replace")
    with app_server(create_app(served, None)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        reply = client.chat.completions.create(model=served.name, messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == finish
    assert reply.usage.prompt_tokens == len(ids)
