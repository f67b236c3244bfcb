"""dvc.yaml's code deps cannot drift: each stage lists exactly the Python files its command imports
(scripts/dvc_deps.py reads the closure; ``python -m scripts.dvc_deps --write`` fixes dvc.yaml)."""

from __future__ import annotations

import pytest

from scripts.dvc_deps import code_deps_drift, import_closure, sections_read, stage_module, stages


@pytest.mark.parametrize("name", sorted(stages()))
def test_a_stages_code_deps_are_exactly_what_its_command_imports(name: str) -> None:
    missing, stale = code_deps_drift(name, stages()[name])
    fix = "run `python -m scripts.dvc_deps --write`"
    assert not missing, f"dvc.yaml stage {name} runs code it does not list in deps: {missing}; {fix}"
    assert not stale, f"dvc.yaml stage {name} lists code it never imports (needless reruns): {stale}; {fix}"


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_params_section_a_stage_reads_is_in_its_dvc_params(name: str) -> None:
    """Else changing that section would not re-run the stage: a silent knob."""
    stage = stages()[name]
    listed = {entry.split(".")[0] if isinstance(entry, str) else next(iter(entry)) for entry in stage.get("params", [])}
    read = set(sections_read(stage_module(stage)))
    assert read <= listed, f"dvc.yaml stage {name} reads params {sorted(read - listed)} it does not list"


def test_the_closure_follows_deferred_and_package_imports() -> None:
    closure = import_closure("steps.score_spam")
    assert "llmpipe/registry.py" in closure  # imported inside a function of llmpipe/tracking.py
    assert "llmcore/__init__.py" in closure  # a package's __init__ with code runs on import
    assert "llmcore/classifier.py" in closure and "steps/pretrain.py" not in closure
    assert "llmpipe/__init__.py" not in closure  # a docstring only
