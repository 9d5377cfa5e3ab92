"""MCAP at the record level: CRCs for the files rosbags writes, and chunk-by-chunk reading that
skips a damaged chunk instead of ending the bag there.

rosbags (0.11) writes every CRC of an MCAP file as 0, "not available": chunk ``uncompressed_crc``,
DataEnd ``data_section_crc`` and Footer ``summary_crc``. Flipped bytes then change points, pixels
and labels unseen. :func:`add_crcs` fills all three in after the writer closed the file, in place
(each is a fixed 4-byte field, so no offset moves), exactly as the MCAP specification defines
them (https://mcap.dev/spec):

- Chunk ``uncompressed_crc``: CRC-32 of the chunk's uncompressed ``records`` field;
- DataEnd ``data_section_crc``: CRC-32 of every byte from the start of the file (magic
  included) up to the DataEnd record;
- Footer ``summary_crc``: CRC-32 from the start of the summary section through the footer's
  ``summary_offset_start`` field (the footer's opcode and length included).

rosbags' reader stops at the first chunk whose CRC or decompression fails (the message
generator raises), so everything after it is lost. :class:`McapChunkReader` reads the chunk
index from the summary and gives each chunk's messages separately; a chunk that fails its CRC,
does not decompress or holds malformed records raises :class:`ChunkError` for that chunk only,
and :meth:`McapChunkReader.indexed_messages` says from the message index records (which lie
outside the chunk) what the lost chunk held. ``io.bag.BagReader`` uses it to skip the chunk,
count what was in it and go on with the next one.

CRC-32 here is zlib's (ISO 3309, the one the spec names). Pure Python + zlib; only the file's
records are parsed, messages stay raw CDR bytes.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"\x89MCAP0\r\n"
OP_HEADER, OP_FOOTER, OP_SCHEMA, OP_CHANNEL, OP_MESSAGE = 0x01, 0x02, 0x03, 0x04, 0x05
OP_CHUNK, OP_MESSAGE_INDEX, OP_CHUNK_INDEX, OP_DATA_END = 0x06, 0x07, 0x08, 0x0F
_RECORD_HEAD = struct.Struct("<BQ")  # opcode, content length
_FOOTER_LEN = 1 + 8 + 20  # opcode, length, summary_start, summary_offset_start, summary_crc
# Chunk content: message_start_time u64, message_end_time u64, uncompressed_size u64, then
# uncompressed_crc u32 at this offset.
_CHUNK_CRC_AT = 24


class McapFormatError(ValueError):
    """The file is not an MCAP this module can index (no magic, no footer, no summary, no chunk
    index). Callers fall back to a plain reader."""


class ChunkError(ValueError):
    """One chunk cannot be used: its CRC does not match, it does not decompress, or its records
    are malformed. ``reason`` is a short keyword, the message says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------------------- parsing


def _u16(b: bytes | memoryview, p: int) -> int:
    return struct.unpack_from("<H", b, p)[0]


def _u32(b: bytes | memoryview, p: int) -> int:
    return struct.unpack_from("<I", b, p)[0]


def _u64(b: bytes | memoryview, p: int) -> int:
    return struct.unpack_from("<Q", b, p)[0]


def _string(b: bytes | memoryview, p: int) -> tuple[str, int]:
    n = _u32(b, p)
    if p + 4 + n > len(b):
        raise struct.error(f"string of {n} bytes at {p} runs past the record")
    return bytes(b[p + 4:p + 4 + n]).decode("utf-8"), p + 4 + n


def _records(b: bytes | memoryview, start: int = 0, end: int | None = None
             ) -> Iterator[tuple[int, int, int]]:
    """(opcode, content start, content end) of each record in ``b[start:end]``."""
    end = len(b) if end is None else end
    p = start
    while p < end:
        if p + 9 > end:
            raise struct.error(f"record header at {p} runs past the end ({end})")
        op, n = _RECORD_HEAD.unpack_from(b, p)
        if op == 0 or p + 9 + n > end:
            raise struct.error(f"record at {p} (opcode {op:#x}, {n} bytes) runs past the end ({end})")
        yield op, p + 9, p + 9 + n
        p += 9 + n


def _decompress(data: bytes, compression: str, size: int) -> bytes:
    if compression == "":
        return data
    if compression == "zstd":
        try:
            from compression import zstd  # Python 3.14
        except ImportError:
            try:
                from backports import zstd  # what rosbags depends on before 3.14
            except ImportError:
                import zstandard as zstd
        return zstd.decompress(data)
    if compression == "lz4":
        from lz4.frame import decompress

        return decompress(data)
    raise ChunkError("compression", f"unsupported chunk compression {compression!r}")


@dataclass(frozen=True)
class Channel:
    """An MCAP Channel with its Schema's name (for ROS 2 bags: the message type)."""

    id: int
    topic: str
    schema_name: str
    message_encoding: str


@dataclass(frozen=True)
class ChunkIndex:
    """One Chunk Index record of the summary: where a chunk and its message indexes lie."""

    ordinal: int  # position in the summary, 0-based
    message_start_time: int
    message_end_time: int
    chunk_start_offset: int
    chunk_length: int
    message_index_offsets: dict[int, int] = field(hash=False, compare=False)
    message_index_length: int = 0
    compression: str = ""
    compressed_size: int = 0
    uncompressed_size: int = 0


# ------------------------------------------------------------------------------------- writing


def add_crcs(path: str | os.PathLike[str]) -> dict[str, int]:
    """Fill in the CRCs an MCAP writer left at 0, in place; returns what was filled.

    Chunk CRCs first (each chunk's field lies inside the data section), then the data section
    CRC over the patched bytes, then the summary CRC. A CRC that is already non-zero is kept
    (and not re-checked). The file is read once, streamed record by record (memory: one record).

    Returns:
        {"chunks": chunk CRCs written, "data_section": 0 or 1, "summary": 0 or 1}.

    Raises:
        McapFormatError: not an MCAP file, or records that do not parse.
    """
    path = Path(path)
    filled = {"chunks": 0, "data_section": 0, "summary": 0}
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if f.read(8) != MAGIC:
            raise McapFormatError(f"{path} does not start with the MCAP magic")
        crc = zlib.crc32(MAGIC)
        pos = 8
        data_end_at = None
        while pos < size:
            f.seek(pos)
            head = f.read(9)
            if len(head) < 9:
                raise McapFormatError(f"{path}: record header at {pos} is cut off")
            op, n = _RECORD_HEAD.unpack(head)
            if op == OP_DATA_END:
                data_end_at = pos
                break
            if op == OP_FOOTER:
                break  # no DataEnd (not spec-conformant): no data section CRC
            content = bytearray(f.read(n))
            if len(content) < n:
                raise McapFormatError(f"{path}: record at {pos} ({n} bytes) is cut off")
            if op == OP_CHUNK and _u32(content, _CHUNK_CRC_AT) == 0:
                try:
                    uncompressed_size = _u64(content, 16)
                    compression, q = _string(content, _CHUNK_CRC_AT + 4)
                    records_len = _u64(content, q)
                    records = bytes(content[q + 8:q + 8 + records_len])
                    raw = _decompress(records, compression, uncompressed_size)
                except (struct.error, UnicodeDecodeError, ChunkError) as exc:
                    raise McapFormatError(f"{path}: chunk at {pos} does not parse: {exc}") from exc
                chunk_crc = zlib.crc32(raw)
                struct.pack_into("<I", content, _CHUNK_CRC_AT, chunk_crc)
                f.seek(pos + 9 + _CHUNK_CRC_AT)
                f.write(struct.pack("<I", chunk_crc))
                filled["chunks"] += 1
            crc = zlib.crc32(head, crc)
            crc = zlib.crc32(content, crc)
            pos += 9 + n
        if data_end_at is not None:
            f.seek(data_end_at + 9)
            if _u32(f.read(4), 0) == 0:
                f.seek(data_end_at + 9)
                f.write(struct.pack("<I", crc))
                filled["data_section"] = 1
        footer_at = size - 8 - _FOOTER_LEN
        f.seek(footer_at)
        footer = f.read(_FOOTER_LEN + 8)
        if footer[-8:] != MAGIC or footer[0] != OP_FOOTER:
            raise McapFormatError(f"{path} has no footer (an interrupted recording?)")
        summary_start = _u64(footer, 9)
        if summary_start and _u32(footer, 25) == 0:
            f.seek(summary_start)
            scrc = zlib.crc32(f.read(footer_at - summary_start))
            scrc = zlib.crc32(footer[:25], scrc)
            f.seek(footer_at + 25)
            f.write(struct.pack("<I", scrc))
            filled["summary"] = 1
        f.flush()
        os.fsync(f.fileno())
    return filled


# ------------------------------------------------------------------------------------- reading


class McapChunkReader:
    """The chunks of an indexed MCAP file, read one at a time (see the module docstring).

    Opening reads the footer and the summary (schemas, channels, chunk indexes). A summary whose
    CRC does not match is still used (its chunk offsets are then checked chunk by chunk), and
    ``summary_error`` says so.

    Raises:
        McapFormatError: no magic, no footer, no summary or no chunk index.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.summary_error: str | None = None
        self._f = open(self.path, "rb")
        try:
            self._open()
        except BaseException:
            self._f.close()
            raise

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> McapChunkReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, offset: int, n: int) -> bytes:
        self._f.seek(offset)
        data = self._f.read(n)
        if len(data) != n:
            raise ChunkError("truncated", f"{n} bytes at offset {offset} run past the end of the file")
        return data

    def _open(self) -> None:
        f = self._f
        size = os.fstat(f.fileno()).st_size
        self.size = size
        if size < 8 + _FOOTER_LEN + 8 or f.read(8) != MAGIC:
            raise McapFormatError(f"{self.path} is not an MCAP file (no magic)")
        footer_at = size - 8 - _FOOTER_LEN
        f.seek(footer_at)
        footer = f.read(_FOOTER_LEN + 8)
        if footer[-8:] != MAGIC or footer[0] != OP_FOOTER or _u64(footer, 1) != 20:
            raise McapFormatError(f"{self.path} has no footer (an interrupted recording?)")
        summary_start, summary_offset_start, summary_crc = (
            _u64(footer, 9), _u64(footer, 17), _u32(footer, 25))
        if not 8 < summary_start <= footer_at:
            raise McapFormatError(f"{self.path} has no summary section")
        f.seek(summary_start)
        summary = f.read(footer_at - summary_start)
        if summary_crc and zlib.crc32(footer[:25], zlib.crc32(summary)) != summary_crc:
            self.summary_error = "summary CRC mismatch"
            log.warning("%s: the MCAP summary fails its CRC; its chunk index is used with care",
                        self.path)
        end = (summary_offset_start - summary_start
               if summary_start < summary_offset_start <= footer_at else len(summary))
        schemas: dict[int, str] = {}
        channels: dict[int, tuple[int, str, str]] = {}
        chunks: list[ChunkIndex] = []
        try:
            for op, a, b in _records(summary, 0, end):
                rec = memoryview(summary)[a:b]
                if op == OP_SCHEMA:
                    sid = _u16(rec, 0)
                    name, _ = _string(rec, 2)
                    schemas[sid] = name
                elif op == OP_CHANNEL:
                    cid, sid = _u16(rec, 0), _u16(rec, 2)
                    topic, q = _string(rec, 4)
                    encoding, _ = _string(rec, q)
                    channels[cid] = (sid, topic, encoding)
                elif op == OP_CHUNK_INDEX:
                    start_t, end_t, offset, length = struct.unpack_from("<QQQQ", rec, 0)
                    map_len = _u32(rec, 32)
                    offsets = {cid: off for cid, off in struct.iter_unpack(
                        "<HQ", bytes(rec[36:36 + map_len]))}
                    q = 36 + map_len
                    index_len = _u64(rec, q)
                    compression, q = _string(rec, q + 8)
                    compressed, uncompressed = struct.unpack_from("<QQ", rec, q)
                    chunks.append(ChunkIndex(len(chunks), start_t, end_t, offset, length, offsets,
                                             index_len, compression, compressed, uncompressed))
        except (struct.error, UnicodeDecodeError) as exc:
            raise McapFormatError(f"{self.path}: the summary does not parse: {exc}") from exc
        if not chunks:
            raise McapFormatError(f"{self.path} has no chunk index")
        self.channels = {cid: Channel(cid, topic, schemas.get(sid, ""), enc)
                         for cid, (sid, topic, enc) in channels.items()}
        self.chunks = chunks

    def messages(self, chunk: ChunkIndex) -> list[tuple[int, int, bytes]]:
        """(channel id, log time ns, raw message bytes) of every message in ``chunk``, in log
        time order (stable: file order among equal times).

        Raises:
            ChunkError: the chunk record is not where the index says, its CRC does not match,
                it does not decompress to its size, or its records do not parse.
        """
        try:
            head = self._read(chunk.chunk_start_offset, 9)
            op, n = _RECORD_HEAD.unpack(head)
            if op != OP_CHUNK or 9 + n != chunk.chunk_length:
                raise ChunkError("index", f"no chunk record at offset {chunk.chunk_start_offset} "
                                          f"(opcode {op:#x}, {n} bytes)")
            content = self._read(chunk.chunk_start_offset + 9, n)
            uncompressed_size, crc = _u64(content, 16), _u32(content, _CHUNK_CRC_AT)
            compression, q = _string(content, _CHUNK_CRC_AT + 4)
            records_len = _u64(content, q)
            if q + 8 + records_len > len(content):
                raise ChunkError("malformed", f"chunk records ({records_len} bytes) run past the record")
            records = content[q + 8:q + 8 + records_len]
        except struct.error as exc:
            raise ChunkError("malformed", f"chunk record does not parse: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ChunkError("malformed", f"chunk compression name is not UTF-8: {exc}") from exc
        try:
            raw = _decompress(records, compression, uncompressed_size)
        except ChunkError:
            raise
        except Exception as exc:  # zstd / lz4 raise their own types for corrupt input
            raise ChunkError("decompression", f"chunk does not decompress ({compression}): {exc}") from exc
        if len(raw) != uncompressed_size:
            raise ChunkError("size", f"chunk holds {len(raw)} bytes uncompressed, its header says "
                                     f"{uncompressed_size}")
        if crc and zlib.crc32(raw) != crc:
            raise ChunkError("crc", f"chunk CRC mismatch (stored {crc:#010x}, computed "
                                    f"{zlib.crc32(raw):#010x}): the chunk's bytes were altered")
        out = []
        try:
            for op, a, b in _records(raw):
                if op == OP_MESSAGE:
                    if b - a < 22:
                        raise struct.error(f"message record of {b - a} bytes")
                    cid, _seq, log_time = struct.unpack_from("<HIQ", raw, a)
                    out.append((cid, log_time, raw[a + 22:b]))
        except struct.error as exc:
            # Without a CRC (a file from another writer) a damaged chunk is found here.
            raise ChunkError("malformed", f"chunk records do not parse: {exc}") from exc
        out.sort(key=lambda m: m[1])  # list.sort is stable
        return out

    def indexed_messages(self, chunk: ChunkIndex) -> list[tuple[int, int]] | None:
        """(channel id, log time ns) of every message ``chunk`` holds, from its Message Index
        records (outside the chunk, so usable when the chunk itself is not); None when they are
        absent or unreadable too."""
        if not chunk.message_index_offsets:
            return None
        out = []
        try:
            for cid, offset in chunk.message_index_offsets.items():
                head = self._read(offset, 9)
                op, n = _RECORD_HEAD.unpack(head)
                if op != OP_MESSAGE_INDEX or n > chunk.message_index_length:
                    return None
                rec = self._read(offset + 9, n)
                if _u16(rec, 0) != cid:
                    return None
                length = _u32(rec, 2)
                if 6 + length > n or length % 16:
                    return None
                out += [(cid, t) for t, _ in struct.iter_unpack("<QQ", rec[6:6 + length])]
        except (ChunkError, struct.error):
            return None
        return sorted(out, key=lambda m: m[1])
