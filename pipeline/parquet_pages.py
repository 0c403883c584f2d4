"""Read a row range of one Parquet column without reading the rest of its row group.

pyarrow reads a column chunk (one column of one row group) whole: with pyarrow's default row groups (up to 1Mi
rows) a 1 GB file of images is a single chunk, and every work unit of that file would read all of it. A chunk is
a sequence of pages (each a Thrift header + its values, ~1 MB); pages are independent apart from the dictionary
page at the chunk's start. So:

- `index_pages` (at plan time, once per file) finds every page's byte span and first row: from the file's page
  index (OffsetIndex, one read) when the writer wrote one, else by walking the page headers (one small read per
  page);
- `select` picks, for a unit's rows, the contiguous span of pages that covers them;
- `read_column` (in the task) reads only those bytes (plus the dictionary page and the footer) and hands pyarrow a
  small, valid Parquet file made of them: the original footer cut down to that one column and those pages. pyarrow
  still does all decoding (any encoding, compression, nulls), so values are exactly what a full read gives.

Columns with repeated values (lists) are not handled (a page's value count is then not its row count); encrypted
files neither. `index_pages` returns None for those and the caller reads whole row groups.

The footer is rewritten with a minimal Thrift compact-protocol reader/writer (the format of Parquet metadata).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeline import storage

# Thrift compact protocol types
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)
_BOOL = _TRUE  # how a bool field is stored in the parsed dicts (its value says true or false)

# Parquet Thrift field ids used here (parquet.thrift)
_FMD_VERSION, _FMD_SCHEMA, _FMD_NUM_ROWS, _FMD_ROW_GROUPS, _FMD_CREATED_BY, _FMD_COLUMN_ORDERS = 1, 2, 3, 4, 6, 7
_FMD_ENCRYPTION = 8
_SE_NAME, _SE_NUM_CHILDREN, _SE_REPETITION = 4, 5, 3
_RG_COLUMNS, _RG_NUM_ROWS = 1, 3
_CC_META, _CC_OFFSET_INDEX_OFFSET, _CC_OFFSET_INDEX_LENGTH, _CC_CRYPTO = 3, 4, 5, 8
_CMD_NUM_VALUES, _CMD_UNCOMPRESSED, _CMD_COMPRESSED, _CMD_DATA_OFFSET, _CMD_DICT_OFFSET = 5, 6, 7, 9, 11
_PH_TYPE, _PH_COMPRESSED_SIZE, _PH_DATA_V1, _PH_DATA_V2 = 1, 3, 5, 8
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_DICTIONARY_ENCODINGS = (2, 8)  # PLAIN_DICTIONARY, RLE_DICTIONARY
_REPEATED = 2
MAGIC = b"PAR1"


class _Reader:
    def __init__(self, buf: bytes, pos: int = 0):
        self.buf, self.pos = buf, pos

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise EOFError("Thrift data ends early")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def struct(self) -> dict:
        fields, last = {}, 0
        while True:
            header = self.byte()
            if header == _STOP:
                return fields
            ftype, delta = header & 0x0F, header >> 4
            fid = last + delta if delta else self.zigzag()
            if ftype in (_TRUE, _FALSE):
                fields[fid] = (_BOOL, ftype == _TRUE)
            else:
                fields[fid] = (ftype, self.value(ftype))
            last = fid

    def value(self, ftype: int):
        if ftype in (_TRUE, _FALSE):  # a bool inside a list: one byte
            return self.byte() == _TRUE
        if ftype == _BYTE:
            b = self.byte()
            return b - 256 if b > 127 else b
        if ftype in (_I16, _I32, _I64):
            return self.zigzag()
        if ftype == _DOUBLE:
            self.pos += 8
            if self.pos > len(self.buf):
                raise EOFError("Thrift data ends early")
            return struct.unpack_from("<d", self.buf, self.pos - 8)[0]
        if ftype == _BINARY:
            n = self.varint()
            self.pos += n
            if self.pos > len(self.buf):
                raise EOFError("Thrift data ends early")
            return bytes(self.buf[self.pos - n : self.pos])
        if ftype in (_LIST, _SET):
            header = self.byte()
            size, etype = header >> 4, header & 0x0F
            if size == 15:
                size = self.varint()
            return etype, [self.value(etype) for _ in range(size)]
        if ftype == _MAP:
            size = self.varint()
            if size == 0:
                return 0, 0, []
            kv = self.byte()
            return kv >> 4, kv & 0x0F, [(self.value(kv >> 4), self.value(kv & 0x0F)) for _ in range(size)]
        if ftype == _STRUCT:
            return self.struct()
        raise ValueError(f"unknown Thrift compact type {ftype}")


def _varint(out: bytearray, n: int) -> None:
    while True:
        if n < 0x80:
            out.append(n)
            return
        out.append((n & 0x7F) | 0x80)
        n >>= 7


def _zigzag(out: bytearray, n: int) -> None:
    _varint(out, (n << 1) ^ (n >> 63))


def _write_value(out: bytearray, ftype: int, value) -> None:
    if ftype == _BOOL:
        out.append(_TRUE if value else _FALSE)
    elif ftype == _BYTE:
        out.append(value & 0xFF)
    elif ftype in (_I16, _I32, _I64):
        _zigzag(out, value)
    elif ftype == _DOUBLE:
        out += struct.pack("<d", value)
    elif ftype == _BINARY:
        _varint(out, len(value))
        out += value
    elif ftype in (_LIST, _SET):
        etype, items = value
        if len(items) < 15:
            out.append(len(items) << 4 | etype)
        else:
            out.append(0xF0 | etype)
            _varint(out, len(items))
        for item in items:
            _write_value(out, etype, item)
    elif ftype == _MAP:
        ktype, vtype, items = value
        _varint(out, len(items))
        if items:
            out.append(ktype << 4 | vtype)
            for k, v in items:
                _write_value(out, ktype, k)
                _write_value(out, vtype, v)
    elif ftype == _STRUCT:
        _write_struct(out, value)
    else:
        raise ValueError(f"unknown Thrift compact type {ftype}")


def _write_struct(out: bytearray, fields: dict) -> None:
    last = 0
    for fid in sorted(fields):
        ftype, value = fields[fid]
        wire = (_TRUE if value else _FALSE) if ftype == _BOOL else ftype
        if 0 < fid - last <= 15:
            out.append((fid - last) << 4 | wire)
        else:
            out.append(wire)
            _zigzag(out, fid)
        if ftype != _BOOL:
            _write_value(out, ftype, value)
        last = fid
    out.append(_STOP)


# ---------------------------------------------------------------------------------------------------------------
# the file's metadata


@dataclass(frozen=True)
class Footer:
    offset: int  # where the Thrift FileMetaData starts
    length: int
    data: bytes

    def metadata(self) -> dict:
        return _Reader(self.data).struct()


def read_footer(uri: str, span: list[int] | tuple[int, int] | None = None) -> Footer:
    """The footer of a Parquet file: the [offset, length] `span` a previous call reported (one read), else one
    suffix read (64 KiB covers most footers) and a second if the footer is larger."""
    if span is not None:
        return Footer(span[0], span[1], storage.read_range(uri, span[0], span[0] + span[1]))
    suffix = 1 << 16
    tail = storage.read_range(uri, -suffix)
    if len(tail) < 12 or tail[-4:] != MAGIC:
        raise ValueError(f"{uri}: not a Parquet file (no PAR1 at its end)")
    (length,) = struct.unpack("<I", tail[-8:-4])
    if len(tail) < suffix:  # the whole file fit in the suffix read
        size = len(tail)
    else:
        fs, path = storage.filesystem(uri)
        size = storage.retry(lambda: fs.size(path), f"stat {uri}")
    data = tail[-8 - length : -8] if length + 8 <= len(tail) else storage.read_range(uri, size - 8 - length, size - 8)
    return Footer(size - 8 - length, length, data)


def _leaves(schema: list[dict]) -> list[tuple[str, list[int], bool]]:
    """(dotted path, indexes of the schema elements from the root to it, repeated anywhere on the way) per leaf
    column, in column order."""
    out = []
    pos = 1

    def walk(prefix: str, chain: list[int], repeated: bool) -> None:
        nonlocal pos
        index = pos
        element = schema[index]
        pos += 1
        name = prefix + element[_SE_NAME][1].decode()
        rep = repeated or element.get(_SE_REPETITION, (0, 0))[1] == _REPEATED
        children = element.get(_SE_NUM_CHILDREN, (0, 0))[1]
        if children:
            for _ in range(children):
                walk(name + ".", chain + [index], rep)
        else:
            out.append((name, chain + [index], rep))

    for _ in range(schema[0][_SE_NUM_CHILDREN][1]):
        walk("", [0], False)
    return out


# ---------------------------------------------------------------------------------------------------------------
# plan time: where each page is


@dataclass(frozen=True)
class Page:
    offset: int  # byte offset of the page header in the file
    size: int  # header + data
    first_row: int  # within the row group
    rows: int


@dataclass(frozen=True)
class ChunkPages:
    """The pages of one column chunk: the dictionary page's span (or None), then the data pages in order."""

    leaf: int
    dictionary: tuple[int, int] | None
    pages: list[Page]


def index_pages(uri: str, leaf_names: list[str], row_groups: list[int], footer: Footer | None = None,
                ) -> tuple[Footer, dict[tuple[int, int], ChunkPages]] | None:
    """Page spans of the given leaf columns (dotted paths, e.g. "image.bytes") in the given row groups, keyed by
    (row group, position in leaf_names); None if the file cannot be read page by page (encrypted, or a leaf is
    repeated)."""
    footer = footer or read_footer(uri)
    meta = footer.metadata()
    if _FMD_ENCRYPTION in meta:
        return None
    leaves = _leaves(meta[_FMD_SCHEMA][1][1])
    names = [name for name, _, _ in leaves]
    wanted = []
    for name in leaf_names:
        if name not in names or leaves[names.index(name)][2]:
            return None
        wanted.append(names.index(name))
    groups = meta[_FMD_ROW_GROUPS][1][1]
    out = {}
    for g in row_groups:
        group_rows = groups[g][_RG_NUM_ROWS][1]
        for i, leaf in enumerate(wanted):
            chunk = groups[g][_RG_COLUMNS][1][1][leaf]
            if _CC_CRYPTO in chunk:
                return None
            out[(g, i)] = _chunk_pages(uri, chunk, leaf, group_rows)
    return footer, out


def _chunk_pages(uri: str, chunk: dict, leaf: int, group_rows: int) -> ChunkPages:
    cmd = chunk[_CC_META][1]
    data_offset = cmd[_CMD_DATA_OFFSET][1]
    dict_offset = cmd.get(_CMD_DICT_OFFSET, (0, 0))[1]
    start = dict_offset if 0 < dict_offset < data_offset else data_offset
    end = start + cmd[_CMD_COMPRESSED][1]
    if _CC_OFFSET_INDEX_OFFSET in chunk and _CC_OFFSET_INDEX_LENGTH in chunk:
        raw = storage.read_range(uri, chunk[_CC_OFFSET_INDEX_OFFSET][1],
                                 chunk[_CC_OFFSET_INDEX_OFFSET][1] + chunk[_CC_OFFSET_INDEX_LENGTH][1])
        locations = _Reader(raw).struct()[1][1][1]  # OffsetIndex.page_locations: [{1 offset, 2 size, 3 first row}]
        firsts = [loc[3][1] for loc in locations] + [group_rows]
        pages = [Page(loc[1][1], loc[2][1], firsts[i], firsts[i + 1] - firsts[i]) for i, loc in enumerate(locations)]
        first_data = pages[0].offset if pages else end
        return ChunkPages(leaf, (start, first_data - start) if first_data > start else None, pages)
    return _walk_pages(uri, leaf, start, end)


def _walk_pages(uri: str, leaf: int, start: int, end: int) -> ChunkPages:
    """Read every page header of a chunk (one small read per page; the page data is skipped)."""
    dictionary, pages, row, pos = None, [], 0, start
    while pos < end:
        want = 1024
        while True:
            raw = storage.read_range(uri, pos, min(end, pos + want))
            reader = _Reader(raw)
            try:
                header = reader.struct()
                break
            except EOFError:
                if pos + want >= end:
                    raise ValueError(f"{uri}: a page header at byte {pos} runs past its column chunk") from None
                want *= 8  # a header with large statistics
        size = reader.pos + header[_PH_COMPRESSED_SIZE][1]
        kind = header[_PH_TYPE][1]
        if kind == _DICTIONARY_PAGE:
            dictionary = (pos, size)
        elif kind in (_DATA_PAGE, _DATA_PAGE_V2):
            # v1: num_values (= rows for a non-repeated column); v2: num_rows
            rows = header[_PH_DATA_V1][1][1][1] if kind == _DATA_PAGE else header[_PH_DATA_V2][1][3][1]
            pages.append(Page(pos, size, row, rows))
            row += rows
        pos += size
    return ChunkPages(leaf, dictionary, pages)


def select(chunk: ChunkPages, lo: int, hi: int) -> dict:
    """The JSON-able read plan for rows [lo, hi) of a row group: {"leaf", "dictionary": [offset, size] | None,
    "data": [offset, size], "first_row", "rows"} (data pages covering the rows; rows relative to the group)."""
    chosen = [p for p in chunk.pages if p.first_row < hi and p.first_row + p.rows > lo]
    if not chosen:
        raise ValueError(f"no page holds rows [{lo}, {hi})")
    first, last = chosen[0], chosen[-1]
    return {"leaf": chunk.leaf, "dictionary": list(chunk.dictionary) if chunk.dictionary else None,
            "data": [first.offset, last.offset + last.size - first.offset], "first_row": first.first_row,
            "rows": last.first_row + last.rows - first.first_row}


# ---------------------------------------------------------------------------------------------------------------
# task time: read the selected pages as a small Parquet file


def read_column(uri: str, footer: Footer, row_group: int, span: dict):
    """The values (a pyarrow Array) of rows [span.first_row, + span.rows) of one leaf column of a row group,
    reading only the span's pages. A struct leaf ("image.bytes") comes back as that field's values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_start, data_size = span["data"]
    dictionary = b""
    if span["dictionary"] and span["first_row"] == 0 and sum(span["dictionary"]) == data_start:
        # the chunk's first pages: dictionary-encoded if any are, and adjacent to it: one request
        d_start, d_size = span["dictionary"]
        raw = storage.read_range(uri, d_start, data_start + data_size)
        dictionary, data = raw[:d_size], raw[d_size:]
    else:
        data = storage.read_range(uri, data_start, data_start + data_size)
        # Writers fall back from dictionary to plain encoding when the dictionary grows too large (pyarrow after
        # 1,024 values of images): later pages do not need the dictionary page, often the largest of the chunk.
        if span["dictionary"] and _uses_dictionary(data):
            d_start, d_size = span["dictionary"]
            dictionary = storage.read_range(uri, d_start, d_start + d_size)
    meta = _one_column_metadata(footer.metadata(), row_group, span["leaf"], len(dictionary), len(data), span["rows"])
    out = bytearray(MAGIC)
    out += dictionary
    out += data
    _write_struct(out, meta)
    out += struct.pack("<I", len(out) - 4 - len(dictionary) - len(data))
    out += MAGIC
    column = pq.ParquetFile(pa.BufferReader(bytes(out)), pre_buffer=False).read(use_threads=False).column(0)
    column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    while pa.types.is_struct(column.type):  # the path down to the leaf: struct(s) with one field each
        column = column.flatten()[0]
    if len(column) != span["rows"]:
        raise ValueError(f"{uri}: pages at {span['data']} hold {len(column)} rows, expected {span['rows']}")
    return column


def _uses_dictionary(pages: bytes) -> bool:
    """Whether any data page in these bytes (whole pages, headers included) is dictionary-encoded."""
    pos = 0
    while pos < len(pages):
        reader = _Reader(pages, pos)
        header = reader.struct()
        kind = header[_PH_TYPE][1]
        if kind == _DATA_PAGE and header[_PH_DATA_V1][1][2][1] in _DICTIONARY_ENCODINGS:
            return True
        if kind == _DATA_PAGE_V2 and header[_PH_DATA_V2][1][4][1] in _DICTIONARY_ENCODINGS:
            return True
        pos = reader.pos + header[_PH_COMPRESSED_SIZE][1]
    return False


def _one_column_metadata(meta: dict, row_group: int, leaf: int, dict_size: int, data_size: int, rows: int) -> dict:
    """FileMetaData of a file holding only `leaf`'s dictionary page and the selected data pages of a row group."""
    schema = meta[_FMD_SCHEMA][1][1]
    chain = _leaves(schema)[leaf][1]
    pruned = []
    for i in chain:  # root -> ... -> leaf, each group keeping only the child on the path
        element = dict(schema[i])
        if i != chain[-1]:
            element[_SE_NUM_CHILDREN] = (_I32, 1)
        pruned.append(element)
    chunk = meta[_FMD_ROW_GROUPS][1][1][row_group][_RG_COLUMNS][1][1][leaf]
    cmd = {k: v for k, v in chunk[_CC_META][1].items() if k <= 9 or k == _CMD_DICT_OFFSET}  # drop stats, indexes
    cmd.pop(8, None)  # key/value metadata
    size = dict_size + data_size
    cmd[_CMD_NUM_VALUES] = (_I64, rows)
    cmd[_CMD_UNCOMPRESSED] = (_I64, size)
    cmd[_CMD_COMPRESSED] = (_I64, size)
    cmd[_CMD_DATA_OFFSET] = (_I64, len(MAGIC) + dict_size)
    if dict_size:
        cmd[_CMD_DICT_OFFSET] = (_I64, len(MAGIC))
    else:
        cmd.pop(_CMD_DICT_OFFSET, None)
    group = {_RG_COLUMNS: (_LIST, (_STRUCT, [{2: (_I64, len(MAGIC)), _CC_META: (_STRUCT, cmd)}])),
             2: (_I64, size), _RG_NUM_ROWS: (_I64, rows), 5: (_I64, len(MAGIC)), 6: (_I64, size)}
    out = {_FMD_VERSION: meta[_FMD_VERSION], _FMD_SCHEMA: (_LIST, (_STRUCT, pruned)), _FMD_NUM_ROWS: (_I64, rows),
           _FMD_ROW_GROUPS: (_LIST, (_STRUCT, [group]))}
    if _FMD_CREATED_BY in meta:  # readers work around known writer bugs by it
        out[_FMD_CREATED_BY] = meta[_FMD_CREATED_BY]
    if _FMD_COLUMN_ORDERS in meta:
        etype, orders = meta[_FMD_COLUMN_ORDERS][1]
        out[_FMD_COLUMN_ORDERS] = (_LIST, (etype, [orders[leaf]]))
    return out
