"""The token settings' syntax, checked at start: ``YOLO_OTA_OPERATOR_TOKENS`` and ``YOLO_OTA_ENROLLMENT_TOKEN``.

Each is a comma-separated list of entries ``name=token`` (operator entries may give a scope: ``name:scope=token``;
without one it is ``admin``). A bare token (no ``=``) is still read, named ``operator-<n>`` or ``enrollment-<n>``
by its place. An entry is refused with one line when it cannot be read one way only or is too short to guess at:

- the token part is shorter than ``MIN_TOKEN_CHARS``: a bare base64 token with padding (``Zm9v...NA==``) splits
  at its first ``=`` into a "name" and the token ``=``, and is refused here rather than accepted as ``=``;
- the name is not a name (letters, digits, ``. _ -``, at most 64) or the scope is not read | operate | admin;
- two entries share a name or a token.

Only settings are seeded this way; tokens made with ``yolo-ota tokens create`` are 43 random characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

MIN_TOKEN_CHARS = 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Scope(StrEnum):
    """What an operator token may do; each includes the ones before it."""

    read = "read"  # see devices, rollouts, the audit log
    operate = "operate"  # start, steer, approve and reject rollouts
    admin = "admin"  # accept and retire devices, make and revoke tokens

    def includes(self, other: Scope) -> bool:
        order = list(Scope)
        return order.index(self) >= order.index(other)


@dataclass(frozen=True)
class StoredToken:
    """What is kept of a token besides its digest: where it came from, who made it, until when it works."""

    name: str
    source: str  # setting | api
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > datetime.now(UTC))


@dataclass(frozen=True)
class TokenEntry:
    name: str
    token: str
    scope: Scope = Scope.admin


def parse_entries(text: str | None, *, setting: str, bare_prefix: str, scoped: bool) -> list[TokenEntry]:
    """The entries of one token setting; ``ValueError`` with one line naming the setting and the entry."""
    entries: list[TokenEntry] = []
    for index, raw in enumerate((part.strip() for part in (text or "").split(",")), start=1):
        if not raw:
            continue
        entries.append(_entry(raw, index, setting=setting, bare_prefix=bare_prefix, scoped=scoped))
    for attribute in ("name", "token"):
        values = [getattr(e, attribute) for e in entries]
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            shown = repeated[0] if attribute == "name" else "(hidden)"
            raise ValueError(f"{setting}: two entries have the same {attribute} {shown}")
    return entries


def _entry(raw: str, index: int, *, setting: str, bare_prefix: str, scoped: bool) -> TokenEntry:
    where = f"{setting}, entry {index}"
    label, sep, token = raw.partition("=")
    if not sep:
        label, token = f"{bare_prefix}-{index}", raw
    label, token = label.strip(), token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        hint = (
            " (a base64 token ending in '=' needs a name in front: name=token)" if sep and not token.strip("=") else ""
        )
        raise ValueError(f"{where}: the token is {len(token)} characters; at least {MIN_TOKEN_CHARS} are needed{hint}")
    name, _, scope_text = label.partition(":") if scoped else (label, "", "")
    if not _NAME.match(name):
        # the name is not shown: with a bare token that holds an '=', it would be a piece of the token
        raise ValueError(f"{where}: the part before '=' is not a name (letters, digits, . _ -; at most 64)")
    try:
        scope = Scope(scope_text) if scope_text else Scope.admin
    except ValueError:
        raise ValueError(f"{where}: scope {scope_text!r} is not one of read, operate, admin") from None
    return TokenEntry(name=name, token=token, scope=scope)
