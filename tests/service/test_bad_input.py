"""Every malformed request is refused with its 4xx in the error envelope of API.md and
appends nothing to the log, on both event-store backends."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from infra.eventstore import EventLog
from infra.settings import Settings
from tests.conftest import Tenant, command_headers, scenario_body
from tests.services import postgres_database

MIB = 1024 * 1024
PLACEHOLDER = "__RAW__"


def encoded(body: Any) -> bytes:
    return json.dumps(body).encode()


def with_fields(**fields: Any) -> bytes:
    return encoded(scenario_body(**fields))


def with_baseline(**fields: Any) -> bytes:
    body = scenario_body()
    body["baseline"].update(fields)
    return encoded(body)


def with_assumptions(**fields: Any) -> bytes:
    body = scenario_body()
    body["assumptions"].update(fields)
    return encoded(body)


def with_raw(section: str, field: str, raw: str) -> bytes:
    """The valid body with one field's value spelled as raw (possibly invalid) JSON text."""
    body = scenario_body()
    body[section][field] = PLACEHOLDER
    return encoded(body).replace(f'"{PLACEHOLDER}"'.encode(), raw.encode())


def nested_arrays(depth: int) -> str:
    return "[" * depth + "]" * depth


def assert_refused(
    response: Any, status: int, code: str, event_log: EventLog, position: int
) -> dict[str, Any]:
    """The answer is ``status`` with ``code`` in the envelope, and the log did not move."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert error["requestId"]
    assert error["requestId"] == response.headers["X-Request-Id"]
    assert event_log.position() == position
    return error


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def settings(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """Overrides conftest's per-test store with one per backend for this module: refused
    requests append nothing, so the cases cannot disturb each other, and a fresh
    PostgreSQL database for each of some 140 cases would cost over a second each."""
    data_dir = str(tmp_path_factory.mktemp("data"))
    if request.param == "sqlite":
        yield Settings(data_dir=data_dir)
        return
    with postgres_database() as url:
        yield Settings(database_url=url, data_dir=data_dir)


@pytest.fixture
def scenario_id(client: TestClient, tenant: Tenant) -> str:
    response = client.post(
        "/api/scenarios", json=scenario_body(), headers=command_headers(tenant.writer)
    )
    assert response.status_code == 201, response.text
    created: str = response.json()["id"]
    return created


VALIDATION = "VALIDATION_ERROR"

CREATE_BODIES = [
    # A client can never set what the server owns, nor anything the contract lacks.
    pytest.param(with_fields(tenantId=str(uuid.uuid4())), id="unknown-field-tenantId"),
    pytest.param(with_fields(id=str(uuid.uuid4())), id="unknown-field-id"),
    pytest.param(with_fields(version=7), id="unknown-field-version"),
    pytest.param(with_fields(status="archived"), id="unknown-field-status"),
    pytest.param(with_baseline(cashAtBank="1.00"), id="unknown-field-in-baseline"),
    pytest.param(with_assumptions(bonusPerHead="10"), id="unknown-field-in-assumptions"),
    pytest.param(with_assumptions(percent=10), id="field-of-another-type-in-assumptions"),
    pytest.param(with_assumptions(type="COST_REDUCTION"), id="other-type-tag-in-assumptions"),
    # Wrong types.
    pytest.param(with_fields(name=42), id="name-as-number"),
    pytest.param(with_fields(type=1), id="type-as-number"),
    pytest.param(with_fields(baseline="2026-01"), id="baseline-as-string"),
    pytest.param(with_fields(assumptions=[2, "6500"]), id="assumptions-as-array"),
    pytest.param(with_assumptions(headcount="2"), id="headcount-as-string"),
    pytest.param(with_assumptions(headcount=2.5), id="headcount-as-fraction"),
    pytest.param(with_assumptions(headcount=True), id="headcount-as-boolean"),
    pytest.param(with_baseline(openingCash=True), id="money-as-boolean"),
    pytest.param(with_baseline(openingCash=None), id="money-as-null"),
    pytest.param(with_baseline(revenueGrowthRate="0.02"), id="rate-as-string"),
    # NaN and Infinity: invalid JSON as literals, not money as strings.
    pytest.param(with_raw("baseline", "openingCash", "NaN"), id="money-literal-NaN"),
    pytest.param(with_raw("baseline", "openingCash", "Infinity"), id="money-literal-Infinity"),
    pytest.param(with_raw("baseline", "openingCash", "-Infinity"), id="money-literal-minus-Inf"),
    pytest.param(with_raw("baseline", "costGrowthRate", "NaN"), id="rate-literal-NaN"),
    pytest.param(with_baseline(openingCash="NaN"), id="money-string-NaN"),
    pytest.param(with_baseline(openingCash="sNaN"), id="money-string-sNaN"),
    pytest.param(with_baseline(monthlyRevenue="Infinity"), id="money-string-Infinity"),
    pytest.param(with_baseline(monthlyCosts="-Infinity"), id="money-string-minus-Infinity"),
    pytest.param(with_assumptions(monthlyCostPerHead="Infinity"), id="assumption-money-Inf"),
    pytest.param(with_baseline(revenueGrowthRate="NaN"), id="rate-string-NaN"),
    # Out of range.
    pytest.param(with_raw("baseline", "openingCash", "1e400"), id="money-1e400"),
    pytest.param(with_baseline(openingCash="1e400"), id="money-string-1e400"),
    pytest.param(with_raw("baseline", "openingCash", "1" + "0" * 400), id="money-401-digits"),
    pytest.param(with_baseline(openingCash="1000000000000"), id="money-a-trillion"),
    pytest.param(with_raw("baseline", "revenueGrowthRate", "1e400"), id="rate-1e400"),
    pytest.param(with_raw("baseline", "revenueVolatility", "-1e400"), id="volatility-minus-1e400"),
    pytest.param(with_baseline(revenueGrowthRate=1.5), id="rate-above-range"),
    pytest.param(with_assumptions(headcount=0), id="headcount-zero"),
    pytest.param(with_assumptions(startOffsetMonths=120), id="offset-months-120"),
    # Money has at most two decimal places, whatever the spelling.
    pytest.param(with_baseline(openingCash="1.001"), id="money-string-3-decimals"),
    pytest.param(with_raw("baseline", "openingCash", "1.001"), id="money-number-3-decimals"),
    pytest.param(with_assumptions(monthlyCostPerHead="6500.125"), id="assumption-money-3-dp"),
    pytest.param(with_baseline(monthlyCosts="-1.00"), id="negative-monthly-costs"),
    # Months, types, names.
    pytest.param(with_baseline(startMonth="2026-13"), id="start-month-13"),
    pytest.param(with_baseline(startMonth="2026-00"), id="start-month-00"),
    pytest.param(with_baseline(startMonth="2026-1"), id="start-month-one-digit"),
    pytest.param(with_fields(type="ACQUISITION"), id="unknown-scenario-type"),
    pytest.param(with_fields(type="hiring"), id="scenario-type-lowercase"),
    pytest.param(with_fields(name=""), id="name-empty"),
    pytest.param(with_fields(name=" \t "), id="name-blank"),
    pytest.param(with_fields(name="x" * 201), id="name-201-chars"),
    # A NUL could never be stored in a PostgreSQL read model: refused at the door.
    pytest.param(with_fields(name="a\u0000b"), id="name-with-nul"),
    pytest.param(with_fields(name="line\nbreak"), id="name-with-control-character"),
    # Missing parts.
    pytest.param(encoded({k: v for k, v in scenario_body().items() if k != "name"}), id="no-name"),
    pytest.param(
        encoded({k: v for k, v in scenario_body().items() if k != "baseline"}), id="no-bl"
    ),
    pytest.param(b"{}", id="empty-object"),
    # Not an object, or not JSON at all.
    pytest.param(b"", id="empty-body"),
    pytest.param(b"[]", id="json-array"),
    pytest.param(encoded([scenario_body()]), id="json-array-of-the-body"),
    pytest.param(b'"Hire two engineers"', id="bare-string"),
    pytest.param(b"null", id="null"),
    pytest.param(b"42", id="bare-number"),
    pytest.param(with_fields()[:-5], id="truncated"),
    pytest.param(with_fields() + b" {}", id="trailing-garbage"),
    pytest.param(b"{'name': 'single quotes'}", id="single-quotes"),
    pytest.param(with_fields(name="caf\xe9").replace(b"\\u00e9", b"\xe9"), id="latin-1-byte"),
    pytest.param(b'{"name": "\xff\xfe"}', id="invalid-utf8"),
    pytest.param(with_fields(name="x").replace(b'"x"', b'"\xed\xa0\x80"'), id="utf8-surrogate"),
    pytest.param(with_fields(name="x").replace(b'"x"', b'"\\ud800"'), id="escaped-lone-surrogate"),
    # Deep nesting must be refused, not overflow a stack.
    pytest.param(nested_arrays(1000).encode(), id="nested-1000-top-level"),
    pytest.param(
        encoded({"wrapper": 1}).replace(b"1", nested_arrays(1000).encode()),
        id="nested-1000-in-unknown-top-level-field",
    ),
    pytest.param(
        with_raw("assumptions", "headcount", nested_arrays(1000)), id="nested-1000-as-headcount"
    ),
    pytest.param(
        with_raw("assumptions", "extra", nested_arrays(1000)), id="nested-1000-in-assumptions"
    ),
    pytest.param(
        with_raw("assumptions", "extra", nested_arrays(200_000)), id="nested-200k-in-assumptions"
    ),
    pytest.param(
        with_raw("baseline", "openingCash", nested_arrays(1000)), id="nested-1000-in-baseline"
    ),
]


@pytest.mark.parametrize("body", CREATE_BODIES)
def test_malformed_scenario_is_refused_and_appends_nothing(
    client: TestClient, tenant: Tenant, event_log: EventLog, body: bytes
) -> None:
    position = event_log.position()

    response = client.post("/api/scenarios", content=body, headers=command_headers(tenant.writer))

    assert_refused(response, 400, VALIDATION, event_log, position)


def pointers_of(error: dict[str, Any]) -> list[str]:
    return [detail["pointer"] for detail in error["details"]]


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        pytest.param(with_baseline(startMonth="2026-13"), "/baseline/startMonth", id="month"),
        pytest.param(with_assumptions(headcount="2"), "/assumptions/headcount", id="headcount"),
        # Money is checked in the struct's __post_init__, which msgspec reports at the
        # struct; the pointer must still reach the field.
        pytest.param(with_baseline(openingCash="1.001"), "/baseline/openingCash", id="money-dp"),
        pytest.param(with_baseline(monthlyRevenue="NaN"), "/baseline/monthlyRevenue", id="nan"),
        pytest.param(
            with_assumptions(monthlyCostPerHead="Infinity"),
            "/assumptions/monthlyCostPerHead",
            id="assumption-money",
        ),
    ],
)
def test_malformed_field_is_named_by_its_own_pointer(
    client: TestClient, tenant: Tenant, event_log: EventLog, body: bytes, pointer: str
) -> None:
    position = event_log.position()

    response = client.post("/api/scenarios", content=body, headers=command_headers(tenant.writer))

    error = assert_refused(response, 400, VALIDATION, event_log, position)
    assert pointers_of(error) == [pointer]


def test_negative_monthly_costs_are_named_by_their_own_pointer(
    client: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    position = event_log.position()

    response = client.post(
        "/api/scenarios",
        content=with_baseline(monthlyCosts="-1.00"),
        headers=command_headers(tenant.writer),
    )

    error = assert_refused(response, 400, VALIDATION, event_log, position)
    assert pointers_of(error) == ["/baseline/monthlyCosts"]


# Spellings Python's Decimal() reads but API.md does not allow (a JSON string or number
# with at most 2 places: strings in plain decimal notation).
NOT_PLAIN = [
    pytest.param("1_000", id="underscores"),
    pytest.param(" 12 ", id="surrounding-spaces"),
    pytest.param("\u0661\u0662", id="arabic-indic-digits"),
    pytest.param("1e3", id="exponent"),
    pytest.param("+5", id="leading-plus"),
    pytest.param(".5", id="no-integer-part"),
    pytest.param("007", id="leading-zeros"),
]


@pytest.mark.parametrize("amount", NOT_PLAIN)
@pytest.mark.parametrize(
    ("body_of", "pointer"),
    [
        pytest.param(
            lambda a: with_baseline(openingCash=a), "/baseline/openingCash", id="baseline"
        ),
        pytest.param(
            lambda a: with_assumptions(monthlyCostPerHead=a),
            "/assumptions/monthlyCostPerHead",
            id="assumptions",
        ),
    ],
)
def test_money_string_must_be_a_plain_decimal(
    client: TestClient,
    tenant: Tenant,
    event_log: EventLog,
    amount: str,
    body_of: Callable[[str], bytes],
    pointer: str,
) -> None:
    position = event_log.position()

    response = client.post(
        "/api/scenarios", content=body_of(amount), headers=command_headers(tenant.writer)
    )

    error = assert_refused(response, 400, VALIDATION, event_log, position)
    assert pointers_of(error) == [pointer]
    assert "plain notation" in error["message"]


@pytest.mark.parametrize(
    "number", ["12.0000000000000001", "0.1000000000000000055511151231257827", "1.005"]
)
def test_a_money_number_is_read_exactly_as_written(
    client: TestClient, tenant: Tenant, event_log: EventLog, number: str
) -> None:
    # As a float, the first two read as 12.0 and 0.1: the places must be those written.
    position = event_log.position()

    response = client.post(
        "/api/scenarios",
        content=with_raw("baseline", "openingCash", number),
        headers=command_headers(tenant.writer),
    )

    error = assert_refused(response, 400, VALIDATION, event_log, position)
    assert pointers_of(error) == ["/baseline/openingCash"]
    assert "at most 2 decimal places" in error["message"]


@pytest.mark.parametrize(
    ("amount", "stored"),
    [
        pytest.param("1250.5", "1250.50", id="string"),
        pytest.param("-0.00", "0.00", id="negative-zero"),
        pytest.param(1250.5, "1250.50", id="number"),
        pytest.param(999_999_999_999.99, "999999999999.99", id="largest-number"),
        pytest.param(12, "12.00", id="integer"),
    ],
)
def test_plain_money_is_taken_exactly(
    client: TestClient, tenant: Tenant, amount: str | float, stored: str
) -> None:
    response = client.post(
        "/api/scenarios",
        content=with_baseline(openingCash=amount),
        headers=command_headers(tenant.writer),
    )

    assert response.status_code == 201, response.text
    assert response.json()["baseline"]["openingCash"] == stored


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"horizonMonths": "12"}, id="horizon-as-string"),
        pytest.param({"horizonMonths": 12.0}, id="horizon-as-float"),
        pytest.param({"horizonMonths": True}, id="horizon-as-boolean"),
        pytest.param({"horizonMonths": 0}, id="horizon-0"),
        pytest.param({"horizonMonths": 121}, id="horizon-121"),
        pytest.param({"horizonMonths": -1}, id="horizon-negative"),
        pytest.param({"horizonMonths": 10**30}, id="horizon-huge"),
        pytest.param({"horizonMonths": 12, "paths": "2000"}, id="paths-as-string"),
        pytest.param({"horizonMonths": 12, "paths": 0}, id="paths-0"),
        pytest.param({"horizonMonths": 12, "paths": 100_001}, id="paths-100001"),
        pytest.param({"horizonMonths": 12, "paths": None}, id="paths-null"),
        pytest.param({}, id="no-horizon"),
        pytest.param({"horizonMonths": 12, "status": "completed"}, id="unknown-field-status"),
        pytest.param({"horizonMonths": 12, "tenantId": "x"}, id="unknown-field-tenantId"),
        pytest.param({"horizonMonths": 12, "scenarioId": "not-a-uuid"}, id="scenario-id-not-uuid"),
    ],
)
def test_malformed_forecast_request_is_refused_and_appends_nothing(
    client: TestClient, tenant: Tenant, event_log: EventLog, scenario_id: str, body: dict[str, Any]
) -> None:
    position = event_log.position()

    response = client.post(
        "/api/forecasts/generate",
        json={"scenarioId": scenario_id, **body},
        headers=command_headers(tenant.writer),
    )

    assert_refused(response, 400, VALIDATION, event_log, position)


def test_forecast_horizon_and_paths_at_their_limits_are_accepted(
    client: TestClient, tenant: Tenant, scenario_id: str
) -> None:
    for horizon, paths in ((1, 1), (120, 100_000)):
        response = client.post(
            "/api/forecasts/generate",
            json={"scenarioId": scenario_id, "horizonMonths": horizon, "paths": paths},
            headers=command_headers(tenant.writer),
        )
        assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"id": str(uuid.uuid4())}, id="unknown-field-id"),
        pytest.param({"version": 9}, id="unknown-field-version"),
        pytest.param({"status": "archived"}, id="unknown-field-status"),
        pytest.param({"tenantId": str(uuid.uuid4())}, id="unknown-field-tenantId"),
        pytest.param({"type": "CUSTOM"}, id="type-is-fixed"),
        pytest.param({"name": ""}, id="name-empty"),
        pytest.param({"name": "x" * 201}, id="name-201-chars"),
        pytest.param({"name": None}, id="name-null"),
        pytest.param({"baseline": {"startMonth": "2026-13"}}, id="partial-baseline"),
        pytest.param(
            {"baseline": {**scenario_body()["baseline"], "startMonth": "2026-13"}},
            id="baseline-start-month-13",
        ),
        pytest.param(
            {"baseline": {**scenario_body()["baseline"], "cashAtBank": "1"}},
            id="baseline-unknown-field",
        ),
        pytest.param(
            {"assumptions": {"headcount": 2, "monthlyCostPerHead": "1", "bonus": 1}},
            id="assumptions-unknown-field",
        ),
        pytest.param(
            {"assumptions": {"headcount": "2", "monthlyCostPerHead": "1"}},
            id="assumptions-headcount-as-string",
        ),
    ],
)
def test_malformed_patch_is_refused_and_appends_nothing(
    client: TestClient, tenant: Tenant, event_log: EventLog, scenario_id: str, body: dict[str, Any]
) -> None:
    position = event_log.position()

    response = client.patch(
        f"/api/scenarios/{scenario_id}", json=body, headers=command_headers(tenant.writer)
    )

    assert_refused(response, 400, VALIDATION, event_log, position)


@pytest.mark.parametrize(
    "if_match",
    [
        pytest.param("abc", id="word"),
        pytest.param("", id="empty"),
        pytest.param("-1", id="negative"),
        pytest.param("1.0", id="decimal"),
        pytest.param('"1", "2"', id="list"),
        pytest.param("1234567890", id="ten-digits"),
        pytest.param('W/"x"', id="weak-non-number"),
    ],
)
def test_invalid_if_match_is_refused_and_appends_nothing(
    client: TestClient, tenant: Tenant, event_log: EventLog, scenario_id: str, if_match: str
) -> None:
    position = event_log.position()

    response = client.patch(
        f"/api/scenarios/{scenario_id}",
        json={"name": "Renamed"},
        headers={**command_headers(tenant.writer), "If-Match": if_match},
    )

    error = assert_refused(response, 400, VALIDATION, event_log, position)
    assert error["details"][0]["pointer"] == "/headers/If-Match"


def test_archive_with_an_unknown_field_is_refused_and_appends_nothing(
    client: TestClient, tenant: Tenant, event_log: EventLog, scenario_id: str
) -> None:
    position = event_log.position()

    response = client.post(
        f"/api/scenarios/{scenario_id}/archive",
        json={"status": "archived"},
        headers=command_headers(tenant.writer),
    )

    assert_refused(response, 400, VALIDATION, event_log, position)


IDEMPOTENCY_KEYS = [
    pytest.param(None, "IDEMPOTENCY_KEY_MISSING", id="missing"),
    pytest.param(b"", "IDEMPOTENCY_KEY_INVALID", id="empty"),
    pytest.param(b"   ", "IDEMPOTENCY_KEY_INVALID", id="blank"),
    pytest.param(b"k" * 256, "IDEMPOTENCY_KEY_INVALID", id="256-chars"),
    pytest.param(b"key\twith-tab", "IDEMPOTENCY_KEY_INVALID", id="tab"),
    pytest.param(b"key\x7fwith-del", "IDEMPOTENCY_KEY_INVALID", id="del-control-char"),
    pytest.param(b"caf\xe9", "IDEMPOTENCY_KEY_INVALID", id="latin-1-byte"),
    pytest.param("café".encode(), "IDEMPOTENCY_KEY_INVALID", id="utf8-non-ascii"),
]


@pytest.mark.parametrize(("key", "code"), IDEMPOTENCY_KEYS)
def test_bad_idempotency_key_is_refused_and_appends_nothing(
    client: TestClient, tenant: Tenant, event_log: EventLog, key: bytes | None, code: str
) -> None:
    position = event_log.position()
    headers = [
        (b"authorization", f"Bearer {tenant.writer}".encode()),
        (b"content-type", b"application/json"),
    ]
    if key is not None:
        headers.append((b"idempotency-key", key))

    response = client.post("/api/scenarios", content=with_fields(), headers=headers)

    assert_refused(response, 400, code, event_log, position)


def test_idempotency_key_of_255_printable_characters_is_accepted(
    client: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    position = event_log.position()
    key = ("~ !" + "k" * 252)[:255]

    response = client.post(
        "/api/scenarios", content=with_fields(), headers=command_headers(tenant.writer, key)
    )
    again = client.post(
        "/api/scenarios", content=with_fields(), headers=command_headers(tenant.writer, key)
    )

    assert response.status_code == 201, response.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert event_log.position() == position + 2  # the scenario and its receipt


def padded_to(size: int) -> bytes:
    """A valid scenario body, padded with JSON whitespace to exactly ``size`` bytes."""
    body = with_fields()
    return body[:-1] + b" " * (size - len(body)) + body[-1:]


def chunks_of(body: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_body_of_exactly_one_mebibyte_is_accepted(client: TestClient, tenant: Tenant) -> None:
    response = client.post(
        "/api/scenarios", content=padded_to(MIB), headers=command_headers(tenant.writer)
    )

    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "size", [pytest.param(MIB + 1, id="1-MiB-plus-1"), pytest.param(2 * MIB, id="2-MiB")]
)
def test_body_over_one_mebibyte_is_refused_and_appends_nothing(
    client: TestClient, tenant: Tenant, event_log: EventLog, size: int
) -> None:
    position = event_log.position()

    response = client.post(
        "/api/scenarios", content=padded_to(size), headers=command_headers(tenant.writer)
    )

    assert_refused(response, 413, "PAYLOAD_TOO_LARGE", event_log, position)


def test_chunked_body_over_one_mebibyte_is_refused_while_streaming(
    client: TestClient, tenant: Tenant, event_log: EventLog
) -> None:
    position = event_log.position()

    # A generator is sent without Content-Length, so only the streamed size can tell.
    response = client.post(
        "/api/scenarios",
        content=chunks_of(padded_to(2 * MIB), 64 * 1024),
        headers=command_headers(tenant.writer),
    )

    assert "content-length" not in response.request.headers
    assert_refused(response, 413, "PAYLOAD_TOO_LARGE", event_log, position)


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("text/plain", id="text-plain"),
        pytest.param(None, id="none"),
        pytest.param("application/x-www-form-urlencoded", id="form"),
        pytest.param("multipart/form-data; boundary=x", id="multipart"),
        pytest.param("application/jsonp", id="jsonp"),
    ],
)
def test_body_that_is_not_declared_json_is_refused_and_appends_nothing(
    client: TestClient, tenant: Tenant, event_log: EventLog, content_type: str | None
) -> None:
    position = event_log.position()
    headers = command_headers(tenant.writer)
    del headers["Content-Type"]
    if content_type is not None:
        headers["Content-Type"] = content_type

    response = client.post("/api/scenarios", content=with_fields(), headers=headers)

    assert response.request.headers.get("content-type") == content_type
    assert_refused(response, 415, "UNSUPPORTED_MEDIA_TYPE", event_log, position)


def test_archive_body_that_is_not_declared_json_is_refused(
    client: TestClient, tenant: Tenant, event_log: EventLog, scenario_id: str
) -> None:
    position = event_log.position()
    headers = {**command_headers(tenant.writer), "Content-Type": "text/plain"}

    response = client.post(f"/api/scenarios/{scenario_id}/archive", content=b"{}", headers=headers)

    assert_refused(response, 415, "UNSUPPORTED_MEDIA_TYPE", event_log, position)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "/api/nope", id="GET-unknown-api-path"),
        pytest.param("POST", "/api/scenario", id="POST-singular-typo"),
        pytest.param("POST", "/api/scenarios/{id}/restore", id="POST-unknown-sub-resource"),
        pytest.param("GET", "/", id="GET-root"),
    ],
)
def test_unknown_route_is_not_found_in_the_envelope(
    client: TestClient,
    tenant: Tenant,
    event_log: EventLog,
    scenario_id: str,
    method: str,
    path: str,
) -> None:
    position = event_log.position()

    response = client.request(
        method,
        path.format(id=scenario_id),
        content=b"{}",
        headers=command_headers(tenant.writer),
    )

    assert_refused(response, 404, "NOT_FOUND", event_log, position)


WRONG_METHODS = [
    pytest.param("PUT", "/api/scenarios", id="PUT-scenarios"),
    pytest.param("DELETE", "/api/scenarios/{id}", id="DELETE-scenario"),
    pytest.param("PUT", "/api/scenarios/{id}", id="PUT-scenario"),
    pytest.param("PATCH", "/api/scenarios/{id}/archive", id="PATCH-archive"),
    pytest.param("POST", "/health/live", id="POST-health"),
]


@pytest.mark.parametrize(("method", "path"), WRONG_METHODS)
def test_wrong_method_is_refused_in_the_envelope(
    client: TestClient,
    tenant: Tenant,
    event_log: EventLog,
    scenario_id: str,
    method: str,
    path: str,
) -> None:
    position = event_log.position()

    response = client.request(
        method,
        path.format(id=scenario_id),
        content=b"{}",
        headers=command_headers(tenant.writer),
    )

    assert_refused(response, 405, "METHOD_NOT_ALLOWED", event_log, position)


def test_wrong_method_names_the_allowed_methods(
    client: TestClient, tenant: Tenant, scenario_id: str
) -> None:
    response = client.delete(
        f"/api/scenarios/{scenario_id}", headers=command_headers(tenant.writer)
    )

    # RFC 9110: a 405 must carry Allow.
    assert response.status_code == 405
    allowed = {method.strip() for method in response.headers["Allow"].split(",")}
    assert "PATCH" in allowed
    assert "DELETE" not in allowed
