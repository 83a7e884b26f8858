"""Sizes and durations as people write them (SPEC §2: Docker's units; ``90s``, ``20m``, ``1h``)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jupyter_compute_queue.model.units import parse_duration, parse_size

KiB, MiB, GiB, TiB, PiB = (1024**i for i in range(1, 6))
INT64_MAX = 2**63 - 1

GOOD_SIZES: list[tuple[Any, int]] = [
    ("512m", 512 * MiB),
    ("4g", 4 * GiB),
    ("4096m", 4 * GiB),
    ("4294967296", 4 * GiB),
    (4294967296, 4 * GiB),
    ("4G", 4 * GiB),
    ("4gb", 4 * GiB),
    ("4GB", 4 * GiB),
    ("4GiB", 4 * GiB),
    ("4gib", 4 * GiB),
    ("4 g", 4 * GiB),
    (" 4g\n", 4 * GiB),
    ("1k", KiB),
    ("1KiB", KiB),
    ("1kb", KiB),
    ("1t", TiB),
    ("1p", PiB),
    ("100b", 100),
    ("100", 100),
    (100, 100),
    ("0", 0),
    (0, 0),
    (0.0, 0),
    (1.5, 2),  # fractions of a byte round up
    ("1.5", 2),
    ("1.5g", 3 * GiB // 2),
    ("0.5k", 512),
    ("0.1k", 103),  # 102.4 bytes, rounded up
    (4096.0, 4096),
    ("8191p", 8191 * PiB),
    (INT64_MAX, INT64_MAX),
    (str(INT64_MAX), INT64_MAX),  # exact: as a float it would be 2**63, over the limit
    ("3004.2t", 3303152832164660),  # exact: a float product rounds down to ...659
]

BAD_SIZES: list[Any] = [
    "",
    " ",
    "g",
    "4x",
    "-1",
    "-1g",
    -1,
    -0.5,
    "4 potatoes",
    "1e3",
    "4g4",
    "4gg",
    "4kbb",
    ".5g",
    "5.g",
    "+5",
    "0x10",
    "1,5g",
    "1_000",
    "4 0g",
    "1h",
    "inf",
    "nan",
    True,
    False,
    None,
    [],
    {},
    [4],
    float("nan"),
    float("inf"),
    float("-inf"),
    2**63,  # over Docker's int64
    10**400,  # too large even for a float
    "8192p",
    "9" * 400,
    "9" * 400 + "k",
]

GOOD_DURATIONS: list[tuple[Any, int]] = [
    ("90s", 90),
    ("20m", 1200),
    ("1h", 3600),
    ("60m", 3600),
    ("3600", 3600),
    (3600, 3600),
    ("3600s", 3600),
    ("1h30m", 5400),
    ("1h 30m", 5400),
    ("1H30M", 5400),
    ("1M", 60),  # minutes, not months
    ("2h0m0s", 7200),
    ("1m1s", 61),
    ("1d", 86400),
    ("2D", 2 * 86400),
    ("1.5h", 5400),
    ("0.1h", 360),  # not 361: 0.1 * 3600 is 360.00000000000006 in floating point
    ("0.05m", 3),  # likewise 3.0000000000000004
    ("90.5", 91),  # fractions of a second round up: a limit is never shorter than asked
    ("1.1s", 2),
    ("10ms", 1),
    ("1000ms", 1),
    ("1001ms", 2),
    ("1s500ms", 2),
    ("  90s ", 90),
    ("0", 0),
    (0, 0),
    (0.0001, 1),
    (2.5, 3),
    ("1.0000001s", 2),  # even a sliver over a second is rounded up
    ("0.0000001", 1),
    (INT64_MAX, INT64_MAX),
    (str(INT64_MAX), INT64_MAX),
    (f"{INT64_MAX}s", INT64_MAX),
]

BAD_DURATIONS: list[Any] = [
    "",
    " ",
    "s",
    "h1",
    "1x",
    "-1",
    "-1s",
    "1h-30m",
    "1 hour",
    "1y",
    "1w",
    "1hh",
    "1.h",
    ".5h",
    "1e3",
    "1h30",
    "30m1",
    "1:30",
    "inf",
    "nan",
    "4g",
    True,
    False,
    None,
    [],
    {},
    -1,
    -0.5,
    float("nan"),
    float("inf"),
    2**63,
    str(2**63),
    f"{INT64_MAX}s1ms",
    10**400,
    "9" * 400,
    "9" * 400 + "h",
]


@pytest.mark.parametrize(("text", "expected"), GOOD_SIZES, ids=repr)
def test_good_size(text: Any, expected: int) -> None:
    result = parse_size(text)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize("text", BAD_SIZES, ids=lambda v: repr(v)[:30])
def test_bad_size(text: Any) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "expected"), GOOD_DURATIONS, ids=repr)
def test_good_duration(text: Any, expected: int) -> None:
    result = parse_duration(text)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize("text", BAD_DURATIONS, ids=lambda v: repr(v)[:30])
def test_bad_duration(text: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_messages_say_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="'512m' or '4g'"):
        parse_size("4 potatoes")
    with pytest.raises(ValueError, match="'90s', '20m', '1h30m'"):
        parse_duration("forever")


UNITS = {"k": KiB, "m": MiB, "g": GiB, "t": TiB}


@given(
    n=st.integers(0, 2**20),
    unit=st.sampled_from(sorted(UNITS)),
    suffix=st.sampled_from(["", "b", "ib"]),
    upper=st.booleans(),
    space=st.sampled_from(["", " "]),
)
def test_units_are_binary_and_case_insensitive(
    n: int, unit: str, suffix: str, upper: bool, space: str
) -> None:
    text = f"{n}{space}{unit}{suffix}"
    assert parse_size(text.upper() if upper else text) == n * UNITS[unit]


@given(n=st.integers(0, 2**53))
def test_a_bare_number_is_bytes(n: int) -> None:
    assert parse_size(n) == parse_size(str(n)) == parse_size(f"{n}b") == n


@given(tenths=st.integers(1, 10**6), unit=st.sampled_from(sorted(UNITS)))
def test_fractional_sizes_round_up_to_whole_bytes(tenths: int, unit: str) -> None:
    exact_ceiling = -(-tenths * UNITS[unit] // 10)
    assert parse_size(f"{tenths / 10}{unit}") == exact_ceiling


@given(
    h=st.integers(0, 10**4),
    m=st.integers(0, 10**4),
    s=st.integers(0, 10**4),
    d=st.integers(0, 100),
    spaced=st.booleans(),
)
def test_duration_parts_add_up(h: int, m: int, s: int, d: int, spaced: bool) -> None:
    total = d * 86400 + h * 3600 + m * 60 + s
    parts = [f"{d}d", f"{h}h", f"{m}m", f"{s}s"]
    text = (" " if spaced else "").join(parts)
    assert parse_duration(text) == parse_duration(total) == parse_duration(str(total)) == total


@given(ms=st.integers(0, 10**9))
def test_milliseconds_round_up_to_seconds(ms: int) -> None:
    assert parse_duration(f"{ms}ms") == math.ceil(ms / 1000) == -(-ms // 1000)


@given(hundredths=st.integers(1, 10**6))
def test_decimal_durations_are_exact_and_round_up(hundredths: int) -> None:
    value = f"{hundredths / 100}"
    assert parse_duration(value + "h") == hundredths * 36
    assert parse_duration(value + "m") == -(-hundredths * 60 // 100)
    assert parse_duration(value + "s") == -(-hundredths // 100)
    assert parse_duration(value) == -(-hundredths // 100)


@given(a=st.integers(0, 10**6), b=st.integers(0, 10**6))
def test_larger_means_larger(a: int, b: int) -> None:
    assert (parse_size(f"{a}k") <= parse_size(f"{b}k")) == (a <= b)
    assert (parse_duration(f"{a}m") <= parse_duration(f"{b}m")) == (a <= b)
