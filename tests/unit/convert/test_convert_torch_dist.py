"""The direct torch_dist writer/reader of the conversion tools (`convert/torch_dist/`) against megatron's own
`dist_checkpointing`: the layout it writes is the one megatron saves (keys, global shapes, chunks, dtypes, byte
objects) for both architectures, megatron loads what it writes into a model bit-exactly, it reads megatron's
checkpoints bit-exactly, its archives are byte-for-byte what `torch.save` writes, and a corrupt or foreign
checkpoint is refused without writing anything."""
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from tests.distributed.worker_convert import make_tiny_hf
from upgrpo_megatron.convert import ConversionError, HFReader, canonical_names, hf_config_to_model_cfg, hf_to_megatron
from upgrpo_megatron.convert import torch_dist as td

pytestmark = pytest.mark.slow


def _cfg(hf_dir):
    return hf_config_to_model_cfg(json.loads((Path(hf_dir) / "config.json").read_text()))


@pytest.fixture(scope="module")
def megatron_saved(tmp_path_factory):
    """Per architecture: an HF dir, the model built from it and megatron's own `dist_checkpointing.save`."""
    from megatron.core import dist_checkpointing

    from upgrpo_megatron.convert import load_hf_into_model
    from upgrpo_megatron.megatron.model import build_gpt_model
    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes())
    d = tmp_path_factory.mktemp("torch_dist")
    out = {}
    for arch, dtype in (("qwen3_moe", torch.float32), ("qwen2_moe", torch.bfloat16)):
        hf = make_tiny_hf(arch, d / arch / "hf", dtype=dtype, first_k_dense=1)
        cfg = _cfg(hf)
        model = build_gpt_model(cfg, dtype=cfg.dtype)
        load_hf_into_model(hf, model, cfg)
        (d / arch / "megatron").mkdir()
        dist_checkpointing.save(model.sharded_state_dict(), str(d / arch / "megatron"))
        out[arch] = (Path(hf), cfg, model, d / arch)
    return out


def _layout(model_dir):
    meta = td.TorchDistReader(model_dir).meta.state_dict_metadata
    out = {}
    for k, v in meta.items():
        if hasattr(v, "chunks"):
            out[k] = (v.properties.dtype, tuple(v.size), sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks))
        else:
            out[k] = "bytes"
    return out


def _write(hf_dir, cfg, out_dir):
    hf = HFReader(hf_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    return td.write_model(out_dir, cfg, dtype, ((n, hf_to_megatron(n, hf.get, cfg)) for n in canonical_names(cfg)))


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_written_layout_is_megatrons_and_megatron_loads_it_bit_exactly(megatron_saved, arch, tmp_path):
    from megatron.core import dist_checkpointing

    hf, cfg, model, d = megatron_saved[arch]
    sums = _write(hf, cfg, tmp_path / "model")
    assert _layout(tmp_path / "model") == _layout(d / "megatron")
    assert set(sums) == {f"model/{n}" for n in td.DISTCP_FILES}
    # megatron's loader reads it into the model; every parameter equals the HF weights loaded directly
    expected = {k: v.clone() for k, v in model.state_dict().items() if v is not None and torch.is_tensor(v)}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(tmp_path / "model")))
    for k, v in model.state_dict().items():
        if torch.is_tensor(v) and k in expected:
            assert torch.equal(v, expected[k]), k


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_reader_reads_megatrons_checkpoint_bit_exactly(megatron_saved, arch):
    hf, cfg, _, d = megatron_saved[arch]
    reader, src = td.TorchDistReader(d / "megatron"), HFReader(hf)
    placements, _ = td.plan(cfg)
    for p in placements:
        lead = (1,) * (len(p.offset) - len(p.shape))
        got = reader.read(p.key, p.offset, lead + p.shape).reshape(p.shape)
        assert torch.equal(got, hf_to_megatron(p.name, src.get, cfg)), p.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (1, 16, 8), (2, 3, 4, 5)])
def test_archives_are_what_torch_save_writes(dtype, shape):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g).to(dtype)
    template = td.writer._ArchiveTemplate(dtype, shape)
    assert template.usable
    mine = b"".join(bytes(p) for p in template.parts(t))
    buf = io.BytesIO()
    torch.save(t, buf)
    assert mine == buf.getvalue()
    assert zipfile.ZipFile(io.BytesIO(mine)).testzip() is None
    assert torch.equal(td.reader._tensor_from_archive(bytearray(mine), 0, len(mine)), t)


def test_a_checkpoint_the_direct_reader_cannot_decode_is_exported_through_megatron(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from upgrpo_megatron.convert.megatron_io import convert_hf_to_megatron, convert_megatron_to_hf

    hf = make_tiny_hf("qwen3_moe", tmp_path / "hf")
    convert_hf_to_megatron(hf, tmp_path / "ck", show_progress=False)

    def refuse(*a, **k):
        raise td.UnsupportedCheckpoint("pretend this archive is compressed")

    monkeypatch.setattr(td.reader, "_archive_layout", refuse)
    convert_megatron_to_hf(tmp_path / "ck", tmp_path / "export", show_progress=False)
    a, b = load_file(str(Path(hf) / "model.safetensors")), load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_corrupt_shard_is_refused_and_nothing_is_written(tmp_path):
    from upgrpo_megatron.convert.megatron_io import convert_hf_to_megatron, convert_megatron_to_hf

    hf = make_tiny_hf("qwen3_moe", tmp_path / "hf")
    ck = convert_hf_to_megatron(hf, tmp_path / "ck", show_progress=False)
    f = ck / "model" / td.DISTCP_FILES[0]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside some tensor's data
    f.write_bytes(bytes(raw))
    with pytest.raises(ConversionError, match=r"__0_0\.distcp does not match its checksum"):
        convert_megatron_to_hf(ck, tmp_path / "export", show_progress=False)
    assert not (tmp_path / "export").exists()
    assert not any(p.name.startswith(".export") for p in tmp_path.iterdir())


def test_metadata_holding_a_foreign_class_is_refused_without_unpickling_it(tmp_path):
    from upgrpo_megatron.convert.megatron_io import convert_hf_to_megatron

    hf = make_tiny_hf("qwen3_moe", tmp_path / "hf")
    ck = convert_hf_to_megatron(hf, tmp_path / "ck", show_progress=False)
    (ck / "model" / ".metadata").write_bytes(pickle.dumps({"payload": shutil.rmtree}))
    with pytest.raises(ConversionError, match="refusing to unpickle shutil.rmtree"):
        td.TorchDistReader(ck / "model")


def test_hf_tensors_are_read_in_place_and_writing_a_view_leaves_the_file_alone(tmp_path):
    from safetensors import safe_open

    hf = make_tiny_hf("qwen2_moe", tmp_path / "hf", dtype=torch.bfloat16)
    reader = HFReader(hf)
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(Path(hf) / "model.safetensors"), "pt") as h:
        ref = {k: h.get_tensor(k) for k in h.keys()}
    for k, v in ref.items():
        got = reader.get(k)
        assert got.dtype == v.dtype and torch.equal(got, v), k
    reader.get(name).fill_(7)  # a private copy-on-write mapping: the file does not change
    with safe_open(str(Path(hf) / "model.safetensors"), "pt") as h:
        assert torch.equal(h.get_tensor(name), ref[name])
