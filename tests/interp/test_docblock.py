"""The one helper that rewrites generated blocks of the docs."""

from __future__ import annotations

import pytest

from interp.docblock import replace_block

# No test here reaches a device predicate (interp/device.py), checked by instrumenting them
# (docs/devices.md): the fake-Mac pass would run the same branches again, so it leaves them out.
pytestmark = pytest.mark.not_fake_mac_pass


def test_replaces_only_the_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- a -->\nold\n<!-- b -->\noutro\n", encoding="utf-8")
    replace_block(page, "<!-- a -->", "<!-- b -->", "new\n")
    assert page.read_text(encoding="utf-8") == "intro\n<!-- a -->\nnew\n<!-- b -->\noutro\n"


def test_missing_marker_is_an_error_and_the_page_is_untouched(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- a -->\nold\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no <!-- a --> ... <!-- b --> section"):
        replace_block(page, "<!-- a -->", "<!-- b -->", "new\n")
    assert page.read_text(encoding="utf-8") == "intro\n<!-- a -->\nold\n"
