"""How blocks and snapshots' block lists are stored, and their dedupe hashes.

Pure functions over bytes; the storage layer writes what they return.
"""

import hashlib
import sys
from array import array
from collections.abc import Iterable, Sequence

from synapse_nidstate.algebra.types import AlgebraError, Block

_LITTLE = sys.byteorder == "little"


def _pack_int64s(values: Iterable[int]) -> bytes:
    packed = array("q", values)
    if not _LITTLE:
        packed.byteswap()
    return packed.tobytes()


# Stored encodings. A block is stored as a tag byte then its NIDs as
# little-endian int32s (int64s if one does not fit): 12 bytes an entry, and
# decoding is one array copy. A snapshot's block list (at most 64 NIDs) is a
# tag byte, the count, then zigzag varint deltas between consecutive NIDs
# (the blocks of one room are allocated together, so most deltas take one
# byte), zero-padded to 1 mod 4 bytes. (Schema 1 stored plain int64s; schema
# 2 dropped those rows for a rebuild.)
_TAG_INT32 = 0x04
_TAG_INT64 = 0x08
_TAG_VARINT_DELTAS = 0x01
_INT32_MAX = 2**31 - 1
#: The tag of a value stored as int32s (what a read on the server may decode).
INT32_TAG = _TAG_INT32


def _pack_fixed(values: Sequence[int]) -> bytes:
    if all(-_INT32_MAX <= v <= _INT32_MAX for v in values):
        packed = array("i", values)
        tag = _TAG_INT32
    else:
        packed = array("q", values)
        tag = _TAG_INT64
    if not _LITTLE:
        packed.byteswap()
    return bytes((tag,)) + packed.tobytes()


def _unpack_fixed(data: bytes) -> array:
    if not data:
        raise AlgebraError("empty encoding")
    tag = data[0]
    if tag not in (_TAG_INT32, _TAG_INT64):
        raise AlgebraError(f"unknown encoding tag {tag}")
    values = array("i" if tag == _TAG_INT32 else "q")
    if (len(data) - 1) % values.itemsize:
        raise AlgebraError("packed NIDs are not a whole number of integers")
    values.frombytes(data[1:])
    if not _LITTLE:
        values.byteswap()
    return values


def pack_block(block: Block) -> bytes:
    """Encode a block for storage (see above)."""
    return _pack_fixed([n for entry in block for n in entry])


def unpack_block(data: bytes) -> Block:
    """Inverse of :func:`pack_block`."""
    values = _unpack_fixed(bytes(data))
    if len(values) % 3:
        raise AlgebraError("packed block is not a whole number of entries")
    it = iter(values)
    return tuple(zip(it, it, it))


def unpack_block_checked(data: bytes, digest: bytes) -> Block:
    """:func:`unpack_block`, refusing data whose content is not the one
    ``digest`` (the stored :func:`block_hash`) was made of: a corrupted row
    raises instead of decoding to other NIDs."""
    it = iter(unpack_flat_checked(data, digest))
    return tuple(zip(it, it, it))


def unpack_flat_checked(data: bytes, digest: bytes) -> array:
    """:func:`unpack_block_checked` as the block's NIDs flat, three an entry
    (no tuple per entry: what a narrow read slices, and the caches keep)."""
    data = bytes(data)
    values = _unpack_fixed(data)
    if len(values) % 3:
        raise AlgebraError("packed block is not a whole number of entries")
    if content_hash(_little_int64s(data, values)) != bytes(digest):
        raise AlgebraError("block content does not match its hash")
    return values


def _little_int64s(data: bytes, values: array) -> bytes | bytearray:
    """The block's NIDs as little-endian int64s (what its hash is of), from
    its stored form (a tag byte, then little-endian int32s or int64s)."""
    payload = data[1:]
    if values.typecode == "q":
        return payload
    if not payload[3::4].isascii():  # a high byte >= 0x80: a negative int32, sign-extend
        wide = array("q", values)
        if not _LITTLE:
            wide.byteswap()
        return wide.tobytes()
    # Non-negative (NIDs are): each int32's four bytes, then four zero bytes,
    # by slice assignment (array("q", an int32 array) goes element by element).
    wide_bytes = bytearray(len(payload) * 2)
    for offset in range(4):
        wide_bytes[offset::8] = payload[offset::4]
    return wide_bytes


def unpack_nids_checked(data: bytes, digest: bytes) -> tuple[int, ...]:
    """:func:`unpack_nids`, refusing a list that is not the one ``digest``
    (the stored :func:`snapshot_hash`) was made of."""
    nids = unpack_nids(data)
    if snapshot_hash(nids) != bytes(digest):
        raise AlgebraError("block list does not match its hash")
    return nids


def _varint(value: int, out: bytearray) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def pack_nids(nids: Sequence[int]) -> bytes:
    """Encode a snapshot's block list for storage (see above)."""
    out = bytearray((_TAG_VARINT_DELTAS,))
    _varint(len(nids), out)
    previous = 0
    for nid in nids:
        delta = nid - previous
        _varint(delta * 2 if delta >= 0 else -delta * 2 - 1, out)  # zigzag
        previous = nid
    out.extend(bytes(-(len(out) - 1) % 4))
    return bytes(out)


def unpack_nids(data: bytes) -> tuple[int, ...]:
    """Inverse of :func:`pack_nids`."""
    data = bytes(data)
    if len(data) % 4 != 1 or data[0] != _TAG_VARINT_DELTAS:
        raise AlgebraError("not an encoded list of NIDs")
    values: list[int] = []
    count = None
    value = shift = 0
    previous = 0
    for byte in data[1:]:
        value |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            continue
        if count is None:
            count = value
        elif len(values) < count:
            previous += (value >> 1) if not value & 1 else -((value + 1) >> 1)
            values.append(previous)
        else:
            break
        value = shift = 0
        if len(values) == count:
            break
    if count is None or len(values) != count:
        raise AlgebraError("truncated list of NIDs")
    return tuple(values)


def block_hash(block: Block) -> bytes:
    """The dedupe key of a block: of its content, whatever the stored encoding."""
    return content_hash(_pack_int64s(n for entry in block for n in entry))


def snapshot_hash(nids: Sequence[int]) -> bytes:
    """The dedupe key of a snapshot's ordered block list."""
    return content_hash(_pack_int64s(nids))


def content_hash(packed: bytes | bytearray) -> bytes:
    """The dedupe key of int64-packed content, scoped to a room by storage:
    SHA-256 cut to 128 bits (a collision among 10^9 rows has odds near 10^-21)."""
    return hashlib.sha256(packed).digest()[:16]



# The strings of a block's entries, stored beside it (schema 7) so that a whole
# state is read with its strings instead of a probe per NID. Text, one string a
# line: the number of runs of one event type, then each run's type and length
# (entries are sorted by key, so a type's entries are consecutive), then every
# entry's state key, then every entry's event ID ("" for a tombstone). A block
# one of whose strings holds a newline is stored as "" (no strings: read by NID).
_NO_STRINGS = ""


def pack_strings(types: Sequence[str], keys: Sequence[str], events: Sequence[str]) -> str:
    """The stored strings of a block's entries (its types, state keys and
    event IDs, in entry order); "" where one of them holds a newline."""
    if any("\n" in s for part in (types, keys, events) for s in part):
        return _NO_STRINGS
    runs: list[str] = []
    start = 0
    for i in range(1, len(types) + 1):
        if i == len(types) or types[i] != types[start]:
            runs += (types[start], str(i - start))
            start = i
    return "\n".join((str(len(runs) // 2), *runs, *keys, *events))


def unpack_strings(
    text: str, entries: int
) -> tuple[list[tuple[str, int]], list[str], list[str]] | None:
    """A block's strings (:func:`pack_strings`): its runs of one event type
    (type, how many entries) and its entries' state keys and event IDs; None
    for a block stored without them. Raises ``AlgebraError`` if they do not
    fit a block of ``entries`` entries."""
    if text == _NO_STRINGS:
        return None
    lines = text.split("\n")
    try:
        run_count = int(lines[0])
        runs = [(lines[i], int(lines[i + 1])) for i in range(1, 2 * run_count, 2)]
    except (ValueError, IndexError) as e:
        raise AlgebraError(f"malformed block strings: {e}") from e
    start = 1 + 2 * run_count
    typed = sum(count for _, count in runs)
    if typed != entries or len(lines) != start + 2 * entries or min(
        (count for _, count in runs), default=1
    ) < 1:
        raise AlgebraError(f"block strings for {typed} entries, not {entries}")
    return runs, lines[start : start + entries], lines[start + entries :]
