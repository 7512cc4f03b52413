"""Every recipe key is read by the code (or refused): a key nobody reads is a setting that silently does nothing."""
import dataclasses
import re
from pathlib import Path

from upgrpo_megatron.config import RecipeConfig

PKG = Path(__file__).resolve().parents[3] / "upgrpo_megatron"
# keys kept in the schema only to be refused with a message (a recipe from another framework may set them)
REFUSED = {"trainer.wandb"}


def _leaf_keys():
    cfg = RecipeConfig()
    for sec in dataclasses.fields(cfg):
        if sec.metadata.get("internal"):
            continue
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            yield sec.name, f.name


def test_every_recipe_key_is_read_outside_the_schema():
    # reads: `<section>.<key>` attribute access, or the key as a string (the model section is also read by name)
    sources = "\n".join(p.read_text() for p in PKG.rglob("*.py")
                        if p.parent.name != "config")
    unread = [f"{sec}.{key}" for sec, key in _leaf_keys()
              if not re.search(rf"\.{key}\b|[\"']{key}[\"']", sources)]
    assert sorted(unread) == sorted(REFUSED), f"recipe keys no code reads: {sorted(set(unread) - REFUSED)}"


def test_a_setting_that_is_not_built_in_is_refused_not_ignored():
    import pytest

    from upgrpo_megatron.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match="trainer.wandb=True .*not built in"):
        load_recipe(PKG.parent / "recipes" / "qwen_moe.yaml", ["trainer.wandb=true"])
