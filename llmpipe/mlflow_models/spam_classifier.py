"""MLflow pyfunc for the text classifier ("models from code", logged by steps/finetune_classifier.py).

Input: a DataFrame with a ``text`` column. Output: a DataFrame with ``label`` (one of the data's
labels, "ham"/"spam" by default) and ``<label>_probability``: the positive class's for two classes
(``spam_probability``), every class's for more. Artifacts: ``checkpoint`` (the llmcore classifier
directory) and, when the pipeline had one, ``tokenizer`` (GPT-2's encoder.json + vocab.bpe, so
serving works offline).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class SpamClassifierModel(PythonModel):
    def load_context(self, context) -> None:
        from llmcore.classifier import load_classifier
        from llmcore.hf_tokenizer import carried_tokenizer

        checkpoint = Path(context.artifacts["checkpoint"])
        self.model = load_classifier(checkpoint)
        self.tokenizer = carried_tokenizer(checkpoint, context.artifacts.get("tokenizer"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from llmcore.classifier import predict_proba, probability_columns

        if "text" not in model_input.columns:
            raise ValueError(f"spam-classifier input needs a 'text' column, got columns {list(model_input.columns)}")
        probs = predict_proba(self.model, self.tokenizer, model_input["text"].astype(str).tolist())
        labels = self.model.labels
        columns = {"label": [labels[i] for i in probs.argmax(dim=1).tolist()]}
        columns.update({name: probs[:, i].tolist() for name, i in probability_columns(labels)})
        return pd.DataFrame(columns)


mlflow.models.set_model(SpamClassifierModel())
