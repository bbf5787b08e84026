"""Scenario commands: create, update (with optional If-Match), archive."""

from __future__ import annotations

from typing import TypeVar
from uuid import UUID

import msgspec

from commands import messages, views
from commands.context import Collaborators, CommandContext
from commands.errors import NotFoundError, VersionConflictError
from commands.idempotency import Outcome, Plan, Reply, first_try_async, run
from domain import scenario_spec as spec
from domain.scenario import Scenario
from infra import wire

T = TypeVar("T")


def load_scenario(deps: Collaborators, ctx: CommandContext, scenario_id: UUID) -> Scenario:
    scenario = deps.log.find(scenario_id, Scenario)
    # Another tenant's scenario is indistinguishable from a missing one.
    if scenario is None or scenario.tenant_id != ctx.actor.tenant_id:
        raise NotFoundError(f"scenario {scenario_id} not found")
    return scenario


def decode_assumptions(raw: msgspec.Raw, scenario_type: str) -> spec.Assumptions:
    return wire.decode(raw, spec.ASSUMPTIONS_BY_TYPE[scenario_type], at="/assumptions")


def _answer(scenario: Scenario, status: int) -> Outcome:
    headers = {"ETag": f'"{scenario.version}"'}
    if status == 201:
        headers["Location"] = f"/api/scenarios/{scenario.id}"
    return Outcome([scenario], status, views.encode(views.scenario_view(scenario)), headers)


CREATE_ROUTE = "POST /api/scenarios"


def _create_plan(
    deps: Collaborators, ctx: CommandContext, body: messages.CreateScenarioBody
) -> Plan:
    command = messages.CreateScenario(
        name=body.name,
        baseline=body.baseline,
        assumptions=decode_assumptions(body.assumptions, body.type),
    )

    def decide() -> Outcome:
        scenario = Scenario.create(
            ctx.actor,
            scenario_id=deps.new_id(),
            name=command.name,
            baseline=command.baseline,
            assumptions=command.assumptions,
            at=deps.clock(),
        )
        return _answer(scenario, 201)

    return Plan(command, decide)


def create_scenario(
    deps: Collaborators, ctx: CommandContext, body: messages.CreateScenarioBody
) -> Reply:
    plan = _create_plan(deps, ctx, body)
    return run(deps, ctx, CREATE_ROUTE, lambda: plan)


async def try_create_scenario(
    deps: Collaborators, ctx: CommandContext, body: messages.CreateScenarioBody
) -> Reply | None:
    """create_scenario's common case on the event loop (creating reads nothing); None
    when create_scenario must answer (see first_try_async)."""
    return await first_try_async(deps, ctx, CREATE_ROUTE, _create_plan(deps, ctx, body))


def update_scenario(
    deps: Collaborators,
    ctx: CommandContext,
    scenario_id: UUID,
    body: messages.UpdateScenarioBody,
    if_match: int | None,
) -> Reply:
    def attempt() -> Plan:
        scenario = load_scenario(deps, ctx, scenario_id)
        name = _given(body.name)
        baseline = _given(body.baseline)
        raw_assumptions = _given(body.assumptions)
        assumptions = (
            None if raw_assumptions is None else decode_assumptions(raw_assumptions, scenario.type)
        )
        command = messages.UpdateScenario(
            scenario_id=scenario_id,
            name=msgspec.UNSET if name is None else name,
            baseline=msgspec.UNSET if baseline is None else baseline,
            assumptions=msgspec.UNSET if assumptions is None else assumptions,
        )

        def decide() -> Outcome:
            if if_match is not None and if_match != scenario.version:
                raise VersionConflictError(
                    f"scenario {scenario_id} is at version {scenario.version}, not {if_match}"
                )
            scenario.update(
                ctx.actor, name=name, baseline=baseline, assumptions=assumptions, at=deps.clock()
            )
            return _answer(scenario, 200)

        return Plan(command, decide)

    return run(deps, ctx, f"PATCH /api/scenarios/{scenario_id}", attempt)


def archive_scenario(deps: Collaborators, ctx: CommandContext, scenario_id: UUID) -> Reply:
    command = messages.ArchiveScenario(scenario_id=scenario_id)

    def attempt() -> Plan:
        scenario = load_scenario(deps, ctx, scenario_id)

        def decide() -> Outcome:
            scenario.archive(ctx.actor, at=deps.clock())
            return _answer(scenario, 200)

        return Plan(command, decide)

    return run(deps, ctx, f"POST /api/scenarios/{scenario_id}/archive", attempt)


def _given(value: T | msgspec.UnsetType) -> T | None:
    return None if isinstance(value, msgspec.UnsetType) else value
