"""Run ONNX Runtime GenAI's model builder on a Hugging Face folder, in a subprocess.

A subprocess because the builder is a script (`python -m onnxruntime_genai.models.builder`) that loads the
whole model with transformers and prints progress bars; its failure becomes one MoeifyError line with the
last line it printed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from moeify.errors import MoeifyError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
PROVIDERS = ("cpu", "cuda")


def require_genai() -> None:
    """MoeifyError when onnxruntime-genai or the builder's onnx-ir is missing."""
    for module, package in (("onnxruntime_genai", "onnxruntime-genai-cuda"), ("onnx_ir", "onnx-ir")):
        if importlib.util.find_spec(module) is None:
            raise MoeifyError(f"--genai needs the {package} package: pip install 'moeify[genai]'")


def check_target(precision: str, provider: str) -> None:
    if precision not in PRECISIONS:
        raise MoeifyError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if provider not in PROVIDERS:
        raise MoeifyError(f"unknown provider {provider!r}; valid: {', '.join(PROVIDERS)}")
    if precision == "fp16" and provider == "cpu":
        raise MoeifyError(
            "ONNX Runtime GenAI builds fp16 decoders for CUDA only; use --provider cuda, or "
            "--precision fp32/int8/int4 on CPU"
        )


def run_builder(hf_dir: Path, out_dir: Path, precision: str, provider: str, cache_dir: Path) -> None:
    """Build the dense GenAI folder of `hf_dir` into `out_dir`."""
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out_dir),
        "-p",
        precision,
        "-e",
        provider,
        "-c",
        str(cache_dir),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (out_dir / "model.onnx").is_file():
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit code {done.returncode}"
        raise MoeifyError(f"onnxruntime_genai's builder failed on the dense skeleton: {last}")
