"""Seeded k-means used by the upcycling strategies.

- `spherical_kmeans`: k-means on the unit sphere (cosine similarity); the router init "kmeans" uses it,
  so that a token's highest logit under the centroid rows is exactly its k-means cluster.
- `balanced_kmeans`: k-means whose clusters all have exactly n / k members (MoEfication-style neuron
  partition); the assignment step is a greedy capacity-constrained assignment by distance.

Both are deterministic for a given generator (k-means++ seeding draws from it) and run on x's device.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _kmeanspp(x: Tensor, k: int, gen: torch.Generator, dist_fn) -> Tensor:
    """k-means++ seeding: [k, d] centroids picked among the rows of x [n, d]."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    closest = dist_fn(x, x[first:first + 1]).squeeze(1).clamp(min=0)  # [n]
    for _ in range(1, k):
        total = closest.sum()
        if float(total) <= 0:  # every point sits on a centroid already: take any not yet taken
            probs = torch.ones(n)
        else:
            probs = (closest / total).double().cpu()
        pick = int(torch.multinomial(probs, 1, generator=gen))
        centroids.append(x[pick])
        closest = torch.minimum(closest, dist_fn(x, x[pick:pick + 1]).squeeze(1).clamp(min=0))
    return torch.stack(centroids)


def _cos_dist(a: Tensor, b: Tensor) -> Tensor:
    return 1.0 - a @ b.t()


def _sq_dist(a: Tensor, b: Tensor, a_sq: Tensor | None = None) -> Tensor:
    a_sq = (a * a).sum(1, keepdim=True) if a_sq is None else a_sq
    return a_sq - 2.0 * (a @ b.t()) + (b * b).sum(1).unsqueeze(0)


def _cluster_sums(x: Tensor, labels: Tensor, k: int) -> Tensor:
    """[k, d]: sum of the rows of x in each cluster (a one-hot matmul: faster than index_add on CPU)."""
    onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # [n, k]
    return onehot.t() @ x


def spherical_kmeans(x: Tensor, k: int, gen: torch.Generator, iters: int = 50) -> tuple[Tensor, Tensor]:
    """x [n, d] -> (unit-norm centroids [k, d], labels [n]); label = argmax of x @ centroids.T.

    Empty clusters are re-seeded with the point least similar to its own centroid.
    """
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    xu = _unit(x.float())
    centroids = _kmeanspp(xu, k, gen, _cos_dist)
    labels = None
    for _ in range(iters):
        sims = xu @ centroids.t()  # [n, k]
        new_labels = sims.argmax(dim=1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = _cluster_sums(xu, labels, k)  # [k, d]
        counts = torch.bincount(labels, minlength=k)
        for c in (counts == 0).nonzero().flatten().tolist():  # re-seed empty clusters
            own = sims.gather(1, labels.unsqueeze(1)).squeeze(1)
            far = int(own.argmin())
            sums[c] = xu[far]
            labels[far] = c
            sims[far] = 2.0  # do not take the same point twice
        centroids = _unit(sums)
    labels = (xu @ centroids.t()).argmax(dim=1)
    return centroids, labels


def balanced_assign(dist: Tensor) -> Tensor:
    """dist [n, k] (n divisible by k) -> labels [n], each cluster exactly n / k points.

    Greedy by rounds: every unassigned point proposes to its nearest cluster with room left; each cluster
    accepts its nearest proposers up to its remaining capacity. At least one cluster fills (or everyone
    is placed) per round, so it ends within k rounds.
    """
    n, k = dist.shape
    cap = n // k
    labels = torch.full((n,), -1, dtype=torch.long, device=dist.device)
    room = torch.full((k,), cap, dtype=torch.long)
    while True:
        free = (labels < 0).nonzero().flatten()
        if free.numel() == 0:
            return labels
        d = dist[free].clone()
        d[:, (room == 0).to(d.device)] = float("inf")
        choice = d.argmin(dim=1)  # [f]
        best = d.gather(1, choice.unsqueeze(1)).squeeze(1)
        for c in torch.unique(choice).tolist():
            mine = (choice == c).nonzero().flatten()
            take = min(int(room[c]), mine.numel())
            order = best[mine].argsort(stable=True)[:take]
            labels[free[mine[order]]] = c
            room[c] -= take


def balanced_kmeans(x: Tensor, k: int, gen: torch.Generator, iters: int = 50) -> Tensor:
    """x [n, d] (n divisible by k) -> labels [n] with exactly n / k points per cluster (squared L2)."""
    n = x.shape[0]
    if n % k:
        raise ValueError(f"balanced k-means needs n={n} divisible by k={k}")
    x = x.float()
    centroids = _kmeanspp(x, k, gen, _sq_dist)
    x_sq = (x * x).sum(1, keepdim=True)
    labels = None
    for _ in range(iters):
        new_labels = balanced_assign(_sq_dist(x, centroids, x_sq))
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        centroids = _cluster_sums(x, labels, k) / (n // k)
    return labels
