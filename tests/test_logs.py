"""Log lines: the values passed in `extra` follow the message as key=value, for our loggers
and, through the root logger, for uvicorn's."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lipstream.logs import FORMAT, FieldsFormatter, extra_fields, field_text, to_current_stderr

REPO = Path(__file__).resolve().parents[1]


def _record(msg: str, extra: dict[str, object] | None = None) -> logging.LogRecord:
    logger = logging.getLogger("tests.logs")
    return logger.makeRecord("tests.logs", logging.INFO, __file__, 1, msg, (), None, extra=extra)


def test_extra_fields_follow_the_message_in_order() -> None:
    fmt = FieldsFormatter("%(levelname)s %(name)s: %(message)s")
    line = fmt.format(_record("avatar ready", {"avatar_id": "av_0123", "frames": 250}))
    assert line == "INFO tests.logs: avatar ready avatar_id=av_0123 frames=250"


def test_a_record_without_fields_is_the_plain_format() -> None:
    fmt = FieldsFormatter(FORMAT)
    plain = logging.Formatter(FORMAT)
    record = _record("server ready")
    assert fmt.format(record) == plain.format(record)
    assert extra_fields(record) == {}


def test_values_that_would_split_the_line_are_quoted() -> None:
    assert field_text("av_1") == "av_1"
    assert field_text(0.5) == "0.5"
    assert field_text(None) == "None"
    assert field_text("") == '""'
    assert field_text("preview engine asked for") == '"preview engine asked for"'
    assert field_text('a="b"') == '"a=\\"b\\""'
    assert field_text("two\nlines") == '"two\\nlines"'
    fmt = FieldsFormatter("%(message)s")
    line = fmt.format(_record("engine chosen", {"reason": "no GPU found", "engine": "preview"}))
    assert line == 'engine chosen reason="no GPU found" engine=preview'


def test_fields_come_before_the_traceback() -> None:
    fmt = FieldsFormatter("%(message)s")
    try:
        raise ValueError("bad frame")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.getLogger("tests.logs").makeRecord(
        "tests.logs",
        logging.ERROR,
        __file__,
        1,
        "preparation failed",
        (),
        exc_info,
        extra={"avatar_id": "av_9"},
    )
    lines = fmt.format(record).splitlines()
    assert lines[0] == "preparation failed avatar_id=av_9"
    assert lines[1].startswith("Traceback")
    assert lines[-1] == "ValueError: bad frame"


def test_uvicorns_colour_copy_of_the_message_is_not_a_field() -> None:
    fmt = FieldsFormatter("%(message)s")
    record = _record("Started server process [%d]", {"color_message": "\x1b[1m..."})
    record.args = (42,)
    assert fmt.format(record) == "Started server process [42]"


def test_the_cli_setup_and_uvicorns_loggers_print_fields_on_stderr() -> None:
    """A fresh process: `setup` configures the root logger as `lipstream` and `lipstream
    serve` do; uvicorn configured with our log_config sends its lines through it."""
    code = textwrap.dedent(
        """
        import logging
        import uvicorn
        from lipstream import logs

        logs.setup(logging.INFO)
        logging.getLogger("server.avatar_service").info(
            "avatar ready", extra={"avatar_id": "av_0123456789abcdef", "frames": 3}
        )
        async def app(scope, receive, send):
            pass
        uvicorn.Config(app, log_level="info", log_config=logs.UVICORN_LOG_CONFIG)
        logging.getLogger("uvicorn.error").info(
            "Started server process [%d]", 7, extra={"color_message": "colour"}
        )
        logging.getLogger("uvicorn.access").info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/healthz", "1.1", 200
        )
        logging.getLogger("uvicorn.error").debug("not shown at info")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 3, done.stderr
    assert lines[0].endswith(
        " INFO server.avatar_service: avatar ready avatar_id=av_0123456789abcdef frames=3"
    )
    assert lines[1].endswith(" INFO uvicorn.error: Started server process [7]")
    assert lines[2].endswith(' INFO uvicorn.access: 127.0.0.1:5000 - "GET /healthz HTTP/1.1" 200')
    assert done.stdout == ""


def test_stderr_handlers_follow_a_redirected_stderr_inside_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under `avatar add`'s progress bar, rich replaces sys.stderr with a proxy that prints
    above the bar; the root handler must write there, and back to the real stderr after."""
    handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(FieldsFormatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    proxy = io.StringIO()
    try:
        monkeypatch.setattr(sys, "stderr", proxy)
        with to_current_stderr():
            assert handler.stream is proxy
            logging.getLogger("avatars.prepare").warning("prepared", extra={"frames": 3})
        assert handler.stream is sys.__stderr__
    finally:
        root.removeHandler(handler)
    assert proxy.getvalue() == "prepared frames=3\n"


def test_a_media_process_logs_its_fields_under_its_own_prefix() -> None:
    """The media processes call `setup` with a format of their own (`media[pid]`): their lines
    carry the fields too."""
    code = textwrap.dedent(
        """
        import logging
        from server.media import shard  # noqa: F401  (imports as the media process does)
        from lipstream import logs
        logs.setup(fmt="%(levelname)s media[%(process)d] %(name)s: %(message)s")
        logging.getLogger("server.media.shard").warning("encoder late", extra={"session_id": "se_1"})
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("WARNING media[") and line.endswith("encoder late session_id=se_1"), line
