-- synapse-nidstate schema 6: the indexes following Synapse's purges needs.
--
-- When Synapse deletes state groups, the room's snapshots no group maps to any
-- more are deleted (storage/purge.py, delete_unused_txn: "no row of
-- nidstate_state_groups names this snapshot"), and when it purges a room,
-- its mapping rows are found by snapshot and its interned events by room.
-- Without these two indexes each of those statements read the whole table:
-- at Matrix HQ's scale, hundreds of thousands of rows per purge.
CREATE INDEX nidstate_state_groups_snapshot ON nidstate_state_groups (snapshot_nid);
CREATE INDEX nidstate_events_room ON nidstate_events (room_nid);
