"""A Hugging Face base through the instruction pipeline: tiny random Qwen3, Llama 3.2 and Gemma 3
(tokenizers trained here, each in its family's chat-template shape) go load_base -> finetune_instruct
(LoRA) -> score_instructions -> the registered pyfunc, `llm chat` or `llm serve` (openai client)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from llmcore.checkpoint import load_checkpoint, read_checkpoint_meta
from llmcore.generate import generate
from llmcore.hf_tokenizer import HFTokenizer
from llmcore.instruct import encode_template_entry, render_template_entry, template_end_id, template_messages
from llmcore.lora import apply_lora, merge_lora
from llmpipe.data import TokenizerParams
from llmpipe.judge import JudgeParams
from llmpipe.models import BaseModelError, BaseModelSectionParams
from llmpipe.stats import ComparisonParams
from steps import finetune_instruct as ft
from steps import score_instructions as score
from steps.load_base import load_base_stage
from tests.bases_helpers import hf_model, save_family_tokenizer, save_hf
from tests.params_values import params_for
from tests.trainer_params import trainer_params

transformers = pytest.importorskip("transformers")

FAMILIES = ("qwen3", "llama", "gemma3")
ENTRIES = [
    {"instruction": "Spam?", "input": "Win a prize", "output": "Yes."},
    {"instruction": "Spam?", "input": "Hello there", "output": "No."},
    {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Win?"},
            {"role": "assistant", "content": "No, thanks."},
        ]
    },
    {"instruction": "Reply", "input": "", "output": "Fine, thanks"},
]
FT_PARAMS = dict(
    epochs=1,
    batch_size=2,
    lr=1e-2,
    eval_every=0,
    eval_batches=1,
    sample_entries=1,
    sample_max_new_tokens=3,
    device="cpu",
    mask_prompt=True,
    lora={"rank": 4, "alpha": 8.0},
)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory, gpt2_encoding_dir):
    with pytest.MonkeyPatch.context() as patch:  # one store for the module: creating one takes seconds
        root = tmp_path_factory.mktemp("mlflow")
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        # As in the offline pipeline: GPT-2's files at hand, which a base's fine-tune must not pick up.
        patch.setenv("LLMCORE_GPT2_ENCODING_DIR", str(gpt2_encoding_dir))
        for name in ("LLMPIPE_MLFLOW_PARENT_RUN_ID", "LLMPIPE_MLFLOW_EXPERIMENT"):
            patch.delenv(name, raising=False)
        patch.chdir(root)  # MLflow's artifacts land there
        yield root


@pytest.fixture(scope="module", params=FAMILIES)
def base(request, tmp_path_factory, mlflow_store) -> tuple[str, Path]:
    """load_base's models/base from a tiny random HF model of the family, with its data splits."""
    family, root = request.param, tmp_path_factory.mktemp(request.param)
    save_hf(hf_model(family, vocab=320), root / "hf")
    save_family_tokenizer(root / "hf", family)
    load_base_stage(params_for(BaseModelSectionParams, dir="x", source=str(root / "hf")), out_dir=root / "base")
    (root / "data").mkdir()
    for split, part in {"train": ENTRIES, "validation": ENTRIES[:2], "test": ENTRIES[1:3]}.items():
        (root / "data" / f"{split}.json").write_text(json.dumps(part))
    (root / "data" / "meta.json").write_text(json.dumps({"prompt_style": "alpaca"}))  # not what a base uses
    return family, root


@pytest.fixture(scope="module")
def finetuned(base) -> tuple[str, Path, dict]:
    family, root = base
    metrics = ft.finetune_instruct(
        trainer_params(ft.FinetuneInstructParams, **FT_PARAMS),
        tokenizer_params=params_for(TokenizerParams),
        **paths(root, "instruct"),
    )
    return family, root, metrics


def paths(root: Path, name: str) -> dict:
    return dict(
        base_model=root / "base",
        data_dir=root / "data",
        out_dir=root / name,
        metrics_out=root / f"{name}.json",
        history_out=root / f"{name}.csv",
        plot_out=root / f"{name}.png",
        cache_dir=root / ".cache" / name,
    )


def test_sft_prompt_and_sequence_are_transformers_chat_template(base) -> None:
    """The prompt ids are apply_chat_template's with the generation prompt; prompt + completion +
    the end-of-turn target are the start of the full chat's ids."""
    _, root = base
    ours, theirs = HFTokenizer(root / "base"), transformers.AutoTokenizer.from_pretrained(root / "base")
    for entry in ENTRIES:
        messages = template_messages(entry)
        prompt_ids = theirs.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
        full_ids = theirs.apply_chat_template(messages, tokenize=True)
        prompt_ids, full_ids = (getattr(ids, "input_ids", ids) for ids in (prompt_ids, full_ids))
        example = encode_template_entry(ours, entry)
        sequence = [*example.token_ids, template_end_id(ours)]
        assert example.token_ids[: example.prompt_length] == list(prompt_ids)
        assert sequence == list(full_ids[: len(sequence)])
        assert ours.decode(sequence[example.prompt_length :]).strip().endswith(messages[-1]["content"].strip())


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merged_decoder_equals_unmerged(family) -> None:
    from llmcore.hf_checkpoint import load_hf_model

    torch.manual_seed(0)
    model = load_hf_model_from(hf_model(family), load_hf_model).eval()
    apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora.B"):
                param.normal_(0.0, 0.5)  # B starts at zero: make the update count
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        unmerged = model(ids)
        assert merge_lora(model) > 0
        merged = model(ids)
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0)
    assert not torch.allclose(merged, load_hf_model_from(hf_model(family), load_hf_model)(ids), atol=1e-3)


def load_hf_model_from(hf, loader):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        return loader(Path(tmp))


def test_finetune_trains_lora_and_saves_a_template_model_with_its_tokenizer(finetuned, capsys) -> None:
    family, root, metrics = finetuned
    out = root / "instruct"
    meta = read_checkpoint_meta(out)
    assert meta["prompt_style"] == "template" and meta["format"] == "llmcore-decoder"
    assert metrics["steps"] == 2 and metrics["trainable_parameters"] < load_checkpoint(out).num_parameters() / 2
    tokenizer = HFTokenizer(out)  # the model carries its tokenizer; the turn's end is its eos
    assert tokenizer.eos_id == template_end_id(tokenizer) == template_end_id(HFTokenizer(root / "base"))
    assert not (out / "encoder.json").exists()  # no GPT-2 files beside a base's own tokenizer
    trained, before = load_checkpoint(out).state_dict(), load_checkpoint(root / "base").state_dict()
    assert trained.keys() == before.keys()  # merged: a plain checkpoint
    changed = {k for k in trained if not torch.equal(trained[k], before[k])}
    assert changed and all(".trf_blocks." in f".{k}" for k in changed)  # only the blocks' Linear layers moved
    if family == "llama":  # eos was <|end_of_text|>: generation_config keeps it after <|eot_id|>
        assert tokenizer.eos_ids == [tokenizer.token_to_id("<|eot_id|>"), tokenizer.token_to_id("<|end_of_text|>")]


def test_score_and_the_registered_pyfunc_answer_in_the_chat_template(finetuned) -> None:
    import mlflow

    family, root, _ = finetuned
    params = params_for(
        score.ScoreInstructionsParams,
        max_new_tokens=4,
        batch_size=2,
        device="cpu",
        judge=params_for(JudgeParams, url="http://127.0.0.1:9", connect_retries=0, backoff_factor=0),
    )
    metrics = score.score_instructions(
        params,
        tokenizer_params=params_for(TokenizerParams),
        model_dir=root / "instruct",
        test_file=root / "data" / "test.json",
        responses_out=root / "responses.json",
        metrics_out=root / "scores.json",
        headline_out=root / "headline.json",
        comparison=params_for(ComparisonParams, bootstrap_samples=100),
    )
    assert metrics["n_entries"] == 2 and metrics["response_tokens"] > 0 and metrics["validation_response_loss"] > 0
    model, tokenizer = load_checkpoint(root / "instruct").eval(), HFTokenizer(root / "instruct")
    records = json.loads((root / "responses.json").read_text())
    for record, entry in zip(records, ENTRIES[1:3]):
        prompt, _, lead = render_template_entry(tokenizer, entry)
        ids = generate(model, [tokenizer.encode(prompt)], 4, eos_id=tokenizer.eos_id)[0]
        assert record["model_response"] == tokenizer.decode(ids).removeprefix(lead).strip()
    if family == "qwen3":  # the registry's pyfunc (one family: loading it takes seconds)
        pyfunc = mlflow.pyfunc.load_model("models:/instruct-gpt@candidate")
        answer = pyfunc.predict(
            pd.DataFrame({"instruction": ["Spam?"], "input": ["Hello there"]}), params={"max_new_tokens": 4}
        )["response"][0]
        assert answer == records[0]["model_response"]


def test_served_and_chatted_with_the_chat_template(finetuned, monkeypatch, capsys) -> None:
    family, root, _ = finetuned
    model, tokenizer = load_checkpoint(root / "instruct").eval(), HFTokenizer(root / "instruct")
    messages = [{"role": "user", "content": "Spam?\nWin a prize"}]
    ids = tokenizer.chat_ids(messages)
    expected_ids = generate(model, [ids], 5, eos_id=tokenizer.eos_id)[0]
    if family != "qwen3":  # `llm chat` (piped), the others through the served API below
        from cli import llm as cli

        monkeypatch.setattr("sys.stdin", io.StringIO("Spam?\tWin a prize\n"))
        assert cli.main(["chat", "--model", str(root / "instruct"), "--max-new-tokens", "5", "--temperature", "0"]) == 0
        out = capsys.readouterr().out
        expected = tokenizer.decode(
            generate(
                model,
                [tokenizer.chat_ids([{"role": "user", "content": "Spam?\n\nWin a prize"}])],
                5,
                eos_id=tokenizer.eos_id,
            )[0]
        )
        assert f"Response: {expected}\n" in out
        return
    openai = pytest.importorskip("openai")
    from serving.app import create_app
    from serving.models import GENERATOR, load_served
    from tests.serve_helpers import app_server

    # What `llm serve --model models:/instruct-gpt@candidate` serves: the registered pyfunc's checkpoint,
    # its own tokenizer, its chat template (in this process: a server process would spend ~15 s importing).
    served = load_served("models:/instruct-gpt@candidate", GENERATOR)
    assert served.prompt_style == "template" and served.tokenizer.eos_id == tokenizer.eos_id
    with app_server(create_app(served, None)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        reply = client.chat.completions.create(model=served.name, messages=messages, max_tokens=5, temperature=0)
    expected = b"".join(tokenizer.decode_single_token_bytes(t) for t in expected_ids).decode("utf-8", "replace")
    finish = "stop" if len(expected_ids) < 5 else "length"
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == finish
    assert reply.usage.prompt_tokens == len(ids)


def test_interrupted_lora_finetune_resumes_to_the_same_weights(finetuned, monkeypatch) -> None:
    _, root, metrics = finetuned
    from llmcore.train import TrainCallback

    class Crash(TrainCallback):
        def on_step_end(self, state, step_metrics) -> None:
            if state.step == 1:
                raise KeyboardInterrupt

    params = trainer_params(ft.FinetuneInstructParams, **{**FT_PARAMS, "checkpoint_every": 1})
    resumed = paths(root, "resumed")
    with monkeypatch.context() as patch:
        patch.setattr(ft, "SampleResponses", lambda *a: Crash())
        with pytest.raises(KeyboardInterrupt):
            ft.finetune_instruct(params, tokenizer_params=params_for(TokenizerParams), **resumed)
    assert resumed["cache_dir"].is_dir() and not resumed["out_dir"].exists()
    again = ft.finetune_instruct(params, tokenizer_params=params_for(TokenizerParams), **resumed)
    a, b = load_checkpoint(resumed["out_dir"]).state_dict(), load_checkpoint(root / "instruct").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert again["val_loss"] == pytest.approx(metrics["val_loss"], abs=1e-6)


def test_a_trained_tokenizer_setting_contradicting_the_base_is_a_one_line_error(base, capsys) -> None:
    _, root = base
    with pytest.raises(BaseModelError, match="tokenizer.source is 'trained'"):
        ft.finetune_instruct(
            trainer_params(ft.FinetuneInstructParams, **FT_PARAMS),
            tokenizer_params=params_for(TokenizerParams, source="trained"),
            **paths(root, "refused"),
        )
    assert not (root / "refused").exists()


SPAM = [
    ("Win a free prize now! Reply YES.", 1),
    ("Hello there, how are you today?", 0),
    ("Spam: win a prize", 1),
    ("Fine, thanks; and you?", 0),
]


def test_classifier_on_a_base_reads_its_last_token_and_answers_llm_classify(base, capsys) -> None:
    """finetune_classifier (LoRA + head) on the base: the saved classifier carries the base's
    tokenizer; `llm classify` gives the probabilities of the saved model on the base's token ids."""
    from cli import llm as cli
    from llmcore.classifier import DecoderClassifier, load_classifier, predict_proba
    from steps import finetune_classifier as fc

    family, root = base
    data = root / "spam"
    data.mkdir(exist_ok=True)
    frame = pd.DataFrame({"Label": [label for _, label in SPAM], "Text": [text for text, _ in SPAM]})
    for split in ("train", "validation"):
        frame.to_csv(data / f"{split}.csv", index=False)
    (data / "labels.json").write_text(json.dumps({"labels": ["ham", "spam"]}))
    params = trainer_params(
        fc.FinetuneClassifierParams,
        trainable="lora",
        token_position="flexible",
        epochs=1,
        batch_size=2,
        lr=1e-2,
        eval_every=0,
        eval_batches=1,
        device="cpu",
    )
    metrics = fc.finetune_classifier(
        params,
        base_dir=root / "base",
        data_dir=data,
        out_dir=root / "classifier",
        metrics_out=root / "c.json",
        history_out=root / "c.csv",
        plots_dir=root / "plots",
        cache_dir=root / ".cache" / "classifier",
        tokenizer_params=params_for(TokenizerParams),
    )
    assert metrics["steps"] == 2 and 0.0 <= metrics["val_accuracy"] <= 1.0
    model = load_classifier(root / "classifier")
    assert isinstance(model, DecoderClassifier) and model.cfg.family == family
    tokenizer = HFTokenizer(root / "classifier")
    assert model.pad_id == tokenizer.eos_id
    base_model = load_checkpoint(root / "base")
    head_free = {k for k in model.state_dict() if not k.startswith("out_head.")}
    assert any(not torch.equal(model.state_dict()[k], base_model.state_dict()[k]) for k in head_free)  # LoRA merged
    probs = predict_proba(model, tokenizer, [SPAM[0][0]])[0]
    capsys.readouterr()
    assert cli.main(["classify", SPAM[0][0], "--model", str(root / "classifier")]) == 0
    label = model.labels[int(probs.argmax())]
    assert capsys.readouterr().out.strip() == f"{label} (spam probability {float(probs[1]):.3f})"
