"""The NID state algebra's vocabulary: entries, blocks, snapshots, their limits.

Pure Python, no database and no Synapse. Everything here works on numeric IDs
(NIDs); turning strings into NIDs and back is the storage layer's job.

Vocabulary (Dendrite's, see its roomserver README):

* A *state entry* is a triple ``(type_nid, state_key_nid, event_nid)``.
  ``event_nid == 0`` is a *tombstone*: the key is absent from the state.
* A *block* is an immutable tuple of entries, sorted by ``(type_nid,
  state_key_nid)``, with at most one entry per key.
* A *snapshot* is an ordered sequence of at most :data:`MAX_BLOCKS` blocks.
  The state it stands for is read by walking its blocks in order; a later block
  wins for a given ``(type_nid, state_key_nid)``; tombstones are dropped last.

The order of a snapshot's blocks is its meaning: block NIDs are deduplicated by
content, so an *older* block NID can carry a *newer* delta, and nothing here
relies on NIDs sorting by age.
"""

#: A snapshot never holds more blocks than this; reads touch at most this many.
MAX_BLOCKS = 64

#: A compaction aims at at most this many full-state blocks, leaving the rest of
#: :data:`MAX_BLOCKS` for deltas before the next compaction.
COMPACTED_BLOCKS_TARGET = 16

#: Compacted blocks are cut where a key's hash says so, so that a change to one
#: key changes one block and the others dedupe against the previous
#: compaction. The expected block size is at least this.
MIN_CHUNK_ENTRIES = 64

#: A key ``(type_nid, state_key_nid)`` as one number (what a block's stored key
#: range holds): ``type_nid * KEY_NID_LIMIT + state_key_nid``, which orders as
#: the pairs do while both NIDs are below the limit.
KEY_NID_LIMIT = 1 << 32
#: The largest key number a database BIGINT holds.
MAX_KEY_NUMBER = (1 << 63) - 1

StateKeyNids = tuple[int, int]
Entry = tuple[int, int, int]
Block = tuple[Entry, ...]
NidStateMap = dict[StateKeyNids, int]


class AlgebraError(ValueError):
    """An input breaks an invariant of blocks or snapshots."""

