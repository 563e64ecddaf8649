"""The codebook's k-means initialisation, EMA update, dead-code restart and perplexity against direct loops."""

import math

import torch
import torch.nn.functional as F

from lavit_pipelines.training.codebook import CodebookEMA, perplexity, spherical_kmeans


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_ema_update_matches_a_direct_computation():
    codebook, z = unit_rows(5, 3, 0), unit_rows(12, 3, 1)
    codes = (z @ codebook.T).argmax(dim=1)
    codes[:3] = 0  # code 0 gets several vectors
    decay = 0.9
    expected = codebook.clone()
    for k in range(5):
        members = [z[i] for i in range(12) if codes[i] == k]
        if members:
            mean = sum(members) / len(members)
            mean = mean / mean.norm()
            moved = decay * codebook[k] + (1 - decay) * mean
            expected[k] = moved / moved.norm()
    ema = CodebookEMA(5, decay=decay)
    weight = codebook.clone()
    metrics = ema.update(weight, z, codes)
    torch.testing.assert_close(weight, expected)
    counts = torch.tensor([float((codes == k).sum()) for k in range(5)])
    torch.testing.assert_close(ema.usage, decay * torch.ones(5) + (1 - decay) * counts)
    probs = [c / 12 for c in counts.tolist() if c]
    assert math.isclose(float(metrics["perplexity"]), math.exp(-sum(p * math.log(p) for p in probs)), rel_tol=1e-5)
    assert not torch.equal(weight, codebook)


def test_ema_update_sums_counts_over_processes():
    """`reduce` is what makes every process apply the update of the global batch: summing two halves equals
    the update of the whole batch."""
    codebook, z = unit_rows(4, 3, 2), unit_rows(10, 3, 3)
    codes = (z @ codebook.T).argmax(dim=1)
    whole, halves = codebook.clone(), codebook.clone()
    CodebookEMA(4).update(whole, z, codes)
    from lavit_pipelines.training.codebook import code_counts_and_sums

    other = code_counts_and_sums(z[5:], codes[5:], 4)
    CodebookEMA(4).update(halves, z[:5], codes[:5], reduce=lambda t: t + (other[0] if t.ndim == 1 else other[1]))
    torch.testing.assert_close(halves, whole)


def test_spherical_kmeans_matches_lloyd_iterations():
    x = unit_rows(40, 4, 4)
    centroids = spherical_kmeans(x, 3, iters=5, generator=torch.Generator().manual_seed(7))
    start = torch.randperm(40, generator=torch.Generator().manual_seed(7))[:3]
    expected = [x[i].clone() for i in start.tolist()]
    for _ in range(5):
        groups = [[] for _ in range(3)]
        for row in x:
            groups[max(range(3), key=lambda k: float(row @ expected[k]))].append(row)
        expected = [sum(g) / sum(g).norm() if g else expected[k] for k, g in enumerate(groups)]
    torch.testing.assert_close(centroids, torch.stack(expected))
    # Lloyd's iterations never increase the within-cluster cosine distance
    assert float((x @ centroids.T).max(dim=1).values.mean()) > float((x @ x[start].T).max(dim=1).values.mean())


def test_kmeans_samples_with_replacement_when_there_are_fewer_vectors_than_codes():
    x = unit_rows(3, 4, 5)
    centroids = spherical_kmeans(x, 8, iters=2, generator=torch.Generator().manual_seed(0))
    assert centroids.shape == (8, 4)
    assert all(any(torch.allclose(c, row) for row in x) for c in centroids)


def test_dead_codes_restart_on_batch_vectors_and_perplexity_bounds():
    ema = CodebookEMA(4, dead_code_threshold=0.5)
    ema.usage.copy_(torch.tensor([1.0, 0.1, 2.0, 0.0]))
    codebook, z = unit_rows(4, 3, 6), unit_rows(6, 3, 7)
    before = codebook.clone()
    assert ema.restart_dead_codes(codebook, z, torch.Generator().manual_seed(0)) == 2
    torch.testing.assert_close(codebook[[0, 2]], before[[0, 2]])
    assert all(any(torch.equal(codebook[k], row) for row in z) for k in (1, 3))
    assert ema.usage.tolist() == [1.0, 1.0, 2.0, 1.0]
    assert math.isclose(float(perplexity(torch.tensor([5.0, 0, 0, 0]))), 1.0)
    assert math.isclose(float(perplexity(torch.tensor([2.0, 2, 2, 2]))), 4.0, rel_tol=1e-6)
