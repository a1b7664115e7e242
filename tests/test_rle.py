import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medseg.data.rle import decode, encode, parse, validate
from medseg.errors import MedsegError

# 3x4 mask:        row-major flat: 0 1 1 0 | 0 0 0 1 | 1 0 0 0  -> runs (2, 2), (8, 2)
#  0 1 1 0         column-major flat: col0 0 0 1, col1 1 0 0, col2 1 0 0, col3 0 1 0
#  0 0 0 1                          -> 0 0 1 1 0 0 1 0 0 0 1 0 -> runs (3, 2), (7, 1), (11, 1)
#  1 0 0 0
M34 = np.array([[0, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]], np.uint8)


def test_hand_example_row_major():
    assert encode(M34) == "2 2 8 2"
    np.testing.assert_array_equal(decode("2 2 8 2", (3, 4)), M34)


def test_hand_example_column_major():
    assert encode(M34, order="F") == "3 2 7 1 11 1"
    np.testing.assert_array_equal(decode("3 2 7 1 11 1", (3, 4), order="F"), M34)


def test_full_and_empty_and_edges():
    assert encode(np.zeros((5, 7))) == ""
    assert encode(np.ones((5, 7), bool)) == "1 35"
    np.testing.assert_array_equal(decode("", (2, 3)), np.zeros((2, 3), np.uint8))
    np.testing.assert_array_equal(decode(None, (2, 3)), np.zeros((2, 3), np.uint8))
    np.testing.assert_array_equal(decode(float("nan"), (2, 3)), np.zeros((2, 3), np.uint8))
    # first and last pixel only
    m = np.zeros((2, 3), np.uint8)
    m[0, 0] = m[1, 2] = 1
    assert encode(m) == "1 1 6 1"
    np.testing.assert_array_equal(decode("1 1 6 1", (2, 3)), m)


def test_nonzero_values_count_as_foreground_and_decode_dtype():
    m = np.array([[0, 255], [7, 0]], np.uint16)
    assert encode(m) == "2 2"
    out = decode("2 2", (2, 2))
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    assert decode("1 1", (2, 2), order="F").flags.c_contiguous


def test_run_ending_on_the_last_pixel_is_valid():
    m = decode("1 1 10 3", (3, 4))
    assert m.sum() == 4 and m[2, 1:].all() and m[0, 0] == 1


def test_adjacent_runs_are_accepted():
    # "1 2 3 1" is not what encode writes, but touches without overlapping: 3 pixels on
    np.testing.assert_array_equal(decode("1 2 3 1", (1, 4)), [[1, 1, 1, 0]])


def test_whitespace_tolerated():
    np.testing.assert_array_equal(decode("  2 2   8 2 \n", (3, 4)), M34)


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=23), elements=st.integers(0, 1)),
    st.sampled_from(["C", "F"]),
)
def test_round_trip(mask, order):
    s = encode(mask, order)
    back = decode(s, mask.shape, order)
    np.testing.assert_array_equal(back, mask)
    # canonical form: runs are maximal and separated, so re-encoding is stable
    starts, lengths = parse(s, mask.size)
    assert np.all(starts[1:] > starts[:-1] + lengths[:-1])
    assert validate(s, mask.size) == int(mask.sum())


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint8, (6, 9), elements=st.integers(0, 1)))
def test_orders_differ_exactly_by_transpose(mask):
    assert encode(mask, "F") == encode(mask.T, "C")


@pytest.mark.parametrize(
    "rle, match",
    [
        ("1 2 x 3", r"token 3 \('x'\) is not a non-negative integer \(run 2\)"),
        ("1 2 3.5 1", r"token 3 \('3.5'\) is not a non-negative integer"),
        ("1 -2", r"token 2 \('-2'\) is not a non-negative integer \(run 1\)"),
        ("1 2 5", r"odd number of values \(3\): the last start \(5\) has no length"),
        ("0 2", r"run 1: start 0 must be >= 1"),
        ("1 2 4 0", r"run 2 \(start 4\): length 0 must be >= 1"),
        ("5 1 3 1", r"run 2: start 3 is not after run 1's start 5 \(starts must be strictly increasing\)"),
        ("5 1 5 1", r"run 2: start 5 is not after run 1's start 5"),
        ("1 5 3 2", r"run 2 \(start 3\) overlaps run 1 \(start 1, length 5, last pixel 5\)"),
        ("1 1 11 3", r"run 2 \(start 11, length 3\) ends at pixel 13, past the image end \(12 pixels\)"),
    ],
)
def test_malformed(rle, match):
    with pytest.raises(MedsegError, match=match):
        decode(rle, (3, 4))


def test_error_names_source_file_and_row(tmp_path):
    where = tmp_path / "train.csv"
    with pytest.raises(MedsegError, match=r"bad RLE for id case1_day0_slice_0001, class stomach: odd number") as e:
        decode("1 2 3", (4, 4), where=where, row="id case1_day0_slice_0001, class stomach")
    assert e.value.path == str(where)
    assert str(e.value).startswith(f"{where}: ")


def test_validate_without_size_skips_only_the_end_check():
    assert validate("1 1 1000 5") == 6
    with pytest.raises(MedsegError, match="overlaps"):
        validate("1 5 2 1")


def test_bad_order():
    with pytest.raises(MedsegError, match="order must be 'C'"):
        encode(M34, order="X")
