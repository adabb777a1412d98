"""SLO annotations for SGLang frontend programs (`@sgl.function`).

    from sglang_slo.lang import SloRuntimeEndpoint, slo, slo_gen

    @sgl.function
    def agent(s, question):
        s += question
        s += slo_gen("call", max_tokens=32, slo={"class": "tool-call", "session": "a1"})
        with slo(s, {"class": "tool-final", "session": "a1"}):
            s += sgl.gen("answer", max_tokens=128)

    sgl.set_default_backend(SloRuntimeEndpoint("http://127.0.0.1:30000", default_slo={"class": "chat"}))

Each `gen` then reaches `/generate` with `sampling_params.custom_params = {"slo": {...}}`,
the field SGLang 0.5.23 carries to its scheduler and this project's server and plugin read
(`sglang_slo.slo`). The SLO dict is flat (`class`, `ttft_ms`, `tpot_ms`, `<stage>_tpot_ms`,
`priority`, `session`, ...).

How the SLO reaches the request: SGLang's `gen` has no extra-kwargs parameter and its
executor copies a fixed list of sampling fields, so `slo_gen` / `slo(...)` attach the dict to
the `SglGen` expression, and `SloRuntimeEndpoint` installs (once, on construction) two small
wrappers on SGLang's `StreamExecutor`: `submit` tags un-annotated gens inside a `with slo(...)`
block (caller's thread), `_execute_gen` remembers the running gen's SLO on the executor
(worker thread) for `generate` / `generate_stream` to send. Programs without annotations
behave exactly as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping

import sglang as sgl
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.interpreter import ProgramState, StreamExecutor
from sglang.lang.ir import SglGen

_ATTR = "_sglang_slo"  # attribute holding the SLO dict on SglGen and on StreamExecutor
_blocks = threading.local()  # per caller thread: stack of (executor, slo) of `with slo(...)`
_install_lock = threading.Lock()


def _check(slo_dict: Mapping | None) -> dict | None:
    if slo_dict is None:
        return None
    if not isinstance(slo_dict, Mapping) or any(
        not isinstance(k, str) or not (v is None or isinstance(v, (str, int, float, bool))) for k, v in slo_dict.items()
    ):
        raise TypeError(f"an SLO must be a flat dict of str -> scalar, got {slo_dict!r}")
    return dict(slo_dict)


def slo_gen(name: str | None = None, slo: Mapping | None = None, **gen_kwargs) -> SglGen:
    """`sgl.gen(name, **gen_kwargs)` that carries its own SLO (e.g. {"class": "tool-call"})."""
    expr = sgl.gen(name, **gen_kwargs)
    if not isinstance(expr, SglGen):
        raise TypeError("slo_gen supports free generation only (not choices=...)")
    setattr(expr, _ATTR, _check(slo))
    return expr


@contextlib.contextmanager
def slo(s: ProgramState, slo_dict: Mapping):
    """Every `gen` added to program state `s` inside the block carries `slo_dict`."""
    stack = getattr(_blocks, "stack", None)
    if stack is None:
        stack = _blocks.stack = []
    stack.append((s.stream_executor, _check(slo_dict)))
    try:
        yield
    finally:
        stack.pop()


def _install_executor_hooks() -> None:
    """Wrap StreamExecutor.submit / _execute_gen once (idempotent)."""
    with _install_lock:
        if getattr(StreamExecutor, "_sglang_slo_hooked", False):
            return
        submit, execute_gen = StreamExecutor.submit, StreamExecutor._execute_gen

        def submit_with_slo(self, expr):
            if isinstance(expr, SglGen) and getattr(expr, _ATTR, None) is None:
                for ex, d in reversed(getattr(_blocks, "stack", None) or []):
                    if ex is self:
                        setattr(expr, _ATTR, d)
                        break
            return submit(self, expr)

        def execute_gen_with_slo(self, expr):
            setattr(self, _ATTR, getattr(expr, _ATTR, None))
            try:
                return execute_gen(self, expr)
            finally:
                setattr(self, _ATTR, None)

        StreamExecutor.submit = submit_with_slo
        StreamExecutor._execute_gen = execute_gen_with_slo
        StreamExecutor._sglang_slo_hooked = True


class SloRuntimeEndpoint(RuntimeEndpoint):
    """`sgl.RuntimeEndpoint` that sends each gen's SLO in `sampling_params.custom_params`.

    `default_slo` applies to gens without their own; `priority` (SGLang's request priority)
    is sent inside the SLO dict unless the dict sets one.
    """

    def __init__(self, base_url: str, default_slo: Mapping | None = None, priority: int | None = None, **kwargs):
        super().__init__(base_url, **kwargs)
        self.default_slo = _check(default_slo)
        self.priority = priority
        _install_executor_hooks()

    def slo_for(self, s: StreamExecutor) -> dict | None:
        """The SLO the gen now running on `s` carries (or the default)."""
        d = getattr(s, _ATTR, None) or self.default_slo
        if d is None and self.priority is None:
            return None
        d = dict(d or {})
        if self.priority is not None:
            d.setdefault("priority", self.priority)
        return {k: v for k, v in d.items() if v is not None}

    def _with_slo(self, s: StreamExecutor, sampling_params):
        d = self.slo_for(s)
        if d:
            base = sampling_params.to_srt_kwargs

            def to_srt_kwargs():
                kw = base()
                kw["custom_params"] = {**(kw.get("custom_params") or {}), "slo": d}
                return kw

            sampling_params.to_srt_kwargs = to_srt_kwargs  # this call's copy only
        return sampling_params

    def generate(self, s: StreamExecutor, sampling_params):
        return super().generate(s, self._with_slo(s, sampling_params))

    def generate_stream(self, s: StreamExecutor, sampling_params):
        return super().generate_stream(s, self._with_slo(s, sampling_params))
