"""The one trainer: any registered head, from the in-memory cache.

Per batch the head's own objective is the loss (ARCHITECTURE.md rule 3: the trainer
names no loss and no head):
  step one   L1 = the sum of the head's terms, head.objective(out, y)
             (for example SPP-SCL's: lambda_ce CE + SupCon(T_a) + SupCon(I_a))
  step two   if head.has_second_step: forward the same batch again; if head.second_step(out, y)
             returns terms (its gate opened), a second optimizer step on their sum; else skip.
The epoch is selected on the dev split; test is scored once, with that epoch's weights.

Honest numbers: dev and test are scored in seeded random orders, never in the stored
order (the shipped split files are sorted by label, and a batch-scope head attends over
its batch mates, which would then share its label). Test is the mean over several
orders; `leak_check` scores the same weights in file order to show what that inflates, and
`--protocol-check` scores test in file order after every epoch (see `protocol_check`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import heads
from core.device import device
from core.errors import UserError
from train.config import METRICS, TrainConfig
from train.data import Data, Split
from train.metrics import scores


def build_head(cfg: TrainConfig, data: Data) -> heads.Head:
    return heads.create(cfg.head, data.dims, cfg.head_config)


@dataclass
class EpochLog:
    seed: int
    epoch: int
    lr: float  # the learning rate this epoch trained with
    losses: dict[str, float]  # mean of each named loss term over the batches it was computed on
    step_two_rate: float  # share of batches where the second step ran (0 for heads without one)
    seconds: float
    dev: dict = field(default_factory=dict)
    test_file_order: dict | None = None  # --protocol-check: test in file order after this epoch (never selects)


@dataclass
class SeedResult:
    seed: int
    best_epoch: int
    state: dict  # the selected weights
    dev: dict
    test: dict  # mean over the label-blind orders (+ "orders": per-order metrics)
    step_two_rate: float  # over the whole run
    test_pred: list[int]  # predictions of the first label-blind order
    log: list[EpochLog]
    leak_check: dict | None = None  # the same weights scored in file order (batch-dependent heads)
    last_epoch_test: dict | None = None  # --official: the last epoch's weights, as the authors report
    protocol_check: dict | None = None  # --protocol-check: what the authors' protocol would report (see there)


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
    item, float32 on the CPU, in the split's index order.

    The items are fed in `order`, cut into batches of `batch_size`: with `--cmf-scope batch` a
    prediction depends on its batch mates, so the order is always the caller's choice: a
    label-blind one from `eval_orders`, or `file_order` for the leak check alone.
    """
    head.eval()
    parts: dict[str, list] = {k: [] for k in FORWARD_FIELDS}
    for b in range(0, len(order), batch_size):
        out = head(split.batch(order[b : b + batch_size]).to(device_))
        for k in FORWARD_FIELDS:
            parts[k].append(None if getattr(out, k) is None else getattr(out, k).float().cpu())
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


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so a balanced split gets weight 1 everywhere."""
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).float()
    return len(labels) / (n_classes * counts)


def train_seed(cfg: TrainConfig, data: Data, seed: int, on_epoch=lambda log: None, resume: dict | None = None,
               save=lambda state: None) -> SeedResult:
    """Train one seed; `save(state)` gets a resumable state at the end of every epoch, and
    `resume=state` continues after that state's epoch exactly as if training had never stopped
    (weights, optimizer, scheduler, every random stream, the best epoch so far, the logs)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    device_ = device()
    train, dev_split, test = data.splits["train"], data.splits["dev"], data.splits["test"]
    if len(train) < 2:
        raise UserError(f"the train split of {cfg.dataset} has {len(train)} item(s): training needs at least 2 "
                        "(BatchNorm and SupCon need pairs); extract more data or check the split column")
    head = build_head(cfg, data).to(device_)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    # torch >= 2 zero_grad drops gradients (set_to_none); the official code's torch 1.8 kept zero
    # tensors, so its step-two AdamW step also moved parameters L_clm does not reach
    keep_zero_grads = cfg.official
    g = torch.Generator().manual_seed(seed)
    n_classes = data.dims.n_classes
    weight = class_weights(train.labels, n_classes).to(device_) if cfg.balanced else None
    dev_order = eval_orders(len(dev_split), cfg, 1)
    best, logs, fired_total, batches_total, start = None, [], 0, 0, 0
    if resume is not None:
        best, logs, fired_total, batches_total, start = restore(resume, head, opt, sched, g)
    for epoch in range(start + 1, cfg.epochs + 1):
        if best is not None and stopped(cfg, epoch - 1, best[0]):
            break  # dev has not improved for `patience` epochs (a later epoch might still have)
        t0 = time.time()
        lr = opt.param_groups[0]["lr"]  # the rate this epoch trains with (logged before sched.step())
        head.train()
        order = torch.randperm(len(train), generator=g)
        views = train.draw_views(seed, epoch) if cfg.text_views else None  # one dropout view per item
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        fired = n_batches = 0
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b : b + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on one sample
                continue
            batch = train.batch(idx, view=None if views is None else views[idx]).to(device_)
            y = batch.labels
            terms = head.objective(head(batch), y, weight)
            opt.zero_grad(set_to_none=not keep_zero_grads)
            sum(terms.values()).backward()
            opt.step()
            n_batches += 1
            _add(sums, counts, terms)
            if head.has_second_step:
                second = head.second_step(head(batch), y)  # the same batch again, updated weights
                if second is not None:  # the head's gate opened
                    opt.zero_grad(set_to_none=not keep_zero_grads)
                    sum(second.values()).backward()
                    opt.step()
                    fired += 1
                    _add(sums, counts, {f"step2_{k}": v for k, v in second.items()})
        sched.step()
        fired_total += fired
        batches_total += n_batches
        pred = predict(head, dev_split, cfg.eval_batch_size, device_, dev_order[0])
        dev_scores = scores(dev_split.labels.numpy(), pred, n_classes)
        # eval mode, no gradients: draws no random number, so the run trains exactly as without it
        on_test = file_order_scores(head, test, cfg, n_classes, device_) if cfg.protocol_check else None
        log = EpochLog(seed, epoch, lr, {k: sums[k] / counts[k] for k in sums},
                       fired / max(n_batches, 1), time.time() - t0, dev_scores, on_test)
        logs.append(log)
        if best is None or dev_scores[cfg.select] > best[1][cfg.select]:
            best = (epoch, dev_scores, copy.deepcopy(head.state_dict()))
        save(snapshot(epoch, head, opt, sched, g, best, logs, fired_total, batches_total))
        on_epoch(log)
    orders = eval_orders(len(test), cfg)
    last = score_split(head, test, cfg, n_classes, device_, orders)[0] if cfg.official else None
    head.load_state_dict(best[2])
    test_scores, test_pred = score_split(head, test, cfg, n_classes, device_, orders)
    return SeedResult(
        seed, best[0], {k: v.cpu() for k, v in best[2].items()}, best[1], test_scores,
        fired_total / max(batches_total, 1), test_pred.tolist(), logs,
        leak_check=file_order_scores(head, test, cfg, n_classes, device_) if head.batch_dependent else None,
        last_epoch_test=last, protocol_check=protocol_check(logs, test_scores) if cfg.protocol_check else None,
    )


def stopped(cfg: TrainConfig, epoch: int, best_epoch: int) -> bool:
    """`--patience`: dev has not improved for that many epochs after `epoch`."""
    return cfg.patience is not None and epoch - best_epoch >= cfg.patience


# --- the resumable state of a seed --------------------------------------------------------
# Plain tensors, numbers, lists and dicts only, so it loads with torch.load(weights_only=True).

def snapshot(epoch: int, head, opt, sched, g: torch.Generator, best: tuple, logs: list[EpochLog],
             fired_total: int, batches_total: int) -> dict:
    """Everything the next epoch depends on, after `epoch` finished."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "epoch": epoch, "head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "order": g.get_state(),  # dropout; the epoch order
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                          "gauss": gauss}},
        "best": {"epoch": best[0], "dev": best[1], "state": best[2]},
        "logs": [asdict(log) for log in logs], "fired_total": fired_total, "batches_total": batches_total,
    }


def restore(state: dict, head, opt, sched, g: torch.Generator) -> tuple:
    """Load a `snapshot` into the fresh objects; returns (best, logs, fired_total, batches_total, epoch)."""
    head.load_state_dict(state["head"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    g.set_state(rng["order"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    b = state["best"]
    return ((b["epoch"], b["dev"], b["state"]), saved_logs(state), state["fired_total"], state["batches_total"],
            state["epoch"])


def saved_logs(state: dict) -> list[EpochLog]:
    """The epoch logs a `snapshot` holds."""
    return [EpochLog(**log) for log in state["logs"]]


def file_order_scores(head, split: Split, cfg: TrainConfig, n_classes: int, device_: torch.device) -> dict:
    """The weights scored in the stored (label-sorted) order, as the official test loop does
    (`leak_check` asks only of a batch-dependent head: for another the order cannot matter)."""
    s = scores(split.labels.numpy(), predict(head, split, cfg.eval_batch_size, device_, file_order(len(split))), n_classes)
    return {m: s[m] for m in METRICS}


def protocol_check(logs: list[EpochLog], test: dict) -> dict:
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


def _add(sums: dict, counts: dict, terms: dict) -> None:
    for k, v in terms.items():
        sums[k] = sums.get(k, 0.0) + float(v.detach())
        counts[k] = counts.get(k, 0) + 1
