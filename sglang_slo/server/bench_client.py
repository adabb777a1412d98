"""`python -m sglang_slo.server.bench_client`: run `sglang.bench_serving` for several backends in
one process (SGLang's import takes ~10-20 s on a small CPU; pay it once).

    python -m sglang_slo.server.bench_client --backends sglang-oai,sglang-oai-chat,sglang \
        --out-dir DIR -- --base-url URL --tokenizer DIR --dataset-name random-ids ...

Everything after `--` goes to bench_serving unchanged, plus `--backend B --output-file DIR/B.jsonl`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m sglang_slo.server.bench_client")
    p.add_argument("--backends", default="sglang-oai,sglang-oai-chat,sglang")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sglang.benchmark.serving import cli_main
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for backend in args.backends.split(","):
        sys.argv = ["bench_serving", *rest, "--backend", backend, "--output-file", str(out / f"{backend}.jsonl")]
        cli_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
