"""Bit packing: the codes of one layer, channel after channel, each at its own bit depth."""

from __future__ import annotations

import numpy as np

from scn.errors import FormatError

_PLANES = np.arange(16)


def pack_codes(codes: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Pack signed integer codes (channels, m) at per-channel bit depths into bytes.

    Channel c's codes are written in order, each as its bits[c] low two's-complement bits,
    least significant bit first; the stream fills each byte from bit 0 (LSB) up and the last
    byte is zero-padded. bits[c] = 0 writes nothing. Vectorised: the codes' 16-bit
    two's-complement bit planes are laid out (channel, code, bit) in C order, and the planes a
    channel does not use are dropped, which leaves exactly the stream.
    """
    codes = np.asarray(codes)
    bits = np.asarray(bits, dtype=np.int64)
    o, m = codes.shape
    planes = np.unpackbits(codes.astype("<i2").view(np.uint8).reshape(o, m, 2), axis=2,
                           bitorder="little")  # (o, m, 16): bit k of each code
    used = np.broadcast_to(_PLANES < bits[:, None, None], planes.shape)
    return np.packbits(planes[used], bitorder="little")


def unpack_codes(stream: np.ndarray, bits: np.ndarray, m: int) -> np.ndarray:
    """Inverse of `pack_codes`: the (channels, m) int32 codes from a layer's stream."""
    bits = np.asarray(bits, dtype=np.int64)
    o = len(bits)
    total = m * int(bits.sum())
    if len(stream) != -(-total // 8):
        raise FormatError(f"a layer's bitstream holds {len(stream)} bytes where its bit depths "
                          f"need {-(-total // 8)}; the file is corrupt.")
    planes = np.zeros((o, m, 16), dtype=np.uint8)
    used = np.broadcast_to(_PLANES < bits[:, None, None], planes.shape)
    planes[used] = np.unpackbits(stream, count=total, bitorder="little")
    u = np.packbits(planes, axis=2, bitorder="little").view("<u2").reshape(o, m).astype(np.int32)
    half = np.where(bits > 0, 1 << np.maximum(bits - 1, 0), 1 << 17)[:, None]  # 2^(B-1)
    return np.where(u >= half, u - 2 * half, u).astype(np.int32)
