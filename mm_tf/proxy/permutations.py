"""The jigsaw task's permutation set: a seeded greedy selection of far-apart permutations.

Noroozi & Favaro (2016) train the network to recognise which of P fixed permutations
shuffled the 9 tiles, and choose the P permutations far apart in Hamming distance (the
number of positions where two permutations differ) so that the classes are not
confusable. Their Algorithm 1 starts from a random permutation and repeatedly adds the
candidate with the largest *summed* distance to the chosen set; we add the candidate
whose *minimum* distance to the chosen set is largest (max-min, `criterion="min"`,
the default), ties broken by the larger summed distance, then uniformly at random from
the seed. Max-min raises the worst case: with P = 1000 over all 9! permutations and
seed 0 the closest two permutations differ in 5 positions (mean distance 8.01), where
the summed criterion (`criterion="sum"`, same mean) lets pairs at distance 2 in.

Everything is vectorised over all 9! = 362,880 candidates (a [9, 362880] int8 table,
3.3 MB); selecting 1000 takes about 2 s on one core. The set is saved as
`permutations.npy` (int8 [P, 9], row p lists, for each position of the shuffled puzzle,
the grid cell whose tile goes there) beside the jigsaw weights and reloaded from there.

Example:
    perms = select_permutations(1000, seed=0)        # int8 [1000, 9]
    min_hamming_distance(perms)                      # 5
"""

from __future__ import annotations

import itertools
import os

import numpy as np

FILENAME = "permutations.npy"
CRITERIA = ("min", "sum")


def all_permutations(n: int = 9) -> np.ndarray:
    """Every permutation of range(n) in lexicographic order: int8 [n!, n]."""
    return np.array(list(itertools.permutations(range(n))), np.int8)


def hamming_to(table_t: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Hamming distance of every candidate to `row` [n]: table_t int8 [n, N] -> int8 [N]."""
    distance = np.zeros(table_t.shape[1], np.int8)
    # Column-wise over the transposed table: n passes over contiguous [N] rows, far
    # faster than a [N, n] comparison reduced along its short axis.
    for position, value in enumerate(row):
        distance += table_t[position] != value
    return distance


def select_permutations(count: int = 1000, seed: int = 0, n: int = 9,
                        criterion: str = "min") -> np.ndarray:
    """Greedy far-apart permutations of range(n): int8 [count, n], seeded and deterministic.

    Args:
      count: P, the number of permutations (classes of the jigsaw task).
      seed: picks the first permutation and breaks ties.
      n: tiles per puzzle (9 for a 3x3 grid).
      criterion: "min" adds the candidate farthest from its nearest chosen permutation
        (ties: larger summed distance, then random); "sum" is Noroozi & Favaro's
        Algorithm 1 (largest summed distance, ties random).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    table = all_permutations(n)
    if not 1 <= count <= len(table):
        raise ValueError(f"count must be in [1, {len(table)}], got {count}")
    table_t = np.ascontiguousarray(table.T)
    rng = np.random.default_rng(seed)
    nearest = np.full(len(table), n + 1, np.int8)  # Distance to the nearest chosen one.
    summed = np.zeros(len(table), np.int32)
    # Chosen rows: their nearest distance is 0, so "min" never picks them again; "sum"
    # needs the mask.
    taken = np.zeros(len(table), bool)
    chosen = [int(rng.integers(len(table)))]
    for _ in range(count - 1):
        distance = hamming_to(table_t, table[chosen[-1]])
        np.minimum(nearest, distance, out=nearest)
        summed += distance
        taken[chosen[-1]] = True
        if criterion == "min":
            candidates = np.flatnonzero(nearest == nearest.max())
            tied = summed[candidates]
            candidates = candidates[tied == tied.max()]
        else:
            score = np.where(taken, -1, summed)
            candidates = np.flatnonzero(score == score.max())
        chosen.append(int(candidates[rng.integers(len(candidates))]))
    return table[np.array(chosen)]


def min_hamming_distance(permutations: np.ndarray) -> int:
    """Smallest Hamming distance between two distinct rows of int [P, n] (n + 1 if P = 1)."""
    perms = np.asarray(permutations)
    if len(perms) < 2:
        return perms.shape[1] + 1
    distance = (perms[:, None, :] != perms[None, :, :]).sum(axis=-1)
    np.fill_diagonal(distance, perms.shape[1] + 1)
    return int(distance.min())


def mean_hamming_distance(permutations: np.ndarray) -> float:
    """Mean Hamming distance over pairs of distinct rows of int [P, n]."""
    perms = np.asarray(permutations)
    if len(perms) < 2:
        return 0.0
    distance = (perms[:, None, :] != perms[None, :, :]).sum(axis=-1)
    return float(distance.sum() / (len(perms) * (len(perms) - 1)))


def validate(permutations: np.ndarray, n: int = 9, where: str = "permutations") -> np.ndarray:
    """Checks int [P, n] rows are distinct permutations of range(n); returns int8 [P, n]."""
    perms = np.asarray(permutations)
    if perms.ndim != 2 or perms.shape[1] != n:
        raise ValueError(f"{where}: expected shape [P, {n}], got {perms.shape}")
    if not np.array_equal(np.sort(perms, axis=1), np.broadcast_to(np.arange(n), perms.shape)):
        raise ValueError(f"{where}: every row must be a permutation of 0..{n - 1}")
    if len(np.unique(perms, axis=0)) != len(perms):
        raise ValueError(f"{where}: rows must be distinct")
    return perms.astype(np.int8)


def save(permutations: np.ndarray, folder: str) -> str:
    """Writes `folder/permutations.npy` atomically; returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, FILENAME)
    tmp = os.path.join(folder, f".{FILENAME}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:  # A file object: np.save would append ".npy" to a name.
        np.save(f, validate(permutations))
    os.replace(tmp, path)
    return path


def load(path: str) -> np.ndarray:
    """Reads and validates a permutations.npy (or the one inside folder `path`): int8 [P, 9]."""
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    return validate(np.load(path, allow_pickle=False), where=path)


def load_or_select(folder: str, count: int, seed: int, criterion: str = "min") -> np.ndarray:
    """The set saved in `folder` if there (a resumed run), else a new selection saved there.

    Raises ValueError if a saved set has a different size than `count`.
    """
    path = os.path.join(folder, FILENAME)
    if os.path.isfile(path):
        perms = load(path)
        if len(perms) != count:
            raise ValueError(f"{path} holds {len(perms)} permutations, the run asks for "
                             f"{count}; use another work folder or the original flags")
        return perms
    perms = select_permutations(count, seed, criterion=criterion)
    save(perms, folder)
    return perms
