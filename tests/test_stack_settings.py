"""`llm stack` settings without servers: secrets from the environment or generated once into a
0600 file, ports from flags / environment / the saved stack, and one-line errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from stack.cli import build_parser, config_for_up
from stack.settings import StackError, load_config, load_secrets


def test_missing_secrets_are_generated_once_into_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("POSTGRES_PASSWORD", "POSTGRES_ADMIN_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY"):
        monkeypatch.delenv(f"LLM_STACK_{name}", raising=False)
    monkeypatch.setenv("LLM_STACK_S3_SECRET_KEY", "from-the-environment")
    first = load_secrets(tmp_path, create=True)
    assert first.s3_secret_key == "from-the-environment"
    path = tmp_path / "secrets.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "from-the-environment" not in path.read_text()  # a secret given by the environment is not copied
    assert load_secrets(tmp_path) == first  # read back, not generated again
    assert len({first.postgres_password, first.postgres_admin_password, first.s3_access_key}) == 3


def test_env_without_a_stack_is_one_line_naming_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_STACK_POSTGRES_ADMIN_PASSWORD", raising=False)
    with pytest.raises(StackError, match=r"no stack at .*stack\.json is missing"):
        load_config(tmp_path)
    with pytest.raises(StackError, match="LLM_STACK_POSTGRES_ADMIN_PASSWORD is not set"):
        load_secrets(tmp_path)


def test_ports_come_from_flags_then_environment_then_the_saved_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_STACK_MLFLOW_PORT", "5055")
    args = build_parser("llm stack").parse_args(["up", "--s3-port", "0", "--workers", "3"])
    config = config_for_up(args, tmp_path)
    assert config.ports["mlflow"] == 5055 and config.ports["postgres"] == 15432 and config.workers == 3
    config.assign_free_ports()
    assert config.ports["s3"] > 0 and len(config.weed_ports) == 7
    config.save()
    monkeypatch.delenv("LLM_STACK_MLFLOW_PORT")
    again = config_for_up(build_parser("llm stack").parse_args(["up", "--s3-port", "0"]), tmp_path)
    assert again.ports == config.ports and again.weed_ports == config.weed_ports  # 0 keeps the chosen port


def test_a_bad_port_in_the_environment_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_STACK_PREFECT_PORT", "forty-two")
    with pytest.raises(StackError, match="LLM_STACK_PREFECT_PORT='forty-two': expected an integer"):
        config_for_up(build_parser("llm stack").parse_args(["up"]), tmp_path)
