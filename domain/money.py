"""Money: exact decimals with at most two places, bounded so no arithmetic can overflow."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

CENT = Decimal("0.01")
# A trillion in any currency is beyond every tenant's plan and keeps float64 exact to the cent.
MONEY_LIMIT = Decimal("1000000000000")


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
