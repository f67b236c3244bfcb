"""The values tests give the params models where a test names none: what those models defaulted to
before they took no defaults (the product's values live in params.yaml only; a test states its own).
``params_for(Model, **fields)`` validates a model with these values under the fields a test names;
``values_for`` gives them as the dict a test writes into a params.yaml section."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from llmpipe.data import TokenizerParams
from llmpipe.distributed import DistributedParams
from llmpipe.judge import JudgeParams
from llmpipe.models import BaseModelSectionParams, LoraParams
from llmpipe.stats import ComparisonParams
from pipelines.flows import OrchestrationParams
from steps.adapt_pretrain import AdaptPretrainParams
from steps.adapt_pretrain import CorpusParams as adapt_pretrain_CorpusParams
from steps.baseline_spam import BaselineGrid, BaselineParams
from steps.build_instruction_dataset import InstructionDataParams
from steps.build_preference_dataset import PreferenceDataParams
from steps.build_spam_dataset import SpamDataParams
from steps.data.corpus import CorpusParams as corpus_CorpusParams
from steps.data.windows import WindowParams
from steps.evaluate import EvaluateParams, GenerationParams
from steps.fetch import FetchSettings
from steps.finetune_classifier import FinetuneClassifierParams
from steps.finetune_instruct import FinetuneInstructParams
from steps.load_gpt2 import LoadGPT2Params
from steps.preference_tune import PreferenceTuneParams
from steps.pretrain import ModelParams, PretrainParams, SampleParams
from steps.score_instructions import ScoreInstructionsParams
from steps.score_preference import ScorePreferenceParams
from steps.score_spam import ScoreSpamParams
from steps.train_tokenizer import TrainTokenizerParams

M = TypeVar("M", bound=BaseModel)

TEST_VALUES: dict[type[BaseModel], dict[str, Any]] = {
    FetchSettings: {"connect_timeout_s": 10.0, "read_timeout_s": 60.0, "retries": 3, "backoff_factor": 0.5},
    corpus_CorpusParams: {
        "root": "data/raw/corpus.txt",
        "include": [],
        "text_field": "text",
        "endoftext": "between",
        "shard_tokens": 100000000,
        "workers": None,
    },
    TokenizerParams: {"source": "gpt2", "encoding_dir": None, "trained_dir": "models/tokenizer"},
    TrainTokenizerParams: {
        "vocab_size": 8192,
        "pattern": "gpt2",
        "special_tokens": ["<|endoftext|>"],
        "sample_bytes": 100000000,
        "heldout_every": 10,
        "heldout_bytes": 10000000,
        "min_frequency": 2,
    },
    WindowParams: {
        "context_length": 256,
        "stride": 256,
        "train_ratio": 0.9,
        "sampling": "fixed",
        "random_windows": None,
        "seed": 123,
    },
    SpamDataParams: {
        "input": "data/raw/SMSSpamCollection",
        "format": "sms",
        "text_column": "text",
        "label_column": "label",
        "labels": ["ham", "spam"],
        "split": "balanced",
        "seed": 123,
        "train_frac": 0.7,
        "validation_frac": 0.1,
        "on_malformed": "error",
    },
    InstructionDataParams: {
        "train_frac": 0.85,
        "test_frac": 0.1,
        "shuffle": False,
        "seed": 123,
        "input": "data/raw/instruction-data.json",
        "prompt_style": "alpaca",
    },
    PreferenceDataParams: {
        "train_frac": 0.85,
        "test_frac": 0.1,
        "shuffle": False,
        "seed": 123,
        "input": "data/raw/instruction-data-with-preference.json",
    },
    PretrainParams: {},
    ModelParams: {
        "preset": "cpu-small",
        "emb_dim": None,
        "n_heads": None,
        "n_layers": None,
        "drop_rate": None,
        "qkv_bias": None,
        "tie_embeddings": None,
        "init": None,
        "pad_vocab_to_multiple": None,
    },
    SampleParams: {"prompt": "Every effort moves you", "max_new_tokens": 50},
    EvaluateParams: {
        "batch_size": 8,
        "device": "auto",
    },
    GenerationParams: {
        "prompts": ["Every effort moves you"],
        "max_new_tokens": 25,
        "temperature": 0.0,
        "top_k": None,
        "seed": 123,
    },
    ComparisonParams: {"confidence": 0.95, "bootstrap_samples": 2000, "seed": 123, "promote_alpha": 0.05},
    LoadGPT2Params: {"source": "gpt2-small", "required": False},
    BaseModelSectionParams: {"source": "", "dtype": "float32"},
    FinetuneInstructParams: {
        "mask_prompt": False,
        "max_length": None,
        "sample_entries": 1,
        "sample_max_new_tokens": 50,
        "lora": None,
    },
    ScoreInstructionsParams: {
        "max_new_tokens": 256,
        "batch_size": 8,
        "max_entries": None,
        "seed": 123,
        "device": "auto",
    },
    JudgeParams: {
        "url": "http://localhost:11434",
        "model": "llama3",
        "required": False,
        "retries": 2,
        "connect_retries": 2,
        "backoff_factor": 0.5,
        "connect_timeout_s": 5.0,
        "read_timeout_s": 120.0,
        "seed": 123,
        "num_ctx": 2048,
    },
    PreferenceTuneParams: {
        "beta": 0.1,
        "max_length": None,
        "trainable": "all",
    },
    LoraParams: {"rank": 8, "alpha": 16.0},
    ScorePreferenceParams: {"batch_size": 8, "max_length": None, "device": "auto"},
    AdaptPretrainParams: {
        "window_length": None,
        "stride": None,
        "loss_vocab": "corpus",
    },
    adapt_pretrain_CorpusParams: {"discarded": True, "val_frac": 0.05, "seed": 123},
    FinetuneClassifierParams: {
        "trainable": "last_block",
        "token_position": "last",
        "max_length": None,
        "drop_rate": None,
    },
    ScoreSpamParams: {"batch_size": 32, "plot_split": "test", "seed": 123, "device": "auto"},
    BaselineParams: {
        "word_ngrams": [1, 2],
        "char_ngrams": [2, 5],
        "min_df": 1,
        "sublinear_tf": True,
        "lowercase": True,
        "max_iter": 5000,
        "seed": 123,
    },
    BaselineGrid: {"classifier": ["logistic_regression", "linear_svm"], "C": [1.0, 10.0, 100.0]},
    OrchestrationParams: {
        "mlflow_experiment": "llm-pipeline",
        "mlflow_ui_url": "http://127.0.0.1:5000",
        "download_retry_delays_s": [10.0, 30.0, 90.0],
        "push": True,
    },
    DistributedParams: {
        "nproc_per_node": 1,
        "nnodes": 1,
        "node_rank": 0,
        "rdzv_endpoint": "127.0.0.1:29500",
        "backend": "auto",
        "timeout_s": 1800.0,
    },
}


def values_for(model: type[BaseModel], /, **fields: Any) -> dict[str, Any]:
    """The test values of ``model`` (and of every class it derives from) under ``fields``, as a dict
    (what a test writes into a params.yaml section); a nested model's dict is filled the same way."""
    values: dict[str, Any] = {}
    for cls in reversed(model.__mro__):
        values.update(TEST_VALUES.get(cls, {}))
    values.update(fields)
    for name, info in model.model_fields.items():
        nested = info.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel) and isinstance(values.get(name, {}), dict):
            values[name] = values_for(nested, **values.get(name, {}))  # a nested model's own test values
    return values


def params_for(model: type[M], /, **fields: Any) -> M:
    """``model`` validated with its test values under the fields a test names."""
    return model.model_validate(values_for(model, **fields))


def params_file(data: dict[str, Any]) -> dict[str, Any]:
    """A params.yaml a test writes: every section it names that a params model reads, filled with
    that model's test values under what the test wrote."""
    from scripts.params_schema import section_models

    models = section_models()
    return {
        name: values_for(models[name], **value) if name in models and isinstance(value, dict) else value
        for name, value in data.items()
    }
