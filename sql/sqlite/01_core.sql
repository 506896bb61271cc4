-- synapse-nidstate schema 1 (SQLite). Applied once, inside one transaction,
-- by synapse_nidstate.schema; never edit an applied file, add a new one.

CREATE TABLE nidstate_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE nidstate_rooms (
    room_nid INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id TEXT NOT NULL UNIQUE
);

-- Well-known types keep Dendrite's fixed NIDs; AUTOINCREMENT (never reuse a
-- NID, even after a purge) continues above the reserved range.
CREATE TABLE nidstate_event_types (
    type_nid INTEGER PRIMARY KEY AUTOINCREMENT,
    event_type TEXT NOT NULL UNIQUE
);
INSERT INTO nidstate_event_types (type_nid, event_type) VALUES
    (1, 'm.room.create'),
    (2, 'm.room.power_levels'),
    (3, 'm.room.join_rules'),
    (4, 'm.room.third_party_invite'),
    (5, 'm.room.member'),
    (6, 'm.room.redaction'),
    (7, 'm.room.history_visibility');

CREATE TABLE nidstate_state_keys (
    state_key_nid INTEGER PRIMARY KEY AUTOINCREMENT,
    state_key TEXT NOT NULL UNIQUE
);
INSERT INTO nidstate_state_keys (state_key_nid, state_key) VALUES (1, '');
UPDATE sqlite_sequence SET seq = 65535
    WHERE name IN ('nidstate_event_types', 'nidstate_state_keys');

-- One row per event the mirror knows: every event persisted with state, and
-- every event referenced by a state entry (those may have no snapshot).
-- snapshot_nid is the state AT the event in Synapse's sense: after it, or
-- before it when rejected. NULL: the mirror cannot answer for this event.
CREATE TABLE nidstate_events (
    event_nid INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    room_nid BIGINT NOT NULL,
    type_nid BIGINT NOT NULL,
    state_key_nid BIGINT NOT NULL,  -- 0 for a non-state event
    snapshot_nid BIGINT,
    rejected BOOLEAN NOT NULL DEFAULT FALSE,
    stream_ordering BIGINT
);
CREATE INDEX nidstate_events_stream_ordering ON nidstate_events (stream_ordering)
    WHERE stream_ordering IS NOT NULL;

-- Immutable state blocks: packed little-endian int64 triples
-- (type_nid, state_key_nid, event_nid) sorted by key, deduplicated per room.
CREATE TABLE nidstate_blocks (
    block_nid INTEGER PRIMARY KEY AUTOINCREMENT,
    room_nid BIGINT NOT NULL,
    content_hash BLOB NOT NULL,
    entry_count INTEGER NOT NULL,
    entries BLOB NOT NULL,
    UNIQUE (room_nid, content_hash)
);

-- Immutable snapshots: an ordered list of at most 64 block NIDs (packed
-- little-endian int64s); a later block wins per (type, state_key).
CREATE TABLE nidstate_snapshots (
    snapshot_nid INTEGER PRIMARY KEY AUTOINCREMENT,
    room_nid BIGINT NOT NULL,
    content_hash BLOB NOT NULL,
    block_nids BLOB NOT NULL,
    UNIQUE (room_nid, content_hash)
);

-- Synapse state group -> the snapshot holding the same state, so that a new
-- group is built from its predecessor plus a delta.
CREATE TABLE nidstate_state_groups (
    state_group BIGINT PRIMARY KEY,
    snapshot_nid BIGINT NOT NULL
);
