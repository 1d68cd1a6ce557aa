"""Where lipstream keeps models and avatars: flags, then environment, then the user data dir."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir

MODELS_ENV = "LIPSTREAM_MODELS_DIR"
AVATARS_ENV = "LIPSTREAM_AVATARS_DIR"


def data_root() -> Path:
    return Path(user_data_dir("lipstream", appauthor=False))


def models_dir(override: str | Path | None = None) -> Path:
    """The MuseTalk weights folder (MuseTalk's own `models/` layout)."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser() if env else data_root() / "models"


def avatars_dir(override: str | Path | None = None) -> Path:
    """The folder holding prepared avatars, one sub-folder each."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(AVATARS_ENV)
    return Path(env).expanduser() if env else data_root() / "avatars"
