"""Rollout routing capture on the engine side: the decode capture around a generate call, and the prefill
replay for whatever it (or vLLM's native capture) left without routing. See `engine.py`'s docstring for the
choice and `routing.py` for how rows map back to samples."""

from __future__ import annotations

from typing import List, Sequence

from upgrpo_megatron.rollout.batch import RolloutSample
from upgrpo_megatron.rollout.routing import decode_routing, rows_per_sequence, sample_routing, token_groups


class DecodeCapture:
    """`with DecodeCapture(engine, on): engine.llm.generate(...)`: the routers record every forward pass of the
    generation (a no-op when `on` is false); `fill(prompts, samples)` then sets each sample's routing."""

    def __init__(self, engine, on: bool):
        self.engine, self.on, self.rec = engine, on, None

    def _rpc(self, fn):
        return self.engine._call(lambda: self.engine.llm.collective_rpc(fn))

    def __enter__(self) -> "DecodeCapture":
        from upgrpo_megatron.rollout import worker_ext

        if self.on:
            try:
                self._rpc(worker_ext.start_decode_capture)
            except BaseException:  # the worker may have started capturing: stop it, or later calls grow its buffers
                try:
                    self._rpc(worker_ext.stop_capture)
                except Exception:
                    pass
                raise
        return self

    def __exit__(self, exc_type, *_) -> None:
        from upgrpo_megatron.rollout import worker_ext

        if not self.on:
            return
        try:  # always stop, so a failed generate leaves no capture running
            rec = self._rpc(worker_ext.stop_capture)[0]
        except Exception:
            if exc_type is None:
                raise
            return  # the generate call's own error is the one to report
        self.rec = worker_ext.unpack_capture(rec)

    def fill(self, prompt_token_ids: Sequence[Sequence[int]], samples: List[RolloutSample]) -> None:
        if self.rec is None:
            return
        prompts = [prompt_token_ids[s.prompt_index] for s in samples]
        rows = decode_routing(self.rec, prompts, [s.response_ids for s in samples])
        for s, p, r in zip(samples, prompts, rows):
            if r is not None:
                s.prompt_routing, s.routing = sample_routing(r, len(p), len(s.response_ids))


def replay_routing(engine, prompt_token_ids: Sequence[Sequence[int]], samples: List[RolloutSample]) -> None:
    """Re-run prompt + response as a prefill with capture on; cut out each response's rows."""
    from vllm import SamplingParams

    from upgrpo_megatron.rollout import worker_ext

    seqs = [[int(t) for t in prompt_token_ids[s.prompt_index]] + s.response_ids for s in samples]
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    engine._call(lambda: engine.llm.apply_model(worker_ext.start_capture))
    try:
        # calls of at most one pass's token budget: vLLM then never splits a sequence's prefill over passes
        # (rows_per_sequence can follow a split, but a split is where mapping rows back is least certain)
        for group in token_groups(seqs, engine.max_num_batched_tokens):
            prompts = [{"prompt_token_ids": s} for s in group]
            engine._call(lambda: engine.llm.generate(prompts, params, use_tqdm=False))  # noqa: B023 (runs now)
    finally:
        rec = engine._call(lambda: engine.llm.apply_model(worker_ext.stop_capture))[0]
    per_seq = rows_per_sequence(worker_ext.unpack_capture(rec), seqs)
    for s, seq, rows in zip(samples, seqs, per_seq):
        s.prompt_routing, s.routing = sample_routing(rows, len(seq) - len(s.response_ids), len(s.response_ids))
        s.routing_replayed = True


def routing_source(decode: bool, on_gpu: bool, replayed: int, total: int) -> str:
    """What `RolloutEngine.routing_source` says after a generate call."""
    base = "decode capture" if decode else "native (enable_return_routed_experts)" if on_gpu else "prefill replay"
    if replayed and (decode or on_gpu):
        base += f" (prefill replay for {replayed} of {total} samples)"
    return base
