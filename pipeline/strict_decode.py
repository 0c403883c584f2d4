"""The strict judge: does libjpeg-turbo decode a JPEG file with no warning at all?

    strict_decodable(jpeg)              # in-process: libturbojpeg (ctypes), TJFLAG_STOPONWARNING
    strict_decodable_many(jpegs)        # the same over a list
    strict_error(jpeg)                  # None, or libjpeg-turbo's message ("Corrupt JPEG data: premature end ...")
    djpeg_strict(jpeg)                  # the reference: `djpeg -strict` in a subprocess (~1 ms startup per file)

libjpeg-turbo decodes damaged entropy-coded data with a warning (missing bits read as zeros, a lost restart
marker resynchronized, bad Huffman codes skipped) and shows an image anyway; a sample counts as strictly decodable
only when it decodes with no warning, the whole way to EOI. Both judges come from Debian's `libjpeg-turbo-progs`
(which pulls in `libturbojpeg0`), installed by `make setup`; they agree on every file of
bench/grammar_differential.py (see docs/sampling.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import shutil
import subprocess
import threading
from typing import Iterable

from jpeglm.errors import UserError

_TJFLAG_STOPONWARNING = 8192
_TJPF_RGB = 0
_LIBRARY = "libturbojpeg.so.0"


class StrictDecoderMissing(UserError):
    """libturbojpeg or djpeg is not installed."""


@functools.cache
def _library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(_LIBRARY)
    except OSError:
        found = ctypes.util.find_library("turbojpeg")
        if not found:
            raise StrictDecoderMissing(
                f"the strict JPEG judge needs {_LIBRARY} (Debian/Ubuntu: libjpeg-turbo-progs); run `make setup`, "
                "or: sudo apt-get install libjpeg-turbo-progs") from None
        lib = ctypes.CDLL(found)
    lib.tjInitDecompress.restype = ctypes.c_void_p
    lib.tjDestroy.argtypes = [ctypes.c_void_p]
    lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong] + [
        ctypes.POINTER(ctypes.c_int)] * 4
    lib.tjDecompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.tjGetErrorStr2.argtypes = [ctypes.c_void_p]
    lib.tjGetErrorStr2.restype = ctypes.c_char_p
    return lib


class _Handle(threading.local):
    """One TurboJPEG decompressor per thread (a handle is not thread-safe); freed with the thread."""

    def __init__(self):
        self.lib = _library()
        self.handle = self.lib.tjInitDecompress()
        if not self.handle:
            raise RuntimeError("tjInitDecompress failed")
        self.buffer = ctypes.create_string_buffer(0)

    def renew(self):
        self.lib.tjDestroy(self.handle)
        self.handle = self.lib.tjInitDecompress()

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.tjDestroy(self.handle)


_local: _Handle | None = None


def strict_error(jpeg: bytes) -> str | None:
    """None when libjpeg-turbo decodes the whole file without a warning; else its (first) message."""
    global _local
    if _local is None:
        _local = _Handle()
    lib, h = _local.lib, _local.handle
    width, height, subsamp, colorspace = (ctypes.c_int() for _ in range(4))
    if lib.tjDecompressHeader3(h, jpeg, len(jpeg), ctypes.byref(width), ctypes.byref(height), ctypes.byref(subsamp),
                               ctypes.byref(colorspace)) != 0:
        message = "header: " + lib.tjGetErrorStr2(h).decode(errors="replace")
        _local.renew()  # a failed header read leaves the handle mid-stream: every later header would fail
        return message
    need = width.value * height.value * 3
    if need > 1 << 28:
        return f"header: {width.value}x{height.value} is larger than a sample can be"
    if len(_local.buffer) < need:
        _local.buffer = ctypes.create_string_buffer(need)
    if lib.tjDecompress2(h, jpeg, len(jpeg), _local.buffer, width.value, 0, height.value, _TJPF_RGB,
                         _TJFLAG_STOPONWARNING) != 0:  # -1 on an error or (even without the flag) any warning
        return lib.tjGetErrorStr2(h).decode(errors="replace")
    return None


def strict_decodable(jpeg: bytes) -> bool:
    """libjpeg-turbo decodes the whole file with no warning (in-process; the judge of `strict_fraction`)."""
    return strict_error(jpeg) is None


def strict_decodable_many(jpegs: Iterable[bytes]) -> list[bool]:
    return [strict_error(j) is None for j in jpegs]


def djpeg_strict(jpeg: bytes, timeout: float = 60.0) -> bool:
    """The reference judge: `djpeg -strict` (warnings fatal) exits 0."""
    exe = shutil.which("djpeg")
    if exe is None:
        raise StrictDecoderMissing("djpeg is not installed (Debian/Ubuntu: libjpeg-turbo-progs); run `make setup`, "
                                   "or: sudo apt-get install libjpeg-turbo-progs")
    done = subprocess.run([exe, "-strict", "-outfile", "/dev/null"], input=jpeg, capture_output=True, timeout=timeout)
    return done.returncode == 0


def djpeg_strict_many(jpegs: Iterable[bytes]) -> list[bool]:
    return [djpeg_strict(j) for j in jpegs]
