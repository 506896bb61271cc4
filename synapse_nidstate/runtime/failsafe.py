"""Synapse without the module never reads a database whose groups are reclaimed.

While any state group's rows are reclaimed, Synapse's ``schema_compat_version``
holds ``RECLAIMED_COMPAT_VERSION`` (``storage.reclaim`` sets it in the
transaction that reclaims the first group and puts the original back in the
one that restores the last). Synapse checks that value before it touches
anything else, on every process, and ``synapse_port_db`` checks it on the
SQLite database it would copy: both refuse with "Cannot use this database as
it is too new for the server to understand". Synapse's message cannot be
changed from the database; README's "Reclaim" says what it means here.

A process that loads the module (its ``parse_config`` runs before Synapse
prepares the database) or runs the module's CLI reads past the marker:
:func:`install` wraps ``prepare_database._upgrade_existing_database`` to give
Synapse the compat version it had, and to set the marker again in the same
transaction if Synapse raised the version (an upgrade of Synapse).

:func:`check_start_up` then refuses a configuration that would read
reclaimed groups from Synapse's rows: a mode other than ``serve``, or a state
database apart from the main one (where the group reads are not routed).
"""

import functools
import inspect
import logging
from typing import TYPE_CHECKING, Any

import attr
from synapse.config._base import ConfigError
from synapse.storage import prepare_database

from synapse_nidstate.storage.reclaim import (
    RECLAIMED_COMPAT_VERSION,
    reclaimed_group_count,
    saved_compat_version_txn,
    set_marker_txn,
)
from synapse_nidstate.storage.schema import on_own_connection

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

#: Tells Synapse what to do when the marker stops it.
RESTORE_HINT = (
    "state groups of this database are reclaimed by synapse-nidstate: keep "
    "synapse_nidstate.NidStateModule in homeserver.yaml with mode: serve, or run "
    "`synapse-nidstate restore -c homeserver.yaml` before removing it"
)


def install() -> None:
    """Let this process's Synapse prepare a reclaimed database (idempotent)."""
    original = prepare_database._upgrade_existing_database
    if getattr(original, "_nidstate_failsafe", False):
        return

    signature = inspect.signature(original)

    @functools.wraps(original)
    def _upgrade_existing_database(*args: Any, **kwargs: Any) -> None:
        bound = signature.bind(*args, **kwargs)
        cur, state = bound.arguments["cur"], bound.arguments["current_schema_state"]
        if state.compat_version != RECLAIMED_COMPAT_VERSION:
            return original(*args, **kwargs)
        saved = saved_compat_version_txn(cur)
        logger.info("synapse-nidstate: %s", RESTORE_HINT)
        bound.arguments["current_schema_state"] = attr.evolve(state, compat_version=saved)
        original(*bound.args, **bound.kwargs)
        # Synapse raised the version (an upgrade): keep the new one, mark again.
        set_marker_txn(cur)

    _upgrade_existing_database._nidstate_failsafe = True  # type: ignore[attr-defined]
    prepare_database._upgrade_existing_database = _upgrade_existing_database


def check_start_up(hs: "HomeServer", mode: str, serves_group_reads: bool) -> int:
    """How many groups are reclaimed; ConfigError where this process would read
    them from Synapse's (deleted) rows."""
    db_pool = hs.get_datastores().main.db_pool
    if getattr(db_pool.engine, "_is_in_memory", False):
        return 0  # a new database on every connection: nothing reclaimed
    count = on_own_connection(hs, reclaimed_group_count)
    if count and (mode != "serve" or not serves_group_reads):
        why = (
            f"mode is {mode!r}"
            if mode != "serve"
            else "the state database is not the main database"
        )
        raise ConfigError(
            f"synapse-nidstate: {count} state groups are reclaimed but {why}, so "
            f"Synapse would read them from rows that no longer exist; {RESTORE_HINT}",
            ("modules", "synapse_nidstate", "mode"),
        )
    return count
