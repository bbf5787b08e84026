"""Forecast commands: a request appends ForecastRequested; generation follows the log."""

from __future__ import annotations

from commands import messages, views
from commands.context import Collaborators, CommandContext
from commands.errors import QueueFullError
from commands.idempotency import Outcome, Plan, Reply, run
from commands.scenarios import load_scenario
from domain.forecast import QUEUED, Forecast


def admit(deps: Collaborators, ctx: CommandContext) -> None:
    """Refuses a forecast while the queue is at its limit. Counted on the queue read model,
    so concurrent requests may pass a limit by the few the projection has not seen yet."""
    if deps.queue is None:
        return
    total, tenant = deps.queue.depth(ctx.actor.tenant_id)
    if total >= deps.queue.total or tenant >= deps.queue.per_tenant:
        raise QueueFullError("Forecast queue is full. Please try again later.")


def request_forecast(
    deps: Collaborators, ctx: CommandContext, body: messages.GenerateForecastBody
) -> Reply:
    command = messages.RequestForecast(
        scenario_id=body.scenario_id, horizon_months=body.horizon_months, paths=body.paths
    )

    def attempt() -> Plan:
        scenario = load_scenario(deps, ctx, command.scenario_id)

        def decide() -> Outcome:
            forecast = Forecast.request(
                ctx.actor,
                forecast_id=deps.new_id(),
                scenario=scenario,
                horizon_months=command.horizon_months,
                paths=command.paths,
                at=deps.clock(),
            )
            # Business rules first (an archived scenario is 422 whatever the queue).
            admit(deps, ctx)
            body = views.encode(views.ForecastAccepted(forecast_id=forecast.id, status=QUEUED))
            return Outcome([forecast], 202, body, {"Location": f"/api/forecasts/{forecast.id}"})

        return Plan(command, decide)

    return run(deps, ctx, "POST /api/forecasts/generate", attempt)
