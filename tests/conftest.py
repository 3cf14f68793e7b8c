"""Shared fixtures. No test reaches the network: the hub is forced offline here."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The decoded-data cache (trainables.cache) of the whole session under the test tmp,
    never the home folder's; set before any Ray starts, so its workers inherit it."""
    from trainables.cache import CACHE_ENV

    folder = tmp_path_factory.mktemp("data-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(autouse=True)
def mlflow_credentials() -> Iterator[None]:
    """MLflow's credential variables as they were before each test: connecting to a store
    whose URI carries credentials sets them for the process (``tune_alr.credentials``),
    and a later test, or a process it starts, would inherit another test's."""
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    saved = {name: os.environ.pop(name, None) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One Ray instance for the whole session (2 CPUs), its files under the test tmp,
    started as the runner starts a user's (on loopback only)."""
    from tune_alr.runner import ray_session as start

    temp_dir = tmp_path_factory.mktemp("ray")
    with start(num_cpus=2, _temp_dir=str(temp_dir)):
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets (../shared/data or TUNE_ALR_DATA_DIR); skips where absent."""
    candidates = [os.environ.get("TUNE_ALR_DATA_DIR"), Path(__file__).parents[2] / "shared/data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    pytest.skip("real datasets not present (set TUNE_ALR_DATA_DIR or place ../shared/data)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for servers tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
