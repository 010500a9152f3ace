"""The benchmark script runs (a smoke test of `--quick`); it times nothing that is asserted."""
import subprocess
import sys
from pathlib import Path


def test_benchmark_quick_prints_the_table():
    script = Path(__file__).parent / "benchmark.py"
    r = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ratio" in r.stdout and "GFLOP/s" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("dfine-n"))
    assert len(row.split()) >= 8  # ours, min-max, theirs, min-max, ratio, GFLOP, GFLOP/s, RSS
    assert "backbone" in r.stdout and "decoder + heads" in r.stdout  # the per-stage split
    assert "2 prompts x 1 image" in r.stdout and "1 prompt x 2 images" in r.stdout  # encode once, query many
    rss = next(line for line in r.stdout.splitlines() if line.startswith("gdino-small") and "/" in line)
    assert all(float(v) > 0 for v in rss.split()[1::2])  # peak RSS in float32 / bfloat16
