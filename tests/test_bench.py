"""benchmarks/bench_model.py --quick runs end to end: every row it writes is a finite positive number
and every equality check between our model and transformers' passed. Speed is not checked (it is
whatever the machine gives); the full run is the one to read."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_benchmark(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}  # transformers imports DeepSpeed, which would probe for GPUs
    r = subprocess.run([sys.executable, "benchmarks/bench_model.py", "--quick", "--json", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = json.loads(out.read_text())

    rows = got["rows"]
    for kind in ("train step 2x48,", "train step, full logits", "peak RSS over the loaded model",
                 "peak live memory over the loaded model",
                 "load (from_pretrained)", "peak RSS while loading", "greedy decode, batch 1,",
                 "greedy decode, batch 8,", "time to first token", "preprocess 512x512", "preprocess 1024x768"):
        for dtype in (("",) if kind.startswith("preprocess") else ("float32", "bfloat16")):
            assert any(kind in row["measurement"] and dtype in row["measurement"] for row in rows), (kind, dtype)
    for row in rows:
        assert all(positive(row[k]) for k in ("ours", "transformers", "ratio")), row
        if row["limit"] is not None:  # training and decoding rows: a fraction of the machine's rate
            assert positive(row["ours_of_limit"]) and positive(row["transformers_of_limit"]), row
    assert "| measurement |" in r.stdout and r.stdout.count("\n|") >= len(rows)  # the markdown table

    for dtype, limits in got["machine"].items():
        assert set(limits) == {"matmul_flops", "matvec_bytes"} and all(map(positive, limits.values())), dtype

    names = [c["name"] for c in got["checks"]]
    for kind in ("loss, vocab", "loss, full logits", "logits, max |difference|", "greedy tokens, batch 1,",
                 "greedy tokens, batch 8,", "first training loss, ours process", "preprocessed pixels"):
        assert any(n.startswith(kind) for n in names), kind
    assert all(c["passed"] for c in got["checks"]), [c for c in got["checks"] if not c["passed"]]
