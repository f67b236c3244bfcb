"""MLflow "models from code" definitions: each file sets one pyfunc model with mlflow.models.set_model.

Every model here follows one pattern: artifacts ``checkpoint`` (an llmcore checkpoint directory)
and, when the pipeline has them, ``tokenizer`` (GPT-2's encoder.json + vocab.bpe, so that serving
needs no network); the llmcore package travels as code; nothing is pickled. ``log_code_model``
logs one of them.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

MODELS_DIR = Path(__file__).resolve().parent
REQUIREMENTS = ("mlflow", "torch", "tiktoken", "safetensors", "numpy", "pandas", "tokenizers", "jinja2")


def log_code_model(
    name: str,
    code_file: str,
    checkpoint: str | Path,
    *,
    encoding_dir: str | Path | None = None,
    **log_model_kwargs: Any,
):
    """Log ``MODELS_DIR/code_file`` as a pyfunc in the active run; returns MLflow's ModelInfo.

    ``log_model_kwargs`` go to ``mlflow.pyfunc.log_model`` (signature, input_example,
    registered_model_name, ...). Requirements are pinned to the installed versions, which also
    spares MLflow from inferring them by loading the model.
    """
    import mlflow  # deferred: importing mlflow takes seconds

    import llmcore

    artifacts = {"checkpoint": str(checkpoint)}
    if encoding_dir and not (Path(checkpoint) / "tokenizer.json").is_file():  # a base's own tokenizer: no GPT-2 files
        artifacts["tokenizer"] = str(encoding_dir)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODELS_DIR / code_file),
        artifacts=artifacts,
        code_paths=[str(Path(llmcore.__file__).parent)],
        pip_requirements=[f"{package}=={version(package).split('+')[0]}" for package in REQUIREMENTS],
        **log_model_kwargs,
    )


def generation_param_schema(max_new_tokens: int):
    """The per-call generation options of the text pyfuncs (generator.py, instruct.py)."""
    from mlflow.types import ParamSchema, ParamSpec

    return ParamSchema(
        [
            ParamSpec("max_new_tokens", "long", max_new_tokens),
            ParamSpec("temperature", "double", 0.0),
            ParamSpec("top_k", "long", 0),
            ParamSpec("seed", "long", 123),
        ]
    )


def generator_signature():
    """The signature of ``generator.py`` (pretrain, adapt_pretrain): prompts in, completions out;
    generation options as optional per-call params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "completion")]),
        params=generation_param_schema(50),
    )


def instruct_signature():
    """The signature of ``instruct.py`` (finetune_instruct, preference_tune): an instruction (and
    optional input) in, the response out; generation options per call."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "instruction"), ColSpec("string", "input", required=False)]),
        outputs=Schema([ColSpec("string", "response")]),
        params=generation_param_schema(128),
    )
