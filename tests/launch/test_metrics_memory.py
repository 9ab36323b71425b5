"""The trainer's and benchmarks' CPU peak memory is the process's own, not inherited from a large parent."""

import subprocess
import sys


def test_a_small_child_of_a_large_parent_reports_its_own_peak():
    ballast = bytearray(2**30)
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])  # touch every page: the parent's RSS is now > 1 GiB
    child = subprocess.run([sys.executable, "-c", "from launch.metrics import peak_rss_mb; print(peak_rss_mb())"],
                           capture_output=True, text=True, check=True)
    assert float(child.stdout) < 700, child.stdout  # importing torch: ~220 MB; ru_maxrss: the parent's > 1 GiB
    del ballast
