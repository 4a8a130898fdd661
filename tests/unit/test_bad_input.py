"""Bad input gets a clear error that says what is wrong and what to do."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit.errors import MechkitError, SiteNotSupportedError, UnknownSiteError, UnsupportedArchitectureError
from mechkit.interventions import Apply, ProjectOut, Replace, Resample, Zero
from tests.conftest import tiny_hf_model, tiny_ids


@pytest.fixture(scope="module")
def gpt2():
    return mechkit.load(tiny_hf_model("gpt2"))


@pytest.fixture(scope="module")
def mixed_moe():
    return mechkit.load(tiny_hf_model("qwen2_moe"))


CASES = [
    # (description, call, error type, message fragment)
    ("unknown site", lambda m: m.run_with_cache(tiny_ids(), "blocks.0.resid_postt"), UnknownSiteError,
     "blocks.0.resid_post"),
    ("layer out of range", lambda m: m.run_with_cache(tiny_ids(), "blocks.9.resid_post"), UnknownSiteError,
     "has 2 layers (0–1)"),
    ("head out of range", lambda m: m.run_with_cache(tiny_ids(), "blocks.0.attn.z.h7"), UnknownSiteError,
     "has 4 heads"),
    ("MoE site on a dense model", lambda m: m.run_with_cache(tiny_ids(), "blocks.0.moe.router"), UnknownSiteError,
     "dense model"),
    ("glob matching nothing", lambda m: m.run_with_cache(tiny_ids(), "blocks.*.resid_middle"), UnknownSiteError,
     "matches no site"),
    ("float token ids", lambda m: m(torch.rand(2, 3)), TypeError, "must be integers"),
    ("wrong input type", lambda m: m(3.5), TypeError, "inputs must be"),
    ("empty prompt list", lambda m: m([]), MechkitError, "empty input"),
    ("mask shape mismatch", lambda m: m({"input_ids": tiny_ids(), "attention_mask": torch.ones(1, 2)}),
     MechkitError, "differs from input_ids"),
    ("texts without tokenizer", lambda m: m(["hello"]), MechkitError, "no tokenizer"),
    ("replacement of the wrong shape",
     lambda m: m.run_with_interventions(
         tiny_ids(seq=7), {"blocks.0.resid_post": Replace(source=torch.zeros(3, 5, 32))}
     ).logits,
     MechkitError, "same batch size and sequence length"),
    ("selector on a missing axis",
     lambda m: m.run_with_interventions(tiny_ids(), {"blocks.0.resid_post": Zero(heads=1)}).logits,
     MechkitError, "cannot be selected by 'head'"),
    ("position out of range", lambda m: m.run_with_interventions(tiny_ids(seq=7), {"embed": Zero(positions=[9])}),
     MechkitError, "does not exist in row 0"),
    ("intervention not callable", lambda m: m.run_with_interventions(tiny_ids(), {"embed": 3}).logits, TypeError,
     "must be callable"),
    ("interventions not a mapping", lambda m: m.run_with_interventions(tiny_ids(), [Zero()]).logits, TypeError,
     "must be a mapping"),
    ("resample a single example", lambda m: m.run_with_interventions(tiny_ids(batch=1), {"embed": Resample()}).logits,
     MechkitError, "at least 2 examples"),
    ("project-out of the wrong width",
     lambda m: m.run_with_interventions(tiny_ids(), {"embed": ProjectOut(directions=torch.ones(5))}), MechkitError,
     "width 5"),
    ("metric not computed from logits",
     lambda m: m.gradients(tiny_ids(), "embed", lambda logits, batch: torch.tensor(1.0)), MechkitError,
     "computed from the logits"),
    ("replacement function changing the shape",
     lambda m: m.run_with_interventions(tiny_ids(), {"embed": Apply(fn=lambda a, s: a[:, :2])}).logits, MechkitError,
     "has shape"),
]


@pytest.mark.parametrize("description, call, error, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_on_a_dense_model(gpt2, description, call, error, fragment):
    with pytest.raises(error) as info:
        call(gpt2)
    assert fragment in str(info.value)


def test_moe_site_on_a_dense_layer_of_a_mixed_model(mixed_moe):
    assert mixed_moe.info.moe_layers == (0,)
    with pytest.raises(UnknownSiteError, match=r"layer 1 is dense; MoE layers are \[0\]"):
        mixed_moe.run_with_cache(tiny_ids(), "blocks.1.moe.topk")


def test_expert_out_of_range(mixed_moe):
    with pytest.raises(UnknownSiteError, match="there are 4"):
        mixed_moe.run_with_cache(tiny_ids(), "blocks.0.moe.topk.e4")


def test_router_logits_are_read_only(mixed_moe):
    with pytest.raises(SiteNotSupportedError, match=r"edit blocks\.L\.moe\.topk"):
        mixed_moe.run_with_interventions(tiny_ids(), {"blocks.0.moe.router": Zero()})


def test_pattern_needs_eager_attention():
    model = mechkit.load(tiny_hf_model("llama", attn_implementation="sdpa"))
    with pytest.raises(SiteNotSupportedError, match="eager"):
        model.run_with_cache(tiny_ids(), "blocks.0.attn.pattern")
    model.run_with_cache(tiny_ids(), "blocks.0.attn.z")  # everything else still works


def test_unsupported_architecture_names_what_to_add():
    import transformers

    config = transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50, d_kv=8)
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 't5'.*mechkit/models/arch/"):
        mechkit.load(transformers.T5ForConditionalGeneration(config))


def test_load_errors(tmp_path):
    with pytest.raises(MechkitError, match="unknown backend"):
        mechkit.load("gpt2", backend="jax")
    with pytest.raises(MechkitError, match=r"backend=.nnsight."):
        mechkit.load("gpt2", remote=True)
    with pytest.raises(MechkitError, match="no model folder"):
        mechkit.load(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="expects a model object"):
        mechkit.load(42)


def test_empty_prompt_strings_are_rejected():
    from mechkit.models.inputs import prepare_inputs

    class Tok:
        pad_token_id = 0

        def __call__(self, text):
            return {"input_ids": [1] * len(text.split())}

    with pytest.raises(MechkitError, match="empty strings"):
        prepare_inputs(["a b", ""], Tok())
    batch = prepare_inputs(["a b c", "a"], Tok())
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.last_positions.tolist() == [2, 0]
