"""The l2-normalised codebook's training: k-means initialisation, EMA updates, dead-code restarts, usage.

The codebook is never trained by gradients. Per quantised batch, with z the l2-normalised vectors (n, D) and
their nearest codes: the per-code mean of its vectors is l2-normalised, `w <- normalize(decay·w + (1 − decay)
· mean)` for every used code (unused codes keep their vector), and the EMA of the per-code counts tracks usage.
A code whose usage falls below `dead_code_threshold` is restarted at a vector of the batch. Counts and sums
are summed over processes (`reduce`), so every process applies the same update.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Reduce = Callable[[torch.Tensor], torch.Tensor]


def spherical_kmeans(x: torch.Tensor, num_codes: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """x: (n, D) l2-normalised -> centroids (num_codes, D), l2-normalised.

    Starts from `num_codes` rows of x drawn with `generator` (with replacement when n < num_codes), then
    `iters` rounds of: assign each row to the centroid of highest cosine, move every centroid that got
    rows to the l2-normalised mean of its rows."""
    x = x.float()
    if len(x) >= num_codes:
        start = torch.randperm(len(x), generator=generator)[:num_codes]
    else:
        start = torch.randint(len(x), (num_codes,), generator=generator)
    centroids = x[start.to(x.device)].clone()
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_codes)
        centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=1), centroids)
    return centroids


def code_counts_and_sums(z: torch.Tensor, codes: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z: (n, D), codes: (n,) -> per-code counts (num_codes,) and sums of the assigned vectors (num_codes, D)."""
    counts = torch.bincount(codes, minlength=num_codes).float()
    sums = torch.zeros(num_codes, z.shape[1], dtype=torch.float32, device=z.device).index_add_(0, codes, z.float())
    return counts, sums


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution given by `counts` (num_codes,): 1 when one code is used,
    num_codes when all are used equally."""
    probs = counts / counts.sum().clamp(min=1)
    return torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())


class CodebookEMA(nn.Module):
    """Training state of an l2-normalised codebook: the EMA of code usage and whether k-means ran.

    The codebook tensor itself belongs to the model and is updated in place by `update` and `initialize`.
    """

    def __init__(self, num_codes: int, decay: float = 0.99, dead_code_threshold: float = 1e-3):
        super().__init__()
        self.decay, self.dead_code_threshold = decay, dead_code_threshold
        self.register_buffer("usage", torch.ones(num_codes))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, codebook: torch.Tensor, z: torch.Tensor, iters: int, generator: torch.Generator) -> None:
        """k-means over the vectors z (n, D) of every process (already gathered) -> codebook (num_codes, D)."""
        codebook.copy_(spherical_kmeans(z, len(codebook), iters, generator).to(codebook.dtype))
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(
        self, codebook: torch.Tensor, z: torch.Tensor, codes: torch.Tensor, reduce: Reduce = lambda t: t
    ) -> dict:
        """One EMA step from this process' vectors z (n, D) and their codes (n,); `reduce` sums over processes.
        Returns the batch's `perplexity` and the number of `dead_codes` before restarts."""
        counts, sums = code_counts_and_sums(z, codes, len(codebook))
        counts, sums = reduce(counts), reduce(sums)
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        used = counts > 0
        means = F.normalize(sums, dim=1)
        moved = F.normalize(self.decay * codebook.float() + (1 - self.decay) * means, dim=1)
        codebook.copy_(torch.where(used[:, None], moved, codebook.float()).to(codebook.dtype))
        return {"perplexity": perplexity(counts), "dead_codes": (self.usage < self.dead_code_threshold).sum()}

    @torch.no_grad()
    def restart_dead_codes(self, codebook: torch.Tensor, z: torch.Tensor, generator: torch.Generator) -> int:
        """Move every code whose usage is below the threshold onto a random vector of z (n, D) (gathered from
        every process, so all processes agree) and reset its usage to 1. Returns how many were restarted."""
        dead = (self.usage < self.dead_code_threshold).nonzero().flatten()
        if len(dead) and len(z):
            picks = torch.randint(len(z), (len(dead),), generator=generator).to(z.device)
            codebook[dead] = z[picks].to(codebook.dtype)
            self.usage[dead] = 1.0
        return len(dead)
