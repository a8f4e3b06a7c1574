"""DeepSpeed ZeRO-3 around rollouts (grpo_lab.zero3): two CPU processes whose ranks decode
different numbers of steps make the same collective calls, sample what an unpartitioned copy of
the model samples, and train on afterwards. The script is ``tests/zero3_rollout.py``."""

from __future__ import annotations

import json

from launching import ROOT, run


def test_rollouts_make_the_same_collectives_on_every_rank(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = str(ROOT / "tests" / "zero3_rollout.py")
    run("zero3_cpu", [script, tiny_model_dir, str(out)], tmp_path / "logs", timeout=600)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for kind in ("lm", "value_head"):
        r0, r1 = ranks[0][kind], ranks[1][kind]
        for engine in ("hf", "shared_prefix", "static"):
            e0, e1 = r0["engines"][engine], r1["engines"][engine]
            where = f"{kind}/{engine}"
            # Rank 0 decoded 2 steps and rank 1 7, yet both made the same calls: those of
            # gathering the parameters once (one all-gather per tensor on CPU), none per step.
            assert (e0["completion_len"], e1["completion_len"]) == (2, 7), where
            assert r0["gather_only"], "the gather itself made no collective call"
            assert e0["collectives"] == r0["gather_only"], (where, e0["collectives"])
            assert e1["collectives"] == r1["gather_only"] == r0["gather_only"], where
            # The gathered parameters are the model's: the same tokens as a plain copy.
            for e in (e0, e1):
                assert e["same_tokens"] and e["max_logp_diff"] < 1e-5, (where, e)
        for r in (r0, r1):
            assert "pass the engine" in r["bare_module"], r["bare_module"]
            assert r["step_loss"] == r["step_loss"]  # finite step after the rollouts
        assert r0["digests"] == r1["digests"] and len(set(r0["digests"])) == 1
