#!/usr/bin/env python3
"""Verifies an AccuBooks audit export offline (`accubooks audit export`), with no code of
AccuBooks: the Python standard library only, plus the `cryptography` package, if it is
installed, to check the checkpoint's Ed25519 signature.

    python3 verify_export.py EXPORT.jsonl [--public-key B64]

It recomputes every event's hash from its stored bytes and the chain over them, checks
both against the file, then checks the last chain value, the event count and the position
against the signed checkpoint in the header. Pass the service's public key as you obtained
it earlier (``--public-key``): the key in the file only proves the file agrees with
itself. Prints OK, or the first bad line and position; exit status 0 when OK, 1 otherwise,
2 when the file cannot be read. The layout is in docs/AUDITING.md.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import sys
from collections.abc import Iterator
from typing import Any

FORMAT = "accubooks-audit-export"
VERSION = 1
EVENT_FORMAT = b"accubooks-event/1"
CHECKPOINT_FORMAT = b"accubooks-checkpoint/1"
GENESIS = "00" * 32


class Bad(Exception):
    """The export does not verify; the message says where and why."""


def canonical_bytes(
    position: int, aggregate_id: str, version: int, topic: str, state: bytes
) -> bytes:
    header = b"\n".join(
        [
            EVENT_FORMAT,
            str(position).encode(),
            aggregate_id.encode(),
            str(version).encode(),
            topic.encode(),
            str(len(state)).encode(),
        ]
    )
    return header + b"\n" + state


def chain_next(previous: str, event_hash: str) -> str:
    return hashlib.sha256(bytes.fromhex(previous) + bytes.fromhex(event_hash)).hexdigest()


def checkpoint_message(checkpoint: dict[str, Any]) -> bytes:
    return b"\n".join(
        [
            CHECKPOINT_FORMAT,
            str(checkpoint["tenantId"]).encode(),
            str(checkpoint["position"]).encode(),
            str(checkpoint["chainHash"]).encode(),
            str(checkpoint["eventCount"]).encode(),
        ]
    )


def check_signature(checkpoint: dict[str, Any], public_key: str) -> str:
    """A sentence on the signature; raises Bad when it does not verify."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        return (
            "signature NOT checked: the `cryptography` package is not installed (check it"
            " with any Ed25519 tool: the message is in docs/AUDITING.md)"
        )
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
        signature = base64.b64decode(str(checkpoint.get("signature", "")), validate=True)
        key.verify(signature, checkpoint_message(checkpoint))
    except (InvalidSignature, ValueError, binascii.Error) as e:
        raise Bad(f"the checkpoint's signature does not verify with the public key ({e!r})") from e
    return "signature valid (Ed25519)"


def records(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, decoded line) of every non-empty line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                decoded = json.loads(line)
            except json.JSONDecodeError as e:
                raise Bad(f"line {number}: not JSON ({e})") from e
            if not isinstance(decoded, dict):
                raise Bad(f"line {number}: not a JSON object")
            yield number, decoded


def verify(path: str, public_key: str | None) -> list[str]:
    """The sentences of a successful check; raises Bad at the first problem."""
    lines = records(path)
    first = next(lines, None)
    if first is None:
        raise Bad("the file is empty")
    _, header = first
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise Bad(f"line 1: not an {FORMAT} version {VERSION} header")
    checkpoint = header["checkpoint"]
    if checkpoint.get("tenantId") != header.get("tenantId"):
        raise Bad("line 1: the checkpoint is of another tenant than the export")
    chain, count, last = GENESIS, 0, 0
    for number, event in lines:
        where = f"line {number} (position {event.get('position')})"
        try:
            position = int(event["position"])
            state = base64.b64decode(event["state"], validate=True)
            record = canonical_bytes(
                position,
                str(event["aggregateId"]),
                int(event["version"]),
                str(event["type"]),
                state,
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise Bad(f"{where}: malformed ({e!r})") from e
        if position <= last:
            raise Bad(f"{where}: positions must increase (after {last})")
        hashed = hashlib.sha256(record).hexdigest()
        if event.get("eventHash") != hashed:
            raise Bad(
                f"{where}: the event's bytes hash to {hashed},"
                f" the line says {event.get('eventHash')}"
            )
        chain = chain_next(chain, hashed)
        if event.get("chainHash") != chain:
            raise Bad(
                f"{where}: the chain gives {chain}, the line says {event.get('chainHash')}"
                " (an event before it was removed, inserted or reordered)"
            )
        count, last = count + 1, position
    if (chain, count, last) != (
        checkpoint["chainHash"],
        checkpoint["eventCount"],
        checkpoint["position"],
    ):
        raise Bad(
            f"end of file (position {last}): the file gives chain {chain} after {count} events,"
            f" the signed checkpoint says {checkpoint['chainHash']} after"
            f" {checkpoint['eventCount']} events at position {checkpoint['position']}"
        )
    notes = [f"{count} events of tenant {header['tenantId']} up to position {last}, chain {chain}"]
    key = public_key or str(header.get("publicKey", ""))
    if public_key and header.get("publicKey") != public_key:
        notes.append("note: the file names another public key than the one given")
    notes.append(check_signature(checkpoint, key))
    if not public_key:
        notes.append(
            "note: checked with the public key in the file; pass --public-key with the key"
            " you obtained from the service to rule out a re-signed file"
        )
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="the JSON lines file `accubooks audit export` wrote")
    parser.add_argument("--public-key", help="the service's Ed25519 public key (base64)")
    args = parser.parse_args(argv)
    try:
        notes = verify(args.export, args.public_key)
    except Bad as e:
        print(f"BAD: {e}")
        return 1
    except OSError as e:
        print(f"cannot read {args.export}: {e.strerror}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError) as e:
        print(f"BAD: line 1: malformed header ({e!r})")
        return 1
    print("OK: " + "\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
