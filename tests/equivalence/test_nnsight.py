"""The nnsight backend against the torch_hooks reference: every site, interventions, gradients, hygiene."""

from __future__ import annotations

import pytest
import torch

import mechkit
from mechkit.errors import MechkitError, SiteNotSupportedError
from mechkit.interventions import Add, Apply, Replace, Scale, Zero
from tests.conftest import ARCHS, MOE_ARCHS, VOCAB, tiny_hf_model, tiny_ids

nnsight = pytest.importorskip("nnsight")
from mechkit.models.nnsight import NNsightModel  # noqa: E402

ATOL = 1e-5
# nnsight announces that BERT's `output` submodules are reachable as `E_output`; the tables use paths
pytestmark = pytest.mark.filterwarnings("ignore:Module .* has a submodule named 'output':UserWarning")


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def padded_batch() -> dict:
    """Right-padded rows of different lengths (padding token ids are arbitrary on purpose)."""
    ids = tiny_ids(batch=3, seq=7, seed=2)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    """(arch, plain HF model, torch_hooks reference, nnsight model): two copies of the same seeded weights."""
    arch = request.param
    hf = tiny_hf_model(arch)
    model = mechkit.load(nnsight.NNsight(tiny_hf_model(arch)))
    assert isinstance(model, NNsightModel)
    return arch, hf, mechkit.load(hf), model


def hf_logits(hf, inputs) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(inputs, dict):
            return hf(**inputs).logits
        return hf(inputs).logits


ROTATED = ("attn.rot_q", "attn.rot_k")  # inside mechkit's attention function: torch_hooks only


def assert_same_caches(ref_cache, cache):
    assert set(cache) == {s for s in ref_cache if s.kind not in ROTATED}
    for site in cache:
        close(cache[site], ref_cache[site])


# -- every site, every architecture -------------------------------------------------------------------


def test_every_site_matches_reference_and_logits_match_hf(pair):
    _, hf, ref, model = pair
    ids = tiny_ids()
    ref_logits, ref_cache = ref.run_with_cache(ids, "*")
    logits, cache = model.run_with_cache(ids, "*")
    assert [str(s) for s in model.sites] == [str(s) for s in ref.sites if s.kind not in ROTATED]
    assert len(cache) == len(model.sites) and cache.provenance["backend"] == "nnsight"
    assert_same_caches(ref_cache, cache)
    close(logits, hf_logits(hf, ids))
    close(logits, ref_logits)


def test_right_padded_batch_matches_reference(pair):
    arch, hf, ref, model = pair
    batch = padded_batch()
    _, ref_cache = ref.run_with_cache(batch, "*")
    logits, cache = model.run_with_cache(batch, "*")
    assert_same_caches(ref_cache, cache)
    close(logits, hf_logits(hf, batch))
    if arch == "bert":  # bidirectional: the mask reached the model iff real positions change
        unmasked = hf_logits(hf, batch["input_ids"])
        assert not torch.allclose(logits[0, :4], unmasked[0, :4], atol=1e-4)


def test_narrowed_sites_match_reference(pair):
    _, _, ref, model = pair
    sites = ["blocks.1.attn.z.h2", "blocks.0.attn.k.h1", "blocks.0.resid_post"]
    if model.info.moe_layers:
        sites.append(f"blocks.{model.info.moe_layers[0]}.moe.topk.e3")
    _, ref_cache = ref.run_with_cache(tiny_ids(), sites)
    _, cache = model.run_with_cache(tiny_ids(), sites)
    assert_same_caches(ref_cache, cache)


# -- interventions -----------------------------------------------------------------------------------


def _interventions(model, arch: str) -> dict[str, dict]:
    source = model.run_with_cache(tiny_ids(seed=7), "blocks.0.resid_post")[1]
    vector = torch.randn(model.info.d_model, generator=torch.Generator().manual_seed(3))
    cases = {
        "zero head": {"blocks.0.attn.z.h1": Zero()},
        "replace resid_post": {"blocks.0.resid_post": Replace(source=source)},
        "add mlp.out": {"blocks.1.mlp.out": Add(vector=vector, coeff=2.0)},
        "zero head at a position": {"blocks.1.attn.z": Zero(heads=[0, 3], positions=-1)},
    }
    if arch in MOE_ARCHS:
        cases["zero expert"] = {"blocks.0.moe.topk.e1": Zero()}
    return cases


def test_interventions_match_reference(pair):
    arch, _, ref, model = pair
    ids = tiny_ids()
    clean = model(ids)
    for name, interventions in _interventions(model, arch).items():
        expected = ref.run_with_interventions(ids, interventions).logits
        got = model.run_with_interventions(ids, interventions).logits
        assert not torch.allclose(got, clean, atol=1e-4), f"{name} changed nothing"
        close(got, expected)


def test_every_write_path_matches_reference(pair):
    """Each tap's put (input and output sides, fused q/k/v, heads, routing) through nnsight assignment."""
    _, _, ref, model = pair
    ids = tiny_ids()
    clean_logits, clean = model.run_with_cache(ids, "*")
    writable = [s for s in model.sites if model._writable(s) is None]
    patched = model.run_with_interventions(ids, {s: Replace(source=clean) for s in writable}).logits
    assert torch.equal(patched, clean_logits)
    scaled = {s: Scale(factor=0.9) for s in writable}
    got = model.run_with_interventions(ids, scaled).logits
    assert not torch.allclose(got, clean_logits, atol=1e-4)
    close(got, ref.run_with_interventions(ids, scaled).logits)


def test_interventions_with_cache_and_context_match_reference(pair):
    _, _, ref, model = pair
    ids = tiny_ids()
    interventions = {"blocks.0.attn.z.h1": Zero(), "blocks.1.mlp.out": Zero(positions=[0, 2])}
    sites = ["blocks.0.attn.z", "blocks.1.mlp.out", "blocks.1.resid_post"]
    ref_logits, ref_cache = ref.run_with_interventions(ids, interventions, cache=sites)
    logits, cache = model.run_with_interventions(ids, interventions, cache=sites)
    close(logits, ref_logits)
    assert_same_caches(ref_cache, cache)
    assert cache["blocks.0.attn.z.h1"].abs().max() == 0  # the cache sees the edited value
    with model.intervene(interventions):
        close(model(ids), ref_logits)
    close(model(ids), ref(ids))  # the context is gone


# -- gradients -------------------------------------------------------------------------------------


def _metric(logits, batch):
    return logits[:, -1, 3].sum() - logits[:, -2, 5].sum()


def test_gradients_match_reference(pair):
    _, _, ref, model = pair
    ids = tiny_ids()
    sites = ["embed", "blocks.0.resid_post", "blocks.1.attn.z", "blocks.0.mlp.out", "blocks.1.attn.q"]
    sites += [str(s) for s in model.sites if s.kind in ("mlp.post", "moe.topk")][:2]  # dense or MoE layers
    expected = ref.gradients(ids, sites, _metric)
    result = model.gradients(ids, sites, _metric)
    close(result.value, expected.value)
    assert_same_caches(expected.activations, result.activations)
    assert_same_caches(expected.grads, result.grads)
    assert all(result.grads[s].abs().max() > 0 for s in sites)
    assert all(p.grad is None for p in model.module.parameters())


def test_gradients_under_an_intervention_match_reference():
    hf = tiny_hf_model("gpt2")
    ref, model = mechkit.load(hf), NNsightModel.from_hf(tiny_hf_model("gpt2"))
    ids = tiny_ids()
    kw = {"interventions": {"blocks.0.attn.z.h2": Zero()}}
    expected = ref.gradients(ids, ["blocks.0.attn.z", "blocks.1.resid_pre"], _metric, **kw)
    result = model.gradients(ids, ["blocks.0.attn.z", "blocks.1.resid_pre"], _metric, **kw)
    assert_same_caches(expected.grads, result.grads)
    assert result.grads["blocks.0.attn.z.h2"].abs().max() > 0  # d/d(the zeroed head) still exists


# -- other wrappers, remote ------------------------------------------------------------------------------


def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


TEXTS = ["w5 w7 w9 w11 w2", "w3 w4"]


@pytest.fixture(scope="module")
def transformers_model():
    tok = word_tokenizer()
    reference = mechkit.load(tiny_hf_model("llama"), tokenizer=tok)
    return nnsight.TransformersModel(tiny_hf_model("llama"), tokenizer=tok), reference


def test_transformers_model_wrapper_tokenizes_and_matches_reference(transformers_model):
    wrapped, ref = transformers_model
    model = mechkit.load(wrapped)
    assert model.tokenizer is wrapped.tokenizer
    batch = model.tokenize(TEXTS)
    assert batch.padded
    ref_logits, ref_cache = ref.run_with_cache(TEXTS, "*")
    logits, cache = model.run_with_cache(TEXTS, "*")
    close(logits, ref_logits)
    assert_same_caches(ref_cache, cache)


def test_remote_flag_reaches_every_trace(transformers_model, monkeypatch):
    wrapped, ref = transformers_model
    model = NNsightModel(wrapped, remote=True)
    seen = []
    original = type(wrapped).trace

    def local_trace(self, *args, **kwargs):
        seen.append(kwargs.pop("remote", None))  # record, then run here instead of on NDIF
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(wrapped), "trace", local_trace)
    _, cache = model.run_with_cache(TEXTS, "blocks.*.resid_post")
    logits = model.run_with_interventions(TEXTS, {"blocks.0.attn.z.h1": Zero()}).logits
    with model.intervene({"blocks.0.attn.z.h1": Zero()}):
        model(TEXTS)
    assert seen == [True, True, True]
    assert_same_caches(ref.run_with_cache(TEXTS, "blocks.*.resid_post")[1], cache)
    close(logits, ref.run_with_interventions(TEXTS, {"blocks.0.attn.z.h1": Zero()}).logits)
    with pytest.raises(SiteNotSupportedError, match="remote"):
        model.gradients(TEXTS, "blocks.0.resid_post", _metric)
    assert len(seen) == 3  # refused before tracing


def test_remote_request_survives_nnsight_serialization(transformers_model):
    """nnsight's local simulation serializes the trace as for NDIF, deserializes it and runs it."""
    wrapped, ref = transformers_model
    model = NNsightModel(wrapped, remote="local")
    interventions = {"blocks.0.attn.z.h1": Zero(), "blocks.1.mlp.out": Add(vector=torch.ones(32))}
    ref_logits, ref_cache = ref.run_with_interventions(TEXTS, interventions, cache="blocks.1.*")
    logits, cache = model.run_with_interventions(TEXTS, interventions, cache="blocks.1.*")
    close(logits, ref_logits)
    # per-head q/k/v inputs are not sent to NDIF (documented); every other site matches
    assert {s.kind for s in set(ref_cache) - set(cache)} == {"attn.q_in", "attn.k_in", "attn.v_in", *ROTATED}
    assert_same_caches({s: ref_cache[s] for s in cache}, cache)
    with pytest.raises(SiteNotSupportedError, match="requests sent to NDIF"):
        model.run_with_cache(TEXTS, "blocks.0.attn.q_in")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    hf = tiny_hf_model("llama")
    hf.config.architectures = ["LlamaForCausalLM"]
    hf.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path), mechkit.load(hf)


def test_remote_constructor_builds_sites_on_meta_without_weights(llama_folder, monkeypatch):
    path, ref = llama_folder
    model = mechkit.load(path, backend="nnsight", remote=True)
    assert isinstance(model, NNsightModel) and model.remote_mode is True
    assert all(p.is_meta for p in model.module.parameters())
    local_only = ("attn.q_in", "attn.k_in", "attn.v_in", *ROTATED)  # per-head inputs are not sent to NDIF
    assert [str(s) for s in model.sites] == [str(s) for s in ref.sites if s.kind not in local_only]
    assert any(s.kind == "attn.pattern" for s in model.sites)  # eager attention, verified on meta
    assert model.parameters_fingerprint() == model.parameters_fingerprint()

    class Sent(Exception):
        pass

    def fake_trace(self, *args, **kwargs):
        raise Sent(kwargs.get("remote"), sorted(kwargs))

    monkeypatch.setattr(type(model.nnsight), "trace", fake_trace)
    with pytest.raises(Sent) as sent:
        model.run_with_cache(tiny_ids(), "blocks.0.resid_post")
    assert sent.value.args == (True, ["attention_mask", "input_ids", "remote", "use_cache"])


def test_load_a_folder_with_the_nnsight_backend(llama_folder):
    path, ref = llama_folder
    model = mechkit.load(path, backend="nnsight")
    assert isinstance(model, NNsightModel) and isinstance(model.nnsight, nnsight.NNsight)
    tokenizer_state = (model.tokenizer.padding_side, model.tokenizer.pad_token)
    logits, cache = model.run_with_cache(TEXTS, ["blocks.1.attn.pattern", "ln_final"])  # texts: its tokenizer
    ref_logits, ref_cache = ref.run_with_cache(model.tokenize(TEXTS), ["blocks.1.attn.pattern", "ln_final"])
    close(logits, ref_logits)
    assert_same_caches(ref_cache, cache)
    assert (model.tokenizer.padding_side, model.tokenizer.pad_token) == tokenizer_state


def test_lazily_loaded_model_is_verified_on_meta_then_dispatched(llama_folder):
    path, ref = llama_folder
    wrapped = nnsight.TransformersModel(path, task="text-generation", tokenizer=path, attn_implementation="eager")
    model = mechkit.load(wrapped)
    assert all(p.is_meta for p in model.module.parameters())
    logits, cache = model.run_with_cache(tiny_ids(), "*")  # the first trace loads the weights
    assert not any(p.is_meta for p in model.module.parameters())
    ref_logits, ref_cache = ref.run_with_cache(tiny_ids(), "*")
    close(logits, ref_logits)
    assert_same_caches(ref_cache, cache)


# -- what nnsight cannot express, and hygiene ---------------------------------------------------------------


def test_unsupported_sites_say_why():
    model = NNsightModel.from_hf(tiny_hf_model("olmoe"))
    with pytest.raises(SiteNotSupportedError, match="execution order"):
        model.run_with_cache(tiny_ids(), "module:model.layers.0.mlp")
    with pytest.raises(SiteNotSupportedError, match="execution order"):
        model.run_with_interventions(tiny_ids(), {"module:model.layers.0.mlp": Zero()})
    with pytest.raises(SiteNotSupportedError, match="execution order"), model.intervene({"module:lm_head": Zero()}):
        pass  # refused on entry, before any run
    with pytest.raises(SiteNotSupportedError, match="read-only"):
        model.run_with_interventions(tiny_ids(), {"blocks.0.moe.router": Zero()})
    sdpa = NNsightModel.from_hf(tiny_hf_model("llama", attn_implementation="sdpa"))
    with pytest.raises(SiteNotSupportedError, match="eager"):
        sdpa.run_with_cache(tiny_ids(), "blocks.0.attn.pattern")
    with pytest.raises(TypeError, match="expected an nnsight model"):
        NNsightModel(tiny_hf_model("llama"))


class _Scale(torch.nn.Module):
    def forward(self, hidden_states, factor=1.0):
        return hidden_states * factor


class _CallsWithKeywords(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Scale()

    def forward(self, x):
        return self.inner(hidden_states=x + 1, factor=2.0)


def test_input_taps_read_and_write_a_hidden_states_keyword():
    """Some modules receive their input as ``hidden_states=``: read it there and write it back there."""
    from mechkit.models.nnsight import _visit
    from mechkit.models.taps import RunShape, RunState, Tap
    from mechkit.sites import Site

    wrapped = nnsight.NNsight(_CallsWithKeywords())
    x = torch.randn(2, 3, 4)
    entries = [(Site("embed"), Tap("inner", "input"), lambda act: act * 10, True)]
    with wrapped.trace(x):
        state = RunState(RunShape(2, 3, 1, 1, 4), grad=False, by_name=True)
        _visit(wrapped.inner, "input", entries, state)
        saved = nnsight.save((state.store, wrapped.output))
    store, output = saved
    close(store["embed"], (x + 1) * 10)  # the stored value is the rewritten one, as in the reference
    close(output, (x + 1) * 10 * 2.0)  # the rewrite reached the module; its other keyword survived


def _hook_count(module: torch.nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, n)) for m in module.modules() for n in names)


def test_no_hooks_left_and_clean_state_after_an_exception_inside_an_intervention(pair):
    _, _, ref, model = pair
    ids = tiny_ids()
    fingerprint = model.parameters_fingerprint()
    model.run_with_cache(ids, "*")
    model.gradients(ids, "blocks.0.resid_post", _metric)

    def boom(act, site):
        raise RuntimeError("intervention failed")

    with pytest.raises(RuntimeError, match="intervention failed"):
        model.run_with_interventions(ids, {"blocks.1.mlp.out": Apply(fn=boom)}, cache="blocks.0.resid_post")
    with pytest.raises(RuntimeError, match="intervention failed"), model.intervene({"blocks.0.attn.out": Zero()}):
        model.run_with_interventions(ids, {"blocks.1.resid_pre": Apply(fn=boom)})
    assert _hook_count(model.module) == 0
    assert not model.nnsight.interleaver.interleaving and not model.nnsight.interleaver.mediators
    assert model.parameters_fingerprint() == fingerprint
    logits, cache = model.run_with_cache(ids, "blocks.*.resid_post")  # the next run is unaffected
    ref_logits, ref_cache = ref.run_with_cache(ids, "blocks.*.resid_post")
    close(logits, ref_logits)
    assert_same_caches(ref_cache, cache)


def test_shape_errors_inside_a_trace_surface_as_mechkit_errors():
    model = NNsightModel.from_hf(tiny_hf_model("gpt2"))
    with pytest.raises(MechkitError, match="sequence length"):
        model.run_with_interventions(tiny_ids(), {"blocks.0.resid_post": Replace(source=torch.zeros(1, 2, 32))})


def test_rotated_queries_and_keys_say_which_backend_has_them():
    model = NNsightModel(nnsight.NNsight(tiny_hf_model("llama")))
    with pytest.raises(SiteNotSupportedError, match="backend='torch_hooks'"):
        model.run_with_cache(tiny_ids(), "blocks.0.attn.rot_q")
