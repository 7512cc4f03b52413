"""The typed recipe schema: YAML + `dotted.key=value` overrides -> `RecipeConfig`, with one-line errors.

A recipe may start with `inherit: other.yaml` (a path relative to the recipe) and override only what differs.
Every key is declared below; an unknown key, a wrong type, a value out of range or a choice outside its set
is a `ConfigError` naming the key and the file (and a suggestion for typos). `validate_layout` checks the
parallel layout against the world size; `estimate_memory` sizes a layout for `--dry-run`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from upgrpo_megatron.errors import UpgrpoError


class ConfigError(UpgrpoError, ValueError):
    """A recipe or override is invalid; the message names the key and where it came from."""


# ---------------------------------------------------------------------------------------------- schema
@dataclass
class ModelConfig:
    architecture: str = "qwen3_moe"
    hf_path: Optional[str] = None
    vocab_size: int = 32
    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int = 2
    head_dim: int = 64
    ffn_hidden_size: int = 256
    moe_ffn_hidden_size: int = 64
    num_experts: int = 8
    moe_router_topk: int = 2
    norm_topk_prob: bool = True
    moe_aux_loss_coeff: float = 0.0
    first_k_dense_layers: int = 0
    shared_expert_ffn_hidden_size: int = 0
    rope_theta: float = 1_000_000.0
    norm_epsilon: float = 1e-6
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "fp32"


@dataclass
class ParallelConfig:
    tp: int = 1
    ep: int = 1
    etp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    backend: str = "auto"
    use_distributed_optimizer: bool = False


@dataclass
class DataConfig:
    task: str = "arithmetic"
    train_files: List[str] = field(default_factory=list)
    val_files: List[str] = field(default_factory=list)
    tokenizer_path: Optional[str] = None
    prompt_key: str = "prompt"
    answer_key: str = "reward_model.ground_truth"
    reward: str = "auto"
    max_prompt_length: int = 16
    max_response_length: int = 8
    num_train: int = 4096
    num_val: int = 128
    arithmetic_max_operand: int = 20
    arithmetic_ops: List[str] = field(default_factory=lambda: ["+", "-"])
    apply_chat_template: bool = True      # chat-list prompts go through the tokenizer's chat template
    filter_overlong_prompts: bool = False  # drop (and count) prompts longer than max_prompt_length
    skip_malformed_rows: bool = False
    seed: int = 1234


@dataclass
class SFTWarmupConfig:
    steps: int = 0
    batch_size: int = 32
    lr: float = 1e-3


@dataclass
class RolloutConfig:
    engine: str = "vllm"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    dtype: str = "fp32"
    kv_cache_gib: float = 1.0            # the engine's KV-cache budget (CPU: VLLM_CPU_KVCACHE_SPACE; GPU: kv_cache_memory_bytes)
    gpu_memory_utilization: float = 0.6
    enforce_eager: bool = True
    capture_routing: bool = True
    val_temperature: float = 0.0
    val_n: int = 1


@dataclass
class AlgorithmConfig:
    loss_mode: str = "up_grpo"
    loss_agg_mode: str = "token-mean"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 10.0
    norm_adv_by_std: bool = True
    dynamic_sampling: bool = True
    overlong_buffer_len: int = 0
    overlong_penalty_factor: float = 1.0
    kl_loss_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    entropy_coeff: float = 0.0
    router_replay: str = "none"


@dataclass
class ActorConfig:
    lr: float = 1e-6
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    ppo_mini_batch_size: int = 16
    micro_batch_size: int = 32
    max_bad_steps: int = 3


@dataclass
class DiagnosticsConfig:
    enabled: bool = True
    routing_drift: bool = True
    extreme_taus: List[float] = field(default_factory=lambda: [2.0, 5.0, 10.0])
    log_prob_diff_threshold: float = 0.5
    save_every: int = 1


@dataclass
class TrainerConfig:
    run_dir: str = "runs/default"
    total_steps: int = 20
    prompts_per_step: int = 16
    eval_every: int = 5
    save_every: int = 10
    keep_checkpoints: int = 2
    resume: str = "auto"
    seed: int = 1
    export_hf: bool = True
    report: bool = True
    tensorboard: bool = True
    wandb: bool = False
    world_size_hint: Optional[int] = None
    samples_per_step: int = 4


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft_warmup: SFTWarmupConfig = field(default_factory=SFTWarmupConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # where the recipe came from (for messages); not a recipe key, not compared
    source: str = field(default="<defaults>", compare=False, metadata={"internal": True})


CHOICES = {
    "model.architecture": ("qwen3_moe", "qwen2_moe"),
    "model.dtype": ("fp32", "bf16"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "data.task": ("arithmetic", "math"),
    "data.reward": ("auto", "arithmetic_exact", "math_verify", "dapo_answer"),
    "rollout.engine": ("vllm",),
    "rollout.dtype": ("fp32", "bf16"),
    "algorithm.loss_mode": ("vanilla", "up_grpo", "gspo", "up_gspo"),
    "algorithm.loss_agg_mode": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "algorithm.kl_loss_type": ("k1", "k2", "k3", "low_var_kl"),
    "algorithm.router_replay": ("none", "R2", "R3"),
    "actor.lr_schedule": ("constant", "cosine"),
}
POSITIVE = [
    "model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_attention_heads",
    "model.num_query_groups", "model.head_dim", "model.ffn_hidden_size", "model.moe_ffn_hidden_size",
    "model.num_experts", "model.moe_router_topk", "model.max_position_embeddings", "model.rope_theta",
    "model.norm_epsilon", "parallel.tp", "parallel.ep", "parallel.etp", "parallel.pp",
    "data.max_prompt_length", "data.max_response_length", "data.num_train", "data.num_val",
    "data.arithmetic_max_operand", "sft_warmup.batch_size", "rollout.n", "rollout.kv_cache_gib", "rollout.val_n",
    "actor.ppo_epochs", "actor.ppo_mini_batch_size", "actor.micro_batch_size", "actor.max_bad_steps",
    "trainer.total_steps", "trainer.prompts_per_step", "trainer.save_every", "trainer.keep_checkpoints",
    "diagnostics.save_every",
]
NON_NEGATIVE = [
    "model.moe_aux_loss_coeff", "model.first_k_dense_layers", "model.shared_expert_ffn_hidden_size",
    "model.init_std", "sft_warmup.steps", "sft_warmup.lr", "rollout.temperature", "rollout.val_temperature",
    "algorithm.clip_ratio_low", "algorithm.clip_ratio_high", "algorithm.overlong_buffer_len",
    "algorithm.overlong_penalty_factor", "algorithm.kl_loss_coef", "algorithm.entropy_coeff", "actor.lr",
    "actor.lr_warmup_steps", "actor.min_lr", "actor.weight_decay", "actor.grad_clip", "trainer.eval_every",
    "diagnostics.log_prob_diff_threshold", "trainer.samples_per_step",
]


# ---------------------------------------------------------------------------------------------- loading
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, where)
    if origin in (list, List):
        (inner,) = typing.get_args(tp)
        if inner is str and isinstance(value, str):
            value = [value]  # `data.train_files=a.parquet` means a list of one file
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} in {where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} in {where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} in {where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads 1e-6 (no dot) as a string
                except ValueError:
                    pass
            raise ConfigError(f"{key} in {where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} in {where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key} in {where}: unsupported type {_type_name(tp)}")


def _merge_into(obj, data: Dict[str, Any], where: str, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} in {where}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            known = [f"{prefix}{k}" for k in fields]
            close = difflib.get_close_matches(full, known, n=1, cutoff=0.6)
            hint = f" — did you mean '{close[0]}'?" if close else f" (known keys: {', '.join(k.split('.')[-1] for k in known)})"
            raise ConfigError(f"unknown key '{full}' in {where}{hint}")
        tp = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value if value is not None else {}, where, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, tp, full, where))


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _load_layers(path: Path, seen: Sequence[Path] = ()) -> List[tuple]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'inherit' forms a cycle")
    data = _read_yaml(path)
    parent = data.pop("inherit", None)
    layers = []
    if parent is not None:
        layers = _load_layers((path.parent / str(parent)), [*seen, path])
    return layers + [(data, str(path))]


def parse_override(text: str) -> tuple:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected dotted.key=value, e.g. actor.lr=1e-6")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_recipe(path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Load a recipe (following `inherit`), apply `dotted.key=value` overrides, validate."""
    cfg = RecipeConfig()
    for data, where in _load_layers(Path(path)):
        _merge_into(cfg, data, where)
    for text in overrides:
        key, value = parse_override(text)
        nested: Dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        _merge_into(cfg, nested, f"override '{text}'")
    cfg.source = str(path)
    validate(cfg)
    return cfg


def from_dict(data: Dict[str, Any], where: str = "<dict>") -> RecipeConfig:
    cfg = RecipeConfig()
    _merge_into(cfg, data, where)
    validate(cfg)
    return cfg


def to_dict(cfg) -> Dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d.pop("source", None)
    return d


def save_resolved(cfg: RecipeConfig, path, *, step: int = 0) -> Optional[Path]:
    """Write the resolved config atomically. A different config already there (a run resumed with other
    settings) is kept as `config.before_step_K.yaml` rather than overwritten; returns that path if any."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# resolved from {cfg.source}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    kept = None
    if path.exists():
        old = path.read_text()
        if old.split("\n", 1)[-1] == text.split("\n", 1)[-1]:
            return None
        kept = path.with_name(f"{path.stem}.before_step_{step}{path.suffix}")
        n = 1
        while kept.exists():
            kept = path.with_name(f"{path.stem}.before_step_{step}.{n}{path.suffix}")
            n += 1
        kept.write_text(old)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return kept


def _get(cfg, key: str):
    obj = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


# ---------------------------------------------------------------------------------------------- checks
ARITHMETIC_OPS = ("+", "-", "*")


def _fail(key: str, value: Any, where: str, why: str) -> None:
    raise ConfigError(f"{key}={value!r} in {where}: {why}")


def validate(cfg: RecipeConfig) -> None:
    """Every single-field and cross-field check that needs no world size; raises ConfigError naming the key."""
    where = cfg.source
    for key, allowed in CHOICES.items():
        v = _get(cfg, key)
        if v not in allowed:
            _fail(key, v, where, f"choose one of {', '.join(allowed)}")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            _fail(key, _get(cfg, key), where, "must be > 0")
    for key in NON_NEGATIVE:
        if not _get(cfg, key) >= 0:
            _fail(key, _get(cfg, key), where, "must be >= 0")
    m, d, a, r, act, t = cfg.model, cfg.data, cfg.algorithm, cfg.rollout, cfg.actor, cfg.trainer
    # probabilities
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
    if a.clip_ratio_low >= 1:
        _fail("algorithm.clip_ratio_low", a.clip_ratio_low, where, "must be < 1")
    if not a.clip_ratio_c > 1:
        _fail("algorithm.clip_ratio_c", a.clip_ratio_c, where, "the dual-clip bound must be > 1")
    if a.overlong_buffer_len >= d.max_response_length:
        _fail("algorithm.overlong_buffer_len", a.overlong_buffer_len, where,
              f"must be < data.max_response_length={d.max_response_length} (the penalty starts at the difference)")
    # model shape
    if m.num_attention_heads % m.num_query_groups:
        _fail("model.num_query_groups", m.num_query_groups, where,
              f"must divide model.num_attention_heads={m.num_attention_heads}")
    if m.head_dim % 2:
        _fail("model.head_dim", m.head_dim, where, "must be even (rotary embeddings rotate pairs)")
    if m.moe_router_topk > m.num_experts:
        _fail("model.moe_router_topk", m.moe_router_topk, where, f"exceeds model.num_experts={m.num_experts}")
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
    # data
    bad_ops = [o for o in d.arithmetic_ops if o not in ARITHMETIC_OPS]
    if bad_ops or not d.arithmetic_ops:
        _fail("data.arithmetic_ops", d.arithmetic_ops, where, f"choose a non-empty subset of {', '.join(ARITHMETIC_OPS)}")
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
    if cfg.parallel.pp != 1:
        _fail("parallel.pp", cfg.parallel.pp, where, "pipeline parallelism is not supported yet (use 1)")


CPU_ENGINE_HEAD_DIMS = (64, 128)


def validate_for_cpu_engine(cfg: RecipeConfig) -> None:
    """vLLM's CPU attention supports only some head sizes; refuse others before starting the engine.

    Called only when the rollout will run on CPU (a GPU engine has no such limit)."""
    if cfg.model.head_dim not in CPU_ENGINE_HEAD_DIMS:
        raise ConfigError(f"model.head_dim={cfg.model.head_dim} in {cfg.source}: the CPU vLLM engine supports "
                          f"head_dim {' or '.join(map(str, CPU_ENGINE_HEAD_DIMS))}")


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


def validate_layout(cfg: RecipeConfig, world_size: int) -> Layout:
    """Refuse a parallel layout that cannot work, naming the setting; return the resolved `Layout`."""
    p, m, where = cfg.parallel, cfg.model, cfg.source
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: must be >= 1")
    if p.pp != 1:
        raise ConfigError(f"parallel.pp={p.pp} in {where}: pipeline parallelism is not supported yet (use 1)")
    if world_size % (p.tp * p.pp):
        raise ConfigError(f"parallel.tp={p.tp} x parallel.pp={p.pp} in {where}: does not divide the world size {world_size}")
    if world_size % (p.ep * p.etp * p.pp):
        raise ConfigError(f"parallel.ep={p.ep} x parallel.etp={p.etp} x parallel.pp={p.pp} in {where}: does not "
                          f"divide the world size {world_size}")
    if m.num_experts % p.ep:
        raise ConfigError(f"model.num_experts={m.num_experts} in {where}: not divisible by parallel.ep={p.ep}")
    # The arithmetic tokenizer is built with exactly model.vocab_size ids, so the vocabulary check applies
    # to every task: the embedding and output layer are split by rows across tp.
    for key in ("num_attention_heads", "num_query_groups", "vocab_size"):
        v = getattr(m, key)
        if v % p.tp:
            raise ConfigError(f"model.{key}={v} in {where}: not divisible by parallel.tp={p.tp}")
    if m.first_k_dense_layers and m.ffn_hidden_size % p.tp:
        raise ConfigError(f"model.ffn_hidden_size={m.ffn_hidden_size} in {where}: not divisible by parallel.tp={p.tp}")
    if m.moe_ffn_hidden_size % p.etp:
        raise ConfigError(f"model.moe_ffn_hidden_size={m.moe_ffn_hidden_size} in {where}: not divisible by "
                          f"parallel.etp={p.etp}")
    if m.shared_expert_ffn_hidden_size % p.tp:
        raise ConfigError(f"model.shared_expert_ffn_hidden_size={m.shared_expert_ffn_hidden_size} in {where}: not "
                          f"divisible by parallel.tp={p.tp}")
    notes = []
    sp = p.sequence_parallel
    if p.tp > 1 and not sp:
        sp = True
        notes.append("sequence parallelism switched on: megatron-core needs it for MoE with tp > 1")
    if p.tp == 1 and sp:
        sp = False
        notes.append("sequence parallelism switched off: it has no effect with tp = 1")
    return Layout(world_size=world_size, tp=p.tp, ep=p.ep, etp=p.etp, pp=p.pp, dp=world_size // (p.tp * p.pp),
                  expert_dp=world_size // (p.ep * p.etp * p.pp), sequence_parallel=sp, notes=tuple(notes))


# ---------------------------------------------------------------------------------------------- dry run
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
