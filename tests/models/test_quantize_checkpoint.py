"""``check_checkpoint``: a block size the model's shapes cannot take is refused from the model's config alone, before
any weight is read, whatever form the model path takes: a checkpoint directory, a ``.gguf`` file, the embedded
default (``model.path`` null) and a Hub id in the local Hub cache."""

from __future__ import annotations

import os

import pytest
from huggingface_hub import constants

from jaxalign.cli import main
from jaxalign.models import default_model_path, gguf_io, hf_io
from jaxalign.models.quantize import QuantizeConfig, check_checkpoint
from tests.models.conftest import make_hf_model
from tests.models.gguf_files import write_llama_gguf
from tests.models.hub_cache import add_snapshot

FITS = QuantizeConfig(type="nf4", block_size=16)  # the tiny models' widths are 32 and 64
TOO_WIDE = QuantizeConfig(type="nf4", block_size=64)
REFUSED = r"QuantizeConfig.block_size=64 does not divide the input dimension 32 of model/layers/"


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    for module in (hf_io, gguf_io):
        monkeypatch.setattr(module, "model_from_tensors", lambda *_, **__: pytest.fail("weights were read"))


def test_a_checkpoint_directory(tmp_path):
    make_hf_model("llama").config.save_pretrained(tmp_path)  # config.json only: no weights to read
    check_checkpoint(tmp_path, FITS)
    with pytest.raises(ValueError, match=REFUSED):
        check_checkpoint(tmp_path, TOO_WIDE)


def test_a_gguf_file(tmp_path):
    path = write_llama_gguf(make_hf_model("llama"), tmp_path / "tiny.gguf")
    check_checkpoint(path, FITS)
    with pytest.raises(ValueError, match=REFUSED):
        check_checkpoint(path, TOO_WIDE)


@pytest.fixture
def embedded_default():
    try:
        default_model_path()
    except FileNotFoundError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))


@pytest.mark.smollm2
def test_the_embedded_default(embedded_default):
    check_checkpoint(None, QuantizeConfig(type="nf4", block_size=64))  # 576 and 1536 inputs: blocks of 64 fit
    with pytest.raises(ValueError, match=r"QuantizeConfig.block_size=100 does not divide the input dimension"):
        check_checkpoint(None, QuantizeConfig(type="nf4", block_size=100))


@pytest.mark.smollm2
def test_a_run_on_the_embedded_default_is_refused_before_it_loads(embedded_default, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "dpo", "--config", "sentiment", "model.quantize={type: nf4, block_size: 100}",
                 "model.lora={rank: 2, alpha: 4}", f"output_dir={out}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "model.quantize.block_size=100 does not divide the input dimension" in error[0], error
    assert not out.exists()


def test_a_hub_id_in_the_local_cache_at_its_revision(tmp_path, monkeypatch):
    config = make_hf_model("llama").config
    config.save_pretrained(tmp_path / "main")
    config.intermediate_size = 40  # tag v1: a down_proj input that blocks of 16 do not divide
    config.save_pretrained(tmp_path / "v1")
    add_snapshot(tmp_path / "home", "org/tiny", tmp_path / "main", "1" * 40)
    add_snapshot(tmp_path / "home", "org/tiny", tmp_path / "v1", "2" * 40, refs=("v1",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "home" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_checkpoint("org/tiny", FITS)
    with pytest.raises(ValueError, match=REFUSED):
        check_checkpoint("org/tiny", TOO_WIDE)
    with pytest.raises(ValueError, match=r"block_size=16 does not divide the input dimension 40 of "
                                         r"model/layers/mlp/down_proj"):
        check_checkpoint("org/tiny", FITS, revision="v1")
    check_checkpoint("org/absent", TOO_WIDE)  # not cached: checked once downloaded and loaded


def test_an_unreadable_model_is_left_to_its_loading(tmp_path):
    """Its loading names what is wrong with it; the check must not report it as a quantisation error."""
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    check_checkpoint(tmp_path / "broken.gguf", TOO_WIDE)
    check_checkpoint(tmp_path / "missing.gguf", TOO_WIDE)
