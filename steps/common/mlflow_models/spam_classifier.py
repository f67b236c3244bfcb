"""MLflow pyfunc for the spam classifier ("models from code", logged by steps/finetune_classifier.py).

Input: a DataFrame with a ``text`` column. Output: a DataFrame with ``label`` ("ham"/"spam") and
``spam_probability``. Artifacts: ``checkpoint`` (the llmcore classifier directory) and, when the
pipeline had one, ``tokenizer`` (GPT-2's encoder.json + vocab.bpe, so serving works offline).
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class SpamClassifierModel(PythonModel):
    def load_context(self, context) -> None:
        from llmcore.classifier import load_classifier
        from llmcore.tokenizer import get_tokenizer

        self.model = load_classifier(context.artifacts["checkpoint"])
        self.tokenizer = get_tokenizer(context.artifacts.get("tokenizer"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from llmcore.classifier import classify_texts

        if "text" not in model_input.columns:
            raise ValueError(f"spam-classifier input needs a 'text' column, got columns {list(model_input.columns)}")
        results = classify_texts(self.model, self.tokenizer, model_input["text"].astype(str).tolist())
        return pd.DataFrame(results, columns=["label", "spam_probability"])


mlflow.models.set_model(SpamClassifierModel())
