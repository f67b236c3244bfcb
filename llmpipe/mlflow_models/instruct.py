"""MLflow pyfunc for the instruction-tuned GPT ("models from code", logged by steps/finetune_instruct.py).

Input: a DataFrame with an ``instruction`` column and an optional ``input`` column, rendered in the
prompt style the model was trained on (``llmcore.prompts.checkpoint_prompt_style``: its ``prompt_style``;
``template``: the chat template of the tokenizer the checkpoint carries).
Output: a DataFrame with each ``response``.
Params (optional, per call): ``max_new_tokens``, ``temperature`` (0: greedy), ``top_k`` (0: off),
``seed``. Artifacts: ``checkpoint`` and, when the pipeline had one, ``tokenizer``.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

DEFAULT_PARAMS = {"max_new_tokens": 128, "temperature": 0.0, "top_k": 0, "seed": 123}


class InstructionModel(PythonModel):
    def load_context(self, context) -> None:
        from llmcore.checkpoint import load_checkpoint, read_checkpoint_meta
        from llmcore.hf_tokenizer import carried_tokenizer
        from llmcore.prompts import checkpoint_prompt_style

        checkpoint = Path(context.artifacts["checkpoint"])
        self.model = load_checkpoint(checkpoint).eval()
        self.style = checkpoint_prompt_style(read_checkpoint_meta(checkpoint))
        self.tokenizer = carried_tokenizer(checkpoint, context.artifacts.get("tokenizer"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from llmcore.instruct import generate_responses

        if "instruction" not in model_input.columns:
            raise ValueError(f"instruction model input needs an 'instruction' column, got {list(model_input.columns)}")
        inputs = model_input["input"] if "input" in model_input.columns else [""] * len(model_input)
        entries = [
            {"instruction": str(i), "input": "" if pd.isna(x) else str(x)}
            for i, x in zip(model_input["instruction"], inputs)
        ]
        options = {**DEFAULT_PARAMS, **(params or {})}
        answers = generate_responses(
            self.model,
            self.tokenizer,
            entries,
            max_new_tokens=int(options["max_new_tokens"]),
            style=self.style,
            temperature=float(options["temperature"]),
            top_k=int(options["top_k"]) or None,
            seed=int(options["seed"]),
        )
        return pd.DataFrame({"response": answers})


mlflow.models.set_model(InstructionModel())
