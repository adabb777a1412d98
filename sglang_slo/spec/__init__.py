"""Speculative decoding kernels shared by the embedded runtime, the simulator and (later) an
SGLang speculative worker.

    select.py     which draft nodes to verify: AdaServe tree selection, SpecServe chain trim
                  (pure Python, no torch: the simulator imports it)
    tree.py       draft trees: batched beam search, i.i.d. sampled trees/chains, sub-trees,
                  tree-attention positions and masks (device-agnostic torch)
    verify.py     lossless greedy and stochastic tree verification, acceptance statistics
    table_lm.py   a fixed random-table draft/target pair for tests and benchmarks
    bench.py      `python -m sglang_slo.spec.bench`: selection and verification speed (JSON)

This file imports nothing so that `sglang_slo.spec.select` stays torch-free.
"""
