"""Online source-free adaptation (METHODS.md sections 0-6).

state.py          FrameState (what a method keeps about a frame), StepResult (what a step did)
losses.py         CE, negative learning, ERDA, cross-modal KL, entropy (pure functions)
terms.py          the loss terms of the methods as small objects (an ablation drops one)
pseudo_labels.py  section 0: fused argmax + class-wise running-median thresholds
refinement.py     sections 1-2 glue: masks on the original image, MLA/GAPP, connectivity filter
reliability.py    section 4.1: reliable / unreliable split
prototypes.py     section 3: ERDA class prototypes (one bank per branch)
teacher.py        section 5: mean teacher, trainable selection, stochastic restore, collapse guard
quality.py        pseudo-label density / precision bookkeeping (ground truth for reporting only)
methods.py        source, tent, pl, full: one class each, ``prepare(state)`` + ``step(state)``
adapter.py        Adapter: lockstep ``step(frame, inputs)`` and the background thread
"""

from pl3d_ros.adapt.adapter import Adapter
from pl3d_ros.adapt.methods import Full, Method, PseudoLabel, Source, Tent, build_method

__all__ = ["Adapter", "Full", "Method", "PseudoLabel", "Source", "Tent", "build_method"]
