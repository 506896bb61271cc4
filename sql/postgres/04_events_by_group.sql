-- synapse-nidstate schema 4 (PostgreSQL): no per-event snapshot pointer.
--
-- The state at an event is the snapshot of the state group Synapse maps it to
-- in event_to_state_groups (the state before it when rejected), so the
-- module's lookups join Synapse's own row to nidstate_state_groups and
-- nidstate_events is left with one job: interning the event IDs that state
-- entries name. Its rows for events that are not state events are deleted:
-- no state block can name one. Event NIDs are kept (blocks hold them); the
-- table is rebuilt rather than altered, so its bytes are given back now.

CREATE TABLE nidstate_events_interned (
    event_nid BIGSERIAL PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    room_nid BIGINT NOT NULL
);
INSERT INTO nidstate_events_interned (event_nid, event_id, room_nid)
    SELECT n.event_nid, n.event_id, n.room_nid FROM nidstate_events AS n
    WHERE NOT EXISTS (
        SELECT 1 FROM events AS e WHERE e.event_id = n.event_id AND e.state_key IS NULL
    );
SELECT setval(
    pg_get_serial_sequence('nidstate_events_interned', 'event_nid'),
    GREATEST(
        (SELECT last_value FROM nidstate_events_event_nid_seq),
        (SELECT COALESCE(MAX(event_nid), 0) FROM nidstate_events_interned),
        1
    )
);
DROP TABLE nidstate_events;
ALTER TABLE nidstate_events_interned RENAME TO nidstate_events;
ALTER INDEX nidstate_events_interned_pkey RENAME TO nidstate_events_pkey;
ALTER INDEX nidstate_events_interned_event_id_key RENAME TO nidstate_events_event_id_key;
ALTER SEQUENCE nidstate_events_interned_event_nid_seq RENAME TO nidstate_events_event_nid_seq;
