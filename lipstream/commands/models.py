"""`lipstream models`: fetch MuseTalk v1.5's weights, or write random ones of the same layout."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from engines.base import EngineError
from lipstream.paths import models_dir as default_models_dir

logger = logging.getLogger(__name__)

models_app = typer.Typer(no_args_is_help=True, help="Download or make MuseTalk weights.")

DIR_HELP = "Models folder (default: $LIPSTREAM_MODELS_DIR or the user data dir)."


@models_app.command("download")
def download_cmd(
    dir: Path | None = typer.Option(None, "--dir", "--models-dir", help=DIR_HELP),
) -> None:
    """Fetch MuseTalk v1.5, sd-vae-ft-mse and whisper-tiny from the Hugging Face hub
    (as MuseTalk's download_weights.sh), then the face models (S3FD, DWPose, BiSeNet and its
    ResNet-18) from hub copies checked by size and SHA-256; resumable, with progress bars."""
    from avatars.musetalk_faces.weights import FaceWeightsError
    from avatars.musetalk_faces.weights import download as download_faces
    from engines.musetalk.weights import download

    root = default_models_dir(dir)
    typer.echo(f"downloading MuseTalk v1.5 weights into {root}")
    try:
        files = download(root)
        typer.echo("downloading the face models (detection, landmarks, parsing)")
        download_faces(root)
    except (EngineError, FaceWeightsError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    typer.echo(f"ready: {files.root}")


@models_app.command("make-random")
def make_random_cmd(
    size: str = typer.Option("tiny", "--size", help="tiny (CPU tests) or full (real shapes)."),
    dir: Path | None = typer.Option(None, "--dir", "--models-dir", help=DIR_HELP),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
) -> None:
    """Write random weights in MuseTalk's layout, face models included (for tests and
    benchmarks, not lip sync)."""
    from avatars.musetalk_faces.weights import make_random as make_random_faces
    from engines.musetalk.weights import make_random

    if size not in ("tiny", "full"):
        typer.secho("error: --size must be tiny or full", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    root = default_models_dir(dir)
    typer.echo(f"writing random {size} weights (seed {seed}) into {root}")
    written = make_random(root, size="full" if size == "full" else "tiny", seed=seed)
    written += make_random_faces(root, size=size, seed=seed)
    for path in written:
        typer.echo(f"  {path.relative_to(root)}  {path.stat().st_size / 1e6:.1f} MB")
