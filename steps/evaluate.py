"""Evaluate the pretrained GPT: loss and perplexity over whole splits, and fixed-seed generations.

The book splits its corpus into train and validation only, so this stage scores both (the
validation split is the held-out text; there is no separate test split of the-verdict). Losses
are the mean next-token cross-entropy over every token of every window, perplexity its exp.
The per-position loss (mean loss at each position of the context window, ``plots/``) shows how
much the model gains from longer context. The continuations of ``generation.prompts`` use a fixed
seed, so they are reproducible on CPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.data import DataLoader

from llmcore.checkpoint import CheckpointError, load_checkpoint
from llmcore.data import SlidingWindowDataset
from llmcore.device import resolve_device
from llmcore.generate import generate
from llmcore.model import GPTModel
from llmcore.tokenizer import TokenizerFilesError, encode, get_tokenizer
from llmpipe.cli import StageParams, run_stage
from llmpipe.data import TokenizerParams
from llmpipe.io import atomic_path, write_json
from llmpipe.params import ParamsError, StrictModel
from llmpipe.registry import PRETRAIN_EXPERIMENT, Scoring
from llmpipe.stats import ComparisonParams, examples_digest, mean_interval
from steps.data.windows import load_windows

STAGE = "evaluate"
SPLITS = ("train", "val")


class GenerationParams(StrictModel):
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0)  # 0: greedy
    top_k: int | None = Field(ge=1)
    seed: int


class EvaluateParams(StrictModel):
    batch_size: int = Field(ge=1)
    device: Literal["auto", "cpu", "cuda", "mps"]
    generation: GenerationParams


@torch.no_grad()
def position_losses(model: GPTModel, data: SlidingWindowDataset, batch_size: int) -> tuple[torch.Tensor, list[float]]:
    """Mean next-token loss at each position of the window, over every window of ``data``, and
    each window's mean loss (the spread the loss's interval and paired comparisons come from)."""
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(data.context_length, dtype=torch.float64)
    per_window: list[float] = []
    for inputs, targets in DataLoader(data, batch_size=batch_size):
        logits = model(inputs.to(device))
        losses = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="none")
        losses = losses.view(targets.shape).double().cpu()
        totals += losses.sum(dim=0)
        per_window += losses.mean(dim=1).tolist()
    return totals / len(data), per_window


def write_window_losses(path: Path, losses: dict[str, list[float]]) -> None:
    """Each evaluation window's mean loss, per split: what ``llm compare`` pairs."""
    with atomic_path(path) as tmp:
        rows = ["split,window,loss"] + [
            f"{split},{i + 1},{loss:.8f}" for split, values in losses.items() for i, loss in enumerate(values)
        ]
        tmp.write_text("\n".join(rows) + "\n")


def loss_fields(per_window: list[float], comparison: ComparisonParams) -> dict[str, float]:
    """The mean loss's t interval over windows, and perplexity's (its exp)."""
    interval = mean_interval(per_window, comparison.confidence)
    return {
        "loss_ci_low": interval.low,
        "loss_ci_high": interval.high,
        "perplexity_ci_low": math.exp(interval.low) if math.isfinite(interval.low) else math.nan,
        "perplexity_ci_high": math.exp(interval.high) if math.isfinite(interval.high) else math.nan,
        "windows": len(per_window),
    }


def write_position_csv(path: Path, curves: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        rows = [f"position,{','.join(f'{split}_loss' for split in curves)}"]
        for position, values in enumerate(zip(*(curve.tolist() for curve in curves.values()))):
            rows.append(f"{position + 1}," + ",".join(f"{v:.6f}" for v in values))
        tmp.write_text("\n".join(rows) + "\n")


def window_digest(data: SlidingWindowDataset) -> str:
    """Which windows were scored: a digest of their token ids (two scorings pair only when equal)."""
    return examples_digest(data[i][0].numpy().tobytes().hex() for i in range(len(data)))


def evaluate(
    params: EvaluateParams,
    *,
    model_dir: Path,
    windows_dir: Path,
    metrics_out: Path,
    headline_out: Path,
    position_csv: Path,
    generations_out: Path,
    windows_out: Path,
    tokenizer_params: TokenizerParams,
    comparison: ComparisonParams,
) -> dict[str, dict[str, float]]:
    """Score ``model_dir`` on the windows, generate, write the outputs and log them; returns the metrics."""
    from llmpipe.registry import PRETRAINED_MODEL
    from llmpipe.tracking import check_store, record_evaluation  # mlflow imports take seconds

    check_store(PRETRAIN_EXPERIMENT)  # before any work or output: fail early if the store cannot be written
    try:
        device = resolve_device(params.device)
    except ValueError as exc:
        raise ParamsError(f"evaluate.device: {exc}") from exc
    model = load_checkpoint(model_dir, map_location=device)
    tokenizer = get_tokenizer(tokenizer_params.directory)
    metrics, curves, per_window = {}, {}, {}
    windows = load_windows(windows_dir, model.cfg, exact=False, sampled=False)  # fixed windows: the same every time
    for split in SPLITS:
        data = windows[split]
        curves[split], per_window[split] = position_losses(model, data, params.batch_size)
        loss = curves[split].mean().item()  # every window has the same length: the mean over tokens
        metrics[split] = {
            "loss": loss,
            "perplexity": math.exp(loss),
            "tokens": len(data) * data.context_length,
            **loss_fields(per_window[split], comparison),
        }

    gen = params.generation
    new_ids = generate(
        model,
        [encode(tokenizer, p) for p in gen.prompts],
        gen.max_new_tokens,
        temperature=gen.temperature,
        top_k=gen.top_k,
        seed=gen.seed,
    )
    generations = [{"prompt": p, "completion": tokenizer.decode(ids)} for p, ids in zip(gen.prompts, new_ids)]

    write_json(metrics_out, metrics)
    val = metrics["val"]
    write_json(
        headline_out,
        {
            f"val_{k}": val[k]
            for k in ("loss", "loss_ci_low", "loss_ci_high", "perplexity", "perplexity_ci_low", "perplexity_ci_high")
        },
    )
    write_position_csv(position_csv, curves)
    write_window_losses(windows_out, per_window)
    write_json(generations_out, generations)
    flat = {f"{split}_{name}": value for split, values in metrics.items() for name, value in values.items()}
    selection = Scoring(
        "validation", "loss", val["loss"], per_window["val"], window_digest(windows["val"]), higher_is_better=False
    )
    record_evaluation(
        STAGE,
        params,
        model_dir,
        flat,
        [position_csv, generations_out, windows_out],
        registered_model=PRETRAINED_MODEL,
        selection=selection,
        comparison=comparison,
        outputs=[metrics_out, headline_out, position_csv, generations_out, windows_out],
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        metrics = evaluate(
            params.section(STAGE, EvaluateParams),
            model_dir=args.model,
            windows_dir=args.windows,
            metrics_out=args.metrics,
            headline_out=args.headline,
            position_csv=args.position_loss,
            generations_out=args.generations,
            windows_out=args.window_losses,
            tokenizer_params=params.section("tokenizer", TokenizerParams),
            comparison=params.section("comparison", ComparisonParams),
        )
        val = metrics["val"]
        return (
            f"val loss {val['loss']:.3f} [{val['loss_ci_low']:.3f}, {val['loss_ci_high']:.3f}] over "
            f"{val['windows']} windows (perplexity {val['perplexity']:.1f}), "
            f"train loss {metrics['train']['loss']:.3f} -> {args.metrics}"
        )

    run_stage(
        STAGE,
        "Evaluate the pretrained GPT: loss, perplexity, generations.",
        body,
        argv=argv,
        errors=(CheckpointError, TokenizerFilesError),
        paths={
            "model": "the pretrained checkpoint",
            "windows": "the windows' meta.json",
            "metrics": "loss, perplexity, tokens per split",
            "headline": "val loss and perplexity",
            "position-loss": "loss by position in the window (CSV)",
            "generations": "sample continuations",
            "window-losses": "every window's mean loss",
        },
    )


if __name__ == "__main__":
    main()
