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
    pack_strings,
    snapshot_hash,
    unpack_block,
    unpack_block_checked,
    unpack_nids,
    unpack_nids_checked,
    unpack_strings,
)
from synapse_nidstate.algebra.state import (
    NidFilter,
    SnapshotPlan,
    block_key_range,
    changes,
    compact,
    delta,
    extend,
    full,
    key_number,
    lookup,
    make_block,
    merge_point,
    ranges_meet,
    rebase,
    resolve,
)
from synapse_nidstate.algebra.types import (
    COMPACTED_BLOCKS_TARGET,
    KEY_NID_LIMIT,
    MAX_BLOCKS,
    MAX_KEY_NUMBER,
    MIN_CHUNK_ENTRIES,
    AlgebraError,
    Block,
    Entry,
    NidStateMap,
    StateKeyNids,
)

__all__ = [
    "COMPACTED_BLOCKS_TARGET",
    "KEY_NID_LIMIT",
    "MAX_BLOCKS",
    "MAX_KEY_NUMBER",
    "MIN_CHUNK_ENTRIES",
    "AlgebraError",
    "Block",
    "Entry",
    "NidFilter",
    "NidStateMap",
    "SnapshotPlan",
    "StateKeyNids",
    "block_hash",
    "block_key_range",
    "changes",
    "compact",
    "content_hash",
    "delta",
    "extend",
    "full",
    "key_number",
    "lookup",
    "make_block",
    "merge_point",
    "pack_block",
    "pack_nids",
    "pack_strings",
    "ranges_meet",
    "rebase",
    "resolve",
    "snapshot_hash",
    "unpack_block",
    "unpack_block_checked",
    "unpack_nids",
    "unpack_nids_checked",
    "unpack_strings",
]
