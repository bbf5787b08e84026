"""The idempotency checks of perf.commands_bench, run on what a benchmark wrote: one
receipt and exactly one created scenario per key, replays answered byte for byte as
stored, a reused key with another body refused."""

from __future__ import annotations

import collections
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import msgspec

from domain.receipt import CommandReceipt
from infra.eventstore import open_event_log
from infra.settings import Settings

CREATED = "accubooks:Scenario.Created"
RECEIPT = "accubooks:CommandReceipt.Recorded"
# Checks answer slowly on a machine the load left busy; they must not fail for that.
CHECK_TIMEOUT_S = 60.0

SCENARIO_BODY = msgspec.json.encode(
    {
        "name": "Hire two engineers",
        "type": "HIRING",
        "baseline": {
            "startMonth": "2026-01",
            "openingCash": "250000.00",
            "monthlyRevenue": "40000",
            "monthlyCosts": 35000.5,
            "revenueGrowthRate": 0.02,
            "costGrowthRate": 0.01,
        },
        "assumptions": {"headcount": 2, "monthlyCostPerHead": "6500", "startOffsetMonths": 1},
    }
)


class Server(msgspec.Struct, frozen=True):
    url: str
    pid: int


class Idempotency(msgspec.Struct, frozen=True, kw_only=True):
    acknowledged: int  # 2xx answers wrk counted, warm-ups included
    in_flight_bound: int  # commands that may have committed after wrk stopped waiting
    receipts: int
    scenarios_created: int
    # Receipts whose answer names no created scenario, or one another receipt names too;
    # scenarios no receipt names. Exactly one set of events per key: all three are 0.
    receipts_without_own_scenario: int
    scenarios_without_receipt: int
    replays_sent: int
    replays_identical: int
    reused_keys_sent: int
    reused_keys_refused: int
    events_added_by_replays: int
    ok: bool


def stored_commands(database_url: str) -> tuple[list[CommandReceipt.Recorded], list[str]]:
    """Every receipt event of the log, and the ids of every created scenario."""
    log = open_event_log(Settings(database_url=database_url, group_commit=False))
    try:
        receipts: list[CommandReceipt.Recorded] = []
        created: list[str] = []
        position = 0
        while True:
            page = log.recorder.select_notifications(
                start=position, limit=5000, topics=[CREATED, RECEIPT], inclusive_of_start=False
            )
            if not page:
                break
            for notification in page:
                if notification.topic == CREATED:
                    created.append(str(notification.originator_id))
                else:
                    event = log.mapper.to_domain_event(notification)
                    assert isinstance(event, CommandReceipt.Recorded)
                    receipts.append(event)
            position = page[-1].id
        return receipts, created
    finally:
        log.close()


def check_idempotency(
    database_url: str,
    servers: list[Server],
    bearer: str,
    acknowledged: int,
    in_flight_bound: int,
    sample: int,
) -> Idempotency:
    receipts, created = stored_commands(database_url)
    named = collections.Counter(
        str(msgspec.json.decode(r.body)["id"]) for r in receipts if r.route == "POST /api/scenarios"
    )
    created_set = set(created)
    without_own = sum(n for sid, n in named.items() if sid not in created_set or n > 1)
    without_receipt = sum(1 for sid in created if sid not in named)

    rng = random.Random(7)
    chosen = rng.sample(receipts, min(sample, len(receipts)))
    other_body = SCENARIO_BODY.replace(b"Hire two engineers", b"Hire three engineers")
    reused = chosen[: max(1, len(chosen) // 8)] if chosen else []
    local = threading.local()
    opened: list[httpx.Client] = []

    def post(index: int, key: str, body: bytes) -> httpx.Response:
        # One persistent client per thread and server, as the load's clients have.
        clients: dict[str, httpx.Client] = local.__dict__.setdefault("clients", {})
        url = servers[index % len(servers)].url
        if url not in clients:
            clients[url] = httpx.Client(
                base_url=url,
                headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"},
                timeout=CHECK_TIMEOUT_S,
                trust_env=False,
            )
            opened.append(clients[url])
        return clients[url].post("/api/scenarios", content=body, headers={"Idempotency-Key": key})

    def replay(index: int) -> bool:
        receipt = chosen[index]
        answer = post(index, receipt.idempotency_key, SCENARIO_BODY)
        return (
            answer.status_code == receipt.status
            and answer.content == receipt.body.encode()
            and answer.headers.get("Idempotent-Replayed") == "true"
        )

    def reuse(index: int) -> bool:
        answer = post(index, reused[index].idempotency_key, other_body)
        return answer.status_code == 422 and b"IDEMPOTENCY_KEY_REUSED" in answer.content

    # 32 at a time: replays meet in shared transactions too, and must still replay.
    with ThreadPoolExecutor(max_workers=32) as pool:
        identical = sum(pool.map(replay, range(len(chosen))))
        refused = sum(pool.map(reuse, range(len(reused))))
    for client in opened:
        client.close()
    after, _ = stored_commands(database_url)
    added = len(after) - len(receipts)
    ok = (
        without_own == 0
        and without_receipt == 0
        and len(receipts) == len(created)
        and acknowledged <= len(receipts) <= acknowledged + in_flight_bound
        and identical == len(chosen)
        and refused == len(reused)
        and added == 0
    )
    return Idempotency(
        acknowledged=acknowledged,
        in_flight_bound=in_flight_bound,
        receipts=len(receipts),
        scenarios_created=len(created),
        receipts_without_own_scenario=without_own,
        scenarios_without_receipt=without_receipt,
        replays_sent=len(chosen),
        replays_identical=identical,
        reused_keys_sent=len(reused),
        reused_keys_refused=refused,
        events_added_by_replays=added,
        ok=ok,
    )
