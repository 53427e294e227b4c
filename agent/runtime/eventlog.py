"""What the node tells the log: its events, members coming and going, name conflicts."""

from __future__ import annotations

import logging

from flexmesh.agent.node import LogEvent
from flexmesh.protocol.membership import MemberEvent, NameConflict

log = logging.getLogger("flexmesh.agent")


def log_event(eff: LogEvent | MemberEvent | NameConflict) -> None:
    match eff:
        case LogEvent():
            log.info("%s %s", eff.event,
                     " ".join(f"{k}={_field(v)}" for k, v in eff.fields.items()))
        case MemberEvent():
            log.info("member name=%s state=%s prev=%s addr=%s", eff.name, eff.state,
                     eff.prev or "-", eff.addr)
        case NameConflict():
            log.error("name conflict: %s is at %s and a node at %s claims the name too; "
                      "refused (every node needs a name of its own)", eff.name, eff.known,
                      eff.other)


def _field(value: object) -> str:
    """A log field as text: one that is not plainly printable (a newline, an escape sent
    by a peer) is written quoted and escaped, so no field can forge a log line."""
    text = str(value)
    return text if text.isprintable() else repr(text)
