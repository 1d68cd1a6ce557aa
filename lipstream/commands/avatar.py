"""`lipstream avatar add|list|rm`: register, list and remove prepared avatars."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import typer

from lipstream import logs

log = logging.getLogger(__name__)

FALLBACK_HINT = (
    'faces "fallback": Haar box and geometric mask, less accurate lips '
    "(`lipstream models download`, then add the avatar again)"
)
avatar_app = typer.Typer(help="Register, list, show and remove avatars.", no_args_is_help=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _latent_encoder(
    models_dir: Path, device: str
) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str | None, str]:
    """(encode_latents, latents_key, note): the MuseTalk VAE encoder where the weights exist;
    (None, None, why) where they do not (the engine then computes latents when it loads)."""
    try:
        import torch

        from engines.base import EngineError
        from engines.musetalk.vae import encode_crops
        from engines.musetalk.weights import check_layout, load_vae, weights_key
    except ImportError as exc:
        return None, None, f"the MuseTalk engine cannot be imported ({exc})"
    try:
        files = check_layout(models_dir)
    except EngineError as exc:
        return None, None, str(exc)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    vae = load_vae(models_dir, device, dtype)

    def encode(crops: np.ndarray) -> np.ndarray:
        return np.asarray(encode_crops(vae, crops).float().cpu().numpy())

    return encode, weights_key(files.vae_weights), f"latents from the VAE in {files.vae_dir}"


def _face_pipeline(models_dir: Path, device: str) -> tuple[Any, str]:
    """(MuseTalk's face pipeline, "") where its weights are there, else (None, why); the
    fallback's warning is printed here, before preparing."""
    from avatars.avatar import FALLBACK_WARNING
    from avatars.musetalk_faces.pipeline import FacePipeline

    pipeline, reason = FacePipeline.load(models_dir, None if device == "auto" else device)
    if pipeline is None:
        typer.secho(f"warning: {FALLBACK_WARNING}.", err=True, fg=typer.colors.YELLOW)
        typer.secho(f"  why: {reason}", err=True, fg=typer.colors.YELLOW)
    return pipeline, reason


def _say_face_pipeline(meta: dict[str, Any]) -> None:
    """Which face pipeline prepared the avatar, its bbox_shift range, per-stage seconds."""
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in meta.get("stage_seconds", {}).items())
    shift = meta.get("bbox_shift_range")
    line = f"faces: {meta.get('face_pipeline')} ({stages})"
    if shift:
        line += f"; bbox_shift adjust range [{shift[0]} ~ {shift[1]}]"
    typer.echo(line)
    if meta.get("face_pipeline") == "fallback":
        typer.secho(
            "warning: prepared with the fallback face pipeline (less accurate lips); "
            "run `lipstream models download`, then add the avatar again",
            err=True,
            fg=typer.colors.YELLOW,
        )


@avatar_app.command("add")
def add_cmd(
    name: str = typer.Argument(..., help="A display name for the avatar."),
    file: Path = typer.Argument(..., help="A video (mp4/mov/webm/mkv) or photo (png/jpg)."),
    bbox_shift: int = typer.Option(
        0,
        "--bbox-shift",
        help=(
            "MuseTalk's bbox_shift: move the nose point the face box is built from down by "
            "this many px (the top edge by twice that; up if < 0). The fallback moves the "
            "top edge by this many px."
        ),
    ),
    smooth: int = typer.Option(
        0, "--smooth", min=0, help="Smooth face boxes over this many frames (0: off)."
    ),
    avatars_dir: Path | None = typer.Option(None, "--avatars-dir", help="Prepared avatars folder."),
    models_dir: Path | None = typer.Option(None, "--models-dir", help="MuseTalk weights folder."),
    device: str = typer.Option(
        "auto", "--device", help="auto, cpu or cuda (the VAE and face models)."
    ),
) -> None:
    """Prepare NAME from FILE: detect the face, crop, make masks and latents, store it."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    from avatars.decode import AvatarInputError
    from avatars.prepare import PrepareOptions, prepare_avatar_file
    from avatars.store import AvatarStore, validate_name
    from lipstream.paths import avatars_dir as resolve_avatars_dir
    from lipstream.paths import models_dir as resolve_models_dir

    try:
        name = validate_name(name)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if not file.is_file():
        raise _fail(f"no such file: {file}")
    store = AvatarStore(resolve_avatars_dir(avatars_dir))
    encode, key, note = _latent_encoder(resolve_models_dir(models_dir), device)
    faces, faces_reason = _face_pipeline(resolve_models_dir(models_dir), device)
    avatar_id = store.new_id()
    with (
        Progress(
            TextColumn("{task.description:<20}"), BarColumn(), TaskProgressColumn(), transient=True
        ) as bar,
        logs.to_current_stderr(),  # log lines above the bar, not through it
    ):
        task = bar.add_task("decoding", total=1.0)

        def progress(fraction: float, stage: str) -> None:
            bar.update(task, completed=fraction, description=stage)

        try:
            avatar = prepare_avatar_file(
                file,
                name=name,
                avatar_id=avatar_id,
                bbox_shift=bbox_shift,
                encode_latents=encode,
                progress=progress,
                options=PrepareOptions(smooth_window=smooth),
                face_pipeline=faces,
                fallback_reason=faces_reason or None,
            )
        except AvatarInputError as exc:
            raise _fail(str(exc)) from exc
    avatar.latents_key = key
    store.save(avatar)
    meta = avatar.meta
    _say_face_pipeline(meta)
    typer.echo(f"latents: {note}" if encode else f"no latents stored: {note}")
    if encode is None:
        typer.echo("the MuseTalk engine computes the latents when it first loads this avatar")
    typer.echo(
        f"added {avatar.id} {name!r}: {avatar.n_frames} frames {avatar.size[1]}x{avatar.size[0]}"
        f" @ {avatar.fps:g} fps, face in {meta['n_faces']}; prepared in "
        f"{meta['prep_seconds'] + meta.get('decode_seconds', 0):.2f} s "
        f"({1000 * meta['prep_seconds_per_frame']:.1f} ms per frame, decode excluded)"
    )


@avatar_app.command("list")
def list_cmd(
    avatars_dir: Path | None = typer.Option(None, "--avatars-dir", help="Prepared avatars folder."),
    as_json: bool = typer.Option(False, "--json", help="Every avatar's metadata as JSON."),
) -> None:
    """List the avatars: id, name, status, frames, size, latents, fps, preparation time."""
    from rich.console import Console

    from avatars.store import AvatarStore
    from lipstream.commands.avatar_table import hint_lines, listing, terminal_width
    from lipstream.paths import avatars_dir as resolve_avatars_dir

    root = resolve_avatars_dir(avatars_dir)
    metas = AvatarStore(root).list()
    if as_json:
        typer.echo(json.dumps(metas, indent=1))
        return
    if not metas:
        typer.echo(f"no avatars in {root}")
        return
    width = terminal_width()
    shown = listing(metas, width)
    if shown.table is not None:
        Console(width=width or 10_000).print(shown.table)
    for line in shown.lines:
        typer.echo(line)
    if any(m.get("face_pipeline") == "fallback" for m in metas):
        typer.echo(FALLBACK_HINT)
    if shown.cut:
        for line in hint_lines(width):
            typer.echo(line)


@avatar_app.command("show")
def show_cmd(
    id_or_name: str = typer.Argument(..., help="The avatar's id, or its name if unique."),
    avatars_dir: Path | None = typer.Option(None, "--avatars-dir", help="Prepared avatars folder."),
    as_json: bool = typer.Option(False, "--json", help="The metadata as JSON."),
) -> None:
    """Everything stored about one avatar, its error (if it failed) in full."""
    from avatars.store import AvatarStore, AvatarStoreError
    from lipstream.commands.avatar_table import show_lines
    from lipstream.paths import avatars_dir as resolve_avatars_dir

    store = AvatarStore(resolve_avatars_dir(avatars_dir))
    try:
        meta = store.describe(store.resolve(id_or_name))
    except AvatarStoreError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(meta, indent=1))
        return
    for line in show_lines(meta):
        typer.echo(line)


@avatar_app.command("rm")
def rm_cmd(
    id_or_name: str = typer.Argument(..., help="The avatar's id, or its name if unique."),
    avatars_dir: Path | None = typer.Option(None, "--avatars-dir", help="Prepared avatars folder."),
) -> None:
    """Remove an avatar."""
    from avatars.store import AvatarStore, AvatarStoreError
    from lipstream.paths import avatars_dir as resolve_avatars_dir

    store = AvatarStore(resolve_avatars_dir(avatars_dir))
    try:
        avatar_id = store.resolve(id_or_name)
        store.delete(avatar_id)
    except AvatarStoreError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"removed {avatar_id}")
