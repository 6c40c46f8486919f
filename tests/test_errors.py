"""The one-line form of an exception, by hand."""

from m3i.errors import first_line


def test_first_line_by_hand():
    assert first_line(ValueError("  bad value\nsecond line\n")) == "bad value"
    assert first_line(ValueError("bad value\nmore"), with_type=True) == "ValueError: bad value"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError(""), with_type=True) == "OSError"
