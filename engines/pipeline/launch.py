"""What one launch of the GPU pipeline is made of, without torch: its rows, and the phases of
the host time a launch spends (what the scheduler's metrics and the bench read).

`engines.pipeline.gpu.GpuPipeline.launch` takes `Row`s and adds each phase's host seconds to
its `launch_s`; `engines.pipeline.scheduler.GpuScheduler` makes the rows of a batch and puts
the phases into the server's metrics. Readers of the metrics (`bench.soak`) need no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# Host time inside `GpuPipeline.launch`, by phase (what the scheduler thread spends per step):
# waiting for a free pinned-buffer slot, the featurizer (stream A), UNet+VAE (B), paste-back and
# the copy to the host (C). Enqueueing only: the GPU's own time is not in these.
LAUNCH_PHASES = ("slot_wait", "features", "unet_vae", "paste")


@dataclass
class Row:
    """One frame of a batch: which avatar, which loop position."""

    avatar_id: str
    loop_position: int
