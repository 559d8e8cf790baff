"""`pipeline.py predict`: label and class probabilities for new image-text items from a run.

The one place in stage two that loads encoders (docs/architecture.md rule 1). They are the run's
own, named in config.json (`train.text_encoder` / `image_encoder`), built through stage one's
registry with the layers and max length of the run's `provenance`; their weights
fingerprint and preprocessing must equal the recorded ones, or the features would not be
the ones the head was trained on. A new item becomes exactly what the cache holds: the CLS
of the last L layers, the real tokens without CLS and with SEP, float16 (the encoders
return float16, as the cache stores it), then float32 in the Batch as `Split.batch` does.
Each item is encoded alone, so its features never depend on the rest of the request.

Seeds: the probabilities are the mean over the run's seeds (softmax of each seed's
logits, averaged), which is what the run's mean metrics describe; `--seed` picks one.

Batch scope: an SPP-SCL head with `cmf_scope=batch` mixes every item of a batch in its
cross-modal attention, so a prediction needs batch mates. Rule: each new item is scored
in a batch of its own with a fixed context of (eval_batch_size - 1) training items of
the run's cache, drawn once with `eval_seed` (the same for every item and every request).
That is a batch of the size and kind the head was trained and scored on (random training
items, label-blind), and it makes an item's prediction deterministic and independent of
the other items of the request. Sample-scope heads (`batch_dependent` False) need no
context and no cache: every item is one batch of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.device import device
from core.errors import UserError
from heads.base import Batch, Dims
from train.data import CacheProvenance, Split
from train.run_folder import RunFolder


@dataclass
class NewItem:
    id: str
    text: str | None
    image: Path | None


@dataclass
class Prediction:
    id: str
    label: str
    probabilities: dict[str, float]

    def to_json(self) -> dict:
        return {"id": self.id, "label": self.label, "probabilities": self.probabilities}


def read_manifest(path: Path) -> list[NewItem]:
    """A manifest as `extract --manifest` reads it (CSV or JSONL; `id`, `text` or `text_file`,
    `image`; paths relative to the manifest; non-UTF-8 bytes decoded as stage one does). Labels
    and splits are ignored. A named file that is missing is an error here, before any encoder loads."""
    from extract.datasets import read_rows, read_text_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--manifest {path}: no such file")
    items = []
    for n, (row, _) in enumerate(read_rows(path), 1):
        id_ = str(row.get("id") or "").strip() or f"row {n}"
        text = row.get("text")
        if not text and row.get("text_file"):
            text, _ = read_text_file(path.parent / row["text_file"])
            if text is None:
                raise UserError(f"item {id_}: text file {path.parent / row['text_file']} not found; check the "
                                f"path (relative to {path.name})")
        image = path.parent / row["image"] if row.get("image") else None
        items.append(_checked(NewItem(id_, text, image)))
    if not items:
        raise UserError(f"{path}: no items; write one row per item with id, text (or text_file), image")
    return items


def _checked(item: NewItem) -> NewItem:
    """`item`, refused if it names an image file that is not there (whatever the run reads)."""
    if item.image is not None and not Path(item.image).is_file():
        raise UserError(f"{_who(item)}: image file {item.image} not found; check the path")
    return item


def _who(item: NewItem) -> str:
    return f"item {item.id}" if item.id else "the item"


class Predictor:
    """A run's heads and its encoders, ready to score new items one at a time."""

    def __init__(self, run: Path, seed: int | None = None, cache_dir: Path | None = None):
        self.folder = RunFolder(run)
        saved, cfg = self.folder.read_run()
        self.run = Path(run)
        self.cfg = cfg.resolved()
        if cache_dir is not None:
            self.cfg.cache_dir = Path(cache_dir)
        self.classes: list[str] = saved["classes"]
        self.provenance = CacheProvenance.from_json(saved["provenance"])
        self.reads = self.cfg.head_config.reads()
        seeds = self.cfg.seeds if seed is None else (seed,)
        if seed is not None and seed not in self.cfg.seeds:
            raise UserError(f"--seed {seed}: run {run} has seeds {', '.join(map(str, self.cfg.seeds))}")
        dims = Dims(**saved["dims"])
        self.seeds = tuple(seeds)
        self.heads = [self.folder.load_head(self.cfg, dims, s) for s in seeds]
        self.context = self._context() if any(h.batch_dependent for h in self.heads) else None
        self._encoders: dict = {}  # loaded on first use, after the request's items are checked

    @property
    def text_enc(self):
        return self._get("text")

    @property
    def image_enc(self):
        return self._get("image")

    def _get(self, kind: str):
        if kind not in self.reads:
            return None
        if kind not in self._encoders:
            self._encoders[kind] = self._encoder(kind)
        return self._encoders[kind]

    def _encoder(self, kind: str):
        """The run's encoder of `kind`, refused unless its weights and preprocessing are the recorded ones."""
        from extract.encoders import create_image_encoder, create_text_encoder  # rule 1: only predict loads encoders

        prov = getattr(self.provenance, kind)
        random = prov.fingerprint.startswith("random-")
        name = self.cfg.text_encoder if kind == "text" else self.cfg.image_encoder
        try:
            enc = (create_text_encoder(name, prov.layers, prov.max_length, random) if kind == "text"
                   else create_image_encoder(name, random))
        except UserError as e:
            raise UserError(f"cannot load this run's {kind} encoder {name!r}: {e}") from None
        except Exception as e:  # a broken model folder or package: still one line
            raise UserError(f"cannot load this run's {kind} encoder {name!r} ({type(e).__name__}: {e}); "
                            "install it as for `pipeline.py extract`") from None
        for key, now in (("fingerprint", enc.fingerprint), ("preprocessing", enc.preprocessing)):
            if now != getattr(prov, key):
                raise UserError(f"the {kind} encoder {name!r} here has {key} {now!r}, the run was trained on "
                                f"{getattr(prov, key)!r}: install the weights the cache was built with, or re-extract and retrain")
        return enc

    def _context(self) -> Batch:
        """The fixed batch mates of a batch-scope head: eval_batch_size - 1 train items drawn with eval_seed."""
        _, _, data = self.folder.open(self.cfg.cache_dir)  # refused if the cache was rebuilt since
        train = data.splits["train"]
        k = min(self.cfg.eval_batch_size - 1, len(train))
        g = torch.Generator().manual_seed(self.cfg.eval_seed)
        return train.batch(torch.randperm(len(train), generator=g)[:k])

    def check(self, item: NewItem) -> None:
        """Raise UserError naming the item if it lacks what this run's head reads."""
        if "text" in self.reads and (item.text is None or not str(item.text).strip()):
            raise UserError(f"{_who(item)}: empty text; this run's head reads text, give --text \"...\" "
                            "(or a text / text_file in the manifest)")
        if "image" in self.reads:
            if item.image is None:
                raise UserError(f"{_who(item)}: no image; this run's head reads images, give --image FILE")
            _checked(item)

    def features(self, item: NewItem) -> Split:
        """The item as the cache would hold it (float16), a Split of one."""
        self.check(item)
        text = {}
        if self.text_enc is not None:
            ids = self.text_enc.tokenize([str(item.text).strip()])  # stripped as stage one's reader does
            cls, tokens = self.text_enc.encode(ids)  # CLS (1, L, H), real tokens without CLS, SEP kept, float16
            text = {"cls": torch.from_numpy(cls), "tokens": torch.from_numpy(tokens[0]),
                    "offsets": torch.tensor([0, len(tokens[0])])}
        maps = None
        if self.image_enc is not None:
            try:
                x = self.image_enc.load(Path(item.image))
            except Exception as e:  # any decoder error: this one file is unusable
                raise UserError(f"{_who(item)}: unreadable image {item.image} ({type(e).__name__}: {e}); "
                                "replace the file") from None
            maps = torch.from_numpy(self.image_enc.encode(torch.from_numpy(x[None])))  # float16 like the cache
        return Split([item.id], torch.tensor([-1]), maps=maps, **text)

    @torch.no_grad()
    def probabilities(self, item: NewItem) -> np.ndarray:
        """(n_classes,) mean over the seeds of softmax(logits) for one item."""
        batch = self.features(item).batch(torch.tensor([0]))
        probs = []
        for head in self.heads:
            if head.batch_dependent:
                logits = head(_join(self.context, batch).to(device())).logits[-1:]  # the new item is last
            else:
                logits = head(batch.to(device())).logits
            probs.append(torch.softmax(logits.float(), dim=1)[0].cpu())
        return torch.stack(probs).mean(0).numpy()

    def predict(self, items: list[NewItem]) -> list[Prediction]:
        """Each item scored on its own (see the module docstring); every item is checked first."""
        for item in items:
            self.check(item)
        out = []
        for item in items:
            p = self.probabilities(item)
            out.append(Prediction(item.id, self.classes[int(p.argmax())],
                                  {c: float(v) for c, v in zip(self.classes, p)}))
        return out


def _join(a: Batch, b: Batch) -> Batch:
    """Batch `a` followed by batch `b` (ragged tokens stay back to back)."""
    def cat(x, y):
        return None if x is None else torch.cat([x, y])

    return Batch(labels=cat(a.labels, b.labels), cls=cat(a.cls, b.cls), tokens=cat(a.tokens, b.tokens),
                 lengths=cat(a.lengths, b.lengths), maps=cat(a.maps, b.maps))


def items_from_args(image: Path | None, text: str | None, manifest: Path | None, id_: str | None = None) -> list[NewItem]:
    """`--manifest FILE`, or one item from `--image` / `--text`; a named image file must exist."""
    if manifest is not None:
        if image is not None or text is not None:
            raise UserError("give either --manifest or --image/--text, not both")
        return read_manifest(manifest)
    if image is None and text is None:
        raise UserError("nothing to predict: give --text \"...\" and/or --image FILE, or --manifest FILE (.csv/.jsonl)")
    # an item needs a name on screen and in --json: its image file's, else "text"
    return [_checked(NewItem(id_ or (Path(image).name if image is not None else "text"), text, image))]
