"""The model registry's policy: every new version is the ``candidate``; ``champion`` moves to a
candidate only when it is better on the **validation** split beyond noise.

Why not the test split: choosing among models by their test score makes the chosen model's test
score optimistic (the winner of many noisy draws), and the test split stops being an estimate of
anything. So each scoring stage hands the registry a *selection* scoring on validation: the
metric, its per-example values and a digest of which examples they are. The candidate is compared
with the champion **in pairs on the same examples** (McNemar's exact test for right/wrong answers, a
paired bootstrap for per-example scores) and promoted only when it is better and the test's p-value
is below ``comparison.promote_alpha``. Ties, NaN, missing scores, and scorings on other examples
(a partial scoring, other data) never promote. With no champion yet, the first candidate with a
finite selection score becomes it.

Every scoring is recorded on the version as tags keyed by split, size and example digest
(``eval.validation.n149.3fa2c1d09e4b.accuracy``), so a later partial scoring never overwrites a
full one; the per-example values go to the training run as an artifact
(``selection/<split>-<digest>.json``) for later pairings. Test metrics are recorded beside, never
read to choose.

Promotions are serialised per registered model by a lock that works on every MLflow store,
sqlite or a tracking server (MLflow has no transactions): creating a registered model is unique
by name in the store's database, so ``<name>.promotion-lock`` is created by one process at a time
and deleted after; a lock older than ``LOCK_STALE_S`` (a crashed holder) is broken.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmpipe.cli import StageError

if TYPE_CHECKING:  # mlflow takes seconds to import: stages import these names at start-up
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

    from llmpipe.stats import ComparisonParams, PairedResult

CANDIDATE = "candidate"
CHAMPION = "champion"
# The registered models.
PRETRAINED_MODEL = "pretrained-gpt"
SPAM_CLASSIFIER = "spam-classifier"
INSTRUCT_MODEL = "instruct-gpt"
PREFERENCE_MODEL = "preference-gpt"  # the instruction model after DPO (preference_tune)
ADAPTED_MODEL = "adapted-gpt"  # the base after domain-adaptive pretraining (adapt_pretrain): @candidate only
# The MLflow experiment of each training stage; its scoring stage logs into the same runs (and
# checks that store first). The classifier's experiment is named after its registered model.
PRETRAIN_EXPERIMENT = "pretrain"
ADAPT_EXPERIMENT = "adapt-pretrain"
INSTRUCT_EXPERIMENT = "instruction-sft"
PREFERENCE_EXPERIMENT = "preference-dpo"

LOCK_SUFFIX = ".promotion-lock"
LOCK_WAIT_S = 300.0  # a promotion waits this long for another one to finish
LOCK_STALE_S = 600.0  # a lock older than this was left by a crashed process: broken
SELECTION_DIR = "selection"


class RegistryLockError(StageError):
    """Another promotion held the registered model's lock for too long."""


@dataclass(frozen=True)
class Scoring:
    """One scoring of a model on one split: the metric, and per example what the pairing needs."""

    split: str
    metric: str
    value: float
    per_example: Sequence[float]  # 1/0 right or wrong (binary), else each example's score
    digest: str  # which examples, in order (llmpipe.stats.examples_digest)
    binary: bool = False  # McNemar on right/wrong; else a paired bootstrap of the scores
    higher_is_better: bool = True
    others: dict[str, float] = field(default_factory=dict)  # more of this split's metrics, recorded beside

    @property
    def n(self) -> int:
        return len(self.per_example)

    def key(self, metric: str | None = None) -> str:
        return f"eval.{self.split}.n{self.n}.{self.digest}.{metric or self.metric}"

    def to_json(self) -> dict:
        return {
            "split": self.split,
            "metric": self.metric,
            "value": self.value,
            "digest": self.digest,
            "binary": self.binary,
            "higher_is_better": self.higher_is_better,
            "per_example": list(self.per_example),
        }


@dataclass(frozen=True)
class Promotion:
    version: str
    value: float
    champion_version: str | None  # after the decision
    champion_value: float | None  # the previous champion's value (None: there was none)
    promoted: bool
    reason: str
    test: PairedResult | None = None

    def describe(self, name: str, metric: str) -> str:
        if self.promoted:
            before = (
                "no champion before" if self.champion_value is None else f"was {self.champion_value:.4f}{self._p()}"
            )
            return f"{name} v{self.version} is now @{CHAMPION}: validation {metric} {self.value:.4f} ({before})"
        return f"{name} v{self.version}: validation {metric} {self.value:.4f}: {self.reason}; champion unchanged"

    def _p(self) -> str:
        return f", {self.test.test} p = {self.test.p_value:.3g}" if self.test else ""


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


@contextlib.contextmanager
def promotion_lock(name: str, *, wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S) -> Iterator[None]:
    """Hold ``<name>.promotion-lock`` (a registered model: its name is unique in the store's database,
    so exactly one concurrent create succeeds, on sqlite and on a tracking server alike)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client, lock = mlflow.MlflowClient(), name + LOCK_SUFFIX
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, description="held while @champion is decided (llmpipe/registry.py)")
            break
        except MlflowException as exc:
            # The store answers a create that lost to the holder by reading the holder's lock back:
            # released in between, that read says RESOURCE_DOES_NOT_EXIST. Free again: create at once.
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        _break_if_stale(client, lock, stale_s)
        if time.monotonic() > deadline:
            raise RegistryLockError(
                f"registry lock {lock!r} held for over {wait_s:.0f} s: another promotion is running "
                f"(or delete that registered model if none is)"
            )
        time.sleep(0.05)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _break_if_stale(client, lock: str, stale_s: float) -> None:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # gone meanwhile: the next create will tell
        created = client.get_registered_model(lock).creation_timestamp / 1000
        if time.time() - created > stale_s:
            print(f"registry: breaking the stale lock {lock!r} (created {time.time() - created:.0f} s ago)")
            client.delete_registered_model(lock)


def record_scoring(name: str, version: str, run_id: str, scoring: Scoring) -> None:
    """Tags on the version keyed by split, size and digest (never overwriting another scoring), and
    the per-example values as an artifact of the training run."""
    import mlflow

    client = mlflow.MlflowClient()
    for metric, value in {scoring.metric: scoring.value, **scoring.others}.items():
        if value is not None:
            client.set_model_version_tag(name, version, scoring.key(metric), f"{value:.6g}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{scoring.split}-{scoring.digest}.json"
        path.write_text(json.dumps(scoring.to_json()))
        client.log_artifact(run_id, str(path), SELECTION_DIR)


def champion_scoring(name: str, champion: ModelVersion, like: Scoring) -> Scoring | None:
    """The champion's recorded scoring on the same split and examples as ``like``, or None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if like.key() not in champion.tags or not champion.run_id:
        return None
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=champion.run_id, artifact_path=f"{SELECTION_DIR}/{like.split}-{like.digest}.json"
        )
    except (MlflowException, OSError):
        return None
    data = json.loads(Path(local).read_text())
    return Scoring(
        data["split"],
        data["metric"],
        float(data["value"]),
        data["per_example"],
        data["digest"],
        data["binary"],
        data["higher_is_better"],
    )


def decide(
    candidate: Scoring, champion: Scoring | None, params: ComparisonParams
) -> tuple[bool, str, PairedResult | None]:
    """Whether ``candidate`` beats ``champion`` beyond noise; the reason, and the paired test."""
    from llmpipe.stats import compare_correct, compare_scores

    if candidate.value is None or not math.isfinite(candidate.value):
        return False, f"its {candidate.metric} is {candidate.value} (not a number)", None
    if champion is None:
        return False, "the champion has no scoring on the same validation examples to pair with", None
    if champion.metric != candidate.metric or len(champion.per_example) != candidate.n:
        return False, "the champion was scored with another metric or on other examples", None
    compare = compare_correct if candidate.binary else compare_scores
    test = compare(champion.per_example, candidate.per_example, params, metric=candidate.metric)
    better = test.difference > 0 if candidate.higher_is_better else test.difference < 0
    if not better:
        return False, f"not better than the champion ({test.value_a:.4f}, {test.test} p = {test.p_value:.3g})", test
    if not test.significant(params.promote_alpha):
        return (
            False,
            (
                f"better by {abs(test.difference):.4f} but not beyond noise ({test.test} p = {test.p_value:.3g}"
                f" ≥ {params.promote_alpha})"
            ),
            test,
        )
    return True, "better beyond noise", test


def promote_if_better(name: str, version: str, run_id: str, scoring: Scoring, params: ComparisonParams) -> Promotion:
    """Record ``scoring`` on the version; under the promotion lock, move ``@champion`` to it if it
    beats the champion on the same validation examples beyond noise (or there is no champion)."""
    import mlflow

    client = mlflow.MlflowClient()
    record_scoring(name, version, run_id, scoring)
    with promotion_lock(name):
        try:
            champion = client.get_model_version_by_alias(name, CHAMPION)
        except mlflow.exceptions.MlflowException:  # no champion yet
            champion = None
        if champion is None:
            finite = scoring.value is not None and math.isfinite(scoring.value)
            if finite:
                client.set_registered_model_alias(name, CHAMPION, version)
            reason = "no champion yet" if finite else f"its {scoring.metric} is {scoring.value} (not a number)"
            return Promotion(str(version), scoring.value, str(version) if finite else None, None, finite, reason)
        if str(champion.version) == str(version):
            return Promotion(str(version), scoring.value, str(version), scoring.value, False, "it is the champion")
        previous = champion_scoring(name, champion, scoring)
        promoted, reason, test = decide(scoring, previous, params)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
        return Promotion(
            str(version),
            scoring.value,
            str(version) if promoted else str(champion.version),
            previous.value if previous else None,
            promoted,
            reason,
            test,
        )
