"""Saving and loading SAEs: a save → load round trip gives identical encode/decode outputs for every
architecture, sae-lens's own ``SAE.load_from_disk`` reads the folder, provenance is recorded and its
hashes are checked, plain sae-lens folders and training checkpoints load, damaged files fail clearly."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from sae_lens import SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

import mechkit
from mechkit.errors import MechkitError
from mechkit.sae.config import ARCHITECTURES, TrainConfig
from mechkit.sae.io import PROVENANCE_FILE, load_sae, save_sae, to_inference
from mechkit.sae.train import latest_checkpoint, train_sae
from tests.conftest import tiny_hf_model

SITE = "blocks.0.resid_post"
X = torch.randn(1024, 16, generator=torch.Generator().manual_seed(0))


def outputs(sae, x=X):
    with torch.no_grad():
        z = sae.encode(x)
        return z, sae.decode(z)


def assert_same_outputs(a, b, x=X):
    for p, q in zip(outputs(a, x), outputs(b, x)):
        assert torch.equal(p, q)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def trained(request):
    cfg = TrainConfig(architecture=request.param, d_sae=32, k=4, l1_coefficient=0.1, l0_coefficient=0.1,
                      tokens=2048, batch_size=256, progress=False)
    return cfg, train_sae(X, SITE, cfg)


def test_a_round_trip_gives_identical_outputs_and_sae_lens_reads_the_folder(trained, tmp_path):
    cfg, sae = trained
    folder = save_sae(sae, tmp_path / "sae", site=SITE, model="tiny-gpt2", config=cfg)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", PROVENANCE_FILE, "sae_weights.safetensors"]
    loaded, provenance = load_sae(folder)
    assert type(loaded) is type(sae)
    assert_same_outputs(loaded, sae)
    assert_same_outputs(SAE.load_from_disk(folder), sae)  # sae-lens alone, mechkit.json ignored
    assert provenance.site == SITE and provenance.model == "tiny-gpt2" and provenance.train_config == cfg
    assert provenance.weights_sha256 == hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()
    assert set(provenance.versions) == {"mechkit", "sae_lens", "torch"}
    assert provenance.versions["torch"] == torch.__version__


def test_a_training_sae_is_saved_as_the_inference_sae_sae_lens_would_save(tmp_path):
    torch.manual_seed(0)
    for training in (TopKTrainingSAE(TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4)),
                     BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=16, d_sae=32, k=4))):
        with torch.no_grad():
            for p in training.parameters():
                p.add_(0.1 * torch.randn_like(p))  # decoder rows of unequal norms: folding them matters
        if isinstance(training, BatchTopKTrainingSAE):
            training.topk_threshold.fill_(0.05)
        name = training.cfg.architecture()
        training.save_inference_model(tmp_path / f"{name}-sae-lens")
        reference = SAE.load_from_disk(tmp_path / f"{name}-sae-lens")
        in_memory = to_inference(training)
        assert_same_outputs(in_memory, reference)
        assert_same_outputs(load_sae(save_sae(training, tmp_path / name)).sae, reference)
    # TopK: the training SAE's own outputs, up to the rounding of the folded decoder norms
    top_k = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4))
    for a, b in zip(outputs(top_k.eval()), outputs(to_inference(top_k))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_train_sae_from_a_model_writes_its_final_sae_with_provenance(tmp_path):
    model = mechkit.load(tiny_hf_model("gpt2"))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]] * 4
    sae = train_sae(model, SITE, prompts=prompts, out_dir=str(tmp_path), d_sae=32, k=4, tokens=256, batch_size=16,
                    progress=False)
    assert (tmp_path / "activations" / "manifest.json").is_file()  # collected once, into a store
    loaded, provenance = load_sae(tmp_path / "sae")
    assert_same_outputs(loaded, sae, torch.randn(8, 32))
    assert provenance.site == SITE and provenance.model == model.info.name
    assert provenance.record["backend"] == model.backend and provenance.record["sites"] == [SITE]
    assert provenance.train_config.out_dir == str(tmp_path)
    # the sae-lens training checkpoint of the same run loads as the same inference SAE
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "final_256"
    loaded, none = load_sae(checkpoint)
    assert none is None
    assert_same_outputs(loaded, sae, torch.randn(8, 32))


def test_a_plain_sae_lens_folder_loads_without_provenance(trained, tmp_path):
    _, sae = trained
    sae.save_model(tmp_path / "plain")  # as sae-lens writes it: no mechkit.json
    loaded, provenance = load_sae(tmp_path / "plain")
    assert provenance is None
    assert_same_outputs(loaded, sae)


def test_damaged_folders_fail_clearly_naming_the_file(tmp_path):
    sae = train_sae(X, d_sae=32, k=4, tokens=512, batch_size=256, progress=False)
    folder = save_sae(sae, tmp_path / "sae", site=SITE)
    weights, cfg, record = (folder / n for n in ("sae_weights.safetensors", "cfg.json", PROVENANCE_FILE))
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(MechkitError, match=r"sae_weights.safetensors does not match the sha256.*save the SAE again"):
        load_sae(folder)
    record.unlink()  # a plain folder: the truncation is found by reading the file
    with pytest.raises(MechkitError, match=r"sae_weights.safetensors cannot be read .*truncated or corrupt"):
        load_sae(folder)
    weights.write_bytes(blob)
    text = cfg.read_text()
    cfg.write_text(text[: len(text) // 2])
    with pytest.raises(MechkitError, match=r"cfg.json is unreadable .*truncated or corrupt"):
        load_sae(folder)
    cfg.write_text(json.dumps({**json.loads(text), "d_in": 17}))  # readable, but not these weights
    with pytest.raises(MechkitError, match=r"(?s)sae-lens cannot load the SAE in .*cfg.json matches sae_weights"):
        load_sae(folder)
    cfg.write_text(text)
    record.write_text("{")
    with pytest.raises(MechkitError, match=r"mechkit.json is unreadable.*delete it to load the folder as a plain"):
        load_sae(folder)
    record.unlink()
    assert_same_outputs(load_sae(folder).sae, sae)  # repaired
    cfg.unlink()
    with pytest.raises(MechkitError, match=r"has no cfg.json"):
        load_sae(folder)
    with pytest.raises(MechkitError, match="no SAE folder"):
        load_sae(tmp_path / "missing")


def test_save_refuses_what_it_cannot_save(tmp_path):
    sae = train_sae(X, d_sae=32, k=4, tokens=512, batch_size=256, progress=False)
    with pytest.raises(MechkitError, match="sae-lens SAEs"):
        save_sae(torch.nn.Linear(2, 2), tmp_path / "x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(MechkitError, match="does not hold an SAE"):
        save_sae(sae, tmp_path / "other")
    with pytest.raises(TypeError, match="TrainConfig"):
        save_sae(sae, tmp_path / "y", config={"k": 4})
    first = save_sae(sae, tmp_path / "sae")
    other = train_sae(X, d_sae=32, k=4, tokens=512, batch_size=256, seed=1, progress=False)
    assert_same_outputs(load_sae(save_sae(other, first)).sae, other)  # an SAE folder is overwritten whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
