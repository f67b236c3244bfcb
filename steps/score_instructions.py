"""Score the instruction-tuned model on the test split (book chapter 7.7-7.8).

The model answers every test prompt (greedy KV-cache decoding, stopping at <|endoftext|>); the
answers are saved with their references, then scored three ways: by an LLM judge through Ollama
as the book does (optional: absent when no judge is reachable), and always offline by ROUGE-L F1
against the reference and by the model's loss / perplexity on the reference responses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import Field

from llmcore.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta
from llmcore.device import resolve_device
from llmcore.hf_tokenizer import TokenizerConfigError
from llmcore.instruct import TEMPLATE, ChatTemplateError, end_id, generate_responses, response_losses, scored_example
from llmcore.prompts import checkpoint_prompt_style, reference
from llmcore.tokenizer import TokenizerFilesError, get_tokenizer
from llmpipe.cli import StageParams, run_stage
from llmpipe.data import DataError, TokenizerParams
from llmpipe.io import write_json
from llmpipe.judge import JudgeParams, JudgeUnavailableError, judge_responses
from llmpipe.models import BaseModelError, base_tokenizer
from llmpipe.params import ParamsError, StrictModel
from llmpipe.registry import INSTRUCT_EXPERIMENT, INSTRUCT_MODEL, Scoring
from llmpipe.stats import ComparisonParams, bootstrap_interval, examples_digest
from steps.data.datasets import load_entries

STAGE = "score_instructions"


class ModelNotFoundError(FileNotFoundError):
    """The instruction model has not been trained yet."""


class ScoreInstructionsParams(StrictModel):
    max_new_tokens: int = Field(ge=1)  # the book: 256
    batch_size: int = Field(ge=1)  # prompts generated together
    max_entries: int | None = Field(ge=1)  # null: the whole test split
    seed: int
    device: str
    judge: JudgeParams


# The metrics metrics/instruct.json keeps (what `dvc exp show` compares).
HEADLINE = (
    "rouge_l_f1",
    "rouge_l_f1_ci_low",
    "rouge_l_f1_ci_high",
    "judge_score",
    "judge_score_ci_low",
    "judge_score_ci_high",
    "validation_response_loss",
)


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words: the tokenisation of the reference ROUGE scorer."""
    return "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004): precision and recall of the longest common word subsequence.

    LCS rewards words in the reference's order without requiring them to be adjacent; F1 is the
    harmonic mean of LCS/len(prediction) and LCS/len(reference), 0 when either is empty.
    """
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return 0.0
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_instructions(
    params: ScoreInstructionsParams,
    *,
    tokenizer_params: TokenizerParams,
    model_dir: Path,
    test_file: Path,
    responses_out: Path,
    metrics_out: Path,
    headline_out: Path,
    validation_file: Path | None = None,
    comparison: ComparisonParams,
) -> dict:
    """Answer, save and score the test prompts; returns the metrics written to ``metrics_out``
    (ROUGE-L and the judge's score with their intervals also to ``headline_out``); the scores go to
    the training run. The registry chooses on the validation split's response loss (the file beside
    ``test_file`` unless given), paired per example: no test score chooses."""
    from llmpipe.tracking import check_store, record_evaluation  # mlflow imports take seconds

    check_store(INSTRUCT_EXPERIMENT)  # before any work or output: fail early if the store cannot be written
    entries = load_entries(test_file)[: params.max_entries]
    if not entries:
        raise DataError(f"{test_file}: no instruction entries")
    if not (model_dir / "config.json").is_file():
        raise ModelNotFoundError(f"model {model_dir} not found: run `dvc repro finetune_instruct`")
    model, tokenizer, style = load_scored_model(model_dir, params.device, tokenizer_params)
    started = time.perf_counter()
    answers = generate_responses(
        model,
        tokenizer,
        entries,
        max_new_tokens=params.max_new_tokens,
        batch_size=params.batch_size,
        style=style,
        seed=params.seed,
    )
    generate_s = time.perf_counter() - started
    examples = [scored_example(tokenizer, e, style)[1] for e in entries]
    losses = response_losses(model, examples, batch_size=params.batch_size, pad_id=end_id(tokenizer, style))
    rouge = [rouge_l_f1(a, reference(e)) for a, e in zip(answers, entries)]
    judged = judge_responses(entries, answers, params.judge)
    records = [
        {
            **question_fields(e),
            "output": reference(e),
            "model_response": a,
            "rouge_l_f1": round(r, 6),
            "judge_score": s,
            "response_loss_sum": round(ls, 6),
            "response_tokens": n,
        }
        for e, a, r, s, (ls, n) in zip(entries, answers, rouge, judged.scores, losses)
    ]
    write_json(responses_out, records)
    metrics = test_metrics(rouge, judged, losses, comparison)
    validation_file = validation_file or test_file.parent / "validation.json"
    selection = validation_scoring(model, tokenizer, style, validation_file, params.batch_size, metrics)
    if selection is not None:
        metrics["validation_response_loss"] = round(selection.value, 6)
    write_json(metrics_out, metrics)
    write_json(headline_out, {k: metrics[k] for k in HEADLINE if metrics.get(k) is not None})
    tracked = {k: float(v) for k, v in metrics.items() if v is not None}
    record_evaluation(
        STAGE,
        params,
        model_dir,
        {**tracked, "generate_s": generate_s},
        [responses_out],
        registered_model=INSTRUCT_MODEL,
        selection=selection,
        comparison=comparison,
        outputs=[responses_out, metrics_out, headline_out],
    )
    return metrics


def load_scored_model(model_dir: Path, device_name: str, tokenizer_params: TokenizerParams):
    """(model on its device, tokenizer, prompt style): the style the checkpoint was trained in; a
    Hugging Face base's fine-tune brings its own tokenizer (in model_dir), chat template and end-of-turn."""
    try:
        device = resolve_device(device_name)
    except ValueError as exc:
        raise ParamsError(f"{STAGE}.device: {exc}") from exc
    model = load_checkpoint(model_dir).to(device)
    style = checkpoint_prompt_style(read_checkpoint_meta(model_dir))
    tokenizer = (
        base_tokenizer(model_dir, tokenizer_params.source, STAGE)
        if style == TEMPLATE
        else get_tokenizer(tokenizer_params.directory)
    )
    return model, tokenizer, style


def test_metrics(rouge: list[float], judged, losses: list[tuple[float, int]], comparison: ComparisonParams) -> dict:
    """The test split's metrics: mean ROUGE-L, the response loss over every reference token, the
    judge's mean score and why any answer went unscored, each with its interval."""
    n_tokens = sum(n for _, n in losses)
    loss = sum(s for s, _ in losses) / n_tokens if n_tokens else math.nan
    return {
        "n_entries": len(rouge),
        "rouge_l_f1": round(sum(rouge) / len(rouge), 6),
        # None when the context cuts every reference response off (no token to measure).
        "response_loss": round(loss, 6) if n_tokens else None,
        "response_perplexity": round(math.exp(loss), 4) if n_tokens else None,
        "response_tokens": n_tokens,
        "judge_score": None if judged.mean_score is None else round(judged.mean_score, 4),
        "n_scored": judged.n_scored,
        "n_unscored": len(rouge) - judged.n_scored,
        "n_unscored_unreachable": judged.n_unreachable,  # the judge could not be asked
        "n_unscored_unusable": judged.n_unusable,  # it answered, but never an integer 0..100
        "judge_available": judged.available,
        **test_intervals(rouge, judged.scores, losses, comparison),
    }


def test_intervals(
    rouge: list[float], judge: list[int | None], losses: list[tuple[float, int]], comparison: ComparisonParams
) -> dict[str, float | None]:
    """Bootstrap intervals over the test examples: ROUGE-L, the judge's score (the judged ones)
    and the token-weighted response loss."""

    def ratio(sums, counts, axis=-1):
        return sums.sum(axis=axis) / np.maximum(counts.sum(axis=axis), 1)

    fields: dict[str, float | None] = dict(bootstrap_interval(rouge, np.mean, comparison).fields("rouge_l_f1"))
    scored = [s for s in judge if s is not None]
    judge_ci = bootstrap_interval(scored, np.mean, comparison) if scored else None
    fields.update(judge_score_ci_low=judge_ci and judge_ci.low, judge_score_ci_high=judge_ci and judge_ci.high)
    if sum(n for _, n in losses):
        sums, counts = zip(*losses)
        fields.update(bootstrap_interval((sums, counts), ratio, comparison, paired=True).fields("response_loss"))
    return fields


def validation_scoring(
    model, tokenizer, style: str, validation_file: Path, batch_size: int, test_metrics: dict
) -> Scoring | None:
    """The registry's selection scoring: each validation example's mean response loss (lower is
    better; paired bootstrap), with the test's ROUGE-L and judge score recorded beside."""
    if not validation_file.is_file():
        print(f"{STAGE}: no validation split at {validation_file}: the registry's @champion is not moved")
        return None
    entries = load_entries(validation_file)
    scored = [scored_example(tokenizer, e, style) for e in entries]
    losses = response_losses(
        model, [example for _, example in scored], batch_size=batch_size, pad_id=end_id(tokenizer, style)
    )
    n_tokens = sum(n for _, n in losses)
    per_example = [s / n if n else math.nan for s, n in losses]
    keys = [prompt + "\0" + reference(e) for (prompt, _), e in zip(scored, entries)]
    beside = {f"test_{k}": test_metrics[k] for k in ("rouge_l_f1", "judge_score") if test_metrics.get(k) is not None}
    return Scoring(
        "validation",
        "response_loss",
        sum(s for s, _ in losses) / n_tokens if n_tokens else math.nan,
        per_example,
        examples_digest(keys),
        higher_is_better=False,
        others=beside,
    )


def question_fields(entry: dict) -> dict:
    """What an answer record shows of the question: instruction and input, or a chat's earlier turns."""
    if "messages" in entry:
        return {"messages": entry["messages"][:-1]}
    return {"instruction": entry["instruction"], "input": entry.get("input", "")}


def format_summary(metrics: dict, judge_model: str) -> str:
    judge = (
        f"judge ({judge_model}) {metrics['judge_score']:.2f} over {metrics['n_scored']} of {metrics['n_entries']}"
        if metrics["judge_score"] is not None
        else "judge: not scored"
    )
    loss = (
        f"response loss {metrics['response_loss']:.4f} (perplexity {metrics['response_perplexity']:.2f})"
        if metrics["response_loss"] is not None
        else "response loss: no response token fits the context"
    )
    return f"{metrics['n_entries']} test prompts: ROUGE-L F1 {metrics['rouge_l_f1']:.4f}, {loss}, {judge}"


def main(argv: Sequence[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        settings = params.section(STAGE, ScoreInstructionsParams)
        metrics = score_instructions(
            settings,
            tokenizer_params=params.section("tokenizer", TokenizerParams),
            model_dir=args.model,
            test_file=args.test,
            responses_out=args.responses,
            metrics_out=args.metrics,
            headline_out=args.headline,
            validation_file=args.validation,
            comparison=params.section("comparison", ComparisonParams),
        )
        return format_summary(metrics, settings.judge.model)

    run_stage(
        STAGE,
        "Generate answers for the instruction test split and score them.",
        body,
        argv=argv,
        errors=(
            ModelNotFoundError,
            JudgeUnavailableError,
            CheckpointError,
            TokenizerFilesError,
            TokenizerConfigError,
            ChatTemplateError,
            BaseModelError,
        ),
        paths={
            "model": "the instruction model",
            "test": "the test entries",
            "validation": (None, "the validation split the registry chooses on (default: beside --test)"),
            "responses": "every answer with its scores",
            "metrics": "every score",
            "headline": "ROUGE-L, judge score",
        },
    )


if __name__ == "__main__":
    main()
