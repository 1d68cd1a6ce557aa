"""`lipstream bench`'s command line where the `bench` extra is missing."""

from __future__ import annotations

import sys

import pytest
import typer
from typer.testing import CliRunner


@pytest.mark.parametrize("flag", ["--soak", "--ramp"])
def test_soak_and_ramp_without_the_bench_extra_say_what_to_install(
    flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.cli import register

    monkeypatch.setitem(sys.modules, "httpx", None)  # as if httpx were not installed
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        """Keeps `bench` a sub-command."""

    result = CliRunner().invoke(app, ["bench", flag, "--soak-url", "http://127.0.0.1:9"])
    assert result.exit_code == 1, result.output
    assert "pip install 'lipstream[bench]'" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
