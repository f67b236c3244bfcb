"""MLflow pyfunc for a pretrained GPT as a text generator ("models from code", logged by steps/pretrain.py
and steps/adapt_pretrain.py).

Input: a DataFrame with a ``prompt`` column (or a list of prompts). Output: a DataFrame with the
``completion`` of each prompt (the prompt itself not repeated). Params (optional, per call):
``max_new_tokens``, ``temperature`` (0: greedy), ``top_k`` (0: off) and ``seed``. Artifacts:
``checkpoint`` (an llmcore checkpoint directory) and, when the pipeline had one, ``tokenizer``.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

DEFAULT_PARAMS = {"max_new_tokens": 50, "temperature": 0.0, "top_k": 0, "seed": 123}


class TextGenerator(PythonModel):
    def load_context(self, context) -> None:
        from llmcore.checkpoint import load_checkpoint
        from llmcore.tokenizer import get_tokenizer

        self.model = load_checkpoint(context.artifacts["checkpoint"]).eval()
        self.tokenizer = get_tokenizer(context.artifacts.get("tokenizer"))

    def predict(self, context, model_input, params=None):
        from llmcore.generate import generate
        from llmcore.tokenizer import encode, eot_id

        if isinstance(model_input, pd.DataFrame):
            if "prompt" not in model_input.columns:
                raise ValueError(f"generator input needs a 'prompt' column, got columns {list(model_input.columns)}")
            prompts = model_input["prompt"].astype(str).tolist()
        else:
            prompts = [str(p) for p in model_input]
        options = {**DEFAULT_PARAMS, **(params or {})}
        new_ids = generate(
            self.model,
            [encode(self.tokenizer, prompt) for prompt in prompts],
            int(options["max_new_tokens"]),
            temperature=float(options["temperature"]),
            top_k=int(options["top_k"]) or None,
            seed=int(options["seed"]),
            eos_id=eot_id(self.tokenizer),
        )
        return pd.DataFrame({"completion": [self.tokenizer.decode(ids) for ids in new_ids]})


mlflow.models.set_model(TextGenerator())
