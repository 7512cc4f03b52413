"""The two conversion tools as a user runs them (plain `python tools/...`, one process each):
HF -> Megatron -> HF is bit-identical for every tensor of both architectures (fp32 and bf16, a dense first
layer, a sharded export), the export loads in transformers with the same logits, tokenizer and token ids come
along; bad input gives one clear line and writes nothing."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.distributed.worker_convert import make_tiny_hf
from upgrpo_megatron.convert import ConversionError

pytestmark = pytest.mark.slow

ENV = dict(os.environ, OMP_NUM_THREADS="1", UPGRPO_NO_PROGRESS="1")


def _tool(*args, check=True):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _tensors(hf_dir):
    from safetensors import safe_open

    index = Path(hf_dir) / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out = {}
    for f in files:
        with safe_open(str(Path(hf_dir) / f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


CASES = {  # arch, dtype, dense first layers, export shard size (GiB; tiny -> several shards + index)
    "qwen3_moe_fp32_dense0": ("qwen3_moe", torch.float32, 1, 2.0),
    "qwen2_moe_bf16_sharded": ("qwen2_moe", torch.bfloat16, 0, 0.0001),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_megatron_to_hf_round_trip_is_bit_identical(case, tmp_path):
    import transformers

    arch, dtype, dense, shard_gb = CASES[case]
    src = make_tiny_hf(arch, tmp_path / "hf", dtype=dtype, first_k_dense=dense)
    ck, out = tmp_path / "ckpt", tmp_path / "export"
    _tool("tools/convert_hf_to_megatron.py", "--hf", src, "--out", str(ck), "--tp", "2", "--ep", "2")
    assert (ck / "COMPLETE").exists() and (ck / "tokenizer" / "tokenizer_config.json").exists()
    _tool("tools/convert_megatron_to_hf.py", "--checkpoint", str(ck), "--out", str(out),
          "--max-shard-gb", str(shard_gb))

    a, b = _tensors(src), _tensors(out)
    assert set(a) == set(b)
    for k in a:
        assert b[k].dtype == a[k].dtype and torch.equal(b[k], a[k]), k
    assert (out / "model.safetensors.index.json").exists() == (shard_gb < 1)
    assert (out / "tokenizer_config.json").read_text() == (Path(src) / "tokenizer_config.json").read_text()
    cfg, cfg0 = json.loads((out / "config.json").read_text()), json.loads((Path(src) / "config.json").read_text())
    for k in ("model_type", "bos_token_id", "eos_token_id", "pad_token_id", "num_key_value_heads", "mlp_only_layers"):
        assert cfg[k] == cfg0[k], k
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits
    assert torch.equal(got, ref)


# ---------------------------------------------------------------- bad input: clear error, nothing written
@pytest.fixture
def hf_dir(tmp_path):
    return Path(make_tiny_hf("qwen3_moe", tmp_path / "hf", tokenizer_file=False))


def _convert(hf, out):
    from upgrpo_megatron.convert.megatron_io import convert_hf_to_megatron

    return convert_hf_to_megatron(hf, out, show_progress=False)


def test_missing_safetensors_is_refused(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="no model.safetensors"):
        _convert(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors_is_refused_naming_the_file(hf_dir, tmp_path):
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ConversionError, match="model.safetensors"):
        _convert(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    t = load_file(hf_dir / "model.safetensors")
    del t["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(t, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        _convert(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensor_shape_that_does_not_fit_the_config_is_named(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    t = load_file(hf_dir / "model.safetensors")
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)  # config: 2 kv heads x 16 = 32 rows
    save_file(t, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[48, 64\]"):
        _convert(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_refused_by_name(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"])
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="unsupported architecture model_type='deepseek_v3'"):
        _convert(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layout_that_does_not_divide_the_model_is_refused(hf_dir, tmp_path):
    from upgrpo_megatron.convert.megatron_io import convert_hf_to_megatron

    with pytest.raises(ConversionError, match="num_experts=4 is not divisible by --ep 3"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out", ep=3, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_incomplete_checkpoint_is_refused_for_export(tmp_path):
    from upgrpo_megatron.convert.megatron_io import convert_megatron_to_hf

    ck = tmp_path / "ckpt"
    (ck / "model").mkdir(parents=True)
    (ck / "model_config.yaml").write_text("architecture: qwen3_moe\n")
    with pytest.raises(ConversionError, match="no COMPLETE marker"):
        convert_megatron_to_hf(ck, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_non_empty_output_with_one_line_and_exit_2(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (tmp_path / "ckpt").mkdir()
    for tool, flag, src in (("tools/convert_hf_to_megatron.py", "--hf", hf_dir),
                            ("tools/convert_megatron_to_hf.py", "--checkpoint", tmp_path / "ckpt")):
        proc = _tool(tool, flag, str(src), "--out", str(out), check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: output directory") and "--force" in last and "Traceback" not in proc.stderr
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# ---------------------------------------------------------------- --force never destroys the tool's own input
def _snapshot(d: Path) -> dict:
    """Every file's bytes and every directory under d (an added or removed folder counts as a change)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def _one_error_line(proc) -> str:
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return err[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory as training leaves it: metrics and a complete checkpoint (converted from a tiny HF model,
    with an optimizer file beside the model as a training checkpoint has)."""
    root = tmp_path_factory.mktemp("overlap")
    src = make_tiny_hf("qwen3_moe", root / "hf")
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 60, "val/acc": 0.7}\n')
    _tool("tools/convert_hf_to_megatron.py", "--hf", src, "--out", str(run / "checkpoints" / "step_000060"))
    (run / "checkpoints" / "step_000060" / "optim" / "rank_0.pt").write_bytes(b"adam moments")
    (root / "run_link").symlink_to(run, target_is_directory=True)
    return root


# --out relative to the workspace: the checkpoint's run (above it), the checkpoint itself, its checkpoints/
# folder, a folder inside it, and the run through a symlink
EXPORT_OVERLAPS = {
    "out_is_the_run_above_the_checkpoint": ("run/checkpoints/step_000060", "run", "contains"),
    "out_is_the_checkpoint": ("run/checkpoints/step_000060", "run/checkpoints/step_000060", "is"),
    "out_is_the_checkpoints_folder_given": ("run/checkpoints", "run/checkpoints", "is"),
    "out_inside_the_checkpoint": ("run/checkpoints/step_000060", "run/checkpoints/step_000060/hf", "lies inside"),
    "out_is_the_run_through_a_symlink": ("run/checkpoints/step_000060", "run_link", "contains"),
}


@pytest.mark.parametrize("case", list(EXPORT_OVERLAPS))
def test_export_with_force_refuses_an_out_that_is_holds_or_lies_in_the_checkpoint(trained_run, case):
    ckpt, out, relation = EXPORT_OVERLAPS[case]
    ckpt, out = str(trained_run / ckpt), str(trained_run / out)
    before = _snapshot(trained_run)
    proc = _tool("tools/convert_megatron_to_hf.py", "--checkpoint", ckpt, "--out", out, "--force", check=False)
    line = _one_error_line(proc)
    assert f"--out {out} {relation} the input --checkpoint {ckpt}" in line
    assert _snapshot(trained_run) == before  # the checkpoint, its optimizer state and the run: byte-identical


def test_input_check_skips_what_a_crash_leaves_beside_the_checkpoints(trained_run):
    """A checkpoint write cut by a crash (.step_N.tmp, half a JSON file) does not stop an export of the run's
    newest complete checkpoint; the same bytes in a checkpoint that is used are refused with file and line."""
    from upgrpo_megatron.paths import ToolInputError, check_input_files

    partial = trained_run / "run" / "checkpoints" / ".step_000070.tmp"
    partial.mkdir()
    try:
        (partial / "metadata.json").write_text('{"format_version": 1, "st')
        check_input_files(trained_run / "run" / "checkpoints", "--checkpoint", recursive=True)
        with pytest.raises(ToolInputError, match=r"metadata.json line 1: invalid JSON"):
            check_input_files(partial, "--checkpoint", recursive=True)
    finally:
        shutil.rmtree(partial)


@pytest.mark.parametrize("relation", ["is", "lies inside", "contains"])
def test_import_with_force_refuses_an_out_that_is_holds_or_lies_in_the_hf_dir(tmp_path, relation):
    hf = Path(make_tiny_hf("qwen3_moe", tmp_path / "models" / "hf"))
    out = {"is": hf, "lies inside": hf / "ckpt", "contains": hf.parent}[relation]
    before = _snapshot(tmp_path)
    proc = _tool("tools/convert_hf_to_megatron.py", "--hf", str(hf), "--out", str(out), "--force", check=False)
    assert f"--out {out} {relation} the input --hf {hf}" in _one_error_line(proc)
    assert _snapshot(tmp_path) == before  # today's code replaced the model with the checkpoint


# ---------------------------------------------------------------- the standalone export matches the trainer's
TINY_HF_CONFIG = {"model_type": "qwen3_moe", "vocab_size": 32, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96,
                  "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
                  "max_position_embeddings": 64}


def write_training_checkpoint_and_trainer_export(root: str) -> None:
    """What a run leaves (run in a subprocess: it makes a process group): a training checkpoint saved with the
    run's tokenizer, as `Trainer._save_checkpoint` does, and the trainer's own HF export of the same weights
    (`Trainer._finish`: save_hf_checkpoint with the live tokenizer). The weights make EOS the greedy choice at
    every position: a large constant in hidden dim 0 of every embedding keeps the final-norm output's dim 0
    positive, and the output layer reads only that dim, into the EOS row."""
    from upgrpo_megatron.convert import hf_config_to_model_cfg, megatron_to_hf_stream, save_hf_checkpoint
    from upgrpo_megatron.data.tokenizer import build_char_tokenizer
    from upgrpo_megatron.megatron.checkpoint import save_checkpoint
    from upgrpo_megatron.megatron.model import build_gpt_model
    from upgrpo_megatron.megatron.parallel import ParallelSizes, destroy, init_distributed, init_model_parallel
    from upgrpo_megatron.megatron.sharding import iter_full_params

    tok = build_char_tokenizer(TINY_HF_CONFIG["vocab_size"])
    cfg = hf_config_to_model_cfg(TINY_HF_CONFIG)
    init_distributed()
    init_model_parallel(ParallelSizes())
    model = build_gpt_model(cfg)
    with torch.no_grad():
        model.embedding.word_embeddings.weight[:, 0] = 50.0
        model.output_layer.weight.zero_()
        model.output_layer.weight[tok.eos_token_id, 0] = 1.0
    save_checkpoint(Path(root) / "run" / "checkpoints" / "step_000001", model, model_cfg=cfg, tokenizer=tok,
                    extra_state={"step": 1})
    save_hf_checkpoint(cfg, megatron_to_hf_stream(cfg, iter_full_params(model)), Path(root) / "trainer_hf",
                       tokenizer=tok)
    destroy()


def test_standalone_export_writes_the_trainers_token_ids_and_generate_stops_at_eos(tmp_path):
    import transformers

    from upgrpo_megatron.data.tokenizer import build_char_tokenizer

    _tool("-c", f"from tests.unit.convert.test_convert_tools import write_training_checkpoint_and_trainer_export as w; "
                f"w({str(tmp_path)!r})")
    out = tmp_path / "standalone_hf"
    _tool("tools/convert_megatron_to_hf.py", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--out", str(out))

    tok = build_char_tokenizer(TINY_HF_CONFIG["vocab_size"])
    want = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    for name in ("config.json", "generation_config.json"):
        trainer = json.loads((tmp_path / "trainer_hf" / name).read_text())
        standalone = json.loads((out / name).read_text())
        assert {k: trainer.get(k) for k in want} == want, name
        assert {k: standalone.get(k) for k in want} == want, name  # the standalone export left these out

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    prompt = torch.tensor([tok.encode("3+4=")])
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert got == [tok.eos_token_id], got  # one token, EOS, then stop (it ran on to max_new_tokens before)


def test_token_ids_from_tokenizer_files_of_other_layouts(tmp_path):
    """Older tokenizers: special tokens as serialised AddedTokens, ids in added_tokens_decoder or vocab.json."""
    from upgrpo_megatron.convert import TokenizerFiles
    from upgrpo_megatron.convert.token_ids import special_token_ids

    a = tmp_path / "a"
    a.mkdir()
    (a / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": {"content": "</s>"},
        "added_tokens_decoder": {"0": {"content": "<unk>"}, "1": {"content": "<s>"}, "2": {"content": "</s>"}}}))
    (a / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<unk>"}))
    assert special_token_ids(TokenizerFiles.from_dir(a)) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    b = tmp_path / "b"
    b.mkdir()
    (b / "vocab.json").write_text(json.dumps({"hello": 0, "<|endoftext|>": 7}))
    (b / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<none>"}))
    assert special_token_ids(TokenizerFiles.from_dir(b)) == {"eos_token_id": 7}  # an unknown token gets no id
