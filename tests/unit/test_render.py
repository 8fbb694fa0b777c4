"""What sandboxctl shows a terminal of text it did not write (threat 28): control and format
characters become visible escapes, in tables as in plain text; printable text is untouched.

Pure: strings in, strings out.
"""

from __future__ import annotations

import argparse

from sandboxd import render
from sandboxd.ctl.base import Base

HOSTILE = "sbx\x1b]52;c;cHduZWQ=\x07\x1b[2J\x9b31m\u202eansi\r"


def test_safe_text_escapes_every_control_and_format_character() -> None:
    shown = render.safe_text(HOSTILE + "\n\tok é ─")
    assert shown == "sbx\\x1b]52;c;cHduZWQ=\\x07\\x1b[2J\\x9b31m\\u202eansi\\r\n\tok é ─"
    assert render.safe_text(shown) == shown  # idempotent


def test_table_cells_are_escaped_before_they_are_padded() -> None:
    text = render.table(["package", "version"], [(HOSTILE, "1.0\x1b]0;t\x07"), ("plain", "2")])
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
    lines = text.splitlines()
    assert lines[3].index("2") == lines[2].index("1.0")  # columns line up on the escaped width


def test_sandboxctl_text_is_escaped_whether_or_not_it_goes_to_a_terminal() -> None:
    """A pipe can end at a terminal (ssh host sandboxctl env list): sandboxctl's own lines are
    escaped either way, and --raw (which is about a run's output) does not change that."""
    for raw in (False, True):
        assert Base(argparse.Namespace(raw=raw, json=False)).shown(HOSTILE) == render.safe_text(HOSTILE)
