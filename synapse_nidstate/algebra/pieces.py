"""A big block's pieces: where a narrow read finds the few entries it wants
inside a compaction's chunk of thousands, without the chunk.

A block of more than :data:`PIECE_ENTRIES` entries is cut, where it is
stored, into pieces of that many entries (the last one shorter). A piece is
not a block of its own: it is a slice of the block's stored bytes, named by
its byte position, with the key range it *covers* and its own content hash.
The covers tile the block's key range: a piece covers from its first key to
the key before the next piece's first (the last piece, to the block's last
key), so that every key the block could hold is covered by exactly one
piece, and a read that is missing one (a lost row) sees a hole, never a
shorter answer (:func:`check_covers`). The block itself, its hash and every
read of it whole are unchanged: pieces only index it.
"""

from array import array
from collections.abc import Sequence

import attr

from synapse_nidstate.algebra.encoding import block_hash, unpack_flat_checked
from synapse_nidstate.algebra.state import block_key_range, key_number
from synapse_nidstate.algebra.types import AlgebraError, Block

#: A block of more than this many entries is stored with its pieces of this
#: many. A narrow read of one key in a 48,561-member room's chunk (up to
#: 12,894 entries, 155 kB) then reads 6 kB of it.
PIECE_ENTRIES = 512


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Piece:
    """A block's ``piece``-th slice: ``entry_count`` entries stored at
    ``byte_start`` (1-based, SQL's ``substr``) for ``byte_length`` bytes of
    the block's stored entries, covering key numbers ``first_key`` to
    ``last_key``; ``content_hash``: :func:`block_hash` of its entries."""

    piece: int
    first_key: int
    last_key: int
    byte_start: int
    byte_length: int
    entry_count: int
    content_hash: bytes


def cut_pieces(block: Block, packed: bytes) -> list[Piece]:
    """The pieces of ``block`` as stored (``packed``, its :func:`pack_block`);
    none for a block of :data:`PIECE_ENTRIES` entries or fewer, or whose key
    range is not known (a NID past the key numbers' reach: read whole)."""
    key_range = block_key_range(block)
    if len(block) <= PIECE_ENTRIES or key_range is None:
        return []
    width = (len(packed) - 1) // len(block)  # bytes an entry, after the tag byte
    starts = range(0, len(block), PIECE_ENTRIES)
    pieces = []
    for piece, start in enumerate(starts):
        entries = block[start : start + PIECE_ENTRIES]
        end = start + len(entries)
        pieces.append(
            Piece(
                piece=piece,
                first_key=key_number(entries[0][:2]),
                last_key=key_number(block[end][:2]) - 1 if end < len(block) else key_range[1],
                byte_start=2 + start * width,
                byte_length=len(entries) * width,
                entry_count=len(entries),
                content_hash=block_hash(entries),
            )
        )
    return pieces


def unpack_piece_checked(
    data: bytes, entry_count: int, digest: bytes, first_key: int, last_key: int
) -> array:
    """A piece's slice of its block's stored entries as NIDs, flat, checked
    against its hash and its cover (its first entry on the cover's first
    key, its last inside it)."""
    if entry_count <= 0 or len(data) % (3 * entry_count):
        raise AlgebraError("piece is not a whole number of entries")
    width = len(data) // (3 * entry_count)
    if width not in (4, 8):
        raise AlgebraError(f"piece of {width}-byte NIDs")
    # The stored form is a tag byte then the NIDs; the tag is their width.
    flat = unpack_flat_checked(bytes((width,)) + bytes(data), digest)
    if key_number((flat[0], flat[1])) != first_key or key_number((flat[-3], flat[-2])) > last_key:
        raise AlgebraError("piece's entries are outside its cover")
    return flat


def check_covers(
    block_range: tuple[int, int], pieces: int, covers: Sequence[tuple[int, int, int]]
) -> None:
    """Raise unless ``covers`` ((piece, first key, last key) of every piece
    of a block of ``pieces`` pieces and key range ``block_range``) are all
    of them, in order, and tile the block's range with no hole."""
    if [c[0] for c in covers] != list(range(pieces)):
        raise AlgebraError(f"pieces {[c[0] for c in covers]} of {pieces}")
    expected = block_range[0]
    for _, first, last in covers:
        if first != expected or last < first:
            raise AlgebraError("pieces do not tile the block's key range")
        expected = last + 1
    if expected != block_range[1] + 1:
        raise AlgebraError("pieces do not reach the block's last key")
