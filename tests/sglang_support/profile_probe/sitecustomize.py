"""cProfile the SGLang scheduler loop (test probe; put this directory first on PYTHONPATH).

When `sglang.srt.managers.scheduler` is imported in a process and $SGLANG_SLO_PROFILE_OUT is
set, `Scheduler.event_loop_normal` / `event_loop_overlap` run under cProfile; the stats are
dumped to $SGLANG_SLO_PROFILE_OUT every 500 `process_batch_result` calls (the loop never
returns). Used by `python -m tests.sglang_support.plugin_overhead --profile-dir ...`.
"""

import importlib.abc
import importlib.util
import os
import sys

_OUT = os.environ.get("SGLANG_SLO_PROFILE_OUT")
_TARGET = "sglang.srt.managers.scheduler"


def _patch(mod) -> None:
    import cProfile
    import functools

    cls = mod.Scheduler
    prof = cProfile.Profile()
    calls = [0]

    def wrap_loop(fn):
        @functools.wraps(fn)
        def loop(self, *a, **k):
            prof.enable()
            return fn(self, *a, **k)
        return loop

    pbr = cls.process_batch_result

    @functools.wraps(pbr)
    def process_batch_result(self, *a, **k):
        out = pbr(self, *a, **k)
        calls[0] += 1
        if calls[0] % 500 == 0:
            prof.disable()
            prof.dump_stats(f"{_OUT}.{os.getpid()}")
            prof.enable()
        return out

    for name in ("event_loop_normal", "event_loop_overlap"):
        setattr(cls, name, wrap_loop(getattr(cls, name)))
    cls.process_batch_result = process_batch_result


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        orig = spec.loader.exec_module

        def exec_module(module):
            orig(module)
            _patch(module)
        spec.loader.exec_module = exec_module
        return spec


if _OUT:
    sys.meta_path.insert(0, _Finder())


# ---- hook timing without a profiler: $SGLANG_SLO_HOOK_TIMES=path -> per-hook perf_counter totals

_TIMES = os.environ.get("SGLANG_SLO_HOOK_TIMES")


def _timed_register():
    import functools
    import json
    import time

    from sglang.srt.plugins import hook_registry

    reg = hook_registry.HookRegistry
    orig_register = reg.register.__func__
    totals: dict = {}  # hook name -> [calls, seconds excluding the wrapped original, per-call samples]
    state = {"reports": 0}

    def dump():
        out = {}
        for k, (calls, secs, samples) in totals.items():
            xs = sorted(samples)
            q = (lambda f: round(1e6 * xs[int(f * (len(xs) - 1))], 2)) if xs else (lambda f: None)
            out[k] = [calls, secs, {"p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99)}]
        with open(f"{_TIMES}.{os.getpid()}", "w") as f:
            json.dump({"reports": state["reports"], "hooks": out}, f)

    def timed(hook, kind):
        name = hook.__name__
        acc = totals.setdefault(name, [0, 0.0, []])
        cap = 50_000
        pc = time.perf_counter
        if kind == hook_registry.HookType.AROUND:
            @functools.wraps(hook)
            def w(original, *a, **k):
                inner = [0.0]

                def orig(*aa, **kk):
                    t = pc()
                    try:
                        return original(*aa, **kk)
                    finally:
                        inner[0] += pc() - t
                t0 = pc()
                out = hook(orig, *a, **k)
                dt = pc() - t0 - inner[0]
                acc[0] += 1
                acc[1] += dt
                if len(acc[2]) < cap:
                    acc[2].append(dt)
                return out
        else:
            @functools.wraps(hook)
            def w(*a, **k):
                t0 = pc()
                out = hook(*a, **k)
                dt = pc() - t0
                acc[0] += 1
                acc[1] += dt
                if len(acc[2]) < cap:
                    acc[2].append(dt)
                if name == "report_iteration":
                    state["reports"] += 1
                    if state["reports"] % 500 == 0:
                        dump()
                return out
        return w

    def register(cls, target, hook, hook_type=hook_registry.HookType.AFTER, **kw):
        if not isinstance(hook, type):
            hook = timed(hook, hook_type)
        return orig_register(cls, target, hook, hook_type, **kw)

    reg.register = classmethod(register)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "sglang.srt.plugins.hook_registry":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        orig = spec.loader.exec_module

        def exec_module(module):
            orig(module)
            sys.modules[name] = module
            _timed_register()
        spec.loader.exec_module = exec_module
        return spec


if _TIMES:
    sys.meta_path.insert(0, _RegistryFinder())
