"""The team stack end to end, as a team of three machines uses it (issue 21's "Done when").

One ``llm stack`` (PostgreSQL, SeaweedFS S3, MLflow and Prefect servers) on free ports; a bare
git repository is the team's git remote, and its tiny-params main branch commits the stack's
bucket as the DVC remote (a URL, no key). Machines A and B are two clones, each with its own
HOME, git identity and DVC cache (``cache.dir`` in its global DVC config), each running one of
the pool's two workers (``llm stack up --workdir``). A deploys the spam pipeline to the pool with
the git remote as the code source (``pipelines.deploy --source``): a run clones it wherever its
worker is. Two runs created through the API as the UI's *Custom run* creates them (different
params overrides and experiment names) run at the same time on the two workers and complete,
log to the MLflow server with test metrics, push outputs + run cache to the bucket and the
experiments' refs to the git remote. Machine C, a fresh clone, sees both with ``dvc exp pull`` +
``dvc exp show`` and gets one's models with ``dvc pull``. Then the registry on the same server:
two promotions at once leave ``@champion`` right, and ``llm serve`` serves the champion from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.repo_copy import GIT, REPO, copy_repo
from tests.stack_helpers import Stack, llm_stack, running_stack

MIRROR = Path(os.environ.get("LLMPIPE_MIRROR") or REPO.parent / "shared" / "data")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found")]

POOL = "llm-process"
DEPLOYMENT = f"llm-pipeline/spam-{POOL}"
# Two Custom runs: a params override and an experiment name each.
RUNS = {"team-lr-small": {"finetune_classifier.lr": 1e-4}, "team-lr-large": {"finetune_classifier.lr": 2e-3}}


@dataclass
class Team:
    stack: Stack
    root: Path
    origin: Path
    envs: dict[str, dict[str, str]]  # machine name -> its environment (HOME, caches, stack exports)
    deploy_output: str


def machine_env(stack: Stack, home: Path) -> dict[str, str]:
    """A "machine": its own HOME (git identity, DVC's global config with its own cache), the
    stack's exports, the offline mirror."""
    home.mkdir(parents=True, exist_ok=True)
    env = stack.client_env(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        LLMPIPE_MIRROR=str(MIRROR),
        LLMCORE_GPT2_ENCODING_DIR=str(MIRROR / "gpt2"),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    )
    (home / ".gitconfig").write_text(f"[user]\n\tname = {home.name}\n\temail = {home.name}@example.invalid\n")
    sh([sys.executable, "-m", "dvc", "config", "--global", "cache.dir", str(home / "dvc-cache")], home, env)
    return env


def sh(
    argv: list[str], cwd: Path, env: dict[str, str], check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def dvc(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], cwd, env)


def publish_main(stack: Stack, root: Path, origin: Path, env: dict[str, str]) -> None:
    """The team's main branch: the tiny repo copy with the stack's bucket as the committed default
    DVC remote (endpoint and region only: keys come from each machine's AWS_* variables)."""
    seed = copy_repo(root / "seed", remote=root / "unused-local-remote")
    bucket = "s3://dvc-store/llm-pipeline"
    dvc("remote", "add", "-f", "-d", "stack", bucket, cwd=seed, env=env)
    dvc("remote", "modify", "stack", "endpointurl", stack.env["AWS_ENDPOINT_URL"], cwd=seed, env=env)
    dvc("remote", "modify", "stack", "region", "us-east-1", cwd=seed, env=env)
    assert stack.env["AWS_SECRET_ACCESS_KEY"] not in (seed / ".dvc" / "config").read_text()
    sh([*GIT, "commit", "-q", "-am", "team remote: the stack's bucket"], seed, env)
    sh([*GIT, "remote", "add", "origin", str(origin)], seed, env)
    sh([*GIT, "push", "-q", "origin", "HEAD:refs/heads/main"], seed, env)


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    root = tmp_path_factory.mktemp("team")
    stacks = running_stack(workers=0)  # its workers start below, one per machine's clone
    stack = next(stacks)
    directory = stack.dir
    try:
        origin = root / "origin.git"
        sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], root, stack.client_env())
        envs = {name: machine_env(stack, root / f"home-{name}") for name in "abc"}
        publish_main(stack, root, origin, envs["a"])
        for count, name in enumerate("ab", start=1):  # worker 1 on machine A, worker 2 on machine B
            sh(["git", "clone", "-q", str(origin), str(root / name)], root, envs[name])
            llm_stack(directory, "up", "--workers", str(count), "--workdir", str(root / name), env=envs[name])
        deployed = sh(
            [
                sys.executable,
                "-m",
                "pipelines.deploy",
                "--pool",
                POOL,
                "--flow",
                "spam",
                "--offline",
                "--source",
                str(origin),
            ],
            root / "a",
            envs["a"],
            timeout=300,
        )
        yield Team(stack, root, origin, envs, deployed.stdout)
    finally:
        stacks.close()  # `llm stack down`, and the directory removed


@pytest.fixture(scope="module")
def prefect_client(team: Team):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: team.stack.env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def runs(team: Team, prefect_client) -> list:
    """The two Custom runs, created at once through the API, waited for."""
    from tests.test_serve_deployment import create_run, wait_final

    ids = [
        create_run(prefect_client, DEPLOYMENT, {"params": params, "experiment": name}) for name, params in RUNS.items()
    ]
    return wait_final(prefect_client, ids, team.stack.dir / "logs" / f"{POOL}-worker-2.log")


def worker_logs(team: Team) -> str:
    return "\n".join(
        path.read_text()[-3000:] for path in sorted((team.stack.dir / "logs").glob(f"{POOL}-worker-*.log"))
    )


def test_two_api_runs_on_two_workers_run_at_once_and_complete(team: Team, runs: list) -> None:
    assert f"code from {team.origin}" in team.deploy_output and "DVC_EXP_AUTO_PUSH" in team.deploy_output, (
        team.deploy_output
    )
    # A str message: pytest shortens any other object's repr, and with it the stage's error line.
    assert all(run.state.is_completed() for run in runs), "\n\n".join(
        [f"{run.name}: {run.state.type.value}: {run.state.message}" for run in runs] + [worker_logs(team)]
    )
    first, second = runs
    assert first.start_time < second.end_time and second.start_time < first.end_time  # they ran at the same time
    # Each worker takes one run at a time (--limit 1): one run each, worker 1 on A, worker 2 on B.
    logs = [(team.stack.dir / "logs" / f"{POOL}-worker-{i}.log").read_text() for i in (1, 2)]
    assert sorted(runs_executed(log, runs) for log in logs) == [1, 1], worker_logs(team)


def runs_executed(worker_log: str, runs: list) -> int:
    """The runs a worker executed: it logged their submission and did not abort it. Both workers
    may try to claim the same scheduled run; the one that loses logs "submitting flow run" and
    then "Aborted submission of flow run" with its id (prefect.workers.base)."""
    return sum(
        f"submitting flow run '{run.id}'" in worker_log
        and f"Aborted submission of flow run '{run.id}'" not in worker_log
        for run in runs
    )


def test_both_runs_are_on_the_mlflow_server_with_test_metrics(team: Team, runs: list) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=team.stack.env["MLFLOW_TRACKING_URI"])
    ids = [exp.experiment_id for exp in client.search_experiments()]
    for name in RUNS:
        found = client.search_runs(ids, filter_string=f"attributes.run_name = '{name}'")
        tested = {key: value for run in found for key, value in run.data.metrics.items() if key.startswith("test_")}
        assert "test_accuracy" in tested, (name, [(run.info.run_name, sorted(run.data.metrics)) for run in found])


def test_a_third_clone_sees_both_experiments_and_pulls_the_models(team: Team, runs: list) -> None:
    env = team.envs["c"]
    repo = team.root / "c"
    sh(["git", "clone", "-q", str(team.origin), str(repo)], team.root, env)
    dvc("exp", "pull", "origin", *RUNS, cwd=repo, env=env)
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo, env=env).stdout)
    experiments = {
        exp["name"]: exp["revs"][0]["data"] for rev in shown for exp in rev.get("experiments") or [] if exp.get("name")
    }
    for name, params in RUNS.items():
        assert name in experiments, sorted(experiments)
        data = experiments[name]
        assert data["params"]["params.yaml"]["data"]["finetune_classifier"]["lr"] == params["finetune_classifier.lr"]
        assert isinstance(data["metrics"]["metrics/spam.json"]["data"]["test_accuracy"], float), data["metrics"]
    # The experiment as a branch (`dvc exp apply` would check out every output dvc.yaml names, and
    # fail on the stages the spam pipeline did not run), then its models from the stack's bucket.
    chosen = next(iter(RUNS))
    dvc("exp", "branch", chosen, f"exp-{chosen}", cwd=repo, env=env)
    sh([*GIT, "checkout", "-q", f"exp-{chosen}"], repo, env)
    pulled = dvc("pull", "--with-deps", "score_spam", "baseline_spam", cwd=repo, env=env)
    assert (repo / "models" / "spam_classifier" / "config.json").is_file(), pulled.stdout
    status = dvc("status", "score_spam", "baseline_spam", cwd=repo, env=env)
    assert "up to date" in status.stdout, status.stdout


def test_concurrent_promotions_on_the_stack_server_keep_the_right_champion(
    team: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_registry import race

    uri = team.stack.env["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    champion, best, log = race(tmp_path, uri, "team-race", lock=True)
    assert champion == best, log


def test_llm_serve_serves_the_champion_from_the_server_registry(team: Team, runs: list) -> None:
    import mlflow

    from tests.serve_helpers import serve_process

    uri = team.stack.env["MLFLOW_TRACKING_URI"]
    champion = mlflow.MlflowClient(tracking_uri=uri).get_model_version_by_alias("spam-classifier", "champion")
    env = {**team.envs["c"], "MLFLOW_TRACKING_URI": uri}
    with serve_process(
        "--model",
        "models:/spam-classifier@champion",  # the command: served as the classifier
        encoding_dir=MIRROR / "gpt2",
        env=env,
    ) as url:
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        answer = httpx.post(f"{url}/v1/classify", json={"input": "WINNER! Claim your free prize now"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert [card["kind"] for card in models["data"]] == ["classifier"], models
    (classified,) = answer.json()["data"]
    assert classified["label"] in classified["probabilities"] and len(classified["probabilities"]) == 2, classified
    assert champion.version  # the alias the scoring stages set on the server is what was served
