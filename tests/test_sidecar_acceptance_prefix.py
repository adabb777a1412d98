"""AcceptanceModel.alphas on a stale estimate shrinks only the positions asked for (plan
latency); it must equal the prefix of the full row, for chain and tree observations."""

from protos import messages as protos
from sidecar.acceptance import AcceptanceModel


def _observe(model: AcceptanceModel, rid: str, outcomes, verified_per_depth: int = 1) -> None:
    for accepted in outcomes:
        model.observe(rid, "chat", protos.RequestProgress(
            rid, 100, 10, verified=6 * verified_per_depth, accepted=accepted, depth=6))


def test_stale_prefix_equals_full_row_chain_and_tree():
    for width in (1, 3):  # chain, then tree-widened counts (the other branch of the shrink)
        model = AcceptanceModel()
        model.register("r", "chat")
        _observe(model, "r", (3, 0, 5, 2, 6, 1), width)
        short = model.alphas("r", 4)  # stale estimate: prefix path, nothing cached
        full = model.alphas("r", 16)  # full row, cached
        assert short == full[:4]
        assert model.alphas("r", 4) == full[:4]  # cached path agrees
        assert full[:4] != model.class_alphas("chat")[:4]  # the request's own counts moved it
        _observe(model, "r", (0, 0), width)  # new observations: stale again, and different
        assert model.alphas("r", 4) == model.alphas("r", 16)[:4] != short
