"""Sizing for `--dry-run`: exact parameter counts of the architecture and a per-GPU memory estimate of a layout.

Pure arithmetic on the recipe (`RecipeConfig`) and the resolved `Layout`: no Megatron, no torch.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

from upgrpo_megatron.config import Layout, ModelConfig, RecipeConfig, validate_layout


def dry_run(cfg: RecipeConfig, world_size: Optional[int]) -> str:
    """Validate a recipe for a world size; the layout and a per-GPU memory estimate, as text."""
    world = world_size or cfg.trainer.world_size_hint or 1
    layout = validate_layout(cfg, world)
    return format_layout_and_memory(cfg, layout, estimate_memory(cfg, layout))


def count_parameters(m: ModelConfig) -> Dict[str, int]:
    """Exact parameter counts of the Qwen-MoE architecture, as transformers builds it.

    Returns total, active (per token: top-k experts), experts (all routed-expert weights; sharded by ep x etp)
    and embedding (input embedding + output layer)."""
    h, hd = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * hd, m.num_query_groups * hd
    attn = h * (q + 2 * kv) + q * h          # q, k, v projections and the output projection (no biases)
    attn += 2 * h                            # input layer norm and pre-MLP layer norm
    if m.architecture == "qwen3_moe":
        attn += 2 * hd                       # per-head q_norm and k_norm
    else:
        attn += q + 2 * kv                   # qwen2's q/k/v biases
    expert = 3 * h * m.moe_ffn_hidden_size   # gate, up, down (SwiGLU)
    router = m.num_experts * h
    shared = 3 * h * m.shared_expert_ffn_hidden_size + h if m.shared_expert_ffn_hidden_size else 0  # + its gate
    dense = 3 * h * m.ffn_hidden_size
    n_moe = m.num_layers - m.first_k_dense_layers
    emb = m.vocab_size * h
    head = 0 if m.tie_word_embeddings else m.vocab_size * h
    common = emb + head + h + m.num_layers * attn + m.first_k_dense_layers * dense  # + h: the final norm
    total = common + n_moe * (m.num_experts * expert + router + shared)
    active = common + n_moe * (m.moe_router_topk * expert + router + shared)
    return {"total": total, "active": active, "experts": n_moe * m.num_experts * expert, "embedding": emb + head}


# Activation bytes kept for backward per token per layer per hidden unit, in bf16, without recomputation:
# 34 for a dense transformer layer (Korthikanti et al. 2022, "Reducing Activation Recomputation", eq. 2 without
# the attention-score term, which flash/SDPA attention does not store). A rough number for MoE layers too.
ACTIVATION_FACTOR = 34
# vLLM's default number of sequences an engine runs at once (max_num_seqs)
VLLM_MAX_NUM_SEQS = 256


def estimate_memory(cfg: RecipeConfig, layout: Layout) -> Dict[str, float]:
    """Rough per-GPU bytes of one training rank and of the colocated rollout engine.

    - params: expert weights / (ep x etp), all other weights / tp, in model.dtype
    - grads: fp32 main grads for the local params (megatron DDP accumulates in fp32)
    - optimizer: Adam's two fp32 moments, plus an fp32 master copy when params are bf16; with
      parallel.use_distributed_optimizer sharded over dp (dense) and expert_dp (experts)
    - activations: micro_batch x seq x hidden x layers x ACTIVATION_FACTOR bytes (bf16; x2 for fp32) / tp,
      plus the fp32 logits, log-softmax and its gradient over the vocabulary shard (3 x seq x vocab / tp)
    - kv_cache: the rollout engine's KV budget, `rollout.kv_cache_gib` (one engine per tp group, sharded by
      tp). `kv_seqs_fit` says how many sequences of max_prompt_length + max_response_length tokens it holds
      (2 x layers x kv_heads x head_dim values per token) and `kv_seqs_wanted` how many the engine would run
      at once: min(its share of prompts_per_step x n, vLLM's max_num_seqs = 256).
    `training_total` is the training phase; `rollout_total` the rollout phase (engine weights + KV cache);
    `total` the larger (colocated engines release their KV cache while the actor trains).
    """
    m, d = cfg.model, cfg.data
    n = count_parameters(m)
    bytes_param = 2 if m.dtype == "bf16" else 4
    expert_local = n["experts"] / (layout.ep * layout.etp)
    dense_local = (n["total"] - n["experts"]) / layout.tp
    local = expert_local + dense_local
    params = local * bytes_param
    grads = local * 4
    per_param_optim = 8 + (4 if bytes_param == 2 else 0)
    if cfg.parallel.use_distributed_optimizer:
        optim = per_param_optim * (dense_local / layout.dp + expert_local / layout.expert_dp)
    else:
        optim = per_param_optim * local
    seq = d.max_prompt_length + d.max_response_length
    mb = cfg.actor.micro_batch_size
    act = mb * seq * m.hidden_size * m.num_layers * ACTIVATION_FACTOR * (bytes_param / 2) / layout.tp
    act += mb * seq * (m.vocab_size / layout.tp) * 4 * 3
    engine_bytes = 2 if cfg.rollout.dtype == "bf16" else 4
    kv_per_seq = seq * 2 * m.num_layers * m.num_query_groups * m.head_dim * engine_bytes / layout.tp
    kv = cfg.rollout.kv_cache_gib * 1024**3
    wanted = min(math.ceil(cfg.trainer.prompts_per_step * cfg.rollout.n / layout.dp), VLLM_MAX_NUM_SEQS)
    engine_params = local * engine_bytes
    training = params + grads + optim + act
    rollout = engine_params + kv
    return {"params": params, "grads": grads, "optimizer": optim, "activations": act, "kv_cache": kv,
            "engine_params": engine_params, "training_total": training, "rollout_total": rollout,
            "total": max(training, rollout), "params_total": n["total"], "params_active": n["active"],
            "params_local": local, "activation_factor": ACTIVATION_FACTOR, "kv_bytes_per_seq": kv_per_seq,
            "kv_seqs_fit": int(kv // kv_per_seq), "kv_seqs_wanted": wanted}


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def format_layout_and_memory(cfg: RecipeConfig, layout: Layout, mem: Dict[str, float]) -> str:
    """The `--dry-run` report: validity, parameter counts, the layout and a per-GPU memory table."""
    gib = 1024**3
    row = lambda name, key, how: f"  {name:<14}{mem[key] / gib:9.2f} GiB  {how}"  # noqa: E731
    opt_how = "Adam moments" + (" + fp32 master" if cfg.model.dtype == "bf16" else "")
    if cfg.parallel.use_distributed_optimizer:
        opt_how += f", sharded over dp={layout.dp} / expert-dp={layout.expert_dp}"
    lines = [
        f"recipe {cfg.source}: valid for world size {layout.world_size}",
        f"model: {cfg.model.architecture}, {_count(mem['params_total'])} parameters "
        f"({_count(mem['params_active'])} active per token), {_count(mem['params_local'])} on each GPU",
        f"layout: world {layout.world_size} = tp {layout.tp} x pp {layout.pp} x dp {layout.dp}; experts: "
        f"ep {layout.ep} x etp {layout.etp} x pp {layout.pp} x expert-dp {layout.expert_dp}; sequence parallel "
        f"{'on' if layout.sequence_parallel else 'off'}",
        *[f"note: {n}" for n in layout.notes],
        "per-GPU memory estimate (rough):",
        row("params", "params", cfg.model.dtype),
        row("grads", "grads", "fp32 main grads"),
        row("optimizer", "optimizer", opt_how),
        row("activations", "activations", f"micro-batch {cfg.actor.micro_batch_size} x seq x hidden x layers x "
            f"{ACTIVATION_FACTOR} B / tp (no recompute) + fp32 logits"),
        row("training", "training_total", "sum of the above"),
        row("engine params", "engine_params", f"rollout copy in {cfg.rollout.dtype}"),
        row("kv cache", "kv_cache", f"rollout.kv_cache_gib: {mem['kv_seqs_fit']} full-length sequences fit, "
            f"{mem['kv_seqs_wanted']} would run at once"),
        row("rollout", "rollout_total", "engine params + kv cache"),
        row("peak", "total", "max(training, rollout)"),
    ]
    return "\n".join(lines)
