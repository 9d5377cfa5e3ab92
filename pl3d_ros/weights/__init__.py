"""The bundled default model: a small source model trained on the simulator's ``source`` preset.

It is what ``pl3d demo`` and ``pl3d replay`` use when no ``--model`` is given, so a fresh machine
with no dataset runs the whole pipeline. How the file is made: weights/README.md (and
``bench/make_default_weights.sh``).
"""

from __future__ import annotations

from pathlib import Path

from pl3d_ros.models.checkpoint import CheckpointError

DEFAULT_MODEL = Path(__file__).with_name("sim_source_cpu.safetensors")


def default_model_path() -> Path:
    """Path of the bundled checkpoint; a clear error when the package was installed without it."""
    if not DEFAULT_MODEL.is_file():
        raise CheckpointError(f"the bundled model {DEFAULT_MODEL} is missing (a source checkout without "
                              "the weights file?); pass --model CKPT or rebuild it with "
                              "bench/make_default_weights.sh")
    return DEFAULT_MODEL
