"""Result base class: frozen, save/load round trip through safetensors + JSON, registry, errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import Tensor

import mechkit
from mechkit import viz
from mechkit.errors import MechkitError
from mechkit.results import Result, provenance
from tests.conftest import tiny_hf_model


@dataclasses.dataclass(frozen=True, eq=False)
class LayerScores(Result):
    """A toy analysis result: one score per layer, plus assorted metadata."""

    scores: Tensor
    layers: list[int]
    extras: dict = dataclasses.field(default_factory=dict)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "score": self.scores.tolist()})

    def _plot(self, fig, title="scores"):
        ax = fig.add_subplot()
        ax.plot(self.layers, self.scores.tolist())
        viz.label(ax, x="layer", y="score", title=title)


@dataclasses.dataclass(frozen=True, eq=False)
class Bare(Result):
    value: int


def _example() -> LayerScores:
    model = mechkit.load(tiny_hf_model("gpt2"))
    return LayerScores(
        torch.tensor([0.5, 0.25, 0.125]),
        [0, 1, 2],
        extras={
            "per_head": torch.arange(12, dtype=torch.int64).reshape(3, 4),
            "halves": [torch.ones(2, dtype=torch.float16), None, "text", 3, 1.5, True],
            "pair": (1, torch.zeros(1, dtype=torch.bfloat16)),
            "weird": [math.inf, -math.inf, math.nan],
            "nested": {"a": {"b": torch.tensor(7.0)}},
            "a.b": torch.tensor(1),  # its tensor path collides with the nested one above
        },
        config={"sites": ["blocks.0.resid_post"], "folds": 5, "dtype": "float32"},
        provenance=provenance(model, ["blocks.0.resid_post"], seeds=[0, 1]),
    )


def test_round_trip_rebuilds_an_equal_result_of_the_same_class(tmp_path):
    original = _example()
    original.save(tmp_path / "r")
    loaded = Result.load(tmp_path / "r")
    assert type(loaded) is LayerScores
    assert loaded.equals(original)
    assert torch.equal(loaded.extras["per_head"], original.extras["per_head"])
    assert loaded.extras["halves"][0].dtype == torch.float16
    assert isinstance(loaded.extras["pair"], tuple) and loaded.extras["pair"][1].dtype == torch.bfloat16
    assert torch.equal(loaded.extras["nested"]["a"]["b"], torch.tensor(7.0))
    assert torch.equal(loaded.extras["a.b"], torch.tensor(1))
    assert loaded.provenance["model"] == original.provenance["model"] and loaded.provenance["seeds"] == [0, 1]
    assert loaded.config == original.config and loaded.config["folds"] == 5
    assert LayerScores.load(tmp_path / "r").equals(original)  # loading through the subclass works too


def test_equals_notices_a_changed_tensor_and_a_changed_value():
    a = _example()
    b = dataclasses.replace(a, scores=a.scores + 1e-3)
    c = dataclasses.replace(a, layers=[0, 1, 3])
    assert not a.equals(b) and not a.equals(c) and a.equals(dataclasses.replace(a))


def test_saved_files_are_json_and_safetensors_only(tmp_path):
    _example().save(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["result.json", "tensors.safetensors"]
    document = json.loads((tmp_path / "r" / "result.json").read_text())  # strict JSON: no NaN literals
    assert document["class"] == "LayerScores" and document["fields"]["layers"] == [0, 1, 2]
    assert document["mechkit_version"] == mechkit.__version__
    with open(tmp_path / "r" / "tensors.safetensors", "rb") as f:
        assert f.read(2) != b"\x80\x02"  # not a pickle protocol header


def test_result_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Bare(1).value = 2  # type: ignore[misc]


def test_frame_from_the_subclass():
    frame = _example().to_frame()
    assert list(frame.columns) == ["layer", "score"] and frame["score"].tolist() == [0.5, 0.25, 0.125]


def test_base_presentation_methods_explain_what_to_do():
    with pytest.raises(NotImplementedError, match=r"does not define to_frame.*value"):
        Bare(1).to_frame()
    with pytest.raises(NotImplementedError, match=r"does not define _plot.*mechkit.viz"):
        Bare(1).plot()


def test_unsupported_values_are_refused_before_writing(tmp_path):
    with pytest.raises(MechkitError, match="cannot save a set"):
        Bare({1, 2}).save(tmp_path / "a")  # type: ignore[arg-type]
    with pytest.raises(MechkitError, match="dict keys must be str"):
        Bare({1: 2}).save(tmp_path / "b")  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_load_errors(tmp_path):
    with pytest.raises(MechkitError, match=r"holds no result.json"):
        Result.load(tmp_path)
    Bare(3).save(tmp_path / "bare")
    with pytest.raises(MechkitError, match="holds a Bare, not a LayerScores"):
        LayerScores.load(tmp_path / "bare")
    document = json.loads((tmp_path / "bare" / "result.json").read_text())
    document["class"] = "Missing"
    (tmp_path / "bare" / "result.json").write_text(json.dumps(document))
    with pytest.raises(MechkitError, match="unknown result class 'Missing'"):
        Result.load(tmp_path / "bare")


# -- the dataclass options are enforced -------------------------------------------------------
@pytest.mark.parametrize("options", [{"frozen": True}, {"frozen": True, "eq": True}, {"eq": False}, {}])
def test_subclass_without_frozen_and_eq_false_is_refused_at_definition(options):
    with pytest.raises(TypeError, match=r"@dataclass\(frozen=True, eq=False\).*equals"):

        @dataclasses.dataclass(**options)
        class Scores(Result):
            scores: Tensor


def test_results_compare_by_identity_and_hash():
    a, b = Bare(1), Bare(1)
    assert a != b and a == a and len({a, b}) == 2  # no tensor == comparison, instances hashable
    assert a.equals(b)
    with_tensor = LayerScores(torch.ones(2), [0, 1])
    assert with_tensor != LayerScores(torch.ones(2), [0, 1])  # no "Boolean value of Tensor is ambiguous"


def test_an_undecorated_subclass_keeps_the_base_semantics():
    class Renamed(Bare):  # adds no fields: needs no decorator
        pass

    r = Renamed(2)
    assert r != Renamed(2) and r.equals(Renamed(2))


# -- config ---------------------------------------------------------------------------------------
def test_config_object_must_be_stored_as_its_dict(tmp_path):
    class FakeConfig:
        def to_dict(self):
            return {"folds": 5}

    with pytest.raises(MechkitError, match=r"config: cannot save a FakeConfig; store its to_dict\(\)"):
        Bare(1, config=FakeConfig()).save(tmp_path / "r")  # type: ignore[arg-type]
    assert Result.load(Bare(1, config=FakeConfig().to_dict()).save(tmp_path / "r")).config == {"folds": 5}
    assert Result.load(Bare(1).save(tmp_path / "none")).config is None


# -- reading files saved by other versions ---------------------------------------------------------
def _edit(folder, change):
    path = folder / "result.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _example_loaded(tmp_path):
    return Result.load(_example().save(tmp_path / "reference"))


def test_a_field_the_class_no_longer_has_is_dropped_with_a_warning(tmp_path):
    folder = _example().save(tmp_path / "r")
    _edit(folder, lambda d: d["fields"].update(retired=[1, 2]))
    with pytest.warns(UserWarning, match=r"LayerScores has no field 'retired'.*dropped"):
        loaded = Result.load(folder)
    assert loaded.equals(_example_loaded(tmp_path))


def test_a_missing_field_with_a_default_takes_the_default(tmp_path):
    folder = _example().save(tmp_path / "r")
    _edit(folder, lambda d: [d["fields"].pop(name) for name in ("extras", "config", "provenance")])
    loaded = Result.load(folder)
    assert loaded.extras == {} and loaded.config is None and loaded.provenance == {}
    assert torch.equal(loaded.scores, torch.tensor([0.5, 0.25, 0.125]))


def test_a_missing_field_without_a_default_is_an_error_naming_it(tmp_path):
    folder = _example().save(tmp_path / "r")
    _edit(folder, lambda d: d["fields"].pop("layers"))
    with pytest.raises(MechkitError, match=r"no value for LayerScores field 'layers', which has no default"):
        Result.load(folder)


def test_a_format_from_a_newer_mechkit_is_refused_clearly(tmp_path):
    folder = Bare(1).save(tmp_path / "r")
    _edit(folder, lambda d: d.update(format=2))
    with pytest.raises(MechkitError, match=r"result format 2, written by a newer mechkit.*upgrade mechkit"):
        Result.load(folder)
    _edit(folder, lambda d: d.pop("format"))
    with pytest.raises(MechkitError, match=r"not a mechkit result \(format None\)"):
        Result.load(folder)


def test_a_file_written_before_the_checksum_still_loads(tmp_path):
    folder = _example().save(tmp_path / "r")
    _edit(folder, lambda d: d.pop("tensors_sha256"))
    assert Result.load(folder).equals(_example_loaded(tmp_path))


# -- atomic, consistent saves --------------------------------------------------------------------
def test_tensors_from_another_save_are_refused(tmp_path):
    _example().save(tmp_path / "a")
    LayerScores(torch.zeros(3), [0, 1, 2]).save(tmp_path / "b")
    (tmp_path / "b" / "tensors.safetensors").replace(tmp_path / "a" / "tensors.safetensors")
    with pytest.raises(MechkitError, match=r"does not belong to .*result.json.*save the result again"):
        Result.load(tmp_path / "a")


def test_a_failed_save_leaves_the_previous_result_whole(tmp_path, monkeypatch):
    folder = _example().save(tmp_path / "r")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(path, text):
        raise OSError("disk full")

    monkeypatch.setattr("mechkit.results.atomic_write_text", crash)  # dies after the tensors were written
    with pytest.raises(OSError, match="disk full"):
        LayerScores(torch.zeros(3), [0, 1, 2]).save(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)  # no temp files left behind
    with pytest.raises(MechkitError, match="does not belong to"):  # never a silent mix of two saves
        Result.load(folder)


# -- plotting through viz --------------------------------------------------------------------------
def test_plot_draws_on_a_viz_figure_through_the_subclass_hook(monkeypatch):
    from matplotlib.figure import Figure

    made = []
    monkeypatch.setattr(viz, "figure", lambda size=None: made.append(Figure()) or made[-1])
    fig = _example().plot(title="by layer")
    assert made == [fig] and isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.lines) == 1 and ax.get_title() == "by layer" and ax.get_xlabel() == "layer"


def test_plot_figures_stay_out_of_pyplot(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig = _example().plot()
    assert plt.get_fignums() == before
    path = viz.save(fig, tmp_path / "scores.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MechkitError, match="use a png, pdf, svg suffix"):
        viz.save(fig, tmp_path / "scores.jpg")


def test_heatmap_centres_signed_values_on_zero():
    fig = viz.figure()
    image = viz.heatmap(fig.add_subplot(), torch.tensor([[-0.5, 2.0], [0.0, 1.0]]), x=["a", "b"], diverging=True)
    assert image.get_clim() == (-2.0, 2.0)
    with pytest.raises(MechkitError, match=r"\[rows, cols\] array, got shape \(2,\)"):
        viz.heatmap(fig.add_subplot(), torch.ones(2))
