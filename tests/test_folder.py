import numpy as np
import pytest
from PIL import Image

from conftest import shared
from medseg.data.formats import get_reader
from medseg.data.formats.palette import map_palette, parse_palette
from medseg.errors import MedsegError

UW_PALETTE = "stomach=255,0,0;large_bowel=0,255,0;small_bowel=255,255,0"


def _save(path, a):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _gray(rng, h=6, w=5):
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def _load_all(reader, spec):
    return {c.id: reader.load(spec, c) for c in spec.cases}


def test_binary_masks(tmp_path):
    rng = np.random.default_rng(0)
    masks = {}
    for stem, ext in [("a", ".png"), ("b", ".bmp")]:  # a mask may have another extension
        _save(tmp_path / "images" / f"{stem}.png", _gray(rng))
        m = (rng.random((6, 5)) > 0.5).astype(np.uint8)
        masks[stem] = m
        _save(tmp_path / "masks" / f"{stem}{ext}", m * 255)
    reader = get_reader("folder")
    spec = reader.scan(tmp_path)
    assert spec.classes == ["foreground"] and spec.class_kind == "multiclass" and spec.channels == ["gray"]
    assert [c.id for c in spec.cases] == ["a", "b"] and [c.patient for c in spec.cases] == ["a", "b"]
    data = _load_all(reader, spec)
    for stem, m in masks.items():
        d = data[stem]
        d.check(stem)
        assert d.image.shape == (1, 1, 6, 5) and d.image.dtype == np.uint8
        np.testing.assert_array_equal(d.image[0, 0], np.asarray(Image.open(tmp_path / "images" / f"{stem}.png")))
        np.testing.assert_array_equal(d.mask[0, 0], m)
        assert d.slices == [stem]
    # a class name for the single class
    assert get_reader("folder", classes=["tumor"]).scan(tmp_path).classes == ["tumor"]


def test_grey_binary_mask_is_an_error_unless_a_threshold_is_given(tmp_path):
    _save(tmp_path / "images" / "a.png", np.zeros((1, 4), np.uint8))
    _save(tmp_path / "masks" / "a.png", np.array([[0, 100, 128, 255]], np.uint8))
    reader = get_reader("folder")
    spec = reader.scan(tmp_path)
    assert spec.meta["mask_mode"] == "binary"
    with pytest.raises(MedsegError, match=r"masks/a.png: a binary mask must hold \{0, 255\} or \{0, 1\}; "
                                          r"found values \{0, 100, 128, 255\}.*mask_threshold"):
        reader.load(spec, spec.cases[0])
    reader = get_reader("folder", mask_threshold="127")
    spec = reader.scan(tmp_path)
    np.testing.assert_array_equal(reader.load(spec, spec.cases[0]).mask[0, 0], [[0, 0, 1, 1]])


def test_binary_masks_stored_as_0_1_and_0_255_read_alike(tmp_path):
    for stem, scale in (("a", 1), ("b", 255)):
        _save(tmp_path / "images" / f"{stem}.png", np.zeros((1, 4), np.uint8))
        _save(tmp_path / "masks" / f"{stem}.png", np.array([[0, 1, 1, 0]], np.uint8) * scale)
    reader = get_reader("folder", mask_mode="binary")
    spec = reader.scan(tmp_path)
    for case in spec.cases:
        np.testing.assert_array_equal(reader.load(spec, case).mask[0, 0], [[0, 1, 1, 0]])


def test_label_masks(tmp_path):
    rng = np.random.default_rng(1)
    labels = {"x1": np.array([[0, 1, 2], [3, 0, 1]], np.uint8), "x2": np.array([[0, 0, 0], [0, 2, 0]], np.uint8)}
    for stem, lab in labels.items():
        _save(tmp_path / "images" / f"{stem}.png", _gray(rng, 2, 3))
        _save(tmp_path / "masks" / f"{stem}.png", lab)
    reader = get_reader("folder")
    spec = reader.scan(tmp_path)
    assert spec.meta["mask_mode"] == "labels" and spec.classes == ["class1", "class2", "class3"]
    d = reader.load(spec, spec.cases[0])
    assert d.mask.shape == (1, 3, 2, 3)
    np.testing.assert_array_equal(d.mask[0, 0], [[0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(d.mask[0, 1], [[0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(d.mask[0, 2], [[0, 0, 0], [1, 0, 0]])
    named = get_reader("folder", classes=["liver", "kidney", "spleen"])
    assert named.scan(tmp_path).classes == ["liver", "kidney", "spleen"]
    # the CLI form: -o classes=liver,kidney,spleen
    assert get_reader("folder", classes="liver, kidney,spleen").scan(tmp_path).classes == ["liver", "kidney", "spleen"]
    with pytest.raises(MedsegError, match=r"masks hold labels up to 3 but only 1 class given \(liver\)"):
        get_reader("folder", classes=["liver"]).scan(tmp_path)
    with pytest.raises(MedsegError, match=r"mask_mode=binary has one class, got classes \['a', 'b'\]"):
        get_reader("folder", mask_mode="binary", classes=["a", "b"]).scan(tmp_path)
    # more labels in a mask than classes given
    two = get_reader("folder", mask_mode="labels", classes=["liver", "kidney"])
    spec2 = two.scan(tmp_path)
    with pytest.raises(MedsegError, match=r"x1.png: label values \[3\] in a mask but only labels 0..2 are declared \(liver, kidney\)") as e:
        two.load(spec2, spec2.cases[0])
    assert e.value.path.endswith("x1.png")


def test_palette_parse_and_nearest_colour():
    pal = parse_palette(UW_PALETTE)
    assert pal == [("stomach", (255, 0, 0)), ("large_bowel", (0, 255, 0)), ("small_bowel", (255, 255, 0))]
    px = np.array(
        [[[255, 0, 0], [200, 10, 0], [40, 0, 0], [0, 180, 0]],
         [[250, 250, 5], [128, 128, 0], [0, 0, 0], [100, 0, 0]]],
        np.uint8,
    )
    # (128,128,0): distance^2 to yellow 2*127^2=32258 < to black 2*128^2=32768 < to red/green 32513
    # (100,0,0): to black 10000 < to red 155^2=24025
    np.testing.assert_array_equal(map_palette(px, [c for _, c in pal]), [[1, 1, 0, 2], [3, 3, 0, 0]])


@pytest.mark.parametrize(
    "text, match",
    [
        ("stomach=255,0", r"bad palette entry 'stomach=255,0': expected name=R,G,B"),
        ("stomach", r"expected name=R,G,B"),
        ("a=1,2,300", r"colour values must be 0..255"),
        ("a=0,0,0", r"\(0,0,0\) is the background"),
        ("a=1,2,3;a=4,5,6", r"name or colour used twice"),
        ("  ;  ", r"empty palette"),
    ],
)
def test_bad_palette(text, match):
    with pytest.raises(MedsegError, match=match):
        parse_palette(text)


def test_palette_masks_with_blurred_edges(tmp_path):
    img = np.stack([np.arange(8, dtype=np.uint8)] * 3, -1)[None].repeat(2, 0)  # grey stored as RGB
    mask = np.zeros((2, 8, 3), np.uint8)
    mask[0, 0] = (255, 0, 0)
    mask[0, 1] = (190, 5, 0)  # blurred red -> stomach
    mask[0, 2] = (60, 0, 0)  # faint red -> background
    mask[0, 3] = (0, 255, 0)
    mask[1, 4] = (255, 255, 0)
    mask[1, 5] = (230, 220, 10)  # blurred yellow -> small bowel
    mask[1, 6] = (130, 130, 0)  # d^2: yellow 31250 < red = green 32525 < black 33800
    _save(tmp_path / "images" / "s.png", img)
    _save(tmp_path / "masks" / "s.png", mask)
    reader = get_reader("folder", palette=UW_PALETTE)
    spec = reader.scan(tmp_path)
    assert spec.classes == ["stomach", "large_bowel", "small_bowel"] and spec.class_kind == "multiclass"
    assert spec.channels == ["gray"]  # grey saved as RGB is one channel
    d = reader.load(spec, spec.cases[0])
    assert d.image.shape == (1, 1, 2, 8)
    np.testing.assert_array_equal(d.mask[0, 0], [[1, 1, 0, 0, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(d.mask[0, 1], [[0, 0, 0, 1, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(d.mask[0, 2], [[0] * 8, [0, 0, 0, 0, 1, 1, 1, 0]])
    # without a palette, colour masks are refused with a hint
    with pytest.raises(MedsegError, match=r"colour mask: give a palette") as e:
        get_reader("folder").scan(tmp_path)
    assert e.value.path.endswith("s.png")
    with pytest.raises(MedsegError, match=r"mask_mode=palette needs a palette option"):
        get_reader("folder", mask_mode="palette").scan(tmp_path)


def test_rgb_images_and_channels_option(tmp_path):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    _save(tmp_path / "images" / "c.jpg", np.zeros((4, 5, 3), np.uint8))
    _save(tmp_path / "images" / "d.png", img)
    for s in "cd":
        _save(tmp_path / "masks" / f"{s}.png", np.zeros((4, 5), np.uint8))
    reader = get_reader("folder", channels="rgb")
    spec = reader.scan(tmp_path)
    assert spec.channels == ["R", "G", "B"]
    d = reader.load(spec, spec.cases[1])
    np.testing.assert_array_equal(d.image[0], img.transpose(2, 0, 1))
    gray = get_reader("folder", channels="gray")
    spec = gray.scan(tmp_path)
    d = gray.load(spec, spec.cases[1])
    expect = np.round(img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114).astype(np.uint8)
    np.testing.assert_array_equal(d.image[0, 0], expect)


def test_case_and_patient_regex(tmp_path):
    rng = np.random.default_rng(3)
    stems = ["case1_day0_slice_0010", "case1_day0_slice_0002", "case1_day3_slice_0001", "case7_day0_slice_0005"]
    for s in stems:
        _save(tmp_path / "images" / f"{s}.png", _gray(rng))
        _save(tmp_path / "masks" / f"{s}.png", (rng.random((6, 5)) > 0.5).astype(np.uint8) * 255)
    reader = get_reader("folder", case_regex=r"^(case\d+_day\d+)_slice", patient_regex=r"^(case\d+)")
    spec = reader.scan(tmp_path)
    assert [(c.id, c.patient) for c in spec.cases] == [("case1_day0", "case1"), ("case1_day3", "case1"), ("case7_day0", "case7")]
    d = reader.load(spec, spec.cases[0])
    assert d.slices == ["case1_day0_slice_0002", "case1_day0_slice_0010"] and d.image.shape == (2, 1, 6, 5)
    np.testing.assert_array_equal(d.image[1, 0], np.asarray(Image.open(tmp_path / "images" / "case1_day0_slice_0010.png")))
    with pytest.raises(MedsegError, match=r"file stem does not match case_regex '\^\(x\)'"):
        get_reader("folder", case_regex=r"^(x)").scan(tmp_path)
    with pytest.raises(MedsegError, match=r"bad option case_regex='\^case': needs a \(group\)"):
        get_reader("folder", case_regex=r"^case").scan(tmp_path)
    with pytest.raises(MedsegError, match=r"bad option patient_regex='\(': "):
        get_reader("folder", patient_regex="(").scan(tmp_path)
    # slices of one case must share a size
    _save(tmp_path / "images" / "case1_day0_slice_0010.png", np.zeros((7, 5), np.uint8))
    _save(tmp_path / "masks" / "case1_day0_slice_0010.png", np.zeros((7, 5), np.uint8))
    spec = reader.scan(tmp_path)
    with pytest.raises(MedsegError, match=r"image size \(7, 5\) differs from the case's \(6, 5\)"):
        reader.load(spec, spec.cases[0])


def _pair(tmp_path, stem="a", shape=(6, 5), mshape=None):
    _save(tmp_path / "images" / f"{stem}.png", np.zeros(shape, np.uint8))
    _save(tmp_path / "masks" / f"{stem}.png", np.zeros(mshape or shape, np.uint8))


def test_pairing_errors(tmp_path):
    _pair(tmp_path)
    _save(tmp_path / "images" / "b.png", np.zeros((6, 5), np.uint8))
    with pytest.raises(MedsegError, match=r"image without a mask \(no masks/b\.\*\)") as e:
        get_reader("folder").scan(tmp_path)
    assert e.value.path.endswith("images/b.png")
    assert len(get_reader("folder").scan(tmp_path, require_masks=False).cases) == 2
    (tmp_path / "images" / "b.png").unlink()
    _save(tmp_path / "masks" / "c.png", np.zeros((6, 5), np.uint8))
    with pytest.raises(MedsegError, match=r"mask without an image \(no images/c\.\*\)") as e:
        get_reader("folder").scan(tmp_path)
    assert e.value.path.endswith("masks/c.png")
    (tmp_path / "masks" / "c.png").unlink()
    _save(tmp_path / "images" / "a.jpg", np.zeros((6, 5), np.uint8))
    with pytest.raises(MedsegError, match=r"two files with the stem 'a'"):
        get_reader("folder").scan(tmp_path)


def test_size_mismatch_and_unreadable(tmp_path):
    _pair(tmp_path, "a", (6, 5), (6, 4))
    reader = get_reader("folder", classes=["organ"])
    spec = reader.scan(tmp_path)
    with pytest.raises(MedsegError, match=r"mask size \(6, 4\) differs from its image's \(6, 5\)") as e:
        reader.load(spec, spec.cases[0])
    assert e.value.path.endswith("masks/a.png")
    _pair(tmp_path, "a")
    (tmp_path / "images" / "a.png").write_bytes(b"garbage")
    with pytest.raises(MedsegError, match=r"cannot read image") as e:
        reader.scan(tmp_path)  # scan reads the first image to tell grey from colour
    assert e.value.path.endswith("images/a.png")


def test_missing_folders(tmp_path):
    with pytest.raises(MedsegError, match=r"no images/ folder"):
        get_reader("folder").scan(tmp_path)
    _save(tmp_path / "images" / "a.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(MedsegError, match=r"no masks/ folder \(use --images-only"):
        get_reader("folder").scan(tmp_path)


@pytest.mark.parametrize("kind", ["binary", "labels", "palette"])
def test_write_prediction_round_trip(tmp_path, kind):
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    opts = {}
    for s in ["p1", "p2"]:
        _save(src / "images" / f"{s}.png", _gray(rng))
        lab = rng.integers(0, 2 if kind == "binary" else 4, (6, 5)).astype(np.uint8)
        if kind == "palette":
            lut = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0), (255, 255, 0)], np.uint8)
            _save(src / "masks" / f"{s}.png", lut[lab])
            opts = {"palette": UW_PALETTE}
        else:
            _save(src / "masks" / f"{s}.png", lab * (255 if kind == "binary" else 1))
    reader = get_reader("folder", **opts)
    spec = reader.scan(src)
    out = tmp_path / "out"
    for case in spec.cases:
        d = reader.load(spec, case)
        files = reader.write_prediction(spec, case, d.mask, out)
        assert files == [out / "masks" / f"{case.id}.png"]
        written = np.asarray(Image.open(files[0]))
        orig = np.asarray(Image.open(src / "masks" / f"{case.id}.png"))
        np.testing.assert_array_equal(written, orig)  # 0/255, label values or palette colours


@pytest.mark.realdata
def test_real_uwmgi_derived_sample():
    root = shared("uwmgi-derived-sample")
    reader = get_reader("folder", palette=UW_PALETTE, case_regex=r"^(case\d+_day\d+)_slice", patient_regex=r"^(case\d+)")
    spec = reader.scan(root)
    assert spec.channels == ["gray"] and spec.classes == ["stomach", "large_bowel", "small_bowel"]
    n_slices, per_class = 0, np.zeros(3, int)
    for case in spec.cases:
        d = reader.load(spec, case)
        d.check(case.id)
        assert d.image.shape[1:] == (1, 512, 512) and d.image.dtype == np.uint8
        n_slices += d.image.shape[0]
        per_class += (d.mask.reshape(d.mask.shape[0], 3, -1).sum(-1) > 0).sum(0)
        assert d.mask.sum(1).max() <= 1  # colour-coded: one class per pixel
    assert n_slices == 36
    assert len({c.patient for c in spec.cases}) > 5
    assert (per_class > 3).all(), per_class  # every organ appears on several slices


def test_flat_folder_and_single_file_without_masks(tmp_path):
    """Images to segment may lie straight in ROOT/ (no images/) or be one file; predictions mirror that."""
    rng = np.random.default_rng(5)
    a, b = _gray(rng, 6, 5), _gray(rng, 4, 7)
    _save(tmp_path / "flat" / "img2.png", a)
    _save(tmp_path / "flat" / "img10.bmp", b)
    _save(tmp_path / "flat" / "sub" / "ignored.png", a)  # subfolders are not read
    reader = get_reader("folder")
    spec = reader.scan(tmp_path / "flat", require_masks=False)
    assert [c.id for c in spec.cases] == ["img2", "img10"] and spec.meta["layout"] == "flat"
    data = _load_all(reader, spec)
    np.testing.assert_array_equal(data["img10"].image, b[None, None])
    with pytest.raises(MedsegError, match=r"no images/ folder"):  # training data keeps images/ + masks/
        reader.scan(tmp_path / "flat")
    mask = np.zeros((1, 1, 4, 7), np.uint8)
    mask[0, 0, 1:3, 2:5] = 1
    out = tmp_path / "out"
    files = reader.write_prediction(spec, spec.cases[1], mask, out)
    assert files == [out / "img10.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(files[0])), mask[0, 0] * 255)
    # one file
    one = reader.scan(tmp_path / "flat" / "img2.png", require_masks=False)
    assert [c.id for c in one.cases] == ["img2"] and one.meta["layout"] == "file"
    np.testing.assert_array_equal(reader.load(one, one.cases[0]).image, a[None, None])
    with pytest.raises(MedsegError, match="not a folder"):
        reader.scan(tmp_path / "flat" / "img2.png")  # with masks: a dataset folder is needed
    # the images/ layout wins when both exist, and still writes OUT/masks/
    _save(tmp_path / "flat" / "images" / "x.png", a)
    spec = reader.scan(tmp_path / "flat", require_masks=False)
    assert [c.id for c in spec.cases] == ["x"] and spec.meta["layout"] == "images"
    assert reader.write_prediction(spec, spec.cases[0], np.zeros((1, 1, 6, 5), np.uint8), out) == [out / "masks" / "x.png"]


def test_a_palette_truth_reads_predictions_written_as_label_maps(tmp_path):
    """`medseg predict` on images/ alone does not know the truth's palette and writes label maps (0..K);
    evaluating them against the colour-coded truth reads them as such (values beyond K refused)."""
    mask = np.zeros((8, 8, 3), np.uint8)
    mask[1:3, 1:3] = (255, 0, 0)
    mask[5:7, 5:7] = (255, 255, 0)
    _save(tmp_path / "images" / "s.png", _gray(np.random.default_rng(0), 8, 8))
    _save(tmp_path / "masks" / "s.png", mask)
    reader = get_reader("folder", palette=UW_PALETTE)
    spec = reader.scan(tmp_path)
    truth = reader.load(spec, spec.cases[0]).mask
    labels = np.zeros((8, 8), np.uint8)
    labels[1:3, 1:3], labels[5:7, 5:7] = 1, 3
    _save(tmp_path / "pred" / "s.png", labels)
    np.testing.assert_array_equal(reader.read_prediction(tmp_path / "pred", spec, spec.cases[0], truth.shape), truth)
    labels[0, 0] = 7
    _save(tmp_path / "pred" / "s.png", labels)
    with pytest.raises(MedsegError, match="label 7 in a prediction but only 3 classes"):
        reader.read_prediction(tmp_path / "pred", spec, spec.cases[0], truth.shape)
