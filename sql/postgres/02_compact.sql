-- synapse-nidstate schema 2 (PostgreSQL): compact blocks and snapshots, and
-- nidstate_events without the columns nothing read.
--
-- Blocks, snapshots and the events' rows are derived from Synapse's tables:
-- they are dropped here and rebuilt by `synapse-nidstate migrate` (or the
-- module's background migration); until then lookups fall back to Synapse.
-- The interned strings (rooms, types, state keys) are kept.

DROP TABLE nidstate_state_groups;
DROP TABLE nidstate_snapshots;
DROP TABLE nidstate_blocks;
DROP TABLE nidstate_events;
DELETE FROM nidstate_meta
    WHERE key IN ('migrate_low_stream_ordering', 'migrate_high_stream_ordering');

-- One row per event the mirror knows: every event persisted with state, and
-- every event referenced by a state entry (those may have no snapshot).
-- snapshot_nid is the state AT the event in Synapse's sense: after it, or
-- before it when rejected. NULL: the mirror cannot answer for this event.
CREATE TABLE nidstate_events (
    event_nid BIGSERIAL PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    room_nid BIGINT NOT NULL,
    snapshot_nid BIGINT
);

-- Immutable state blocks: (type_nid, state_key_nid, event_nid) triples sorted
-- by key, as a tag byte and little-endian int32s (int64s when a NID needs
-- them); deduplicated per room by a 128-bit content hash.
CREATE TABLE nidstate_blocks (
    block_nid BIGSERIAL PRIMARY KEY,
    room_nid BIGINT NOT NULL,
    content_hash BYTEA NOT NULL,
    entry_count INTEGER NOT NULL,
    entries BYTEA NOT NULL,
    UNIQUE (room_nid, content_hash)
);

-- Immutable snapshots: an ordered list of at most 64 block NIDs (a tag byte,
-- the count, zigzag varint deltas); a later block wins per (type, state_key).
CREATE TABLE nidstate_snapshots (
    snapshot_nid BIGSERIAL PRIMARY KEY,
    room_nid BIGINT NOT NULL,
    content_hash BYTEA NOT NULL,
    block_nids BYTEA NOT NULL,
    UNIQUE (room_nid, content_hash)
);

-- Synapse state group -> the snapshot holding the same state, so that a new
-- group is built from its predecessor plus a delta.
CREATE TABLE nidstate_state_groups (
    state_group BIGINT PRIMARY KEY,
    snapshot_nid BIGINT NOT NULL
);
