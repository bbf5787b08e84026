"""Forecast commands: a request appends ForecastRequested; generation follows the log."""

from __future__ import annotations

from commands import messages, views
from commands.context import Collaborators, CommandContext
from commands.idempotency import Outcome, Plan, Reply, run
from commands.scenarios import load_scenario
from domain.forecast import QUEUED, Forecast


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
            body = views.encode(views.ForecastAccepted(forecast_id=forecast.id, status=QUEUED))
            return Outcome([forecast], 202, body, {"Location": f"/api/forecasts/{forecast.id}"})

        return Plan(command, decide)

    return run(deps, ctx, "POST /api/forecasts/generate", attempt)
