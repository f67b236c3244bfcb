"""What the server serves: an llmcore checkpoint directory, or a model in MLflow's registry.

A registry URI (``models:/instruct-gpt@champion``, ``models:/spam-classifier/3``) is downloaded
with MLflow, imported only then (it takes seconds), from the pipeline's tracking store. The
pipeline logs its models as pyfuncs with
``checkpoint`` and ``tokenizer`` artifacts; the pyfunc's MLmodel file says where they lie.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from llmcore.checkpoint import load_checkpoint, read_checkpoint_meta
from llmcore.classifier import CLASSIFIER_FORMAT, load_classifier
from llmcore.prompts import checkpoint_prompt_style
from llmpipe.model_dirs import DEFAULT_MODELS, UsageError, check_model_dir, tokenizer_for

REGISTRY_SCHEME = "models:/"
GENERATOR, CLASSIFIER = "generator", "classifier"


@dataclass(frozen=True)
class Served:
    """A loaded model and how requests name it (``model`` in a request, ``id`` in /v1/models)."""

    name: str
    kind: str  # GENERATOR or CLASSIFIER
    source: str  # the directory or registry URI it came from
    model: nn.Module
    tokenizer: object
    int8: bool = False
    prompt_style: str = "alpaca"  # how chat messages become its prompt

    def card(self) -> dict:
        """This model's entry in /v1/models."""
        return {
            "id": self.name,
            "object": "model",
            "created": 0,
            "owned_by": "llmpipe",
            "kind": self.kind,
            "source": self.source,
            "context_length": self.model.cfg.context_length,
            "int8": self.int8,
            **({"prompt_style": self.prompt_style} if self.kind == GENERATOR else {}),
        }


def registry_name(uri: str) -> str:
    """``models:/instruct-gpt@champion`` -> ``instruct-gpt``."""
    return uri[len(REGISTRY_SCHEME) :].split("@")[0].split("/")[0]


def download_registered(uri: str) -> tuple[Path, Path | None]:
    """The downloaded pyfunc's ``checkpoint`` directory and its ``tokenizer`` directory (or None)."""
    import mlflow  # deferred: only registry URIs need it
    from mlflow.exceptions import MlflowException

    from llmpipe.tracking import configure_tracking

    configure_tracking()  # the pipeline's store: $MLFLOW_TRACKING_URI, else its sqlite file
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as exc:
        raise UsageError(f"{uri}: {exc.message}") from exc
    mlmodel = local / "MLmodel"
    meta = yaml.safe_load(mlmodel.read_text()) if mlmodel.is_file() else {}
    artifacts = meta.get("flavors", {}).get("python_function", {}).get("artifacts") or {}
    if "checkpoint" not in artifacts:
        raise UsageError(f"{uri} has no 'checkpoint' artifact: it was not logged by this pipeline")
    tokenizer = artifacts.get("tokenizer")
    return local / artifacts["checkpoint"]["path"], (local / tokenizer["path"] if tokenizer else None)


def load_served(spec: str, kind: str, *, int8: bool = False, prompt_style: str | None = None) -> Served:
    """Load ``spec`` (directory or registry URI) as a generator or a classifier, int8 if asked;
    the prompt style is the checkpoint's own (``llmcore.prompts.checkpoint_prompt_style``) unless given."""
    if spec.startswith(REGISTRY_SCHEME):
        directory, tokenizer_dir = download_registered(spec)
        name = registry_name(spec)
        from llmcore.hf_tokenizer import carried_tokenizer  # deferred: GPT-2 models never need `tokenizers`

        # A Hugging Face base's fine-tune carries its own tokenizer.json: that one, never GPT-2's.
        tokenizer = carried_tokenizer(directory, tokenizer_dir) if tokenizer_dir else tokenizer_for(directory)
    else:
        if Path(spec).as_posix() not in DEFAULT_MODELS and not (Path(spec) / "config.json").is_file():
            raise UsageError(f"{spec} is not a checkpoint directory (it has no config.json)")
        directory = check_model_dir(spec)  # also names the stage that makes a default directory
        name = directory.resolve().name
        tokenizer = tokenizer_for(directory)
    if kind == GENERATOR and read_checkpoint_meta(directory).get("format") == CLASSIFIER_FORMAT:
        kind = CLASSIFIER  # `--model models:/spam-classifier@champion`: a classifier, served as one
    model = (load_checkpoint if kind == GENERATOR else load_classifier)(directory).eval()
    if int8:
        from llmcore.quantize import quantize_int8

        model = quantize_int8(model, inplace=True)
    try:
        style = prompt_style or checkpoint_prompt_style(read_checkpoint_meta(directory))
    except ValueError as exc:
        raise UsageError(f"{directory / 'config.json'}: {exc}") from exc
    return Served(name, kind, spec, model, tokenizer, int8, style)
