"""The JPEG grammar of the canonical body: an incremental, bit-exact validator over bytes.

    g = JpegGrammar(size=256, quality=25)
    state = g.start()                        # before the first body byte (FF D8)
    state = g.advance(state, token_bytes)    # None: no valid body starts with these bytes
    g.is_complete(state)                     # EOI consumed: the image is whole
    g.min_bytes_to_complete(state)           # length of the shortest valid continuation (0 when complete)
    g.shortest_completion(state)             # those bytes
    g.check(body)                            # GrammarVerdict: ok, or the offset of the first bad byte and why

What a valid body is (everything `pipeline.codec.canonicalize` writes, and nothing a strict decoder rejects):
- the fixed header of the size and quality (`codec.canonical_header`: SOI, SOF0, DRI = 1 MCU, SOS), byte for byte;
- per MCU the Huffman-coded blocks of the frame (4:2:0 colour: 4 Y + Cb + Cr) in the standard tables that
  `codec.tables(quality)` holds (read from that stream): a DC code and its extra bits, then AC run/size codes and
  their extra bits, at most 63 AC coefficients (a run past coefficient 63 is invalid, ZRL only where its 16 zeros
  fit), EOB ends a block, a block whose 63rd AC coefficient is coded ends without EOB; only code words the tables
  hold; a data byte FF is followed by 00 (stuffing);
- after the last block of an MCU, 1-bits up to the byte boundary, then exactly the next restart marker FF D0..D7
  (RST0 after MCU 0, cycling) between MCUs, and FF D9 after the last one; nothing after EOI.
Stricter than libjpeg (which accepts these silently): padding bits that are not 1s, fill bytes (FF FF) before a
marker or a stuffed FF, data after EOI. libjpeg-turbo also ignores runs past coefficient 63; we reject them.

State: one int. The header is a byte position; in the entropy-coded data the int holds the MCU index and the
decoder's state at a byte boundary (block, coefficient index, Huffman code prefix or extra bits left, a pending
stuffing byte). Each (decoder state, byte) transition is computed bit by bit once, lazily, and memoized, so after
warm-up `advance` does a list lookup per byte. Shortest completions are found by A* over bit-level decoder states
(cost in bytes, stuffing included) and memoized per decoder state.
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass

from pipeline.codec import QUALITY, SIZE, canonical_header, parse_header, tables

State = int

_UNKNOWN, _INVALID = -2, -1
# Decoder states at a byte boundary that are not inside an MCU (the in-MCU ones are >= 2 * 2048). An odd state is
# the even one with a stuffing 00 due (its last data byte was FF).
_DONE = 0  # the MCU's data is complete: a marker (FF) must follow
_DONE_STUFF = _DONE + 1  # complete, but its last data byte was FF: 00 must follow
_MARK = 2  # FF of a marker read: RSTn or EOI must follow
_END = 4  # EOI read
_MCU_STRIDE = 1 << 30  # state = (mcu + 1) * _MCU_STRIDE + decoder state; header positions are below it
_UNKNOWN_ROW = array("i", [_UNKNOWN] * 256)
_MCU_END = None  # bit-level: the last block of the MCU is finished
_NO_PATH = 1 << 30  # fewest bits to finish, where nothing finishes


@dataclass(frozen=True)
class GrammarVerdict:
    ok: bool  # a complete, valid body
    complete: bool  # EOI reached (only with ok)
    offset: int | None  # first byte no valid body has there; len(body) for a valid but unfinished prefix
    reason: str  # why not ok ("" when ok)


@dataclass(frozen=True)
class _Huffman:
    """One Huffman table as a code tree: node id = 1 << length | code, root = 1, child = node << 1 | bit."""

    leaves: dict  # node id -> symbol
    inner: frozenset  # node ids of proper prefixes of code words
    leaves_under: dict  # node id (inner or leaf) -> ((extra length, symbol), ...) of the code words below it


def _huffman(counts: bytes, symbols: bytes) -> _Huffman:
    leaves, inner = {}, set()
    code, i = 0, 0
    for length in range(1, 17):
        for _ in range(counts[length - 1]):
            node = 1 << length | code
            leaves[node] = symbols[i]
            prefix = node >> 1
            while prefix > 1 and prefix not in inner:
                inner.add(prefix)
                prefix >>= 1
            i += 1
            code += 1
        code <<= 1
    inner.add(1)
    under: dict = {}
    for leaf, sym in leaves.items():
        node, depth = leaf, 0
        while node >= 1:
            under.setdefault(node, []).append((depth, sym))
            node >>= 1
            depth += 1
    return _Huffman(leaves, frozenset(inner), {k: tuple(v) for k, v in under.items()})


def huffman_tables(stream: bytes) -> dict[tuple[int, int], _Huffman]:
    """(class 0 = DC / 1 = AC, table id) -> table, from the DHT segments of a JPEG (tables-only) stream."""
    out, i = {}, 2
    while i + 4 <= len(stream) and stream[i] == 0xFF and stream[i + 1] not in (0xD9, 0xDA):
        marker, length = stream[i + 1], int.from_bytes(stream[i + 2 : i + 4], "big")
        seg, i = stream[i + 4 : i + 2 + length], i + 2 + length
        j = 0
        while marker == 0xC4 and j < len(seg):
            counts = seg[j + 1 : j + 17]
            total = sum(counts)
            out[(seg[j] >> 4, seg[j] & 15)] = _huffman(counts, seg[j + 17 : j + 17 + total])
            j += 17 + total
    return out


class JpegGrammar:
    """The canonical bodies of one size and quality (see the module docstring). Threads may share one: the lazy
    memo's writes are idempotent."""

    def __init__(self, size: int = SIZE, quality: int = QUALITY):
        self.size, self.quality = size, quality
        self.header = canonical_header(size, quality)
        h = parse_header(self.header, 0)
        huff = huffman_tables(tables(quality))
        hv = {c[0]: c[1] * c[2] for c in h.components}
        interleaved = len(h.scan_components) > 1
        # Per block of an MCU: (DC table, AC table); a one-component scan has one block per MCU.
        self._blocks = tuple((huff[(0, td)], huff[(1, ta)]) for cid, td, ta in h.scan_components
                             for _ in range(hv[cid] if interleaved else 1))
        hmax = max(c[1] for c in h.components) if interleaved else 1
        vmax = max(c[2] for c in h.components) if interleaved else 1
        self.mcus = -(-h.width // (8 * hmax)) * -(-h.height // (8 * vmax))
        if h.restart_interval != 1:
            raise ValueError(f"canonical header with restart interval {h.restart_interval}, expected 1")
        self._start_sub = self._encode(0, 0, 0, 1)
        self._first_entropy_state = _MCU_STRIDE + self._start_sub
        self._complete_state = self.mcus * _MCU_STRIDE + _END
        # decoder state -> next state per byte (_UNKNOWN until computed); int32 arrays: 1 KB per state, no int objects
        self._trans: dict[int, array] = {}
        self._block_min: dict[tuple[int, int], int] = {}
        self._node_min: dict[tuple[int, int, int], int] = {}
        self._tail: dict[int, bytes] = {}  # decoder state -> shortest bytes to _DONE

    # ---- the API --------------------------------------------------------------------------------------------------

    def start(self) -> State:
        return 0

    def is_complete(self, state: State) -> bool:
        return state == self._complete_state

    def advance(self, state: State, data: bytes) -> State | None:
        if state < _MCU_STRIDE:  # in the header
            n = len(self.header) - state
            if self.header[state : state + len(data)] != data[:n]:
                return None
            if len(data) < n:
                return state + len(data)
            state, data = self._first_entropy_state, data[n:]
        mcu, sub = divmod(state, _MCU_STRIDE)
        trans = self._trans
        for b in data:
            if sub & 1:  # a stuffing 00 is due
                if b:
                    return None
                sub -= 1
                continue
            if sub == _MARK:
                if mcu < self.mcus and b == 0xD0 + (mcu - 1) % 8:
                    mcu, sub = mcu + 1, self._start_sub
                    continue
                if mcu == self.mcus and b == 0xD9:
                    sub = _END
                    continue
                return None
            row = trans.get(sub)
            if row is None:
                row = trans[sub] = _UNKNOWN_ROW[:]
            nxt = row[b]
            if nxt < 0:
                if nxt == _INVALID:
                    return None
                nxt = row[b] = self._byte_step(sub, b)[0]
                if nxt == _INVALID:
                    return None
            sub = nxt
        return mcu * _MCU_STRIDE + sub

    def min_bytes_to_complete(self, state: State) -> int:
        """len(shortest_completion(state)), in O(1) once the decoder state's tail is memoized."""
        if state < _MCU_STRIDE:
            return len(self.header) - state + self.min_bytes_to_complete(self._first_entropy_state)
        mcu, sub = divmod(state, _MCU_STRIDE)
        if sub == _END:
            return 0
        # each MCU after this one: its marker, its data, the FF of the next marker; then D9
        rest = (self.mcus - mcu) * (2 + len(self._tail_to_done(self._start_sub))) + 1
        return rest if sub == _MARK else len(self._tail_to_done(sub)) + 1 + rest

    def shortest_completion(self, state: State) -> bytes:
        """The shortest bytes that make `state` a complete body (b"" when complete)."""
        if state < _MCU_STRIDE:
            return self.header[state:] + self.shortest_completion(self._first_entropy_state)
        mcu, sub = divmod(state, _MCU_STRIDE)
        if sub == _END:
            return b""
        if sub == _MARK:
            out = bytearray()
        else:
            out = bytearray(self._tail_to_done(sub) + b"\xff")
        fresh = self._tail_to_done(self._start_sub)
        while mcu < self.mcus:
            out += bytes([0xD0 + (mcu - 1) % 8]) + fresh + b"\xff"
            mcu += 1
        out.append(0xD9)
        return bytes(out)

    def check(self, body: bytes) -> GrammarVerdict:
        """The whole stream: ok (valid and complete), or the offset of the first bad byte and the reason."""
        state = self.advance(self.start(), body)
        if state is not None:
            if self.is_complete(state):
                return GrammarVerdict(True, True, None, "")
            need = self.min_bytes_to_complete(state)
            return GrammarVerdict(False, False, len(body), f"truncated: at least {need} more bytes needed")
        state, chunk = self.start(), 64
        for i in range(0, len(body), chunk):  # find the chunk, then the byte
            nxt = self.advance(state, body[i : i + chunk])
            if nxt is None:
                for j in range(i, min(i + chunk, len(body))):
                    nxt = self.advance(state, body[j : j + 1])
                    if nxt is None:
                        return GrammarVerdict(False, False, j, self.explain(state, body[j]))
                    state = nxt
            state = nxt
        raise AssertionError("advance rejected the whole body but accepted every byte")

    def explain(self, state: State, byte: int) -> str:
        """Why `byte` cannot follow `state` (for messages; slow)."""
        if state < _MCU_STRIDE:
            return f"header byte {state}: {byte:02X} where the canonical header has {self.header[state]:02X}"
        mcu, sub = divmod(state, _MCU_STRIDE)
        where = f"MCU {mcu - 1} of {self.mcus}"
        if sub == _END:
            return "data after EOI"
        if sub == _MARK:
            want = "EOI (D9)" if mcu == self.mcus else f"RST{(mcu - 1) % 8} (D{(mcu - 1) % 8})"
            return f"marker FF {byte:02X} after {where}; expected {want}"
        if sub == _DONE:
            return f"{where} is complete: {byte:02X} where a marker (FF) must follow"
        return f"{where}: {self._byte_step(sub, byte)[1]}"

    # ---- decoder states -------------------------------------------------------------------------------------------
    # In the MCU: kind 0 = reading a Huffman code (val = code tree node) for coefficient k of block blk (k 0 = DC);
    # kind 1 = reading extra bits (val = bits left), k = the coefficient after them. Bit 0: a stuffing 00 is due.

    @staticmethod
    def _encode(kind: int, blk: int, k: int, val: int) -> int:
        return (((val * 2 + kind) * 8 + blk) * 128 + k) * 2

    @staticmethod
    def _decode(sub: int) -> tuple[int, int, int, int]:
        sub >>= 1
        k, sub = sub & 127, sub >> 7
        blk, sub = sub & 7, sub >> 3
        return sub & 1, blk, k, sub >> 1

    def _after_coefficient(self, blk: int, k: int):
        """Bit-level state once a coefficient (or ZRL) is decoded and the next one is k."""
        if k < 64:
            return (0, blk, k, 1)
        return (0, blk + 1, 0, 1) if blk + 1 < len(self._blocks) else _MCU_END

    def _bit(self, st, bit: int):
        """One bit -> the next bit-level state, or a string saying why no valid stream has it."""
        kind, blk, k, val = st
        if kind == 1:
            return (1, blk, k, val - 1) if val > 1 else self._after_coefficient(blk, k)
        table = self._blocks[blk][k > 0]
        node = val << 1 | bit
        sym = table.leaves.get(node)
        if sym is None:
            if node not in table.inner:
                return f"no {'AC' if k else 'DC'} code word starts {bin(node)[3:]} (block {blk})"
            if self._node_min_bits(blk, k, node) >= _NO_PATH:  # a prefix of nothing but runs past 63: a dead end
                return f"every AC code word starting {bin(node)[3:]} runs past coefficient 63 (at {k}, block {blk})"
            return (0, blk, k, node)
        if k == 0:  # DC: sym = size of the difference, read as extra bits
            return (1, blk, 1, sym) if sym else self._after_coefficient(blk, 1)
        run, size = sym >> 4, sym & 15
        if size == 0:
            if run == 15:  # ZRL: 16 zeros
                if k + 16 > 64:
                    return f"ZRL at coefficient {k} runs past 63 (block {blk})"
                return self._after_coefficient(blk, k + 16)
            return self._after_coefficient(blk, 64)  # EOB
        if k + run > 63:
            return f"run of {run} zeros at coefficient {k} runs past 63 (block {blk})"
        return (1, blk, k + run + 1, size)

    def _byte_step(self, sub: int, b: int) -> tuple[int, str]:
        """(next decoder state or _INVALID, reason): eight bits through the decoder, or a marker/stuffing byte."""
        if sub == _DONE:
            return (_MARK, "") if b == 0xFF else (_INVALID, f"{b:02X} where a marker (FF) must follow")
        if sub == _END:
            return _INVALID, "data after EOI"
        if sub & 1:
            if b:
                return _INVALID, f"data byte FF followed by {b:02X}, not the stuffing 00"
            return sub - 1, ""
        st = self._decode(sub)
        for i in range(7, -1, -1):
            st = self._bit(st, (b >> i) & 1)
            if isinstance(st, str):
                return _INVALID, f"byte {b:02X}: {st}"
            if st is _MCU_END:
                pad = b & ((1 << i) - 1)
                if pad != (1 << i) - 1:
                    return _INVALID, f"byte {b:02X}: padding after the MCU's last block is not all 1-bits"
                return (_DONE_STUFF if b == 0xFF else _DONE), ""
        return self._encode(*st) + (b == 0xFF), ""

    # ---- shortest completions -------------------------------------------------------------------------------------

    def _block_min_bits(self, blk: int, k: int) -> int:
        """Fewest bits that finish block blk from the start of coefficient k's code (k 0 = DC, 64 = done)."""
        if k >= 64:
            return 0
        key = (blk, k)
        if key not in self._block_min:
            for kk in range(63, k - 1, -1):  # fill from the end: no deep recursion
                if (blk, kk) not in self._block_min:
                    self._block_min[(blk, kk)] = self._node_min_bits(blk, kk, 1)
        return self._block_min[key]

    def _after_symbol_bits(self, blk: int, k: int, sym: int) -> int | None:
        """Bits after a code word of `sym` at coefficient k to the end of the block (None: invalid there)."""
        if k == 0:
            return sym + self._block_min_bits(blk, 1)
        run, size = sym >> 4, sym & 15
        if size == 0:
            if run == 15:
                return None if k + 16 > 64 else self._block_min_bits(blk, k + 16)
            return 0
        return None if k + run > 63 else size + self._block_min_bits(blk, k + run + 1)

    def _node_min_bits(self, blk: int, k: int, node: int) -> int:
        key = (blk, k, node)
        best = self._node_min.get(key)
        if best is None:
            best = _NO_PATH
            for depth, sym in self._blocks[blk][k > 0].leaves_under[node]:
                rest = self._after_symbol_bits(blk, k, sym)
                if rest is not None and depth + rest < best:
                    best = depth + rest
            self._node_min[key] = best
        return best

    def _min_bits(self, st) -> int:
        """Fewest bits from a bit-level state to the end of the MCU's last block."""
        if st is _MCU_END:
            return 0
        kind, blk, k, val = st
        later = sum(self._block_min_bits(b, 0) for b in range(blk + 1, len(self._blocks)))
        if kind == 1:
            return val + self._block_min_bits(blk, k) + later
        return self._node_min_bits(blk, k, val) + later

    def _tail_to_done(self, sub: int) -> bytes:
        """Shortest bytes from a decoder state to _DONE (the MCU's data complete at a byte boundary)."""
        if sub in (_DONE, _DONE_STUFF):
            return b"" if sub == _DONE else b"\x00"
        if sub & 1:
            return b"\x00" + self._tail_to_done(sub - 1)
        tail = self._tail.get(sub)
        if tail is None:
            tail = self._tail[sub] = self._search_tail(self._decode(sub))
        return tail

    def _search_tail(self, st) -> bytes:
        """A* over (bit-level state, bits in the current byte, are they all 1s): cost = bytes written, a data FF
        costing 2 (its stuffing 00); the heuristic, whole bytes of the fewest remaining bits, never overestimates."""
        heap = [(-(-self._min_bits(st) // 8), self._min_bits(st), 0, (st, 0, True, 0), ())]
        closed = set()  # (state, bit position, all ones so far): the heuristic is consistent, first pop is best
        counter = 0
        while heap:
            _, _, _, node, bits = heapq.heappop(heap)
            st, pos, ones, done = node
            if st is _MCU_END:
                return _bits_to_bytes(bits)
            if (st, pos, ones) in closed:
                continue
            closed.add((st, pos, ones))
            for bit in (0, 1):
                nxt = self._bit(st, bit)
                if isinstance(nxt, str):
                    continue
                p, o, d = pos + 1, ones and bit == 1, done
                if p == 8:
                    p, d, o = 0, d + 1 + o, True
                counter += 1
                if nxt is _MCU_END:  # pad with 1-bits to the byte boundary
                    cost = d + (p > 0) + (p > 0 and o)
                    heapq.heappush(heap, (cost, -1, counter, (nxt, p, o, d), bits + (bit,)))
                else:
                    rest = self._min_bits(nxt)
                    heapq.heappush(heap, (d + -(-(p + rest) // 8), d * 8 + p + rest, counter, (nxt, p, o, d),
                                          bits + (bit,)))
        raise AssertionError("no completion of a reachable decoder state")


def _bits_to_bytes(bits: tuple) -> bytes:
    """Bits (MSB first) padded with 1-bits to a byte boundary, a data FF stuffed with 00."""
    bits = bits + (1,) * (-len(bits) % 8)
    out = bytearray()
    for i in range(0, len(bits), 8):
        byte = int("".join(map(str, bits[i : i + 8])), 2)
        out.append(byte)
        if byte == 0xFF:
            out.append(0)
    return bytes(out)
