-- synapse-nidstate schema 5: each block's key range.
--
-- A key is (type_nid, state_key_nid); as one number, type_nid * 2^32 +
-- state_key_nid, which orders as the pair does while both NIDs are below
-- 2^32. Entries in a block are sorted by key, so first_key and last_key bound
-- every key it holds. The blocks a compaction cuts from a full state are
-- disjoint ranges of it, so a lookup of a few keys (one member, lazy-loaded
-- members) reads the one or two blocks whose range holds them, and the delta
-- blocks after them, instead of the whole state.
--
-- A block with a NID of 2^32 or more gets 0 and 2^63 - 1: every lookup reads
-- it. NULL: a block written before this version; every lookup reads it until
-- the migration (synapse-nidstate migrate, or the background job) has filled
-- its range, which it does once the history is migrated.
ALTER TABLE nidstate_blocks ADD COLUMN first_key BIGINT;
ALTER TABLE nidstate_blocks ADD COLUMN last_key BIGINT;
