"""benchmarks/gpu_suite.py --smoke: every path of the GPU suite at tiny shapes on the CPU (what CI can run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "suite.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["failed"] == [] and doc["skipped"] == []
    assert set(doc["parts"]) == {"kernels", "llava-7b", "qwen2-vl-7b", "engine"}
    kernels = doc["parts"]["kernels"]["rows"][0]  # attention_kernels.py --smoke: every launch path, 3 edit kinds
    assert kernels["returncode"] == 0
    assert any(line.startswith("smoke: ") for line in kernels["output"])
    assert not any("FAILED" in line for line in kernels["output"])

    def table(part: str, name: str) -> list[dict]:
        return [r for r in doc["parts"][part]["rows"] if r.get("table") == name]

    through = {(r["batch"], r["backend"]) for r in table("llava-7b", "throughput")}
    assert {(1, "sdpa"), (1, "torch"), (1, "triton"), (2, "sdpa"), (2, "torch")} <= through
    assert {(1, "sdpa"), (1, "torch")} <= {(r["batch"], r["backend"]) for r in table("qwen2-vl-7b", "throughput")}
    assert {r["method"] for r in table("llava-7b", "mitigations")} >= {"pai", "var", "mma"}
    assert {r["method"] for r in table("llava-7b", "branches")} >= {"vcd", "m3id"}
    compiled = table("llava-7b", "compiled")
    assert {r["mitigations"] for r in compiled} == {"none", "mma"}
    assert all(r["decode_step"] == "compiled" for r in compiled)
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in table("llava-7b", "throughput"))
    assert doc["parts"]["engine"]["rows"][0]["tok_s"] > 0
