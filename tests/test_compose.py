"""docker-compose.yml, Dockerfile and .env.example agree with the code (no Docker engine needed): services and their
build targets exist, every service has a health check and a restart policy, health-check URLs are routes of the
app, every ECHO4O_* name is a setting, volumes are declared, GPU workers reserve a GPU and serve their queues."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from dotenv import dotenv_values

from echo4o.jobs import QUEUE_OF_KIND
from echo4o.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PREFIX = Settings.model_config["env_prefix"]
SETTING_NAMES = {f"{PREFIX}{name}".upper() for name in Settings.model_fields}
ENV_NAME = re.compile(r"\bECHO4O_[A-Z0-9_]+\b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def dockerfile_targets() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE | re.IGNORECASE))


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else list(command)


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def test_the_stack_has_its_services(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "postgres", "gateway", "worker", "train-worker", "ui", "flower"} <= set(services)
    assert command_of(services["gateway"])[:2] == ["echo4o", "serve"]
    assert command_of(services["ui"])[:2] == ["echo4o", "ui"]
    assert services["flower"]["profiles"] == ["monitoring"]  # optional


def test_every_service_has_a_health_check_and_a_restart_policy(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: no health check"
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), f"{name}: no restart policy"


def test_builds_name_existing_contexts_and_dockerfile_targets(services: dict[str, dict[str, Any]]) -> None:
    targets = dockerfile_targets()
    assert {"cpu", "gpu"} <= targets
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert {"gateway", "worker", "train-worker", "ui"} <= set(built)
    for name, build in built.items():
        build = {"context": build} if isinstance(build, str) else build
        context = ROOT / build.get("context", ".")
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        assert build.get("target") in targets, f"{name}: target {build.get('target')!r} not in the Dockerfile"
    assert built["gateway"]["target"] == "cpu" and built["worker"]["target"] == "gpu"


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    text = (ROOT / "Dockerfile").read_text()
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    sources = [src for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE) for src in line.split()[:-1]
               if not src.startswith("--")]
    assert {"pyproject.toml", "README.md", "echo4o", "backend", "worker", "frontend_gradio"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not any(fnmatch.fnmatch(src, pattern) for pattern in ignored), f"COPY {src}: excluded by .dockerignore"
    assert "xformers" in (ROOT / "pyproject.toml").read_text() and 'pip install ".[gpu]"' in text


def test_gpu_workers_reserve_a_gpu_and_serve_their_queues(services: dict[str, dict[str, Any]]) -> None:
    queues = {}
    for name, service in services.items():
        command = command_of(service)
        if command[:2] == ["echo4o", "worker"]:
            assert gpu_devices(service), f"{name}: a worker without an NVIDIA GPU reservation"
            queues[name] = set(command[command.index("--queues") + 1].split(","))
            volumes = [v.split(":")[1] for v in service.get("volumes", [])]
            assert {"/data", "/weights", "/hf-cache"} <= set(volumes), f"{name}: volumes {volumes}"
    assert queues["worker"] == {"gpu"} and queues["train-worker"] == {"train"}
    assert set().union(*queues.values()) == set(QUEUE_OF_KIND.values())  # every queue has a worker


def test_redis_keeps_an_append_only_file_and_postgres_a_volume(compose: dict[str, Any]) -> None:
    redis, postgres = compose["services"]["redis"], compose["services"]["postgres"]
    command = command_of(redis)
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])


def test_named_volumes_are_declared_and_bind_mounts_exist(services: dict[str, dict[str, Any]],
                                                          compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared"


def test_every_echo4o_name_is_a_setting(compose: dict[str, Any]) -> None:
    text = (ROOT / "docker-compose.yml").read_text() + (ROOT / "Dockerfile").read_text()
    unknown = set(ENV_NAME.findall(text)) - SETTING_NAMES
    assert not unknown, f"not settings of echo4o/settings.py: {sorted(unknown)}"
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        names = env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        for var in names:
            assert not var.startswith(PREFIX) or var in SETTING_NAMES, f"{name}: {var}"


def test_env_example_lists_only_settings_and_they_validate(tmp_path: Path) -> None:
    values = dotenv_values(ROOT / ".env.example")
    assert values, ".env.example is empty"
    assert set(values) <= SETTING_NAMES, f"not settings: {sorted(set(values) - SETTING_NAMES)}"
    assert {"ECHO4O_MODEL", "ECHO4O_HF_TOKEN", "ECHO4O_PUBLIC_URL", "ECHO4O_UI_API_KEY"} <= set(values)
    settings = Settings(_env_file=ROOT / ".env.example")  # the example, as written, is a valid configuration
    assert settings.auth == "keys"


def _routes() -> set[str]:
    """Every GET path the gateway serves (its OpenAPI paths: included routers are listed there)."""
    from backend.app import create_app

    return {path for path, ops in create_app().openapi()["paths"].items() if "get" in ops}


def test_health_checks_call_routes_that_exist(services: dict[str, dict[str, Any]]) -> None:
    routes = _routes()
    gateway_port = services["gateway"]["environment"]["ECHO4O_PORT"]
    test = services["gateway"]["healthcheck"]["test"]
    url = next(arg for arg in test if arg.startswith("http"))
    match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/\S*)", url)
    assert match and match.group(1) == str(gateway_port), url
    assert match.group(2) in routes and match.group(2) in ("/healthz", "/readyz")
    assert services["worker"]["healthcheck"]["test"][1:4] == ["echo4o", "healthcheck", "worker"]
    ui_test = services["ui"]["healthcheck"]["test"]
    assert f":{services['ui']['environment']['ECHO4O_UI_PORT']}/" in ui_test[-1]
    # the Dockerfile's own checks: the same gateway route, the same worker command
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "http://127.0.0.1:8000/healthz" in dockerfile and '"echo4o", "healthcheck", "worker"' in dockerfile


def test_health_check_commands_are_commands_of_the_cli() -> None:
    import typer.main

    from echo4o.cli import app

    group = typer.main.get_command(app)
    assert {"worker", "url"} <= set(group.commands["healthcheck"].commands)
