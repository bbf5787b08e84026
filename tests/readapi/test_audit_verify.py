"""Tamper evidence, on both backends: a store built through the API and projected is
tampered with by SQL on the raw event store (as someone with database access would), and
`accubooks audit verify` names the first bad position and what is wrong; with the stored
chain recomputed to match, only a signed checkpoint kept beforehand still catches it. An
export verifies offline with tools/verify_export.py (a separate process, no project code)
and a tampered one does not.

The store is built once per backend and copied for each test (a file copy on SQLite,
CREATE DATABASE ... TEMPLATE on PostgreSQL), so every mutation meets a fresh store."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from starlette.testclient import TestClient

from commands.context import Collaborators
from domain import audit
from infra.clock import utc_now
from infra.eventstore import EventLog, library_env, open_event_log, projection_file
from infra.settings import Settings
from service import cli
from service.app import create_app
from tests.conftest import command_headers, make_tenant, scenario_body
from tests.services import ADMIN_URL, postgres_database

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VERIFY_EXPORT = PROJECT_ROOT / "tools" / "verify_export.py"
SIGNING_KEY = base64.b64encode(bytes(range(32))).decode()
CREATED = "accubooks:Scenario.Created"
SETTLE_S = 20.0


@dataclass(frozen=True)
class Logged:
    position: int
    tenant_id: str
    topic: str


@dataclass(frozen=True)
class Built:
    settings: Settings
    # Tenants by name ("a", "b", "c"); "a" is the one tampered with.
    tenants: dict[str, str]
    # Positions left free in the log (inside a's chain: a has events on both sides).
    gap: list[int]
    events: list[Logged]
    # a's signed head checkpoint (as the API serves it) and the public key, saved before
    # any tampering.
    checkpoint: dict[str, Any]
    public_key: str

    def positions(self, tenant: str, topic: str | None = None) -> list[int]:
        tenant_id = self.tenants[tenant]
        return [
            e.position
            for e in self.events
            if e.tenant_id == tenant_id and (topic is None or e.topic == topic)
        ]


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    def report(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.out)
        return found


def accubooks(settings: Settings, *args: str) -> Ran:
    """`accubooks <args>` in this process, with the environment naming ``settings``."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith("ACCUBOOKS_") or name in ("DATABASE_URL", "REDIS_URL", "BROKER_URL"):
                env.delenv(name)
        env.setenv("ACCUBOOKS_DATA_DIR", settings.data_dir)
        env.setenv("ACCUBOOKS_AUDIT_SIGNING_KEY", settings.audit_signing_key)
        if settings.database_url:
            env.setenv("DATABASE_URL", settings.database_url)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(args))
    return Ran(code, out.getvalue(), err.getvalue())


def verify(settings: Settings, *args: str) -> Ran:
    return accubooks(settings, "audit", "verify", "--json", *args)


def first_finding(report: dict[str, Any], tenant_id: str) -> dict[str, Any] | None:
    [tenant] = [t for t in report["tenants"] if t["tenantId"] == tenant_id]
    first: dict[str, Any] | None = tenant["first"]
    return first


# -- the raw stores, reached with SQL ------------------------------------------------------


class RawDatabase:
    """One of the store's databases, by a connection of its own (autocommit)."""

    def __init__(self, settings: Settings, sqlite_file: str) -> None:
        self.postgres = bool(settings.database_url)
        self._pg: psycopg.Connection[Any] | None = None
        self._lite: sqlite3.Connection | None = None
        if settings.database_url:
            self._pg = psycopg.connect(settings.database_url, autocommit=True)
        else:
            self._lite = sqlite3.connect(sqlite_file, isolation_level=None)

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self._pg is not None:
            cursor = self._pg.execute(sql.replace("?", "%s"), params)
            return list(cursor.fetchall()) if cursor.description else []
        assert self._lite is not None
        return list(self._lite.execute(sql, params).fetchall())

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
        if self._lite is not None:
            self._lite.close()


class RawLog(RawDatabase):
    """The event store's own table: the library's `stored_events` (SQLite, positions are
    rowids) or `accubooks_events` (PostgreSQL, positions are notification_id)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, library_env(settings).get("SQLITE_DBNAME", ""))
        self.table = "accubooks_events" if self.postgres else "stored_events"
        self.id = "notification_id" if self.postgres else "rowid"

    def row(self, position: int) -> tuple[Any, int, str, bytes]:
        [(originator, version, topic, state)] = self.execute(
            f"SELECT originator_id, originator_version, topic, state FROM {self.table}"
            f" WHERE {self.id} = ?",
            (position,),
        )
        return originator, version, topic, bytes(state)

    def set_state(self, position: int, state: bytes) -> None:
        self.execute(f"UPDATE {self.table} SET state = ? WHERE {self.id} = ?", (state, position))

    def delete(self, position: int) -> None:
        self.execute(f"DELETE FROM {self.table} WHERE {self.id} = ?", (position,))

    def insert(self, position: int, topic: str, state: bytes) -> None:
        originator = uuid.uuid4()
        self.execute(
            f"INSERT INTO {self.table}"
            f" ({self.id}, originator_id, originator_version, topic, state)"
            " VALUES (?, ?, ?, ?, ?)",
            (position, originator if self.postgres else originator.hex, 1, topic, state),
        )


@contextlib.contextmanager
def raw_log(settings: Settings) -> Iterator[RawLog]:
    log = RawLog(settings)
    try:
        yield log
    finally:
        log.close()


def change_a_byte(log: RawLog, position: int) -> None:
    """Changes one byte of the event's state, keeping it valid JSON (a name's last letter)."""
    state = log.row(position)[3]
    at = state.index(b'"name":"') + len(b'"name":"')
    at = state.index(b'"', at) - 1
    log.set_state(position, state[:at] + bytes([state[at] ^ 1]) + state[at + 1 :])


def swap_states(log: RawLog, one: int, other: int) -> None:
    first, second = log.row(one)[3], log.row(other)[3]
    log.set_state(one, second)
    log.set_state(other, first)


def rewrite_chain(settings: Settings) -> None:
    """What an attacker who also controls the read models does after tampering: recompute
    the stored chain and heads from the tampered log (with the published functions)."""
    log = open_event_log(settings)
    db = RawDatabase(settings, projection_file(settings, "audit"))
    try:
        tracking = "audit_tracking" if db.postgres else "tracking"
        [(bound,)] = db.execute(
            f"SELECT notification_id FROM {tracking} WHERE application_name = 'accubooks'"
        )
        db.execute("DELETE FROM audit_events")
        db.execute("DELETE FROM audit_heads")
        heads: dict[str, tuple[int, str, int]] = {}
        for stored in log.recorder.select_notifications(start=1, limit=100_000, stop=bound):
            event: Any = log.mapper.to_domain_event(stored)
            tenant = str(event.tenant_id)
            _, previous, count = heads.get(tenant, (0, audit.GENESIS, 0))
            hashed = audit.event_hash(
                stored.id,
                stored.originator_id,
                stored.originator_version,
                stored.topic,
                stored.state,
            )
            chained = audit.chain_next(previous, hashed)
            heads[tenant] = (stored.id, chained, count + 1)
            db.execute(
                "INSERT INTO audit_events (tenant_id, position, aggregate_id, version, topic,"
                " recorded_at, actor_id, request_id, state, event_hash, chain_hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    tenant,
                    stored.id,
                    str(stored.originator_id),
                    stored.originator_version,
                    stored.topic,
                    event.timestamp.isoformat(),
                    event.actor_id,
                    event.request_id,
                    stored.state,
                    hashed,
                    chained,
                ),
            )
        for tenant, (position, chained, count) in heads.items():
            db.execute(
                "INSERT INTO audit_heads (tenant_id, position, chain_hash, event_count)"
                " VALUES (?, ?, ?, ?)",
                (tenant, position, chained, count),
            )
    finally:
        db.close()
        log.close()


# -- the store: built once per backend, copied per test ------------------------------------


def leave_gap(settings: Settings, log: EventLog) -> list[int]:
    """Makes the next positions of the log skip three numbers. PostgreSQL: draw them from
    the notification id sequence. SQLite gives a new row the largest rowid + 1, so a
    placeholder row three further on is inserted here and removed (by the caller, before
    the projections run) once real events follow it."""
    top = log.position()
    with raw_log(settings) as raw:
        if raw.postgres:
            for _ in range(3):
                raw.execute(
                    "SELECT nextval(pg_get_serial_sequence('accubooks_events', 'notification_id'))"
                )
        else:
            raw.insert(top + 3, "placeholder", b"{}")
    return [top + 1, top + 2, top + 3]


def create_scenarios(client: TestClient, writer: str, *names: str) -> None:
    for name in names:
        response = client.post(
            "/api/scenarios", json=scenario_body(name=name), headers=command_headers(writer)
        )
        assert response.status_code == 201, response.text


def build(settings: Settings, workdir: Path) -> Built:
    log = open_event_log(settings)
    operator = Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4)
    a, b = make_tenant(operator, "Alpha"), make_tenant(operator, "Beta")
    # Commands without projections running: a placeholder row (SQLite) must never be seen.
    with TestClient(create_app(settings, event_log=log, run_jobs=False)) as client:
        create_scenarios(client, a.writer, "Plan one", "Plan two")
        create_scenarios(client, b.writer, "Plan three")
        gap = leave_gap(settings, log)
        c = make_tenant(operator, "Gamma")
        create_scenarios(client, a.writer, "Plan four")
        create_scenarios(client, c.writer, "Plan five")
        create_scenarios(client, b.writer, "Plan six")
    with raw_log(settings) as raw:
        raw.execute(f"DELETE FROM {raw.table} WHERE topic = 'placeholder'")
    app = create_app(settings, event_log=log, run_projections=True, run_jobs=False)
    with TestClient(app) as client:
        assert app.state.projections.wait_for(log.position(), SETTLE_S)
        # What an auditor keeps: the signed checkpoint of the tenant and the public key.
        auditor = {"Authorization": f"Bearer {a.auditor}"}
        checkpoint = client.get("/api/audit/checkpoint", headers=auditor)
        public_key = client.get("/api/audit/public-key", headers=auditor)
        assert checkpoint.status_code == public_key.status_code == 200, checkpoint.text
    events = [
        Logged(n.id, str(getattr(log.mapper.to_domain_event(n), "tenant_id")), n.topic)  # noqa: B009
        for n in log.recorder.select_notifications(start=1, limit=10_000)
    ]
    log.close()
    built = Built(
        settings=settings,
        tenants={"a": str(a.tenant_id), "b": str(b.tenant_id), "c": str(c.tenant_id)},
        gap=gap,
        events=events,
        checkpoint=checkpoint.json(),
        public_key=public_key.json()["publicKey"],
    )
    assert not set(gap) & {e.position for e in events}, "the gap was filled"
    assert min(built.positions("a")) < gap[0] < max(built.positions("a"))
    assert built.checkpoint["position"] == max(built.positions("a"))
    return built


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def built(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Built]:
    workdir = tmp_path_factory.mktemp(f"audit-{request.param}")
    data_dir = str(workdir / "data")
    if request.param == "sqlite":
        yield build(Settings(data_dir=data_dir, audit_signing_key=SIGNING_KEY), workdir)
        return
    with postgres_database() as url:
        # Small pools: the server's connections are shared with other tests.
        settings = Settings(
            database_url=url,
            data_dir=data_dir,
            audit_signing_key=SIGNING_KEY,
            db_pool_size=2,
            db_pool_max_overflow=2,
        )
        yield build(settings, workdir)


@pytest.fixture
def store(built: Built, tmp_path: Path) -> Iterator[Settings]:
    """A fresh copy of the built store, its settings."""
    data_dir = tmp_path / "data"
    if os.path.isdir(built.settings.data_dir):
        shutil.copytree(built.settings.data_dir, data_dir)
    if not built.settings.database_url:
        yield msgspec.structs.replace(built.settings, data_dir=str(data_dir))
        return
    params = psycopg.conninfo.conninfo_to_dict(built.settings.database_url)
    template, name = params["dbname"], f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    params["dbname"] = name
    url = psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})
    try:
        yield msgspec.structs.replace(built.settings, database_url=url, data_dir=str(data_dir))
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def checkpoint_file(built: Built, tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint.json"
    path.write_text(json.dumps(built.checkpoint))
    return path


# -- the mutations ---------------------------------------------------------------------------

Mutation = Callable[[RawLog, Built], tuple[str, int]]


def changed_byte(log: RawLog, built: Built) -> tuple[str, int]:
    position = built.positions("a", CREATED)[0]
    change_a_byte(log, position)
    return "changed", position


def deleted_row(log: RawLog, built: Built) -> tuple[str, int]:
    position = built.positions("a", CREATED)[1]
    log.delete(position)
    return "missing", position


def forged_row(log: RawLog, built: Built) -> tuple[str, int]:
    # A copy of one of a's events, under a new aggregate id, in the gap.
    _, _, topic, state = log.row(built.positions("a", CREATED)[0])
    log.insert(built.gap[1], topic, state)
    return "extra", built.gap[1]


def swapped_states(log: RawLog, built: Built) -> tuple[str, int]:
    one, other = built.positions("a", CREATED)[:2]
    swap_states(log, one, other)
    return "changed", one


MUTATIONS = [changed_byte, deleted_row, forged_row, swapped_states]


# -- the tests ------------------------------------------------------------------------------


def test_an_untouched_store_verifies_clean(store: Settings, built: Built) -> None:
    ran = verify(store)
    assert ran.code == 0, ran.out + ran.err
    report = ran.report()
    assert report["clean"] and report["findings"] == []
    assert report["eventsRead"] == len(built.events)
    assert report["auditPosition"] == built.events[-1].position
    assert {t["tenantId"] for t in report["tenants"]} == set(built.tenants.values())
    assert sum(t["events"] for t in report["tenants"]) == len(built.events)
    # Its chain heads are what the signed checkpoint says.
    [a] = [t for t in report["tenants"] if t["tenantId"] == built.tenants["a"]]
    assert (a["chainHash"], a["events"]) == (
        built.checkpoint["chainHash"],
        built.checkpoint["eventCount"],
    )
    text = accubooks(store, "audit", "verify")
    assert text.code == 0 and text.out.rstrip().endswith("clean")


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda m: m.__name__)
def test_each_mutation_of_the_raw_log_is_named_at_its_position(
    store: Settings, built: Built, mutate: Mutation
) -> None:
    with raw_log(store) as log:
        kind, position = mutate(log, built)
    ran = verify(store)
    assert ran.code == 1, ran.out + ran.err
    report = ran.report()
    assert not report["clean"]
    first = first_finding(report, built.tenants["a"])
    assert first is not None
    assert (first["kind"], first["position"]) == (kind, position)
    # The other tenants' chains are intact, and one tenant can be verified alone.
    assert first_finding(report, built.tenants["b"]) is None
    assert first_finding(report, built.tenants["c"]) is None
    assert [f["tenantId"] for f in report["findings"]] == [built.tenants["a"]]
    assert verify(store, "--tenant", built.tenants["b"]).code == 0
    alone = verify(store, "--tenant", built.tenants["a"])
    assert alone.code == 1
    assert alone.report()["findings"] == report["findings"]
    text = accubooks(store, "audit", "verify")
    assert text.code == 1
    assert f"FIRST BAD POSITION {position}: {kind}" in text.out


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda m: m.__name__)
def test_a_recomputed_chain_hides_a_mutation_but_not_from_a_kept_checkpoint(
    store: Settings, built: Built, mutate: Mutation, checkpoint_file: Path
) -> None:
    assert verify(store, "--against", str(checkpoint_file)).code == 0
    with raw_log(store) as log:
        mutate(log, built)
    rewrite_chain(store)
    # The stored chain now agrees with the tampered log...
    assert verify(store).code == 0
    # ...but not with the signed checkpoint kept before.
    ran = verify(store, "--against", str(checkpoint_file))
    assert ran.code == 1, ran.out
    report = ran.report()
    checked = report["checkpoint"]
    assert checked["signatureValid"] and not checked["matches"]
    assert [(f["kind"], f["tenantId"], f["position"]) for f in report["findings"]] == [
        ("checkpoint-mismatch", built.tenants["a"], built.checkpoint["position"])
    ]
    assert "rewritten as well" in report["findings"][0]["detail"]


def test_all_mutations_together_with_a_recomputed_chain_are_caught_by_the_checkpoint(
    store: Settings, built: Built, checkpoint_file: Path
) -> None:
    with raw_log(store) as log:
        forged_row(log, built)
        change_a_byte(log, built.positions("a", CREATED)[2])
        swapped_states(log, built)
        log.delete(built.positions("a")[-1])
    rewrite_chain(store)
    assert verify(store).code == 0
    assert verify(store, "--against", str(checkpoint_file)).code == 1


AUDIT_MUTATIONS = {
    "chain-broken": "UPDATE audit_events SET chain_hash = ? WHERE position = ?",
    "copy-changed": "UPDATE audit_events SET state = ? WHERE position = ?",
    "head-mismatch": "UPDATE audit_heads SET chain_hash = ? WHERE position = ?",
}


@pytest.mark.parametrize("kind", AUDIT_MUTATIONS)
def test_a_tampered_stored_chain_is_named_at_its_position(
    store: Settings, built: Built, kind: str
) -> None:
    position = built.positions("a")[-1 if kind == "head-mismatch" else 3]
    value: Any = "ab" * 32 if kind != "copy-changed" else b"{}"
    db = RawDatabase(store, projection_file(store, "audit"))
    try:
        db.execute(AUDIT_MUTATIONS[kind], (value, position))
    finally:
        db.close()
    ran = verify(store)
    assert ran.code == 1
    report = ran.report()
    first = first_finding(report, built.tenants["a"])
    assert first is not None and (first["kind"], first["position"]) == (kind, position)
    assert [f["tenantId"] for f in report["findings"]] == [built.tenants["a"]]


def test_an_undecodable_record_is_named_by_its_position(store: Settings, built: Built) -> None:
    position = built.positions("b", CREATED)[0]
    with raw_log(store) as log:
        log.set_state(position, b"not json at all")
    ran = verify(store)
    assert ran.code == 1
    report = ran.report()
    assert [(f["kind"], f["tenantId"], f["position"]) for f in report["findings"]] == [
        ("undecodable", None, position),
        ("changed", built.tenants["b"], position),
    ]


def test_events_not_yet_projected_are_pending_not_tampering(store: Settings, built: Built) -> None:
    log = open_event_log(store)
    try:
        make_tenant(Collaborators(log=log, clock=utc_now, new_id=uuid.uuid4), "Late")
    finally:
        log.close()
    ran = verify(store)
    assert ran.code == 0, ran.out
    report = ran.report()
    assert report["logPosition"] > report["auditPosition"]
    assert sum(t["pending"] for t in report["tenants"]) == 4  # the tenant and its keys


def test_from_starts_at_a_position_with_the_stored_chain_before_it(
    store: Settings, built: Built
) -> None:
    position = built.positions("a", CREATED)[0]
    with raw_log(store) as log:
        change_a_byte(log, position)
    assert verify(store, "--from", str(position + 1)).code == 0
    ran = verify(store, "--from", str(position))
    assert ran.code == 1
    first = first_finding(ran.report(), built.tenants["a"])
    assert first is not None and (first["kind"], first["position"]) == ("changed", position)


def test_a_checkpoint_that_was_altered_fails_its_signature(
    store: Settings, built: Built, tmp_path: Path
) -> None:
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps({**built.checkpoint, "eventCount": 1}))
    ran = verify(store, "--against", str(altered))
    assert ran.code == 1
    kinds = [f["kind"] for f in ran.report()["findings"]]
    assert kinds == ["bad-signature", "checkpoint-mismatch"]
    missing = accubooks(store, "audit", "verify", "--against", str(tmp_path / "nope.json"))
    assert missing.code == 2


# -- exports ----------------------------------------------------------------------------------


def export(store: Settings, built: Built, path: Path) -> list[str]:
    ran = accubooks(store, "audit", "export", "--tenant", built.tenants["a"], "--out", str(path))
    assert ran.code == 0, ran.err
    return path.read_text().splitlines()


def verify_offline(path: Path, *args: str, without: str = "") -> subprocess.CompletedProcess[str]:
    """tools/verify_export.py run by an isolated interpreter (no project on its path), as
    if ``without`` (a package) were not installed."""
    command = [sys.executable, "-I", str(VERIFY_EXPORT), str(path), *args]
    if without:
        command[2:3] = [
            "-c",
            f"import runpy, sys; sys.modules[{without!r}] = None; sys.argv = sys.argv[1:];"
            " runpy.run_path(sys.argv[0], run_name='__main__')",
            str(VERIFY_EXPORT),
        ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False, cwd=PROJECT_ROOT.anchor
    )


def test_an_export_verifies_offline(store: Settings, built: Built, tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = export(store, built, path)
    header = json.loads(lines[0])
    # The export's header carries the same signed checkpoint the API serves.
    assert (header["checkpoint"], header["publicKey"]) == (built.checkpoint, built.public_key)
    assert [json.loads(line)["position"] for line in lines[1:]] == built.positions("a")
    done = verify_offline(path, "--public-key", built.public_key)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK") and "signature valid" in done.stdout
    # Without the cryptography package it still checks the chain, and says what it skipped.
    bare = verify_offline(path, without="cryptography")
    assert bare.returncode == 0, bare.stdout + bare.stderr
    assert "signature NOT checked" in bare.stdout


def test_a_tampered_export_fails_offline(store: Settings, built: Built, tmp_path: Path) -> None:
    lines = export(store, built, tmp_path / "a.jsonl")
    line = json.loads(lines[3])
    state = bytearray(base64.b64decode(line["state"]))
    state[-3] ^= 1
    changed = tmp_path / "changed.jsonl"
    changed.write_text(
        "\n".join(
            [
                *lines[:3],
                json.dumps({**line, "state": base64.b64encode(state).decode()}),
                *lines[4:],
            ]
        )
        + "\n"
    )
    done = verify_offline(changed, "--public-key", built.public_key)
    assert done.returncode == 1
    assert f"line 4 (position {line['position']})" in done.stdout

    removed = tmp_path / "removed.jsonl"
    removed.write_text("\n".join([*lines[:3], *lines[4:]]) + "\n")
    done = verify_offline(removed, "--public-key", built.public_key)
    assert done.returncode == 1
    assert f"line 4 (position {json.loads(lines[4])['position']})" in done.stdout

    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text("\n".join(lines[:-1]) + "\n")
    done = verify_offline(truncated, "--public-key", built.public_key)
    assert done.returncode == 1 and "end of file" in done.stdout


def test_an_export_of_a_tampered_log_fails_offline(
    store: Settings, built: Built, tmp_path: Path
) -> None:
    position = built.positions("a", CREATED)[0]
    with raw_log(store) as log:
        change_a_byte(log, position)
    lines = export(store, built, tmp_path / "a.jsonl")
    bad = [
        i + 1
        for i, line in enumerate(lines[1:], start=1)
        if json.loads(line)["position"] == position
    ]
    done = verify_offline(tmp_path / "a.jsonl", "--public-key", built.public_key)
    assert done.returncode == 1
    assert f"line {bad[0]} (position {position})" in done.stdout
