"""A bidirectional LSTM over ragged token rows that returns the mean over real tokens.

Why not `nn.LSTM` on a PackedSequence: on CPU its packed path projects the inputs
step by step and its backward is a long chain of tiny autograd nodes, and the BiLSTM
is most of the head's time. Here the input projection of every token (both
directions) is one matmul, both directions advance together in one batched step, and
the backward through time is written out by hand with its local derivatives computed
for all steps at once. The parameters live in a plain `nn.LSTM` (same names in
checkpoints); the tests check this path against `nn.LSTM` on `pack_sequence` input,
values and gradients. Only what the head needs: one layer, bias=False, mean over time.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .ragged import PackPlan, pack_plan


class _SummedSteps(torch.autograd.Function):
    """LSTM recurrence of both directions on packed input gates; returns per-rank sums.

    gx:    (2, N, 4h) input gates W_ih x of every packed row; [0] the forward direction
           (position order), [1] the reverse direction (reverse position order).
    w_hh:  (2, 4h, h) recurrent weights, PyTorch gate order i, f, g, o.
    plan:  the PackPlan of the batch (steps, ranks, previous rows).
    returns (2, B, h): per rank, the sum over its steps of the hidden state.
    """

    @staticmethod
    def forward(ctx, gx, w_hh, plan):
        hid, sizes = w_hh.shape[2], plan.batch_sizes
        w_t = w_hh.transpose(1, 2)
        n_rows = gx.shape[1]
        acts = gx.new_empty(2, n_rows, 4 * hid)  # sigmoid of every gate (g quarter unused)
        tanh_g = gx.new_empty(2, n_rows, hid)
        cells = gx.new_empty(2, n_rows, hid)
        hidden = gx.new_empty(2, n_rows, hid)
        h_prev = gx.new_zeros(2, sizes[0], hid)
        off = prev = 0
        for t, n in enumerate(sizes):
            rows = slice(off, off + n)
            a, g, c, h = acts[:, rows], tanh_g[:, rows], cells[:, rows], hidden[:, rows]
            # LSTM gates: W_ih x_t + W_hh h_{t-1}
            gates = torch.baddbmm(gx[:, rows], h_prev[:, :n], w_t)
            torch.sigmoid(gates, out=a)
            torch.tanh(gates[..., 2 * hid:3 * hid], out=g)
            # c_t = f * c_{t-1} + i * g
            if t == 0:
                torch.mul(a[..., :hid], g, out=c)
            else:
                torch.mul(a[..., hid:2 * hid], cells[:, prev:prev + n], out=c)
                c.addcmul_(a[..., :hid], g)
            # h_t = o * tanh(c_t)
            torch.tanh(c, out=h)
            h.mul_(a[..., 3 * hid:])
            h_prev, prev, off = h, off, off + n
        ctx.plan = plan
        ctx.save_for_backward(w_hh, acts, tanh_g, cells, hidden)
        # sum over time of each rank's hidden states
        return gx.new_zeros(2, sizes[0], hid).index_add_(1, plan.rank_rows, hidden)

    @staticmethod
    def backward(ctx, d_total):
        w_hh, acts, tanh_g, cells, hidden = ctx.saved_tensors
        plan, hid = ctx.plan, w_hh.shape[2]
        sizes, n0 = plan.batch_sizes, plan.batch_sizes[0]
        d_total = d_total.contiguous()
        i, f, o = acts[..., :hid], acts[..., hid:2 * hid], acts[..., 3 * hid:]
        g, tc = tanh_g, torch.tanh(cells)

        def previous(x):  # x at step t-1 for every packed row (zeros at t = 0)
            return torch.cat([x.new_zeros(2, n0, hid), x.index_select(1, plan.previous_rows)], 1)

        # local derivatives of every step at once: dc += dh * o (1 - tanh^2 c)
        k_c = o * (1 - tc * tc)
        # d gates = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g^2), dh tanh(c) o(1-o)]
        k = torch.cat([g * i * (1 - i), previous(cells) * f * (1 - f), i * (1 - g * g),
                       tc * o * (1 - o)], dim=2)
        d_gx = torch.empty_like(acts)
        # gradients from step t+1; rows never written stay 0, right for ranks whose
        # sequence ends at step t
        dh_next, dc_next = d_total.new_zeros(2, n0, hid), d_total.new_zeros(2, n0, hid)
        end = acts.shape[1]
        for n in reversed(sizes):
            rows = slice(end - n, end)
            end -= n
            dh = d_total[:, :n] + dh_next[:, :n]
            dc = torch.addcmul(dc_next[:, :n], dh, k_c[:, rows])
            d = d_gx[:, rows]
            torch.mul(dc.unsqueeze(2), k[:, rows, :3 * hid].unflatten(2, (3, hid)),
                      out=d[..., :3 * hid].unflatten(2, (3, hid)))
            torch.mul(dh, k[:, rows, 3 * hid:], out=d[..., 3 * hid:])
            dh_next[:, :n] = torch.bmm(d, w_hh)
            torch.mul(dc, f[:, rows], out=dc_next[:, :n])
        # dW_hh = sum_t dgates_t^T h_{t-1}, one matmul over all packed rows
        d_w = torch.bmm(d_gx.transpose(1, 2), previous(hidden)) if ctx.needs_input_grad[1] else None
        return d_gx, d_w, None


class RaggedBiLSTM(nn.Module):
    """BiLSTM(in -> hidden per direction, 1 layer, no bias) + mean over real tokens.

    forward(x, lengths, plan=None): x (T, in) ragged rows, lengths (B,) -> (B, 2*hidden),
    [forward | reverse] halves as in nn.LSTM's output. There is no padding, so none
    enters the mean.
    """

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(in_features, hidden, num_layers=1, bias=False, bidirectional=True)

    def forward(self, x: Tensor, lengths: Tensor, plan: PackPlan | None = None) -> Tensor:
        plan = plan if plan is not None else pack_plan(lengths)
        lstm, hid = self.lstm, self.lstm.hidden_size
        # input projection of every token for both directions: one (T, in) x (in, 8h) matmul
        g = x @ torch.cat([lstm.weight_ih_l0, lstm.weight_ih_l0_reverse]).T
        gx = torch.stack([g[:, :4 * hid].index_select(0, plan.forward_rows),
                          g[:, 4 * hid:].index_select(0, plan.backward_rows)])
        w_hh = torch.stack([lstm.weight_hh_l0, lstm.weight_hh_l0_reverse])
        total = _SummedSteps.apply(gx, w_hh, plan)  # (2, B, h), rank order
        # BiLSTM output: mean over real tokens only
        total = total.index_select(1, plan.inverse).permute(1, 0, 2).reshape(len(lengths), 2 * hid)
        return total / lengths.to(total.dtype)[:, None]
