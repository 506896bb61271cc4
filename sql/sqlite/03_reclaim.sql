-- synapse-nidstate schema 3: reclaim (docs: DESIGN §8, storage/reclaim.py).
--
-- One row per Synapse state group whose rows in state_groups_state reclaim
-- deleted, after proving in the same transaction that Synapse's answer from
-- those rows equals the group's snapshot. `restore` writes the rows back and
-- deletes the row here. While any row exists, Synapse's schema_compat_version
-- holds a value no Synapse accepts (the original is kept in nidstate_meta
-- under 'reclaim_compat_version'), so that Synapse without the module refuses
-- the database (runtime/failsafe.py).
CREATE TABLE nidstate_reclaimed_groups (
    state_group BIGINT PRIMARY KEY,
    room_nid BIGINT NOT NULL,
    rows_deleted BIGINT NOT NULL
);
CREATE INDEX nidstate_reclaimed_groups_room ON nidstate_reclaimed_groups (room_nid, state_group);
