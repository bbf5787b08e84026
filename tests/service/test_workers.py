"""`accubooks api --workers N`: several processes serve one port (each its own event loop),
/metrics adds every process's series up, and SIGTERM drains them all and exits 0, with
Redis (and the memory tier's subscription) too."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx2
import pytest
import redis

from infra.settings import Settings
from tests.service.processes import api_process
from tests.service.test_cli import PROJECT_ROOT, cli_env
from tests.services import unavailable

SHARED_REDIS = "redis://127.0.0.1:6379/0"

WORKERS = 2
REQUESTS = 40
EXIT_BOUND_S = 15.0
ROUTE_COUNT = 'accubooks_request_duration_seconds_count{method="GET",route="/health/live"'


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def live_requests(metrics: str) -> int:
    return round(
        sum(float(row.split()[-1]) for row in metrics.splitlines() if row.startswith(ROUTE_COUNT))
    )


@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
def test_workers_share_the_port_add_up_their_metrics_and_drain_on_sigterm(
    settings: Settings, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "ACCUBOOKS_LOG_LEVEL": "WARNING",
        "ACCUBOOKS_SHUTDOWN_DRAIN_S": "0.5",
    }
    with api_process(settings, tmp_path / "api.log", env, ["--workers", str(WORKERS)]) as api:
        workers = children_of(api.pid)
        assert len(workers) == WORKERS, workers
        for _ in range(REQUESTS):
            # A connection each, so the kernel spreads them over the workers' accepts.
            assert httpx2.get(api.url + "/health/live", timeout=10).status_code == 200
        # Every worker wrote its own series; any of them answers the sum.
        assert len(list(metrics_dir.glob("histogram_*.db"))) >= 1
        scraped = [httpx2.get(api.url + "/metrics", timeout=10).text for _ in range(4)]
        assert all(live_requests(text) == REQUESTS for text in scraped), [
            live_requests(text) for text in scraped
        ]

        api.process.send_signal(signal.SIGTERM)
        assert api.process.wait(timeout=EXIT_BOUND_S) == 0
        for worker in workers:
            assert not Path(f"/proc/{worker}").exists() or _is_zombie(worker)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
def test_workers_without_a_metrics_directory_are_refused(settings: Settings) -> None:
    env = {k: v for k, v in cli_env(settings).items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "api", "--port", "0", "--workers", "2"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "PROMETHEUS_MULTIPROC_DIR" in done.stderr


@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
def test_an_api_on_redis_exits_0_soon_after_sigterm(settings: Settings, tmp_path: Path) -> None:
    """With Redis, each process also holds the bumps' subscription (the memory tier's
    feed): stopping it must not hold the shutdown (it once waited forever)."""
    try:
        redis.Redis.from_url(SHARED_REDIS, socket_timeout=2).ping()
    except redis.RedisError as e:
        unavailable("Redis", e)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "ACCUBOOKS_LOG_LEVEL": "WARNING",
        "REDIS_URL": SHARED_REDIS,
        "ACCUBOOKS_CACHE_PREFIX": f"test-{uuid.uuid4().hex[:12]}:",
    }
    with api_process(settings, tmp_path / "api.log", env, ["--workers", str(WORKERS)]) as api:
        for _ in range(REQUESTS):
            assert httpx2.get(api.url + "/health/ready", timeout=10).status_code == 200
        api.process.send_signal(signal.SIGTERM)
        assert api.process.wait(timeout=EXIT_BOUND_S) == 0
