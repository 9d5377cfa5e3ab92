"""Building the pipeline: the one place that makes a segmenter (checkpoint + backend), decides
whether there is adaptation, and makes the adapter and the weight deployer between them.

    app = build(cfg)                      # node, replay (both modes), eval, demo, benches
    pred = app.segmenter.infer(frame)     # lockstep: then app.adapter.step(frame, pred.inputs)
    runner = Runner(app.segmenter, output, app.adapter, deployer=app.deployer, ...)  # realtime
    app.close()

The adapter's weights reach the backend only through ``app.deployer`` (cpu_budget.WeightDeployer),
whose thread is started here, on the caller's (normal-priority) thread, in every mode.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pl3d_ros import registry
from pl3d_ros.config import Config, ConfigError
from pl3d_ros.cpu_budget import ThreadBudget, WeightDeployer
from pl3d_ros.models.checkpoint import CheckpointHeader, load_checkpoint
from pl3d_ros.pipeline import Segmenter

log = logging.getLogger(__name__)


def adapts(cfg: Config) -> bool:
    """Whether ``adapt.method`` changes any weight (False for ``source``): the one place that
    decides "no adaptation"."""
    return bool(registry.METHODS.get(cfg.adapt.method).adapts)


def resolve_model(path: str | Path) -> Path:
    """``runtime.model`` -> the checkpoint file; "" = the bundled default model
    (``pl3d_ros.weights``). A relative path is taken from the working directory."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"runtime.model {p} does not exist")
        return p
    from pl3d_ros.models.checkpoint import CheckpointError
    from pl3d_ros.weights import default_model_path

    try:
        return default_model_path()
    except CheckpointError as exc:
        raise ConfigError(f"runtime.model is empty and {exc}") from exc


def build_segmenter(cfg: Config, model: torch.nn.Module, header: CheckpointHeader, *,
                    threads: int | None = None) -> Segmenter:
    """A Segmenter running ``model`` on the backend ``runtime.*`` names (precision, device,
    engine cache). threads: CPU threads of the backend (None: ``runtime.threads``)."""
    from pl3d_ros.runtime.factory import create_backend, default_calibration

    rt = cfg.runtime
    backend = create_backend(rt.backend, model, header, threads=rt.threads if threads is None else threads,
                             precision=rt.precision, cache_dir=rt.engine_cache_dir or None,
                             device=rt.device or None, force_rebuild=rt.force_rebuild,
                             calibration=default_calibration(header, rt.int8_calibration, rt.int8_calibration_frames))
    return Segmenter(backend, header, rt.fusion)


def adaptation_device() -> torch.device:
    """Adaptation runs on the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class App:
    """The built pipeline. ``adapter`` and ``deployer`` are None without adaptation; ``model`` is
    the source network (CPU), ``budget`` the CPU split the runner applies."""

    cfg: Config
    header: CheckpointHeader
    model: torch.nn.Module
    segmenter: Segmenter
    adapter: Any
    deployer: WeightDeployer | None
    budget: ThreadBudget
    checkpoint: Path | None = None

    def close(self, timeout_s: float = 5.0) -> None:
        """End the deployer's thread (the runner does this itself in realtime)."""
        if self.deployer is not None:
            self.deployer.close(timeout_s)


def build(cfg: Config, *, checkpoint: str | Path | None = None,
          model: tuple[torch.nn.Module, CheckpointHeader] | None = None, threads: int | None = None,
          seed: int = 0, mask_provider: Any = None, adapt: bool = True) -> App:
    """Segmenter, adapter (or none) and deployer for ``cfg``.

    checkpoint: the model file (default: ``runtime.model``, "" = the bundled model); or ``model``:
    an already loaded (network, header). The checkpoint must have ``class_set`` when that is
    set. threads: backend CPU threads (None: from the thread budget). seed: the adapter's private
    generator. mask_provider: a refine mask provider instead of the one cfg.refine names (tests).
    adapt: False builds inference only whatever ``adapt.method`` says (``pl3d eval``).
    A failure to build the adapter raises: callers that must label anyway (the node) catch it
    and call again with adapt=False.
    """
    cfg.validate()
    if model is None:
        path = resolve_model(checkpoint if checkpoint is not None else cfg.runtime.model)
        net, header = load_checkpoint(path, class_set=cfg.class_set or None)
    else:
        path = Path(checkpoint) if checkpoint else None
        net, header = model
    adapting = adapt and adapts(cfg)
    budget = ThreadBudget.from_config(cfg, adapting)
    segmenter = build_segmenter(cfg, net, header, threads=budget.inference_threads if threads is None else threads)
    adapter = deployer = None
    if adapting:
        from pl3d_ros.adapt.adapter import Adapter

        deployer = WeightDeployer(segmenter.deploy)
        dev = adaptation_device()
        # The adapter copies the source; on a GPU a copy moves there, the backend's model stays.
        source = net if dev.type == "cpu" else copy.deepcopy(net).to(dev)
        try:
            adapter = Adapter(source, header, cfg, on_weights=deployer, seed=seed, mask_provider=mask_provider)
        except BaseException:
            deployer.close()
            raise
    return App(cfg, header, net, segmenter, adapter, deployer, budget, path)
