"""I/O benchmark: KITTI -> bag conversion, reading + syncing a bag, and PointCloud2 <-> numpy.

    v/bin/python bench/io_bench.py [--seq ../shared/data/semantickitti-mini/sequences/00] [--repeat 5]

Prints median and p90 wall times (ms). The per-point Python loop (struct.iter_unpack, what
sensor_msgs_py's read_points_list does per point) runs in the same process as a reference, so the
ratio is meaningful on a noisy machine.
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from pl3d_ros.io import point_cloud2, ros_msgs
from pl3d_ros.io.bag import BagReader, typestore
from pl3d_ros.io.kitti import KittiSequence, sequence_to_bag

REPO = Path(__file__).resolve().parents[1]


def timeit(fn, repeat: int) -> tuple[float, float]:
    """(median, p90) of ``repeat`` calls in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 90))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default=str(REPO.parent / "shared/data/semantickitti-mini/sequences/00"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rows = []
    seq = KittiSequence(args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**6))

        def convert() -> None:
            sequence_to_bag(args.seq, Path(tmp) / f"b{next(counter)}")

        rows.append((f"kitti2bag, {len(seq)} frames (mcap)", *timeit(convert, args.repeat)))
        bag = Path(tmp) / "b0"
        rows.append((f"read + sync {len(seq)} frames -> Frames",
                     *timeit(lambda: sum(1 for _ in BagReader(bag).frames()), args.repeat)))
        rows.append(("bag-info (index + sync, no Frames)", *timeit(lambda: BagReader(bag).info(), args.repeat)))

    points = seq.read_points(0)
    labels = seq.read_labels(0)
    n = len(points)
    ts = typestore("humble")
    factory = ros_msgs.rosbags_factory(ts)
    header = ros_msgs.make_header(factory, 1, "velodyne")

    def to_msg():
        return ros_msgs.make_cloud(factory, header, point_cloud2.points_cloud_array(points, {"label": labels}))

    msg = to_msg()
    raw = ts.serialize_cdr(msg, msg.__msgtype__)
    rows.append((f"numpy -> PointCloud2 ({n} pts)", *timeit(to_msg, 20 * args.repeat)))
    rows.append((f"PointCloud2 -> numpy ({n} pts)",
                 *timeit(lambda: point_cloud2.cloud_to_points(msg), 20 * args.repeat)))
    rows.append(("CDR serialise PointCloud2", *timeit(lambda: ts.serialize_cdr(msg, msg.__msgtype__), 20 * args.repeat)))
    rows.append(("CDR deserialise PointCloud2", *timeit(lambda: ts.deserialize_cdr(raw, msg.__msgtype__), 20 * args.repeat)))
    data = bytes(msg.data)
    fmt = struct.Struct("<ffffI")
    loop_ms = timeit(lambda: [p for p in fmt.iter_unpack(data)], max(2, args.repeat // 2))
    rows.append((f"reference: per-point Python loop ({n} pts)", *loop_ms))

    width = max(len(r[0]) for r in rows)
    print(f"{'stage':<{width}}  {'p50 ms':>9}  {'p90 ms':>9}")
    for name, p50, p90 in rows:
        print(f"{name:<{width}}  {p50:9.2f}  {p90:9.2f}")
    vec = dict((r[0], r[1]) for r in rows)[f"PointCloud2 -> numpy ({n} pts)"]
    print(f"vectorised read is {loop_ms[0] / vec:.0f}x faster than the per-point loop")


if __name__ == "__main__":
    main()
