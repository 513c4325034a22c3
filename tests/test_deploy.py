"""Deployment files: no Docker engine here, so check they parse and say what the README says."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from invoice_worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def test_compose_services() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "worker", "flower", "sandbox"}
    assert "--appendonly" in services["redis"]["command"]
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["sandbox"]["profiles"] == ["sandbox"]
    assert "sandbox" in services["sandbox"]["command"]
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"]


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
    assert set(processes) == {"worker", "flower"}
    assert "--port=$PORT" in processes["flower"]


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
