"""How `lipstream avatar list` and `avatar show` lay avatars out in a terminal.

The table takes the terminal's width (COLUMNS, else the terminal's own; output to a pipe gets
the table's natural width). Ids and names are never cut: where the width is short, the
optional columns go first (fps, ms/frame, latents, size, frames), then long names fold over
lines and the status is shortened; where even that does not fit, each avatar gets a few lines
of its own. An error shows as its first line, shortened to fit; `avatar show ID` and `--json`
give it whole.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

ESSENTIAL = ("id", "name", "status")
# the optional columns, the most useful first: the last one goes first when space is short;
# "faces" is the face pipeline that prepared the avatar, "shift" MuseTalk's bbox_shift range
BASE_OPTIONAL = ("frames", "size", "latents", "ms/frame", "fps")
FACE_OPTIONAL = ("faces", "shift")
OPTIONAL = BASE_OPTIONAL + FACE_OPTIONAL
RIGHT = frozenset({"frames", "fps", "ms/frame"})
STATUS_SOFT = 24  # a status shortened to this still says what went wrong
STATUS_MIN = 14  # "preparing 42%", "failed: no fa…": the kind of failure
STATUS_MAX = 80  # an error's first line beyond this is cut (it is whole in `avatar show`)
NAME_MIN = 12  # a name column narrower than this folds names into too many lines
ELLIPSIS = "…"
SHOW_FIRST = ("id", "name", "status", "progress", "error")  # `avatar show`; the rest follow
HINT = ("full errors: lipstream avatar show ID", "or lipstream avatar list --json")


def terminal_width() -> int | None:
    """COLUMNS if set, else the terminal's width; None where stdout is not a terminal."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return os.get_terminal_size(sys.stdout.fileno()).columns
    return None


def error_line(error: Any) -> str:
    """An error's first non-empty line, its spaces collapsed."""
    for line in str(error).splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def status_text(meta: dict[str, Any]) -> str:
    """ "ready", "preparing 40%", "failed: <first line of the error>"."""
    status = str(meta.get("status"))
    if status == "failed" and meta.get("error"):
        return f"{status}: {error_line(meta['error'])}"
    if status in ("pending", "preparing"):
        return f"{status} {100 * float(meta.get('progress') or 0):.0f}%"
    return status


def cells(meta: dict[str, Any]) -> dict[str, str]:
    """One avatar's cells, by column."""
    size = meta.get("size")
    per_frame = meta.get("prep_seconds_per_frame")
    return {
        "id": str(meta.get("id")),
        "name": str(meta.get("name")),
        "status": status_text(meta),
        "frames": str(meta.get("n_frames")),
        "size": f"{size[1]}x{size[0]}" if size else "-",
        "fps": f"{meta['fps']:g}" if meta.get("fps") else "-",
        "latents": "yes" if meta.get("latents_key") else "no",
        "ms/frame": f"{1000 * per_frame:.1f}" if per_frame else "-",
        "faces": str(meta.get("face_pipeline") or "-"),
        "shift": shift_range_text(meta.get("bbox_shift_range")),
    }


def shift_range_text(shift_range: Any) -> str:
    """MuseTalk's bbox_shift adjust range [-a, b] as "-a..b"; "-" where there is none."""
    if isinstance(shift_range, (list, tuple)) and len(shift_range) == 2:
        return f"{int(shift_range[0])}..{int(shift_range[1])}"
    return "-"


def shorten(text: str, width: int) -> str:
    """`text` cut to `width` cells, an ellipsis marking the cut."""
    if cell_len(text) <= width:
        return text
    out = ""
    for char in text:
        if cell_len(out + char) > width - 1:
            break
        out += char
    return out + ELLIPSIS


def table_width(widths: dict[str, int]) -> int:
    """The width of a rich Table (default box, padding 1) with these column widths."""
    return sum(widths.values()) + 3 * len(widths) + 1


@dataclass(frozen=True)
class Layout:
    """The columns shown and their widths; `stacked` where no table fits."""

    widths: dict[str, int]
    stacked: bool = False


def choose_layout(rows: Sequence[dict[str, str]], width: int | None) -> Layout:
    """The widest layout of `rows` that fits in `width` columns (None: no limit)."""
    natural = {
        column: max([cell_len(column)] + [cell_len(row[column]) for row in rows])
        for column in ESSENTIAL + OPTIONAL
    }
    natural["status"] = min(natural["status"], STATUS_MAX)
    if width is None:
        return Layout(natural)
    soft, least = (min(natural["status"], n) for n in (STATUS_SOFT, STATUS_MIN))
    # every name whole on one line: the status whole, else shortened, then fewer columns
    for status in (natural["status"], soft):
        for n in range(len(OPTIONAL), -1, -1):
            widths = {c: natural[c] for c in ESSENTIAL + OPTIONAL[:n]}
            widths["status"] = status
            spare = width - table_width(widths)
            if spare >= 0:
                widths["status"] = min(natural["status"], status + spare)
                return Layout(widths)
    # long names fold over lines
    for status in (soft, least):
        widths = {"id": natural["id"], "name": 0, "status": status}
        name = width - table_width(widths)
        if name >= min(NAME_MIN, natural["name"]):
            widths["name"] = name
            return Layout(widths)
    return Layout({"id": natural["id"], "name": natural["name"], "status": least}, stacked=True)


def avatar_table(rows: Sequence[dict[str, str]], layout: Layout) -> Table:
    """The rich Table of `rows` (their status already shortened) in `layout`."""
    table = Table()
    for column, width in layout.widths.items():
        table.add_column(
            column,
            width=width,
            no_wrap=column != "name",
            overflow="fold" if column == "name" else "ellipsis",
            justify="right" if column in RIGHT else "left",
        )
    for row in rows:
        table.add_row(*(Text(row[column]) for column in layout.widths))  # no markup
    return table


def stacked_lines(rows: Sequence[dict[str, str]], width: int) -> list[str]:
    """Each avatar on lines of its own: the id, then its name, status and details, indented."""
    lines = []
    for row in rows:
        lines += [row["id"], f"  name: {row['name']}", f"  status: {row['status']}"]
        line = ""
        for item in (f"{c} {row[c]}" for c in BASE_OPTIONAL):
            if line and cell_len(f"  {line}, {item},") > width:
                lines.append(f"  {line},")
                line = ""
            line = f"{line}, {item}" if line else item
        lines.append(f"  {line}")
        lines.append("  " + ", ".join(f"{c} {row[c]}" for c in FACE_OPTIONAL))
    return lines


def hint_lines(width: int | None) -> list[str]:
    """Where the whole errors are: one line, or two where one does not fit."""
    joined = " ".join(HINT)
    if width is None or cell_len(joined) <= width:
        return [joined]
    return [HINT[0], f"  {HINT[1]}"]


@dataclass(frozen=True)
class Listing:
    """What `avatar list` prints: a table (or, where none fits, plain lines), and whether an
    error was cut to fit (then `hint_lines` follow)."""

    table: Table | None
    lines: list[str]
    cut: bool


def listing(metas: Sequence[dict[str, Any]], width: int | None) -> Listing:
    """The avatars `metas` laid out for a terminal `width` columns wide (None: no limit)."""
    rows = [cells(meta) for meta in metas]
    layout = choose_layout(rows, width)
    room = layout.widths["status"]
    if layout.stacked:
        room = max((width or 0) - len("  status: "), STATUS_MIN)
    cut = False
    for meta, row in zip(metas, rows, strict=True):
        row["status"] = shorten(row["status"], room)
        error = meta.get("error")
        if meta.get("status") == "failed" and error:
            cut = cut or row["status"] != f"failed: {str(error).strip()}"
    if layout.stacked:
        return Listing(None, stacked_lines(rows, width or 0), cut)
    return Listing(avatar_table(rows, layout), [], cut)


def show_lines(meta: dict[str, Any]) -> list[str]:
    """`avatar show`: every field of the avatar's meta, the error whole."""
    lines = []
    first = [key for key in SHOW_FIRST if key in meta]
    for key in first + [key for key in meta if key not in first]:
        value = meta[key]
        if key == "error" and value:
            text = str(value).rstrip().splitlines() or [""]
            lines.append(f"{key}: {text[0]}")
            lines.extend(f"  {line}" for line in text[1:])
        elif isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k}: {v}" for k, v in value.items())
        else:
            lines.append(f"{key}: {value}")
    return lines
