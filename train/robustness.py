"""Missing and noisy modalities at test time: what a trained head does when one input is absent or degraded.

Multimodal benchmarks report it (MultiBench's robustness tables): a head that leans on one
modality collapses without it. Two conditions, applied to the test split only, never to training:

- `drop text|image`: the modality's features are replaced by their **train mean** (the mean CLS
  vector and token state per layer; the mean feature map, position by position). Why the mean and not zeros: the cached
  features are post-activation states whose zero point is far outside the train distribution, so
  zeros test how the head handles an impossible input; the mean is the input that carries no
  information about the item, which is what "missing" means to a head trained on this cache. Token
  sequences keep their lengths (the head still sees how long a text was; only its content is gone).
- `noise SIGMA`: Gaussian noise of SIGMA x the feature's train std (per layer and channel for
  text, per channel for image maps) added to every modality the head reads, from a generator
  seeded by `eval_seed`, so the same run gives the same numbers.

Scoring is the run's own: the label-blind orders of `scoring`, mean over them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from core.errors import UserError
from train.data import Split

DROPS = ("text", "image")


def check_in_memory(data) -> None:
    """Scoring under these conditions needs whole splits in RAM (the train moments, the degraded
    test features): refused, before any training, for a cache streamed from its shards."""
    if data.streamed:
        gib = 2 ** 30
        raise UserError(f"robustness scoring (--robustness, eval --drop/--noise) needs the cache in memory: its "
                        f"{data.needs / gib:.2f} GiB of features exceed the memory budget of {data.budget / gib:.2f} GiB "
                        f"per process; give train --memory {-(-data.needs // gib)}G if the machine has it, or score "
                        "without it")


def _moments(x: torch.Tensor, std_dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    return x.mean(0, keepdim=True), x.std(std_dims, keepdim=True)


def train_moments(train: Split) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each feature's train mean (per position) and std (cls and tokens per layer and unit, maps per channel)."""
    out = {}
    if train.cls is not None:
        out["cls"] = _moments(train.cls, (0,))
        out["tokens"] = _moments(train.tokens, (0,))
    if train.maps is not None:
        out["maps"] = _moments(train.maps, (0, 2, 3))
    return out


def degrade(split: Split, moments: dict, drop: str | None = None, noise: float = 0.0, seed: int = 0) -> Split:
    """`split` with one modality replaced by its train mean (`drop`), or with Gaussian noise of
    `noise` train stds on every feature; float16 like the cache."""
    if drop is not None and drop not in DROPS:
        raise ValueError(f"drop {drop!r}: one of {DROPS}")
    g = torch.Generator().manual_seed(seed)
    new = {}
    for name in ("cls", "tokens", "maps"):
        x = getattr(split, name)
        if x is None or name not in moments:
            continue
        mean, std = moments[name]
        if drop == ("image" if name == "maps" else "text"):
            new[name] = mean.expand_as(x).to(x.dtype).clone()
        elif noise:
            new[name] = (x.float() + noise * std * torch.randn(x.shape, generator=g)).to(x.dtype)
    return replace(split, **new)


def conditions(reads: tuple[str, ...], drops: list[str], noises: list[float]) -> dict[str, dict]:
    """The named test conditions a head can be scored under: a modality can only be dropped from a
    head that reads both (without the other there is nothing left to predict from)."""
    out = {f"drop_{d}": {"drop": d} for d in drops if d in reads and len(reads) > 1}
    out.update({f"noise_{s:g}": {"noise": s} for s in noises})
    return out


def score(head, data, cfg, conds: dict[str, dict], device_) -> dict[str, dict]:
    """Test metrics of `head` under each condition (mean over the run's label-blind orders)."""
    from train.config import METRICS
    from train.scoring import eval_orders, score_split

    moments = train_moments(data.splits["train"])
    test = data.splits["test"]
    orders = eval_orders(len(test), cfg)
    out = {}
    for name, c in conds.items():
        s, _ = score_split(head, degrade(test, moments, seed=cfg.eval_seed, **c), cfg, data.dims.n_classes, device_,
                           orders)
        out[name] = {m: s[m] for m in METRICS}
    return out


def evaluate_run(run, cfg, data, conds: dict[str, dict], device_) -> dict:
    """Score every finished seed's dev-selected weights of `run` under `conds`; merged into the
    run's robustness.json (conditions scored before are kept) and returned."""
    from train.config import METRICS
    from train.metrics import mean_std
    from train.run_folder import RunFolder

    check_in_memory(data)
    folder = RunFolder(run)
    per_seed = {p["seed"]: p for p in folder.robustness().get("per_seed", [])}
    for seed in cfg.seeds:
        head = folder.load_head(cfg, data.dims, seed)
        per_seed.setdefault(seed, {"seed": seed}).update(score(head, data, cfg, conds, device_))
    rows = [per_seed[s] for s in cfg.seeds]
    names = [k for k in rows[0] if k != "seed"]
    result = {"about": ABOUT, "summary": {c: {m: mean_std([r[c][m] for r in rows]) for m in METRICS} for c in names},
              "per_seed": rows}
    folder.write_robustness(result)
    return result


ABOUT = ("test scored with one modality replaced by its train mean (drop_text, drop_image) or with Gaussian noise "
         "of SIGMA train stds on every feature (noise_SIGMA), the dev-selected weights of each seed, label-blind "
         "orders as the run's own test (train/robustness.py)")
