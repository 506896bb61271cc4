"""The storage layer: the NID tables in Synapse's main database.

Everything above it (the runtime, the commands) uses the names below; the
files behind them are described in ``store``.
"""

from synapse_nidstate.storage.base import WriteScope
from synapse_nidstate.storage.block_strings import MIN_ENTRIES as BLOCK_STRINGS_MIN_ENTRIES
from synapse_nidstate.storage.common import (
    CacheMiss,
    CorruptState,
    EventRow,
    GroupStep,
    WriteCounters,
    arguments_by_name,
    in_list_clause,
)
from synapse_nidstate.storage.groups import KnownStates
from synapse_nidstate.storage.resolved import ResolvedChanges, ResolvedState
from synapse_nidstate.storage.savepoint import Contained, in_savepoint, must_retry
from synapse_nidstate.storage.store import NidStore

__all__ = [
    "BLOCK_STRINGS_MIN_ENTRIES",
    "CacheMiss",
    "Contained",
    "CorruptState",
    "EventRow",
    "GroupStep",
    "KnownStates",
    "NidStore",
    "ResolvedChanges",
    "ResolvedState",
    "WriteCounters",
    "WriteScope",
    "arguments_by_name",
    "in_list_clause",
    "in_savepoint",
    "must_retry",
]
