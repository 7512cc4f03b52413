"""What of the GPU paths can be checked without a GPU: the TE-spec parameter names and tools/gpu_check.sh itself.
The GPU paths themselves have not run (README, "GPU paths not yet run"); tools/gpu_check.sh runs them on a GPU."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("te, local", [
    ("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.3.input_layernorm.weight"),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "decoder.layers.0.pre_mlp_layernorm.weight"),
    ("decoder.layers.1.mlp.experts.linear_fc1.weight7",
     "decoder.layers.1.mlp.experts.local_experts.7.linear_fc1.weight"),
    ("decoder.layers.1.mlp.experts.linear_fc2.weight12",
     "decoder.layers.1.mlp.experts.local_experts.12.linear_fc2.weight"),
    ("decoder.layers.1.self_attention.q_layernorm.weight", "decoder.layers.1.self_attention.q_layernorm.weight"),
    ("decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight",
     "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"),
    ("output_layer.weight", "output_layer.weight"),
])
def test_transformer_engine_names_map_to_the_local_spec(te, local):
    from upgrpo_megatron.megatron.sharding import local_spec_name

    assert local_spec_name(te) == local


def test_gpu_check_script_parses_and_its_python_compiles():
    script = ROOT / "tools" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bodies = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", script.read_text(), re.S)
    assert len(bodies) == 3
    for i, body in enumerate(bodies):
        compile(body, f"gpu_check.sh heredoc {i}", "exec")


@pytest.mark.parametrize("on_gpu, native, expected", [(True, True, "1"), (True, False, None), (False, True, None)])
def test_native_routing_capture_asks_for_vllms_v2_model_runner(monkeypatch, on_gpu, native, expected):
    # vLLM 0.32 refuses enable_return_routed_experts without its V2 model runner (seen on CPU, where that runner
    # needs Triton: there routing is captured by replay); the GPU engine sets the variable when it asks for it
    import os

    from upgrpo_megatron.rollout import engine_process

    env = {k: v for k, v in os.environ.items() if k != engine_process.V2_RUNNER_ENV}
    monkeypatch.setattr(os, "environ", env)  # _engine_env writes here, not into the test process's environment
    engine_process._engine_env(on_gpu, native_routing=native)
    assert env.get(engine_process.V2_RUNNER_ENV) == expected
