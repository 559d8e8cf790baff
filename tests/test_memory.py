"""core/memory.py: glibc keeps freed memory (no page-fault storm per batch) and the budget of stage two."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from conftest import REPO
from core import memory

# A few forward passes of convolutions with ~25 MB activations, as an image encoder runs them;
# prints whether keep_freed took effect and the minor page faults of the timed passes.
FORWARD = """
import resource, pipeline  # the CLI module applies the policy at import, before torch loads
from core import memory
import torch
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7, padding=3, stride=2), torch.nn.ReLU(),
                          torch.nn.Conv2d(64, 64, 3, padding=1, stride=2), torch.nn.ReLU(),
                          torch.nn.Conv2d(64, 64, 3, padding=1)).eval()
x = torch.randn(8, 3, 224, 224)
with torch.inference_mode():
    net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        net(x)
print(memory.keep_freed(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


def _forward(**env) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k != memory.ENV and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", FORWARD], cwd=REPO, env={**clean, **env}, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    return out[0], int(out[1])


@glibc
def test_the_cli_keeps_freed_memory_so_batches_fault_far_less():
    kept, faults = _forward()
    legacy, _ = _forward(**{memory.ENV: "default"})
    assert (kept, legacy) == ("True", "False")
    # every buffer handed back to the OS and faulted in again, page by page, in each of the 4 timed
    # passes: 8 x (64x112x112 + 2 x 64x56x56) floats a pass. glibc's own behaviour is not compared:
    # its adaptive mmap threshold makes it fault anywhere from ~0 to a full storm from run to run
    storm = 4 * 8 * (64 * 112 * 112 + 2 * 64 * 56 * 56) * 4 // os.sysconf("SC_PAGE_SIZE")
    assert faults * 4 < storm, (faults, storm)


def test_sizes_parse_in_binary_units():
    assert memory.parse_size("3G") == 3 << 30
    assert memory.parse_size("500M") == 500 << 20
    assert memory.parse_size("2.5g") == int(2.5 * (1 << 30))
    assert memory.parse_size("64MiB") == 64 << 20
    assert memory.parse_size("1048576") == 1 << 20


def test_a_bad_size_is_a_user_error():
    from core.errors import UserError

    with pytest.raises(UserError, match="--memory"):
        memory.parse_size("lots")


def test_the_default_budget_is_half_the_available_memory_per_job():
    free = memory.available()
    assert free > 0
    assert memory.budget(None, 1) == free // 2 or abs(memory.budget(None, 1) - free // 2) < 64 << 20
    assert memory.budget(None, 4) <= memory.budget(None, 1) // 4 + (64 << 20)
    assert memory.budget("1G", 4) == 1 << 30  # --memory is per process, as given


def test_peak_rss_is_in_bytes():
    peak = memory.peak_rss()
    assert peak["self"] > 10 << 20  # python + torch alone take more than 10 MB
