"""What every section of `lipstream bench` works on: the engine (random full-size weights
unless a models folder is given), a synthetic avatar resident on the GPU, a speech clip, the
pipelines built so far by variant name, and the results, saved as JSON after each step.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.options import BenchOptions, variant_options
from bench.simulation import speech


class BenchContext:
    """See the module docstring. `setup` loads the engine and the avatar (on the GPU)."""

    def __init__(self, options: BenchOptions, out_path: Path) -> None:
        import torch

        self.torch = torch
        self.o = options
        self.out_path = out_path
        self.res: dict[str, Any] = {
            "options": options.__dict__,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.dev = torch.device("cuda")
        self.tmp = tempfile.TemporaryDirectory(prefix="lipstream-bench-")
        self.pipelines: dict[str, Any] = {}
        self.engine: Any = None
        self.avatar: Any = None
        self.clip: Any = None

    def save(self) -> None:
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.out_path.write_text(json.dumps(self.res, indent=1, default=str))

    def setup(self) -> None:
        """The engine (fp16, batch 20), the avatar resident as the server keeps it, and the
        clip; GPU memory of each in `res["setup"]`."""
        from bench.gpu import measure
        from engines.musetalk.engine import MuseTalkEngine
        from engines.pipeline import paste

        torch = self.torch
        info: dict[str, Any] = {
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
        }
        root = self.o.models_dir or self._random_weights(info)
        t0 = time.perf_counter()
        mem0 = torch.cuda.memory_allocated()
        self.engine = MuseTalkEngine(root, device="cuda", batch_size=20)
        info["engine_load_s"] = time.perf_counter() - t0
        info["gpu_mem_models_GiB"] = (torch.cuda.memory_allocated() - mem0) / 2**30
        self.avatar = measure.synthetic_avatar(self.o.avatar_frames, self.o.height, self.o.width)
        self.avatar.latents = None  # let the engine encode them with its VAE
        mem1 = torch.cuda.memory_allocated()
        self.engine.load_avatar(self.avatar)
        # as the server's pipeline keeps it (I420 output: no RGB frames)
        gav = paste.upload_avatar(self.avatar, self.dev, keep_frames=False)
        info["gpu_mem_per_avatar_MiB"] = (torch.cuda.memory_allocated() - mem1) / 2**20
        info["gpu_mem_per_avatar_frame_MiB"] = info["gpu_mem_per_avatar_MiB"] / self.avatar.n_frames
        info["avatar"] = {
            "frames": self.avatar.n_frames,
            "size": self.avatar.size,
            "paste_region": gav.region,
        }
        del gav
        self.clip = speech(self.o.clip_s)
        self.res["setup"] = info
        self.save()

    def _random_weights(self, info: dict[str, Any]) -> str:
        from engines.musetalk.weights import make_random

        root = str(Path(self.tmp.name) / "models")
        t0 = time.perf_counter()
        make_random(root, size="full", seed=0)
        info["make_random_s"] = time.perf_counter() - t0
        info["weights"] = "random, full size"
        return root

    def pipeline(self, name: str) -> Any:
        """The pipeline for a variant name (`bench.options.variant_fields`): `torch`,
        `compiled`, `compiled-nofold` (plain VAE upsampling), `compiled-eagerenc` (eager
        whisper), `compiled-stocknorm` (torch's own GroupNorm), ...; built and warmed up on
        first use (its warm-up time in `res["warmup"]`)."""
        from engines.backends import build_pipeline

        if name not in self.pipelines:
            # dynamo keys its compiled code by the forward's code object and guards on the
            # module's structure, not its identity: without a reset a second variant of the
            # same code (e.g. `compiled-stocknorm` after `compiled`) silently reuses the first's
            # kernels. Built pipelines replay their own CUDA graphs and are unaffected.
            self.torch._dynamo.reset()
            p = build_pipeline(self.engine, variant_options(name, self.o.buckets), warm_up=False)
            t0 = time.perf_counter()
            warm = p.warm_up()
            self.res.setdefault("warmup", {})[name] = {
                "total_s": time.perf_counter() - t0,
                "per_bucket_s": warm,
            }
            self.pipelines[name] = p
        return self.pipelines[name]
