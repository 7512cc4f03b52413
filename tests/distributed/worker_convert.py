"""torchrun worker for the conversion tests: HF weights or a checkpoint -> our Megatron model at a layout.

    worker_convert.py logits --hf DIR [DIR ...] --tp T --ep E --inputs ids.pt --out out.pt
        load each HF dir into the model built at TP=T x EP=E; rank 0 saves {dir: full logits [batch, seq, vocab]}
    worker_convert.py save --hf DIR [DIR ...] --tp T --ep E --out PARENT   (-> PARENT/<name of DIR>)
        a *training* checkpoint: the actor (DDP + megatron Adam) loads the HF weights, takes one optimizer step
        with lr=0 (Adam moments filled, weights unchanged) and `save_checkpoint` writes it at this layout
    worker_convert.py load --ckpt CKPT [CKPT ...] --tp T --ep E --inputs ids.pt --out out.pt
        build the model from the checkpoint's model_config.yaml at this layout, `load_checkpoint`, logits
"""
import argparse

import torch
import torch.distributed as dist


def make_tiny_hf(arch: str, out_dir, *, dtype=torch.float32, first_k_dense: int = 0, seed: int = 0,
                 tokenizer_file: bool = True) -> str:
    """A tiny random `transformers` Qwen3-MoE / Qwen2-MoE saved with `save_pretrained` (no download).

    Every weight, norms included, gets noise so that no mapping mistake hides behind a trivial init (ones,
    zeros); rope_theta is not the default so a dropped RoPE setting shows in the logits."""
    import json
    from pathlib import Path

    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                  decoder_sparse_step=1, mlp_only_layers=list(range(first_k_dense)), tie_word_embeddings=False,
                  max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(head_dim=16, norm_topk_prob=True, **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif arch == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(shared_expert_intermediate_size=48, norm_topk_prob=False, **common)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    else:
        raise ValueError(arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.08 * torch.randn(p.shape, generator=g))
    model = model.to(dtype)
    model.save_pretrained(str(out_dir))
    if tokenizer_file:  # a tokenizer the checkpoint must carry (contents need not be a real vocabulary)
        (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "pad_token": "<p>"}))
    return str(out_dir)


def full_logits(model, ids):
    """Forward in fp32, gather the vocab-parallel logits over TP -> [batch, seq, vocab] on every rank."""
    from megatron.core import parallel_state as ps

    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    model.eval()
    with torch.no_grad():
        local = model(ids, pos, None).contiguous()  # [batch, seq, vocab / tp]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def build(model_cfg, tp, ep):
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from upgrpo_megatron.megatron.model import build_gpt_model
    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel

    RouterReplay.clear_global_router_replay_instances()
    init_model_parallel(ParallelSizes(tp=tp, ep=ep, sequence_parallel=tp > 1))
    return build_gpt_model(model_cfg, tp=tp, ep=ep, sequence_parallel=tp > 1, dtype=model_cfg.dtype)


def cmd_logits(a):
    import json
    from pathlib import Path

    from upgrpo_megatron.convert import hf_config_to_model_cfg, load_hf_into_model

    ids = torch.load(a.inputs, weights_only=True)
    out = {}
    for d in a.hf:
        cfg = hf_config_to_model_cfg(json.loads((Path(d) / "config.json").read_text()))
        model = build(cfg, a.tp, a.ep)
        load_hf_into_model(d, model, cfg)
        out[d] = full_logits(model, ids)
    if dist.get_rank() == 0:
        torch.save(out, a.out)


def cmd_save(a):
    import json
    from pathlib import Path

    from megatron.core.distributed import finalize_model_grads

    from upgrpo_megatron.convert import hf_config_to_model_cfg, load_hf_into_model
    from upgrpo_megatron.megatron.actor import MegatronActor, OptimSettings
    from upgrpo_megatron.megatron.checkpoint import save_checkpoint
    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes(tp=a.tp, ep=a.ep, sequence_parallel=a.tp > 1))
    for d in a.hf:
        cfg = hf_config_to_model_cfg(json.loads((Path(d) / "config.json").read_text()))
        actor = MegatronActor(cfg, tp=a.tp, ep=a.ep, sequence_parallel=a.tp > 1, optim=OptimSettings(lr=0.0))
        load_hf_into_model(d, actor.module, cfg)
        ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(8).unsqueeze(0).expand_as(ids)
        actor.model.zero_grad_buffer()
        out = actor.model(ids, pos, None, labels=torch.nn.functional.pad(ids[:, 1:], (0, 1)))
        (-out[:, :-1, 0].mean()).backward()
        finalize_model_grads([actor.model])
        actor.optimizer.step()
        save_checkpoint(Path(a.out) / Path(d).name, actor.module, optimizer=actor.optimizer,
                        extra_state={"step": 3}, model_cfg=cfg)


def cmd_load(a):
    from pathlib import Path

    from upgrpo_megatron.config import read_model_config
    from upgrpo_megatron.megatron.checkpoint import load_checkpoint

    ids = torch.load(a.inputs, weights_only=True)
    out = {}
    for c in a.ckpt:
        cfg = read_model_config(Path(c) / "model_config.yaml")
        model = build(cfg, a.tp, a.ep)
        extra = load_checkpoint(c, model, model_cfg=cfg)
        out[c] = {"logits": full_logits(model, ids), "extra": extra}
    if dist.get_rank() == 0:
        torch.save(out, a.out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["logits", "save", "load"])
    ap.add_argument("--hf", nargs="*", default=[])
    ap.add_argument("--ckpt", nargs="*", default=[])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--inputs")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    {"logits": cmd_logits, "save": cmd_save, "load": cmd_load}[a.mode](a)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing.save starts a spawned helper that re-imports this file
    main()
