"""A bidirectional GRU over ragged token rows that returns every token's states.

Same idea as bilstm.py (see its docstring): on CPU, `nn.GRU`'s autograd through time is
a long chain of tiny nodes and dominates the head's time. Here the input projection of
every token (both directions) is one matmul, both directions advance together in one
batched step over the packed (longest first) layout of ragged.PackPlan, and the
backward through time is written out by hand. The parameters live in a plain `nn.GRU`
(bias=False, so n = tanh(W_in x + r * (W_hn h))); the tests check this path against
`nn.GRU` on `pack_sequence` input, values and gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .ragged import pack_plan


class _GruSteps(torch.autograd.Function):
    """GRU recurrence of both directions on packed input gates.

    gx:   (2, N, 3h) input gates W_ih x of every packed row ([0] forward, [1] reverse),
          PyTorch gate order r, z, n.
    w_hh: (2, 3h, h) recurrent weights.
    returns (2, N, h): the hidden state of every packed row.
    """

    @staticmethod
    def forward(ctx, gx, w_hh, plan):
        hid, sizes = w_hh.shape[2], plan.batch_sizes
        w_t = w_hh.transpose(1, 2)
        n_rows = gx.shape[1]
        rz = gx.new_empty(2, n_rows, 2 * hid)  # sigmoid r, z
        new = gx.new_empty(2, n_rows, hid)  # candidate n
        hn = gx.new_empty(2, n_rows, hid)  # W_hn h_{t-1}
        hidden = gx.new_empty(2, n_rows, hid)
        h_prev = gx.new_zeros(2, sizes[0], hid)
        off = 0
        for n in sizes:
            rows = slice(off, off + n)
            gh = torch.bmm(h_prev[:, :n], w_t)  # W_hh h_{t-1}: (2, n, 3h)
            # r, z = sigmoid(W_i{r,z} x + W_h{r,z} h_{t-1})
            torch.sigmoid(gx[:, rows, :2 * hid] + gh[..., :2 * hid], out=rz[:, rows])
            r, z = rz[:, rows, :hid], rz[:, rows, hid:]
            hn[:, rows] = gh[..., 2 * hid:]
            # n = tanh(W_in x + r * W_hn h_{t-1})
            torch.tanh(torch.addcmul(gx[:, rows, 2 * hid:], r, hn[:, rows]), out=new[:, rows])
            # h_t = (1 - z) * n + z * h_{t-1} = n + z * (h_{t-1} - n)
            h = hidden[:, rows]
            torch.addcmul(new[:, rows], z, h_prev[:, :n] - new[:, rows], out=h)
            h_prev, off = h, off + n
        ctx.plan = plan
        ctx.save_for_backward(w_hh, rz, new, hn, hidden)
        return hidden

    @staticmethod
    def backward(ctx, d_hidden):
        w_hh, rz, new, hn, hidden = ctx.saved_tensors
        plan, hid = ctx.plan, w_hh.shape[2]
        sizes, n0 = plan.batch_sizes, plan.batch_sizes[0]
        d_hidden = d_hidden.contiguous()
        r, z = rz[..., :hid], rz[..., hid:]
        # h_{t-1} of every packed row (zeros at t = 0)
        h_prev = torch.cat([hidden.new_zeros(2, n0, hid), hidden.index_select(1, plan.previous_rows)], 1)
        # local derivatives of every step at once
        k_n = (1 - z) * (1 - new * new)  # dn_pre = dh * (1 - z) (1 - n^2)
        k_z = (h_prev - new) * z * (1 - z)  # dz_pre = dh * (h_{t-1} - n) z (1 - z)
        k_r = hn * r * (1 - r)  # dr_pre = dn_pre * W_hn h r (1 - r)
        d_gh = torch.empty(2, new.shape[1], 3 * hid, dtype=new.dtype, device=new.device)  # d(W_hh h_{t-1})
        d_gx = torch.empty_like(d_gh)
        dh_next = d_hidden.new_zeros(2, n0, hid)  # rows never written stay 0: sequence ended
        end = new.shape[1]
        for n in reversed(sizes):
            rows = slice(end - n, end)
            end -= n
            dh = d_hidden[:, rows] + dh_next[:, :n]
            dn = dh * k_n[:, rows]
            d_gx[:, rows, 2 * hid:] = dn
            torch.mul(dn, k_r[:, rows], out=d_gh[:, rows, :hid])
            torch.mul(dh, k_z[:, rows], out=d_gh[:, rows, hid:2 * hid])
            torch.mul(dn, r[:, rows], out=d_gh[:, rows, 2 * hid:])
            # dh_{t-1} = dh * z + d_gh W_hh
            dh_next[:, :n] = torch.baddbmm(dh * z[:, rows], d_gh[:, rows], w_hh)
        d_gx[..., :2 * hid] = d_gh[..., :2 * hid]
        # dW_hh = sum_t d_gh_t^T h_{t-1}, one matmul over all packed rows
        d_w = torch.bmm(d_gh.transpose(1, 2), h_prev) if ctx.needs_input_grad[1] else None
        return d_gx, d_w, None


class RaggedBiGRU(nn.Module):
    """BiGRU(in -> hidden per direction, 1 layer, no bias) over ragged rows.

    forward(x, lengths): x (T, in) ragged rows, lengths (B,) -> (T, 2*hidden) per-token
    [forward | reverse] states, as nn.GRU's output on the packed sequences.
    """

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.gru = nn.GRU(in_features, hidden, num_layers=1, bias=False, bidirectional=True)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        plan = pack_plan(lengths)
        gru, hid = self.gru, self.gru.hidden_size
        # input projection of every token for both directions: one (T, in) x (in, 6h) matmul
        g = x @ torch.cat([gru.weight_ih_l0, gru.weight_ih_l0_reverse]).T
        gx = torch.stack([g[:, :3 * hid].index_select(0, plan.forward_rows),
                          g[:, 3 * hid:].index_select(0, plan.backward_rows)])
        w_hh = torch.stack([gru.weight_hh_l0, gru.weight_hh_l0_reverse])
        hidden = _GruSteps.apply(gx, w_hh, plan)  # (2, N, h) packed rows
        # back to token order: packed row j of a direction is token row {forward,backward}_rows[j]
        h_f = hidden[0].index_select(0, torch.argsort(plan.forward_rows))
        h_b = hidden[1].index_select(0, torch.argsort(plan.backward_rows))
        return torch.cat([h_f, h_b], dim=1)
