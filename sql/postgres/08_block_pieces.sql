-- synapse-nidstate schema 8: the pieces of big blocks (algebra/pieces.py).
--
-- A narrow read (one member, lazy-loaded members) of a room of tens of
-- thousands of members needs a few entries of a compaction's chunk of
-- thousands, and read the chunk whole: at HQ scale a one-member read spent
-- 1.33 of its 2.1 ms sending a 155 kB chunk for one key. A block of more
-- than 512 entries is now indexed by pieces of 512: each a slice of its
-- stored entries (byte_start, byte_length, for substr), the key range it
-- covers (the covers tile the block's range, so a missing piece is a hole a
-- read sees) and its own content hash. The read selects the pieces whose
-- cover meets the keys it wants, sliced where the block is stored; the
-- block's row, hash and whole reads are unchanged.
--
-- nidstate_blocks.pieces: how many pieces the block has (0: none, read
-- whole); NULL: written before this version and not looked at yet. The
-- migration (and the background job, once the history is migrated) fills
-- it; until then the block is read whole, as before.
CREATE TABLE nidstate_block_pieces (
    block_nid BIGINT NOT NULL,
    piece INTEGER NOT NULL,
    first_key BIGINT NOT NULL,
    last_key BIGINT NOT NULL,
    byte_start INTEGER NOT NULL,
    byte_length INTEGER NOT NULL,
    entry_count INTEGER NOT NULL,
    content_hash BYTEA NOT NULL,
    PRIMARY KEY (block_nid, piece)
);
ALTER TABLE nidstate_blocks ADD COLUMN pieces INTEGER;
