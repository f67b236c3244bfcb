"""Score preference tuning on held-out pairs: the instruction model (SFT, before DPO) and the DPO
model on the same validation and test pairs of ``data/preferences``.

For each model: the preference accuracy (share of pairs whose chosen answer the model itself gives
the higher mean log-probability; ``llmcore.dpo``) and the mean log-prob margin. For the DPO model,
against the SFT model as its reference: the DPO loss (the model's beta), the chosen and rejected
rewards, the reward margin and the reward accuracy. ``metrics/preference.json`` holds the headline
(``dvc exp show``: before and after DPO side by side), ``reports/preference.json`` everything. The
scores go into the MLflow run that trained the DPO model. Every preference accuracy has its Wilson
interval, DPO − SFT on the same test pairs its paired interval and McNemar's p; ``preference-gpt``'s
``@champion`` moves on the validation pairs only, when this version is better beyond noise (the
registry's policy, llmpipe/registry.py): test scores are reported, never used to choose.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field

from llmcore.checkpoint import CheckpointError, read_checkpoint_meta
from llmcore.device import resolve_device
from llmcore.dpo import PreferencePair, pair_logprobs, pair_summary
from llmcore.model import GPTModel
from llmcore.prompts import checkpoint_prompt_style
from llmcore.tokenizer import TokenizerFilesError, eot_id, get_tokenizer
from llmpipe.cli import StageParams, run_stage
from llmpipe.data import DataError, TokenizerParams
from llmpipe.io import write_json
from llmpipe.models import BaseModelError, load_base_model
from llmpipe.params import ParamsError, StrictModel
from llmpipe.registry import PREFERENCE_EXPERIMENT, PREFERENCE_MODEL, Scoring
from llmpipe.stats import ComparisonParams, compare_correct, examples_digest, wilson_interval
from steps.data.preferences import load_pairs

STAGE = "score_preference"
SPLITS = {"val": "validation", "test": "test"}
HEADLINE = {"sft": ("preference_accuracy",), "dpo": ("preference_accuracy", "reward_margin", "reward_accuracy")}


class ScorePreferenceParams(StrictModel):
    batch_size: int = Field(ge=1)  # pairs scored together
    max_length: int | None = Field(ge=2)  # tokens per answer with its prompt; null: the model's context
    device: str


def score_pairs(
    sft: GPTModel,
    dpo: GPTModel,
    pairs: list[PreferencePair],
    beta: float,
    params: ScorePreferenceParams,
    max_length: int,
    pad_id: int,
    comparison: ComparisonParams,
) -> tuple[dict, dict[str, list[bool]]]:
    """Both models' summaries of one split's pairs (preference accuracy with its Wilson interval,
    DPO − SFT paired), and each model's per-pair right/wrong (chosen log-prob above rejected)."""
    sft_lp = pair_logprobs(sft, pairs, batch_size=params.batch_size, max_length=max_length, pad_id=pad_id)
    dpo_lp = pair_logprobs(dpo, pairs, batch_size=params.batch_size, max_length=max_length, pad_id=pad_id)
    correct = {"sft": (sft_lp[0] > sft_lp[1]).tolist(), "dpo": (dpo_lp[0] > dpo_lp[1]).tolist()}
    summary = {
        "pairs": len(pairs),
        "sft": pair_summary(*sft_lp),
        "dpo": pair_summary(*dpo_lp, reference=torch.stack(sft_lp), beta=beta),
    }
    for model, right in correct.items():
        summary[model].update(
            wilson_interval(sum(right), len(right), comparison.confidence).fields("preference_accuracy")
        )
    paired = compare_correct(correct["sft"], correct["dpo"], comparison, metric="preference_accuracy")
    summary["dpo_minus_sft"] = {
        "preference_accuracy": paired.difference,
        "ci_low": paired.interval.low,
        "ci_high": paired.interval.high,
        "mcnemar_p": paired.p_value,
    }
    return summary, correct


def score_preference(
    params: ScorePreferenceParams,
    *,
    tokenizer_params: TokenizerParams,
    sft_dir: Path,
    model_dir: Path,
    data_dir: Path,
    metrics_out: Path,
    headline_out: Path,
    comparison: ComparisonParams,
) -> dict:
    """Score both models on the validation and test pairs; write and record the results."""
    from llmpipe.tracking import check_store, record_evaluation  # mlflow imports take seconds

    check_store(PREFERENCE_EXPERIMENT)  # before any work or output: fail early if the store cannot be written
    try:
        device = resolve_device(params.device)
    except ValueError as exc:
        raise ParamsError(f"{STAGE}.device: {exc}") from exc
    sft, dpo = (load_base_model(path).to(device).eval() for path in (sft_dir, model_dir))
    style, dpo_meta = checkpoint_prompt_style(read_checkpoint_meta(sft_dir)), read_checkpoint_meta(model_dir)
    if checkpoint_prompt_style(dpo_meta) != style:
        raise DataError(
            f"{model_dir} was tuned in prompt style {checkpoint_prompt_style(dpo_meta)!r}, "
            f"{sft_dir} in {style!r}: run `dvc repro preference_tune`"
        )
    max_length = min(params.max_length or sft.cfg.context_length, sft.cfg.context_length, dpo.cfg.context_length)
    tokenizer = get_tokenizer(tokenizer_params.directory)
    report = {"beta": dpo_meta.get("beta"), "prompt_style": style, "max_length": max_length}
    selection = None
    for short, split in SPLITS.items():
        pairs, entries, cut = load_pairs(data_dir / f"{split}.json", tokenizer, style, max_length)
        summary, correct = score_pairs(
            sft, dpo, pairs, dpo_meta.get("beta", 0.1), params, max_length, eot_id(tokenizer), comparison
        )
        report[short] = {**summary, "pairs_prompt_cut": cut}
        if split == "validation":  # what the registry selects on: each pair right or wrong, paired by content
            keys = (f"{e.get('instruction', e.get('prompt'))}|{e.get('chosen')}|{e.get('rejected')}" for e in entries)
            selection = Scoring(
                "validation",
                "preference_accuracy",
                summary["dpo"]["preference_accuracy"],
                [float(c) for c in correct["dpo"]],
                examples_digest(map(str, keys)),
                binary=True,
            )
    headline = headline_metrics(report)
    write_json(metrics_out, report)
    write_json(headline_out, headline)
    tracked = {
        **headline["dpo"],
        **{f"sft_{key}": value for key, value in headline["sft"].items()},
        **{f"dpo_minus_sft_{key}": value for key, value in headline["dpo_minus_sft"].items()},
    }
    record_evaluation(
        STAGE,
        params,
        model_dir,
        tracked,
        [metrics_out],
        registered_model=PREFERENCE_MODEL,
        selection=selection,
        comparison=comparison,
        outputs=[metrics_out, headline_out],
    )
    return report


def headline_metrics(report: dict) -> dict[str, dict[str, float]]:
    """``metrics/preference.json``: per model the HEADLINE scores of both splits, the test preference
    accuracy's interval, and DPO − SFT on the test pairs (difference, interval, McNemar p)."""
    headline = {
        model: {f"{short}_{key}": round(report[short][model][key], 6) for short in SPLITS for key in keys}
        for model, keys in HEADLINE.items()
    }
    for model in HEADLINE:
        for bound in ("ci_low", "ci_high"):
            headline[model][f"test_preference_accuracy_{bound}"] = round(
                report["test"][model][f"preference_accuracy_{bound}"], 6
            )
    paired = report["test"]["dpo_minus_sft"]
    headline["dpo_minus_sft"] = {
        "test_preference_accuracy": round(paired["preference_accuracy"], 6),
        "test_preference_accuracy_ci_low": round(paired["ci_low"], 6),
        "test_preference_accuracy_ci_high": round(paired["ci_high"], 6),
        "test_mcnemar_p": round(paired["mcnemar_p"], 6),
    }
    return headline


def format_summary(report: dict) -> str:
    test = report["test"]
    paired = test["dpo_minus_sft"]
    return (
        f"{test['pairs']} test pairs: preference accuracy SFT {test['sft']['preference_accuracy']:.3f} -> DPO "
        f"{test['dpo']['preference_accuracy']:.3f} (DPO − SFT {100 * paired['preference_accuracy']:+.1f} points, "
        f"95% CI [{100 * paired['ci_low']:+.1f}, {100 * paired['ci_high']:+.1f}], "
        f"McNemar p = {paired['mcnemar_p']:.3g}), "
        f"reward margin {test['dpo']['reward_margin']:.4f}, reward accuracy {test['dpo']['reward_accuracy']:.3f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        report = score_preference(
            params.section(STAGE, ScorePreferenceParams),
            tokenizer_params=params.section("tokenizer", TokenizerParams),
            sft_dir=args.sft,
            model_dir=args.model,
            data_dir=args.data,
            metrics_out=args.metrics,
            headline_out=args.headline,
            comparison=params.section("comparison", ComparisonParams),
        )
        return format_summary(report)

    run_stage(
        STAGE,
        "Preference accuracy of the instruction model before and after DPO.",
        body,
        argv=argv,
        errors=(CheckpointError, TokenizerFilesError, BaseModelError),
        paths={
            "sft": "the instruction model (before DPO)",
            "model": "the DPO model",
            "data": "the preference pairs",
            "metrics": "every score",
            "headline": "preference accuracy before and after, reward margin",
        },
    )


if __name__ == "__main__":
    main()
