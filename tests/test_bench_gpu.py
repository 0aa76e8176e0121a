"""`vit-spine bench gpu` on the CPU with a tiny config, with the packages a GPU machine lacks hidden.

The GPU machines this benchmark meets first have torch, transformers and pyarrow, but not `datasets`,
pydicom, nibabel, the DICOM codecs, evaluate, sklearn, scipy or matplotlib. The subprocess hides them
from the import system (as if not installed: `find_spec` returns None, so transformers sees them as
absent too) and runs the real entry point.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from transformers import ViTConfig

from vit_spine import cli
from vit_spine.benchmarks import gpu
from vit_spine.models.vit import PRESETS

HIDDEN = ("datasets", "pydicom", "nibabel", "imagecodecs", "gdcm", "evaluate", "sklearn", "scipy", "matplotlib")
TINY = ["--model_config", "tiny", "--image_size", "32", "--num_slices", "256", "--slices_per_study", "32",
        "--batch_sizes", "8,16", "--variant_batch_size", "8", "--warmup_steps", "1", "--steps", "3", "--workers", "1",
        "--compile_backend", "aot_eager", "--predict_batch_sizes", "16", "--predict_slices", "64", "--peak_tflops", "1"]

# Runs `python -m vit_spine ARGV...` with HIDDEN unfindable, then checks that none of them got imported.
RUNNER = """
import importlib.machinery, runpy, sys
hidden = set(sys.argv[1].split(","))

class Hide(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in hidden else super().find_spec(name, path, target)

sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = Hide
sys.argv = ["vit_spine", *sys.argv[2:]]
try:
    runpy.run_module("vit_spine", run_name="__main__")
finally:
    print("imported hidden:", sorted(hidden & {m.partition(".")[0] for m in sys.modules}))
"""


def test_vit_b16_forward_flops_are_the_quoted_17_6_g_multiply_adds():
    config = ViTConfig(image_size=224, num_labels=14, **PRESETS["base"])
    flops = gpu.vit_forward_flops(config)
    assert flops == 35_126_141_952  # 12 layers x 2,907,909,120 + patch embedding 231,211,008 + head 21,504
    assert flops / 2 / 1e9 == pytest.approx(17.56, abs=0.01)  # multiply-adds, the usual "17.6 GFLOPs"
    # 1000 training img/s on a 790 TFLOP/s device: 1000 x 3 x 35.13 GFLOP / 790 TFLOP/s
    assert gpu.mfu(1000.0, flops, 790.0) == pytest.approx(0.13339, abs=1e-5)
    assert gpu.mfu(1000.0, flops, None) is None


def test_bench_lists_gpu(capsys):
    assert cli.main(["bench"]) == 0
    assert "  gpu      ViT training img/s, MFU and data wait" in capsys.readouterr().out


def test_options_are_checked():
    with pytest.raises(ValueError, match="choose from sdpa, eager, adamw_foreach, compile"):
        gpu.GpuBenchConfig(variants="sdpa,flash")
    with pytest.raises(ValueError, match="smaller than the largest batch"):
        gpu.GpuBenchConfig(num_slices=100, batch_sizes="64,128")
    assert gpu.GpuBenchConfig(batch_sizes="128,256,512").variant_batch_size == 256


def test_bench_gpu_runs_every_variant_on_cpu_without_the_packages_gpu_machines_lack(tmp_path):
    done = subprocess.run([sys.executable, "-c", RUNNER, ",".join(HIDDEN), "bench", "gpu", *TINY, "--tmp", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported hidden: []" in out
    assert "no CUDA device: running on the CPU" in done.stderr
    assert "(patch 16, 5 tokens): 0.006084 GFLOP forward, 0.01825 per training image; peak 1 TFLOP/s" in out
    number, share = r"\d+\.\d", r"\d+\.\d %"
    rows = re.findall(rf"^\| (\w+) +\| (\d+) +\| {number} +\| {number} +\| \d\.\d{{3}} +\| {share} +\| {share} +\| "
                      rf"{share} +\| (\d+|-) +\| n/a +\|$", out, re.MULTILINE)
    assert [(variant, batch) for variant, batch, _ in rows] == [
        ("sdpa", "8"), ("sdpa", "16"), ("eager", "8"), ("adamw_foreach", "8"), ("compile", "8")]
    assert [loader != "-" for _, _, loader in rows] == [True, True, False, False, False]  # loader alone: sdpa rows
    assert "1 DataLoader worker(s), prefetch 4" in out
    assert re.search(r"^best full path: \d+\.\d img/s \(\w+, batch \d+\), MFU \d+\.\d %", out, re.MULTILINE)
    assert re.search(r"^predict \(Predictor.slice_probabilities, uint8 host batches, fp32\): batch 16: \d+\.\d slices/s$",
                     out, re.MULTILINE)
    assert list(tmp_path.iterdir()) == []  # the random shard is removed
