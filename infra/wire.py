"""Reading requests off the wire: size limit, media type, strict JSON decoding into
msgspec types, with every failure turned into a client error that names the field.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request

from domain import money
from infra.errors import PayloadTooLargeError, RequestValidationError, UnsupportedMediaTypeError

T = TypeVar("T")

_JSON_MEDIA_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
_PATH_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")
_NAMED_FIELD = re.compile(r"^`(\w+)` ")


def request_id_of(request: Request) -> str:
    """The id the service gave this request (echoed as X-Request-Id and in errors)."""
    request_id: str = request.state.request_id
    return request_id


async def read_body(request: Request, *, max_bytes: int, empty_ok: bool = False) -> bytes:
    """The raw body, refused early when the declared or actual size is over the limit.
    With ``empty_ok`` a request with no body at all stands for ``{}``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"request body is over {max_bytes} bytes")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_json = bool(_JSON_MEDIA_TYPE.match(media_type))
    if not is_json and not empty_ok:
        raise UnsupportedMediaTypeError(
            "request body must be JSON (Content-Type: application/json)"
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLargeError(f"request body is over {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # The client went away mid-body: its fault, never a server error (and nothing
        # of a partial body is acted on). Nobody may be left to read the answer.
        raise RequestValidationError(
            "the client closed the request before its whole body arrived"
        ) from None
    body = b"".join(chunks)
    if empty_ok and not body:
        return b"{}"
    if not is_json:
        raise UnsupportedMediaTypeError(
            "request body must be JSON (Content-Type: application/json)"
        )
    return body


# One decoder per body type (a decoder is built once, decoding is then cheaper). Money
# fields get their JSON value as sent (domain.money.decode_hook), numbers as the exact
# Decimal of their text; fields typed float or int are not affected by float_hook.
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _decoder(kind: type[T]) -> msgspec.json.Decoder[T]:
    found = _decoders.get(kind)
    if found is None:
        found = msgspec.json.Decoder(kind, dec_hook=money.decode_hook, float_hook=Decimal)
        _decoders[kind] = found
    return found


def decode(data: bytes | msgspec.Raw, kind: type[T], *, at: str = "") -> T:
    """Strictly decodes JSON into ``kind``; ``at`` prefixes error pointers (a nested part)."""
    try:
        return _decoder(kind).decode(data)
    except msgspec.ValidationError as e:
        raise validation_error(e, at=at) from None
    except msgspec.DecodeError as e:
        raise RequestValidationError(
            f"request body is not valid JSON: {e}",
            details=[{"pointer": at or "", "message": str(e)}],
        ) from None
    except UnicodeDecodeError:
        raise RequestValidationError("request body is not valid UTF-8") from None
    except RecursionError:
        raise RequestValidationError("request body is nested too deeply") from None


def validation_error(error: msgspec.ValidationError, *, at: str = "") -> RequestValidationError:
    """msgspec's "... - at `$.a.b[0]`" becomes a JSON pointer "/a/b/0"."""
    text = str(error)
    message, sep, path = text.rpartition(" - at `")
    if not sep:
        message, path = text, ""
    steps = [name or index for name, index in _PATH_STEP.findall(path.rstrip("`"))]
    # A check of one field made in its struct's __post_init__ is reported by msgspec at
    # the struct; such messages start with the field's name, which completes the pointer.
    named = _NAMED_FIELD.match(message)
    if named:
        steps.append(named.group(1))
    pointer = at + "".join("/" + step for step in steps)
    return RequestValidationError(
        f"{message} at {pointer or '/'}", details=[{"pointer": pointer, "message": message}]
    )


def detail(pointer: str, message: str) -> dict[str, Any]:
    return {"pointer": pointer, "message": message}
