"""The job broker (Dramatiq): Redis or RabbitMQ in production (BROKER_URL), the in-process
stub broker in the embedded process. Queue and actor names live here because the
dispatcher (projections) sends what the actor (commands) receives."""

from __future__ import annotations

import dramatiq
import pika.exceptions
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage

from infra.errors import InfraError
from infra.settings import Settings

FORECAST_QUEUE = "forecasts"
GENERATE_FORECAST = "generate_forecast"


class BrokerUnavailableError(InfraError):
    """Raised when a message cannot be handed to the broker (it is down or too slow)."""

    code = "SERVICE_UNAVAILABLE"


def open_broker(settings: Settings) -> dramatiq.Broker:
    url = settings.broker_url
    broker: dramatiq.Broker
    if not url:
        broker = StubBroker()
    elif url.startswith(("redis://", "rediss://", "unix://")):
        # Fail fast instead of hanging on a black-holed broker: the dispatcher retries.
        client = redis.Redis.from_url(
            url,
            socket_timeout=settings.broker_timeout_s,
            socket_connect_timeout=settings.broker_timeout_s,
        )
        broker = RedisBroker(  # type: ignore[no-untyped-call]
            client=client,
            namespace="accubooks",
            heartbeat_timeout=round(settings.broker_heartbeat_timeout_s * 1000),
        )
    elif url.startswith(("amqp://", "amqps://")):
        # Publisher confirms: a message counts as sent only once RabbitMQ has it.
        broker = RabbitmqBroker(url=url, confirm_delivery=True)
    else:
        raise SystemExit(f"invalid setting: BROKER_URL must be redis:// or amqp://, not {url!r}")
    # Jobs record which message caused their events (the request id of a worker's event).
    broker.add_middleware(CurrentMessage())
    broker.declare_queue(FORECAST_QUEUE)
    return broker


def send_generate_forecast(broker: dramatiq.Broker, forecast_id: str) -> None:
    message: dramatiq.Message[None] = dramatiq.Message(
        queue_name=FORECAST_QUEUE,
        actor_name=GENERATE_FORECAST,
        args=(forecast_id,),
        kwargs={},
        options={},
    )
    try:
        broker.enqueue(message)
    except (
        dramatiq.errors.BrokerError,
        pika.exceptions.AMQPError,
        redis.RedisError,
        OSError,
    ) as e:
        raise BrokerUnavailableError(f"the job broker is unavailable: {e}") from e
