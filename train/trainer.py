"""The one trainer: any registered head, from the cache (in memory, or streamed: train/data.py).

Per batch the head's own objective is the loss (docs/architecture.md rule 3: the trainer
names no loss and no head):
  step one   L1 = the sum of the head's terms, head.objective(out, y)
             (for example SPP-SCL's: lambda_ce CE + SupCon(T_a) + SupCon(I_a))
  step two   if head.has_second_step: forward the same batch again; if head.second_step(out, y)
             returns terms (its gate opened), a second optimizer step on their sum; else skip.
The epoch is selected on the dev split; test is scored once, with that epoch's weights.
How a head is scored (label-blind orders, the file-order checks) is `train/scoring.py`.
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
from train.config import TrainConfig
from train import scoring
from train.data import Data
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


@dataclass
class Best:
    """The dev-selected epoch so far: its number, dev scores and a copy of its weights."""
    epoch: int
    dev: dict
    state: dict


@dataclass
class SeedProgress:
    """Where a seed stands after its last finished epoch, besides the weights, optimizer and random
    streams: what the next epochs and the final result still depend on. One value, so that
    `snapshot` and `restore` cannot disagree on the order of five loose numbers."""
    epoch: int = 0  # the last finished epoch (0: none yet)
    best: Best | None = None
    logs: list[EpochLog] = field(default_factory=list)
    fired_total: int = 0  # batches whose second step ran, over the finished epochs
    batches_total: int = 0


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so a balanced split gets weight 1 everywhere."""
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).float()
    return len(labels) / (n_classes * counts)


def train_seed(cfg: TrainConfig, data: Data, seed: int, on_epoch=lambda log: None, resume: dict | None = None,
               save=lambda state: None, dtype: torch.dtype = torch.float32) -> SeedResult:
    """Train one seed; `save(state)` gets a resumable state at the end of every epoch, and
    `resume=state` continues after that state's epoch exactly as if training had never stopped
    (weights, optimizer, scheduler, every random stream, the best epoch so far, the logs).
    `dtype`: the head's weights and the batches' features (float32 for runs; float64 for the
    numerics tests, whose goldens then do not depend on the threads or the kind of CPU)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    device_ = device()
    train = data.splits["train"]
    if len(train) < 2:
        raise UserError(f"the train split of {cfg.dataset} has {len(train)} item(s): training needs at least 2 "
                        "(BatchNorm and SupCon need pairs); extract more data or check the split column")
    data.place(device_)  # a GPU: the cache moves there once when it fits
    head = build_head(cfg, data).to(device_, dtype)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    g = torch.Generator().manual_seed(seed)
    weight = class_weights(train.labels, data.dims.n_classes).to(device_, dtype) if cfg.balanced else None
    dev_order = scoring.eval_orders(len(data.splits["dev"]), cfg, 1)
    at = SeedProgress() if resume is None else restore(resume, head, opt, sched, g)
    for epoch in range(at.epoch + 1, cfg.epochs + 1):
        if at.best is not None and stopped(cfg, epoch - 1, at.best.epoch):
            break  # dev has not improved for `patience` epochs (a later epoch might still have)
        t0 = time.time()
        lr = opt.param_groups[0]["lr"]  # the rate this epoch trains with (logged before sched.step())
        head.train()
        order = torch.randperm(len(train), generator=g)
        views = train.draw_views(seed, epoch) if cfg.text_views else None  # one dropout view per item
        steps = train_epoch(head, opt, train, cfg, order, views, weight, (device_, dtype))
        sched.step()
        at.fired_total += steps.fired
        at.batches_total += steps.batches
        log = score_epoch(head, data, cfg, (seed, epoch, lr), steps, dev_order[0], device_)
        log.seconds = time.time() - t0
        at.logs.append(log)
        at.epoch = epoch
        if improves(log.dev, None if at.best is None else at.best.dev, cfg.select):
            at.best = Best(epoch, log.dev, copy.deepcopy(head.state_dict()))
        save(snapshot(head, opt, sched, g, at))
        on_epoch(log)
    return seed_result(cfg, data, head, seed, at, device_)


@dataclass
class EpochSteps:
    """What one epoch's optimizer steps add up: each named loss term's sum over the batches it was
    computed on, and how many batches ran and how many of them took the second step."""
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    fired: int = 0
    batches: int = 0

    def add(self, terms: dict) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
            self.counts[k] = self.counts.get(k, 0) + 1

    def losses(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def train_epoch(head, opt, train, cfg: TrainConfig, order: torch.Tensor, views: torch.Tensor | None,
                weight: torch.Tensor | None, place: tuple) -> EpochSteps:
    """One epoch's optimizer steps over `train` in `order` (`place`: the device and dtype of the
    batches): step one on the head's objective, then its gated step two where it has one."""
    # torch >= 2 zero_grad drops gradients (set_to_none); the official code's torch 1.8 kept zero
    # tensors, so its step-two AdamW step also moved parameters L_clm does not reach
    keep_zero_grads = cfg.official
    steps = EpochSteps()
    chunks = [order[b : b + cfg.batch_size] for b in range(0, len(order), cfg.batch_size)]
    chunks = [idx for idx in chunks if len(idx) >= 2]  # BatchNorm cannot train on one sample
    for batch in train.batches(chunks, views):  # streamed from the shards: read ahead meanwhile
        batch = batch.to(*place, non_blocking=True)  # pinned on a GPU (Data.place); else a plain copy
        y = batch.labels
        terms = head.objective(head(batch), y, weight)
        _step(opt, terms, keep_zero_grads)
        steps.batches += 1
        steps.add(terms)
        if head.has_second_step:
            second = head.second_step(head(batch), y)  # the same batch again, updated weights
            if second is not None:  # the head's gate opened
                _step(opt, second, keep_zero_grads)
                steps.fired += 1
                steps.add({f"step2_{k}": v for k, v in second.items()})
    return steps


def _step(opt, terms: dict, keep_zero_grads: bool) -> None:
    """One optimizer step on the sum of `terms`."""
    opt.zero_grad(set_to_none=not keep_zero_grads)
    sum(terms.values()).backward()
    opt.step()


def score_epoch(head, data: Data, cfg: TrainConfig, when: tuple[int, int, float], steps: EpochSteps,
                dev_order: torch.Tensor, device_) -> EpochLog:
    """The log of a finished epoch (`when`: seed, epoch, its learning rate): dev scored in its
    label-blind order, and with --protocol-check test in file order (never selects)."""
    seed, epoch, lr = when
    n_classes = data.dims.n_classes
    dev = data.splits["dev"]
    pred = scoring.predict(head, dev, cfg.eval_batch_size, device_, dev_order)
    dev_scores = scores(dev.labels.numpy(), pred, n_classes)
    # eval mode, no gradients: draws no random number, so the run trains exactly as without it
    on_test = scoring.file_order_scores(head, data.splits["test"], cfg, n_classes, device_) if cfg.protocol_check \
        else None
    return EpochLog(seed, epoch, lr, steps.losses(), steps.fired / max(steps.batches, 1), 0.0, dev_scores, on_test)


def seed_result(cfg: TrainConfig, data: Data, head, seed: int, at: SeedProgress, device_) -> SeedResult:
    """Test, scored once with the dev-selected weights (--official: the last epoch's beside them)."""
    test, n_classes = data.splits["test"], data.dims.n_classes
    best, logs = at.best, at.logs
    orders = scoring.eval_orders(len(test), cfg)
    last = scoring.score_split(head, test, cfg, n_classes, device_, orders)[0] if cfg.official else None
    head.load_state_dict(best.state)
    test_scores, test_pred = scoring.score_split(head, test, cfg, n_classes, device_, orders)
    return SeedResult(
        seed, best.epoch, {k: v.cpu() for k, v in best.state.items()}, best.dev, test_scores,
        at.fired_total / max(at.batches_total, 1), test_pred.tolist(), logs,
        leak_check=scoring.file_order_scores(head, test, cfg, n_classes, device_) if head.batch_dependent else None,
        last_epoch_test=last,
        protocol_check=scoring.protocol_check(logs, test_scores) if cfg.protocol_check else None,
    )


def improves(dev: dict, best_dev: dict | None, select: str) -> bool:
    """Whether an epoch's `dev` scores make it the selected epoch over the best so far (`best_dev`,
    None before the first epoch): strictly higher on `select`, so the first of equals stays. The
    one rule: the progress display (train/progress.py) shows the best epoch through it too."""
    return best_dev is None or dev[select] > best_dev[select]


def stopped(cfg: TrainConfig, epoch: int, best_epoch: int) -> bool:
    """`--patience`: dev has not improved for that many epochs after `epoch`."""
    return cfg.patience is not None and epoch - best_epoch >= cfg.patience


# --- the resumable state of a seed --------------------------------------------------------
# Plain tensors, numbers, lists and dicts only, so it loads with torch.load(weights_only=True).

def snapshot(head, opt, sched, g: torch.Generator, at: SeedProgress) -> dict:
    """Everything the next epoch depends on, after epoch `at.epoch` finished."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "epoch": at.epoch, "head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "order": g.get_state(),  # dropout; the epoch order
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                          "gauss": gauss}},
        "best": {"epoch": at.best.epoch, "dev": at.best.dev, "state": at.best.state},
        "logs": [asdict(log) for log in at.logs], "fired_total": at.fired_total, "batches_total": at.batches_total,
    }


def restore(state: dict, head, opt, sched, g: torch.Generator) -> SeedProgress:
    """Load a `snapshot` into the fresh objects; returns where the seed stood."""
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
    return SeedProgress(state["epoch"], Best(b["epoch"], b["dev"], b["state"]), saved_logs(state),
                        state["fired_total"], state["batches_total"])


def saved_logs(state: dict) -> list[EpochLog]:
    """The epoch logs a `snapshot` holds."""
    return [EpochLog(**log) for log in state["logs"]]
