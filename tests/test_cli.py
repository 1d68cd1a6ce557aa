"""`lipstream avatar list` and `avatar show`: ids and names whole at any terminal width, errors
on one line in the table and whole in `show` and `--json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.cells import cell_len
from typer.testing import CliRunner

from avatars.store import AvatarStore
from lipstream.commands.avatar import avatar_app

HINT_TEXT = "full errors: lipstream avatar show ID"
LONG_NAME = "Astro the long-named presenter of the evening news show"
MARKUP_NAME = "[bold]Eve[/bold]"
LONG_ERROR = "cannot decode the upload: Invalid data found when processing input\n" + "\n".join(
    f"  frame {i}: stream error at offset {4096 * i} while reading the container" for i in range(20)
)


@pytest.fixture
def store(tmp_path: Path) -> AvatarStore:
    store = AvatarStore(tmp_path / "avatars")
    long = store.create(LONG_NAME)
    store.set_status(long, "failed", error=LONG_ERROR)
    store.set_status(store.create("Bob"), "preparing", progress=0.42)
    store.set_status(store.create(MARKUP_NAME), "failed", error="no face found in any frame")
    return store


def _run(store: AvatarStore, *args: str, columns: int | None = None) -> str:
    env = {"COLUMNS": str(columns)} if columns else {}
    result = CliRunner().invoke(avatar_app, [*args, "--avatars-dir", str(store.root)], env=env)
    assert result.exit_code == 0, result.output
    return result.output


def _table_rows(output: str) -> list[list[str]]:
    """The table's rows, each a list of cells with the lines of a folded cell joined."""
    rows: list[list[str]] = []
    for line in output.splitlines():
        if not line.startswith("│"):
            continue
        parts = [part.strip() for part in line.strip("│").split("│")]
        if parts[0]:
            rows.append(parts)
        else:  # a folded name continues the row above
            rows[-1] = [
                a + (" " if a and b else "") + b for a, b in zip(rows[-1], parts, strict=True)
            ]
    return rows


def _squeezed(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("columns", [60, 80, 100, 250])
def test_list_keeps_ids_and_names_whole_within_the_width(store: AvatarStore, columns: int) -> None:
    output = _run(store, "list", columns=columns)
    assert all(cell_len(line) <= columns for line in output.splitlines()), output
    rows = _table_rows(output)
    metas = store.list()
    assert [row[0] for row in rows] == [m["id"] for m in metas]
    assert [_squeezed(row[1]) for row in rows] == [_squeezed(m["name"]) for m in metas]
    statuses = [row[2] for row in rows]
    assert statuses[0].startswith("failed: can")
    assert "frame 3" not in output  # one line per error
    assert statuses[1] == "preparing 42%"
    assert HINT_TEXT in output


def test_a_wide_terminal_shows_every_column_and_the_errors_first_line(store: AvatarStore) -> None:
    output = _run(store, "list", columns=250)
    header = next(line for line in output.splitlines() if line.startswith("┃"))
    for column in ("id", "name", "status", "frames", "size", "latents", "ms/frame", "fps"):
        assert f" {column} " in header
    rows = _table_rows(output)
    assert rows[0][1] == LONG_NAME  # on one line
    assert rows[0][2] == "failed: " + LONG_ERROR.splitlines()[0]
    assert rows[2][1] == MARKUP_NAME  # printed as it is, not read as markup


def test_a_narrow_terminal_shortens_the_status_and_folds_names(store: AvatarStore) -> None:
    output = _run(store, "list", columns=60)
    header = next(line for line in output.splitlines() if line.startswith("┃"))
    assert "fps" not in header and "frames" not in header
    rows = _table_rows(output)
    assert rows[0][2].endswith("…") and len(rows[0][2]) <= 16
    assert sum(1 for line in output.splitlines() if line.startswith("│")) > len(rows)  # folded


def test_a_very_narrow_terminal_lists_each_avatar_on_lines_of_its_own(store: AvatarStore) -> None:
    output = _run(store, "list", columns=40)
    lines = output.splitlines()
    for meta in store.list():
        at = lines.index(meta["id"])
        assert lines[at + 1] == f"  name: {meta['name']}"
        assert lines[at + 2].startswith("  status: ")
    assert all(cell_len(line) <= 40 for line in lines if not line.startswith("  name: ")), output
    assert "  frames 0, size -, latents no," in lines and "  ms/frame -, fps -" in lines
    assert HINT_TEXT in output


def test_no_hint_where_no_error_was_cut(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path / "avatars")
    store.set_status(store.create("Carol"), "failed", error="no face found")
    output = _run(store, "list", columns=120)
    assert "failed: no face found" in output and HINT_TEXT not in output


def test_show_and_json_give_the_whole_error(store: AvatarStore) -> None:
    long_id = store.list()[0]["id"]
    shown = _run(store, "show", long_id)
    lines = shown.splitlines()
    assert lines[:3] == [f"id: {long_id}", f"name: {LONG_NAME}", "status: failed"]
    assert "frame 19: stream error at offset 77824 while reading the container" in shown
    assert lines[4] == "error: " + LONG_ERROR.splitlines()[0]
    assert json.loads(_run(store, "show", long_id, "--json"))["error"] == LONG_ERROR
    listed = json.loads(_run(store, "list", "--json"))
    assert [m["error"] for m in listed] == [LONG_ERROR, None, "no face found in any frame"]
    assert json.loads(_run(store, "show", "Bob", "--json"))["progress"] == 0.42


def test_show_names_a_missing_avatar(store: AvatarStore) -> None:
    result = CliRunner().invoke(avatar_app, ["show", "nobody", "--avatars-dir", str(store.root)])
    assert result.exit_code == 1 and "no avatar" in result.output
