"""The host memory allocator of a CPU training process: tcmalloc or jemalloc when installed, else the C library's.

Why. glibc's heap fragments under second-order training. A step creates ~320k small C++/Python objects that
sit between the activation buffers and pin them after they are freed. An LD_PRELOAD malloc log of one 3xs
run, replayed through glibc, needs 1,406 MB; the same log without its sub-1 KiB allocations needs 952 MB.
Measured here (3xs, batch 8, context 128, K=2, one thread; settled peak RSS and median CPU s per step):

| allocator | none | mcmc_step | Transformer++ |
|---|---|---|---|
| glibc | 1,628 MB, 2.01 s | 1,115 MB, 2.87 s | 579 MB, 0.48 s |
| tcmalloc (gperftools) | 1,088 MB, 1.93 s | 910 MB, 2.59 s | 495 MB, 0.41 s |
| jemalloc, default decay | 1,051 MB, 2.36-2.81 s | 888 MB, 3.31 s | 479 MB, 0.40 s |

tcmalloc is both leaner and faster, so `auto` takes it first. jemalloc returns pages to the kernel and
faults them back in, which costs 20-35% here. Both allocators keep the overhead over the live tensors about the
same for every checkpointing policy, which is what lets planning/ predict a policy it was not calibrated on.
Intel's PyTorch CPU launcher preloads one of the two for the same reasons. Debian/Ubuntu packages:
libtcmalloc-minimal4, libjemalloc2.

An allocator must be in place before the interpreter allocates anything, so `ebt train` re-executes itself
once with LD_PRELOAD set. Only the command-line entry does that, never a library call. Without either library
the run continues on glibc and says so.
"""

from __future__ import annotations

import ctypes.util
import os
import signal
import sys
from pathlib import Path

from planning.host import host_allocator as loaded_allocator  # one definition: the planner calibrates per allocator

CHOICES = ("auto", "tcmalloc", "jemalloc", "system")
LIBRARIES = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so"),
             "jemalloc": ("libjemalloc.so.2", "libjemalloc.so")}
SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
               "/usr/local/lib", f"{sys.prefix}/lib")
ENV_CHOICE = "EBT_CPU_ALLOCATOR"  # overrides the config, e.g. for benchmarks that compare allocators
ENV_REEXEC = "EBT_ALLOCATOR_REEXEC"  # set in the re-executed process: never re-execute twice


def find_library(name: str) -> str | None:
    """Absolute path of the named allocator's shared library, or None."""
    for directory in SEARCH_DIRS:
        for filename in LIBRARIES[name]:
            path = Path(directory) / filename
            if path.is_file():
                return str(path)
    found = ctypes.util.find_library(name.removesuffix("_minimal"))
    return found if found and Path(found).is_absolute() else None


def effective_choice(configured: str) -> str:
    """The configured choice, unless the environment overrides it (a bad override is named as such)."""
    override = os.environ.get(ENV_CHOICE)
    if override is None:
        return configured
    if override not in CHOICES:
        raise ValueError(f"{ENV_CHOICE}: must be one of {', '.join(CHOICES)}, got {override!r}")
    return override


def resolve(choice: str) -> tuple[str, str | None]:
    """(allocator name, library path) for a choice; ("system", None) when nothing better is installed."""
    if choice not in CHOICES:
        raise ValueError(f"config key 'trainer.cpu_allocator': must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "system":
        return "system", None
    for name in (("tcmalloc", "jemalloc") if choice == "auto" else (choice,)):
        path = find_library(name)
        if path:
            return name, path
    if choice != "auto":
        raise ValueError(f"config key 'trainer.cpu_allocator': {choice} is not installed (looked for "
                         f"{', '.join(LIBRARIES[choice])}); install it or use auto/system")
    return "system", None


def preload_env(path: str, env: dict[str, str]) -> dict[str, str]:
    preloaded = env.get("LD_PRELOAD", "")
    return {**env, "LD_PRELOAD": f"{path}:{preloaded}" if preloaded else path, ENV_REEXEC: "1"}


def reexec_with(name: str, path: str | None) -> None:
    """Replace this process by itself with the resolved allocator preloaded; returns when nothing is to be done."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_REEXEC):
        return
    if path is None or loaded_allocator() == name:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # A Ctrl-C between execve and the new interpreter's handler would kill it by SIGINT's default action, with no
    # line (seen as exit -2 when the press came ~1 s in). Blocked here, it stays pending across execve until
    # launch/cli.py's main unblocks it inside the try that turns it into one line.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        # orig_argv keeps the interpreter's own flags and `-m module` (argv drops them); execv keeps the PID,
        # so torchrun, Slurm and our own launcher keep tracking and signalling the same process.
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], preload_env(path, dict(os.environ)))
    finally:  # only reached when execve failed
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
