"""The `serve --backend sglang` launcher: SGLang command line, tier config, clear refusals."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("sglang", reason="SGLang is not installed (make sglang-cpu)")

from sglang_slo.sglang_plugin import launch  # noqa: E402


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    launch.add_arguments(p)
    return p.parse_args(list(argv))


def test_command_line_passes_sglang_args_verbatim_and_adds_cpu_flags(tmp_path):
    args = parse("--model", "/m", "--cpu", "--port", "31000", "--", "--max-total-tokens", "16384", "--tp", "1")
    cmd = launch.sglang_command(args)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert cmd[cmd.index("--model-path") + 1] == "/m" and cmd[cmd.index("--port") + 1] == "31000"
    assert cmd[cmd.index("--device") + 1] == "cpu" and cmd[cmd.index("--attention-backend") + 1] == "torch_native"
    assert cmd[-4:] == ["--max-total-tokens", "16384", "--tp", "1"]


def test_spec_tiers_become_sglang_adaptive_config(tmp_path):
    path = launch.write_tier_config([3, 0, 1, 3], str(tmp_path))
    assert json.loads(open(path).read()) == {"1": {"candidate_steps": [0, 1, 3]}}
    from sglang.srt.speculative.adaptive_spec_params import resolve_candidate_steps_from_config

    assert resolve_candidate_steps_from_config(path) == [0, 1, 3]  # SGLang reads it back
    cmd = launch.sglang_command(parse("--model", "/m"), path)
    assert "--speculative-adaptive" in cmd and cmd[cmd.index("--speculative-adaptive-config") + 1] == path


@pytest.mark.parametrize("tiers", ["a,b", "-1,2"])
def test_bad_spec_tiers_refused_with_message(tiers, capsys):
    assert launch.run(parse("--model", "/m", "--no-planner", f"--spec-tiers={tiers}")) == 2
    assert "--spec-tiers" in capsys.readouterr().err


def test_cpu_without_the_kernel_bridge_is_refused_clearly(monkeypatch, capsys):
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    assert launch.run(parse("--model", "/m", "--cpu", "--no-planner")) == 2
    err = capsys.readouterr().err
    assert "sgl_kernel" in err or "SGLANG_USE_CPU_ENGINE" in err


def test_planner_needs_a_hardware_profile(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(launch, "_check_cpu_environment", lambda: "")
    assert launch.run(parse("--model", "/m", "--policy", "slo_unified")) == 2
    assert "--hardware" in capsys.readouterr().err
