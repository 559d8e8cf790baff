#!/usr/bin/env python
"""Stage-two benchmark -> bench/results/train.json (+ .md), everything measured in one run.

  (1) seconds per epoch of the SPP-SCL head trained from the MVSA-Single cache (both
      steps, dev scoring included), median over a few epochs;
  (2) seconds per epoch of the official design, which runs the frozen encoders in the
      loop: bert-base (padded to 202, all hidden states) + ResNet-50 to layer4, random
      weights (same cost as trained), forward only, timed on a few batches and
      extrapolated to the 3,611 training items; the same for the offline encoders;
  (3) the wall time of a full 150-epoch MVSA-Single run (one seed; `--full-epochs`);
  (4) peak memory of a text-only training process vs the bytes of its cache, on the
      real HFM text cache (HFM's full size: 24,635 tweets).

Needs the caches of `pipeline.py extract --dataset mvsa_s` and
`pipeline.py extract --dataset hfm --text-only` under --cache-dir.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, cli, out_file, save  # noqa: E402
from core import threads  # noqa: E402

threads.policy()  # the project's thread policy, as pipeline.py sets it, before torch loads

import torch  # noqa: E402

from core import store  # noqa: E402
from core.device import device  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import load_data  # noqa: E402
from train.run_folder import RunFolder  # noqa: E402
from train.trainer import train_seed  # noqa: E402

TRAIN_ITEMS = 3611


def head_epochs(cache_dir: Path, epochs: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = TrainConfig(cache_dir=cache_dir, epochs=epochs, seeds=(1,)).resolved()
    t0 = time.perf_counter()
    data = load_data(cfg)
    load = time.perf_counter() - t0
    logs = []
    train_seed(cfg, data, 1, logs.append)
    secs = [log.seconds for log in logs]
    return {"threads": threads, "epochs_timed": epochs, "seconds_per_epoch": statistics.median(secs[1:] or secs),
            "first_epoch_seconds": secs[0], "all": secs, "cache_load_seconds": load,
            "step_two_rate": statistics.mean(log.step_two_rate for log in logs)}


@torch.inference_mode()
def encoders_in_loop(text_model, image_model, batch: int, batches: int) -> dict:
    """Forward time per batch of the frozen encoders as the official training loop runs them."""
    ids = torch.randint(1000, 30000, (batch, 202))
    mask = torch.ones_like(ids)
    images = torch.randn(batch, 3, 224, 224)
    text_model(input_ids=ids[:2], attention_mask=mask[:2], output_hidden_states=True)  # warm-up, small
    t0 = time.perf_counter()
    for _ in range(batches):
        text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    t_text = (time.perf_counter() - t0) / batches
    image_model(images[:2])
    t0 = time.perf_counter()
    for _ in range(batches):
        image_model(images)
    t_image = (time.perf_counter() - t0) / batches
    per_item = (t_text + t_image) / batch
    return {"batch": batch, "batches_timed": batches, "text_seconds_per_batch": t_text,
            "image_seconds_per_batch": t_image, "seconds_per_epoch": per_item * TRAIN_ITEMS}


def paper_encoders():
    import torchvision
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig()).eval()
    resnet = torchvision.models.resnet50(weights=None)
    body = torch.nn.Sequential(*list(resnet.children())[:-2]).eval()
    return bert, body


def offline_encoders():
    from extract.encoders import create_image_encoder, create_text_encoder

    text = create_text_encoder("minilm", 4, 202)
    image = create_image_encoder("efficientnet-lite0")
    return text.model, image.body


MEMORY_CHILD = """
import sys, time, json
sys.path.insert(0, {root!r})


def hwm():
    # VmHWM: this process's own peak RSS (ru_maxrss would include the parent's at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024


import torch
from train.config import TrainConfig
from train.data import load_data
from train.trainer import train_seed
base = hwm()
import heads
cfg = TrainConfig(dataset="hfm", cache_dir={cache!r}, head_config=heads.build_config("spp_scl", {{"modalities": "text"}}),
                  epochs=1, seeds=(1,)).resolved()
t0 = time.perf_counter()
data = load_data(cfg)
load = time.perf_counter() - t0
after_load = hwm()
logs = []
train_seed(cfg, data, 1, logs.append)
print(json.dumps({{"rss_after_imports": base, "peak_rss_after_load": after_load, "peak_rss": hwm(),
                   "load_seconds": load, "epoch_seconds": logs[0].seconds,
                   "items": sum(len(s) for s in data.splits.values())}}))
"""


def memory(cache_dir: Path) -> dict:
    folder = store.cache_folder(cache_dir, "hfm", store.TEXT, "minilm")
    cache_bytes = sum(p.stat().st_size for p in folder.glob("*.h5"))
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD.format(root=str(ROOT), cache=str(cache_dir))],
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    m["cache_bytes"] = cache_bytes
    m["peak_over_cache"] = m["peak_rss"] / cache_bytes
    m["peak_above_imports_over_cache"] = (m["peak_rss"] - m["rss_after_imports"]) / cache_bytes
    return m


def full_run(cache_dir: Path, epochs: int) -> dict:
    """The README's train command for one seed, timed from start to run folder written."""
    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "train", "--dataset", "mvsa_s", "--cache-dir",
                    str(cache_dir), "--epochs", str(epochs), "--seeds", "1", "--out", str(out / "run")],
                   check=True, capture_output=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    metrics = RunFolder(out / "run").metrics()
    return {"epochs": epochs, "seeds": 1, "wall_seconds": wall, "test": {k: v["mean"] for k, v in metrics["test"].items()}}


def markdown(r: dict) -> str:
    h, paper, off = r["head"], r["encoders_in_loop"]["paper"], r["encoders_in_loop"]["offline"]
    lines = [
        "| measure | value |", "|---|---|",
        f"| device | {r['machine'].get('device', 'cpu')} |",
        *(f"| SPP-SCL head from the cache, s/epoch, {n} thread(s) (MiniLM + EfficientNet-lite0 features) "
          f"| {t['seconds_per_epoch']:.2f} |" for n, t in r["head_by_threads"].items()),
        f"| bert-base + ResNet-50 in the loop (official design), s/epoch, forward only | {paper['seconds_per_epoch']:.0f} |",
        f"| **speed-up vs official design** (faster head setting) | **{paper['seconds_per_epoch'] / h['seconds_per_epoch']:.0f}x** |",
        f"| MiniLM (padded 202) + EfficientNet-lite0 in the loop, s/epoch | {off['seconds_per_epoch']:.0f} "
        f"({off['seconds_per_epoch'] / h['seconds_per_epoch']:.0f}x) |",
    ]
    if "full_run" in r:
        f = r["full_run"]
        lines.append(f"| full {f['epochs']}-epoch MVSA-Single run, one seed, wall | {f['wall_seconds'] / 60:.1f} min |")
    if "memory" in r:
        m = r["memory"]
        lines += [
            f"| HFM text cache (24,635 tweets) on disk | {m['cache_bytes'] / 2**30:.2f} GiB |",
            f"| peak RSS of a text-only training process | {m['peak_rss'] / 2**30:.2f} GiB "
            f"({m['peak_over_cache']:.2f}x the cache; {m['peak_above_imports_over_cache']:.2f}x above the "
            f"{m['rss_after_imports'] / 2**30:.2f} GiB of torch after imports) |",
        ]
    return "\n".join(lines) + "\n"


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    ap.add_argument("--epochs", type=int, default=4, help="epochs timed for s/epoch")
    ap.add_argument("--full-epochs", type=int, default=150, help="full run length (0: skip)")
    ap.add_argument("--encoder-batches", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "train.json")
    args = ap.parse_args()
    out_file(args.out)
    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                          "device": str(device())}}
    result["head_by_threads"] = {n: head_epochs(args.cache_dir, args.epochs, n) for n in (1, 2)}
    result["head"] = min(result["head_by_threads"].values(), key=lambda h: h["seconds_per_epoch"])
    torch.set_num_threads(threads.default_threads())  # the encoders get every core too
    result["encoder_threads"] = torch.get_num_threads()
    result["encoders_in_loop"] = {
        "paper": encoders_in_loop(*paper_encoders(), batch=64, batches=args.encoder_batches),
        "offline": encoders_in_loop(*offline_encoders(), batch=64, batches=args.encoder_batches),
    }
    result["speedup_vs_paper_encoders"] = (result["encoders_in_loop"]["paper"]["seconds_per_epoch"]
                                           / result["head"]["seconds_per_epoch"])
    if (store.cache_folder(args.cache_dir, "hfm", store.TEXT, "minilm") / "index.json").is_file():
        result["memory"] = memory(args.cache_dir)
    if args.full_epochs:
        result["full_run"] = full_run(args.cache_dir, args.full_epochs)
    save(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
