"""Scoring a head, apart from training it: the label-blind orders, the one eval-mode pass, the
metrics over several orders, and the file-order checks that show what the stored order inflates.

Why a module of its own: `train`, `eval`, `report` and `replay` score the same way, and none of
them should have to import the training loop to do so. Nothing here draws from the global random
streams (the orders come from their own seeded generator), so scoring between epochs never
changes what training does next.

Honest numbers: dev and test are scored in seeded random orders, never in the stored order (the
shipped split files are sorted by label, and a batch-scope head attends over its batch mates,
which would then share its label). Test is the mean over several orders; `file_order_scores`
scores the same weights in file order to show what that inflates, and `protocol_check` sums up
`--protocol-check` (test in file order after every epoch).
"""

from __future__ import annotations

import numpy as np
import torch

import heads
from train.config import METRICS, TrainConfig
from train.data import Split
from train.metrics import scores


def eval_orders(n: int, cfg: TrainConfig, count: int | None = None) -> list[torch.Tensor]:
    """The label-blind scoring orders of a split of `n` items: seeded permutations.

    Drawn from `cfg.eval_seed` alone, so `eval` reproduces them from config.json.
    """
    g = torch.Generator().manual_seed(cfg.eval_seed)
    return [torch.randperm(n, generator=g) for _ in range(count or cfg.eval_orders)]


FORWARD_FIELDS = ("logits", "text", "image", "fused")  # what `forward` gathers of a HeadOutput


@torch.no_grad()
def forward(head: heads.Head, split: Split, batch_size: int, device_: torch.device,
            order: torch.Tensor) -> heads.HeadOutput:
    """The one eval-mode pass of stage two: logits and embeddings (text, image, fused) of every
    item, on the CPU in the head's dtype, in the split's index order.

    The items are fed in `order`, cut into batches of `batch_size`: with `--cmf-scope batch` a
    prediction depends on its batch mates, so the order is always the caller's choice: a
    label-blind one from `eval_orders`, or `file_order` for the leak check alone.
    """
    head.eval()
    dtype = next(head.parameters()).dtype  # the batches in the weights' dtype (float32, or a float64 test's)
    parts: dict[str, list] = {k: [] for k in FORWARD_FIELDS}
    for batch in split.batches([order[b : b + batch_size] for b in range(0, len(order), batch_size)]):
        out = head(batch.to(device_, dtype, non_blocking=True))
        for k in FORWARD_FIELDS:
            parts[k].append(None if getattr(out, k) is None else getattr(out, k).cpu())
    result = {}
    for k, p in parts.items():
        if any(x is None for x in p):  # an embedding the head does not return
            result[k] = None
            continue
        x = torch.cat(p)
        result[k] = torch.empty_like(x)
        result[k][order] = x  # back to the split's index order
    return heads.HeadOutput(**result)


def file_order(n: int) -> torch.Tensor:
    """The stored order of a split (label-sorted in the shipped split files): only the leak check feeds items so."""
    return torch.arange(n)


def predict(head: heads.Head, split: Split, batch_size: int, device_: torch.device, order: torch.Tensor) -> np.ndarray:
    """The argmax of `forward`'s logits, in the split's index order."""
    return forward(head, split, batch_size, device_, order).logits.argmax(1).numpy()


def score_split(head, split: Split, cfg: TrainConfig, n_classes: int, device_: torch.device,
                orders: list[torch.Tensor]) -> tuple[dict, np.ndarray]:
    """Metrics averaged over `orders` (+ per-order values), and the first order's predictions."""
    y = split.labels.numpy()
    preds = [predict(head, split, cfg.eval_batch_size, device_, o) for o in orders]
    per = [scores(y, p, n_classes) for p in preds]
    mean = {m: float(np.mean([s[m] for s in per])) for m in METRICS}
    mean["order_std"] = {m: float(np.std([s[m] for s in per], ddof=1)) if len(per) > 1 else 0.0 for m in METRICS}
    mean["per_class_f1"] = [float(x) for x in np.mean([s["per_class_f1"] for s in per], axis=0)]
    mean["orders"] = [{m: s[m] for m in METRICS} for s in per]
    return mean, preds[0]


def file_order_scores(head, split: Split, cfg: TrainConfig, n_classes: int, device_: torch.device) -> dict:
    """The weights scored in the stored (label-sorted) order, as the official test loop does
    (`leak_check` asks only of a batch-dependent head: for another the order cannot matter)."""
    s = scores(split.labels.numpy(), predict(head, split, cfg.eval_batch_size, device_, file_order(len(split))), n_classes)
    return {m: s[m] for m in METRICS}


def protocol_check(logs: list, test: dict) -> dict:
    """What the authors' protocol would have reported for one seed (`--protocol-check`).

    Their code scores test in file order after every epoch and reports the best epoch (a
    selection on test) or the last one. Nothing here is selected on: the run's own number stays
    the label-blind, dev-selected `test`, given beside it; `inflation` is the best epoch's file-order
    accuracy minus that number.
    """
    best = max(logs, key=lambda log: log.test_file_order["accuracy"])  # the first of equals
    return {"last_epoch": {"epoch": logs[-1].epoch, **logs[-1].test_file_order},
            "best_epoch": {"epoch": best.epoch, **best.test_file_order},
            "test": {m: test[m] for m in METRICS},
            "inflation": best.test_file_order["accuracy"] - test["accuracy"]}
