"""The typed recipe schema: every key a recipe may set, its type and its default.

`RecipeConfig` is the one description of a run; `ModelConfig` is the one description of a model, used end to
end (recipes, Hugging Face conversion, the Megatron model builder, weight sync). Loading and overrides live
in `load.py`, checks in `validate.py`. The allowed values of name-valued keys (`algorithm.loss_mode`, ...) are
not listed here: they come from the registries that implement them (`validate.choices()`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from upgrpo_megatron.errors import UpgrpoError

ENGINE_CORES = ("auto", "in_process", "subprocess")  # rollout.engine_core (rollout/placement.py)


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

    @property
    def moe_layers(self) -> List[int]:
        """0-based indices of the MoE layers (the first `first_k_dense_layers` are dense, with no router)."""
        return list(range(self.first_k_dense_layers, self.num_layers))

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_layers


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
    # the engine's KV-cache budget (CPU: VLLM_CPU_KVCACHE_SPACE; GPU: kv_cache_memory_bytes)
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.6
    enforce_eager: bool = True
    capture_routing: bool = True
    val_temperature: float = 0.0
    val_n: int = 1
    val_sample_n: int = 0                # also eval k samples per problem at rollout.temperature: val/mean@k (0: off)
    # controlled train-inference mismatch (experiments): Gaussian noise of relative size router_noise (x the
    # RMS of each router weight) added to the ENGINE's copy of the router weights only, drawn anew for every
    # weight version from trainer.seed; 0 = off
    router_noise: float = 0.0
    sync_every: int = 1                  # sync the engine every k steps (k > 1: rollouts from stale weights)
    tp: int = 1                          # GPU: ranks per vLLM engine (external_launcher); CPU: 1 (engine per DP rank)
    # CPU: where vLLM's engine core runs: in_process (the trainer process; world size 1 only), subprocess (its own
    # process), auto = in_process at world size 1 (placement.py). GPU engines are external_launcher ones.
    engine_core: str = "auto"


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
    old_log_prob: str = "trainer"        # pi_old: the trainer's recompute | the rollout engine's log-probs
    log_kl_to_ref: bool = True           # keep a reference policy and log KL(actor || reference) every step


@dataclass
class CorrectionConfig:
    """Train-inference correction applied to w = pi_trainer / pi_rollout (losses/correction.py)."""

    mode: str = "none"                 # none | tis | icepop | seq_mask_is | routing_mask
    tis_cap: float = 2.0               # tis: token weight min(w, C)
    icepop_low: float = 0.5            # icepop: tokens with w outside [low, high] get weight 0
    icepop_high: float = 5.0
    seq_low: float = 0.999             # seq_mask_is: sequences whose geometric-mean w is outside [low, high]
    seq_high: float = 1.001
    routing_min_layers: int = 1        # routing_mask: tokens routed differently in >= this many MoE layers ...
    routing_weight: float = 0.0        # ... get this weight (0: dropped)
    routing_only_negative: bool = False  # ... and only when A <= 0


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
    micro_batch_tokens: int = 0  # > 0: pack micro-batches by length, at most this many padded tokens each
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
    init_from: Optional[str] = None      # start RL from this checkpoint's weights (no SFT warm-up; step 0)
    max_steps_without_update: int = 10   # stop after this many steps in a row where dynamic sampling kept nothing


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft_warmup: SFTWarmupConfig = field(default_factory=SFTWarmupConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # where the recipe came from (for messages); not a recipe key, not compared
    source: str = field(default="<defaults>", compare=False, metadata={"internal": True})


def to_dict(cfg) -> Dict[str, Any]:
    """A config (or one section) as plain dicts, without the internal `source` field."""
    d = dataclasses.asdict(cfg)
    d.pop("source", None)
    return d


def get_key(cfg, key: str) -> Any:
    """`get_key(cfg, "actor.lr")`: a dotted key's value."""
    obj = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj
