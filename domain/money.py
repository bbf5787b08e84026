"""Money: exact decimals with at most two places, bounded so no arithmetic can overflow."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

CENT = Decimal("0.01")
# A trillion in any currency is beyond every tenant's plan and keeps float64 exact to the cent.
MONEY_LIMIT = Decimal("1000000000000")

# The form clients should send as a string: plain decimal notation, at most 2 places,
# below 10^12 in absolute value (what the document says; places and range are checked
# by checked_money, with their own messages).
MONEY_STRING_PATTERN = r"^-?(0|[1-9][0-9]{0,11})(\.[0-9]{1,2})?$"
# What a money string may look like at all: the pattern's shape (ASCII digits, no leading
# zero, an optional minus and point), any number of places and digits (checked_money then
# says which rule a well-formed amount breaks). Decimal() itself would also read '1_000',
# ' 12 ', other scripts' digits, exponents and a leading '+'.
_PLAIN = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?", re.ASCII)


_JSON_NAMES = {bool: "bool", type(None): "null", list: "array", dict: "object"}


class Money(Decimal):
    """The declared type of a money field. msgspec knows no such type, so it hands the
    field's JSON value as it is (a string or a number) to ``decode_hook`` instead of
    reading it with Decimal(); the struct then keeps the plain Decimal that checked_money
    makes of it (msgspec encodes that, not a Money)."""


if TYPE_CHECKING:
    # To the type checker a money field is the Decimal it holds, so code building
    # structs in Python passes Decimals; only msgspec, at run time, sees Money.
    MoneyField = Decimal
else:
    MoneyField = Annotated[
        Money,
        msgspec.Meta(
            extra_json_schema={
                "type": ["string", "number"],
                "format": "decimal",
                "pattern": MONEY_STRING_PATTERN,
            }
        ),
    ]


def decode_hook(kind: type, value: Any) -> Any:
    """msgspec's dec_hook for every type holding money. A JSON string must be in plain
    decimal notation. A JSON number arrives as an int, or as the exact Decimal of its text
    from a decoder with ``float_hook=Decimal`` (infra.wire's), so that 12.0000000000000001
    is refused for its places instead of being read as the float 12.0; a float (from
    msgspec.convert of Python values) is read back by its shortest form."""
    if kind is not Money:
        raise TypeError(f"no decoder for {kind!r}")
    if isinstance(value, str):
        if not _PLAIN.fullmatch(value):
            raise ValueError('must be a decimal in plain notation, like "1250.00"')
        return Money(value)
    if isinstance(value, Decimal):
        return Money(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"Expected `decimal`, got `{_JSON_NAMES.get(type(value), 'value')}`")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite amount")
    return Money(repr(value)) if isinstance(value, float) else Money(value)


def checked_money(value: Decimal, field: str) -> Decimal:
    """The amount normalised to two places; ValueError names the field when it is not money."""
    if not value.is_finite():
        raise ValueError(f"`{field}` must be a finite amount")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2:
        raise ValueError(f"`{field}` must have at most 2 decimal places")
    if abs(value) >= MONEY_LIMIT:
        raise ValueError(f"`{field}` must be below {MONEY_LIMIT} in absolute value")
    # Normalised, and never "-0.00".
    return value.quantize(CENT) + 0


def normalise_money_fields(struct: msgspec.Struct, *names: str) -> None:
    """Validate and normalise the money fields of a (frozen) struct in its __post_init__."""
    encoded = dict(zip(struct.__struct_fields__, struct.__struct_encode_fields__, strict=True))
    for name in names:
        value: Any = getattr(struct, name)
        msgspec.structs.force_setattr(struct, name, checked_money(value, encoded[name]))
