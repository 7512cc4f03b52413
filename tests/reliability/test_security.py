"""Security: weights come only from safetensors or weights_only torch files; nothing from a recipe, a dataset
or a checkpoint can execute code; the HTML report escapes run text (tests/unit/diagnostics/test_report.py checks that in
a real browser too)."""
import os
import pickle
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("upgrpo_megatron", "tools", "bench") for p in (ROOT / d).rglob("*.py"))

FORBIDDEN = {
    r"\btorch\.load\(": "torch.load outside checkpoint.safe_torch_load",
    r"\bpickle\.loads?\(|\bdill\b|\bcloudpickle\.loads?\(": "unpickling",
    r"(?<![\w.])eval\(|(?<![\w.])exec\(": "eval/exec",
    r"\byaml\.load\(|\byaml\.unsafe_load|yaml\.Loader\b|UnsafeLoader": "yaml.load (only yaml.safe_load)",
    r"trust_remote_code\s*=\s*True": "trust_remote_code=True",
    r"shell\s*=\s*True|os\.system\(": "a shell",
}


def test_no_unsafe_loading_or_code_execution_in_the_sources():
    found = []
    for path in SOURCES:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in FORBIDDEN.items():
                if re.search(pattern, code):
                    if what.startswith("torch.load") and path.name == "checkpoint.py" and "weights_only=True" in code:
                        continue
                    found.append(f"{path.relative_to(ROOT)}:{i}: {what}: {line.strip()}")
    assert not found, "\n".join(found)
    assert len(SOURCES) > 40  # the scan saw the project


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_file_with_code_in_it_is_refused_without_running_it(tmp_path):
    from upgrpo_megatron.megatron.checkpoint import CheckpointError, safe_torch_load

    marker = tmp_path / "pwned"
    evil = tmp_path / "extra.pt"
    with open(evil, "wb") as f:
        pickle.dump({"step": 3, "payload": _Evil(marker)}, f)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        safe_torch_load(evil)
    assert not marker.exists()
    # a plain file of tensors and numbers loads
    import torch

    ok = tmp_path / "ok.pt"
    torch.save({"step": 3, "w": torch.ones(2), "rng": [1, 2]}, ok)
    assert safe_torch_load(ok)["step"] == 3


def test_a_recipe_cannot_construct_python_objects(tmp_path):
    from upgrpo_megatron.config import ConfigError, load_recipe

    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"inherit: {ROOT / 'recipes' / 'qwen_moe.yaml'}\n"
                      f"trainer:\n  run_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        load_recipe(recipe)
    assert not marker.exists()


def test_a_dataset_answer_or_model_output_is_never_evaluated_as_python(tmp_path):
    # math-verify parses answers with sympy's parse_expr (which evaluates), but only after its regexes have
    # cut the text down to digits and arithmetic operators; a Python payload scores 0 and runs nothing
    pytest.importorskip("math_verify")
    from upgrpo_megatron.data.math_dataset import math_verify_reward

    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    assert math_verify_reward(payload, "2") == 0.0
    assert math_verify_reward("The answer is $2$", payload) == 0.0
    assert not marker.exists()


def test_every_error_class_is_a_user_error_that_prints_as_one_line():
    import importlib
    import pkgutil

    import upgrpo_megatron
    from upgrpo_megatron.errors import UpgrpoError

    classes = []
    for mod in pkgutil.walk_packages(upgrpo_megatron.__path__, "upgrpo_megatron."):
        if mod.name.endswith("vllm_plugin"):
            continue
        m = importlib.import_module(mod.name)
        classes += [v for v in vars(m).values() if isinstance(v, type) and issubclass(v, Exception)
                    and v.__module__ == m.__name__]
    assert len(classes) >= 8
    assert [c.__name__ for c in classes if not issubclass(c, UpgrpoError)] == []
