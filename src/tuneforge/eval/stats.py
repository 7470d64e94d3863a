"""Statistics for evaluation results: a confidence interval for accuracy and paired tests.

- `wilson_interval(k, n)`: the 95% Wilson score interval of a proportion (sensible at 0/n and n/n,
  unlike the normal approximation);
- `exact_binomial_p(b, c)`: the two-sided exact binomial test of b successes against c under
  p = 1/2. For two models scored on the same samples, with b = samples only A got right and
  c = samples only B got right, this is McNemar's exact test; with b and c the samples where
  A's / B's loss is lower, the sign test.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def exact_binomial_p(b: int, c: int) -> float:
    """Two-sided p-value of b vs c discordant outcomes under H0: each equally likely."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)
