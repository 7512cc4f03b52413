"""HF checkpoints in our Megatron model at TP=1, TP=2 (+SP) and EP=2 give transformers' logits; a training
checkpoint written by 4 ranks at TP=2 x EP=2 exports to HF in one process, bit-identically, and re-loads at
TP=1. Real megatron-core + dist_checkpointing under torchrun/gloo; tiny random models made here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker_convert.py")
ARCHS = ("qwen3_moe", "qwen2_moe")
LAYOUTS = {"tp1": (1, 1, 1), "tp2_sp": (2, 2, 1), "ep2": (2, 1, 2)}
# fp32 everywhere; what remains is summation order across TP shards (measured max |diff| ~1e-6)
ATOL, RTOL = 2e-5, 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random HF models of both architectures, a batch, and transformers' fp32 logits for it."""
    import transformers

    from tests.distributed.worker_convert import make_tiny_hf

    d = tmp_path_factory.mktemp("convert_layouts")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.save(ids, d / "ids.pt")
    dirs, ref = {}, {}
    for i, arch in enumerate(ARCHS):
        dirs[arch] = make_tiny_hf(arch, d / arch, seed=i)
        m = transformers.AutoModelForCausalLM.from_pretrained(dirs[arch], dtype=torch.float32).eval()
        with torch.no_grad():
            ref[arch] = m(ids).logits
    return d, dirs, ref


def _max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_of_hf_weights_in_megatron_match_transformers(models, layout, torchrun):
    d, dirs, ref = models
    nproc, tp, ep = LAYOUTS[layout]
    out = d / f"logits_{layout}.pt"
    torchrun(WORKER, nproc, ["logits", "--hf", *dirs.values(), "--tp", str(tp), "--ep", str(ep),
                             "--inputs", str(d / "ids.pt"), "--out", str(out)], timeout=600)
    got = torch.load(out, weights_only=True)
    for arch in ARCHS:
        print(f"{layout} {arch}: max |logits - transformers| = {_max_diff(got[dirs[arch]], ref[arch]):.3g}")
        torch.testing.assert_close(got[dirs[arch]], ref[arch], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, arch=arch: f"{arch}: {m}")


def _tensors(hf_dir):
    from safetensors import safe_open

    index = Path(hf_dir) / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(Path(hf_dir) / f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_tp2_ep2_training_checkpoint_exports_in_one_process_and_reloads_at_tp1(models, torchrun):
    d, dirs, ref = models
    ckpts = d / "ckpt_tp2_ep2"
    torchrun(WORKER, 4, ["save", "--hf", *dirs.values(), "--tp", "2", "--ep", "2", "--out", str(ckpts)], timeout=600)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for arch in ARCHS:
        ck = ckpts / arch
        meta = json.loads((ck / "metadata.json").read_text())
        assert (meta["world_size"], meta["tp"], meta["ep"], meta["step"]) == (4, 2, 2, 3)
        # a training checkpoint: per-rank Adam state, readable without unpickling code
        for r in range(4):
            state = torch.load(ck / "optim" / f"rank_{r}.pt", weights_only=True)
            assert state, f"rank {r} optimizer state is empty"
        # export in a single plain process (no torchrun)
        out = d / f"export_{arch}"
        proc = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--checkpoint", str(ck),
                               "--out", str(out), "--no-progress"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        src, got = _tensors(dirs[arch]), _tensors(out)
        assert set(got) == set(src)
        for k in src:  # lr=0 Adam step: the weights are still exactly the HF ones
            assert got[k].dtype == src[k].dtype and torch.equal(got[k], src[k]), f"{arch}: {k} differs"
        assert json.loads((out / "config.json").read_text())["model_type"] == arch
    # re-load the 4-rank checkpoints at TP=1 in one rank: transformers' logits again
    out = d / "reload_tp1.pt"
    torchrun(WORKER, 1, ["load", "--ckpt", *(str(ckpts / a) for a in ARCHS), "--inputs", str(d / "ids.pt"),
                         "--out", str(out)], timeout=600)
    got = torch.load(out, weights_only=True)
    for arch in ARCHS:
        r = got[str(ckpts / arch)]
        assert r["extra"]["step"] == 3
        print(f"tp2xep2 -> tp1 {arch}: max |logits - transformers| = {_max_diff(r['logits'], ref[arch]):.3g}")
        torch.testing.assert_close(r["logits"], ref[arch], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, arch=arch: f"{arch}: {m}")


def test_converted_checkpoint_loads_at_tp2_ep2_with_transformers_logits(models, torchrun):
    """HF -> Megatron in one process (streamed into the torch_dist files, no model built) -> megatron's
    `load_checkpoint` at TP=2 x EP=2 on 4 ranks: the logits are transformers'."""
    from upgrpo_megatron.convert.megatron_io import convert_hf_to_megatron

    d, dirs, ref = models
    ckpts = {arch: convert_hf_to_megatron(dirs[arch], d / f"converted_{arch}", show_progress=False) for arch in ARCHS}
    out = d / "converted_tp2_ep2.pt"
    torchrun(WORKER, 4, ["load", "--ckpt", *(str(ckpts[a]) for a in ARCHS), "--tp", "2", "--ep", "2",
                         "--inputs", str(d / "ids.pt"), "--out", str(out)], timeout=600)
    got = torch.load(out, weights_only=True)
    for arch in ARCHS:
        r = got[str(ckpts[arch])]
        print(f"converted -> tp2xep2 {arch}: max |logits - transformers| = {_max_diff(r['logits'], ref[arch]):.3g}")
        torch.testing.assert_close(r["logits"], ref[arch], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, arch=arch: f"{arch}: {m}")
