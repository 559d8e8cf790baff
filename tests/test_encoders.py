"""extract/encoders.py pieces that need no trained model: the split-zip model folder (MPNet-base), image
preprocessing, the text encoder's limits (the packaged MiniLM's shape, random weights)."""

import json
import zipfile

import numpy as np
import pytest
import torch

from core.errors import UserError
from extract.encoders import create_image_encoder, create_text_encoder, join_split_zip


def split_zip(tmp_path, files: dict[str, bytes], parts: int) -> list:
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    raw = archive.read_bytes()
    step = -(-len(raw) // parts)
    pieces = []
    for k in range(parts):
        piece = tmp_path / "parts" / f"model.zip.{k + 1:03d}"
        piece.parent.mkdir(exist_ok=True)
        piece.write_bytes(raw[k * step : (k + 1) * step])
        pieces.append(piece)
    return pieces


def test_split_zip_is_joined_in_suffix_order_and_unpacked(tmp_path):
    files = {"mpnet/config.json": b'{"hidden_size": 8}', "mpnet/model.safetensors": bytes(range(256)) * 50}
    pieces = split_zip(tmp_path, files, 3)
    target = tmp_path / "cache" / "mpnet"
    join_split_zip(list(reversed(pieces)), target)  # the order packages are found in does not matter
    assert (target / "config.json").read_bytes() == files["mpnet/config.json"]
    assert (target / "model.safetensors").read_bytes() == files["mpnet/model.safetensors"]
    assert not list(target.parent.glob("*.tmp*"))


def test_split_zip_without_the_model_folder_is_a_user_error(tmp_path):
    pieces = split_zip(tmp_path, {"other/config.json": b"{}"}, 2)
    with pytest.raises(UserError, match="no model folder named mpnet"):
        join_split_zip(pieces, tmp_path / "cache" / "mpnet")


@pytest.mark.parametrize("layers, max_length, refused", [
    (7, 202, r"--cache-text-layers 7: minilm has 6 layers; pick 1\.\.6"),
    (4, 513, r"--max-length 513: minilm reads at most 512 tokens; pick 2\.\.512"),  # past its position embeddings
    (6, 512, None),
])
def test_text_settings_beyond_the_model_are_refused(layers, max_length, refused):
    if refused:
        with pytest.raises(UserError, match=refused):
            create_text_encoder("minilm", layers, max_length, random_weights=True)
    else:
        enc = create_text_encoder("minilm", layers, max_length, random_weights=True)
        assert [len(ids) for ids in enc.tokenize(["word " * 600])] == [512]


def test_unknown_image_encoder_names_the_choices():
    with pytest.raises(UserError, match=r"unknown image encoder 'nonet'.*efficientnet-lite0.*resnet50"):
        create_image_encoder("nonet")


def test_image_preprocessing_is_resize_short_side_then_center_crop(tmp_path):
    """Official code / torchvision eval: Resize(256) + CenterCrop(224), not a squash to 224x224."""
    from PIL import Image

    from extract.encoders import IMAGENET, ImageEncoder

    wide = np.zeros((224, 896, 3), np.uint8)
    wide[:, :, 1] = 255  # green edges ...
    wide[:, 300:596] = (255, 0, 0)  # ... and a red middle, the only part a center crop keeps
    Image.fromarray(wide).save(tmp_path / "wide.png")
    enc = ImageEncoder("t", torch.nn.Identity(), 224, *IMAGENET, "x")
    x = enc.load(tmp_path / "wide.png")
    assert x.shape == (3, 224, 224)
    rgb = x * np.array(IMAGENET[1]).reshape(3, 1, 1) + np.array(IMAGENET[0]).reshape(3, 1, 1)
    assert rgb[0].min() > 0.95 and rgb[1].max() < 0.05  # red everywhere: no green edge survived
    assert json.loads(enc.preprocessing)["resize_short_side"] == 256
    assert json.loads(enc.preprocessing)["center_crop"] == 224


def _pixels(tmp_path, im, name):
    """What the image encoder reads from `im` saved as `name`: (3, 224, 224) floats in [0, 1]."""
    from extract.encoders import IMAGENET, ImageEncoder

    im.save(tmp_path / name)
    enc = ImageEncoder("t", torch.nn.Identity(), 224, *IMAGENET, "x")
    x = enc.load(tmp_path / name)
    return x * np.array(IMAGENET[1]).reshape(3, 1, 1) + np.array(IMAGENET[0]).reshape(3, 1, 1)


def _two_halves(mode, left, right, size=(448, 224)):
    from PIL import Image

    im = Image.new(mode, size, left)
    im.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return im


@pytest.mark.parametrize("mode, file, left, right, want_left, want_right", [
    ("RGBA", "a.png", (10, 20, 30, 0), (10, 20, 30, 255), (255, 255, 255), (10, 20, 30)),  # transparent: white page
    ("LA", "a.png", (50, 0), (50, 255), (255, 255, 255), (50, 50, 50)),
    ("I;16", "a.png", 65535, 257 * 100, (255, 255, 255), (100, 100, 100)),  # PIL alone: both white
    ("I", "a.tif", 40000, 257 * 60, (156, 156, 156), (60, 60, 60)),  # 16-bit values in a 32-bit image
    ("I", "b.tif", 200, 10, (200, 200, 200), (10, 10, 10)),  # 8-bit values in a 32-bit image
    ("F", "a.tif", 1.0, 0.5, (255, 255, 255), (128, 128, 128)),  # PIL alone: 1 and 0 (black)
    ("CMYK", "a.tif", (0, 0, 0, 0), (255, 0, 0, 0), (255, 255, 255), (0, 255, 255)),
    ("CMYK", "a.jpg", (0, 0, 0, 0), (0, 0, 0, 255), (255, 255, 255), (0, 0, 0)),
    ("1", "a.png", 1, 0, (255, 255, 255), (0, 0, 0)),
    ("L", "a.png", 77, 200, (77, 77, 77), (200, 200, 200)),
])
def test_images_of_any_mode_and_bit_depth_become_the_right_rgb(tmp_path, mode, file, left, right, want_left, want_right):
    rgb = _pixels(tmp_path, _two_halves(mode, left, right), file) * 255
    # the center crop keeps 56 columns of each half around the middle
    for got, want in ((rgb[:, :, 20], want_left), (rgb[:, :, -20], want_right)):
        np.testing.assert_allclose(got.reshape(3, -1).mean(axis=1), want, atol=2.5 if file.endswith("jpg") else 0.51)


def test_a_palette_image_with_a_transparent_index_is_laid_on_white(tmp_path):
    from PIL import Image

    im = Image.new("P", (448, 224), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red (transparent), 1 blue
    im.paste(1, (224, 0, 448, 224))
    im.info["transparency"] = 0
    rgb = _pixels(tmp_path, im, "p.png") * 255
    np.testing.assert_allclose(rgb[:, :, 20].reshape(3, -1).mean(axis=1), (255, 255, 255), atol=0.51)
    np.testing.assert_allclose(rgb[:, :, -20].reshape(3, -1).mean(axis=1), (0, 0, 255), atol=0.51)


def test_rgb_images_give_the_same_pixels_as_before(data_root):
    """The shipped data sets hold RGB JPEGs only: their features must not move."""
    from PIL import Image

    from extract.encoders import to_rgb

    for path in sorted((data_root / "mvsa_single" / "images").glob("*.jpg"))[:3]:
        with Image.open(path) as im:
            assert np.array_equal(np.asarray(to_rgb(im)), np.asarray(im.convert("RGB")))


def _pil_pixels(path):
    """The pixels PIL alone gives (decode, resize the short side to 256, center-crop 224): what
    every cache was extracted from before JPEGs were decoded by simplejpeg."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from extract.encoders import to_rgb

    with Image.open(path) as im:
        return np.asarray(TF.center_crop(TF.resize(to_rgb(im), 256, antialias=True), 224))


def _encoder():
    from extract.encoders import IMAGENET, ImageEncoder

    return ImageEncoder("t", torch.nn.Identity(), 224, *IMAGENET, "x")


@pytest.mark.parametrize("mode, size, save", [
    ("RGB", (341, 256), {}),  # 4:2:0, short side 256 already: cropped without a resize
    ("RGB", (300, 500), {"subsampling": 0, "quality": 95}),  # 4:4:4, resized down
    ("RGB", (200, 150), {"subsampling": 1}),  # 4:2:2, resized up
    ("RGB", (257, 640), {"progressive": True}),
    ("RGB", (230, 231), {"optimize": True, "quality": 60}),
    ("L", (400, 256), {}),  # grey: the same value in all three channels
    ("CMYK", (300, 300), {}),  # not decoded by simplejpeg: PIL's conversion, as before
])
def test_jpegs_give_the_pixels_pil_gives(tmp_path, mode, size, save):
    """JPEGs are decoded by simplejpeg (libjpeg-turbo without PIL's per-file overhead): every
    pixel must be the one PIL gave, or every cache made before would no longer match."""
    from PIL import Image

    rng = np.random.default_rng(sum(size))
    y, x = np.mgrid[: size[1], : size[0]]
    base = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], -1)
    noisy = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)  # edges and texture
    im = Image.fromarray(noisy).convert(mode)
    im.save(tmp_path / "a.jpg", **save)
    got = _encoder().pixels(tmp_path / "a.jpg")
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    assert np.array_equal(got, _pil_pixels(tmp_path / "a.jpg"))


def test_a_jpeg_with_corrupt_data_gives_what_pil_gives(tmp_path):
    """libjpeg-turbo only warns about corrupt data inside a JPEG; PIL decodes such a file anyway,
    and so does the encoder (through PIL): it is not refused, nor are its pixels different."""
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg")
    raw = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "bad.jpg").write_bytes(raw[:4000] + bytes(rng.integers(0, 256, 300, dtype=np.uint8)) + raw[4300:])
    assert np.array_equal(_encoder().pixels(tmp_path / "bad.jpg"), _pil_pixels(tmp_path / "bad.jpg"))


def test_shipped_jpegs_give_the_pixels_pil_gives(data_root):
    """MVSA-Single's images (the first of them, and ones that need a resize), every pixel as PIL's."""
    from PIL import Image

    kinds = {True: [], False: []}  # needs a resize or not: both paths of `pixels`, 20 images each
    for path in sorted((data_root / "mvsa_single" / "images").glob("*.jpg")):
        with Image.open(path) as im:
            kinds[min(im.size) != 256].append(path)
        if min(len(k) for k in kinds.values()) >= 20:
            break
    for path in kinds[True][:20] + kinds[False][:20]:
        assert np.array_equal(_encoder().pixels(path), _pil_pixels(path)), path.name


@pytest.mark.parametrize("mode, value, file, why", [
    ("F", 2.0, "a.tif", r"not within \[0, 1\]"),
    ("I", -5, "a.tif", "cannot tell its bit depth"),
    ("I", 70000, "b.tif", "cannot tell its bit depth"),
])
def test_images_that_cannot_be_mapped_to_rgb_are_refused(tmp_path, mode, value, file, why):
    from PIL import Image

    with pytest.raises(ValueError, match=why):
        _pixels(tmp_path, Image.new(mode, (8, 8), value), file)


def test_an_unsupported_mode_is_refused():
    from PIL import Image

    from extract.encoders import to_rgb

    with pytest.raises(ValueError, match="image mode LAB is not supported"):
        to_rgb(Image.new("LAB", (4, 4)))


def test_normalising_by_lookup_gives_the_values_of_the_arithmetic(tmp_path):
    """The cache's features depend on every bit of the input: the table must give, for all 256
    pixel values of each channel, exactly ((v / 255) - mean) / std in float32, in the memory
    layout (channels last) the batches always had."""
    from PIL import Image

    from extract.encoders import IMAGENET, ImageEncoder

    i, j = np.mgrid[:256, :256]
    rgb = np.stack([(7 * i + j) % 256, (i + 7 * j) % 256, (5 * i + 3 * j) % 256], -1)  # all 256 values in each channel
    Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / "all.png")
    enc = ImageEncoder("t", torch.nn.Identity(), 224, *IMAGENET, "x")
    x = enc.load(tmp_path / "all.png")
    pixels = _pil_pixels(tmp_path / "all.png")  # the pixels the encoder sees: resized, cropped
    assert all(len(np.unique(pixels[..., c])) == 256 for c in range(3))
    mean, std = (np.array(v, np.float32).reshape(3, 1, 1) for v in IMAGENET)
    want = (pixels.astype(np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
    assert x.dtype == np.float32 and np.array_equal(x, want)
    assert x.strides == want.strides  # pixel-major: a batch of them is a channels-last tensor


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18", "timm:resnet18"])
def test_a_missing_image_weights_file_is_one_line_for_every_family(tmp_path, name):
    """--image-weights names a file that is not there: one UserError before any model is built."""
    with pytest.raises(UserError, match=r"--image-weights .*missing\.pt: no such file"):
        create_image_encoder(name, weights=tmp_path / "missing.pt")
