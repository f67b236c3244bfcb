"""The model registry's policy: every new version is the ``candidate``; ``champion`` moves to a
candidate only when it beats the champion on the test metric the scoring stage names in params.

The metric a version was scored with is kept as a tag on the version itself, so the comparison
needs no run lookup and survives runs being deleted. Serving and the CLI load ``@champion``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mlflow takes seconds to import: stages import these names at start-up
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

CANDIDATE = "candidate"
CHAMPION = "champion"
# The registered models (and the MLflow experiments of the stages that train them).
PRETRAINED_MODEL = "pretrained-gpt"
SPAM_CLASSIFIER = "spam-classifier"
INSTRUCT_MODEL = "instruct-gpt"
PREFERENCE_MODEL = "preference-gpt"  # the instruction model after DPO (preference_tune)
ADAPTED_MODEL = "adapted-gpt"  # the base after domain-adaptive pretraining (adapt_pretrain): @candidate only


@dataclass(frozen=True)
class Promotion:
    version: str
    value: float
    champion_version: str  # after the decision
    champion_value: float | None  # the previous champion's value (None: there was none)
    promoted: bool

    def describe(self, name: str, metric: str) -> str:
        if not self.promoted:
            return (f"{name} v{self.version}: {metric} {self.value:.4f} does not beat champion "
                    f"v{self.champion_version} ({self.champion_value:.4f}); champion unchanged")
        before = "no champion before" if self.champion_value is None else f"was {self.champion_value:.4f}"
        return f"{name} v{self.version} is now @{CHAMPION}: {metric} {self.value:.4f} ({before})"


def register_candidate(model_uri: str, name: str) -> ModelVersion:
    """Register ``model_uri`` as a new version of ``name`` and point ``@candidate`` at it."""
    import mlflow

    version = mlflow.register_model(model_uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, CANDIDATE, version.version)
    return version


def version_of_run(name: str, run: Run) -> ModelVersion | None:
    """The version of ``name`` that ``run`` registered, if any."""
    import mlflow

    versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def promote_if_better(name: str, version: str, metric: str, value: float, *, higher_is_better: bool = True) -> Promotion:
    """Record ``metric`` = ``value`` on the version; move ``@champion`` to it if it beats the champion."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, metric, f"{value:.6g}")
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:  # no champion yet
        champion = None
    best = None if champion is None or metric not in champion.tags else float(champion.tags[metric])
    if champion is not None and str(champion.version) == str(version):
        return Promotion(str(version), value, str(version), best, promoted=False)
    beats = best is None or (value > best if higher_is_better else value < best)
    if beats:
        client.set_registered_model_alias(name, CHAMPION, version)
    return Promotion(str(version), value, str(version) if beats else str(champion.version), best, promoted=beats)
