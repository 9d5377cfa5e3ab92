"""The per-point passes of a frame on the CPU, compiled (numba): one loop per stage instead of
one numpy pass per operation.

Every stage of the pre- and postprocess is a sweep over ~124k points or ~131k range-image cells.
In numpy each operation is its own pass through memory with its own temporaries (the range
projection alone was ~30 of them, 2.2 ms for a KITTI scan); a compiled loop does the whole stage
in one pass that the compiler vectorises (0.14 ms for the same projection, measured side by side).
The callers (``geometry``, ``models.points``) keep their signatures and their torch twins for
device tensors; this module holds only the loops.

Rules every kernel here follows:
- ``error_model="numpy"``: numba's default Python error model checks every float division for
  zero, and that branch alone stops the loops from vectorising.
- ``fastmath`` without ``nnan`` / ``ninf`` (``_FAST``): non-finite points must still be recognised
  by comparisons; kernels whose results must match numpy's float64 bit for bit (the camera
  projection) use no fastmath at all, so no FMA contraction changes a rounding.
- ``nogil``: the helper thread of ``inputs.prepare`` / ``models.points.predict_points`` runs one
  while the caller runs another.
- ``cache``: compiled once per machine (``__pycache__`` or numba's user cache), not per process.
- Transcendentals the loops need per element (atan2, exp) are polynomials written here: numba
  calls libm's scalar functions otherwise, which do not vectorise (a softmax's exps at libm
  speed took 10.6 ms against numpy's 5.9 for a KITTI range image).
"""

from __future__ import annotations

import math

import numba
import numpy as np

#: Fast-math flags without nnan / ninf (NaN and inf checks must survive).
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
_F = np.float32
_JIT = dict(error_model="numpy", nogil=True, cache=True)

# -- elementary functions, vectorisable ----------------------------------------------------------

@numba.njit(fastmath=_FAST, inline="always", **_JIT)
def _atan2f(y, x):
    """atan2(y, x) in float32, within 4 ulp of the exact value (2.4e-7 rad at most, measured;
    a range-image cell is 3e-3 rad wide): Cephes' atanf polynomial after reduction to
    |t| <= tan(pi / 8). atan2(0, 0) = 0; NaN in, NaN out."""
    ax, ay = abs(x), abs(y)
    swap = ay > ax
    mx = ay if swap else ax
    mn = ax if swap else ay
    t = mn / mx if mx > _F(0.0) else _F(0.0)
    mid = t > _F(0.41421356237309503)
    u = (t - _F(1.0)) / (t + _F(1.0)) if mid else t
    z = u * u
    a = (((_F(8.05374449538e-2) * z - _F(1.38776856032e-1)) * z + _F(1.99777106478e-1)) * z
         - _F(3.33329491539e-1)) * z * u + u
    a = a + _F(0.7853981633974483) if mid else a
    a = _F(1.5707963267948966) - a if swap else a
    a = _F(3.141592653589793) - a if x < _F(0.0) else a
    a = -a if y < _F(0.0) else a
    return a if (x == x and y == y) else x + y


@numba.njit(fastmath=_FAST, inline="always", **_JIT)
def _expf_neg(x):
    """exp(x) for x <= 0 in float32, to 2e-7 + 9e-8 |x| relative (the float32 rounding of x log2(e)):
    Cephes' exp2f polynomial of the remainder in [-0.5, 0.5] times 2**-m, m <= 63, built from
    m's bits by exact multiplications (a table lookup stops the loop from vectorising). Below
    x = -43.7 it returns exp(-43.7) ~ 1e-19, nothing next to a softmax's largest term, 1."""
    t = x * _F(1.4426950408889634)
    t = t if t > _F(-63.0) else _F(-63.0)
    n = np.floor(t + _F(0.5))
    f = t - n
    p = _F(1.535336188319500e-4)
    p = p * f + _F(1.339887440266574e-3)
    p = p * f + _F(9.618437357674640e-3)
    p = p * f + _F(5.550332471162809e-2)
    p = p * f + _F(2.402264791363012e-1)
    p = p * f + _F(6.931472028550421e-1)
    p = p * f + _F(1.0)
    m = np.int32(-n)
    p = p * (_F(0.5) if (m & 1) else _F(1.0))
    p = p * (_F(0.25) if (m & 2) else _F(1.0))
    p = p * (_F(0.0625) if (m & 4) else _F(1.0))
    p = p * (_F(0.00390625) if (m & 8) else _F(1.0))
    p = p * (_F(1.52587890625e-05) if (m & 16) else _F(1.0))
    p = p * (_F(2.3283064365386963e-10) if (m & 32) else _F(1.0))
    return p


# -- preprocess ----------------------------------------------------------------------------------


@numba.njit(fastmath=_FAST, **_JIT)
def spherical_cells(xs, ys, zs, n_rows, n_cols, fov_up, fov_down, rows, cols, rng, valid, in_fov):
    """RangeNet++'s spherical projection of points xs, ys, zs (N,) float32 (contiguous: the
    loop vectorises over consecutive points, not over the rows of an (N, 4) cloud, 10x faster),
    in float32, into the (N,)
    outputs rows, cols (int64, clipped into the image), rng (float32 m, NaN for non-finite
    points), valid (finite, range > 0) and in_fov (valid, pitch in [fov_down, fov_up] radians).
    Pitch as atan2(z, hypot(x, y)), equal to asin(z / range) and better conditioned; invalid
    points get the cell of yaw 0, pitch 0 (placeholders that keep indices in bounds)."""
    fov = _F(fov_up - fov_down)
    fd, fu = _F(fov_down), _F(fov_up)
    half_cols, inv_pi, frows = _F(0.5 * n_cols), _F(1.0 / math.pi), _F(n_rows)
    col_max, row_max = _F(n_cols - 1), _F(n_rows - 1)
    for i in range(xs.shape[0]):
        x, y, z = xs[i], ys[i], zs[i]
        h2 = x * x + y * y
        r = np.sqrt(h2 + z * z)
        ok = (r > _F(0.0)) & (r < _F(np.inf))  # False for NaN
        x = x if ok else _F(1.0)
        y = y if ok else _F(0.0)
        z = z if ok else _F(0.0)
        yaw = _atan2f(y, x)
        pitch = _atan2f(z, np.sqrt(x * x + y * y))
        c = np.floor(half_cols * (_F(1.0) - yaw * inv_pi))
        w = np.floor((_F(1.0) - (pitch - fd) / fov) * frows)
        c = c if c > _F(0.0) else _F(0.0)
        w = w if w > _F(0.0) else _F(0.0)
        cols[i] = np.int64(c if c < col_max else col_max)
        rows[i] = np.int64(w if w < row_max else row_max)
        rng[i] = r
        valid[i] = ok
        in_fov[i] = ok & (pitch >= fd) & (pitch <= fu)


@numba.njit(**_JIT)
def nearest_per_cell(rows, cols, rng, valid, n_cols, best, winner):
    """winner (cells,) int32: index of the nearest valid point per cell (row * n_cols + col),
    -1 where none; ``best`` (cells,) float32 scratch. Ties go to the lowest index (a later
    point must be strictly nearer to win)."""
    best[:] = np.inf
    winner[:] = -1
    for i in range(rows.shape[0]):
        if valid[i]:
            cell = rows[i] * n_cols + cols[i]
            if rng[i] < best[cell]:
                best[cell] = rng[i]
                winner[cell] = i


@numba.njit(**_JIT)
def cell_channels(points, rng, winner, fill, out):
    """out (5, cells) float32: range, x, y, z, intensity of each cell's winner, ``fill`` where
    winner is -1. points (N, 4) float32, rng (N,) float32."""
    for cell in range(winner.shape[0]):
        w = winner[cell]
        if w >= 0:
            out[0, cell] = rng[w]
            out[1, cell] = points[w, 0]
            out[2, cell] = points[w, 1]
            out[3, cell] = points[w, 2]
            out[4, cell] = points[w, 3]
        else:
            for k in range(5):
                out[k, cell] = fill


@numba.njit(**_JIT)
def pinhole_in_view(xyz, T, K, width, height, min_depth, uv):
    """Pinhole projection of (N, 3) float64 LiDAR points (T (4, 4) camera <- LiDAR, K (3, 3))
    with exactly ``geometry.project_points``'s float64 operations in its order (no fastmath:
    bit for bit). Writes the in-view points' pixels into uv (N, 2) from the top and returns
    (in_view (N,) bool, M), uv[:M] being theirs."""
    n = xyz.shape[0]
    in_view = np.zeros(n, np.bool_)
    m = 0
    lo_u, hi_u, lo_v, hi_v = -0.5, width - 0.5, -0.5, height - 0.5
    for i in range(n):
        x, y, z = xyz[i, 0], xyz[i, 1], xyz[i, 2]
        d = x * T[2, 0] + y * T[2, 1] + z * T[2, 2] + T[2, 3]
        if not d > min_depth:
            continue
        cx = (x * T[0, 0] + y * T[0, 1] + z * T[0, 2] + T[0, 3]) / d
        cy = (x * T[1, 0] + y * T[1, 1] + z * T[1, 2] + T[1, 3]) / d
        u = K[0, 0] * cx + K[0, 1] * cy + K[0, 2]
        v = K[1, 1] * cy + K[1, 2]
        if u >= lo_u and u < hi_u and v >= lo_v and v < hi_v:  # False for NaN
            in_view[i] = True
            uv[m, 0] = u
            uv[m, 1] = v
            m += 1
    return in_view, m


# -- postprocess ---------------------------------------------------------------------------------


@numba.njit(fastmath=_FAST, **_JIT)
def top_class(logits, arg, conf, top, total):
    """Per column of (C, K) float32 logits: arg (K,) uint8 first argmax, conf (K,) float32
    softmax maximum 1 / sum_c exp(l_c - max); top, total: (K,) float32 scratch. Class-major
    sweeps (each row contiguous) so every loop vectorises over K."""
    c, k = logits.shape
    top[:] = logits[0]
    arg[:] = 0
    for ci in range(1, c):
        row = logits[ci]
        for j in range(k):
            better = row[j] > top[j]
            top[j] = row[j] if better else top[j]
            arg[j] = ci if better else arg[j]
    total[:] = 0.0
    for ci in range(c):
        row = logits[ci]
        for j in range(k):
            total[j] += _expf_neg(row[j] - top[j])
    for j in range(k):
        conf[j] = _F(1.0) / total[j]


@numba.njit(fastmath=_FAST, **_JIT)
def fuse_in_view(image_logits, norm_x, norm_y, uv, cells, cell_logits, product, owner, w_2d, w_3d,
                 label_2d, label, conf):
    """The in-view half of the postprocess in one pass over blocks of points.

    image_logits (C, h, w) float32 sampled bilinearly (grid_sample's align_corners=False,
    border padding) at uv (M, 2) float64 pixels of the input image (W x H; norm_x, norm_y =
    2 / W, 2 / H); cell_logits (C, K) float32 read at cells (M,) int64. Per point:
    label_2d (M,) uint8 the 2D branch's first argmax; label (M,) uint8 and conf (M,) float32 the
    first argmax and maximum of the fusion (``models.points.fuse``). ``product``: the product
    rule, softmax(w_2d * log p_2d + w_3d * log p_3d) = softmax(w_2d * l_2d + w_3d * l_3d) (w: its
    exponents) over the classes whose ``owner`` (C,) uint8 is 0 (shared), the classes only one
    branch outputs (1 image, 2 range) at that branch's probability (``_product_block``); else the
    entropy-weighted rule, weights exp(-H_b + w_b) normalised (w: the branch log-weights),
    entropies from the logits, H = log S - sum p (l - max), so one log per point instead of one
    per class."""
    c, h, w = image_logits.shape
    m = uv.shape[0]
    block = 256
    l2 = np.empty((c, block), np.float32)
    l3 = np.empty((c, block), np.float32)
    # flat offsets of the four taps and of the cell, unsigned: numba checks signed indices for
    # Python's negative wrap-around on every access, which stops the gathers from vectorising
    offsets = np.empty((5, block), np.uint64)
    o00, o01, o10, o11, cell = offsets[0], offsets[1], offsets[2], offsets[3], offsets[4]
    planes = image_logits.reshape(c, h * w)
    # per point of the block: tap weights, maxima, sums, branch weights, best fused probability
    per_point = np.empty((11, block), np.float32)
    fx, fy, m2, m3, s2, s3 = per_point[0], per_point[1], per_point[2], per_point[3], per_point[4], per_point[5]
    d2, d3, a2, a3, best = per_point[6], per_point[7], per_point[8], per_point[9], per_point[10]
    arg = np.empty(block, np.uint8)
    wmax, hmax = _F(w - 1), _F(h - 1)
    fw, fh = _F(w), _F(h)
    b2, b3 = _F(w_2d), _F(w_3d)
    for start in range(0, m, block):
        b = min(block, m - start)
        for j in range(b):
            # grid_sample's arithmetic, float32 as there: u -> (u + 0.5) * 2 / W - 1 ->
            # ((g + 1) * w - 1) / 2, clamped to the border
            gx = np.float32((uv[start + j, 0] + 0.5) * norm_x - 1.0)
            gy = np.float32((uv[start + j, 1] + 0.5) * norm_y - 1.0)
            ix = min(max(((gx + _F(1.0)) * fw - _F(1.0)) * _F(0.5), _F(0.0)), wmax)
            iy = min(max(((gy + _F(1.0)) * fh - _F(1.0)) * _F(0.5), _F(0.0)), hmax)
            fx0, fy0 = math.floor(ix), math.floor(iy)
            x0, y0 = np.int64(fx0), np.int64(fy0)
            x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
            fx[j], fy[j] = np.float32(ix - fx0), np.float32(iy - fy0)
            o00[j], o01[j] = np.uint64(y0 * w + x0), np.uint64(y0 * w + x1)
            o10[j], o11[j] = np.uint64(y1 * w + x0), np.uint64(y1 * w + x1)
            cell[j] = np.uint64(cells[start + j])
        for ci in range(c):
            img, grid, r2, r3 = planes[ci], cell_logits[ci], l2[ci], l3[ci]  # rows: 1-D loops vectorise
            for j in range(b):
                gx, gy = fx[j], fy[j]  # grid_sample's four weights, summed in its order
                r2[j] = (img[o00[j]] * ((_F(1.0) - gx) * (_F(1.0) - gy))
                         + img[o01[j]] * (gx * (_F(1.0) - gy))
                         + img[o10[j]] * ((_F(1.0) - gx) * gy)
                         + img[o11[j]] * (gx * gy))
                r3[j] = grid[cell[j]]
        # maxima (the 2D branch's argmax on the way)
        for j in range(b):
            m2[j], m3[j], arg[j] = l2[0, j], l3[0, j], 0
        for ci in range(1, c):
            r2, r3 = l2[ci], l3[ci]
            for j in range(b):
                better = r2[j] > m2[j]
                m2[j] = r2[j] if better else m2[j]
                arg[j] = ci if better else arg[j]
                m3[j] = r3[j] if r3[j] > m3[j] else m3[j]
        for j in range(b):
            label_2d[start + j] = arg[j]
            s2[j], s3[j], d2[j], d3[j] = 0.0, 0.0, 0.0, 0.0
        if product:
            _product_block(l2, l3, m2, m3, s2, s3, d2, best, arg, owner, b2, b3, b)
            for j in range(b):
                label[start + j] = arg[j]
                conf[start + j] = best[j]
            continue
        # exponentials in place: l <- exp(l - max); S and sum exp(l - max) (l - max)
        for ci in range(c):
            r2, r3 = l2[ci], l3[ci]
            for j in range(b):
                t2, t3 = r2[j] - m2[j], r3[j] - m3[j]
                e2, e3 = _expf_neg(t2), _expf_neg(t3)
                s2[j] += e2
                s3[j] += e3
                d2[j] += e2 * t2
                d3[j] += e3 * t3
                r2[j] = e2
                r3[j] = e3
        for j in range(b):
            # -H = sum p (l - max) - log S; weights normalised through their log-ratio
            neg_h2 = d2[j] / s2[j] - np.log(s2[j]) + b2
            neg_h3 = d3[j] / s3[j] - np.log(s3[j]) + b3
            r = _expf_neg(-abs(neg_h2 - neg_h3))  # weight of the less certain branch, relative
            w_hi = _F(1.0) / (_F(1.0) + r)
            w_lo = r * w_hi
            a2[j] = (w_hi if neg_h2 >= neg_h3 else w_lo) / s2[j]
            a3[j] = (w_lo if neg_h2 >= neg_h3 else w_hi) / s3[j]
            best[j], arg[j] = -1.0, 0
        for ci in range(c):
            r2, r3 = l2[ci], l3[ci]
            for j in range(b):
                p = a2[j] * r2[j] + a3[j] * r3[j]
                better = p > best[j]
                best[j] = p if better else best[j]
                arg[j] = ci if better else arg[j]
        for j in range(b):
            label[start + j] = arg[j]
            conf[start + j] = best[j]


@numba.njit(fastmath=_FAST, **_JIT)
def _product_block(l2, l3, m2, m3, s2, s3, scale, best, arg, owner, w2, w3, b):
    """The product rule of ``fuse_in_view`` on one block of b points: l2 / l3 (C, block) the
    branches' logits (l2's shared rows are overwritten), m2 / m3 their per-point maxima; s2, s3,
    scale: scratch. Out: arg (the first argmax) and best (its fused probability)."""
    c = l2.shape[0]
    solo = False
    for ci in range(c):
        solo = solo or owner[ci] != 0
    rest = np.ones(b, np.float32)  # the mass the one-branch classes leave to the shared ones
    for j in range(b):
        s2[j], s3[j], scale[j] = 1.0, 1.0, 0.0
        best[j] = _F(-3.0e38)
    if solo:  # a one-branch class takes its branch's softmax probability: sums of exponentials
        u2, u3 = np.zeros(b, np.float32), np.zeros(b, np.float32)
        for j in range(b):
            s2[j], s3[j] = 0.0, 0.0
        for ci in range(c):
            r2, r3 = l2[ci], l3[ci]
            for j in range(b):
                e2, e3 = _expf_neg(r2[j] - m2[j]), _expf_neg(r3[j] - m3[j])
                s2[j] += e2
                s3[j] += e3
                u2[j] += e2 if owner[ci] == 1 else _F(0.0)
                u3[j] += e3 if owner[ci] == 2 else _F(0.0)
        for j in range(b):
            rest[j] = (_F(1.0) - u2[j] / s2[j]) * (_F(1.0) - u3[j] / s3[j])
    # z = w2 (l2 - max2) + w3 (l3 - max3): the log of the product up to a per-point constant,
    # kept in l2's rows of the shared classes; its maximum and sum of exponentials over them
    for ci in range(c):
        if owner[ci] == 0:
            r2, r3 = l2[ci], l3[ci]
            for j in range(b):
                z = w2 * (r2[j] - m2[j]) + w3 * (r3[j] - m3[j])
                r2[j] = z
                best[j] = z if z > best[j] else best[j]
    for ci in range(c):
        if owner[ci] == 0:
            r2 = l2[ci]
            for j in range(b):
                scale[j] += _expf_neg(r2[j] - best[j])
    # each class's weight: shared exp(z - max z) / sum x rest, one-branch its branch's
    # probability; they sum to 1 unless both branches have classes of their own (normalised)
    top = np.full(b, _F(-1.0), np.float32)
    norm = np.zeros(b, np.float32)
    for j in range(b):
        arg[j] = 0
        scale[j] = rest[j] / scale[j]
    for ci in range(c):
        r2, r3 = l2[ci], l3[ci]
        for j in range(b):
            if owner[ci] == 0:
                w = _expf_neg(r2[j] - best[j]) * scale[j]
            elif owner[ci] == 1:
                w = _expf_neg(r2[j] - m2[j]) / s2[j]
            else:
                w = _expf_neg(r3[j] - m3[j]) / s3[j]
            norm[j] += w
            better = w > top[j]
            top[j] = w if better else top[j]
            arg[j] = ci if better else arg[j]
    for j in range(b):
        best[j] = top[j] / norm[j]


@numba.njit(**_JIT)
def spread_cells(cell_label, cell_conf, cells, view, view_label, view_conf, labels_3d, labels, conf):
    """Per point: labels_3d, labels (N,) uint8 and conf (N,) float32 read at each point's cell
    (cells (N,) int64), then the in-view points' (view (M,) int64) fused labels and confidence
    written over them."""
    for i in range(cells.shape[0]):
        k = cells[i]
        labels_3d[i] = cell_label[k]
        labels[i] = cell_label[k]
        conf[i] = cell_conf[k]
    for j in range(view.shape[0]):
        labels[view[j]] = view_label[j]
        conf[view[j]] = view_conf[j]
