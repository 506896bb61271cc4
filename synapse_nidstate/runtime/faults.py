"""What happens when the module's own read fails: counted, logged once per
cause, and answered by Synapse where Synapse's rows can answer.

A read of the NID tables can fail (a row missing, a value not matching its
content hash, a table dropped under a running server, a bug of ours). Where
the state groups involved still have their rows in ``state_groups_state``,
Synapse's own read is the right answer and the caller falls back to it (the
``failed`` outcome of ``synapse_nidstate_lookups_total`` and
``synapse_nidstate_group_reads_total``). Where a group on the way is
reclaimed, its rows are gone, Synapse's read would silently answer a wrong
state, and the request fails instead with :class:`StateUnavailable` (outcome
``unavailable``).
"""

import logging
import traceback

from synapse.api.errors import Codes, SynapseError

logger = logging.getLogger(__name__)

#: Distinct causes logged with their traceback, per process; then only counted.
MAX_LOGGED_CAUSES = 100


class StateUnavailable(SynapseError):
    """The state of a reclaimed state group could not be read from the NID
    tables, and Synapse's rows for it are gone: the request fails (HTTP 500,
    with this message) rather than answer a wrong state."""

    def __init__(self, what: str) -> None:
        super().__init__(
            500,
            f"The room state this request needs is unavailable on this server "
            f"(synapse-nidstate: {what}). The server's administrator has been told.",
            Codes.UNKNOWN,
        )


class FaultLog:
    """Logs each cause of a failed read once (then counts it silently); a cause
    is where the error was raised, its type and what followed, not its message
    (which names rows, and would log every read of a broken room)."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str, int, bool]] = set()

    def report(self, what: str, error: BaseException, fallback: bool) -> None:
        """Log ``error`` (raised while reading ``what``), once per cause."""
        origin = error.__cause__ if error.__cause__ is not None else error
        frames = traceback.extract_tb(origin.__traceback__)
        last = frames[-1] if frames else None
        # With what followed: the same error answered by Synapse, or failing the
        # request where the group is reclaimed, is logged once each.
        cause = (
            type(origin).__name__,
            last.filename if last else "",
            last.lineno or 0 if last else 0,
            fallback,
        )
        consequence = (
            "answered by Synapse's own rows instead"
            if fallback
            else "the request fails: a reclaimed group's rows are gone, "
            "run `synapse-nidstate verify` and see the README's Safety section"
        )
        if cause in self._seen or len(self._seen) >= MAX_LOGGED_CAUSES:
            logger.debug("synapse-nidstate: read of %s failed (%s); %s", what, origin, consequence)
            return
        self._seen.add(cause)
        logger.error(
            "synapse-nidstate: read of %s failed; %s (logged once per cause, "
            "then counted in synapse_nidstate_*_total{outcome=\"%s\"})",
            what,
            consequence,
            "failed" if fallback else "unavailable",
            exc_info=(type(origin), origin, origin.__traceback__),
        )
