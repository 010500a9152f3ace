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


def test_benchmark_engines_quick_prints_each_engine():
    """--engines --quick: D-FINE N through default, fast, onnxruntime (our export), onnx-fast (the export of ours after
    fast_inference) and transformers, each in a process of its own, with a ratio to transformers and a peak RSS each
    (compiled is left to the full run: minutes)."""
    script = Path(__file__).parent / "benchmark.py"
    r = subprocess.run([sys.executable, str(script), "--engines", "--quick"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split()[1]: line.split() for line in r.stdout.splitlines() if line.startswith("dfine-n ")}
    assert set(rows) == {"default", "fast", "onnxruntime", "onnx-fast", "transformers"}, r.stdout
    assert rows["transformers"][4] == "1.00" and all(float(row[4]) > 0 and float(row[-1]) > 0 for row in rows.values())


def test_benchmark_autocast_prints_both_recipes():
    """--autocast 3: float32 and bfloat16-autocast training steps of both recipes trained here, with their losses."""
    script = Path(__file__).parent / "benchmark.py"
    r = subprocess.run([sys.executable, str(script), "--autocast", "3"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("dfine-n ", "gdino-small "))]
    assert len(rows) == 2 and all("bfloat16 autocast" in row and "apart" in row for row in rows), r.stdout
