#!/usr/bin/env bash
# The GPU paths, checked on a fresh CUDA machine in one go (none of this has run yet: see README, "GPU paths not
# yet run"). Installs the `gpu` extra into .venv-gpu, then runs four checks with a time limit each (8 minutes in
# all, not counting the install: Transformer Engine may compile for a while) and prints a summary:
#   1. TE layer spec (grouped-GEMM experts, alltoall dispatcher) logits vs transformers on the same HF weights
#   2. 5 RL steps of the tiny recipe in bf16 on CUDA vLLM (external_launcher, in the trainer process), rollout
#      routing returned natively by vLLM (enable_return_routed_experts), not by the CPU prefill replay
#   3. weight sync: after each step's sync the engine scores the sampled tokens like the actor
#      (mismatch/token_mult_prob_error near 1, routing mismatch small), and its time per step
#   4. the actor's train step: tokens/s and MFU against a measured bf16 matmul peak
#
#   bash tools/gpu_check.sh            # install + checks
#   SKIP_INSTALL=1 bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv-gpu}
PY=$VENV/bin/python
OUT=${OUT:-runs/gpu_check}
export PYTHONPATH=$ROOT PYTHONUNBUFFERED=1 UPGRPO_NO_PROGRESS=1
mkdir -p "$OUT"
declare -A RESULT

if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m venv "$VENV" && "$PY" -m pip install -q --upgrade pip wheel setuptools \
    && "$PY" -m pip install -q -e '.[gpu,dev,math]' || { echo "install of the gpu extra failed"; exit 1; }
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0))" \
  || exit 1

run_check() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  if timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then RESULT[$name]="PASS"; else RESULT[$name]="FAIL"; fi
  RESULT[$name]="${RESULT[$name]} ($((SECONDS - t0)) s) $(grep '^RESULT' "$OUT/$name.log" | tail -1 | cut -c8-)"
}

# 1 ------------------------------------------------------------------------------------------------------------
run_check te_logits 90 "$PY" - <<'EOF'
import json, tempfile, torch, transformers
from upgrpo_megatron.megatron import compat
from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel
from upgrpo_megatron.megatron.model import build_gpt_model
from upgrpo_megatron.convert import load_hf_into_model, hf_config_to_model_cfg
assert compat.have_transformer_engine(), "Transformer Engine does not import"
torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(0)
cfg = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, intermediate_size=512, moe_intermediate_size=128, num_experts=8,
    num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[], tie_word_embeddings=False, max_position_embeddings=256)
hf = transformers.Qwen3MoeForCausalLM(cfg).eval().cuda()
d = tempfile.mkdtemp(); hf.save_pretrained(d)
init_model_parallel(ParallelSizes())
mcfg = hf_config_to_model_cfg(json.load(open(f"{d}/config.json")))
model = build_gpt_model(mcfg).eval()
grouped = any(".experts.linear_fc1.weight0" in n for n, _ in model.named_parameters())
load_hf_into_model(d, model)
ids = torch.randint(0, 256, (2, 64), device="cuda")
pos = torch.arange(64, device="cuda").expand(2, -1)
with torch.no_grad():
    ours = model(ids, pos, None).float()
    ref = hf(ids).logits.float()
diff = (ours - ref).abs().max().item()
print(f"RESULT logits max|diff| {diff:.2e} (grouped GEMM experts: {grouped}, dispatcher {model.config.moe_token_dispatcher_type})")
assert grouped and diff < 2e-3, diff
EOF

# 2, 3 -----------------------------------------------------------------------------------------------------------
rm -rf "$OUT/rl"
run_check rl_native_routing 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 tools/train_moe.py \
  recipes/qwen_moe.yaml trainer.run_dir="$OUT/rl" trainer.total_steps=5 sft_warmup.steps=100 trainer.eval_every=5 \
  model.dtype=bf16 rollout.dtype=bf16 trainer.report=false trainer.export_hf=false
{ grep -q "rollout routing: native" "$OUT/rl_native_routing.log" \
    && ! grep -q "rollout routing: .*prefill replay" "$OUT/rl_native_routing.log"; } \
  || RESULT[rl_native_routing]="FAIL (routing was not returned natively for every sample) ${RESULT[rl_native_routing]}"
run_check weight_sync 30 "$PY" - "$OUT/rl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
steps = [r for r in rows if r["step"] >= 1 and "mismatch/token_mult_prob_error" in r]
assert len(steps) >= 4, f"only {len(steps)} RL steps with mismatch metrics"
err = max(abs(r["mismatch/token_mult_prob_error"] - 1) for r in steps)
pair = max(r["mismatch/routing/pair_frac"] for r in steps)
sync = sorted(r["timing_s/weight_sync"] for r in steps)[len(steps) // 2]
print(f"RESULT max |token_mult_prob_error - 1| {err:.3f}, routing pair mismatch <= {pair:.3f} (bf16), sync {sync:.3f} s/step")
assert err < 0.05 and pair < 0.1, (err, pair)
EOF

# 4 ------------------------------------------------------------------------------------------------------------
run_check actor_mfu 120 "$PY" - <<'EOF'
import time, torch
from bench.actor_step import MEDIUM, model_cfg, step_flops
from upgrpo_megatron.megatron.actor import MegatronActor, OptimSettings, split_micro_batches
from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel
c = dict(MEDIUM, hidden_size=2048, num_layers=4, num_experts=32, moe_router_topk=4, num_attention_heads=16,
         num_query_groups=4, head_dim=128, moe_ffn_hidden_size=768, ffn_hidden_size=6144, vocab_size=32768, batch=8, seq=2048)
init_model_parallel(ParallelSizes())
actor = MegatronActor(model_cfg(c), dtype="bf16", optim=OptimSettings(lr=1e-6))
ids = torch.randint(0, c["vocab_size"], (c["batch"], c["seq"]), device="cuda")
R = c["seq"] // 2
batch = {"input_ids": ids, "prompt_lens": torch.full((c["batch"],), c["seq"] - R, device="cuda"),
         "response_mask": torch.ones(c["batch"], R, device="cuda")}
loss = lambda mb, lp, ent: (-(lp * mb["response_mask"]).mean(), {})
step = lambda: actor.train_step(split_micro_batches(batch, torch.arange(c["batch"], device="cuda"), 2), loss)
for _ in range(2): step()
torch.cuda.synchronize(); t0 = time.perf_counter(); n = 5
for _ in range(n): step()
torch.cuda.synchronize(); dt = (time.perf_counter() - t0) / n
a, b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16), torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3): a @ b
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); peak = 2 * 8192**3 * 10 / (time.perf_counter() - t0)
flops = step_flops(c) / dt
print(f"RESULT actor step {c['batch'] * c['seq'] / dt:,.0f} tokens/s, {flops / 1e12:.1f} TFLOP/s = MFU {flops / peak:.1%} "
      f"of the measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
EOF

echo
echo "=== summary ($OUT)"
for k in te_logits rl_native_routing weight_sync actor_mfu; do printf '  %-18s %s\n' "$k" "${RESULT[$k]:-not run}"; done
[[ "${RESULT[*]}" != *FAIL* ]]
