"""Ragged text batches: tokens of all samples back to back, `lengths` says who is who.

The cache stores only real tokens, so the heads never pad: pooling is a segment sum
and the recurrent net runs on a packed, length-sorted, time-major layout built here
with a few index operations (no Python loop over samples).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def sample_ids(lengths: Tensor) -> Tensor:
    """(T,) index of the sample every token row belongs to; lengths: (B,)."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)


def segment_mean(x: Tensor, lengths: Tensor) -> Tensor:
    """Mean of each sample's rows. x: (T, F) ragged rows, lengths: (B,) -> (B, F)."""
    sums = x.new_zeros(len(lengths), x.shape[1]).index_add_(0, sample_ids(lengths), x)
    return sums / lengths.to(x.dtype)[:, None]


@dataclass
class PackPlan:
    """Packed (time-major, longest first) order of a ragged batch, as in PackedSequence.

    At step t the samples still running are ranks 0 .. batch_sizes[t]-1, which lets a
    recurrent step work on a prefix of the state instead of masking padding.
    """

    order: Tensor  # (B,) sample index of each rank, longest first
    inverse: Tensor  # (B,) rank of each sample
    batch_sizes: list[int]  # samples still running at each step
    forward_rows: Tensor  # (T,) token row of packed row (step t, rank r): position t
    backward_rows: Tensor  # (T,) same for the reverse direction: position len-1-t
    rank_rows: Tensor  # (T,) rank r of each packed row
    previous_rows: Tensor  # (T - B,) packed row (t-1, r) of each row (t, r) with t >= 1


def pack_plan(lengths: Tensor) -> PackPlan:
    """Build the packed order for `lengths` (B,) int64, every length >= 1."""
    device = lengths.device
    lengths = lengths.cpu()
    sorted_len, order = torch.sort(lengths, descending=True, stable=True)
    steps = torch.arange(int(sorted_len[0]))[:, None]  # (S, 1)
    running = steps < sorted_len[None, :]  # (S, B); row-major == packed order
    start = (torch.cumsum(lengths, 0) - lengths)[order]  # first token row of each rank
    forward_rows = (start[None, :] + steps)[running]
    backward_rows = (start[None, :] + sorted_len[None, :] - 1 - steps)[running]
    ranks = torch.arange(len(lengths))[None, :]
    batch_sizes = running.sum(1)
    step_offsets = torch.cumsum(batch_sizes, 0) - batch_sizes  # first packed row of each step
    previous_rows = (step_offsets[:-1, None] + ranks)[running[1:]]
    return PackPlan(
        order=order.to(device),
        inverse=torch.argsort(order).to(device),
        batch_sizes=batch_sizes.tolist(),
        forward_rows=forward_rows.to(device),
        backward_rows=backward_rows.to(device),
        rank_rows=ranks.expand_as(running)[running].to(device),
        previous_rows=previous_rows.to(device),
    )


def pad(x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Ragged rows (T, F) -> padded (B, S, F) with zeros after each end, and mask (B, S)
    true on real tokens (for attention over tokens: pass ~mask as key_padding_mask)."""
    ids = sample_ids(lengths)
    pos = torch.arange(len(ids), device=x.device) - (torch.cumsum(lengths, 0) - lengths)[ids]
    out = x.new_zeros(len(lengths), int(lengths.max()), x.shape[1])
    out[ids, pos] = x
    mask = torch.zeros(out.shape[:2], dtype=torch.bool, device=x.device)
    mask[ids, pos] = True
    return out, mask
