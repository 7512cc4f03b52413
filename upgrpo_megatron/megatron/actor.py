"""The Megatron-Core actor: old log-probs with routing capture, and the policy update.

A batch is a dict of tensors for this data-parallel rank's share of the step (verl's DataProto in spirit):
    input_ids       [batch, seq]            prompt + response, right-padded (each row starts at position 0)
    prompt_lens     [batch]                 where each row's response starts
    response_mask   [batch, response_len]   1 on real response tokens
    advantages      [batch, response_len]
    old_log_prob    [batch, response_len]   (written by `compute_log_prob`)
    routing         [batch, response_len, moe_layers, topk]   trainer routing at pi_old (RouterReplay RECORD)
    (expert ids, here and below, are int16: `rollout.batch.ROUTING_DTYPE`)
    rollout_routing [batch, response_len, moe_layers, topk]   optional, from the rollout engine
    rollout_prompt_routing [batch, prompt_width, moe_layers, topk]   optional, the engine's, prompt positions (R3)
    replay          [batch, seq, moe_layers, topk]   optional, what R2/R3 replay (`router_replay.py`)
Response token t of row i is scored by the logits at input position prompt_lens[i] - 1 + t; "its routing" (both
routing keys) is the routing of that position, the one that scored it (see `rollout/batch.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from upgrpo_megatron.distributed import collective_device
from upgrpo_megatron.megatron.micro_batches import micro_batches, per_row
from upgrpo_megatron.megatron.model import build_gpt_model
from upgrpo_megatron.megatron.optimizer import fuse_cpu_adam
from upgrpo_megatron.megatron.sharding import grad_of
from upgrpo_megatron.rollout.batch import ROUTING_DTYPE

Batch = Dict[str, torch.Tensor]


@dataclass
class OptimSettings:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    total_steps: int = 1


def scoring_positions(prompt_lens: torch.Tensor, response_len: int, width: int) -> torch.Tensor:
    """`[batch, response_len]`: the input position whose logits score response token t, prompt_lens - 1 + t
    (clamped into `[0, width)`: past a row's end, i.e. padding, the last position is repeated)."""
    t = torch.arange(response_len, device=prompt_lens.device)
    return (prompt_lens.unsqueeze(1) - 1 + t).clamp(0, width - 1)


def scoring_routing(routing_full: torch.Tensor, prompt_lens: torch.Tensor, response_len: int) -> torch.Tensor:
    """`[batch, response_len, layers, k]` from the routing of every input position `[batch, seq, layers, k]`:
    row t is the routing of the position that scores response token t (`scoring_positions`)."""
    pos = scoring_positions(prompt_lens.to(routing_full.device), response_len, routing_full.shape[1])
    return routing_full.gather(1, pos[:, :, None, None].expand(-1, -1, *routing_full.shape[2:]))


class MegatronActor:
    """Owns the (DDP-wrapped) GPTModel, megatron's optimizer and LR schedule on this rank."""

    def __init__(self, model_cfg, *, tp=1, ep=1, etp=1, sequence_parallel=False, dtype="fp32",
                 optim: Optional[OptimSettings] = None, temperature: float = 1.0,
                 distributed_optimizer: bool = False, micro_batch_tokens: int = 0):
        # Router replay instances are global in megatron: start from a clean list for this model.
        RouterReplay.clear_global_router_replay_instances()
        self.model_cfg = model_cfg
        self.tp = tp
        self.sequence_parallel = sequence_parallel
        self.module = build_gpt_model(model_cfg, tp=tp, ep=ep, etp=etp, sequence_parallel=sequence_parallel,
                                      dtype=dtype)
        self.model = DistributedDataParallel(
            self.module.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer),
            self.module,
        )
        self.model.broadcast_params()  # replicated weights start equal on every data-parallel rank
        self.optim = optim or OptimSettings()
        o = self.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                adam_beta1=o.betas[0], adam_beta2=o.betas[1], clip_grad=o.grad_clip,
                bf16=dtype in ("bf16", "bfloat16"), params_dtype=self.module.config.params_dtype,
                use_distributed_optimizer=distributed_optimizer,  # megatron/optimizer.py
            ),
            [self.model],
        )
        fuse_cpu_adam(self.optimizer)  # torch's fused AdamW kernel on CPU (megatron/optimizer.py)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if o.lr_warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.lr_warmup_steps, lr_decay_steps=max(o.total_steps, o.lr_warmup_steps + 1),
            lr_decay_style="constant" if o.lr_schedule == "constant" else "cosine",
            start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
            # on resume the checkpoint gives the step count, the recipe the schedule (lr, warm-up, horizon): the
            # run follows the config.yaml it records (megatron's default keeps the checkpoint's values silently)
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        )
        self.num_moe_layers = len(RouterReplay.global_router_replay_instances)
        self.micro_batch_tokens = int(micro_batch_tokens)  # the pi_old pass's packing (micro_batches.plan)
        self.module.logit_temperature = float(temperature)

    # ------------------------------------------------------------------ learning rate
    def begin_rl_step(self) -> float:
        """Advance the RL schedule by one step (warm-up and decay count RL steps, as verl does) and return the
        learning rate this step's updates use. Called before the step's first update, so step 1 of a warm-up
        of W steps trains at lr / W, never at 0."""
        self.scheduler.step(1)
        return float(self.optimizer.param_groups[0]["lr"])

    def undo_rl_step(self) -> None:
        """Take back `begin_rl_step` (a step stopped before its first update is redone after a resume)."""
        self.scheduler.step(-1)

    def set_lr(self, lr: float) -> None:
        """A fixed learning rate outside the RL schedule (the SFT warm-up); the next `begin_rl_step` resets it."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    # ------------------------------------------------------------------ forward
    def _replay_indices(self, routing_full: torch.Tensor) -> List[torch.Tensor]:
        """[batch, seq, layers, k] -> per layer this rank's [seq_local * batch, k] in megatron token order."""
        r = routing_full.permute(1, 0, 2, 3)  # [seq, batch, layers, k]: megatron is sequence-first
        if self.sequence_parallel and self.tp > 1:
            r = torch.chunk(r, self.tp, dim=0)[ps.get_tensor_model_parallel_rank()]
        dev = _device_of(self.model)  # int64 on the model's device, as megatron's router wants them
        return [r[:, :, layer].reshape(-1, r.shape[-1]).to(dev, torch.long) for layer in range(r.shape[2])]

    def _recorded_routing(self, batch: int, seq: int) -> torch.Tensor:
        """Recorded top-k per MoE layer -> [batch, seq, layers, k] in `ROUTING_DTYPE` (int16)."""
        per_layer = []
        for rec in RouterReplay.get_recorded_data():
            idx = rec.view(-1, batch, rec.shape[-1])  # [seq_local, batch, k]
            if self.sequence_parallel and self.tp > 1:
                parts = [torch.empty_like(idx) for _ in range(self.tp)]
                dist.all_gather(parts, idx.contiguous(), group=ps.get_tensor_model_parallel_group())
                idx = torch.cat(parts, dim=0)
            per_layer.append(idx[:seq].to(ROUTING_DTYPE))
        return torch.stack(per_layer, dim=2).transpose(0, 1).contiguous()  # [batch, seq, layers, k]

    def forward(self, input_ids: torch.Tensor, prompt_lens: torch.Tensor, response_len: int, *,
                record_routing: bool = False, replay_routing: Optional[torch.Tensor] = None):
        """Log-prob and entropy of each response token, and optionally the trainer's routing.

        Args:
            input_ids: `[batch, seq]`; prompt_lens: `[batch]`; response_len: R.
            replay_routing: `[batch, seq, moe_layers, k]` expert ids to replay (RouterReplay REPLAY_FORWARD).
        Returns:
            log_prob `[batch, R]`, entropy `[batch, R]`, routing `[batch, R, moe_layers, k]` or None.
        """
        log_prob, entropy, routing, _ = self._forward(input_ids, prompt_lens, response_len,
                                                      record_routing=record_routing, replay_routing=replay_routing)
        return log_prob, entropy, routing

    def _forward(self, input_ids, prompt_lens, response_len, *, record_routing, replay_routing):
        """`forward`, plus the recorded routing of every input position `[batch, seq, moe_layers, k]` (or None)."""
        b, s = input_ids.shape
        ids = pad_sequence_dim(input_ids, self.tp if self.sequence_parallel else 1)
        if replay_routing is not None:
            rr = torch.nn.functional.pad(replay_routing, (0, 0, 0, 0, 0, ids.shape[1] - s))
            RouterReplay.set_replay_data(self._replay_indices(rr))
            RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        elif record_routing:
            RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
        try:
            log_prob, entropy = score_responses(self.model, ids, prompt_lens, response_len)
        finally:
            routing_full = (self._recorded_routing(b, ids.shape[1])
                            if record_routing and replay_routing is None else None)
            RouterReplay.clear_global_router_replay_action()
            RouterReplay.clear_global_indices()
        routing = None
        if routing_full is not None:
            routing_full = routing_full[:, :s]
            routing = scoring_routing(routing_full, prompt_lens, response_len)
        return log_prob, entropy, routing, routing_full

    # ------------------------------------------------------------------ old log-probs
    @torch.no_grad()
    def compute_log_prob(self, batch: Batch, micro_batch_size: int, *, record_routing: bool = True,
                         replay_key: Optional[str] = None, keep_full_routing: bool = False) -> Batch:
        """pi_old pass: log-prob, entropy and (RECORD) routing for every response token, micro-batched
        (`micro_batches.plan`: cut to their longest row; packed by length with `micro_batch_tokens`).
        `keep_full_routing`: also the routing of every input position, "full_routing" `[batch, seq, layers, k]`
        (what R2/R3 replay; experts 0..k-1 past a row's micro-batch cut, where no real token depends on it), from the
        same forward pass."""
        self.model.eval()
        n, width = batch["input_ids"].shape
        R = batch["response_mask"].shape[1]
        out: Dict[str, torch.Tensor] = {}

        def put(key: str, rows: torch.Tensor, value: torch.Tensor, shape: tuple) -> None:
            # results collect in host memory, as the batch does (a GPU holds one micro-batch's at a time)
            if key not in out:
                out[key] = torch.zeros((n, *shape), dtype=value.dtype)
                if key == "full_routing":  # past a cut: a valid top-k (experts 0..k-1), in case it is replayed
                    out[key].copy_(torch.arange(shape[-1], dtype=value.dtype).expand_as(out[key]))
            real = rows >= 0
            out[key][rows[real], : value.shape[1]] = value[real].cpu()

        for rows, mb in micro_batches(batch, micro_batch_size, self.micro_batch_tokens):
            replay = mb[replay_key] if replay_key else None
            lp, ent, routing, full = self._forward(mb["input_ids"], mb["prompt_lens"], R,
                                                   record_routing=record_routing, replay_routing=replay)
            put("log_prob", rows, lp, (R,))
            put("entropy", rows, ent, (R,))
            if routing is not None:
                put("routing", rows, routing, tuple(routing.shape[1:]))
            if keep_full_routing and full is not None:
                put("full_routing", rows, full, (width, *full.shape[2:]))
        return out

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def weights_finite(self) -> bool:
        """True on every rank when every rank's weights are finite (collective)."""
        bad = torch.tensor([0.0 if all_finite(self.module.parameters()) else 1.0],
                           device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    def _grads_finite(self) -> bool:
        """All reduced gradients finite: one check per DDP gradient buffer (every `main_grad` is a view into
        one), a check per parameter only for parameters outside them."""
        buffers = [b.grad_data for b in getattr(self.model, "buffers", []) + getattr(self.model,
                                                                                     "expert_parallel_buffers", [])
                   if getattr(b, "grad_data", None) is not None]
        if buffers:
            return all_finite(buffers)
        return all_finite(g for g in (grad_of(p) for p in self.model.parameters()) if g is not None)

    def train_step(self, micro_batches: Iterator[Batch], loss_fn: Callable[[Batch, torch.Tensor, torch.Tensor], tuple],
                   *, replay_key: Optional[str] = None, record_routing: bool = False,
                   on_micro_batch: Optional[Callable[[Batch, Optional[torch.Tensor]], None]] = None) -> dict:
        """One optimizer step over a mini-batch given as micro-batches (gradient accumulation).

        `loss_fn(micro_batch, log_prob, entropy) -> (loss, metrics)` must already be normalised for the whole
        mini-batch across data-parallel ranks (see losses' global normaliser); the gradient is summed over
        micro-batches and over DP ranks (megatron DDP averages over DP, so the loss is scaled by DP size).
        A non-finite loss or gradient norm skips the optimizer step and reports `actor/skipped_step=1`.
        """
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        dp = ps.get_data_parallel_world_size()
        metrics: Dict[str, list] = {}
        finite = True
        device = _device_of(self.model)
        for mb in micro_batches:
            mb = {k: v.to(device) for k, v in mb.items()}  # from host memory, one micro-batch at a time
            R = mb["response_mask"].shape[1]
            replay = mb[replay_key] if replay_key else None
            lp, ent, routing = self.forward(mb["input_ids"], mb["prompt_lens"], R,
                                            record_routing=record_routing, replay_routing=replay)
            loss, m = loss_fn(mb, lp, ent)
            tokens = float(mb["response_mask"].sum())  # the weight of this micro-batch's metrics
            for k, v in m.items():
                metrics.setdefault(k, []).append((float(v), tokens))
            if on_micro_batch is not None:
                on_micro_batch(mb, routing, lp.detach())
            if not torch.isfinite(loss):
                # still run the backward (its gradients are discarded below): with expert parallelism it holds
                # the token dispatch collectives the other ranks of the group are waiting in
                finite = False
                loss = loss * 0.0
            (loss * dp).backward()
        finalize_model_grads([self.model])
        # check the reduced gradients themselves: megatron's optimizer copies main_grad into .grad only inside
        # step(), and clipping an inf norm there turns the update into NaN weights
        finite = finite and self._grads_finite()
        flag = torch.tensor([0.0 if finite else 1.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank skips together
        out = {k: _weighted_mean(v) for k, v in metrics.items()}
        if flag.item() > 0:
            self.optimizer.zero_grad()
            out.update({"actor/grad_norm": float("nan"), "actor/skipped_step": 1.0})
            return out
        ok, grad_norm, _ = self.optimizer.step()
        out.update({"actor/grad_norm": float(grad_norm), "actor/skipped_step": 0.0 if ok else 1.0,
                    "actor/lr": float(self.optimizer.param_groups[0]["lr"])})
        return out


@torch.no_grad()
def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """No inf or NaN in any of `tensors`. A sum is finite exactly when no element is inf or NaN, unless finite
    elements overflow it: one reduction per tensor (`isfinite(t).all()` makes three passes and two boolean
    copies: 10% of the trainer's CPU time in a medium RL step), and the element check only after an overflow."""
    ts = [t.detach() for t in tensors]
    if not ts:
        return True
    sums = torch.stack([t.sum(dtype=torch.float32) for t in ts])
    return bool(torch.isfinite(sums).all()) or all(bool(torch.isfinite(t).all()) for t in ts)


def _weighted_mean(pairs: List[tuple]) -> float:
    """Mean of per-micro-batch metrics weighted by their response tokens (a token mean over the mini-batch, however
    the rows were split); the plain mean when no micro-batch has a token."""
    total = sum(w for _, w in pairs)
    if total <= 0:
        return sum(v for v, _ in pairs) / len(pairs)
    return sum(v * w for v, w in pairs if w) / total


def pad_sequence_dim(ids: torch.Tensor, multiple: int) -> torch.Tensor:
    """Right-pad `[batch, seq]` so seq is a multiple of `multiple` (sequence parallelism splits it over TP)."""
    pad = (-ids.shape[1]) % multiple
    return torch.nn.functional.pad(ids, (0, pad)) if pad else ids


def score_responses(model, ids: torch.Tensor, prompt_lens: torch.Tensor, response_len: int):
    """Log-prob and entropy `[batch, response_len]` of each response token under `model`.

    ids: `[batch, seq]` prompt + response, right-padded (seq already a multiple of the SP split). Response
    token t of row i is scored by the logits at input position prompt_lens[i] - 1 + t. The step's batch lives in
    host memory: `ids` go to the model's device here, one micro-batch at a time; the results stay there."""
    ids = ids.to(_device_of(model))
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    # next-token targets for every position (the last one scores a pad and is never read)
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1))
    out = model(ids, pos, None, labels=targets)  # [batch, seq, 2]: log-prob, entropy
    lp_all, ent_all = out[:, :-1, 0], out[:, :-1, 1]  # [batch, seq_padded - 1]
    score_pos = scoring_positions(prompt_lens.to(ids.device), response_len, lp_all.shape[1])
    return lp_all.gather(1, score_pos), ent_all.gather(1, score_pos)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def split_micro_batches(batch: Batch, index: torch.Tensor, micro_batch_size: int,
                        max_tokens: int = 0) -> Iterator[Batch]:
    """Rows `index` of `batch` as micro-batches of at most `micro_batch_size` rows, each cut to its longest row
    (`micro_batches.plan`; `max_tokens` > 0 packs rows by length). Collective when the job has several ranks."""
    rows = {k: v[index] for k, v in per_row(batch).items()}
    for _, mb in micro_batches(rows, micro_batch_size, max_tokens):
        yield mb
