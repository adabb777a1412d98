"""GPU only: per-batch speculation depth from the plan through SGLang's adaptive EAGLE-3 tiers.

Needs CUDA, SGLang 0.5.23 with its CUDA dependencies, and local weights (no model hub here):
    SGLANG_SLO_GPU_MODEL=/path/Llama-3.1-8B-Instruct
    SGLANG_SLO_GPU_DRAFT=/path/sglang-EAGLE3-Llama-3.1-Instruct-8B
Skipped otherwise. Checks that every decode batch ran at a pre-captured tier and that, under a
plan, the tier is the plan's depth snapped down to a captured tier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not (os.environ.get("SGLANG_SLO_GPU_MODEL") and os.environ.get("SGLANG_SLO_GPU_DRAFT")),
                       reason="set SGLANG_SLO_GPU_MODEL and SGLANG_SLO_GPU_DRAFT to local weights"),
]

TIERS = (0, 1, 3, 5)


def test_plan_depth_drives_eagle3_tiers(tmp_path):
    import httpx

    from sglang_slo.sglang_plugin.spec_policy import snap_to_tier
    from tests.sglang_support.cpu_server import free_port

    port = free_port()
    log = tmp_path / "iterations.jsonl"
    cmd = [sys.executable, "-m", "sglang_slo.sglang_plugin.launch", "--model", os.environ["SGLANG_SLO_GPU_MODEL"],
           "--policy", "slo_unified", "--hardware", "configs/hardware/h100-llama3.1-8b-eagle3.yaml",
           "--spec-tiers", ",".join(map(str, TIERS)), "--port", str(port), "--",
           "--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", os.environ["SGLANG_SLO_GPU_DRAFT"],
           "--speculative-eagle-topk", "1", "--speculative-num-steps", "3", "--enable-priority-scheduling"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, SGLANG_SLO_REPORT_LOG=str(log)), start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        classes = ("coding", "chat", "summarization")
        with httpx.Client(timeout=300) as c:
            for i in range(12):
                r = c.post(url + "/generate", json={
                    "text": f"Write a function number {i} that sorts a list.",
                    "sampling_params": {"max_new_tokens": 64, "temperature": 0,
                                        "custom_params": {"slo": {"class": classes[i % 3]}}}})
                assert r.status_code == 200
        its = [json.loads(line) for line in log.read_text().splitlines()]
        decodes = [it for it in its if it["mode"] == "decode"]
        assert decodes and all(it["draft_steps"] in TIERS for it in decodes)
        ruled = [it for it in decodes if it["plan_spec_depth"] is not None and it["plan_spec_depth"] >= 0]
        for it in ruled:
            assert it["draft_steps"] == snap_to_tier(it["plan_spec_depth"], list(TIERS))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(120)
