"""A Qwen3-MoE-shaped (or Qwen2-MoE-shaped) megatron-core `GPTModel`, built from the recipe's model section.

Qwen3-MoE in Megatron terms: RMSNorm everywhere, q/k RMSNorm per head, grouped-query attention, RoPE,
SwiGLU experts (fused gate/up in `linear_fc1`), a softmax top-k router whose top-k probabilities are
renormalised (Megatron: top-k on the logits, softmax over the k — identical to HF's `norm_topk_prob=True`),
no biases, untied embeddings, optionally dense first layers. Qwen2-MoE adds QKV bias and a shared expert
with a sigmoid gate.

The layer spec is chosen once: Transformer Engine's when TE and CUDA are present, otherwise megatron-core's
local spec with `SequenceParallelRMSNorm` in every norm slot, so that TP > 1 (which MoE requires to run with
sequence parallelism) works on CPU/gloo, and grouped-GEMM experts (`experts.py`) in place of the per-expert
loop. Everything else is identical between the two.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from upgrpo_megatron.config.schema import ModelConfig
from upgrpo_megatron.megatron import compat
from upgrpo_megatron.megatron.experts import GroupedSequentialMLP


class SequenceParallelRMSNorm(torch.nn.Module):
    """RMSNorm whose weight is marked `sequence_parallel` so megatron all-reduces its gradient over TP.

    Computes like HF's Qwen3RMSNorm: variance in fp32, result cast back, then scaled by the weight.
    Used for the layer norms, the final norm and the per-head q/k norms (megatron all-reduces q/k-norm
    gradients over TP by name, see `finalize_model_grads`).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: Any):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=compat.device())
        )
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class SDPADotProductAttention(DotProductAttention):
    """megatron's local core attention, computed by torch's fused `scaled_dot_product_attention`.

    The local `DotProductAttention` materialises the `[batch, heads, seq, seq]` scores, repeats K/V for GQA
    and copies them several times; on CPU that was ~20% of a training step on the medium benchmark config.
    SDPA (causal, GQA-aware) computes the same function without those tensors. Anything this fast path does
    not cover (an explicit mask, non-causal masks, attention dropout in training) goes to megatron's code.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        dropout = self.config.attention_dropout if self.training else 0.0
        if (attention_mask is not None or mask_type != AttnMaskType.causal or dropout > 0
                or attention_bias is not None or packed_seq_params is not None or self.softmax_offset is not None):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        # [b, heads, s, d] -> [s, b, heads * d]
        return ctx.permute(2, 0, 1, 3).reshape(ctx.shape[2], ctx.shape[0], -1)


class PolicyGPTModel(GPTModel):
    """GPTModel whose `labels` path returns per-token log-prob and entropy instead of cross entropy.

    `model(input_ids, position_ids, None, labels=targets)` -> `[batch, seq, 2]` (log-prob of targets,
    entropy), computed on the sequence-first, vocab-parallel logits inside the model. Without labels the
    model returns logits as usual. This avoids transposing the vocabulary-sized logits to batch-first and
    back (two full copies per step, ~8% of a CPU training step on the medium benchmark config).
    """

    # the sampling temperature: log-probs and entropies are those of softmax(logits / T), the distribution the
    # rollout engine samples from (set by the actor from rollout.temperature)
    logit_temperature = 1.0

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        from upgrpo_megatron.megatron.logprobs import vocab_parallel_log_prob_entropy

        if self.logit_temperature != 1.0:
            logits = logits / self.logit_temperature
        lp, ent = vocab_parallel_log_prob_entropy(logits, labels.transpose(0, 1))  # [seq, batch]
        return torch.stack([lp, ent], dim=-1).transpose(0, 1)


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[name]


def build_transformer_config(
    model_cfg: ModelConfig,
    *,
    tp: int = 1,
    ep: int = 1,
    etp: int = 1,
    sequence_parallel: bool = False,
    dtype: str = "fp32",
    router_replay: bool = True,
) -> TransformerConfig:
    """The single place where the recipe's model section becomes a megatron `TransformerConfig`."""
    params_dtype = _dtype(dtype)
    on_gpu = compat.cuda_available()
    moe_layer_freq = [0] * model_cfg.first_k_dense_layers + [1] * model_cfg.num_moe_layers
    aux = float(model_cfg.moe_aux_loss_coeff)
    qwen2 = model_cfg.architecture == "qwen2_moe"
    kwargs = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.head_dim,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        # attention / MLP shape
        normalization="RMSNorm",
        layernorm_epsilon=float(model_cfg.norm_epsilon),
        qk_layernorm=not qwen2,
        add_bias_linear=False,
        add_qkv_bias=qwen2,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=float(model_cfg.init_std),
        # MoE
        num_moe_experts=model_cfg.num_experts,
        moe_ffn_hidden_size=model_cfg.moe_ffn_hidden_size,
        moe_router_topk=model_cfg.moe_router_topk,
        moe_router_score_function="softmax",
        # top-k then softmax over the k == HF norm_topk_prob=True (Qwen3); softmax over all experts then
        # top-k without renormalising == norm_topk_prob=False (Qwen2-MoE)
        moe_router_pre_softmax=not bool(model_cfg.norm_topk_prob),
        moe_router_load_balancing_type="aux_loss" if aux > 0 else "none",
        moe_aux_loss_coeff=aux,
        moe_router_dtype="fp32",
        moe_layer_freq=moe_layer_freq,
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        moe_grouped_gemm=compat.have_transformer_engine(),  # TE's GroupedMLP (names: sharding.local_spec_name)
        moe_permute_fusion=False,
        moe_enable_routing_replay=router_replay,
        # parallelism
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=1,
        # numerics / kernels
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        attention_backend=AttnBackend.auto if compat.have_transformer_engine() else AttnBackend.local,
    )
    if qwen2 and model_cfg.shared_expert_ffn_hidden_size:
        kwargs.update(
            moe_shared_expert_intermediate_size=model_cfg.shared_expert_ffn_hidden_size,
            moe_shared_expert_gate=True,
            moe_shared_expert_overlap=False,
        )
    return TransformerConfig(**kwargs)


def _local_block_spec(config: TransformerConfig):
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    spec = copy.deepcopy(spec)
    norm = ModuleSpec(module=SequenceParallelRMSNorm)
    for layer in spec.layer_specs:
        sub = layer.submodules
        sub.input_layernorm = norm
        sub.pre_mlp_layernorm = norm
        attn = sub.self_attention.submodules
        attn.core_attention = SDPADotProductAttention
        if config.qk_layernorm:
            attn.q_layernorm = norm
            attn.k_layernorm = norm
        experts = getattr(sub.mlp.submodules, "experts", None)
        if experts is not None and experts.module is SequentialMLP:  # the per-expert loop -> grouped GEMMs
            experts.module = GroupedSequentialMLP
    spec.layer_norm = norm
    return spec


def build_gpt_model(
    model_cfg: ModelConfig,
    config: Optional[TransformerConfig] = None,
    **config_kwargs: Any,
) -> GPTModel:
    """Build the Qwen-MoE-shaped GPTModel on this rank (parallel_state must be initialised).

    Args:
        model_cfg: the recipe's `model` section.
        config: a prebuilt TransformerConfig; otherwise built with `build_transformer_config(**config_kwargs)`.
    """
    if config is None:
        config = build_transformer_config(model_cfg, **config_kwargs)
    if compat.have_transformer_engine():
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization="RMSNorm")
    else:
        spec = _local_block_spec(config)
    model = PolicyGPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=int(model_cfg.max_position_embeddings),
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(model_cfg.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=int(float(model_cfg.rope_theta)),
    )
    # megatron-core 0.16 marks expert weights as dense (`allreduce=True`) when EP == 1, so DDP reduces them
    # over the dense DP group only; with ETP < TP the experts are replicated over TP ranks that each saw a
    # different sequence shard, and their gradients must be summed over the expert-DP group, which spans
    # those TP ranks. Expert weights always belong to the expert-DP group: say so on every layout (for
    # EP == 1 and ETP == TP the two groups coincide and nothing changes).
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            p.allreduce = False
    return model.to(compat.device())
