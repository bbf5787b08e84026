"""A Hypothesis state machine drives the HTTP API with commands (create, rename with a
fresh or a stale If-Match, archive, request a forecast, replay an earlier command with
its key) and reads, on both backends, with the projection workers running in the
process. What it checks:

- each answer against a model of what the tenant did (the scenario list, the detail,
  the dashboard's counts, a stale If-Match is 409, an archived scenario refuses a
  forecast, a replay answers the stored status and body byte for byte);
- at the end of every run, the invariant that matters most: the read models equal a
  fresh replay of the log (`projections rebuild --verify`'s comparison, 0 differences).
"""

from __future__ import annotations

import json
import tempfile
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from starlette.testclient import TestClient

from commands.context import Collaborators
from infra.clock import utc_now
from infra.eventstore import open_event_log
from infra.settings import Settings
from projections import rebuild
from service import wiring
from service.app import create_app
from tests.conftest import make_tenant, scenario_body
from tests.services import SERVER_THREADS_DRAW_ON_RANDOM, postgres_database

pytestmark = SERVER_THREADS_DRAW_ON_RANDOM

CONSISTENCY = "X-Consistency-Token"
TYPES = {
    "HIRING": {"headcount": 2, "monthlyCostPerHead": "6500"},
    "COST_REDUCTION": {"percent": 10},
    "REVENUE_INCREASE": {"percent": 5},
}
names = st.text(
    alphabet=st.characters(
        min_codepoint=0x20, max_codepoint=0x24F, exclude_categories=("Cs", "Cc")
    ),
    min_size=1,
    max_size=40,
).filter(lambda s: s.strip() == s and s != "")


@dataclass
class ModelScenario:
    """What the tenant knows of one scenario: what it last set, and its version."""

    id: str
    name: str
    type: str
    version: int
    archived: bool = False
    forecasts: int = 0


@dataclass
class Sent:
    """An acknowledged command, for replays: its request and the answer it got."""

    method: str
    path: str
    key: str
    body: dict[str, Any]
    status: int
    answer: bytes
    if_match: str | None = None


@dataclass
class World:
    """The service under test for one run: a store, the API with its workers, a tenant."""

    stack: ExitStack
    settings: Settings
    client: TestClient
    writer: str
    reader: str
    token: int = 0
    sent: list[Sent] = field(default_factory=list)


class ApiMachine(RuleBasedStateMachine):
    backend = "sqlite"
    scenarios = Bundle("scenarios")

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, ModelScenario] = {}
        stack = ExitStack()
        data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="machine_"))
        if self.backend == "sqlite":
            settings_ = Settings(data_dir=data_dir, cache_enabled=False)
        else:
            url = stack.enter_context(postgres_database())
            settings_ = Settings(database_url=url, data_dir=data_dir, cache_enabled=False)
        log = open_event_log(settings_)
        stack.callback(log.close)
        tenant = make_tenant(Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4))
        app = create_app(settings_, event_log=log, run_projections=True, run_jobs=False)
        client = stack.enter_context(TestClient(app))
        self.world = World(stack, settings_, client, tenant.writer, tenant.reader)
        self.log = log

    def teardown(self) -> None:
        try:
            if self.model:
                self._the_read_models_equal_a_replay_of_the_log()
        finally:
            self.world.stack.close()

    # --- helpers -------------------------------------------------------------------------

    def _command(
        self, method: str, path: str, body: dict[str, Any], if_match: str | None = None
    ) -> httpx2.Response:
        key = uuid.uuid4().hex
        headers = {
            "Authorization": f"Bearer {self.world.writer}",
            "Content-Type": "application/json",
            "Idempotency-Key": key,
        }
        if if_match is not None:
            headers["If-Match"] = if_match
        response = self.world.client.request(method, path, json=body, headers=headers)
        assert response.status_code < 500, response.text
        if response.status_code < 300:
            self.world.token = max(self.world.token, int(response.headers[CONSISTENCY]))
            self.world.sent.append(
                Sent(method, path, key, body, response.status_code, response.content, if_match)
            )
        return response

    def _read(self, path: str) -> Any:
        response = self.world.client.get(
            path,
            headers={
                "Authorization": f"Bearer {self.world.reader}",
                CONSISTENCY: str(self.world.token),
            },
        )
        assert response.status_code == 200, (path, response.text)
        return response.json()

    def _the_read_models_equal_a_replay_of_the_log(self) -> None:
        # Every acknowledged write projected first, then the comparison.
        self._read("/api/dashboard")
        self._read("/api/scenarios?limit=1")
        report = rebuild.rebuild(
            self.world.settings, self.log, wiring.projectors(), verify=True, batch_size=50
        )
        assert report.differences == 0, [
            (p.name, [t for t in p.tables if t.differences]) for p in report.projections
        ]

    # --- commands ------------------------------------------------------------------------

    @initialize()
    def start_empty(self) -> None:
        assert self._read("/api/scenarios")["data"] == []

    @rule(target=scenarios, name=names, kind=st.sampled_from(sorted(TYPES)))
    def create(self, name: str, kind: str) -> str:
        body = scenario_body(name=name, type=kind, assumptions=TYPES[kind])
        response = self._command("POST", "/api/scenarios", body)
        assert response.status_code == 201, response.text
        created = response.json()
        assert (created["name"], created["type"], created["version"]) == (name, kind, 1)
        self.model[created["id"]] = ModelScenario(created["id"], name, kind, 1)
        return str(created["id"])

    @rule(scenario=scenarios, name=names, stale=st.booleans())
    def rename(self, scenario: str, name: str, stale: bool) -> None:
        known = self.model[scenario]
        if stale and known.version == 1:
            stale = False  # no older version to send
        sent_version = known.version - 1 if stale else known.version
        response = self._command(
            "PATCH", f"/api/scenarios/{scenario}", {"name": name}, if_match=f'"{sent_version}"'
        )
        if stale:  # the version is checked first
            assert response.status_code == 409, response.text
            assert response.json()["error"]["code"] == "VERSION_CONFLICT"
            return
        if known.archived:  # after which nothing changes
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "SCENARIO_ARCHIVED"
            return
        assert response.status_code == 200, response.text
        known.name, known.version = name, known.version + 1
        assert response.json()["version"] == known.version
        assert response.headers["ETag"] == f'"{known.version}"'

    @rule(scenario=scenarios)
    def archive(self, scenario: str) -> None:
        known = self.model[scenario]
        response = self._command("POST", f"/api/scenarios/{scenario}/archive", {})
        if known.archived:
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "SCENARIO_ARCHIVED"
            return
        assert response.status_code == 200, response.text
        known.archived, known.version = True, known.version + 1
        assert response.json()["status"] == "archived"

    @rule(scenario=scenarios, months=st.integers(1, 120))
    def request_forecast(self, scenario: str, months: int) -> None:
        known = self.model[scenario]
        body = {"scenarioId": scenario, "horizonMonths": months, "paths": 100}
        response = self._command("POST", "/api/forecasts/generate", body)
        if known.archived:
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "SCENARIO_ARCHIVED"
            return
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "queued"
        known.forecasts += 1

    @precondition(lambda self: bool(self.world.sent))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        sent = data.draw(st.sampled_from(self.world.sent))
        headers = {
            "Authorization": f"Bearer {self.world.writer}",
            "Content-Type": "application/json",
            "Idempotency-Key": sent.key,
        }
        if sent.if_match is not None:
            headers["If-Match"] = sent.if_match
        # The same command with its keys in another order and other whitespace.
        body = json.dumps(dict(reversed(list(sent.body.items()))), indent=2)
        response = self.world.client.request(sent.method, sent.path, content=body, headers=headers)
        assert response.status_code == sent.status, response.text
        assert response.content == sent.answer
        assert response.headers["Idempotent-Replayed"] == "true"

    # --- reads ---------------------------------------------------------------------------

    @rule(scenario=scenarios)
    def read_detail(self, scenario: str) -> None:
        known = self.model[scenario]
        found = self._read(f"/api/scenarios/{scenario}")
        assert (found["name"], found["type"], found["version"]) == (
            known.name,
            known.type,
            known.version,
        )
        assert found["status"] == ("archived" if known.archived else "active")
        assert found["forecastCount"] == known.forecasts

    @invariant()
    def the_list_and_the_dashboard_agree_with_the_model(self) -> None:
        listed = self._read("/api/scenarios?limit=100")
        assert listed["pagination"]["total"] == len(self.model)
        by_id = {row["id"]: row for row in listed["data"]}
        assert set(by_id) == set(self.model)
        for sid, known in self.model.items():
            row = by_id[sid]
            assert (row["name"], row["version"], row["forecastCount"]) == (
                known.name,
                known.version,
                known.forecasts,
            )
        dashboard = self._read("/api/dashboard")
        archived = sum(1 for s in self.model.values() if s.archived)
        assert dashboard["scenarios"]["total"] == len(self.model)
        assert dashboard["scenarios"]["archived"] == archived
        assert dashboard["scenarios"]["active"] == len(self.model) - archived
        forecasts = sum(s.forecasts for s in self.model.values())
        assert dashboard["forecasts"]["total"] == forecasts
        assert dashboard["forecasts"]["queued"] == forecasts


class PostgresApiMachine(ApiMachine):
    backend = "postgres"


RUNS = settings(
    max_examples=6,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)


@pytest.mark.parametrize("machine", [ApiMachine, PostgresApiMachine], ids=["sqlite", "postgres"])
def test_the_api_agrees_with_a_model_and_its_read_models_with_a_replay(
    machine: type[ApiMachine],
) -> None:
    run_state_machine_as_test(machine, settings=RUNS)
