"""sglang-slo's SGLang plugin: per-request SLOs and planner-driven batches inside SGLang.

Loaded by SGLang through the entry point group `sglang.srt.plugins` (name `slo`, value
`sglang_slo.sglang_plugin:register`) in every process that calls `load_plugins()`. It
changes SGLang only through `HookRegistry` hooks on SGLang 0.5.23 (see `targets.py`):

- SLO intake: `custom_params["slo"]` + `priority` -> deadlines on each `Req`; invalid SLOs
  abort that request with the parser's message.
- Planner link: TP rank 0 talks to the sidecar over ZMQ ($SGLANG_SLO_PLANNER); plans reach
  every rank through the scheduler's request broadcast; no fresh plan -> SGLang's own
  behaviour.
- Plans applied: token budget, admitted set, per-request chunks (`SloPrefillAdder`), queue
  order (`calc_priority`), prefill-or-decode (`_should_defer_prefill`), shedding (priority
  retraction), speculation depth (`SloStepPolicy`).
- Feedback: one `IterationReport` per batch result.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """SGLang plugin entry point: check every hook target, then register the hooks.

    Raises `UnsupportedSglangError` (a SystemExit, so SGLang's plugin loader cannot swallow
    it) when the installed SGLang lacks a target. Idempotent.
    """
    global _registered
    if _registered:
        return
    from sglang_slo.sglang_plugin.hooks import register_hooks
    from sglang_slo.sglang_plugin.targets import check_targets

    check_targets()
    register_hooks()
    _registered = True
    log.info("sglang-slo plugin registered")
