"""The SPP-SCL loss terms (docs/method.md, "Losses and the two-step (semi-push-pull) update").

Short functions in the spirit of SupContrast's `losses.py`. The heads' objectives call
them (the trainer only sums the terms a head returns) on its embeddings (`HeadOutput.text`
= T_a, `HeadOutput.image` = I_a): SPP-SCL's step one adds `supcon(T_a, y) + supcon(I_a, y)`;
its step two runs `cross_supcon` only when `should_pull` says the two modalities are not
aligned yet.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _cosine_logits(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """norm(a) norm(b)^T / tau, (B, B): rows are a's anchors. a, b: (B, D) at any scale."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature


def _log_softmax(logits: Tensor) -> Tensor:
    """Row-wise log-softmax of (B, B) logits; entries may be -inf (a removed self)."""
    # for numerical stability (a per-row constant cancels in the log-softmax)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    return logits - logits.exp().sum(dim=1, keepdim=True).log()


def _mean_over_positives(log_prob: Tensor, positives: Tensor) -> Tensor:
    """-mean_i ( mean_{p in P(i)} log_prob[i, p] ); log_prob, positives: (B, B).

    A row without positives contributes 0 but still counts in the mean over all B rows
    (what the official code does), so a batch with a lone class member is not
    re-weighted towards the other rows.
    """
    n_pos = positives.sum(dim=1)
    # masked_fill, not a product: non-positive entries may be -inf (the removed self)
    per_row = log_prob.masked_fill(~positives, 0.0).sum(dim=1) / n_pos.clamp(min=1)
    return -per_row.mean()


def supcon(features: Tensor, labels: Tensor, temperature: float = 0.07,
           official: bool = False) -> Tensor:
    """Supervised contrastive loss within one modality: L_clt on T_a, L_cli on I_a.

    Khosla et al. 2020 (SupCon "out" form); SPP-SCL Eq. 4-5.
    features: (B, D) embeddings, any scale (L2-normalised here).
    labels:   (B,) int class ids.
    returns:  scalar. Positives of row i: same label, i itself excluded; the softmax of
              row i runs over j != i. Rows with no positive contribute 0.
    official: keep self in the denominator with logit 0 (the authors' code zeroes the
              diagonal of z z^T / tau before the softmax) instead of removing it.
    """
    n = features.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    # SupCon positives: y_i == y_j, i != j
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    if not positives.any():  # no pair shares a label (e.g. a batch of one): nothing to pull
        return features.sum() * 0.0
    # SupCon logits: z z^T / tau
    logits = _cosine_logits(features, features, temperature)
    if official:
        logits = logits.masked_fill(self_mask, 0.0)  # official: self logit 0, stays in denominator
    else:
        logits = logits.masked_fill(self_mask, float("-inf"))  # mask out self-contrast
    return _mean_over_positives(_log_softmax(logits), positives)


def cross_supcon(text: Tensor, image: Tensor, labels: Tensor,
                 temperature: float = 0.07) -> Tensor:
    """Cross-modal supervised contrastive loss L_clm(T, I, y) (SPP-SCL Eq. 7, step two).

    text:   (B, D) T_a, THE ANCHORS: row i is text i against every image j (as Eq. 7 and
            the official `T_I_Clos(T, I)`; anchoring on the images gives another loss).
    image:  (B, D) I_a, the contrasted side. Both L2-normalised here.
    labels: (B,) int class ids.
    returns scalar: logits norm(T) norm(I)^T / tau, softmax of row i over all images j,
            positives = images with y_j == y_i including its own pair j == i (so every
            row has at least one positive).
    """
    # cross-modal logits: norm(T) norm(I)^T / tau, (B, B), rows = text anchors
    logits = _cosine_logits(text, image, temperature)
    # positives: y_i == y_j, diagonal (the true pair) included
    positives = labels[:, None] == labels[None, :]
    return _mean_over_positives(_log_softmax(logits), positives)


@torch.no_grad()
def pull_gate(text: Tensor, image: Tensor, labels: Tensor) -> tuple[int, int]:
    """The two counts behind the step-two gate, returned for logging.

    text, image: (B, D) T_a, I_a as the head returned them (not normalised, as the
    official code). labels: (B,).
    returns (c, c_mask): c = #{(i, j): S_ij < d} with S = sigmoid(T_a I_a^T) and
    d = mean(diag(S)); c_mask = #{(i, j): y_i == y_j}, diagonal included.
    """
    # step two similarity: S = sigmoid(T_a I_a^T), d = mean(diag(S))
    s = torch.sigmoid(text @ image.T)
    d = s.diagonal().mean()
    c = int((s < d).sum())
    c_mask = int((labels[:, None] == labels[None, :]).sum())
    return c, c_mask


def should_pull(text: Tensor, image: Tensor, labels: Tensor, alpha: float = 2 / 3,
                floor: bool = False) -> bool:
    """True when step two must run: the pairs are not yet aligned enough.

    Few entries fall below the mean diagonal similarity when the true pairs do not
    stand out, so a small c means "pull". Shapes as in `pull_gate`.
    floor: the official code's rounding, which skips when c >= int(alpha * c_mask), so at
           c == floor(alpha * c_mask) it skips where the paper's gate pulls.
    """
    c, c_mask = pull_gate(text, image, labels)
    if floor:
        # official gate: c < int(alpha * c_mask)
        return c < int(alpha * c_mask)
    # step two gate: c < alpha * c_mask
    return c < alpha * c_mask
