"""`torch.ops.moeify.grouped_ffn`: the dispatch custom op, with a grouped CPU kernel and its backward.

Shape legend: T tokens, D model width, H expert hidden width (H1 = 2H when gated), E experts,
N assignments, M kept assignments (expert index < E), n_e rows of expert e.

Ops (all `torch.library` custom ops with fake kernels, so `torch.compile` and `torch.export` see them):
  moeify::grouped_ffn(Tensor x, Tensor token_idx, Tensor expert_idx, Tensor weight, Tensor w1, Tensor? b1,
                      Tensor w2, Tensor? b2, str activation, bool gated) -> Tensor
      The public op (schema fixed; the ONNX lowering maps it). Meaning: exactly `reference_grouped_ffn`
      (x [T, D] -> [T, D]). Its backward recomputes the first GEMM.
  moeify::grouped_ffn_train(same inputs) -> (Tensor out, Tensor h, Tensor a, Tensor y)
      The same forward, also returning the intermediates the backward needs (see the note above it) so
      the backward redoes no GEMM. `moeify.dispatch.grouped_ffn` uses it when a gradient is wanted (and
      not while exporting: the public op is what the lowering maps).
  moeify::grouped_ffn_backward(grad_out, inputs..., Tensor? h, Tensor? a, Tensor? y, ...,
                               bool[] output_mask) -> Tensor[]
      The hand-written backward both ops share; grads the output mask leaves out come back empty.
  moeify::grouped_ffn_backward_into(same inputs, Tensor(a!)? acc_w1, Tensor(b!)? acc_w2) -> Tensor[]
      The same backward adding the grads of w1 and w2 into existing `.grad` tensors in place (gradient
      accumulation with no zero_grad between steps; chosen by `_grad_to_add_into`, eager CPU only).

The kernel: a stable sort of assignments by expert (dropped assignments, index E, sort last and are never
touched), counts by bincount, one gather of token rows, then per non-empty expert group: GEMM, activation,
GEMM, each written straight into a slice of a preallocated buffer (`out=`) while the group's rows are
still in cache; then the combine weight as one row scale and one `index_add_` back. Groups of at most
COLMAJOR_MAX_ROWS rows write their forward GEMMs column-major (MKL is up to 2.7x faster that way there;
the activation between them stays row-major for the smallest groups, ROWMAJOR_ACT_MAX_ROWS).
The backward is the same shape (four GEMMs per group, writing slices of the stacked weight gradients,
whose memory is recycled from step to step: `moeify.dispatch.buffers`). Activations and their
derivatives use torch's fused out= kernels where torch has them (gelu, gelu_tanh, silu, relu).
`torch._grouped_mm` works on CPU in this torch (for 16-byte-aligned strides) but measured no faster than
the per-group `mm` loop at E=64 and 2.5x slower at E=128, so the loop it is, on the CPU. On CUDA the three
ops run the grouped-GEMM kernels of `moeify.dispatch.grouped` (registered there with `register_kernel`).
"""

from __future__ import annotations

import torch
from torch.autograd.graph import get_gradient_edge

from moeify.activations import activation_fn, activation_grad
from moeify.dispatch.buffers import empty_grad_like, empty_saved

Tensor = torch.Tensor


def _plan(expert_idx: Tensor, num_experts: int) -> tuple[Tensor, list[int]]:
    """Stable order of the kept assignments by expert, and each expert's group size.

    Returns order [M] (indices into the N assignments) and sizes (E python ints, summing to M).
    """
    counts = torch.bincount(expert_idx, minlength=num_experts + 1)  # [E+1]; index E = dropped
    sizes = counts[:num_experts].tolist()  # one host sync; the GEMM loop needs the sizes anyway
    order = torch.argsort(expert_idx, stable=True)[: sum(sizes)]  # [M]
    return order, sizes


def _gemm_bias(a: Tensor, b: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """out = a @ b (+ bias), written into `out` (a slice of a preallocated buffer)."""
    if bias is None:
        return torch.mm(a, b, out=out)
    return torch.addmm(bias, a, b, out=out)


def _act_into(h: Tensor, activation: str, out: Tensor) -> Tensor:
    """out = act(h) elementwise, with no temporary for the activations torch has an out= kernel for."""
    if activation in ("gelu", "gelu_tanh"):
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        return torch.ops.aten.gelu.out(h, approximate=approximate, out=out)
    if activation == "silu":
        return torch.ops.aten.silu.out(h, out=out)
    if activation == "relu":
        return torch.clamp_min(h, 0, out=out)
    return out.copy_(activation_fn(activation)(h))


def _activate(h: Tensor, activation: str, gated: bool, out: Tensor) -> Tensor:
    """h [n, H1] -> out [n, H] = act(h), or act(gate) * up when gated (h = [gate | up])."""
    if not gated:
        return _act_into(h, activation, out)
    gate, up = h.chunk(2, dim=-1)  # [n, H] each
    return _act_into(gate, activation, out).mul_(up)


def _act_backward(grad: Tensor, h: Tensor, activation: str, out: Tensor) -> Tensor:
    """out = grad * act'(h), elementwise, [M, H]. The activations torch has a fused backward kernel for
    use it (one memory pass instead of the ~8 the composed derivative in `moeify.activations` takes, which
    cost as much as a GEMM at these widths); the others use that derivative."""
    if activation == "identity":
        return out.copy_(grad)
    if activation == "relu":
        return torch.ops.aten.threshold_backward.grad_input(grad, h, 0, grad_input=out)
    if activation in ("gelu", "gelu_tanh"):
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        return torch.ops.aten.gelu_backward.grad_input(grad, h, approximate=approximate, grad_input=out)
    if activation == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, h, grad_input=out)
    return torch.mul(grad, activation_grad(activation)(h), out=out)


# Up to this many rows, MKL runs `x @ w.T` faster when its output is column-major: 0.4-0.7x the time for
# 16 <= n <= 48, 0.9x at 8 and 56, 1.3-1.6x (slower) from 60 up, at d=512, d_ff=2048 on the 2-core dev
# machine (`python benchmarks/dispatch_choices.py`, part 1). `g @ w` (the backward's GEMMs on the weights)
# measured best row-major at every size, so only the forward GEMMs and their recompute use this.
COLMAJOR_MAX_ROWS = 56
# ... but for groups of at most this many rows the activation a between the two GEMMs is written row-major:
# there MKL runs `a @ w2.T` into a column-major output at about half speed when a is column-major too (n=8:
# the all-column-major forward 1.28x the row-major one, with a row-major 1.05x; n=4: 0.72x), while from 16
# rows up the activation's transposing write costs more than it saves (`dispatch_choices.py`, part 1).
ROWMAJOR_ACT_MAX_ROWS = 10


def _scratch(flat: Tensor, n: int, cols: int, colmajor: bool) -> Tensor:
    """An [n, cols] view of the start of the flat buffer `flat`, column-major when `colmajor`."""
    if colmajor:
        return flat[: n * cols].view(cols, n).t()
    return flat[: n * cols].view(n, cols)


def _ffn_group(xs_e: Tensor, w1_e: Tensor, b1_e: Tensor | None, w2_e: Tensor | None, b2_e: Tensor | None,
               activation: str, gated: bool, scratch: tuple[Tensor, Tensor, Tensor],
               dst: tuple[Tensor | None, Tensor | None, Tensor | None],
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One expert on its rows: xs_e [n, D] -> h [n, H1] (pre-activation), a [n, H], y [n, D] (None, and
    the second GEMM skipped, when w2_e is None: the backward's recompute needs only h and a).

    Each result lands in its row-major destination in `dst` when one is given, else in `scratch` (flat
    buffers of at least n_max * width elements, reused by every group so they stay in cache). Groups of at
    most COLMAJOR_MAX_ROWS rows compute into column-major scratch and copy to their destination (a
    transposing copy of n rows costs far less than the slow GEMM orientation), except the activation a of
    groups of at most ROWMAJOR_ACT_MAX_ROWS rows, written row-major. Returns the three results (views)."""
    n, H1, D = xs_e.shape[0], w1_e.shape[0], xs_e.shape[1]
    H = H1 // 2 if gated else H1
    colmajor = n <= COLMAJOR_MAX_ROWS
    h_dst, a_dst, y_dst = dst
    h = _scratch(scratch[0], n, H1, colmajor) if (colmajor or h_dst is None) else h_dst
    _gemm_bias(xs_e, w1_e.t(), b1_e, h)
    # a, the second GEMM's left operand, is column-major with h except for the smallest groups (see
    # ROWMAJOR_ACT_MAX_ROWS); a row-major destination is written directly when there is one
    a_colmajor = colmajor and n > ROWMAJOR_ACT_MAX_ROWS
    a = _scratch(scratch[1], n, H, a_colmajor) if (a_colmajor or a_dst is None) else a_dst
    _activate(h, activation, gated, out=a)
    y = None
    if w2_e is not None:
        y = _scratch(scratch[2], n, D, colmajor) if (colmajor or y_dst is None) else y_dst
        _gemm_bias(a, w2_e.t(), b2_e, y)
    results = []
    for got, want in ((h, h_dst), (a, a_dst), (y, y_dst)):
        if want is not None and got is not want:
            want.copy_(got)
        results.append(got if want is None else want)
    return results[0], results[1], results[2]


def _flat_scratch(x: Tensor, n_max: int, H1: int, H: int, D: int) -> tuple[Tensor, Tensor, Tensor]:
    """Flat scratch for `_ffn_group`: room for n_max rows of h, a and y."""
    return x.new_empty(n_max * H1), x.new_empty(n_max * H), x.new_empty(n_max * D)


def _forward(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, w1: Tensor, b1: Tensor | None,
             w2: Tensor, b2: Tensor | None, activation: str, gated: bool,
             keep: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The grouped forward: out [T, D], and when `keep`, for the backward, h [N, H1] (pre-activation),
    a [N, H] (activation) and y [N, D] (expert output before the combine weight), rows in expert order,
    rows past M (dropped assignments) zero. Without `keep` those three are empty."""
    N, E, H1, D, H = expert_idx.shape[0], w1.shape[0], w1.shape[1], x.shape[1], w2.shape[2]
    out = torch.zeros_like(x)  # [T, D]
    rows = N if keep else 0  # static shapes (N, not M) so the fake kernel needs no data-dependent size
    h, a = empty_saved(x, rows, H1), empty_saved(x, rows, H)  # recycled memory when large (see buffers)
    y = x.new_empty(rows, D)
    order, sizes = _plan(expert_idx, E)
    M = order.shape[0]
    if keep:
        for t in (h, a, y):
            t[M:].zero_()  # dropped rows: defined values, never read
    if M == 0:
        return out, h, a, y
    tok = token_idx[order]  # [M]
    xs = x.index_select(0, tok)  # [M, D]: each token row gathered once per assignment
    ys = y[:M] if keep else x.new_empty(M, D)  # [M, D]
    scratch = _flat_scratch(x, max(sizes), H1, H, D)
    # One pass per group: GEMM, activation, GEMM on rows still in cache (passes over all M rows between
    # the GEMMs would stream [M, H] through memory several times; it measured slower).
    xs_g, ys_g = xs.split(sizes), ys.split(sizes)  # per-group views, one call each (see _backward)
    h_g, a_g = (h[:M].split(sizes), a[:M].split(sizes)) if keep else (None, None)
    w1_e, w2_e = w1.unbind(0), w2.unbind(0)
    b1_e = (None,) * E if b1 is None else b1.unbind(0)
    b2_e = (None,) * E if b2 is None else b2.unbind(0)
    for e, n in enumerate(sizes):
        if n:
            dst = (h_g[e], a_g[e], ys_g[e]) if keep else (None, None, ys_g[e])
            _ffn_group(xs_g[e], w1_e[e], b1_e[e], w2_e[e], b2_e[e], activation, gated, scratch, dst)
    ws = weight[order].to(x.dtype).unsqueeze(1)  # [M, 1] combine weights
    out.index_add_(0, tok, ys * ws if keep else ys.mul_(ws))  # keep the saved y unscaled
    return out, h, a, y


def _weight_grad(a: Tensor, b: Tensor, out: Tensor, add: bool) -> Tensor:
    """out = a @ b, or out += a @ b when `add` (one GEMM with beta 1: no temporary, one pass over out)."""
    return out.addmm_(a, b) if add else torch.mm(a, b, out=out)


def _unwanted(t: Tensor | None, x: Tensor) -> Tensor:
    """Placeholder for a gradient nobody asked for (custom ops cannot return None): empty, t's dtype."""
    return x.new_empty(0, dtype=(x if t is None else t).dtype)


def _backward(grad_out: Tensor, x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
              w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, saved: list[Tensor] | None,
              activation: str, gated: bool, output_mask: list[bool],
              into: tuple[Tensor | None, Tensor | None] = (None, None)) -> list[Tensor]:
    """Grads of (x, weight, w1, b1, w2, b2); an unwanted or absent one is an empty tensor.

    `into` = (acc_w1, acc_w2): existing gradients [E, H1, D], [E, D, H] (or None) that the grads of w1 and
    w2 are added into in place (`addmm_`, beta 1: the GEMM reads and writes them once), instead of being
    returned (their slot then holds an empty tensor). See `grouped_ffn_backward_into_op`.

    `saved` is the training forward's [h, a, y] or None (then h and a are recomputed, y is not needed).
    Per group e (rows s:t), with go = grad_out gathered to assignment rows and w the combine weights:
      grad_weight = <go, y>                       per row (without y: <go @ w2[e], a> + <go, b2[e]>)
      ga = w * (go @ w2[e]);  gh = ga * act'(h)   (gated: [ga * up * act'(gate) | ga * act(gate)])
      grad_w2[e] = (w * go)^T @ a,  grad_w1[e] = gh^T @ xs,  grad_xs = gh @ w1[e]
    Every per-expert GEMM writes its slice of the stacked gradients directly (`out=`); nothing indexes the
    stacked weights inside an autograd graph (that made the backward quadratic in E).
    """
    want_x, want_weight, want_w1, want_b1, want_w2, want_b2 = output_mask
    want_b1 = want_b1 and b1 is not None
    want_b2 = want_b2 and b2 is not None
    E, H1, D, H = w1.shape[0], w1.shape[1], x.shape[1], w2.shape[2]
    gx = torch.zeros_like(x) if want_x else _unwanted(x, x)  # [T, D]
    gweight = torch.zeros_like(weight) if want_weight else _unwanted(weight, x)  # [N]
    # Stacked weight grads: written slice by slice (only empty experts get zeroed), into recycled memory
    # when large (see moeify.dispatch.buffers: fresh mmapped pages cost more than the GEMMs at large E).
    acc_w1, acc_w2 = into
    gw1 = empty_grad_like(w1) if want_w1 and acc_w1 is None else _unwanted(w1, x)  # [E, H1, D]
    gw2 = empty_grad_like(w2) if want_w2 and acc_w2 is None else _unwanted(w2, x)  # [E, D, H]
    gb1 = torch.empty_like(b1) if want_b1 else _unwanted(b1, x)  # [E, H1]
    gb2 = torch.empty_like(b2) if want_b2 else _unwanted(b2, x)  # [E, D]
    order, sizes = _plan(expert_idx, E)
    M = order.shape[0]
    zero_if_empty = ((gw1, want_w1 and acc_w1 is None), (gw2, want_w2 and acc_w2 is None), (gb1, want_b1),
                     (gb2, want_b2))
    for e, n in enumerate(sizes):
        if n == 0:
            for g, wanted in zero_if_empty:
                if wanted:
                    g[e].zero_()
    if M == 0 or not any((want_x, want_weight, want_w1, want_b1, want_w2, want_b2)):
        return [gx, gweight, gw1, gb1, gw2, gb2]

    tok = token_idx[order]  # [M]
    xs = x.index_select(0, tok)  # [M, D] (re-gathered: cheaper than keeping it alive since the forward)
    ws = weight[order].to(x.dtype).unsqueeze(1)  # [M, 1]
    go = grad_out.index_select(0, tok)  # [M, D]
    h, a, y = (None, None, None) if saved is None else (t[:M] for t in saved)  # [M, H1], [M, H], [M, D]
    gw_rows = None
    if want_weight and y is not None:
        gw_rows = torch.linalg.vecdot(go, y)  # [M]: <grad_out row, expert output>
    elif want_weight:
        gw_rows = x.new_empty(M)  # [M], filled group by group
    want_gh = want_x or want_w1 or want_b1
    gy = go * ws if (want_w2 or want_b2) else None  # [M, D]: grad wrt the expert output
    gxs = x.new_empty(M, D) if want_x else None  # [M, D]
    n_max = max(sizes)
    # Workspaces reused by every group, so a group's intermediates stay in cache between its GEMMs.
    ga_ws = x.new_empty(n_max, H) if (want_gh or (gw_rows is not None and y is None)) else None
    gh_ws = x.new_empty(n_max, H1) if want_gh else None
    if saved is None:  # recompute h and a group by group, into row-major scratch (the layout used below)
        scratch = _flat_scratch(x, n_max, H1, H, D)
        h_ws, a_ws = x.new_empty(n_max, H1), x.new_empty(n_max, H)
    # Per-group views made in one call each (split / unbind), not sliced per group in Python: at E=128 the
    # per-slice dispatch overhead was a measurable part of the step.
    xs_g, go_g, ws_g = xs.split(sizes), go.split(sizes), ws.split(sizes)
    h_g, a_g = (None, None) if saved is None else (h.split(sizes), a.split(sizes))
    gy_g = None if gy is None else gy.split(sizes)
    gxs_g = None if gxs is None else gxs.split(sizes)
    gwr_g = None if gw_rows is None else gw_rows.split(sizes)
    w1_e, w2_e = w1.unbind(0), w2.unbind(0)
    gw1_e = None if not want_w1 else gw1.unbind(0) if acc_w1 is None else acc_w1.unbind(0)  # [H1, D] each
    gw2_e = None if not want_w2 else gw2.unbind(0) if acc_w2 is None else acc_w2.unbind(0)  # [D, H] each
    for e, n in enumerate(sizes):
        if n == 0:
            continue
        if saved is None:  # recompute this group's h [n, H1] and a [n, H]
            h_e, a_e, _ = _ffn_group(xs_g[e], w1_e[e], None if b1 is None else b1[e], None, None,
                                     activation, gated, scratch, (h_ws[:n], a_ws[:n], None))
        else:
            h_e, a_e = h_g[e], a_g[e]
        if ga_ws is not None:
            ga = torch.mm(go_g[e], w2_e[e], out=ga_ws[:n])  # [n, H]: grad wrt a, before the combine weight
            if y is None and gw_rows is not None:
                torch.linalg.vecdot(ga, a_e, out=gwr_g[e])  # <go, a @ w2^T>
                if b2 is not None:
                    gwr_g[e].add_(go_g[e] @ b2[e])  # + <go, b2[e]>
        if want_gh:
            ga.mul_(ws_g[e])  # [n, H]: grad wrt a
            gh = gh_ws[:n]  # [n, H1]: grad wrt h
            if gated:
                gate, up = h_e.chunk(2, dim=-1)  # [n, H] each
                _act_into(gate, activation, out=gh[:, H:]).mul_(ga)  # grad wrt up = act(gate) * ga
                _act_backward(ga.mul_(up), gate, activation, out=gh[:, :H])  # grad wrt gate
            else:
                _act_backward(ga, h_e, activation, out=gh)
            if want_w1:
                _weight_grad(gh.t(), xs_g[e], gw1_e[e], acc_w1 is not None)  # [H1, D]
            if want_b1:
                torch.sum(gh, dim=0, out=gb1[e])  # [H1]
            if want_x:
                torch.mm(gh, w1_e[e], out=gxs_g[e])  # [n, D]
        if want_w2:
            _weight_grad(gy_g[e].t(), a_e, gw2_e[e], acc_w2 is not None)  # [D, H]
        if want_b2:
            torch.sum(gy_g[e], dim=0, out=gb2[e])  # [D]
    if gw_rows is not None:
        gweight[order] = gw_rows.to(weight.dtype)
    if want_x:
        gx.index_add_(0, tok, gxs)
    return [gx, gweight, gw1, gb1, gw2, gb2]


# ---------------------------------------------------------------------------------------------- public op

@torch.library.custom_op("moeify::grouped_ffn", mutates_args=())
def grouped_ffn_op(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, w1: Tensor,
                   b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: str, gated: bool) -> Tensor:
    return _forward(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated, keep=False)[0]


@grouped_ffn_op.register_fake
def _(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated):
    return torch.empty_like(x)


# -------------------------------------------------------------------------------------------- backward op

@torch.library.custom_op("moeify::grouped_ffn_backward", mutates_args=())
def grouped_ffn_backward_op(grad_out: Tensor, x: Tensor, token_idx: Tensor, expert_idx: Tensor,
                            weight: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                            h: Tensor | None, a: Tensor | None, y: Tensor | None, activation: str,
                            gated: bool, output_mask: list[bool]) -> list[Tensor]:
    """Grads of (x, weight, w1, b1, w2, b2) for the output mask; h, a, y: the training op's saved
    intermediates (all three) or None (recomputed)."""
    saved = None if h is None or a is None or y is None else [h, a, y]
    return _backward(grad_out, x, token_idx, expert_idx, weight, w1, b1, w2, b2, saved, activation, gated,
                     list(output_mask))


@grouped_ffn_backward_op.register_fake
def _(grad_out, x, token_idx, expert_idx, weight, w1, b1, w2, b2, h, a, y, activation, gated, output_mask):
    like = (x, weight, w1, b1, w2, b2)
    return [torch.empty_like(t) if (wanted and t is not None) else _unwanted(t, x)
            for t, wanted in zip(like, output_mask, strict=True)]


# ------------------------------------------------------------------------------- backward into .grad op
# Gradient accumulation (no zero_grad between backward passes) would otherwise cost a whole extra pass over
# the stacked weight gradients: the backward writes a fresh [E, H1, D] gradient, then autograd's
# AccumulateGrad reads it back and adds it into `.grad` (`grad += new`, in place). An HF-style ModuleList
# pays that add too, but per expert, on a 4 MiB gradient still in cache. When autograd is about to do
# exactly that in-place add, the backward instead adds each expert's gradient into `.grad` with the GEMM
# itself (beta 1) and hands autograd no gradient for that weight: the same `.grad`, one pass fewer.

@torch.library.custom_op("moeify::grouped_ffn_backward_into", mutates_args=("acc_w1", "acc_w2"))
def grouped_ffn_backward_into_op(grad_out: Tensor, x: Tensor, token_idx: Tensor, expert_idx: Tensor,
                                 weight: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                                 h: Tensor | None, a: Tensor | None, y: Tensor | None, activation: str,
                                 gated: bool, output_mask: list[bool], acc_w1: Tensor | None,
                                 acc_w2: Tensor | None) -> list[Tensor]:
    """`grouped_ffn_backward`, but the grads of w1 and w2 are added into acc_w1 [E, H1, D] and acc_w2
    [E, D, H] where given (their slots in the result are then empty)."""
    saved = None if h is None or a is None or y is None else [h, a, y]
    return _backward(grad_out, x, token_idx, expert_idx, weight, w1, b1, w2, b2, saved, activation, gated,
                     list(output_mask), into=(acc_w1, acc_w2))


@grouped_ffn_backward_into_op.register_fake
def _(grad_out, x, token_idx, expert_idx, weight, w1, b1, w2, b2, h, a, y, activation, gated, output_mask,
      acc_w1, acc_w2):
    like = (x, weight, None if acc_w1 is not None else w1, b1, None if acc_w2 is not None else w2, b2)
    return [torch.empty_like(t) if (wanted and t is not None) else _unwanted(t, x)
            for t, wanted in zip(like, output_mask, strict=True)]


def _grad_to_add_into(w: Tensor, wanted: bool) -> Tensor | None:
    """`w.grad` when autograd would add w's gradient into it in place right after this backward (so the
    backward may do the add itself), else None.

    That is: a plain CPU leaf whose `.grad` is a contiguous tensor of its shape and dtype, no hook on w (a
    hook sees the gradient, so it must get one), not building a graph of the backward (`create_graph`: then
    autograd adds out of place), not compiling, and this backward pass accumulates into w's `.grad`
    (`loss.backward()`, not `torch.autograd.grad`, and w among its inputs when they are given)."""
    if not wanted or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    grad = w.grad if (w.is_leaf and w.device.type == "cpu") else None
    if (type(grad) is not torch.Tensor or grad.shape != w.shape or grad.dtype != w.dtype
            or not grad.is_contiguous() or grad.requires_grad
            or w._backward_hooks or w._post_accumulate_grad_hooks is not None):
        return None
    try:
        accumulates = torch._C._will_engine_execute_node(get_gradient_edge(w).node)
    except RuntimeError:  # raised for a leaf under torch.autograd.grad: it returns grads, .grad stays
        return None
    return grad if accumulates else None


def _save(ctx, inputs, saved: tuple[Tensor, Tensor, Tensor] | None) -> None:
    x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated = inputs
    ctx.has_b1, ctx.has_b2, ctx.has_saved = b1 is not None, b2 is not None, saved is not None
    ctx.activation, ctx.gated = activation, gated
    nig = ctx.needs_input_grad  # one per input of the op
    ctx.output_mask = [bool(nig[i]) for i in (0, 3, 4, 5, 6, 7)]  # (x, weight, w1, b1, w2, b2)
    none = x.new_empty(0)
    ctx.save_for_backward(x, token_idx, expert_idx, weight, w1, none if b1 is None else b1, w2,
                          none if b2 is None else b2, *(saved if saved is not None else (none, none, none)))


def _backward_via_op(ctx, grad_out: Tensor) -> tuple:
    x, token_idx, expert_idx, weight, w1, b1, w2, b2, h, a, y = ctx.saved_tensors
    if not ctx.has_saved:
        h = a = y = None
    args = (grad_out.contiguous(), x, token_idx, expert_idx, weight, w1, b1 if ctx.has_b1 else None, w2,
            b2 if ctx.has_b2 else None, h, a, y, ctx.activation, ctx.gated)
    mask = list(ctx.output_mask)
    acc_w1, acc_w2 = _grad_to_add_into(w1, mask[2]), _grad_to_add_into(w2, mask[4])
    if acc_w1 is None and acc_w2 is None:
        grads = grouped_ffn_backward_op(*args, mask)
    else:  # added into .grad already: autograd gets no gradient for that weight
        grads = grouped_ffn_backward_into_op(*args, mask, acc_w1, acc_w2)
        mask[2], mask[4] = mask[2] and acc_w1 is None, mask[4] and acc_w2 is None
    gx, gweight, gw1, gb1, gw2, gb2 = (g if wanted else None for g, wanted in zip(grads, mask, strict=True))
    return gx, None, None, gweight, gw1, gb1, gw2, gb2, None, None


def _setup_public(ctx, inputs, output):
    _save(ctx, inputs, None)


def _backward_public(ctx, grad_out):
    return _backward_via_op(ctx, grad_out)


grouped_ffn_op.register_autograd(_backward_public, setup_context=_setup_public)


# ----------------------------------------------------------------------------------------------- train op
# What the training op keeps for the backward, and why:
#   h [N, H1] pre-activation, a [N, H] activation: exactly what a dense FFN's autograd keeps (input of the
#     activation, input of the second linear). Recomputing h would be a whole extra GEMM (1/3 of the
#     forward's FLOPs, ~1/6 of a training step), and recomputing a costs an elementwise pass over the
#     widest tensor, which measured ~5% of a step at d_ff=2048: memory is the cheaper currency here.
#   y [N, D] expert output before the combine weight: the combine weight's gradient is <grad_out row, y>;
#     y is 1/4 the size of a (d_ff = 4d), where recomputing <grad_out, y> from a would read [N, H].
#   Not kept: the sort (an argsort of N ints) and the gathered rows xs [M, D] (one gather), recomputed.
# Rows are in expert-sorted order; N rows (not M) so that shapes are static for the fake kernel.

@torch.library.custom_op("moeify::grouped_ffn_train", mutates_args=())
def grouped_ffn_train_op(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, w1: Tensor,
                         b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: str,
                         gated: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out [T, D], h [N, H1], a [N, H], y [N, D]); only out is differentiable."""
    return _forward(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated, keep=True)


@grouped_ffn_train_op.register_fake
def _(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated):
    N = expert_idx.shape[0]
    return (torch.empty_like(x), x.new_empty(N, w1.shape[1]), x.new_empty(N, w2.shape[2]),
            x.new_empty(N, x.shape[1]))


def _setup_train(ctx, inputs, output):
    _save(ctx, inputs, output[1:])
    ctx.mark_non_differentiable(*output[1:])
    # Otherwise autograd fills zero gradients for h, a and y (~3 [N, H] memsets) that nobody reads.
    ctx.set_materialize_grads(False)


def _backward_train(ctx, grad_out, *grad_saved):
    if grad_out is None:  # the output did not reach the loss
        return (None,) * 10
    return _backward_via_op(ctx, grad_out)


grouped_ffn_train_op.register_autograd(_backward_train, setup_context=_setup_train)
