"""One hop of the expert exchange: send token rows to the ranks their assignments go to, and back.

Shape legend: N rows here, D model width, S assignments here, P ranks in the hop's group, U rows sent
(unique (row, destination) pairs), U_r rows received, S_r assignments received.

A token routed top-2 often has both experts on one rank; sending its row once per assignment would send
it twice. A hop sends each row once per *destination rank* (`dedupe=True`) together with, per assignment,
the index of its row in the chunk and an integer payload (the expert, as the next stage needs it) and its
routing weight. The receiver computes sum_i weight_i * expert_i(row) per received row, so the way back
carries one row per sent row as well: deduplication saves bytes both ways, forward and backward.

Messages per hop: counts (2 ints per rank), rows, assignment metadata (2 int64), weights, and the
combine. The rows, weights and combine are autograd-aware (their backward is the reverse exchange).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeify.parallel.comm import CommTimer, all_to_all, exchange, exchange_counts

Tensor = torch.Tensor


@dataclass
class Received:
    """What a hop delivers: rows and the assignments that read them."""

    x: Tensor  # [U_r, D] received rows
    row: Tensor  # [S_r] int64: the received row each assignment reads
    payload: Tensor  # [S_r] int64: the sender's payload per assignment
    weight: Tensor  # [S_r] routing weight per assignment


@dataclass
class Hop:
    """The sent side of one hop, kept for the way back: `combine(y [U_r, D]) -> [N, D]`."""

    sent_row: Tensor  # [U] int64: the local row of each sent row
    send_splits: list[int]  # [P] rows sent to each rank
    recv_splits: list[int]  # [P] rows received from each rank
    num_rows: int  # N
    group: object
    timer: CommTimer | None

    def combine(self, y: Tensor) -> Tensor:
        """y [U_r, D] (one output per received row) -> [N, D], summed into the rows they came from."""
        back = all_to_all(y, self.send_splits, self.recv_splits, self.group, self.timer)  # [U, D]
        out = back.new_zeros((self.num_rows,) + tuple(back.shape[1:]))  # [N, D]
        return out.index_add(0, self.sent_row, back)


def _offsets(splits: Tensor) -> Tensor:
    """[P] counts -> [P] start offset of each chunk."""
    return torch.cumsum(splits, 0) - splits


def dispatch(x: Tensor, row: Tensor, dest: Tensor, payload: Tensor, weight: Tensor, world: int, group,
             dedupe: bool = True, timer: CommTimer | None = None) -> tuple[Received, Hop]:
    """Send the rows x[row] to ranks `dest` of `group` (size `world`), once per (row, dest) when `dedupe`.

    x [N, D]; row, dest, payload [S] int64; weight [S]. Returns what this rank received and the `Hop`
    whose `combine` brings the receivers' outputs back.
    """
    N, dev = x.shape[0], x.device
    key = dest * N + row  # [S] orders by destination, then row
    order = torch.argsort(key, stable=True)  # [S]
    key, payload, weight, dest = key[order], payload[order], weight[order], dest[order]
    if dedupe:
        sent_key, slot = torch.unique_consecutive(key, return_inverse=True)  # [U], [S]
    else:
        sent_key, slot = key, torch.arange(key.numel(), device=dev)  # one row per assignment
    sent_dest = torch.div(sent_key, N, rounding_mode="floor") if N else sent_key  # [U]
    sent_row = sent_key - sent_dest * N  # [U]
    rows_to = torch.bincount(sent_dest, minlength=world)  # [P] rows for each rank
    asg_to = torch.bincount(dest, minlength=world)  # [P] assignments for each rank
    slot_in_chunk = slot - _offsets(rows_to)[dest]  # [S] row index inside the destination's chunk

    counts = exchange_counts(torch.stack([rows_to, asg_to], 1).reshape(-1), group, timer).view(world, 2)
    rows_from, asg_from = counts[:, 0], counts[:, 1]  # [P], [P]
    send_splits, recv_splits = rows_to.tolist(), rows_from.tolist()
    asg_send, asg_recv = asg_to.tolist(), asg_from.tolist()

    x_recv = all_to_all(x[sent_row], recv_splits, send_splits, group, timer)  # [U_r, D]
    meta = exchange(torch.stack([slot_in_chunk, payload], 1), asg_recv, asg_send, group, timer)  # [S_r, 2]
    w_recv = all_to_all(weight, asg_recv, asg_send, group, timer)  # [S_r]
    source = torch.repeat_interleave(torch.arange(world, device=dev), asg_from)  # [S_r] sending rank
    recv_row = meta[:, 0] + _offsets(rows_from)[source]  # [S_r] index into x_recv
    received = Received(x=x_recv, row=recv_row, payload=meta[:, 1], weight=w_recv)
    return received, Hop(sent_row, send_splits, recv_splits, N, group, timer)
