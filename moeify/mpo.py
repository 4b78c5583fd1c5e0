"""Matrix product operator (MPO, tensor train) decomposition of a weight matrix: the math only.

Gao et al. 2022, "Parameter-Efficient Mixture-of-Experts Architecture for Pre-trained Language Models"
(COLING 2022, arXiv 2203.01104), section "MPO decomposition": a matrix W [O, I] with O = o_1...o_n and
I = i_1...i_n is written as a chain of n local tensors

    W[(o_1..o_n), (i_1..i_n)] = sum over bonds  G_1[1, o_1, i_1, r_1] G_2[r_1, o_2, i_2, r_2] ... G_n[r_{n-1}, o_n, i_n, 1]

where r_k is the bond dimension between tensors k and k+1. The middle tensor (index c = n // 2, n odd) is the
*central tensor*, the others the *auxiliary tensors*. In the mixed canonical form built here (left sweep of
SVDs up to c, right sweep down to c) the auxiliary tensors are isometries and the central tensor carries the
singular values: it holds "the core information" of W (the paper's words), the auxiliaries complement it.

Exact at full bond: r_k = min(o_1 i_1 ... o_k i_k, o_{k+1} i_{k+1} ... o_n i_n). A bond cap `max_bond`
truncates every SVD to its largest singular values (the truncated-SVD approximation; the relative Frobenius
error of the reconstruction is returned).

Shape legend: O out rows, I in columns, n tensors, c = n // 2 the central one, r_k bond dims, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def prime_factors(n: int) -> list[int]:
    """n's prime factors with multiplicity, ascending (empty for 1)."""
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def factorize(n: int, parts: int) -> tuple[int, ...]:
    """n as `parts` factors, balanced (each prime goes to the smallest bucket), the largest in the middle.

    The middle factor is the central tensor's: putting the largest there makes the shared tensor the large
    one and the per-expert auxiliaries small (e.g. 3072 into 3 parts -> (12, 16, 16) -> (12, 16, 16)).
    A prime n gives (1, ..., n, ..., 1).
    """
    buckets = [1] * parts
    for p in sorted(prime_factors(n), reverse=True):
        buckets[buckets.index(min(buckets))] *= p
    asc = sorted(buckets)
    return tuple(asc[0::2] + asc[1::2][::-1])  # ascending to the middle, descending after it


@dataclass(frozen=True)
class MPOShape:
    """The shapes of one matrix's MPO: W [O, I] -> n tensors [r_{k-1}, o_k, i_k, r_k]."""

    out_factors: tuple[int, ...]  # o_1..o_n, product O
    in_factors: tuple[int, ...]  # i_1..i_n, product I
    bonds: tuple[int, ...]  # r_0..r_n, r_0 = r_n = 1

    @classmethod
    def for_matrix(cls, rows: int, cols: int, cores: int, max_bond: int | None = None) -> MPOShape:
        """The MPO of a [rows, cols] matrix with `cores` tensors, bonds capped at `max_bond` (None: exact)."""
        o, i = factorize(rows, cores), factorize(cols, cores)
        sizes = [a * b for a, b in zip(o, i, strict=True)]  # o_k i_k
        bonds = [1]
        for k in range(1, cores):
            full = min(math.prod(sizes[:k]), math.prod(sizes[k:]))
            bonds.append(full if max_bond is None else min(full, max_bond))
        return cls(o, i, (*bonds, 1))

    @property
    def cores(self) -> int:
        return len(self.out_factors)

    @property
    def central(self) -> int:
        """Index of the central tensor (the middle one)."""
        return self.cores // 2

    def core_shape(self, k: int) -> tuple[int, int, int, int]:
        return (self.bonds[k], self.out_factors[k], self.in_factors[k], self.bonds[k + 1])

    def core_params(self, k: int) -> int:
        """|G_k| = r_{k-1} o_k i_k r_k."""
        return math.prod(self.core_shape(k))

    @property
    def central_params(self) -> int:
        return self.core_params(self.central)

    @property
    def aux_params(self) -> int:
        """Parameters of one set of auxiliary tensors (one expert's): sum of |G_k| over k != c."""
        return sum(self.core_params(k) for k in range(self.cores) if k != self.central)

    def params(self, num_experts: int) -> int:
        """E experts sharing the central tensor: |G_c| + E * sum_{k != c} |G_k|."""
        return self.central_params + num_experts * self.aux_params


def _to_chain(w: Tensor, shape: MPOShape) -> Tensor:
    """W [O, I] -> [o_1 i_1, o_2 i_2, ..., o_n i_n] (each output factor next to its input factor)."""
    n = shape.cores
    t = w.reshape(*shape.out_factors, *shape.in_factors)  # [o_1..o_n, i_1..i_n]
    t = t.permute(*[d for k in range(n) for d in (k, n + k)])  # [o_1, i_1, ..., o_n, i_n]
    return t.reshape(*[a * b for a, b in zip(shape.out_factors, shape.in_factors, strict=True)])


def decompose(w: Tensor, shape: MPOShape) -> list[Tensor]:
    """W [O, I] -> n tensors G_k [r_{k-1}, o_k, i_k, r_k] in mixed canonical form about the central one.

    Computed in float64 and returned in W's dtype. Truncated to `shape.bonds` (exact when the bonds are full).
    """
    n, c = shape.cores, shape.central
    rest = _to_chain(w.detach().double(), shape)  # [o_1 i_1, ..., o_n i_n]
    left: list[Tensor] = []
    for k in range(c):  # left sweep: G_k = U (isometry), S V^T carried right
        m = rest.reshape(shape.bonds[k] * shape.out_factors[k] * shape.in_factors[k], -1)  # [r o i, rest]
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        r = shape.bonds[k + 1]
        left.append(u[:, :r].reshape(shape.core_shape(k)))  # [r_{k-1}, o_k, i_k, r_k]
        rest = s[:r, None] * vh[:r]  # [r_k, rest]
    right: list[Tensor] = []
    for k in range(n - 1, c, -1):  # right sweep: G_k = V^T (isometry), U S carried left
        m = rest.reshape(-1, shape.out_factors[k] * shape.in_factors[k] * shape.bonds[k + 1])  # [rest, o i r]
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        r = shape.bonds[k]
        right.append(vh[:r].reshape(shape.core_shape(k)))  # [r_{k-1}, o_k, i_k, r_k]
        rest = u[:, :r] * s[:r]  # [rest, r_{k-1}]
    central = rest.reshape(shape.core_shape(c))  # [r_{c-1}, o_c, i_c, r_c]: the singular values live here
    return [g.to(w.dtype) for g in (*left, central, *right[::-1])]


def contract(cores: list[Tensor], shape: MPOShape) -> Tensor:
    """The matrices an MPO describes: tensors G_k, each [r_{k-1}, o_k, i_k, r_k] (shared) or
    [E, r_{k-1}, o_k, i_k, r_k] (one per expert) -> [E, O, I] ([O, I] when none has an expert dim)."""
    stacked = any(g.dim() == 5 for g in cores)
    acc = None  # [E, O_k, I_k, r_k]: the product of the tensors so far, O_k = o_1..o_k, I_k likewise
    for g in cores:
        g5 = g if g.dim() == 5 else g.unsqueeze(0)  # [E or 1, r, o, i, r']
        if acc is None:
            acc = g5[:, 0]  # [E, o_1, i_1, r_1]
            continue
        nxt = torch.einsum("eabr,erois->eaobis", acc, g5)  # [E, O_k, o, I_k, i, r']
        e, a, o, b, i, s = nxt.shape
        acc = nxt.reshape(e, a * o, b * i, s)  # [E, O_{k+1}, I_{k+1}, r']
    out = acc[..., 0]  # [E, O, I]
    return out if stacked else out[0]


def apply(x: Tensor, cores: list[Tensor], shape: MPOShape) -> Tensor:
    """y = x W^T with W given by its (shared, 4-dim) MPO tensors, contracted on the fly without forming W:
    x [T, I] -> [T, O]. One tensor at a time: the "contract on the fly" alternative to `contract`."""
    T = x.shape[0]
    t = x.reshape(T, 1, *shape.in_factors, 1)  # [T, O_done=1, i_1..i_n, r_0=1]
    for k, g in enumerate(cores):
        lead = t.shape[1]
        t = t.reshape(T, lead, shape.in_factors[k], -1, shape.bonds[k])  # [T, O_done, i_k, I_rest, r_{k-1}]
        t = torch.einsum("taimr,roil->taoml", t, g)  # [T, O_done, o_k, I_rest, r_k]
        t = t.reshape(T, lead * shape.out_factors[k], -1, shape.bonds[k + 1])  # [T, O_done', I_rest, r_k]
    return t.reshape(T, -1)  # [T, O]


def relative_error(w: Tensor, approx: Tensor) -> float:
    """||W - approx||_F / ||W||_F (0 for a zero W), in float64."""
    w, approx = w.detach().double(), approx.detach().double()
    norm = torch.linalg.norm(w)
    return float(torch.linalg.norm(w - approx) / norm) if norm > 0 else float(torch.linalg.norm(approx))
