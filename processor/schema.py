"""Which Stripe event shapes this build understands; anything newer is dead-lettered `unknown-schema`.

A snapshot event is rendered in the API version of its webhook endpoint. Versions are dated
(`2026-10-28.endive`); paybus' handlers were written against its Stripe SDK's pinned version, so an
event rendered for a *later* version may have moved or renamed fields. Applying it could silently
write wrong state, so it waits in the dead letters until paybus is upgraded, then `paybus dlq requeue
--reason unknown-schema` applies it. Older versions are accepted: the fields the handlers read have
been stable for years (and localstripe sends 2017-era events). Events without a version are accepted.
"""

from __future__ import annotations

import re
from typing import Final

from stripe._api_version import _ApiVersion

NEWEST_KNOWN_API_VERSION: Final = _ApiVersion.CURRENT
_DATED: Final = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:\.[a-z0-9_]+)?$")


def unknown_schema(api_version: str | None, newest_known: str = NEWEST_KNOWN_API_VERSION) -> str | None:
    """Why an event of ``api_version`` cannot be applied by this build, or None when it can."""
    if api_version is None:
        return None
    match = _DATED.match(api_version)
    if match is None:
        return f"unrecognised Stripe API version {api_version[:40]!r}"
    newest = _DATED.match(newest_known)
    assert newest is not None
    if match.group(1) > newest.group(1):
        return f"Stripe API version {api_version} is newer than {newest_known}, the newest this build knows"
    return None
