"""Mask expansion (AES-256-CTR as the PRG), adding masks modulo 2**bits, and packing the masked
vectors into bits for the wire."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedward.common.errors import SecAggError
from fedward.common.secagg.shamir import SEED_BYTES

_PRG_NONCE = bytes(16)  # every PRG seed is used for exactly one mask, so a fixed nonce is safe


# --- masks ---------------------------------------------------------------------------------------


def expand_mask(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """`length` uniform values in [0, 2**modulus_bits) from a 32-byte seed (AES-256-CTR).

    The keystream is read as little-endian uint64 and reduced by bit masking, which keeps it
    uniform because the modulus is a power of two. One cipher call, no Python loop over elements.

    Args:
        seed: The 32-byte PRG seed (a self-mask seed, or a pairwise seed from `agree_key`).
        length: How many values, >= 0.
        modulus_bits: Bits of the power-of-two modulus, 1..64 (not checked here).

    Returns:
        A uint64 array of shape (length,).

    Raises:
        SecAggError: a seed that is not 32 bytes, or a keystream shorter than asked for.
    """
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"secure aggregation: mask seeds are {SEED_BYTES} bytes")
    mask = np.empty(length, dtype="<u8")
    if length == 0:
        return mask.astype(np.uint64)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_PRG_NONCE)).encryptor()
    # Encrypting zeros yields the bare keystream, written straight into the array's memory.
    written = encryptor.update_into(_zeros(8 * length), mask.view(np.uint8))
    if written != 8 * length:
        raise SecAggError("secure aggregation: the mask PRG returned a short keystream")
    mask = mask.astype(np.uint64, copy=False)
    return reduce_modulus(mask, modulus_bits)


_ZEROS = np.zeros(0, dtype=np.uint8)


def _zeros(size: int) -> np.ndarray:
    """A read-only buffer of `size` zero bytes, kept between calls (the PRG's plaintext)."""
    global _ZEROS
    if _ZEROS.size < size:
        _ZEROS = np.zeros(size, dtype=np.uint8)
        _ZEROS.flags.writeable = False
    return _ZEROS[:size]


#: Mask values generated at a time by `add_masks`: 512 KiB of keystream, so the buffer and the
#: slice of the vector it is added to stay in the processor's cache.
_MASK_CHUNK = 1 << 16


def add_masks(
    values: np.ndarray, masks: Sequence[tuple[bytes, int]], modulus_bits: int
) -> np.ndarray:
    """Add sign * `expand_mask(seed, ...)` to uint64 `values` for each (seed, sign), in place.

    The same arithmetic as adding or subtracting each expanded mask, modulo 2**modulus_bits,
    without building any mask in full: each seed's AES-256-CTR keystream is generated a chunk at
    a time into one reused buffer and added (sign +1) or subtracted (sign -1) straight away. The
    keystream is not reduced first (the power-of-two modulus makes that the same), so the result
    is reduced once, at the end (`reduce_modulus`).

    Args:
        values: A 1-D uint64 array (a field vector to mask, or a sum to unmask), changed in
            place.
        masks: (seed, sign) pairs: a 32-byte PRG seed, and +1 to add its mask or -1 to
            subtract it.
        modulus_bits: Bits of the power-of-two modulus, 1..64.

    Returns:
        `values` itself, with the masks added and reduced modulo 2**modulus_bits.

    Raises:
        SecAggError: a seed that is not 32 bytes or a sign other than +1 and -1 (both checked
            before `values` changes), or a keystream shorter than asked for.
    """
    for seed, sign in masks:
        if len(seed) != SEED_BYTES:
            raise SecAggError(f"secure aggregation: mask seeds are {SEED_BYTES} bytes")
        if sign not in (1, -1):
            raise SecAggError(
                f"secure aggregation: a mask is added (+1) or subtracted (-1), not {sign!r}"
            )
    streams = [
        (Cipher(algorithms.AES(seed), modes.CTR(_PRG_NONCE)).encryptor(), sign)
        for seed, sign in masks
    ]
    buffer = np.empty(min(_MASK_CHUNK, values.size), dtype="<u8")
    for first in range(0, values.size, _MASK_CHUNK):
        part = values[first : first + _MASK_CHUNK]
        keystream = buffer[: part.size]
        for encryptor, sign in streams:
            # Encrypting zeros yields the bare keystream: the next part.size mask values.
            written = encryptor.update_into(_zeros(8 * part.size), keystream.view(np.uint8))
            if written != 8 * part.size:
                raise SecAggError("secure aggregation: the mask PRG returned a short keystream")
            (np.add if sign > 0 else np.subtract)(part, keystream, out=part)
    return reduce_modulus(values, modulus_bits)


def reduce_modulus(values: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Reduce uint64 values (already wrapped mod 2**64) modulo 2**modulus_bits, in place.

    Args:
        values: A uint64 array, changed in place.
        modulus_bits: Bits of the power-of-two modulus, 1..64; at 64 the values stay as they are.

    Returns:
        `values` itself, each value now below 2**modulus_bits.
    """
    if modulus_bits < 64:
        values &= np.uint64((1 << modulus_bits) - 1)
    return values


# --- packing masked vectors for the wire -------------------------------------------------------


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint64 values below 2**bits into a uint8 array of ceil(len * bits / 8) bytes.

    Masked values are uniform modulo 2**modulus_bits, so sending `modulus_bits` per value
    instead of 64 is what keeps a masked upload close to the size of a plain float32 update.
    Value i occupies bits [i * bits, (i + 1) * bits) of the little-endian bit stream. Values are
    written in eight interleaved passes (i mod 8): within one pass they are `bits` bytes apart,
    so each is one unaligned 64-bit OR into a strided view, with no per-bit expansion.

    Args:
        values: A 1-D array of values below 2**bits (read as contiguous little-endian uint64,
            copied if need be). A larger value is not caught and does not round-trip.
        bits: Bits per value, 1..64 (a masked vector's `modulus_bits`).

    Returns:
        A uint8 array of ceil(len(values) * bits / 8) bytes.

    Raises:
        SecAggError: `bits` outside 1..64.
    """
    values = np.ascontiguousarray(values, dtype="<u8")
    if bits < 1 or bits > 64:
        raise SecAggError(f"secure aggregation: cannot pack {bits}-bit values")
    count = values.size
    size = (count * bits + 7) // 8
    if bits < 8 or bits > 56:
        return _pack_bits_slow(values, bits)
    out = np.zeros(size + 8, dtype=np.uint8)  # 8 spare bytes for the last 64-bit window
    shifted = np.empty(_PACK_CHUNK // 8, dtype="<u8")  # one buffer for every pass
    for values_of_pass, window, shift in _windows(values, out, bits):
        moved = shifted[: window.size]
        np.left_shift(values_of_pass, shift, out=moved)
        np.bitwise_or(window, moved, out=window)
    return out[:size]


#: Values packed or unpacked at a time: a multiple of 8 (each chunk starts on a byte boundary),
#: small enough that a chunk's eight strided passes stay in the processor's cache.
_PACK_CHUNK = 8 * 4096


def _windows(values: np.ndarray, packed: np.ndarray, bits: int):
    """The passes of packing `values` into (or unpacking them from) `packed`, chunk by chunk:
    (every 8th value of the chunk, the strided 64-bit view of `packed` that holds them, the shift
    of those values within it). Value i of a pass starts `bits` bytes after value i - 1."""
    for first in range(0, values.size, _PACK_CHUNK):
        block = values[first : first + _PACK_CHUNK]
        base = first * bits // 8
        for phase in range(min(8, block.size)):
            start, shift = divmod(phase * bits, 8)
            window = np.ndarray(
                ((block.size - phase + 7) // 8,),
                dtype="<u8",
                buffer=packed,
                offset=base + start,
                strides=(bits,),
            )
            yield block[phase::8], window, np.uint64(shift)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` uint64 values of `bits` bits each.

    Args:
        packed: The packed bytes, 1-D (read as uint8).
        bits: Bits per value, 1..64 (not checked here; `pack_bits` checks it).
        count: How many values were packed.

    Returns:
        A uint64 array of shape (count,), each value below 2**bits.

    Raises:
        SecAggError: `packed` is not 1-D, or not ceil(count * bits / 8) bytes long.
    """
    packed = np.asarray(packed, dtype=np.uint8)
    needed = (count * bits + 7) // 8
    if packed.ndim != 1 or packed.size != needed:
        raise SecAggError(
            f"secure aggregation: packed vector has {packed.size} bytes, expected {needed} "
            f"for {count} values of {bits} bits"
        )
    if bits < 8 or bits > 56:
        return _unpack_bits_slow(packed, bits, count)
    padded = np.zeros(needed + 8, dtype=np.uint8)
    padded[:needed] = packed
    out = np.empty(count, dtype=np.uint64)
    low = np.uint64((1 << bits) - 1)
    for values, window, shift in _windows(out, padded, bits):
        np.right_shift(window, shift, out=values)  # shift and mask in place: no temporaries
        np.bitwise_and(values, low, out=values)
    return out


def sum_packed(packed_vectors: Sequence[np.ndarray], bits: int, count: int) -> np.ndarray:
    """The sum, modulo 2**bits, of vectors packed by `pack_bits`: `count` uint64 values.

    What the coordinator needs from the masked updates, without unpacking any of them into a
    vector of its own. The packed bytes are read through the same 64-bit windows as
    `unpack_bits`, but the bits above a value (the start of the next one) are not masked off:
    they only reach bits at or above `bits` of the sum, which the final reduction drops. The
    window of every 8th value ("phase") of a chunk is added to a contiguous row of an
    accumulator that stays in cache for all the vectors; one transpose per chunk puts the sums
    back in order.

    Args:
        packed_vectors: Vectors packed by `pack_bits`, each a 1-D uint8 array of
            ceil(count * bits / 8) bytes.
        bits: Bits per value, the modulus's bits (1..64).
        count: How many values each vector holds.

    Returns:
        A uint64 array of shape (count,): the element-wise sum modulo 2**bits (zeros when
        `packed_vectors` is empty).

    Raises:
        SecAggError: a vector that is not a 1-D uint8 array of ceil(count * bits / 8) bytes.
    """
    size = (count * bits + 7) // 8
    packed_vectors = [np.ascontiguousarray(packed) for packed in packed_vectors]
    for index, packed in enumerate(packed_vectors):
        if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != size:
            raise SecAggError(
                f"secure aggregation: packed vector {index} has {packed.size} bytes, expected "
                f"{size} for {count} values of {bits} bits"
            )
    if bits < 8 or bits > 56:
        total = np.zeros(count, dtype=np.uint64)
        for packed in packed_vectors:
            total += unpack_bits(packed, bits, count)
        return reduce_modulus(total, bits)
    groups = (count + 7) // 8  # 8 values take `bits` bytes
    total = np.empty(8 * groups, dtype=np.uint64)
    by_group = total.reshape(groups, 8)
    phases = [divmod(phase * bits, 8) for phase in range(8)]  # (byte, shift) within a group
    # Groups whose last window ends inside the packed bytes; the rest are read from a copy.
    inside = min(groups, max(0, (size - 8 - phases[7][0]) // bits + 1))
    chunk = _SUM_CHUNK // 8
    rows = np.empty((8, min(chunk, groups)), dtype=np.uint64)
    shifted = np.empty(rows.shape[1], dtype=np.uint64)

    def add_groups(sources: Sequence[np.ndarray], offset: int, first: int, last: int) -> None:
        sums = rows[:, : last - first]
        sums.fill(0)
        moved = shifted[: last - first]
        for packed in sources:
            for phase, (start, shift) in enumerate(phases):
                window = np.ndarray(
                    (last - first,),
                    dtype="<u8",
                    buffer=packed,
                    offset=offset + start,
                    strides=(bits,),
                )
                if shift:
                    np.right_shift(window, np.uint64(shift), out=moved)
                    np.add(sums[phase], moved, out=sums[phase])
                else:
                    np.add(sums[phase], window, out=sums[phase])
        by_group[first:last] = sums.T

    for first in range(0, inside, chunk):
        last = min(inside, first + chunk)
        add_groups(packed_vectors, first * bits, first, last)
    if inside < groups:  # the last few groups: their windows would run past the end
        tails = []
        for packed in packed_vectors:
            tail = np.zeros((groups - inside) * bits + 8, dtype=np.uint8)
            tail[: size - inside * bits] = packed[inside * bits :]
            tails.append(tail)
        add_groups(tails, 0, inside, groups)
    return reduce_modulus(total[:count], bits)


#: Values summed at a time by `sum_packed`: the accumulator (8 bytes a value) stays in cache.
_SUM_CHUNK = 8 * 8192


def _pack_bits_slow(values: np.ndarray, bits: int) -> np.ndarray:
    # Bit by bit, for widths where a value plus its shift may not fit one 64-bit window.
    as_bits = np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.packbits(as_bits[:, :bits].ravel(), bitorder="little")


def _unpack_bits_slow(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    as_bits = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits)
    full = np.zeros((count, 64), dtype=np.uint8)
    full[:, :bits] = as_bits
    return np.packbits(full, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)
