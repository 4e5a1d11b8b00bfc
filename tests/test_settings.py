from pathlib import Path

import pytest
from pydantic import ValidationError

from echo4o.settings import DEFAULT_MODEL, Settings, get_settings, is_loopback, mask_url_password


def test_defaults_are_sensible(data_dir: Path) -> None:
    s = get_settings()
    assert s.model == DEFAULT_MODEL
    assert s.data_dir == data_dir
    assert s.database_url == f"sqlite:///{data_dir / 'echo4o.db'}"
    assert s.embedded_broker
    assert s.auth == "keys"
    assert s.model_version == "Echo-4o"


def test_env_prefix_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO4O_DTYPE", "bfloat16")
    monkeypatch.setenv("ECHO4O_DEVICE", "CUDA:1")
    monkeypatch.setenv("ECHO4O_BROKER_URL", "redis://localhost:6379/0")
    s = Settings()
    assert s.dtype == "bfloat16"
    assert s.device == "cuda:1"
    assert not s.embedded_broker


@pytest.mark.parametrize(
    ("var", "value"),
    [("ECHO4O_DTYPE", "float7"), ("ECHO4O_DEVICE", "tpu"), ("ECHO4O_PORT", "70000"), ("ECHO4O_AUTH", "maybe")],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert info.value.errors()[0]["loc"] == (var.removeprefix("ECHO4O_").lower(),)


def test_open_mode_refused_on_public_bind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO4O_AUTH", "off")
    s = Settings()
    s.check_bind("127.0.0.1")
    s.check_bind("::1")
    s.check_bind("localhost")
    with pytest.raises(ValueError, match="ECHO4O_AUTH=off"):
        s.check_bind("0.0.0.0")
    monkeypatch.setenv("ECHO4O_AUTH", "keys")
    Settings().check_bind("0.0.0.0")


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO4O_HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("ECHO4O_DATABASE_URL", "postgresql://app:pw123@db:5432/echo")
    masked = Settings().masked()
    assert masked["hf_token"] == "********"
    assert masked["database_url"] == "postgresql://app:****@db:5432/echo"
    assert "hf_secret_value" not in str(masked) and "pw123" not in str(masked)


def test_helpers() -> None:
    assert is_loopback("127.0.0.5") and not is_loopback("10.0.0.1") and not is_loopback("example.org")
    assert mask_url_password("redis://localhost:6379/0") == "redis://localhost:6379/0"
