"""The face models' weights: MuseTalk v1.5's file layout, download from model-hub copies, and
random stand-ins of the same layout.

Under the models dir, as MuseTalk's `download_weights.sh` places them (S3FD, which MuseTalk's
face_alignment copy fetches by itself into torch's hub cache, goes to `face-detection/`):

    face-detection/s3fd-619a316812.pth       S3FD                    (avatars.musetalk_faces.s3fd)
    dwpose/dw-ll_ucoco_384.pth               DWPose RTMPose-l        (avatars.musetalk_faces.dwpose)
    face-parse-bisent/79999_iter.pth         BiSeNet face parsing    (avatars.musetalk_faces.bisenet)
    face-parse-bisent/resnet18-5c106cde.pth  its ResNet-18 backbone  (torchvision's ImageNet file)

MuseTalk fetches two of them from outside the Hugging Face hub (79999_iter.pth from a Google
Drive link, resnet18 from download.pytorch.org) and face_alignment fetches S3FD from
adrianbulat.com; `download` takes every file from Hugging Face hub repos that hold the same
bytes: each is checked by size and SHA-256 (both stated by the hub's LFS pointer of each file),
and the next source is tried when one fails. Downloads resume where they stopped
(huggingface_hub keeps the partial file) and show progress bars.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from avatars.musetalk_faces.bisenet import build_bisenet, resnet18_file_state
from avatars.musetalk_faces.s3fd import build_s3fd

logger = logging.getLogger(__name__)

SIZES = ("tiny", "full")
DOWNLOAD_DIR = ".face-download"  # partial downloads, under the models dir


class FaceWeightsError(RuntimeError):
    """A face weights file could not be fetched or is not the published one."""


@dataclass(frozen=True)
class FaceWeightsFile:
    """One published file: where it goes, its size and SHA-256, and the hub copies holding it
    as (repo id, path in the repo), tried in order."""

    rel: str
    size: int
    sha256: str
    sources: tuple[tuple[str, str], ...]
    origin: str  # where MuseTalk / face_alignment take it from

    def __post_init__(self) -> None:
        if self.size <= 0 or len(self.sha256) != 64 or not self.sources:
            raise ValueError(f"{self.rel}: size, a 64-hex SHA-256 and a source are required")


S3FD_FILE = "face-detection/s3fd-619a316812.pth"
DWPOSE_FILE = "dwpose/dw-ll_ucoco_384.pth"
BISENET_FILE = "face-parse-bisent/79999_iter.pth"
RESNET18_FILE = "face-parse-bisent/resnet18-5c106cde.pth"

FACE_WEIGHTS: tuple[FaceWeightsFile, ...] = (
    FaceWeightsFile(
        S3FD_FILE,
        89_843_225,
        "619a31681264d3f7f7fc7a16a42cbbe8b23f31a256f75a366e5a1bcd59b33543",
        (
            ("camenduru/Wav2Lip", "checkpoints/s3fd-619a316812.pth"),
            ("jbilcke-hf/model-cocktail", "face-detector/s3fd-619a316812.pth"),
        ),
        "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth (face_alignment)",
    ),
    FaceWeightsFile(
        DWPOSE_FILE,
        406_878_486,
        "0d9408b13cd863c4e95a149dd31232f88f2a12aa6cf8964ed74d7d97748c7a07",
        (
            ("yzd-v/DWPose", "dw-ll_ucoco_384.pth"),
            ("wanghaofan/dw-ll_ucoco_384", "dw-ll_ucoco_384.pth"),
        ),
        "Hugging Face yzd-v/DWPose (MuseTalk's download_weights.sh)",
    ),
    FaceWeightsFile(
        BISENET_FILE,
        53_289_463,
        "468e13ca13a9b43cc0881a9f99083a430e9c0a38abd935431d1c28ee94b26567",
        (
            ("ManyOtherFunctions/face-parse-bisent", "79999_iter.pth"),
            ("vivym/face-parsing-bisenet", "79999_iter.pth"),
        ),
        "Google Drive id 154JgKpzCPW82qINcVieuPH3fZ2e0P812 (MuseTalk's download_weights.sh)",
    ),
    FaceWeightsFile(
        RESNET18_FILE,
        46_827_520,
        "5c106cde386e87d4033832f2996f5493238eda96ccf559d1d62760c4de0613f8",
        (
            ("ManyOtherFunctions/face-parse-bisent", "resnet18-5c106cde.pth"),
            ("vivym/face-parsing-bisenet", "resnet18-5c106cde.pth"),
        ),
        "https://download.pytorch.org/models/resnet18-5c106cde.pth (MuseTalk's download_weights.sh)",
    ),
)


def face_weights_problem(models_dir: str | Path) -> str | None:
    """None when all four files exist (non-empty) under `models_dir`, else a sentence naming
    the missing ones and how to get them. Sizes are not checked here: random stand-ins from
    `make_random` are accepted."""
    root = Path(models_dir).expanduser()
    missing = [
        f.rel
        for f in FACE_WEIGHTS
        if not (root / f.rel).is_file() or (root / f.rel).stat().st_size == 0
    ]
    if not missing:
        return None
    return (
        f"face model weights missing in {root}: {', '.join(missing)}. "
        "Run `lipstream models download` to fetch them."
    )


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_problem(path: Path, spec: FaceWeightsFile) -> str | None:
    """None when `path` is the published file (size, then SHA-256), else what differs."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != spec.size:
        return f"size {size} bytes, expected {spec.size}"
    digest = sha256_of(path)
    if digest != spec.sha256:
        return f"SHA-256 {digest}, expected {spec.sha256}"
    return None


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return "HF_HUB_OFFLINE is set" if offline else "no network or the hub is unreachable"


def _fetch(root: Path, spec: FaceWeightsFile) -> Path:
    """Download `spec` from its first source that gives the published bytes; returns its path."""
    from huggingface_hub import hf_hub_download

    target = root / spec.rel
    failures: list[str] = []
    for repo, filename in spec.sources:
        staging = root / DOWNLOAD_DIR / repo.replace("/", "--")
        logger.info("downloading", extra={"repo": repo, "file": filename, "to": spec.rel})
        try:
            got = Path(hf_hub_download(repo_id=repo, filename=filename, local_dir=str(staging)))
        except Exception as exc:
            failures.append(f"{repo}/{filename}: {type(exc).__name__}: {exc}")
            continue
        problem = file_problem(got, spec)
        if problem is not None:
            failures.append(f"{repo}/{filename}: {problem}")
            got.unlink(missing_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, target)
        shutil.rmtree(staging, ignore_errors=True)
        return target
    raise FaceWeightsError(
        f"cannot download {spec.rel} ({_offline_hint()}); tried: {'; '.join(failures)}. "
        "Connect to the internet (or unset HF_HUB_OFFLINE) and run `lipstream models download` "
        f"again, or copy the file there yourself (its origin: {spec.origin})."
    )


def download(
    models_dir: str | Path, files: tuple[FaceWeightsFile, ...] = FACE_WEIGHTS
) -> list[Path]:
    """Fetch the face weights into `models_dir` (MuseTalk's layout), with progress bars.

    A file already there with the published size and SHA-256 is kept; any other file at that
    path (for example a random stand-in) is replaced. Raises FaceWeightsError naming every
    source tried when a file cannot be fetched.
    """
    root = Path(models_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for spec in files:
        target = root / spec.rel
        problem = file_problem(target, spec)
        if problem is None:
            logger.info("already present", extra={"file": spec.rel})
            paths.append(target)
            continue
        if problem != "missing":
            logger.warning("replacing", extra={"file": spec.rel, "problem": problem})
        paths.append(_fetch(root, spec))
    shutil.rmtree(root / DOWNLOAD_DIR, ignore_errors=True)
    return paths


def _dwpose_state(size: str) -> dict[str, object]:
    from avatars.musetalk_faces.dwpose import build_dwpose

    # mmpose checkpoints wrap the weights: {"meta": ..., "state_dict": {...}, ...}
    return {"state_dict": build_dwpose(size).state_dict()}


def make_random(models_dir: str | Path, size: str = "tiny", seed: int = 0) -> list[Path]:
    """Write random weights for the four files in MuseTalk's layout: `full` with the published
    architectures' key names and shapes (GPU benchmarks), `tiny` with the same key names at
    small widths (CPU tests). Returns the files written."""
    if size not in SIZES:
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    root = Path(models_dir).expanduser()
    torch.manual_seed(seed)
    bisenet = build_bisenet(size)
    states: dict[str, object] = {
        S3FD_FILE: build_s3fd(size).state_dict(),
        DWPOSE_FILE: _dwpose_state(size),
        BISENET_FILE: bisenet.state_dict(),
        RESNET18_FILE: resnet18_file_state(bisenet.cp.resnet),
    }
    written: list[Path] = []
    for rel, state in states.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        written.append(path)
    logger.info("wrote random face weights", extra={"size": size, "dir": str(root)})
    return written
