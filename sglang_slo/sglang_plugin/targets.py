"""Every SGLang attribute the plugin hooks or overrides, with the signature it expects.

SGLang's `HookRegistry` only logs "Failed to apply hooks" when a target moved, and the server
then runs without the plugin's scheduling. `check_targets()` runs first instead and refuses
to start, naming the missing target and the supported SGLang version.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

SUPPORTED_SGLANG = "0.5.23"

_SCHED = "sglang.srt.managers.scheduler.Scheduler"
_POLICY = "sglang.srt.managers.schedule_policy"
_SPEC = "sglang.srt.speculative.eagle_worker_v2.AdaptiveSpeculativeParams"


@dataclasses.dataclass(frozen=True)
class Target:
    """One hooked (or subclassed) SGLang attribute."""

    path: str
    """Dotted path, as `HookRegistry.register` takes it."""
    params: tuple[str, ...] | None
    """Expected parameter names in order (None: a class, only its existence is checked)."""
    why: str
    """What the plugin does there."""


TARGETS: tuple[Target, ...] = (
    Target(f"{_SCHED}._create_generation_req", ("self", "recv_req", "args", "kwargs"), "attach each request's SLO"),
    Target(f"{_SCHED}._poll_timeout_aborts", ("self",), "rank 0 polls the planner; plans ride the broadcast"),
    Target(f"{_SCHED}.init_request_dispatcher", ("self",), "route PlannerUpdate to every rank's handler"),
    Target(f"{_SCHED}._should_defer_prefill", ("self", "running_batch"), "prefill-or-decode choice"),
    Target(f"{_SCHED}.get_prefill_adder_class", ("self",), "budget, admission and chunks (SloPrefillAdder)"),
    Target(f"{_SCHED}.run_batch", ("self", "batch", "pp_proxy_tensors"), "remember the plan a batch was built by"),
    Target(f"{_SCHED}.process_batch_result", ("self", "batch", "result"), "per-iteration report"),
    Target(f"{_POLICY}.SchedulePolicy.calc_priority", ("self", "waiting_queue", "running_batch", "processed_tokens"), "queue order by plan / deadline"),
    Target(
        f"{_POLICY}.PrefillAdder.__init__",
        (
            "self", "page_size", "tree_cache", "token_to_kv_pool_allocator", "running_batch", "new_token_ratio",
            "rem_input_tokens", "rem_chunk_tokens", "num_mixed_decode_tokens",
            "priority_scheduling_preemption_threshold", "max_prefill_bs", "max_running_requests",
            "prefill_max_requests", "prefill_delayer_single_pass", "dllm_config", "waiting_queue_len",
            "prefill_tile_block_m",
        ),
        "SloPrefillAdder narrows the budgets it sets",
    ),
    Target(f"{_POLICY}.PrefillAdder.add_one_req", ("self", "req", "has_chunked_req", "truncation_align_size"), "admission per request"),
    Target(f"{_POLICY}.PrefillAdder.add_chunked_req", ("self", "req"), "chunk size of the in-flight chunked request"),
    Target(f"{_POLICY}.PrefillAdder.budget_state", ("self",), "budget verdict after an admission"),
    Target(f"{_POLICY}.AddReqResult", None, "admission verdicts"),
    Target("sglang.utils.TypeBasedDispatcher.__iadd__", ("self", "other"), "add the PlannerUpdate handler"),
    Target("sglang.srt.managers.io_struct.AbortReq", None, "abort requests the planner rejects"),
    Target("sglang.srt.runtime_context.get_parallel", (), "find TP rank 0"),
    Target(_SPEC, None, "per-batch speculation depth (SloStepPolicy subclass)"),
    Target(f"{_SPEC}.get_steps_for_batch", ("self", "batch_size"), "depth chosen before each decode forward"),
    Target(f"{_SPEC}.on_verify_complete", ("self", "num_correct_drafts_per_req", "batch_size"), "acceptance feedback"),
    Target(f"{_SPEC}._route", ("self", "batch_size"), "batch size -> captured tier slot"),
)


class UnsupportedSglangError(SystemExit):
    """Raised when the installed SGLang lacks a hook target.

    A `SystemExit`, on purpose: SGLang's `load_plugins()` catches `Exception` from a plugin
    and carries on, which would leave the server running without the plugin.
    """


def installed_version() -> str:
    try:
        from sglang.version import __version__
    except ImportError:
        return "unknown"
    return __version__


def problems() -> list[str]:
    """One line per target that is missing or has an unexpected signature ([] = all good)."""
    out = []
    for t in TARGETS:
        try:
            obj = pkgutil.resolve_name(t.path)
        except (ImportError, AttributeError, ValueError) as e:
            cause = _module_import_error(t.path) or e  # resolve_name hides import errors
            out.append(f"{t.path} is missing ({type(cause).__name__}: {cause}) -- needed to {t.why}")
            continue
        if t.params is None:
            continue
        try:
            names = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError) as e:
            out.append(f"{t.path}: no inspectable signature ({e})")
            continue
        if names != t.params:
            out.append(f"{t.path} has parameters {names}, expected {t.params} -- needed to {t.why}")
    return out


def _module_import_error(path: str) -> Exception | None:
    """The exception importing the deepest existing module of `path` raises, if any."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            importlib.import_module(".".join(parts[:i]))
            return None
        except ModuleNotFoundError as e:
            if e.name != ".".join(parts[:i]):
                return e  # a dependency of an existing module is missing
        except Exception as e:  # noqa: BLE001 -- any import-time failure is the answer
            return e
    return None


def check_targets() -> None:
    """Refuse to run (UnsupportedSglangError) unless every target matches."""
    found = problems()
    if found:
        lines = "\n  ".join(found)
        raise UnsupportedSglangError(
            f"sglang-slo plugin: the installed SGLang {installed_version()} does not provide the hook "
            f"targets this plugin needs (supported version: sglang=={SUPPORTED_SGLANG}):\n  {lines}"
        )
