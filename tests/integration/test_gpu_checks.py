"""The prepared GPU measurements run, here on the CPU at tiny sizes, so a lent GPU's few minutes are not spent on
a broken script: ``benchmarks/train_throughput.py``'s variants and MFU, and ``benchmarks/gpu/checks.sh``'s
rehearsal (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--image-size", "32", "--batch-size", "2", "--warmup", "2", "--steps", "3", "--repeats", "1"]


def test_throughput_variants_report_speed_mfu_and_the_fit_to_plain_ratio(tmp_path):
    out = tmp_path / "tt.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), *TINY, "--variants", "plain-32",
                    "fit", "plain", "fit-32+channels_last", "--peak-tflops", "2.0", "--skip-ddim", "--out", str(out)],
                   check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["plain-32", "fit-bf16-mixed", "plain-bf16-mixed", "fit-32+channels_last"]
    assert result["gflop_per_step"] > 0 and result["peak_bf16_tflops"] == 2.0
    for r in rows.values():
        assert r["images_per_s"] > 0
        assert r["mfu"] == pytest.approx(result["gflop_per_step"] * r["images_per_s"] / 2 / 1e3 / 2.0, rel=0.02)
    assert rows["plain-32"]["speedup"] == 1.0
    assert result["ratio"] == pytest.approx(rows["fit-bf16-mixed"]["images_per_s"]
                                            / rows["plain-bf16-mixed"]["images_per_s"], rel=0.01)


def test_a_malformed_variant_is_refused_by_name(monkeypatch):
    # in this process (the script's imports are already loaded here): the refusal comes before any measurement
    script = load_benchmark("train_throughput", monkeypatch)
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--variants", "fit-fp8+turbo"])
    with pytest.raises(SystemExit) as stopped:
        script.main()
    # SystemExit with a message: Python prints it to stderr and exits with status 1
    assert isinstance(stopped.value.code, str) and "variant 'fit-fp8+turbo'" in stopped.value.code


@pytest.mark.slow
def test_gpu_checks_rehearse_every_part_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SMOKE": "1", "DEVICE": "cpu", "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "checks.sh"), "throughput", "memory", "quality"],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    log = (tmp_path / "out" / "checks.log").read_text()
    for part in ("throughput", "ae_memory", "latent3d", "quality"):
        assert f"=== {part}: exit 0" in log, log[-3000:]
    throughput = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert [r["variant"] for r in throughput["rows"]] == ["plain-32", "fit-bf16-mixed+channels_last"]
    assert json.loads((tmp_path / "out" / "recipe_quality_128.json").read_text())[0]["fraction"] > 0
