"""Checks of a recipe: single fields, cross-field rules, and the parallel layout for a world size.

Every check raises `ConfigError` naming the key, the value and the file. The allowed values of name-valued
keys come from the registries that implement them (`choices()`): registering a loss, a KL estimator, a reward
or a router-replay mode makes it selectable from a recipe, with nothing to add here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from upgrpo_megatron.config.schema import ENGINE_CORES, ConfigError, RecipeConfig, get_key

MAX_EXPERTS = 2**15 - 1  # expert ids are int16 from the engine's capture to the step batch (rollout/batch.py)

# Keys whose values are fixed by this code base (not extensible registries)
FIXED_CHOICES = {
    "model.dtype": ("fp32", "bf16"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "data.task": ("arithmetic", "math"),
    "rollout.engine": ("vllm",),
    "rollout.dtype": ("fp32", "bf16"),
    "rollout.engine_core": ENGINE_CORES,
    "actor.lr_schedule": ("constant", "cosine"),
    "algorithm.old_log_prob": ("trainer", "rollout"),
}
ARITHMETIC_OPS = ("+", "-", "*")


def choices() -> Dict[str, Tuple[str, ...]]:
    """Allowed values of every name-valued key, read from the registries."""
    from upgrpo_megatron.convert.hf_io import SUPPORTED
    from upgrpo_megatron.data.rewards import REWARDS
    from upgrpo_megatron.losses import AGG_MODES, CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES
    from upgrpo_megatron.router_replay import ROUTER_REPLAY

    return {
        **FIXED_CHOICES,
        "model.architecture": tuple(SUPPORTED),
        "data.reward": ("auto", *REWARDS),
        "algorithm.loss_mode": tuple(POLICY_LOSSES),
        "algorithm.loss_agg_mode": tuple(AGG_MODES),
        "algorithm.kl_loss_type": tuple(KL_ESTIMATORS),
        "algorithm.router_replay": tuple(ROUTER_REPLAY),
        "correction.mode": tuple(CORRECTIONS),
    }


POSITIVE = [
    "model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_attention_heads",
    "model.num_query_groups", "model.head_dim", "model.ffn_hidden_size", "model.moe_ffn_hidden_size",
    "model.num_experts", "model.moe_router_topk", "model.max_position_embeddings", "model.rope_theta",
    "model.norm_epsilon", "parallel.tp", "parallel.ep", "parallel.etp", "parallel.pp",
    "data.max_prompt_length", "data.max_response_length", "data.num_train", "data.num_val",
    "data.arithmetic_max_operand", "sft_warmup.batch_size", "rollout.n", "rollout.kv_cache_gib", "rollout.val_n",
    "rollout.temperature",
    "actor.ppo_epochs", "actor.ppo_mini_batch_size", "actor.micro_batch_size", "actor.max_bad_steps",
    "trainer.prompts_per_step", "trainer.save_every", "trainer.keep_checkpoints",
    "diagnostics.save_every", "rollout.sync_every", "correction.tis_cap", "correction.icepop_high",
    "correction.seq_high", "correction.routing_min_layers", "trainer.max_steps_without_update",
]
NON_NEGATIVE = [
    "model.moe_aux_loss_coeff", "model.first_k_dense_layers", "model.shared_expert_ffn_hidden_size",
    "model.init_std", "sft_warmup.steps", "sft_warmup.lr", "rollout.val_temperature",
    "algorithm.clip_ratio_low", "algorithm.clip_ratio_high", "algorithm.overlong_buffer_len",
    "algorithm.overlong_penalty_factor", "algorithm.kl_loss_coef", "algorithm.entropy_coeff", "actor.lr",
    "actor.lr_warmup_steps", "actor.min_lr", "actor.weight_decay", "actor.grad_clip", "trainer.eval_every",
    "diagnostics.log_prob_diff_threshold", "trainer.samples_per_step", "rollout.router_noise",
    "trainer.total_steps",  # 0: the SFT warm-up and the step-0 eval and checkpoint only (an experiment's SFT job)
    "correction.icepop_low", "correction.seq_low", "correction.routing_weight", "rollout.val_sample_n",
    "actor.micro_batch_tokens",  # 0: micro-batches of micro_batch_size rows, not packed by length
]


def _fail(key: str, value: Any, where: str, why: str) -> None:
    raise ConfigError(f"{key}={value!r} in {where}: {why}")


def validate(cfg: RecipeConfig) -> None:
    """Every single-field and cross-field check that needs no world size; raises ConfigError naming the key."""
    where = cfg.source
    for key, allowed in choices().items():
        v = get_key(cfg, key)
        if v not in allowed:
            _fail(key, v, where, f"choose one of {', '.join(allowed)}")
    for key in POSITIVE:
        if not get_key(cfg, key) > 0:
            _fail(key, get_key(cfg, key), where, "must be > 0")
    for key in NON_NEGATIVE:
        if not get_key(cfg, key) >= 0:
            _fail(key, get_key(cfg, key), where, "must be >= 0")
    _check_sampling_and_clipping(cfg, where)
    _check_model(cfg, where)
    _check_data_and_batches(cfg, where)


def _check_sampling_and_clipping(cfg: RecipeConfig, where: str) -> None:
    a, r, d = cfg.algorithm, cfg.rollout, cfg.data
    if not 0 < r.top_p <= 1:
        _fail("rollout.top_p", r.top_p, where, "must be in (0, 1]")
    if not 0 < r.gpu_memory_utilization <= 1:
        _fail("rollout.gpu_memory_utilization", r.gpu_memory_utilization, where, "must be in (0, 1]")
    if r.top_k == 0 or r.top_k < -1:
        _fail("rollout.top_k", r.top_k, where, "must be -1 (off) or >= 1")
    # group-normalised advantages are all zero with one sample per prompt: nothing would be learned
    if r.n < 2:
        _fail("rollout.n", r.n, where, "group advantages need at least 2 samples per prompt")
    # clipping: the ratio interval [1 - low, 1 + high] must contain 1 and stay positive
    if a.clip_ratio_low >= 1 and a.loss_mode != "cispo":  # cispo: >= 1 means no lower bound (verl passes 10)
        _fail("algorithm.clip_ratio_low", a.clip_ratio_low, where, "must be < 1 (only cispo reads >= 1 as no bound)")
    if not a.clip_ratio_c > 1:
        _fail("algorithm.clip_ratio_c", a.clip_ratio_c, where, "the dual-clip bound must be > 1")
    c = cfg.correction
    # the bands the arms accept (losses/correction.py): 0 < low <= 1 <= high, checked here before any work is done
    for name in ("icepop", "seq"):
        low, high = getattr(c, f"{name}_low"), getattr(c, f"{name}_high")
        if not 0 < low <= 1:
            _fail(f"correction.{name}_low", low, where, "must be in (0, 1]: the band must contain ratio 1")
        if not 1 <= high < float("inf"):
            _fail(f"correction.{name}_high", high, where, "must be >= 1 and finite: the band must contain ratio 1")
    if not c.routing_weight <= 1:
        _fail("correction.routing_weight", c.routing_weight, where, "must be in [0, 1] (0: drop the token)")
    if c.mode in ("tis", "icepop", "seq_mask_is") and a.old_log_prob == "rollout":
        # the weight is w = pi_old / pi_rollout from the trainer's recompute; bypass mode's ratio
        # pi_theta / pi_rollout already holds that w, so the mismatch would be counted twice
        _fail("correction.mode", c.mode, where, "corrects pi_rollout -> pi_old with the trainer's recompute as pi_old; "
              "with algorithm.old_log_prob=rollout the loss's ratio already contains that mismatch and it would count "
              "twice: use algorithm.old_log_prob=trainer")
    if c.mode == "routing_mask" and not r.capture_routing:
        _fail("correction.mode", c.mode, where, "needs the engine's routing: set rollout.capture_routing=true")
    if a.overlong_buffer_len >= d.max_response_length:
        _fail("algorithm.overlong_buffer_len", a.overlong_buffer_len, where,
              f"must be < data.max_response_length={d.max_response_length} (the penalty starts at the difference)")


def _check_model(cfg: RecipeConfig, where: str) -> None:
    m, d = cfg.model, cfg.data
    if m.num_attention_heads % m.num_query_groups:
        _fail("model.num_query_groups", m.num_query_groups, where,
              f"must divide model.num_attention_heads={m.num_attention_heads}")
    if m.head_dim % 2:
        _fail("model.head_dim", m.head_dim, where, "must be even (rotary embeddings rotate pairs)")
    if m.moe_router_topk > m.num_experts:
        _fail("model.moe_router_topk", m.moe_router_topk, where, f"exceeds model.num_experts={m.num_experts}")
    if m.num_experts > MAX_EXPERTS:
        _fail("model.num_experts", m.num_experts, where, f"exceeds {MAX_EXPERTS}: expert ids are stored and sent in "
              f"16 bits (the engine's capture, the step batch)")
    if m.first_k_dense_layers >= m.num_layers:
        _fail("model.first_k_dense_layers", m.first_k_dense_layers, where,
              f"must leave at least one MoE layer (model.num_layers={m.num_layers})")
    if m.architecture == "qwen3_moe" and m.shared_expert_ffn_hidden_size:
        _fail("model.shared_expert_ffn_hidden_size", m.shared_expert_ffn_hidden_size, where,
              "qwen3_moe has no shared expert (use architecture qwen2_moe)")
    if m.architecture == "qwen2_moe" and m.head_dim * m.num_attention_heads != m.hidden_size:
        _fail("model.head_dim", m.head_dim, where, "qwen2_moe needs head_dim * num_attention_heads == hidden_size")
    total = d.max_prompt_length + d.max_response_length
    if total > m.max_position_embeddings:
        raise ConfigError(f"data.max_prompt_length + data.max_response_length = {total} in {where}: exceeds "
                          f"model.max_position_embeddings={m.max_position_embeddings}")
    if cfg.parallel.pp != 1:
        _fail("parallel.pp", cfg.parallel.pp, where, "pipeline parallelism is not supported yet (use 1)")


def _check_data_and_batches(cfg: RecipeConfig, where: str) -> None:
    d, act, t = cfg.data, cfg.actor, cfg.trainer
    bad_ops = [o for o in d.arithmetic_ops if o not in ARITHMETIC_OPS]
    if bad_ops or not d.arithmetic_ops:
        _fail("data.arithmetic_ops", d.arithmetic_ops, where,
              f"choose a non-empty subset of {', '.join(ARITHMETIC_OPS)}")
    if d.task == "math" and not d.train_files:
        raise ConfigError(f"data.train_files in {where}: data.task=math needs at least one train file")
    # batches: mini-batches split the step's prompts evenly, so every update sees the same number of groups
    if act.ppo_mini_batch_size > t.prompts_per_step:
        _fail("actor.ppo_mini_batch_size", act.ppo_mini_batch_size, where,
              f"exceeds trainer.prompts_per_step={t.prompts_per_step}")
    if t.prompts_per_step % act.ppo_mini_batch_size:
        _fail("actor.ppo_mini_batch_size", act.ppo_mini_batch_size, where,
              f"must divide trainer.prompts_per_step={t.prompts_per_step}")
    if act.min_lr > act.lr:
        _fail("actor.min_lr", act.min_lr, where, f"exceeds actor.lr={act.lr}")
    if len(act.betas) != 2 or not all(0 <= b < 1 for b in act.betas):
        _fail("actor.betas", act.betas, where, "expected two numbers in [0, 1)")
    if any(tau <= 1 for tau in cfg.diagnostics.extreme_taus):
        _fail("diagnostics.extreme_taus", cfg.diagnostics.extreme_taus, where,
              "each threshold must be > 1 (a ratio is extreme above tau or below 1/tau)")
    if t.world_size_hint is not None and t.world_size_hint <= 0:
        _fail("trainer.world_size_hint", t.world_size_hint, where, "must be > 0")
    if cfg.rollout.sync_every > 1 and t.eval_every % cfg.rollout.sync_every:
        _fail("trainer.eval_every", t.eval_every, where, f"must be a multiple of rollout.sync_every="
              f"{cfg.rollout.sync_every}, so that every eval sees the actor's current weights")
    if cfg.rollout.sync_every > 1 and t.eval_every and t.total_steps % cfg.rollout.sync_every:
        _fail("trainer.total_steps", t.total_steps, where, f"must be a multiple of rollout.sync_every="
              f"{cfg.rollout.sync_every}: the final eval would otherwise score stale engine weights")
    if t.wandb:
        _fail("trainer.wandb", t.wandb, where, "Weights & Biases logging is not built in: metrics go to "
              "RUN_DIR/metrics.jsonl and TensorBoard (RUN_DIR/tensorboard)")


def validate_for_cpu_engine(cfg: RecipeConfig) -> None:
    """vLLM's CPU attention supports only some head sizes; refuse others before starting the engine.

    Called only when the rollout will run on CPU (a GPU engine has no such limit)."""
    from upgrpo_megatron.rollout.engine import cpu_head_dims

    ok = cpu_head_dims()
    if cfg.model.head_dim not in ok:
        raise ConfigError(f"model.head_dim={cfg.model.head_dim} in {cfg.source}: the CPU vLLM engine supports "
                          f"head_dim {' or '.join(map(str, ok))}")


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """How `world_size` ranks are split (megatron-core 0.16 semantics).

    Dense parts: world = tp x pp x dp.  Experts: world = etp x ep x pp x expert_dp."""

    world_size: int
    tp: int
    ep: int
    etp: int
    pp: int
    dp: int
    expert_dp: int
    sequence_parallel: bool
    notes: tuple = ()


def check_model_divides(model, *, tp: int, ep: int, etp: int, where: str) -> None:
    """The model's sizes must split over the given tensor / expert / expert-tensor parallel sizes (the one
    rule shared by training layouts and checkpoint conversion)."""
    for size, name in ((tp, "parallel.tp"), (ep, "parallel.ep"), (etp, "parallel.etp")):
        if size < 1:
            raise ConfigError(f"{name}={size} in {where}: must be >= 1")
    if model.num_experts % ep:
        raise ConfigError(f"model.num_experts={model.num_experts} in {where}: not divisible by parallel.ep={ep}")
    # The arithmetic tokenizer is built with exactly model.vocab_size ids, so the vocabulary check applies
    # to every task: the embedding and output layer are split by rows across tp.
    for key in ("num_attention_heads", "num_query_groups", "vocab_size"):
        v = getattr(model, key)
        if v % tp:
            raise ConfigError(f"model.{key}={v} in {where}: not divisible by parallel.tp={tp}")
    if model.first_k_dense_layers and model.ffn_hidden_size % tp:
        raise ConfigError(f"model.ffn_hidden_size={model.ffn_hidden_size} in {where}: "
                          f"not divisible by parallel.tp={tp}")
    if model.moe_ffn_hidden_size % etp:
        raise ConfigError(f"model.moe_ffn_hidden_size={model.moe_ffn_hidden_size} in {where}: not divisible by "
                          f"parallel.etp={etp}")
    if model.shared_expert_ffn_hidden_size % tp:
        raise ConfigError(f"model.shared_expert_ffn_hidden_size={model.shared_expert_ffn_hidden_size} in {where}: "
                          f"not divisible by parallel.tp={tp}")


def validate_layout(cfg: RecipeConfig, world_size: int) -> Layout:
    """Refuse a parallel layout that cannot work, naming the setting; return the resolved `Layout`."""
    p, where = cfg.parallel, cfg.source
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: must be >= 1")
    if world_size % (p.tp * p.pp):
        raise ConfigError(f"parallel.tp={p.tp} x parallel.pp={p.pp} in {where}: "
                          f"does not divide the world size {world_size}")
    if world_size % (p.ep * p.etp * p.pp):
        raise ConfigError(f"parallel.ep={p.ep} x parallel.etp={p.etp} x parallel.pp={p.pp} in {where}: does not "
                          f"divide the world size {world_size}")
    check_model_divides(cfg.model, tp=p.tp, ep=p.ep, etp=p.etp, where=where)
    notes = []
    sp = p.sequence_parallel
    if p.tp > 1 and not sp:
        sp = True
        notes.append("sequence parallelism switched on: megatron-core needs it for MoE with tp > 1")
    if p.tp == 1 and sp:
        sp = False
        notes.append("sequence parallelism switched off: it has no effect with tp = 1")
    dp = world_size // (p.tp * p.pp)
    sft = cfg.sft_warmup
    if sft.steps > 0 and sft.batch_size % dp:
        # each data-parallel rank takes every dp-th row: an uneven split leaves a rank without rows, or ranks with
        # different micro-batch counts (a hang in the expert-parallel collectives)
        raise ConfigError(f"sft_warmup.batch_size={sft.batch_size} in {where}: must be a multiple of the "
                          f"data-parallel size {dp} (world {world_size} / tp {p.tp})")
    return Layout(world_size=world_size, tp=p.tp, ep=p.ep, etp=p.etp, pp=p.pp, dp=dp,
                  expert_dp=world_size // (p.ep * p.etp * p.pp), sequence_parallel=sp, notes=tuple(notes))
