"""Benchmark of the match step: the vectorised graph (tf.function graph mode and XLA)
against the plain-Python, node-by-node oracle of the release (tests/reference_graph.py).

    .venv/bin/python bench/graph_bench.py --json

prints one JSON line: {"graph_ms": {N: best of graph/XLA}, "graph_modes_ms": {"graph":
{N: ms}, "xla": {N: ms}}, "python_reference_ms": {N: ms}, "speedup": {N: python / best},
"config": {...}}. Times are medians after a warm-up call; inputs are passed as
arguments so nothing is constant-folded. `bench/mm_step.py` imports `run_graph_bench`.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import random
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mm_tf import match  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (144, 1024, 4096, 65536)


def _load_reference():
    """tests/reference_graph.py as a module (tests/ is not a package)."""
    path = _REPO / "tests" / "reference_graph.py"
    spec = importlib.util.spec_from_file_location("reference_graph", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median_ms(fn, runs, warmup=1):
    """Median wall time of fn() in milliseconds over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _inputs(n, num_classes, seed):
    """Benchmark inputs: labels int32 [n] uniform over num_classes, all valid, seed [2]."""
    rng = np.random.default_rng(seed)
    labels = tf.constant(rng.integers(0, num_classes, n), tf.int32)
    valid = tf.ones([n], tf.bool)
    return labels, valid, tf.constant([seed, 1], tf.int32)


def _python_runs(n):
    """Fewer oracle runs for large graphs (O(N^2) Python: seconds at N=4096)."""
    return 9 if n <= 1024 else 3


def run_graph_bench(sizes=DEFAULT_SIZES, runs=20, python_max_n=4096, num_classes=21,
                    mode="graph", seed=0):
    """Time build_triplets (graph mode and XLA) and the Python oracle for each N in sizes.

    Returns {"graph_ms", "graph_modes_ms", "python_reference_ms", "speedup", "config"}
    with int N keys; the oracle runs only for N <= python_max_n.
    """
    reference = _load_reference()

    def build(labels, valid, s):
        return match.build_triplets(labels, valid, s, mode=mode)

    compiled = {"graph": tf.function(build, jit_compile=False),
                "xla": tf.function(build, jit_compile=True)}
    modes_ms = {name: {} for name in compiled}
    python_ms = {}
    for n in sizes:
        labels, valid, s = _inputs(n, num_classes, seed)
        for name, fn in compiled.items():
            # .numpy() waits for the result, so the time covers the whole step.
            modes_ms[name][n] = _median_ms(lambda: fn(labels, valid, s)[1].numpy(), runs)
        if n <= python_max_n:
            labels_list, valid_list = labels.numpy().tolist(), valid.numpy().tolist()
            rng = random.Random(seed)
            python_ms[n] = _median_ms(
                lambda: reference.reference_triplets(labels_list, valid_list, rng),
                _python_runs(n), warmup=0)
    best = {n: min(modes_ms["graph"][n], modes_ms["xla"][n]) for n in sizes}
    return {
        "graph_ms": best,
        "graph_modes_ms": modes_ms,
        "python_reference_ms": python_ms,
        "speedup": {n: python_ms[n] / best[n] for n in python_ms},
        "config": {"mode": mode, "num_classes": num_classes, "runs": runs,
                   "python_runs": {n: _python_runs(n) for n in python_ms},
                   "cpus": os.cpu_count(), "tensorflow": tf.__version__},
    }


def _rounded(value):
    """Round floats in nested dicts for a readable JSON line."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value


def main(argv=None):
    """Command line: --sizes, --runs, --json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="comma-separated graph sizes N")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per size")
    parser.add_argument("--mode", default="graph", choices=match.MODES[:2])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    result = _rounded(run_graph_bench(sizes, runs=args.runs, mode=args.mode))
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'N':>7} {'graph ms':>10} {'xla ms':>10} {'python ms':>11} {'speedup':>9}")
    for n in sizes:
        py = result["python_reference_ms"].get(n)
        sp = result["speedup"].get(n)
        print(f"{n:>7} {result['graph_modes_ms']['graph'][n]:>10.3f} "
              f"{result['graph_modes_ms']['xla'][n]:>10.3f} "
              f"{py if py is not None else '-':>11} {sp if sp is not None else '-':>9}")


if __name__ == "__main__":
    main()
