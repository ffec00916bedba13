"""How many decoder layers each pipeline stage gets.

Stage 0 also holds the embeddings and the last stage the final norm and LM head; `parameters` counts what
of those costs compute (the head's matmul over the vocabulary; stage.plan_stages leaves out embedding lookups)
so the last stage does not become the slowest.
"""

from __future__ import annotations

from .config import ConfigError


def split_layers(num_layers: int, num_stages: int, method: str,
                 layer_params: list[int] | None = None, pre_params: int = 0, post_params: int = 0) -> list[int]:
    """Layer counts per stage (each >= 1, summing to num_layers)."""
    if num_stages > num_layers:
        raise ConfigError(
            f"the pipeline has {num_stages} stages but the model has only {num_layers} decoder layers; "
            f"every stage needs at least one layer: lower --pp (or --stages_per_rank) to at most {num_layers}")
    if method == "uniform":
        base, extra = divmod(num_layers, num_stages)
        return [base + (1 if s < extra else 0) for s in range(num_stages)]
    if method == "uniform_floor":
        base, extra = divmod(num_layers, num_stages)
        return [base + (1 if s >= num_stages - extra else 0) for s in range(num_stages)]
    if method == "parameters":
        if layer_params is None:
            raise ValueError("partition by parameters needs per-layer parameter counts")
        return _balance(layer_params, num_stages, pre_params, post_params)
    counts = [int(p) for p in method.split(",")]
    if len(counts) != num_stages:
        raise ConfigError(f"--partition_method {method} lists {len(counts)} stages but the pipeline has {num_stages}")
    if any(c < 1 for c in counts):
        raise ConfigError(f"--partition_method {method}: every stage needs at least one decoder layer")
    if sum(counts) != num_layers:
        raise ConfigError(f"--partition_method {method} sums to {sum(counts)} layers but the model has "
                          f"{num_layers}; make the counts add up to {num_layers}")
    return counts


def _balance(layer_params: list[int], num_stages: int, pre: int, post: int) -> list[int]:
    """Contiguous split minimising the heaviest stage (exact dynamic programme; n and p are small)."""
    n = len(layer_params)
    prefix = [0]
    for w in layer_params:
        prefix.append(prefix[-1] + w)

    def weight(i: int, j: int, stage: int) -> int:  # layers [i, j) on `stage`
        return prefix[j] - prefix[i] + (pre if stage == 0 else 0) + (post if stage == num_stages - 1 else 0)

    inf = float("inf")
    # best[s][j]: smallest possible heaviest stage when stages 0..s-1 cover layers [0, j)
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for j in range(s, n - (num_stages - s) + 1):
            for i in range(s - 1, j):
                cost = max(best[s - 1][i], weight(i, j, s - 1))
                if cost < best[s][j]:
                    best[s][j], cut[s][j] = cost, i
    counts, j = [], n
    for s in range(num_stages, 0, -1):
        i = cut[s][j]
        counts.append(j - i)
        j = i
    return counts[::-1]


def layer_ranges(counts: list[int]) -> list[tuple[int, int]]:
    """[start, stop) of each stage's layers."""
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out
