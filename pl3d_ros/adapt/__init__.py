"""Online source-free adaptation (METHODS.md sections 0-6).

batch.py          Frame -> device tensors; per-point network outputs
losses.py         CE, negative learning, ERDA, cross-modal KL, entropy (pure functions)
pseudo_labels.py  section 0: fused argmax + class-wise running-median thresholds
refinement.py     sections 1-2 glue: masks on the original image, MLA/GAPP, connectivity filter
reliability.py    section 4.1: reliable / unreliable split
prototypes.py     section 3: ERDA class prototypes (one bank per branch)
teacher.py        section 5: mean teacher, trainable selection, stochastic restore, collapse guard
quality.py        pseudo-label density / precision bookkeeping (ground truth for reporting only)
methods.py        source, tent, pl, full: one class each, ``step(batch) -> stats``
adapter.py        Adapter: lockstep ``step(frame)`` and the background thread
"""

from pl3d_ros.adapt.adapter import Adapter
from pl3d_ros.adapt.methods import METHODS, Full, Method, PseudoLabel, Source, Tent, build_method

__all__ = ["Adapter", "METHODS", "Full", "Method", "PseudoLabel", "Source", "Tent", "build_method"]
