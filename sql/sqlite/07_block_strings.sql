-- synapse-nidstate schema 7: the strings of a block's entries, beside it.
--
-- A whole state read cold was bounded by turning its NIDs into strings: one
-- index probe per state key and per event ID (97,000 for a 48,561-member
-- room's state), where Synapse reads its rows' strings in one indexed range.
-- A block of 16 entries or more (a compaction's chunks, merged blocks) now
-- carries its entries' types, state keys and event IDs as text
-- (algebra.pack_strings), read with its entries by a whole read; smaller
-- blocks (one per state change) are still read by NID.
--
-- NULL: not filled yet (blocks written before this version, and blocks the
-- live mirror writes: it has their NIDs, not always their strings). The
-- migration and the background job fill them (storage/block_strings.py),
-- found by the partial index below; until then a read takes the strings by
-- NID, as before. "": a block one of whose strings holds a newline.
ALTER TABLE nidstate_blocks ADD COLUMN strings TEXT;
CREATE INDEX nidstate_blocks_without_strings ON nidstate_blocks (block_nid)
    WHERE strings IS NULL AND entry_count >= 16;
