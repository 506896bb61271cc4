-- synapse-nidstate schema 4 (SQLite): no per-event snapshot pointer.
--
-- The state at an event is the snapshot of the state group Synapse maps it to
-- in event_to_state_groups (the state before it when rejected), so the
-- module's lookups join Synapse's own row to nidstate_state_groups and
-- nidstate_events is left with one job: interning the event IDs that state
-- entries name. Its rows for events that are not state events are deleted:
-- no state block can name one. Event NIDs are kept (blocks hold them).

CREATE TABLE nidstate_events_interned (
    event_nid INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    room_nid BIGINT NOT NULL
);
INSERT INTO nidstate_events_interned (event_nid, event_id, room_nid)
    SELECT n.event_nid, n.event_id, n.room_nid FROM nidstate_events AS n
    WHERE NOT EXISTS (
        SELECT 1 FROM events AS e WHERE e.event_id = n.event_id AND e.state_key IS NULL
    );
-- AUTOINCREMENT must never hand out a NID at or below the highest ever used.
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'nidstate_events_interned', 0 WHERE NOT EXISTS (
        SELECT 1 FROM sqlite_sequence WHERE name = 'nidstate_events_interned'
    );
UPDATE sqlite_sequence SET seq = MAX(seq, COALESCE(
        (SELECT seq FROM sqlite_sequence WHERE name = 'nidstate_events'), 0
    ))
    WHERE name = 'nidstate_events_interned';
DROP TABLE nidstate_events;
ALTER TABLE nidstate_events_interned RENAME TO nidstate_events;
