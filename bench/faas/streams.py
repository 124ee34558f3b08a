"""Request streams over the models in play: which model each request asks for.

``pareto`` is the paper's: a Pareto draw (x_m = 1, alpha = 1) names the model of rank
floor(x), redrawn when past the last, so the k-th most popular model gets a share
proportional to 1/(k(k+1)): half the requests go to one model. ``zipf`` gives the k-th a
share proportional to 1/k (a longer tail); ``uniform`` spreads requests evenly. Which model
has which rank is a seeded shuffle, so popularity is not tied to size.
"""

from __future__ import annotations

import random

STREAMS = ("pareto", "zipf", "uniform")


def requests(stream: str, models: list[str], count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    ranked = models[:]
    rng.shuffle(ranked)
    if stream == "pareto":
        return [ranked[_pareto_rank(rng, len(ranked))] for _ in range(count)]
    if stream == "zipf":
        return rng.choices(ranked, weights=[1 / k for k in range(1, len(ranked) + 1)], k=count)
    if stream == "uniform":
        return rng.choices(ranked, k=count)
    raise ValueError(f"unknown stream {stream!r}; choose from {', '.join(STREAMS)}")


def in_play(models: list[str], fraction: float) -> list[str]:
    """``fraction`` of the models (at least one), picked evenly along the list: the zoo is in
    size order, so every fraction mixes small and large models."""
    count = max(1, round(fraction * len(models)))
    step = len(models) / count
    return [models[int(i * step)] for i in range(count)]


def _pareto_rank(rng: random.Random, n: int) -> int:
    while True:
        x = rng.paretovariate(1.0)  # x_m = 1
        if x < n + 1:
            return int(x) - 1
