"""Post-processing on crafted masks with hand-counted components."""
from __future__ import annotations

import numpy as np
import pytest

from medseg.inference.postprocess import largest_component, merge_config, postprocess, remove_small, thresholds_for


def _crafted() -> np.ndarray:
    """One 8x10 slice: a 3x3 blob (9 px), a 2x2 blob (4 px), a single pixel, a diagonal pair (2 x 1 px)."""
    m = np.zeros((8, 10), np.uint8)
    m[1:4, 1:4] = 1  # 9
    m[5:7, 6:8] = 1  # 4
    m[0, 9] = 1  # 1
    m[6, 1] = 1
    m[7, 2] = 1  # diagonal: two 1-px components under 4-connectivity
    return m


def test_remove_small_counts_pixels_with_4_connectivity():
    m = _crafted()
    out = remove_small(m.copy(), 4)
    expected = np.zeros_like(m)
    expected[1:4, 1:4] = 1
    expected[5:7, 6:8] = 1
    np.testing.assert_array_equal(out, expected)
    out5 = remove_small(m.copy(), 5)
    assert out5.sum() == 9
    np.testing.assert_array_equal(remove_small(m.copy(), 1), m)  # 1: nothing is smaller


def test_largest_component():
    m = _crafted()
    out = largest_component(m.copy())
    assert out.sum() == 9 and out[1:4, 1:4].all()
    empty = np.zeros((4, 4), np.uint8)
    np.testing.assert_array_equal(largest_component(empty), empty)


def test_postprocess_2d_is_per_slice():
    mask = np.zeros((2, 1, 8, 10), np.uint8)
    mask[0, 0] = _crafted()
    mask[1, 0, 0, 0] = 1  # slice 1 holds only a single pixel: it is that slice's largest component
    out = postprocess(mask.copy(), None, {"largest_cc": True}, spatial_dims=2)
    assert out[0, 0].sum() == 9
    assert out[1, 0].sum() == 1 and out[1, 0, 0, 0] == 1


def test_postprocess_3d_connects_across_slices():
    mask = np.zeros((3, 1, 6, 6), np.uint8)
    mask[0:3, 0, 1:3, 1:3] = 1  # a 3x2x2 column: 12 voxels in 3D, 4 pixels per slice
    mask[1, 0, 5, 5] = 1  # a lone voxel
    out3 = postprocess(mask.copy(), None, {"min_size": 5}, spatial_dims=3)
    assert out3.sum() == 12 and out3[1, 0, 5, 5] == 0
    out2 = postprocess(mask.copy(), None, {"min_size": 5}, spatial_dims=2)
    assert out2.sum() == 0  # per slice the column is only 4 pixels
    lcc3 = postprocess(mask.copy(), None, {"largest_cc": True}, spatial_dims=3)
    assert lcc3.sum() == 12
    lcc2 = postprocess(mask.copy(), None, {"largest_cc": True}, spatial_dims=2)
    assert lcc2.sum() == 12  # slice 1 keeps its 4-px square over the 1-px voxel


def test_components_volume_joins_a_2d_models_slices():
    mask = np.zeros((2, 1, 8, 8), np.uint8)
    mask[0, 0, 0:2, 0:2] = 1  # A: 4 px, alone on slice 0
    mask[0, 0, 5:7, 5] = 1  # B: 2 px on slice 0 ...
    mask[1, 0, 5:8, 5:8] = 1  # ... under a 9-px blob on slice 1: one 11-voxel object in 3D
    per_slice = postprocess(mask.copy(), None, {"largest_cc": True}, spatial_dims=2)
    assert per_slice[0, 0, 0, 0] == 1 and per_slice[0, 0, 5, 5] == 0  # slice 0 keeps A
    joined = postprocess(mask.copy(), None, {"largest_cc": True, "components": "volume"}, spatial_dims=2)
    assert joined[0, 0, 0:2, 0:2].sum() == 0 and joined.sum() == 11  # the 3D object wins, A goes
    small = postprocess(mask.copy(), None, {"min_size": 5, "components": "volume"}, spatial_dims=2)
    assert small.sum() == 11  # A (4) goes; B survives as part of an 11-voxel object, not as 2 px
    # "slice" forces per-slice components on volume data
    forced = postprocess(mask.copy(), None, {"largest_cc": True, "components": "slice"}, spatial_dims=3)
    np.testing.assert_array_equal(forced, per_slice)


def test_components_value_is_checked():
    from medseg.errors import MedsegError
    from medseg.inference.postprocess import check_config

    with pytest.raises(MedsegError, match="components must be one of slice, volume, got 'volumes'"):
        check_config({"components": "volumes"}, ["tumor"])
    with pytest.raises(Exception, match="components"):
        _cfg(postprocess={"components": "3d"})


def test_presence_threshold_per_slice_and_per_volume():
    mask = np.ones((3, 2, 2, 2), np.uint8)
    slice_max = np.array([[0.9, 0.2], [0.4, 0.6], [0.7, 0.3]], np.float32)
    out2 = postprocess(mask.copy(), slice_max, {"presence": [0.5, 0.5]}, spatial_dims=2)
    np.testing.assert_array_equal(out2[:, 0, 0, 0], [1, 0, 1])
    np.testing.assert_array_equal(out2[:, 1, 0, 0], [0, 1, 0])
    # 3D: the volume's max per class decides: class 0 max 0.9 stays, class 1 max 0.6 < 0.65 goes
    out3 = postprocess(mask.copy(), slice_max, {"presence": [0.5, 0.65]}, spatial_dims=3)
    assert out3[:, 0].all() and not out3[:, 1].any()
    # a scalar applies to every class; None disables
    assert postprocess(mask.copy(), slice_max, {"presence": 0.95}, 3).sum() == 0
    assert postprocess(mask.copy(), slice_max, {"presence": None}, 3).sum() == mask.sum()


def test_rules_apply_in_order_presence_min_size_largest():
    mask = np.zeros((1, 1, 8, 10), np.uint8)
    mask[0, 0] = _crafted()
    out = postprocess(mask.copy(), np.array([[0.8]]), {"presence": 0.5, "min_size": 2, "largest_cc": True}, 2)
    assert out.sum() == 9
    out = postprocess(mask.copy(), np.array([[0.3]]), {"presence": 0.5, "min_size": 2, "largest_cc": True}, 2)
    assert out.sum() == 0


def test_merge_config_and_thresholds():
    cfg = merge_config({"min_size": 10, "thresholds": [0.4, 0.6]}, {"min_size": None, "largest_cc": True})
    assert cfg["min_size"] == 10 and cfg["largest_cc"] is True and cfg["presence"] is None
    assert thresholds_for(cfg, 2) == [0.4, 0.6]
    assert thresholds_for({"thresholds": None}, 3) == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="expected 3 per-class values, got 2"):
        thresholds_for(cfg, 3)


def test_check_config_per_class_lengths():
    from medseg.errors import MedsegError
    from medseg.inference.postprocess import check_config

    check_config({"thresholds": [0.5, 0.4], "presence": 0.3}, ["a", "b"])  # scalars fit any class count
    with pytest.raises(MedsegError) as e:
        check_config({"presence": [0.5, 0.4]}, ["a", "b", "c"], where="m.pt")
    assert e.value.problem == ("2 presence values for 3 classes (a, b, c): give one number for every class, "
                               "or one per class")
    assert e.value.path == "m.pt"


def _cfg(**sections):
    from medseg.config import parse_config

    return parse_config({"data": {"prepared": "p"}, "model": {"name": "unet"}, **sections})


def test_config_postprocess_presence_and_inference_section():
    from medseg.errors import MedsegError

    cfg = _cfg()
    assert cfg.postprocess.presence is None and cfg.inference.tta is False and cfg.inference.tta_flips is None
    cfg = _cfg(postprocess={"presence": 0.4, "thresholds": [0.5, 0.6]},
               inference={"tta": True, "tta_flips": [[-1], [-1, -2]], "overlap": 0.25})
    assert cfg.postprocess.presence == 0.4 and cfg.inference.tta_flips == [[-1], [-1, -2]]
    assert _cfg(postprocess={"presence": [0.4, 0.5]}).postprocess.presence == [0.4, 0.5]
    for sections, msg in [
        ({"postprocess": {"presence": 1.5}}, "postprocess.presence: Value error, probabilities must be in [0, 1]"),
        ({"postprocess": {"thresholds": []}}, "give one value per class"),
        ({"postprocess": {"min_size": -1}}, "postprocess.min_size: Input should be greater than or equal to 0"),
        ({"inference": {"tta_flips": [[1]]}}, "bad flip group [1]: axes -1 (width), -2 (height), -3 (depth), each once"),
        ({"inference": {"tta_flips": []}}, "give at least one flip group"),
        ({"inference": {"tta": True, "flips": [[-1]]}}, "unknown key 'inference.flips'"),
        ({"inference": {"tta_flips": [[-3]]}}, "axis -3 (depth) is for 3D models only"),
    ]:
        with pytest.raises(MedsegError) as e:
            _cfg(**sections)
        assert msg in e.value.problem, (sections, e.value.problem)
    # depth flips are fine for a 3D model
    from medseg.config import parse_config

    cfg3 = parse_config({"data": {"prepared": "p", "mode": "3d", "size": [8, 16, 16]}, "model": {"name": "unet"},
                         "inference": {"tta_flips": [[-3], [-1]]}})
    assert cfg3.inference.tta_flips == [[-3], [-1]]
