"""MCAP CRCs on the bags kitti2bag / sim write, and the reader skipping a corrupt chunk (counted,
with the reason) and going on with the next one."""

from __future__ import annotations

import io
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from pl3d_ros.io.bag import BagError, BagReader
from pl3d_ros.io.mcap_chunks import McapChunkReader, add_crcs

SEC = 1_000_000_000


def copy_bag(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return next(dst.glob("*.mcap"))


def chunk_topics(mcap: Path) -> list[set[str]]:
    with McapChunkReader(mcap) as r:
        return [{r.channels[c].topic for c, _ in r.indexed_messages(ck)} for ck in r.chunks]


def flip(mcap: Path, ordinal: int, n: int = 200, at: int = 1000) -> None:
    """Invert ``n`` bytes inside the records of chunk ``ordinal`` (not its header)."""
    with McapChunkReader(mcap) as r:
        start = r.chunks[ordinal].chunk_start_offset
    data = bytearray(mcap.read_bytes())
    for i in range(start + at, start + at + n):
        data[i] ^= 0xFF
    mcap.write_bytes(bytes(data))


def test_written_bags_carry_crcs_the_reference_reader_checks(kitti_bag00, tmp_path):
    """The official MCAP library (foxglove/mcap) validates chunk and data-section CRCs."""
    from mcap.stream_reader import CRCValidationError, StreamReader

    (mcap,) = kitti_bag00.glob("*.mcap")
    data = mcap.read_bytes()
    footer_at = len(data) - 8 - 29
    assert struct.unpack_from("<I", data, footer_at + 25)[0] != 0  # summary CRC
    with McapChunkReader(mcap) as r:
        assert r.summary_error is None
        assert all(struct.unpack_from("<I", data, ck.chunk_start_offset + 9 + 24)[0] != 0
                   for ck in r.chunks)
    assert sum(1 for _ in StreamReader(io.BytesIO(data), validate_crcs=True).records) > 0
    bad = copy_bag(kitti_bag00, tmp_path / "bad")
    flip(bad, 3, n=1)
    with pytest.raises(CRCValidationError, match="Chunk"):
        for _ in StreamReader(io.BytesIO(bad.read_bytes()), validate_crcs=True).records:
            pass
    assert add_crcs(mcap) == {"chunks": 0, "data_section": 0, "summary": 0}  # all set already


def test_flipped_bytes_skip_their_chunk_and_reading_goes_on(kitti_bag00, tmp_path):
    bag = tmp_path / "flipped"
    mcap = copy_bag(kitti_bag00, bag)
    topics = chunk_topics(mcap)
    cloud_chunks = [i for i, t in enumerate(topics) if "/lidar/points" in t]
    image_chunks = [i for i, t in enumerate(topics) if "/camera/image_raw" in t]
    assert len(cloud_chunks) == 10
    lost_cloud = cloud_chunks[4]  # frame 4's cloud (and whatever shares its chunk)
    lost_image = next(i for i in image_chunks if i > lost_cloud + 1 and
                      "/lidar/points" not in topics[i])  # a later frame's image alone
    flip(mcap, lost_cloud)
    flip(mcap, lost_image)
    intact = {f.stamp_ns: f for f in BagReader(kitti_bag00).frames()}

    reader = BagReader(bag)
    frames = list(reader.frames())
    s = reader.stats
    # the chunk with frame 4's cloud and the chunk with a later frame's image are unusable:
    assert s.corrupt_chunks == 2 and s.lost_unknown_chunks == 0
    assert {e["reason"] for e in s.chunk_errors} == {"crc"}
    assert s.skipped_frames["corrupt_chunk"] == 1 and s.skipped_frames["no_image"] == 1
    assert s.frames_skipped == 2 and len(frames) == 8
    assert s.lost_messages["/lidar/points"] == 1 and s.lost_messages["/camera/image_raw"] >= 1
    by_reason = {r["reason"]: r for r in s.skip_log}
    stamps = sorted(intact)
    assert by_reason["corrupt_chunk"]["log_time_ns"] == stamps[4]
    assert by_reason["corrupt_chunk"]["stamp_ns"] is None and "crc" in by_reason["corrupt_chunk"]["detail"]
    # every frame that was read is the intact one, bit for bit (nothing altered slipped through)
    for f in frames:
        ref = intact[f.stamp_ns]
        assert np.array_equal(f.points, ref.points) and np.array_equal(f.image, ref.image)
        assert np.array_equal(f.labels, ref.labels)
    assert stamps[4] not in {f.stamp_ns for f in frames}
    # bag-info reports the same
    info = BagReader(bag).info()
    assert info["stats"]["corrupt_chunks"] == 2 and info["stats"]["frames_skipped"] == 2
    assert info["synced_frames"] == 8
    with pytest.raises(BagError, match="chunk .* is unusable.*CRC mismatch"):
        list(BagReader(bag, strict=True).frames())


def test_corrupt_record_in_a_bag_without_crcs_is_found_by_parsing(kitti_bag00, tmp_path):
    """Bags of other writers may have no CRCs: a damaged record length still skips only its
    chunk (the issue's 'one corrupt record in chunk 10 of 20 ends the replay at 5 of 10')."""
    bag = tmp_path / "nocrc"
    mcap = copy_bag(kitti_bag00, bag)
    with McapChunkReader(mcap) as r:
        ck = r.chunks[9]
        topics = {r.channels[c].topic for c, _ in r.indexed_messages(ck)}
    data = bytearray(mcap.read_bytes())
    content = ck.chunk_start_offset + 9
    struct.pack_into("<I", data, content + 24, 0)  # no CRC
    (name_len,) = struct.unpack_from("<I", data, content + 28)
    first_record = content + 32 + name_len + 8
    struct.pack_into("<Q", data, first_record + 1, 2**40)  # first record's length: absurd
    mcap.write_bytes(bytes(data))
    reader = BagReader(bag)
    frames = list(reader.frames())
    assert reader.stats.corrupt_chunks == 1 and reader.stats.chunk_errors[0]["reason"] == "malformed"
    expected_lost = 1 if "/lidar/points" in topics else 0
    assert reader.stats.skipped_frames["corrupt_chunk"] == expected_lost
    assert len(frames) + reader.stats.frames_skipped == 10 and len(frames) >= 8


def test_sim_bags_carry_crcs(tmp_path):
    from mcap.stream_reader import StreamReader

    from pl3d_ros.sim import write_bag
    from test_sim import small

    out = tmp_path / "sim"
    assert write_bag(small("night"), 2, out, seed=2) == 2
    (mcap,) = out.glob("*.mcap")
    data = mcap.read_bytes()
    with McapChunkReader(mcap) as r:
        assert r.summary_error is None
        assert all(struct.unpack_from("<I", data, ck.chunk_start_offset + 9 + 24)[0] for ck in r.chunks)
    assert sum(1 for _ in StreamReader(io.BytesIO(data), validate_crcs=True).records) > 0
