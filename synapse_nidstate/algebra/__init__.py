"""The pure NID state algebra: no database, no Synapse.

``types``: the vocabulary (entries, blocks, snapshots, limits); ``state``: the
calculus (resolve, deltas, compaction, extending a snapshot, filters in NIDs);
``encoding``: the stored byte forms and the dedupe hashes. The names below are
the algebra's interface; the storage layer uses nothing else.
"""

from synapse_nidstate.algebra.encoding import (
    block_hash,
    content_hash,
    pack_block,
    pack_nids,
    snapshot_hash,
    unpack_block,
    unpack_nids,
)
from synapse_nidstate.algebra.state import (
    NidFilter,
    SnapshotPlan,
    changes,
    compact,
    delta,
    extend,
    full,
    lookup,
    make_block,
    resolve,
)
from synapse_nidstate.algebra.types import (
    COMPACTED_BLOCKS_TARGET,
    MAX_BLOCKS,
    MIN_CHUNK_ENTRIES,
    AlgebraError,
    Block,
    Entry,
    NidStateMap,
    StateKeyNids,
)

__all__ = [
    "COMPACTED_BLOCKS_TARGET",
    "MAX_BLOCKS",
    "MIN_CHUNK_ENTRIES",
    "AlgebraError",
    "Block",
    "Entry",
    "NidFilter",
    "NidStateMap",
    "SnapshotPlan",
    "StateKeyNids",
    "block_hash",
    "changes",
    "compact",
    "content_hash",
    "delta",
    "extend",
    "full",
    "lookup",
    "make_block",
    "pack_block",
    "pack_nids",
    "resolve",
    "snapshot_hash",
    "unpack_block",
    "unpack_nids",
]
