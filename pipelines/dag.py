"""The stage graph, read from dvc.yaml through DVC itself, and the order to run stages in.

DVC's index graph points from a stage to the stages it depends on; we reverse it so edges
run upstream -> downstream and a topological sort is an execution order. Ties keep dvc.yaml's
order, so runs are reproducible and read like the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import networkx as nx

# Each named pipeline is its final stages plus everything upstream of them in dvc.yaml.
PIPELINES: dict[str, list[str] | None] = {
    "all": None,  # every stage in dvc.yaml
    "pretrain": ["evaluate"],
    "spam": ["score_spam", "baseline_spam"],  # the GPT classifier and its baseline, on the same split
    "instructions": ["score_instructions", "score_preference", "score_instructions_dpo"],  # SFT -> DPO -> scoring
}


class PipelineError(RuntimeError):
    """The requested pipeline does not match dvc.yaml, or a stage failed."""


def read_dag(repo_dir: str | os.PathLike = ".") -> nx.DiGraph:
    """dvc.yaml's command stages as a graph of stage addresses, edges upstream -> downstream."""
    from dvc.repo import Repo  # heavy import, only where the graph is needed

    with Repo(os.fspath(repo_dir)) as repo:
        stage_graph = repo.index.graph
        dag = nx.DiGraph()
        for stage in stage_graph:  # dvc.yaml order
            if getattr(stage, "cmd", None):
                dag.add_node(address(stage, repo.root_dir))
        for dependent, dependency in stage_graph.edges:
            if address(dependent, repo.root_dir) in dag and address(dependency, repo.root_dir) in dag:
                dag.add_edge(address(dependency, repo.root_dir), address(dependent, repo.root_dir))
    return dag


def address(stage, root: str) -> str:
    """The stage's address as ``dvc repro`` run in ``root`` takes it (DVC's own ``addressing`` is
    relative to the current directory, which is not the repository for a run in a workspace)."""
    where = os.path.relpath(stage.path, root)
    name = getattr(stage, "name", None)
    if not name:
        return where
    return name if where == "dvc.yaml" else f"{where}:{name}"


def execution_order(dag: nx.DiGraph, targets: Iterable[str] | None = None) -> list[str]:
    """The targets and everything upstream of them (all stages if None), upstream first."""
    if targets is None:
        wanted = set(dag)
    else:
        wanted = set()
        for target in targets:
            if target not in dag:
                raise PipelineError(f"stage {target!r} is not in dvc.yaml (stages: {', '.join(dag)})")
            wanted |= {target, *nx.ancestors(dag, target)}
    position = {name: i for i, name in enumerate(dag)}
    return list(nx.lexicographical_topological_sort(dag.subgraph(wanted), key=position.__getitem__))
