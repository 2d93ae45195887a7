"""Does this CPU compute the guard's logits as the reference machine did? (docs/guard-classifier.md, session 21)

    .venv/bin/python -m bench.guard_cpu_logits

Prints the CPU, then the largest difference between the shipped guard's logits and tests/guard/reference_logits.json
(written on an AVX2-only AMD EPYC), with the shipped compile config (`SAME_ON_EVERY_CPU`: f32, no dynamic
quantization) and with OpenVINO's default.
On a CPU with int8 dot products (AVX-512 VNNI, AMX) the default should be off by ~0.1 a logit and the shipped
config within 1e-4; on an AVX2-only CPU both agree (session 21: 5e-6).

On the GPU machine (Python 3.12, no openvino): `pip download openvino==<ours> --python-version 3.12
--only-binary=:all: --no-deps`, unzip it, tar `openvino/` (without the GPU and NPU plugins, the frontends but IR,
`include/`, `cmake/`: ~19.5 MB with xz) and `openvino_telemetry/` into data/ovpkg/, carry that folder, unpack it there
and run this module with the unpacked folder first on PYTHONPATH.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import numpy as np

import app.guard.guard_model as guard_model

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "guard" / "reference_logits.json"


def cpu() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags")), [])
    wanted = sorted(f for f in flags if f.startswith(("avx512_vnni", "avx_vnni", "amx", "avx512f", "avx2")))
    return f"{name or platform.processor()} [{' '.join(wanted)}]"


def measure(label: str) -> None:
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    model = guard_model.GuardModel.load()
    gaps = [float(np.abs(model._run(text).logits - np.array(want)).max()) for text, want in reference["logits"].items()]
    print(f"{label}: max |logit - reference| {max(gaps):.2e}, median {float(np.median(gaps)):.2e}")


def main() -> None:
    print(cpu())
    measure("shipped config (SAME_ON_EVERY_CPU)")
    guard_model.SAME_ON_EVERY_CPU = {"INFERENCE_PRECISION_HINT": "f32"}  # OpenVINO's default quantization
    measure("OpenVINO default")


if __name__ == "__main__":
    main()
