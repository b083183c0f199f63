"""common.errors: what an error message shows of a value is short, however large the value."""
import time

from common.errors import SHOWN_CHARS, shorten


def test_shorten_cuts_a_huge_shared_value_without_expanding_it():
    """Issue 19.12: the repr of a YAML alias bomb's value was a 226 MB line. 9**9 leaves shared by reference
    (what YAML aliases build) are shown in about SHOWN_CHARS characters, without formatting them all."""
    value: object = ["x"] * 9
    for _ in range(8):
        value = [value] * 9
    start = time.process_time()
    text = shorten(value)
    assert time.process_time() - start < 1.0  # a full repr would take minutes and gigabytes
    assert text.startswith("[[[[[[[[[") and text.endswith(f"(cut at {SHOWN_CHARS} characters)")
    assert len(text) <= SHOWN_CHARS + 40
    assert len(shorten("y" * 10**7)) <= SHOWN_CHARS + 40


def test_shorten_keeps_a_short_value_as_its_repr():
    for value in ("abc", 1.5, None, [1, 2], (1,), (), {"a": [1, 2]}, {"k": (3, "v")}):
        assert shorten(value) == repr(value)
