"""Deployment files: no Docker engine here, so check they parse and say what the README says."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from invoice_worker import cli
from invoice_worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def test_compose_services() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "worker", "flower", "callbacks", "sandbox"}
    assert "--appendonly" in services["redis"]["command"]
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["sandbox"]["profiles"] == ["sandbox"]
    assert "sandbox" in services["sandbox"]["command"]
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    # Required, with no default password to forget.
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith(
        "${FLOWER_BASIC_AUTH:?"
    )


def test_compose_variables_are_settings() -> None:
    fields = {f"INVOICE_{name.upper()}" for name in Settings.model_fields}
    for service in compose()["services"].values():
        for name in service.get("environment", {}):
            assert name in fields or name.startswith("FLOWER_"), name


def test_worker_commands_agree() -> None:
    worker = compose()["services"]["worker"]["command"]
    assert shlex.split(procfile()["worker"]) == worker
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd is not None
    assert yaml.safe_load(cmd.group(1)) == worker
    assert worker[worker.index("-Q") : worker.index("-Q") + 2] == ["-Q", "invoices"]


def test_procfile() -> None:
    processes = procfile()
    assert set(processes) == {"worker", "flower", "callbacks"}
    assert "--port=$PORT" in processes["flower"]
    assert shlex.split(processes["callbacks"]) == [
        "invoice-worker", "callbacks", "--host", "0.0.0.0", "--port", "$PORT"  # noqa: S104
    ]  # fmt: skip
    compose_callbacks = compose()["services"]["callbacks"]["command"]
    assert compose_callbacks[:2] == ["invoice-worker", "callbacks"]


def flower_commands() -> dict[str, list[str]]:
    """The deployed Flower command lines, with $PORT as the platform would set it."""
    return {
        "Procfile": shlex.split(procfile()["flower"].replace("$PORT", "5555")),
        "docker-compose.yml": compose()["services"]["flower"]["command"],
    }


def test_deployed_flower_goes_through_the_login_check() -> None:
    for where, command in flower_commands().items():
        assert command[:2] == ["invoice-worker", "flower"], where
        assert "--dev-no-auth" not in command, where
        assert not [arg for arg in command if "auth" in arg], where  # the login is in the env


class Exec(Exception):
    """What the fake os.execv raises, with the argv it was given."""


def test_deployed_flower_refuses_without_login_and_starts_with_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in [k for k in os.environ if k.startswith(("INVOICE_", "FLOWER_"))]:
        monkeypatch.delenv(name)

    def execv(path: str, argv: list[str]) -> None:
        raise Exec(argv)

    monkeypatch.setattr(os, "execv", execv)
    for where, command in flower_commands().items():
        monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
        assert cli.main(command[1:]) == cli.EXIT_CONFIG, where
        assert "FLOWER_BASIC_AUTH" in capsys.readouterr().err
        monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:s3cret")
        with pytest.raises(Exec) as executed:
            cli.main(command[1:])
        celery = [sys.executable, "-m", "celery", "-A", "invoice_worker.worker", "flower"]
        assert executed.value.args[0] == [*celery, *command[2:]], where


def test_dockerfile_is_slim_non_root_with_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "-slim" in text.splitlines()[1]
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert 'CMD ["invoice-worker", "check", "--no-provider"]' in text


def test_readme_documents_every_setting_and_service() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`INVOICE_{name.upper()}`" in readme, name
    for service in compose()["services"]:
        assert f"`{service}`" in readme, service
    assert "make run" in readme
    assert "make test" in readme
