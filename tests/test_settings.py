from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import DEFAULT_MODEL_DIR, Settings, SettingsError


def test_defaults_need_nothing() -> None:
    s = Settings.from_env({})
    assert s.model_dir == DEFAULT_MODEL_DIR and s.redis_url is None and s.workers == 1 and s.port == 8000


def test_environment_is_parsed_and_typed() -> None:
    s = Settings.from_env(
        {
            "MODEL_DIR": "/m",
            "REDIS_URL": "redis://r:6379/1",
            "WEB_CONCURRENCY": "3",
            "PORT": "9000",
            "MAX_TOKENS_LIMIT": "50",
            "BATCHING": "false",
            "QUANTIZE": "int8",
            "LOG_LEVEL": "debug",
            "TORCH_THREADS": "",
        }
    )
    assert s.model_dir == Path("/m") and s.workers == 3 and s.port == 9000 and s.max_tokens_limit == 50
    assert s.batching is False and s.quantize == "int8" and s.log_level == "DEBUG" and s.torch_threads == 0


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"PORT": "http"}, "PORT"),
        ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
        ({"QUANTIZE": "int4"}, "QUANTIZE"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"SESSION_TTL_SECONDS": "-5"}, "SESSION_TTL_SECONDS"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        Settings.from_env(env)


def test_threads_split_the_cores() -> None:
    assert Settings(workers=2).effective_torch_threads(cpu_count=4) == 2
    assert Settings(workers=8).effective_torch_threads(cpu_count=2) == 1
    assert Settings(torch_threads=3).effective_torch_threads(cpu_count=2) == 3


def test_bad_model_dir_is_a_settings_error(tmp_path: Path) -> None:
    from service import create_app

    with pytest.raises(SettingsError, match="MODEL_DIR=.*does not exist"):
        create_app(Settings(model_dir=tmp_path / "missing"))
    with pytest.raises(SettingsError, match="no REDIS_URL"):
        create_app(Settings(workers=2))
