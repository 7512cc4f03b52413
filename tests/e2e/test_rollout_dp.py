"""One engine per data-parallel rank under torchrun (gloo): each rank generates prompts rank::world and every rank
ends with the whole batch in global order, equal to what one engine generates alone with the same seed.

Run as a test (it launches itself with torchrun, 2 ranks = 2 engines; ~2 min on the shared 2-core machine), or
directly: `torchrun --nproc_per_node 2 tests/e2e/test_rollout_dp.py OUT_DIR`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.distributed]

PROMPTS = [[1, 5, 6, 7], [3, 4, 9], [10, 11, 12], [1, 5, 6, 7], [8, 8, 8]]
SAMPLING = dict(n=2, temperature=1.0, max_tokens=8, stop_token_ids=[2], seed=7)


def test_data_parallel_engines_produce_the_single_engine_batch(tmp_path, torchrun):
    pytest.importorskip("vllm")
    torchrun(Path(__file__), 2, [str(tmp_path)], timeout=900)
    merged = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert merged[0] == merged[1]  # every rank holds the same, whole batch
    single = json.loads((tmp_path / "single.json").read_text())
    assert [s["ids"] for s in merged[0]["samples"]] == [s["ids"] for s in single["samples"]]
    expected = [(i, j) for i in range(len(PROMPTS)) for j in range(2)]
    assert [(s["prompt"], s["sample"]) for s in merged[0]["samples"]] == expected
    assert all(s["routing_shape"] == [len(s["ids"]), 2, 2] for s in merged[0]["samples"])


def _summary(batch):
    return {"weight_version": batch.weight_version,
            "samples": [{"prompt": s.prompt_index, "sample": s.sample_index, "ids": s.response_ids,
                         "routing_shape": list(s.routing.shape)} for s in batch.samples]}


def main(out: str) -> None:
    import torch
    import torch.distributed as dist

    from tests.e2e.test_rollout_engine import build_tiny_model
    from upgrpo_megatron.rollout import RolloutEngine, generate_data_parallel

    rank = int(os.environ["RANK"])
    hf_dir = os.path.join(out, f"model_rank{rank}")
    # same seed on every rank: identical weights. Saved before the process group exists: under
    # torch.distributed, save_pretrained writes config.json on rank 0 only.
    build_tiny_model().save_pretrained(hf_dir)
    dist.init_process_group("gloo")
    engine = RolloutEngine(hf_dir, dtype="float32", seed=1, max_model_len=32)
    try:
        batch = generate_data_parallel(engine, PROMPTS, **SAMPLING)
        Path(out, f"rank{rank}.json").write_text(json.dumps(_summary(batch)))
        if rank == 0:  # the same request on one engine, all prompts
            Path(out, "single.json").write_text(json.dumps(_summary(engine.generate(PROMPTS, **SAMPLING))))
        dist.barrier()
    finally:
        engine.shutdown()
        dist.destroy_process_group()
    del torch


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1])
