#!/usr/bin/env python
"""Time the audit's near-duplicate image search, with peak memory -> bench/results/audit.json.

Two cases: the MVSA-Single image cache (pooled maps read from the cache, 4,511 x 1280),
and a synthetic 200k-item feature set with planted copies, to show that the blocked
search never holds an N x N matrix (peak memory is the features plus one block^2 matrix).

    python bench/audit.py --cache-dir cache [--n 200000 --dim 128 --block 2048]
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np
import typer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import RESULTS, cli, out_file, save  # noqa: E402
from core import store  # noqa: E402
from extract import audit  # noqa: E402


def rss_MB() -> float:
    """Resident memory now (Linux /proc), in MB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def peak_MB() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def search(x: np.ndarray, threshold: float, block: int) -> dict:
    """One search: seconds, pairs found, memory before it and the process peak after it
    (torch buffers are not seen by tracemalloc, so resident memory it is)."""
    before = rss_MB()
    t0 = time.perf_counter()
    found = sum(len(ii) for ii, _, _ in audit.near_duplicates(x, threshold, block))
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "pairs": int(found), "rss_before_MB": round(before, 1),
            "peak_rss_after_MB": round(peak_MB(), 1), "features_MB": round(x.nbytes / 2**20, 1),
            "block_matrix_MB": round(block**2 * 4 / 2**20, 1), "n_x_n_float32_MB": round(len(x) ** 2 * 4 / 2**20, 1)}


def measure(cache_dir: Path = typer.Option(Path("cache")), n: int = typer.Option(200_000), dim: int = typer.Option(128),
            block: int = typer.Option(2048), out: Path = typer.Option(RESULTS / "audit.json")):
    """Both searches -> `out` (checked first: a refused --out costs no search)."""
    out_file(out)
    import torch

    results = {"block": block, "threshold": audit.IMAGE_THRESHOLD, "torch_threads": torch.get_num_threads(),
               "note": "2 cores shared with other jobs; synthetic = Gaussian features with 100 planted near-copies"}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    planted = rng.choice(n, 200, replace=False)
    x[planted[100:]] = x[planted[:100]] + 0.05 * rng.standard_normal((100, dim), dtype=np.float32)
    results["synthetic"] = {"items": n, "dim": dim, "planted_pairs": 100, **search(x, audit.IMAGE_THRESHOLD, block)}
    folder = store.cache_folder(cache_dir, "mvsa_s", store.IMAGE, "efficientnet-lite0")
    if (folder / "index.json").is_file():
        t0 = time.perf_counter()
        ids, x = store.pooled_maps(folder)
        read = time.perf_counter() - t0
        results["mvsa_s"] = {"items": len(ids), "dim": int(x.shape[1]), "read_pooled_seconds": round(read, 2),
                             **search(x, audit.IMAGE_THRESHOLD, block)}
    results["peak_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    save(out, results)


@cli
def main() -> None:
    typer.run(measure)


if __name__ == "__main__":
    main()
