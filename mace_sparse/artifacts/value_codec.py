"""Lossless, compact storage of the changed values: one XOR array per dtype, byte-shuffled and compressed.

For every changed entry the delta needs the new value (for ``apply``) and the old one (for ``revert``). Two
full-precision arrays cost two model-sized numbers per entry (16 B in float64, against 8 B per parameter in the
model file), which alone breaks the size budget (file ≤ 5 % of the model at ≥ 95 % unchanged) for large
models. Instead the file stores the bitwise XOR of the two bit patterns, ``x = bits(new) ^ bits(old)``:

* one array serves both directions bit for bit: ``new = old ^ x`` (``apply``, from the foundation) and
  ``old = new ^ x`` (``revert``, from the merged model), with no floating-point arithmetic (so ``-0.0``,
  NaN payloads and subnormals survive);
* fine-tuned values are close to the foundation's, so ``x`` starts with zero bits (sign, exponent, leading
  mantissa bits). Byte-shuffling (all first bytes, then all second bytes, …) puts those zeros into long runs,
  which ``zlib``/``lzma`` (standard library) then remove; the smaller result is kept (``raw`` when neither
  helps, e.g. for a handful of entries).

The XOR is taken byte-wise on the little-endian bytes, which is the XOR of the same-width integer view
(``float64``→``int64`` etc.) and works for every dtype (``bool``, integers, ``bfloat16``, complex). Loading only
decompresses (bounded by the size the metadata announces) and reshapes: no code from the file is executed.
"""

from __future__ import annotations

import lzma
import zlib
from typing import Iterable, Tuple

import numpy as np
import torch

CODECS = ("raw", "zlib", "lzma")
#: zlib's strongest level; lzma's default preset (its higher presets only grow the dictionary, which does not
#: help on these near-random mantissa bytes but costs up to 674 MiB of memory when compressing).
ZLIB_LEVEL = 9
LZMA_PRESET = 6
#: Memory the lzma decoder may use (a preset-9 stream needs 65 MiB): a hostile stream cannot ask for more.
LZMA_MEMLIMIT = 1 << 28


class ValueCodecError(ValueError):
    """Stored (compressed) data that cannot be decoded to the size the metadata announces."""


# ----------------------------------------------------------------------------------------------- XOR of bits


def element_width(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return int(torch.empty(0, dtype=dtype).element_size())


def value_bytes(values: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a 1-D tensor as a ``(count, width)`` uint8 tensor (any dtype, little-endian)."""
    flat = values.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).reshape(flat.numel(), flat.element_size())


def xor_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``bits(a) ^ bits(b)`` of two 1-D tensors of one dtype, as ``(count, width)`` uint8."""
    if a.dtype != b.dtype or a.numel() != b.numel():
        raise ValueError(f"cannot XOR {a.numel()} {a.dtype} values with {b.numel()} {b.dtype} values")
    return torch.bitwise_xor(value_bytes(a), value_bytes(b))


def apply_xor(values: torch.Tensor, xor: torch.Tensor) -> torch.Tensor:
    """The values whose bits are ``bits(values) ^ xor`` (same dtype, 1-D, on the CPU).

    With ``xor = xor_bits(new, old)`` this gives ``new`` from ``old`` and ``old`` from ``new``, bit for bit.
    """
    flat = values.detach().to("cpu").contiguous().reshape(-1)
    width = flat.element_size()
    if tuple(xor.shape) != (flat.numel(), width) or xor.dtype != torch.uint8:
        raise ValueError(f"XOR data of shape {tuple(xor.shape)} does not fit {flat.numel()} {flat.dtype} values")
    out = torch.bitwise_xor(value_bytes(flat), xor).contiguous()
    return out.reshape(-1).view(flat.dtype)


# ----------------------------------------------------------------------------------- shuffling, compressing


def shuffle(planes: torch.Tensor) -> bytes:
    """``(count, width)`` uint8 → bytes: every element's byte 0, then every byte 1, … (byte-shuffle)."""
    return planes.T.contiguous().numpy().tobytes()


def unshuffle(data: bytes, count: int, width: int) -> torch.Tensor:
    """Inverse of :func:`shuffle`: bytes → ``(count, width)`` uint8."""
    if len(data) != count * width:
        raise ValueCodecError(f"{len(data)} bytes cannot hold {count} values of {width} bytes")
    if not data:
        return torch.zeros((count, width), dtype=torch.uint8)
    planes = torch.from_numpy(np.frombuffer(bytearray(data), dtype=np.uint8).reshape(width, count))
    return planes.T.contiguous()


def compress(data: bytes) -> Tuple[str, bytes]:
    """The smallest of ``raw``, ``zlib`` (level 9) and ``lzma`` (xz container) for ``data``: (codec, bytes)."""
    candidates = [("raw", data)]
    if data:
        candidates.append(("zlib", zlib.compress(data, ZLIB_LEVEL)))
        candidates.append(("lzma", lzma.compress(data, format=lzma.FORMAT_XZ, preset=LZMA_PRESET)))
    return min(candidates, key=lambda c: len(c[1]))  # ties: the first, so raw before zlib before lzma


def decompress(codec: str, data: bytes, size: int) -> bytes:
    """Inverse of :func:`compress`; the result must be exactly ``size`` bytes (never more is decoded)."""
    if size < 0:
        raise ValueCodecError(f"negative size {size}")
    if codec == "raw":
        out, complete, rest = data, True, b""
    elif codec == "zlib":
        decoder = zlib.decompressobj()
        try:
            out = decoder.decompress(data, size + 1)
        except zlib.error as exc:
            raise ValueCodecError(f"corrupted zlib data ({exc})") from exc
        complete, rest = decoder.eof, decoder.unused_data + decoder.unconsumed_tail
    elif codec == "lzma":
        decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT)
        try:
            out = decoder.decompress(data, size + 1)
        except lzma.LZMAError as exc:
            raise ValueCodecError(f"corrupted lzma data ({exc})") from exc
        complete, rest = decoder.eof, decoder.unused_data
    else:
        raise ValueCodecError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    if len(out) != size or not complete or rest:
        raise ValueCodecError(f"{codec} data decodes to {'more than ' if len(out) > size else ''}{len(out)} "
                              f"bytes{'' if complete else ' (incomplete stream)'}, expected {size}")
    return out


def check_stream_size(codec: str, chunks: Iterable[bytes], size: int, step: int = 1 << 22) -> bool:
    """Decode a stored stream chunk by chunk and discard it: it must decode to exactly ``size`` bytes.

    Memory stays at about ``step`` whatever the stream claims, so a report can verify a file it never decodes.
    Returns whether any decoded byte is non-zero (an XOR stream of zeros only would change nothing).
    """
    nonzero = False

    def seen(out: bytes) -> int:
        nonlocal nonzero
        nonzero = nonzero or out.count(0) != len(out)
        return len(out)

    if codec not in CODECS:
        raise ValueCodecError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    if codec == "raw":
        produced = sum(seen(bytes(chunk)) for chunk in chunks)
        trailing = False
    else:
        decoder = zlib.decompressobj() if codec == "zlib" else \
            lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT)
        produced, trailing = 0, False
        try:
            for chunk in chunks:
                if decoder.eof:
                    trailing = trailing or bool(chunk)
                    continue
                data = bytes(chunk)
                while produced <= size and not decoder.eof:
                    produced += seen(decoder.decompress(data, step))
                    data = decoder.unconsumed_tail if codec == "zlib" else b""
                    if (codec == "zlib" and not data) or (codec == "lzma" and decoder.needs_input):
                        break
                if produced > size:
                    break
        except (zlib.error, lzma.LZMAError) as exc:
            raise ValueCodecError(f"corrupted {codec} data ({exc})") from exc
        trailing = trailing or bool(decoder.unused_data)
        if not decoder.eof and produced <= size:
            raise ValueCodecError(f"{codec} data decodes to {produced} bytes (incomplete stream), expected {size}")
    if produced != size or trailing:
        raise ValueCodecError(f"{codec} data decodes to {'more than ' if produced > size else ''}{produced} bytes"
                              f"{' and trailing data' if trailing else ''}, expected {size}")
    return nonzero
