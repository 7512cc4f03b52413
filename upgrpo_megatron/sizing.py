"""Sizing for `--dry-run`: exact parameter counts of the architecture and a per-GPU memory estimate of a layout.

Pure arithmetic on the recipe (`RecipeConfig`), with the same layout objects the trainer builds: the resolved
`Layout` (validate.py), the rollout `EnginePlacement` (rollout/placement.py), and megatron's parameter list
and gradient-buffer sharding mirrored here (`local_params`, `optimizer_state_numel`). The counts are exact
(tests/distributed/test_dist_optimizer.py compares them with a model and optimizer built at world 2); the
bytes around them (activations, vLLM's own overheads) are rough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from upgrpo_megatron.config import ConfigError, Layout, ModelConfig, RecipeConfig, validate_layout
from upgrpo_megatron.rollout.engine import KV_BLOCK_TOKENS as ENGINE_KV_BLOCK_TOKENS


def dry_run(cfg: RecipeConfig, world_size: Optional[int], gpu_mem_gib: Optional[float] = None) -> str:
    """Validate a recipe for a world size; the layout, the engine placement and a per-GPU memory estimate, as
    text, with a warning when the per-GPU peak exceeds `gpu_mem_gib`."""
    world = world_size or cfg.trainer.world_size_hint or 1
    layout = validate_layout(cfg, world)
    mem = estimate_memory(cfg, layout)
    text = format_layout_and_memory(cfg, layout, mem)
    if gpu_mem_gib is not None and mem["total"] > gpu_mem_gib * 1024**3:
        text += (f"\nwarning: the per-GPU peak ({mem['total'] / 1024**3:.1f} GiB) exceeds --gpu-mem-gib "
                 f"{gpu_mem_gib:g}: lower rollout.kv_cache_gib or actor.micro_batch_size, or raise parallel.tp / "
                 f"parallel.ep / rollout.tp")
    text += "\n" + format_step_batch(cfg, step_batch_bytes(cfg, layout, mem.get("placement")), gpu_mem_gib)
    return text


# Host memory a rank may hold before the step-batch warning (a GPU node has ~1-2 TiB for 8 ranks).
HOST_WARN_BYTES = 64 * 1024**3


def step_batch_bytes(cfg: RecipeConfig, layout: Layout, placement=None) -> Dict[str, float]:
    """Bytes of one RL step's batch as the trainer builds it today, at full size (every sample kept; the
    tensors are padded to max_prompt_length + max_response_length whatever the lengths).

    Every rank gathers the whole rollout and builds the global batch (`rl_step.py`: `training_batch`, then the
    pi_old routing gathered with `gather_rows`), so none of this shrinks with more ranks:
    - routing_tensors (host): expert ids (int16, `ROUTING_DTYPE`) `[n, R, moe_layers, topk]` twice (the
      engine's `rollout_routing`, the trainer's `routing`); for R2/R3 the replayed routing of every position
      `[n, P + R, ...]`; for R3 the engine's prompt routing `[n, P, ...]`
    - routing_samples (host, an upper bound): the rollout samples' own routing, int16 at their real lengths
      (counted here at full length: R rows, and P - 1 prompt rows under R3)
    - other_host: input_ids `[n, P + R]` int64, prompt_lens and group `[n]` int64, five float32 `[n, R]`
      (response mask, advantages, rollout and pi_old log-probs, entropy)
    - routing_pi_old (host, during pi_old): this rank's rows of the trainer's routing (and of the replayed
      routing), as the pi_old pass returns them, plus the gather's receive buffers for every data-parallel rank's
      rows (over a gloo group: `megatron.parallel.host_twin`)
    - routing_gpu: one micro-batch's routing on the device, int64 as megatron records and replays it
      (actor.micro_batch_size rows x P + R positions; micro_batch_tokens packing caps the tokens instead)
    - exchange (host, transient): the rollout's exchange (engine_link.generate: one broadcast per engine over a
      gloo group) holds one engine's share of the samples pickled at a time, on top of the samples already
      received; counted as that share's routing plus ~14 bytes per token of ids and log-probs
    n = prompts_per_step x rollout.n, P = max_prompt_length, R = max_response_length. The tensors' figures are
    checked against the tensors the trainer builds at one rank (tests/unit/megatron/test_step_batch_size.py);
    the gathers' buffers follow from the code, not from a run. Not counted: the reference policy's log-probs and
    the correction weights (float32 [n, R] each), and the row copies the step makes of every tensor (`take_rows`
    before pi_old: this rank's rows, the whole batch at dp 1; each update mini-batch: its rows)."""
    from upgrpo_megatron.rollout.batch import ROUTING_DTYPE
    from upgrpo_megatron.router_replay import get_router_replay

    m, d = cfg.model, cfg.data
    n = cfg.trainer.prompts_per_step * cfg.rollout.n
    n_local = math.ceil(n / layout.dp)
    P, R = d.max_prompt_length, d.max_response_length
    ids = (m.num_layers - m.first_k_dense_layers) * m.moe_router_topk  # expert ids per position
    replay = get_router_replay(cfg.algorithm.router_replay)
    b = ROUTING_DTYPE.itemsize  # bytes per expert id
    replay_rows = P + R if replay.update_key else 0  # per sample, the replayed routing's positions
    gpu_rows = R + replay_rows  # routing rows per sample that pi_old returns
    engine_rows = R + P * replay.needs_prompt_routing  # the engine's routing in the batch, per sample
    tensors = (engine_rows + R + replay_rows) * ids * b
    samples = (R + (P - 1) * replay.needs_prompt_routing) * ids * b
    # pi_old gathers the trainer's routing [R rows], then the replayed routing [P + R rows]: the larger receive
    gather = layout.dp * n_local * max(R, replay_rows) * ids * b if layout.dp > 1 else 0
    placement = placement or engine_placement(cfg, layout)
    share = math.ceil(n / placement.num_engines)  # samples of one engine
    exchange = share * (samples + 14 * R) if layout.world_size > 1 else 0
    a = cfg.actor
    mb_positions = a.micro_batch_tokens or a.micro_batch_size * (P + R)  # positions of one micro-batch
    pi_old = n_local * gpu_rows * ids * b + gather
    # the samples' own routing is dropped once training_batch has copied it (rl_step): the peak is the larger of
    # "samples + what arrives / is being built" and "the whole batch + pi_old's rows and gather in flight"
    peak = max(n * samples + max(exchange, n * engine_rows * ids * b), n * tensors + pi_old)
    return {"samples": n, "samples_local": n_local, "routing_tensors": n * tensors, "routing_samples": n * samples,
            "routing_peak": peak, "other_host": n * ((P + R) * 8 + 16 + 5 * R * 4),
            "routing_local": n_local * gpu_rows * ids * b, "routing_pi_old": pi_old,
            "routing_gpu": mb_positions * ids * 8, "exchange": exchange}


def format_step_batch(cfg: RecipeConfig, b: Dict[str, float], gpu_mem_gib: Optional[float] = None) -> str:
    """The `--dry-run` lines for `step_batch_bytes`, with a warning where they outgrow a node or a GPU."""
    gib = 1024**3
    d = cfg.data
    lines = [f"step batch (not in the table above; every rank builds the whole batch: {b['samples']} samples x "
             f"{d.max_prompt_length} + {d.max_response_length} tokens, padded to full length):",
             f"  host routing {b['routing_peak'] / gib:11.2f} GiB  expert ids (int16) at the step's peak, on every "
             f"rank, from:",
             f"    batch      {b['routing_tensors'] / gib:11.2f} GiB  every sample's and position's, in the step's "
             f"tensors",
             f"    samples    {b['routing_samples'] / gib:11.2f} GiB  the rollout's own copy, until the tensors are "
             f"built",
             f"    pi_old     {b['routing_pi_old'] / gib:11.2f} GiB  for a moment: {b['samples_local']} local rows' "
             f"routing + the gather of the trainer's routing from every rank",
             f"    exchange   {b['exchange'] / gib:11.2f} GiB  for a moment: one engine's share of the rollout, "
             f"pickled, while every rank receives the shares",
             f"  host other   {b['other_host'] / gib:11.2f} GiB  token ids, masks, advantages, log-probs",
             f"  GPU routing  {b['routing_gpu'] / gib:11.2f} GiB  one micro-batch's expert ids (int64) on the device"]
    host = b["routing_peak"] + b["other_host"]
    gpu = b["routing_gpu"]
    gpu_heavy = gpu_mem_gib is not None and gpu > 0.1 * gpu_mem_gib * gib
    if host > HOST_WARN_BYTES or gpu_heavy:
        on_gpu = f" and {gpu / gib:.0f} GiB of GPU memory" if gpu_heavy else ""
        lines.append(f"warning: the step batch needs up to {host / gib:.0f} GiB of host memory on every rank{on_gpu}: "
                     f"the trainer cannot run this recipe at this size yet (README, Scale-out, 'Known limit'); lower "
                     f"trainer.prompts_per_step, rollout.n or data.max_response_length")
    return "\n".join(lines)


def target_is_gpu(cfg: RecipeConfig) -> bool:
    """Which placement a recipe gets: nccl means GPUs; auto means whatever this machine has."""
    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend == "nccl"
    import torch

    return torch.cuda.is_available()


def engine_placement(cfg: RecipeConfig, layout: Layout):
    """The rollout engines the trainer would start for this layout (see rollout/placement.py)."""
    from upgrpo_megatron.rollout.placement import EnginePlacement

    try:
        return EnginePlacement.build(world_size=layout.world_size, tp=layout.tp, rollout_tp=cfg.rollout.tp,
                                     on_gpu=target_is_gpu(cfg), engine_core=cfg.rollout.engine_core)
    except ValueError as e:
        raise ConfigError(f"{e} (in {cfg.source})") from None


def reference_model_bytes(cfg: RecipeConfig, layout: Layout) -> float:
    """HOOK for the reference policy (KL to pi_ref): its bytes on each GPU, added to both phases' totals.

    0 until the trainer builds a reference model; when it does, return what it holds here (e.g. its local
    parameters in model.dtype, `local_numel(cfg.model, layout) * bytes`, or 0 when it is offloaded)."""
    return 0.0


# ------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamSpec:
    """One megatron parameter: canonical name (experts numbered globally), full shape, the dimension that
    tensor parallelism splits (None: replicated), and whether it is a routed-expert weight."""

    name: str
    shape: Tuple[int, ...]
    split_dim: Optional[int]
    expert: bool


def megatron_params(m: ModelConfig) -> List[ParamSpec]:
    """Every parameter of the megatron GPTModel `megatron/model.py` builds, in its `named_parameters` order."""
    h, hd, nq, nkv = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_query_groups
    qwen2 = m.architecture == "qwen2_moe"
    out = [ParamSpec("embedding.word_embeddings.weight", (m.vocab_size, h), 0, False)]
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        out += [ParamSpec(p + "input_layernorm.weight", (h,), None, False),
                ParamSpec(p + "self_attention.linear_proj.weight", (h, nq * hd), 1, False),
                ParamSpec(p + "self_attention.linear_qkv.weight", ((nq + 2 * nkv) * hd, h), 0, False)]
        if qwen2:
            out.append(ParamSpec(p + "self_attention.linear_qkv.bias", ((nq + 2 * nkv) * hd,), 0, False))
        else:
            out += [ParamSpec(p + "self_attention.q_layernorm.weight", (hd,), None, False),
                    ParamSpec(p + "self_attention.k_layernorm.weight", (hd,), None, False)]
        out.append(ParamSpec(p + "pre_mlp_layernorm.weight", (h,), None, False))
        if i < m.first_k_dense_layers:
            f = m.ffn_hidden_size
            out += [ParamSpec(p + "mlp.linear_fc1.weight", (2 * f, h), 0, False),
                    ParamSpec(p + "mlp.linear_fc2.weight", (h, f), 1, False)]
            continue
        out.append(ParamSpec(p + "mlp.router.weight", (m.num_experts, h), None, False))
        f = m.moe_ffn_hidden_size
        for e in range(m.num_experts):
            q = f"{p}mlp.experts.local_experts.{e}."
            out += [ParamSpec(q + "linear_fc1.weight", (2 * f, h), 0, True),
                    ParamSpec(q + "linear_fc2.weight", (h, f), 1, True)]
        if qwen2 and m.shared_expert_ffn_hidden_size:
            f = m.shared_expert_ffn_hidden_size
            out += [ParamSpec(p + "mlp.shared_experts.linear_fc1.weight", (2 * f, h), 0, False),
                    ParamSpec(p + "mlp.shared_experts.linear_fc2.weight", (h, f), 1, False),
                    ParamSpec(p + "mlp.shared_experts.gate_weight", (1, h), None, False)]
    out.append(ParamSpec("decoder.final_layernorm.weight", (h,), None, False))
    if not m.tie_word_embeddings:
        out.append(ParamSpec("output_layer.weight", (m.vocab_size, h), 0, False))
    return out


def local_params(m: ModelConfig, layout: Layout, ep_rank: int = 0) -> List[Tuple[str, int, bool]]:
    """(local name, numel, expert) of every parameter one rank holds, in model order: TP-split tensors divided
    by tp (experts by etp), this EP rank's experts renumbered from 0 (megatron's local names)."""
    per_rank = m.num_experts // layout.ep
    own = range(ep_rank * per_rank, (ep_rank + 1) * per_rank)
    out = []
    for spec in megatron_params(m):
        numel = math.prod(spec.shape)
        name = spec.name
        if spec.expert:
            prefix, rest = name.split(".mlp.experts.local_experts.")
            e, tail = rest.split(".", 1)
            if int(e) not in own:
                continue
            name = f"{prefix}.mlp.experts.local_experts.{int(e) - own.start}.{tail}"
            numel //= layout.etp if spec.split_dim is not None else 1
        elif spec.split_dim is not None:
            numel //= layout.tp
        out.append((name, numel, spec.expert))
    return out


def local_numel(m: ModelConfig, layout: Layout) -> Dict[str, int]:
    """Parameters on one rank: {"dense", "expert", "total"} (the same on every rank of a layout)."""
    ps = local_params(m, layout)
    dense = sum(n for _, n, e in ps if not e)
    expert = sum(n for _, n, e in ps if e)
    return {"dense": dense, "expert": expert, "total": dense + expert}


def _buffer_shard_numel(numels: List[int], dp: int, dp_rank: int) -> int:
    """Elements of one gradient buffer that data-parallel rank `dp_rank` owns under megatron's distributed
    optimizer (megatron-core 0.16 `_ParamAndGradBuffer`, one bucket): parameters in reverse model order, each
    starting at a multiple of 64, the buffer padded to a multiple of lcm(dp, 128) and cut into dp equal
    slices; a rank owns the parts of parameters inside its slice (padding owns no state)."""
    spans, start = [], 0
    for n in reversed(numels):
        start = math.ceil(start / 64) * 64
        spans.append((start, start + n))
        start += n
    size = math.ceil(start / math.lcm(dp, 128)) * math.lcm(dp, 128)
    lo, hi = dp_rank * size // dp, (dp_rank + 1) * size // dp
    return sum(max(0, min(b, hi) - max(a, lo)) for a, b in spans)


def optimizer_state_numel(m: ModelConfig, layout: Layout, distributed: bool, dp_rank: int = 0,
                          expert_dp_rank: int = 0, ep_rank: int = 0) -> int:
    """Parameters whose fp32 master copy and Adam moments one rank holds (`megatron/optimizer.state_numel`)."""
    ps = local_params(m, layout, ep_rank)
    if not distributed:
        return sum(n for _, n, _ in ps)
    return (_buffer_shard_numel([n for _, n, e in ps if not e], layout.dp, dp_rank)
            + _buffer_shard_numel([n for _, n, e in ps if e], layout.expert_dp, expert_dp_rank))


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
# vLLM hands out KV memory in blocks of this many tokens (CPU backend: 128, as rollout/engine.py sizes it; CUDA
# default: 16); a sequence holds whole blocks
KV_BLOCK_TOKENS = {"cpu": ENGINE_KV_BLOCK_TOKENS, "gpu": 16}


def estimate_memory(cfg: RecipeConfig, layout: Layout) -> Dict[str, float]:
    """Rough per-GPU bytes of one training rank and of its colocated rollout engine (exact counts inside).

    - params: this rank's local parameters (`local_params`: TP/ETP shards, its EP rank's experts) in
      model.dtype
    - grads: fp32 main grads for the local params (megatron DDP accumulates in fp32; not sharded)
    - optimizer: Adam's two fp32 moments, plus an fp32 master copy when params are bf16, for the parameters
      `optimizer_state_numel` gives (with parallel.use_distributed_optimizer: this rank's slice of megatron's
      gradient buffers, the largest over data-parallel ranks)
    - activations: micro_batch x seq x hidden x layers x ACTIVATION_FACTOR bytes (bf16; x2 for fp32) / tp,
      plus the fp32 logits, log-softmax and its gradient over the vocabulary shard (3 x seq x vocab / tp)
    - reference: `reference_model_bytes` (the hook for the reference policy; 0 today)
    - engine_params / kv_cache: the rollout engine this rank belongs to (`engine_placement`): GPU engines span
      rollout.tp ranks and hold ~1/rollout.tp of the weights and of each sequence's KV on each; a CPU engine
      holds a full copy, on its driver rank. kv_cache is `rollout.kv_cache_gib`; `kv_seqs_fit` says how many
      sequences of max_prompt_length + max_response_length tokens it holds (2 x layers x kv_heads x head_dim
      values per token, in whole blocks of `KV_BLOCK_TOKENS`) and `kv_seqs_wanted` how many the engine would
      run at once: min(its share of prompts_per_step x n, vLLM's max_num_seqs = 256); `kv_gib_wanted` the
      budget that holds them all.
    `training_total`: actor + activations (the engine sleeps: GPU engines release weights and KV cache while the
    actor trains); `rollout_total`: the actor's resident state (params, grads, optimizer: nothing is offloaded)
    + the engine; `total` the larger.
    """
    m, d = cfg.model, cfg.data
    n = count_parameters(m)
    placement = engine_placement(cfg, layout)
    bytes_param = 2 if m.dtype == "bf16" else 4
    counts = local_numel(m, layout)
    local = counts["total"]
    params = local * bytes_param
    grads = local * 4
    per_param_optim = 8 + (4 if bytes_param == 2 else 0)
    distributed = cfg.parallel.use_distributed_optimizer
    state = max(optimizer_state_numel(m, layout, distributed, dp_rank=r, expert_dp_rank=r % layout.expert_dp)
                for r in (range(layout.dp) if distributed else [0]))
    optim = per_param_optim * state
    seq = d.max_prompt_length + d.max_response_length
    mb = cfg.actor.micro_batch_size
    act = mb * seq * m.hidden_size * m.num_layers * ACTIVATION_FACTOR * (bytes_param / 2) / layout.tp
    act += mb * seq * (m.vocab_size / layout.tp) * 4 * 3
    ref = reference_model_bytes(cfg, layout)
    engine_bytes = 2 if cfg.rollout.dtype == "bf16" else 4
    shard = placement.group_size if placement.in_process else 1
    kv_per_seq = seq * 2 * m.num_layers * m.num_query_groups * m.head_dim * engine_bytes / shard
    kv = cfg.rollout.kv_cache_gib * 1024**3
    block_tokens = KV_BLOCK_TOKENS["gpu" if placement.in_process else "cpu"]
    blocks_per_seq = math.ceil(seq / block_tokens)
    block_bytes = kv_per_seq / seq * block_tokens
    kv_seqs_fit = int(kv // block_bytes) // blocks_per_seq
    wanted = min(math.ceil(cfg.trainer.prompts_per_step * cfg.rollout.n / placement.num_engines), VLLM_MAX_NUM_SEQS)
    engine_params = n["total"] * engine_bytes / shard
    training = params + grads + optim + act + ref
    rollout = params + grads + optim + ref + engine_params + kv
    return {"params": params, "grads": grads, "optimizer": optim, "activations": act, "reference": ref,
            "kv_cache": kv, "engine_params": engine_params, "training_total": training, "rollout_total": rollout,
            "total": max(training, rollout), "params_total": n["total"], "params_active": n["active"],
            "params_local": local, "optimizer_state_params": state, "activation_factor": ACTIVATION_FACTOR,
            "kv_bytes_per_seq": kv_per_seq, "kv_seqs_fit": kv_seqs_fit, "kv_seqs_wanted": wanted,
            "kv_gib_wanted": wanted * blocks_per_seq * block_bytes / 1024**3,
            "placement": placement}


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def format_layout_and_memory(cfg: RecipeConfig, layout: Layout, mem: Dict[str, float]) -> str:
    """The `--dry-run` report: validity, parameter counts, the layout, the engines and a per-GPU memory table."""
    gib = 1024**3
    row = lambda name, key, how: f"  {name:<14}{mem[key] / gib:9.2f} GiB  {how}"  # noqa: E731
    opt_how = "Adam moments" + (" + fp32 master" if cfg.model.dtype == "bf16" else "")
    opt_how += f" of {_count(mem['optimizer_state_params'])} params"
    if cfg.parallel.use_distributed_optimizer:
        opt_how += f" (distributed optimizer: 1/{layout.dp} of the dense / 1/{layout.expert_dp} of the expert buffer)"
    placement = mem.get("placement") or engine_placement(cfg, layout)
    lines = [
        f"recipe {cfg.source}: valid for world size {layout.world_size}",
        f"model: {cfg.model.architecture}, {_count(mem['params_total'])} parameters "
        f"({_count(mem['params_active'])} active per token), {_count(mem['params_local'])} on each GPU",
        f"layout: world {layout.world_size} = tp {layout.tp} x pp {layout.pp} x dp {layout.dp}; experts: "
        f"ep {layout.ep} x etp {layout.etp} x pp {layout.pp} x expert-dp {layout.expert_dp}; sequence parallel "
        f"{'on' if layout.sequence_parallel else 'off'}",
        *[f"note: {n}" for n in layout.notes],
        *[f"rollout: {line}" for line in placement.describe()],
        "per-GPU memory estimate (rough):",
        row("params", "params", cfg.model.dtype),
        row("grads", "grads", "fp32 main grads"),
        row("optimizer", "optimizer", opt_how),
        row("activations", "activations", f"micro-batch {cfg.actor.micro_batch_size} x seq x hidden x layers x "
            f"{ACTIVATION_FACTOR} B / tp (no recompute) + fp32 logits"),
        row("reference", "reference", "reference policy (hook, not built yet)"),
        row("training", "training_total", "sum of the above (the engine sleeps)"),
        row("engine params", "engine_params", f"rollout copy in {cfg.rollout.dtype}"
            + (f", 1/{placement.group_size} per GPU (rollout.tp)" if placement.group_size > 1 and placement.in_process
               else ", a full copy")),
        row("kv cache", "kv_cache", f"rollout.kv_cache_gib: {mem['kv_seqs_fit']} full-length sequences fit, "
            f"{mem['kv_seqs_wanted']} would run at once"
            + (f" (the rest wait: {mem['kv_gib_wanted']:.3g} GiB holds them all)"
               if mem["kv_seqs_fit"] < mem["kv_seqs_wanted"] else "")),
        row("rollout", "rollout_total", "actor state (params, grads, optimizer) + engine params + kv cache"),
        row("peak", "total", "max(training, rollout)"),
    ]
    return "\n".join(lines)
