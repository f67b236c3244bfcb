"""The registry policy on real MLflow stores (a sqlite file, and an MLflow tracking server): @candidate
for every version, @champion only for a validation improvement beyond noise, never on ties, NaN or
partial scorings, and no lost update when two scorings promote at once."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from llmpipe import registry
from llmpipe.registry import (
    CANDIDATE,
    CHAMPION,
    Scoring,
    promote_if_better,
    promotion_lock,
    register_candidate,
    version_of_run,
)
from llmpipe.stats import ComparisonParams
from tests.params_values import params_for
from tests.repo_copy import closed_port

REPO = Path(__file__).resolve().parents[1]
N = 149  # the spam validation split's size
PARAMS = params_for(ComparisonParams)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> mlflow.MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # artifacts land in ./mlruns there
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")
    return mlflow.MlflowClient(uri)


def new_version(name: str) -> tuple[str, str]:
    """A run's (empty) LoggedModel, registered through the policy; returns (version, run id)."""
    with mlflow.start_run() as run:
        model = mlflow.initialize_logged_model(name="model")
        mlflow.finalize_logged_model(model.model_id, "READY")
    version = register_candidate(f"models:/{model.model_id}", name)
    return str(version.version), run.info.run_id


def right_wrong(errors: int, n: int = N, digest: str = "valdigest000", first: int = 0, **others) -> Scoring:
    """Validation accuracy with ``errors`` wrong answers, on examples ``first``..``first + errors - 1``."""
    correct = [0 if first <= i < first + errors else 1 for i in range(n)]
    return Scoring("validation", "accuracy", sum(correct) / n, correct, digest, binary=True, others=others)


def alias(client: mlflow.MlflowClient, name: str, which: str) -> str:
    return str(client.get_model_version_by_alias(name, which).version)


def promote(name: str, scoring: Scoring) -> tuple[str, object]:
    version, run_id = new_version(name)
    return version, promote_if_better(name, version, run_id, scoring, PARAMS)


def test_first_finite_candidate_becomes_champion_and_only_a_real_improvement_moves_it(store) -> None:
    v1, first = promote("clf", right_wrong(15, test_accuracy=0.99))
    assert alias(store, "clf", CANDIDATE) == v1 and first.promoted and alias(store, "clf", CHAMPION) == v1
    v2, tie = promote("clf", right_wrong(15, first=50))  # as many errors, on other messages
    assert not tie.promoted and alias(store, "clf", CHAMPION) == v1 and alias(store, "clf", CANDIDATE) == v2
    _, noise = promote("clf", right_wrong(12))  # 3 fewer errors: within noise (McNemar p = 0.25)
    assert not noise.promoted and "not beyond noise" in noise.reason and noise.test.p_value == pytest.approx(0.25)
    assert "champion unchanged" in noise.describe("clf", "accuracy")
    _, worse = promote("clf", right_wrong(30))
    assert not worse.promoted and "not better" in worse.reason
    v5, better = promote("clf", right_wrong(2))  # 13 fewer errors: p = 0.0002
    assert better.promoted and alias(store, "clf", CHAMPION) == v5 and better.champion_value == pytest.approx(134 / N)
    assert "is now @champion" in better.describe("clf", "accuracy") and "McNemar exact p" in better.describe(
        "clf", "accuracy"
    )
    # The test accuracy is recorded beside, keyed by split, size and examples: never read to choose.
    tags = store.get_model_version("clf", v1).tags
    assert tags[f"eval.validation.n{N}.valdigest000.accuracy"] == f"{134 / N:.6g}"
    assert tags[f"eval.validation.n{N}.valdigest000.test_accuracy"] == "0.99"
    assert str(version_of_run("clf", store.get_run(store.get_model_version("clf", v1).run_id)).version) == v1


def test_nan_and_missing_scores_never_promote(store) -> None:
    nan = Scoring("validation", "loss", math.nan, [math.nan] * 3, "d", higher_is_better=False)
    _, first = promote("lm", nan)
    assert not first.promoted and first.champion_version is None
    with pytest.raises(mlflow.exceptions.MlflowException):
        store.get_model_version_by_alias("lm", CHAMPION)
    v2, _ = promote("lm", Scoring("validation", "loss", 5.0, [5.0, 5.1, 4.9, 5.0], "d", higher_is_better=False))
    assert alias(store, "lm", CHAMPION) == v2
    _, again = promote("lm", Scoring("validation", "loss", math.nan, [math.nan] * 4, "d", higher_is_better=False))
    assert not again.promoted and alias(store, "lm", CHAMPION) == v2 and "not a number" in again.reason


def test_a_partial_scoring_neither_promotes_nor_overwrites_the_recorded_scores(store) -> None:
    v1, _ = promote("ins", right_wrong(40))
    full_tags = dict(store.get_model_version("ins", v1).tags)
    # A candidate scored perfectly, but on 5 examples only (e.g. max_entries: 5): nothing to pair with.
    _, partial = promote("ins", right_wrong(0, n=5, digest="first5000000"))
    assert not partial.promoted and alias(store, "ins", CHAMPION) == v1 and "same validation examples" in partial.reason
    # The champion scored again on those 5 only: recorded beside the full scoring, which stays.
    run_id = store.get_model_version("ins", v1).run_id
    promote_if_better("ins", v1, run_id, right_wrong(0, n=5, digest="first5000000"), PARAMS)
    tags = store.get_model_version("ins", v1).tags
    assert all(tags[k] == v for k, v in full_tags.items()) and tags["eval.validation.n5.first5000000.accuracy"] == "1"
    assert tags[f"eval.validation.n{N}.valdigest000.accuracy"] == f"{(N - 40) / N:.6g}"
    _, tie = promote("ins", right_wrong(0, n=5, digest="first5000000"))  # now comparable: a tie
    assert not tie.promoted and alias(store, "ins", CHAMPION) == v1


def test_a_rescored_champion_stays_and_lower_is_better_losses_use_the_paired_bootstrap(store) -> None:
    base = [5.0 + 0.01 * (i % 7) for i in range(60)]
    v1, _ = promote("pre", Scoring("validation", "loss", sum(base) / 60, base, "w", higher_is_better=False))
    slightly = [x - 0.001 * (i % 2) for i, x in enumerate(base)]  # 0.0005 lower on average, half the windows
    _, close = promote("pre", Scoring("validation", "loss", sum(slightly) / 60, slightly, "w", higher_is_better=False))
    assert alias(store, "pre", CHAMPION) == v1 or close.promoted  # decided by the test, reported either way
    lower = [x - 0.2 for x in base]
    v3, clear = promote("pre", Scoring("validation", "loss", sum(lower) / 60, lower, "w", higher_is_better=False))
    assert clear.promoted and alias(store, "pre", CHAMPION) == v3 and clear.test.test == "paired bootstrap"
    run_id = store.get_model_version("pre", v3).run_id
    again = promote_if_better(
        "pre", v3, run_id, Scoring("validation", "loss", sum(lower) / 60, lower, "w", higher_is_better=False), PARAMS
    )
    assert not again.promoted and alias(store, "pre", CHAMPION) == v3


def test_a_lock_released_while_the_store_answers_a_lost_create_is_taken(store, monkeypatch) -> None:
    """The store answers a create that lost to the holder by reading the holder's lock back; if the
    holder releases in between, that read says RESOURCE_DOES_NOT_EXIST (a CI failure under load).
    The waiter then takes the free lock instead of failing the promotion."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    lock = "held" + registry.LOCK_SUFFIX
    store.create_registered_model(lock)  # the holder
    read_back = SqlAlchemyStore.get_registered_model
    released = []

    def holder_releases_first(self, name):
        if name == lock and not released:
            released.append(name)
            self.delete_registered_model(name)
        return read_back(self, name)

    monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", holder_releases_first)
    with promotion_lock("held", wait_s=5):
        assert released == [lock]
        assert store.get_registered_model(lock).name == lock  # now ours
    assert not store.search_registered_models(f"name = '{lock}'")


# ---- two scorings promoting at once (two workers finishing together)

RACE = textwrap.dedent("""
    import os, sys, time
    import mlflow
    from llmpipe import registry
    from llmpipe.stats import ComparisonParams

    name, version, run_id = sys.argv[1:4]
    errors, delay, start = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
    if os.environ.get("RACE_NO_LOCK"):  # what the lock prevents: shown to fail below
        import contextlib
        registry.promotion_lock = lambda name: contextlib.nullcontext()
    read = registry.champion_scoring
    def slow(*args):  # a slow store: time between reading the champion and moving the alias
        found = read(*args)
        time.sleep(delay)
        return found
    registry.champion_scoring = slow
    correct = [0 if i < errors else 1 for i in range(149)]
    scoring = registry.Scoring("validation", "accuracy", sum(correct) / 149, correct, "valdigest000", binary=True)
    time.sleep(max(0.0, start - time.time()))
    comparison = ComparisonParams(confidence=0.95, bootstrap_samples=2000, seed=123, promote_alpha=0.05)
    print(registry.promote_if_better(name, version, run_id, scoring, comparison).describe(name, "accuracy"))
""")


def race(tmp_path: Path, uri: str, name: str, *, lock: bool) -> tuple[str, str, str]:
    """v1 (40 errors) is champion; v2 (20 errors) and v3 (2 errors) promote at the same instant, v2
    slower to write: the right final champion is v3 whatever the order."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("race")
    v1, run1 = new_version(name)
    promote_if_better(name, v1, run1, right_wrong(40), PARAMS)
    (v2, run2), (v3, run3) = new_version(name), new_version(name)
    script = tmp_path / "race.py"
    script.write_text(RACE)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO), **({} if lock else {"RACE_NO_LOCK": "1"})}
    start = time.time() + 8  # both processes import mlflow first, then start together
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), name, v, r, str(e), str(d), str(start)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v, r, e, d in ((v2, run2, 20, 3.0), (v3, run3, 2, 0.5))
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    # A str message with each stderr's end: pytest shortens a list's repr, and with it the traceback's last line.
    assert all(p.returncode == 0 for p in procs), "\n\n".join(
        f"v{v} exit {p.returncode}:\n{err[-3000:]}" for v, p, (_, err) in zip(("2", "3"), procs, outs)
    )
    return alias(mlflow.MlflowClient(uri), name, CHAMPION), v3, "\n".join(o for o, _ in outs)


def test_concurrent_promotions_keep_the_right_champion_on_sqlite(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    champion, best, log = race(tmp_path, uri, "locked", lock=True)
    assert champion == best, log
    unlocked, best, log = race(tmp_path, uri, "unlocked", lock=False)
    assert unlocked != best, f"without the lock the slower, worse write should win (the check can fail): {log}"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow tracking server (sqlite backend, proxied artifacts) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = closed_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        cwd=root,
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_concurrent_promotions_keep_the_right_champion_on_a_tracking_server(
    mlflow_server: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    champion, best, log = race(tmp_path, mlflow_server, "server-clf", lock=True)
    assert champion == best, log
    with promotion_lock("server-clf"):  # held: a second holder waits, then gives up with a one-line error
        from llmpipe.registry import RegistryLockError

        with pytest.raises(RegistryLockError, match="server-clf.promotion-lock"):
            with promotion_lock("server-clf", wait_s=1):
                pass
    with promotion_lock("server-clf", wait_s=1):  # released: free again
        pass
