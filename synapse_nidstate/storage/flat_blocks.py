"""Blocks as the caches keep them: their entries' NIDs flat, three an
entry, in arrays of int32s where they fit, and the algebra's tuples of
entries made from them where a read needs those."""

from array import array
from collections.abc import Iterable

from synapse_nidstate.algebra import Block


def joined(pieces: list[array]) -> array:
    """Pieces of one block (flat, in order; of one width, as stored) as one array."""
    if not pieces:
        return array("q")
    out = array(pieces[0].typecode)
    for piece in pieces:
        out.extend(piece)
    return out


def ints(values: Iterable[int]) -> array:
    """NIDs as an array of int32s where they fit (as blocks are stored, and
    as a read decodes them: half the memory of int64s), else of int64s."""
    values = list(values)
    try:
        return array("i", values)
    except OverflowError:
        return array("q", values)


def block_of(flat: array) -> Block:
    """A cached block (its entries' NIDs, flat) as the algebra's tuple of entries."""
    it = iter(flat)
    return tuple(zip(it, it, it))


class FlatBlocks(dict[int, Block]):
    """Blocks by NID, each kept flat (``flat``) until it is first asked for
    as the algebra's tuple of entries: a whole read resolved in the strings
    stored beside its blocks never asks for those blocks (making them all
    tuples took a cold whole read's peak at HQ scale to 24.6 MiB instead of
    18.5: ``benchmarks.whole_read``, docs/benchmarks.md, session 29)."""

    def __init__(self, flat: dict[int, array]) -> None:
        super().__init__()
        self.flat = flat

    def __missing__(self, block_nid: int) -> Block:
        block = self[block_nid] = block_of(self.flat[block_nid])
        return block

    def __contains__(self, block_nid: object) -> bool:
        return dict.__contains__(self, block_nid) or block_nid in self.flat
