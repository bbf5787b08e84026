"""GET /metrics on both backends: request durations by route template, method and status
(never a raw path), shed requests and timeouts counted, projection lag (events and
seconds) and forecast queue depth measured at scrape time, a bounded answer without the
database gauges when PostgreSQL is gone, and real `accubooks api` processes sharing
PROMETHEUS_MULTIPROC_DIR whose scrapes each add up the requests of both."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import msgspec
import psycopg
import pytest
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Match
from starlette.testclient import TestClient

from commands.context import Collaborators
from infra.clock import utc_now
from infra.eventstore import EventLog, open_event_log
from infra.settings import Settings
from service import metrics, wiring
from service.app import create_app
from tests.conftest import Tenant, command_headers, make_tenant, scenario_body
from tests.service.processes import api_process
from tests.service.test_shedding import DEADLINE_S, get, held_create, wait_until_shed
from tests.services import ADMIN_URL, postgres_database, serving

DURATION = "accubooks_request_duration_seconds"
# A route label: a path template (parameters in braces, no ids) or "unmatched".
TEMPLATE = re.compile(r"unmatched|(/[a-z_.-]+|/\{[a-z_]+\})+")
PROJECTIONS = [projector.name for projector in wiring.projectors()]
SETTLE_S = 10.0


class Scrape:
    """One /metrics answer, parsed: every sample by name and labels."""

    def __init__(self, response: httpx2.Response) -> None:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain; version=")
        self.text = response.text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a series not (yet) present, as Prometheus counts."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str) -> bool:
        return any(sample_name == name for sample_name, _ in self.samples)

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for n, labels in self.samples if n == name}

    def requests(self, route: str, status: int, method: str = "GET") -> float:
        return self.value(f"{DURATION}_count", route=route, method=method, status=str(status))


def scrape(client: TestClient) -> Scrape:
    return Scrape(client.get("/metrics"))


def test_request_durations_are_counted_by_route_template_method_and_status(
    client: TestClient, tenant: Tenant
) -> None:
    reader = {"Authorization": f"Bearer {tenant.reader}"}
    unknown = uuid.uuid4()
    before = scrape(client)

    for _ in range(3):
        assert client.get("/api/scenarios", headers=reader).status_code == 200
    for _ in range(2):
        assert client.get(f"/api/scenarios/{unknown}", headers=reader).status_code == 404
    assert client.get(f"/no/such/route/{unknown}").status_code == 404
    assert client.post("/health/live").status_code == 405
    assert client.get("/health/live").status_code == 200
    after = scrape(client)

    def added(route: str, status: int, method: str = "GET") -> float:
        return after.requests(route, status, method) - before.requests(route, status, method)

    assert added("/api/scenarios", 200) == 3
    assert added("/api/scenarios/{scenario_id}", 404) == 2
    assert added("unmatched", 404) == 1
    assert added("/health/live", 405, method="POST") == 1
    assert added("/health/live", 200) == 1
    # Route templates only: an id in a path never becomes a series.
    assert str(unknown) not in after.text
    assert "/no/such/route" not in after.text
    # (The series are the process's, so other tests' routes may be there too.)
    for route in after.label_values(f"{DURATION}_count", "route"):
        assert TEMPLATE.fullmatch(route), route
    # Buckets from 1 ms (the read target is a few ms) to 10 s; +Inf holds every request.
    labels = {"route": "/api/scenarios", "method": "GET", "status": "200"}
    assert after.label_values(f"{DURATION}_bucket", "le") >= {"0.001", "0.005", "10.0", "+Inf"}
    assert after.value(f"{DURATION}_bucket", le="+Inf", **labels) == after.value(
        f"{DURATION}_count", **labels
    )
    assert after.value(f"{DURATION}_sum", **labels) > 0


def test_shed_requests_are_counted_and_timed_under_their_route(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    in_flight = 2
    limited = msgspec.structs.replace(settings, max_in_flight=in_flight)
    read = {"Authorization": f"Bearer {tenant.reader}"}
    release = threading.Event()
    sent = threading.Semaphore(0)
    with serving(create_app(limited, event_log=event_log)) as base_url:

        def create() -> httpx2.Response:
            return held_create(base_url, tenant.writer, release, sent)

        before = Scrape(get(base_url, "/metrics"))
        with ThreadPoolExecutor(max_workers=in_flight) as pool:
            held = [pool.submit(create) for _ in range(in_flight)]
            try:
                for _ in range(in_flight):
                    assert sent.acquire(timeout=DEADLINE_S), "a held request never started"
                shed = [wait_until_shed(base_url, read), get(base_url, "/api/scenarios", read)]
                # /metrics is never shed: it answers while the process is overloaded.
                during = Scrape(get(base_url, "/metrics"))
            finally:
                release.set()
            created = [future.result(timeout=DEADLINE_S) for future in held]

    assert [r.status_code for r in shed] == [503, 503]
    assert [r.status_code for r in created] == [201] * in_flight
    shed_total = "accubooks_shed_requests_total"
    assert during.value(shed_total) - before.value(shed_total) == 2
    # Shed before the router ever saw them, yet timed under their route's template.
    assert during.requests("/api/scenarios", 503) - before.requests("/api/scenarios", 503) == 2


def test_operation_timeouts_are_counted_by_operation(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    hasty = msgspec.structs.replace(settings, read_your_writes_timeout_s=0.2)
    # In the log (the tenant's events) but never projected: nothing projects here.
    ahead = str(event_log.position())
    name = "accubooks_timeouts_total"
    with TestClient(create_app(hasty, event_log=event_log)) as client:
        before = scrape(client)
        response = client.get(
            "/api/dashboard",
            headers={"Authorization": f"Bearer {tenant.reader}", "X-Consistency-Token": ahead},
        )
        after = scrape(client)

    assert response.status_code == 503, response.text
    assert response.json()["error"]["operation"] == "read_your_writes"
    assert (
        after.value(name, operation="read_your_writes")
        - before.value(name, operation="read_your_writes")
        == 1
    )


def test_projection_lag_and_queue_depth_are_measured_at_scrape_time(
    settings: Settings, event_log: EventLog, tenant: Tenant
) -> None:
    # No projection workers: every event of the tenant is still to be applied.
    with TestClient(create_app(settings, event_log=event_log)) as client:
        head = event_log.position()
        trailing = scrape(client)

    assert head > 0
    assert trailing.value("accubooks_database_up") == 1
    assert trailing.value("accubooks_event_log_position") == head
    assert trailing.label_values("accubooks_projection_lag_events", "projection") == set(
        PROJECTIONS
    )
    for name in PROJECTIONS:
        assert trailing.value("accubooks_projection_lag_events", projection=name) == head
        # The age of the tenant's first event, written moments ago.
        assert 0 < trailing.value("accubooks_projection_lag_seconds", projection=name) < 300
    assert trailing.value("accubooks_forecast_queue_depth") == 0

    # With the workers (and no job workers, so the forecast stays queued), once caught up.
    app = create_app(settings, event_log=event_log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        created = client.post(
            "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
        )
        assert created.status_code == 201, created.text
        queued = client.post(
            "/api/forecasts/generate",
            json={"scenarioId": created.json()["id"], "horizonMonths": 12, "paths": 100},
            headers=command_headers(tenant.writer),
        )
        assert queued.status_code == 202, queued.text
        runner = client.app.state.projections  # type: ignore[attr-defined]
        assert runner.wait_for(event_log.position(), SETTLE_S)
        caught_up = scrape(client)

    assert caught_up.value("accubooks_event_log_position") == event_log.position() > head
    for name in PROJECTIONS:
        assert caught_up.value("accubooks_projection_lag_events", projection=name) == 0
        assert caught_up.value("accubooks_projection_lag_seconds", projection=name) == 0
    assert caught_up.value("accubooks_forecast_queue_depth") == 1


@pytest.fixture
def doomed_postgres(tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    """A PostgreSQL database of its own, which the test drops while the app runs."""
    with postgres_database() as url:
        params = psycopg.conninfo.conninfo_to_dict(url)
        yield (
            str(params["dbname"]),
            Settings(
                database_url=url,
                data_dir=str(tmp_path),
                health_timeout_s=1.0,
                db_pool_timeout_s=1.0,
            ),
        )


def test_a_scrape_without_the_database_answers_in_time_without_its_gauges(
    doomed_postgres: tuple[str, Settings],
) -> None:
    name, settings = doomed_postgres
    log = open_event_log(settings)
    try:
        make_tenant(Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4))
        with TestClient(create_app(settings, event_log=log)) as client:
            assert scrape(client).value("accubooks_database_up") == 1
            with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

            started = time.monotonic()
            down = scrape(client)
            took_s = time.monotonic() - started
    finally:
        log.close()

    assert down.value("accubooks_database_up") == 0
    assert not down.has("accubooks_projection_lag_events")
    assert not down.has("accubooks_projection_lag_seconds")
    assert not down.has("accubooks_forecast_queue_depth")
    # The process's own series are still there.
    assert down.requests("/metrics", 200) >= 1
    assert took_s < settings.health_timeout_s + 2.0


def test_api_processes_sharing_a_multiprocess_dir_each_report_the_sum_of_both(
    tmp_path: Path,
) -> None:
    first_count, second_count = 3, 5
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    with postgres_database() as url:
        settings = Settings(database_url=url, data_dir=str(tmp_path / "data"))
        log = open_event_log(settings)
        try:
            tenant = make_tenant(Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4))
            head = log.position()
        finally:
            log.close()
        read = {"Authorization": f"Bearer {tenant.reader}"}
        # One after the other, so that the second does not race the first's schema setup.
        with (
            api_process(settings, tmp_path / "first.log", env) as first,
            api_process(settings, tmp_path / "second.log", env) as second,
        ):
            for count, process in ((first_count, first), (second_count, second)):
                for _ in range(count):
                    assert get(process.url, "/api/scenarios", read).status_code == 200
            scrapes = [Scrape(get(p.url, "/metrics")) for p in (first, second)]

    assert first.pid != second.pid
    for scraped in scrapes:
        assert scraped.requests("/api/scenarios", 200) == first_count + second_count
        # Scrape-time gauges come from the scraping process alone: never summed.
        for name in PROJECTIONS:
            assert scraped.value("accubooks_projection_lag_events", projection=name) == head
        assert scraped.value("accubooks_database_up") == 1
    # Each process kept its series in files of its own in the shared folder.
    assert len(list(multiproc_dir.glob("histogram_*.db"))) == 2


# The app's routes (the settings do not change them): built once, never started.
_ROUTES = create_app(Settings()).router.routes
_SEGMENTS = st.text(alphabet="abcXYZ019-_.~:@%!$", min_size=0, max_size=12)


@given(
    template=st.sampled_from([str(getattr(r, "path", "/")) for r in _ROUTES]),
    fills=st.lists(_SEGMENTS, min_size=4, max_size=4),
    suffix=st.sampled_from(["", "/", "/x", "//", "/archive"]),
)
@examples(max_examples=300, deadline=None)
def test_a_shed_request_is_timed_under_the_route_the_router_would_pick(
    template: str, fills: list[str], suffix: str
) -> None:
    """Requests shed before the router are labelled by one combined regex of the routes;
    for any path it names the route Starlette's own matching, route by route, finds."""
    path = re.sub(r"\{[^}]+\}", lambda _: fills.pop() if fills else "x", template) + suffix
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
    router_pick = next((r for r in _ROUTES if r.matches(scope)[0] is not Match.NONE), None)
    metrics._matched.clear()
    assert metrics.route_template(scope, _ROUTES) == str(
        getattr(router_pick, "path", metrics.UNMATCHED)
    )
