"""The plugin-overhead benchmark's parsers (tests/sglang_support/plugin_overhead.py); no server."""

from __future__ import annotations

import json

import pytest

from tests.sglang_support.plugin_overhead import CONFIGS, decode_windows, make_server, report_log_iters, summary


def _decode_line(running: int, tput: float, queued: int = 0) -> str:
    return (f"[2026-11-22 17:04:19] Decode batch, #running-req: {running}, #token: 44, token usage: 0.00, "
            f"cpu graph: False, gen throughput (token/s): {tput}, #queue-req: {queued}")


def test_decode_windows_take_sglang_throughput_of_steady_windows_only():
    lines = [
        _decode_line(4, 15.0),  # the first window of the batch: its timer started while idle -> dropped
        _decode_line(4, 1000.0),  # 4 tokens per iteration at 1000 tok/s -> 4 ms per iteration
        "[2026-11-22 17:04:19] Prefill batch, #new-seq: 1, #new-token: 20",
        _decode_line(4, 2000.0),
        _decode_line(3, 1500.0),  # a request finished: not batch 4
        _decode_line(4, 800.0, queued=1),  # something waits: not pure decode
        _decode_line(4, 500.0),  # first steady window after the break -> dropped
        _decode_line(4, 500.0),
    ]
    assert decode_windows(lines, 4) == pytest.approx([4.0, 2.0, 8.0])
    assert decode_windows(lines, 3) == []


def test_report_log_iters_keep_decode_iterations_of_the_batch_size_after_the_first_three():
    rows = [{"mode": "prefill", "rids": ["a", "b"], "start_s": 0.0, "end_s": 0.01}]
    rows += [{"mode": "decode", "rids": ["a", "b"], "start_s": i * 0.01, "end_s": i * 0.01 + 0.003} for i in range(6)]
    rows += [{"mode": "decode", "rids": ["a"], "start_s": 1.0, "end_s": 1.002}]
    lines = [json.dumps(r) for r in rows] + ["not json"]
    assert report_log_iters(lines, 2) == pytest.approx([3.0, 3.0, 3.0])
    assert summary([1.0, 2.0, 3.0])["median_ms"] == 2.0 and summary([]) == {"n": 0}


def test_server_configs_differ_only_in_what_they_name(tmp_path):
    def cmd_env(name):
        srv = make_server(name, tmp_path / "model", tmp_path / name, 10, None)
        return srv.cmd, srv.env

    cmd, env = cmd_env("plugin")
    assert "sglang_slo.sglang_plugin.launch" in cmd and "--no-planner" not in cmd
    assert "--enable-priority-scheduling" in cmd and env["SGLANG_SLO_REPORT_LOG"]
    cmd_nosc, env_nosc = cmd_env("plugin-nosidecar")
    assert cmd_nosc.index("--no-planner") < cmd_nosc.index("--")  # a launcher flag, not SGLang's
    _, env_nolog = cmd_env("plugin-nolog")
    assert "SGLANG_SLO_REPORT_LOG" not in env_nolog
    cmd_d, env_d = cmd_env("default")
    assert "sglang.launch_server" in cmd_d and "--enable-priority-scheduling" not in cmd_d
    assert env_d["SGLANG_PLUGINS"] == "none-loaded"
    assert "--decode-log-interval" in cmd_d and "--enable-priority-scheduling" in cmd_env("default-prio")[0]
    cmd_nice, _ = cmd_env("plugin-nice")
    assert cmd_nice[cmd_nice.index("--planner-nice") + 1] == "10" and cmd_nice.index("--planner-nice") < cmd_nice.index("--")
    assert "--planner-nice" not in cmd
    assert set(CONFIGS) == {"default", "default-prio", "plugin", "plugin-nolog", "plugin-nosidecar", "plugin-nice"}


def test_sched_delta_is_per_iteration_and_per_process():
    from tests.sglang_support.plugin_overhead import sched_delta

    got = sched_delta({"scheduler": (1_000_000, 0, 10)}, {"scheduler": (4_000_000, 600_000, 70), "sidecar": (300_000, 0, 30)}, 30)
    assert got == {"scheduler": {"cpu_us": 100.0, "runq_wait_us": 20.0, "slices": 2.0},
                   "sidecar": {"cpu_us": 10.0, "runq_wait_us": 0.0, "slices": 1.0}}
