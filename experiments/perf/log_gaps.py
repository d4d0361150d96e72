"""The longest silence in a command's console output, as a person watching a log would see it.

    python experiments/perf/log_gaps.py -- alignlab experiment=quickstart rounds=1 hydra.run.dir=/tmp/q

Runs the command with its stdout and stderr on a pipe (not a terminal, so progress bars draw at their log-file
pace), timestamps every chunk of output and prints the five longest gaps between chunks.
"""

from __future__ import annotations

import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    cmd = argv[argv.index("--") + 1:] if "--" in argv else argv
    if not cmd:
        print(__doc__)
        return 2
    t0 = last = time.time()
    gaps: list[tuple[float, float, str]] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while chunk := proc.stdout.read1(65536):
        now = time.time()
        text = chunk.decode("utf-8", errors="replace").replace("\r", "\n").strip().splitlines()
        gaps.append((now - last, now - t0, text[-1][:100] if text else ""))
        last = now
    rc = proc.wait()
    print(f"exit {rc}, {time.time() - t0:.1f} s, {len(gaps)} output chunks; longest gaps:")
    for gap, at, line in sorted(gaps, reverse=True)[:5]:
        print(f"  {gap:5.1f} s before t={at:6.1f} s: {line}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
