"""`scripts/gpu_check.sh --dry-run`: the GPU acceptance check's plumbing on the CPU (tiny model,
fp32, gloo): every section runs and reports, and its own checks pass."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["matmul_peak_tflops"] > 0
    assert result["attention"]["sdpa_varlen"]["ok"] is True  # bf16 per-document SDPA vs the fp32 reference
    assert set(result["attention"]["sdpa_varlen"]["rel_errors"]) == {"out", "dq", "dk", "dv"}
    assert "skipped" in result["attention"]["flash_attn_varlen"]
    for name in ("full_bf16", "lora", "qlora", "checkpointing"):
        run = result["train"][name]
        assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1 and run["plan_gb"] > 0, (name, run)
    assert "skipped" in result["train"]["compile"]
    assert result["fsdp"]["backend"] == "gloo" and result["fsdp"]["dcp_checkpoint"] is True
    assert result["fsdp"]["exact"] is True, result["fsdp"]
    trl = result["trl"]
    assert ("skipped" in trl) or (trl["tokens_per_s"] > 0 and result["vs_trl"] > 0)
    assert "variant" in proc.stdout and "fsdp2 (gloo) DCP save + resume: EXACT" in proc.stdout
