"""The planner sidecar: decides, every engine iteration, budget, admission, prefill chunks and
per-request speculation from each request's SLOs.

    protos (wire) --> PlannerProc (proc.py: ZMQ ROUTER loop, handshake, pipelining)
                        `-> Planner (planner.py: pure; observe(msg) / plan(now) -> Plan)
                              |- PlannerState / ReqState   (state.py: requests, deadlines)
                              |- CostModel                 (cost_model.py: iteration time, online refit)
                              |- AcceptanceModel           (acceptance.py: alpha_j per class / request)
                              `- Policy                    (policies/: fcfs, priority, specserve,
                                                            adaserve, slos_serve, slo_unified)

Run: `python -m sidecar --endpoint ipc://... --policy NAME --hardware configs/hardware/X.yaml`.
Benchmark: `sglang-slo bench-planner --json`.
"""
