"""Where a fresh install's numba compile time goes: per function, and LLVM's share.

Runs the first call of the pseudo-gradient (as ``bench_loss.py --only compile`` does) in a
fresh process with an empty ``NUMBA_CACHE_DIR`` and prints

* the total CPU time of that first call;
* the time numba spent holding its LLVM lock (optimisation and machine code) against its
  compiler lock (everything), summed over the compiled entry points;
* each compiled function's exclusive wall time (its own compile, callees' compiles
  subtracted; numba's ``numba:compile`` events), largest first.

    python benchmarks/profile_compile.py            # the 20 largest
    python benchmarks/profile_compile.py --top 60
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import sys, time
from collections import defaultdict
from numba.core import event

exclusive = defaultdict(float)
stack = []


class Listener(event.Listener):
    def on_start(self, ev):
        stack.append([ev.data["dispatcher"].py_func.__qualname__, time.perf_counter(), 0.0])

    def on_end(self, ev):
        name, t0, child = stack.pop()
        dt = time.perf_counter() - t0
        exclusive[name] += dt - child
        if stack:
            stack[-1][2] += dt


event.register("numba:compile", Listener())
from mapdet.core import apnms, editap, gradkernel, overlap  # noqa: E402

box = [0.0, 0.0, 10.0, 10.0]
t = time.process_time()
apnms.ap_pseudo_gradient([0.5, 0.4], [box, box], [0, 0], [box], [0])
print(f"first call of the pseudo-gradient: {time.process_time() - t:.1f} s CPU")
llvm = total = 0.0
for module in (gradkernel, editap, overlap):
    for name in dir(module):
        fn = getattr(module, name)
        for sig in getattr(fn, "signatures", []) if hasattr(fn, "get_metadata") else []:
            timers = fn.get_metadata(sig).get("timers", {})
            llvm += timers.get("llvm_lock", 0.0)
            total += timers.get("compiler_lock", 0.0)
print(f"entry points: {total:.1f} s holding the compiler lock, {llvm:.1f} s of it the LLVM lock "
      f"({100 * llvm / max(total, 1e-9):.0f}%; nested compiles count in their callers too)")
print("exclusive compile time per function:")
top = int(sys.argv[1])
for name, sec in sorted(exclusive.items(), key=lambda kv: -kv[1])[:top]:
    print(f"  {sec:6.2f} s  {name}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--top", type=int, default=20, help="functions listed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", _CHILD, str(args.top)], env=env, check=True)


if __name__ == "__main__":
    main()
