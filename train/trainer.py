"""The one trainer: any registered head, from the in-memory cache, with the SPP-SCL update.

Per batch (SPEC.md, "Losses and the two-step update"):
  step one   L1 = lambda_ce * CE + SupCon(T_a) + SupCon(I_a) [+ L_clm with --one-step]
  step two   forward the same batch again; if should_pull(T_a, I_a, y, alpha):
             L2 = CrossSupCon(I_a, T_a), a second optimizer step; else skip (push only).
Step two is a trainer feature: any head that returns both embeddings gets it.
The epoch is selected on the dev split; test is scored once, with that epoch's weights.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import heads
from core.device import device
from heads.base import HeadConfig
from heads.losses import cross_supcon, should_pull, supcon
from train.config import TrainConfig
from train.data import Data, Split
from train.metrics import scores


def head_config(cfg: TrainConfig) -> HeadConfig:
    return HeadConfig(dim=cfg.dim, dropout=cfg.dropout, text_layers=cfg.text_layers,
                      hierarchical_attention=cfg.hierarchical_attention, cmf=cfg.cmf,
                      cmf_scope=cfg.cmf_scope, modalities=cfg.modalities)


def build_head(cfg: TrainConfig, data: Data) -> torch.nn.Module:
    return heads.create(cfg.head, data.dims, head_config(cfg))


@dataclass
class EpochLog:
    seed: int
    epoch: int
    lr: float
    loss_ce: float
    loss_intra: float
    loss_step_two: float
    step_two_rate: float  # share of batches where the gate opened
    seconds: float
    dev: dict = field(default_factory=dict)


@dataclass
class SeedResult:
    seed: int
    best_epoch: int
    state: dict  # the selected weights
    dev: dict
    test: dict
    step_two_rate: float  # over the whole run
    test_pred: list[int]
    log: list[EpochLog]


@torch.no_grad()
def predict(head: torch.nn.Module, split: Split, batch_size: int, dev: torch.device) -> np.ndarray:
    """Eval-mode predictions in the split's own order and fixed batches.

    With `--cmf-scope batch` a prediction depends on its batch mates, so the order and
    batch size are fixed here: `eval` reproduces `train`'s numbers exactly.
    """
    head.eval()
    out = []
    for b in range(0, len(split), batch_size):
        idx = torch.arange(b, min(b + batch_size, len(split)))
        out.append(head(split.batch(idx).to(dev)).logits.argmax(1).cpu())
    return torch.cat(out).numpy()


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so a balanced split gets weight 1 everywhere."""
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).float()
    return len(labels) / (n_classes * counts)


def step_one_loss(cfg: TrainConfig, out, y, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    ce = F.cross_entropy(out.logits, y, weight=weight)
    intra = sum(
        (supcon(z, y, cfg.temperature, official=cfg.supcon_official) for z in (out.text, out.image) if z is not None),
        torch.zeros((), device=y.device),
    ) if cfg.intra else torch.zeros((), device=y.device)
    loss = cfg.lambda_ce * ce + intra + sum(out.extra_losses.values(), torch.zeros((), device=y.device))
    if not cfg.two_step and cfg.clm and out.text is not None and out.image is not None:
        loss = loss + cross_supcon(out.image, out.text, y, cfg.temperature)  # one-step ablation
    return loss, ce.item(), intra.item()


def train_seed(cfg: TrainConfig, data: Data, seed: int, on_epoch=lambda log: None) -> SeedResult:
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = device()
    head = build_head(cfg, data).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    train, dev_split = data.splits["train"], data.splits["dev"]
    g = torch.Generator().manual_seed(seed)
    n_classes = data.dims.n_classes
    weight = class_weights(train.labels, n_classes).to(dev) if cfg.balanced else None
    best, logs, fired_total, batches_total = None, [], 0, 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        head.train()
        order = torch.randperm(len(train), generator=g)
        views = train.draw_views(seed, epoch) if cfg.text_views else None  # one dropout view per item
        sums = np.zeros(3)
        fired = n_batches = 0
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b : b + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on one sample
                continue
            batch = train.batch(idx, view=None if views is None else views[idx]).to(dev)
            y = batch.labels
            out = head(batch)
            loss, ce, intra = step_one_loss(cfg, out, y, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums[:2] += ce, intra
            n_batches += 1
            if cfg.two_step and cfg.clm and out.text is not None and out.image is not None:
                out = head(batch)  # the same batch again, with the updated weights
                if should_pull(out.text, out.image, y, cfg.alpha):  # modalities not aligned yet: pull
                    l2 = cross_supcon(out.image, out.text, y, cfg.temperature)
                    opt.zero_grad(set_to_none=True)
                    l2.backward()
                    opt.step()
                    sums[2] += l2.item()
                    fired += 1
        sched.step()
        fired_total += fired
        batches_total += n_batches
        pred = predict(head, dev_split, cfg.batch_size, dev)
        dev_scores = scores(dev_split.labels.numpy(), pred, n_classes)
        log = EpochLog(seed, epoch, opt.param_groups[0]["lr"], sums[0] / n_batches, sums[1] / n_batches,
                       sums[2] / max(fired, 1), fired / n_batches, time.time() - t0, dev_scores)
        logs.append(log)
        if best is None or dev_scores[cfg.select] > best[1][cfg.select]:
            best = (epoch, dev_scores, copy.deepcopy(head.state_dict()))
        on_epoch(log)
    head.load_state_dict(best[2])
    test = data.splits["test"]
    test_pred = predict(head, test, cfg.batch_size, dev)
    return SeedResult(
        seed, best[0], {k: v.cpu() for k, v in best[2].items()}, best[1],
        scores(test.labels.numpy(), test_pred, n_classes), fired_total / max(batches_total, 1),
        test_pred.tolist(), logs,
    )
