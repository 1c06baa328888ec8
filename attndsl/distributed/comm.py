"""The collectives of context parallelism, as autograd functions.

The K/V exchange is one all-to-all with variable splits. `launch` starts it before the
local blocks are computed and `land` waits for it after, so communication overlaps the
local compute; backward mirrors it: `land`'s backward starts returning dK/dV partial sums to
the owners of the received keys, the local blocks' backward runs meanwhile, and `launch`'s
backward waits and adds the partial sums other ranks computed for this rank's keys.
Payloads travel as bytes, so every dtype moves the same way (gloo on CPUs, NCCL on GPUs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _rows(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """[B, H, n, D] -> [n', B * H * D] bytes: the rows idx (all without), token-major."""
    if idx is not None:
        x = x.index_select(2, idx)
    width = x.shape[0] * x.shape[1] * x.shape[3]
    return x.permute(2, 0, 1, 3).contiguous().view(x.shape[2], width).view(torch.uint8)


def _unrows(buf: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Bytes [n, B * H * D * size] -> [B, H, n, D] of dtype."""
    B, H, D = shape
    x = buf.contiguous().view(dtype).view(buf.shape[0], B, H, D)
    return x.permute(1, 2, 0, 3).contiguous()


class Exchange:
    """One call's K/V exchange: which local rows go to which rank, the collectives in
    flight, and the payload bytes handed to them for other ranks."""

    def __init__(self, send_rows: torch.Tensor, send_splits, recv_splits, group):
        self.send_rows = send_rows
        self.send_splits = list(send_splits)
        self.recv_splits = list(recv_splits)
        self.group = group
        self.work = self.recv = self.buf = None
        self.grad_work = self.grad_recv = self.grad_buf = None
        self.kv_bytes = self.grad_bytes = 0
        self.shapes = None

    def start(self, k, v) -> None:
        B, H = k.shape[:2]
        self.shapes = ((B, H, k.shape[3]), (B, H, v.shape[3]), k.dtype)
        self.buf = torch.cat([_rows(k, self.send_rows), _rows(v, self.send_rows)], dim=1)
        self.recv = self.buf.new_empty(sum(self.recv_splits), self.buf.shape[1])
        self.kv_bytes = self.buf.numel()
        self.work = dist.all_to_all_single(self.recv, self.buf, self.recv_splits,
                                           self.send_splits, group=self.group, async_op=True)

    def finish(self):
        self.work.wait()
        self.buf = None
        (kshape, vshape, dtype), fk = self.shapes, self._width(self.shapes[0])
        return (_unrows(self.recv[:, :fk], kshape, dtype),
                _unrows(self.recv[:, fk:], vshape, dtype))

    def _width(self, shape) -> int:
        B, H, D = shape
        return B * H * D * torch.empty(0, dtype=self.shapes[2]).element_size()

    def return_grads(self, dk, dv) -> None:
        """Start sending the received keys' gradients back to their owners."""
        self.grad_buf = torch.cat([_rows(dk, None), _rows(dv, None)], dim=1)
        self.grad_recv = self.grad_buf.new_empty(sum(self.send_splits), self.grad_buf.shape[1])
        self.grad_bytes = self.grad_buf.numel()
        self.grad_work = dist.all_to_all_single(self.grad_recv, self.grad_buf,
                                                self.send_splits, self.recv_splits,
                                                group=self.group, async_op=True)

    def add_returned(self, dk, dv):
        """dk, dv plus the partial sums other ranks returned for the rows this rank sent."""
        if self.grad_work is None:
            return dk, dv
        self.grad_work.wait()
        (kshape, vshape, dtype), fk = self.shapes, self._width(self.shapes[0])
        out = []
        for d, part, shape in ((dk, self.grad_recv[:, :fk], kshape),
                               (dv, self.grad_recv[:, fk:], vshape)):
            g = _unrows(part, shape, dtype)
            acc = d.to(torch.promote_types(d.dtype, torch.float32))
            acc = acc.index_add(2, self.send_rows, g.to(acc.dtype))
            out.append(acc.to(d.dtype))
        self.grad_buf = self.grad_recv = None
        return tuple(out)


class _Launch(torch.autograd.Function):
    """k, v unchanged; starts the exchange (forward), adds the returned gradients
    (backward)."""

    @staticmethod
    def forward(ctx, k, v, ex: Exchange):
        ex.start(k, v)
        ctx.ex = ex
        return k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dk, dv):
        dk, dv = ctx.ex.add_returned(dk, dv)
        return dk, dv, None


class _Land(torch.autograd.Function):
    """The received keys and values (forward); their gradients start back (backward)."""

    @staticmethod
    def forward(ctx, k, v, dep, ex: Exchange):
        ctx.ex = ex
        return (*ex.finish(), dep.clone())

    @staticmethod
    def backward(ctx, dk, dv, ddep):
        ctx.ex.return_grads(dk, dv)
        return None, None, ddep, None


def launch(k, v, ex: Exchange):
    return _Launch.apply(k, v, ex)


def land(k, v, ex: Exchange, dep: torch.Tensor):
    """(received k, received v, dep after this collective): see `order`."""
    return _Land.apply(k, v, dep, ex)


def order(*tensors) -> torch.Tensor:
    """The first link of a chain that orders the collectives of the backward.

    Autograd runs a backward node once every node using its outputs has run; which of two
    independent branches goes first depends on the graph, and ranks build different graphs
    (one receives no key block, another pools no summary token). Collectives issued in a
    different order on two ranks deadlock. So each collective takes the chain's last link
    and returns the next; the last joins the output (times 0): backward then meets the
    collectives in exactly the reverse of the forward's order on every rank."""
    need = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return torch.zeros((), dtype=torch.float64, requires_grad=need)


class _Rows(torch.autograd.Function):
    """Rows `send` of x [B, H, n, D] (grouped by destination, `send_splits` rows to each)
    to their ranks; each rank gets [B, H, sum(recv_splits), D], by source. Backward sends
    the gradients back and adds each at the row it came from."""

    @staticmethod
    def forward(ctx, x, dep, send, send_splits, recv_splits, group, counter):
        buf = x.index_select(2, send).permute(2, 0, 1, 3).contiguous()
        recv = buf.new_empty((sum(recv_splits),) + tuple(buf.shape[1:]))
        dist.all_to_all_single(recv, buf, list(recv_splits), list(send_splits), group=group)
        if counter is not None:
            me = dist.get_rank(group)
            row = buf[0].numel() * buf.element_size() if buf.shape[0] else 0
            counter[0] += row * sum(n for r, n in enumerate(send_splits) if r != me)
        ctx.save_for_backward(send)
        ctx.meta = (x.shape, send_splits, recv_splits, group)
        return recv.permute(1, 2, 0, 3), dep.clone()

    @staticmethod
    def backward(ctx, g, ddep):
        (send,) = ctx.saved_tensors
        shape, send_splits, recv_splits, group = ctx.meta
        g = g.permute(2, 0, 1, 3).contiguous()
        back = g.new_empty((sum(send_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(back, g, list(send_splits), list(recv_splits), group=group)
        dx = g.new_zeros(shape).index_add(2, send, back.permute(1, 2, 0, 3))
        return dx, ddep, None, None, None, None, None


def send_rows(x: torch.Tensor, dep: torch.Tensor, send: torch.Tensor, send_splits,
              recv_splits, group, counter: list | None = None):
    """(x's rows `send` at their ranks, dep after this collective): differentiably, one
    all-to-all with variable splits, self included; `counter[0]` grows by the bytes sent
    to other ranks."""
    return _Rows.apply(x, dep, send, tuple(send_splits), tuple(recv_splits), group, counter)


class _Gather(torch.autograd.Function):
    """[ranks, *x.shape]: every rank's x; backward: each rank's gradient for this rank's x,
    summed (an all-to-all, which gloo has and reduce-scatter it lacks)."""

    @staticmethod
    def forward(ctx, x, group, counter):
        x = x.contiguous()
        ranks = dist.get_world_size(group)
        out = [torch.empty_like(x) for _ in range(ranks)]
        dist.all_gather(out, x, group=group)
        ctx.group = group
        if counter is not None:
            counter[0] += x.numel() * x.element_size() * (ranks - 1)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        recv = torch.empty_like(g)
        dist.all_to_all_single(recv, g, group=ctx.group)
        return recv.sum(0), None, None


def gather(x: torch.Tensor, group, counter: list | None = None) -> torch.Tensor:
    """Every rank's x stacked [ranks, ...], differentiably; `counter[0]` grows by the bytes
    this rank sends."""
    return _Gather.apply(x, group, counter)
