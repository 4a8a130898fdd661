"""Routing capture on every supported MoE family (tiny random configs): the captured top-k is the
router's own choice, read independently with a plain forward hook on the HF router module; the router
weights are that module's weight; the probabilities are the softmax of its logits."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import mechkit
from mechkit.errors import MechkitError
from mechkit.moe import capture_routing, router_weights

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(num_experts=8, num_experts_per_tok=2)),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16)),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8)),
    # sigmoid scores + correction bias + group limits: its choice is not the top-k of its logits
    "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
                    dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=2, topk_group=1,
                         first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4,
                         qk_nope_head_dim=4, v_head_dim=8, n_shared_experts=1, num_key_value_heads=4)),
    "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 3)),
}
IDS = [[5, 9, 2, 33, 7, 1], [4, 8, 15], [16, 23, 42, 60, 11]]  # mixed lengths: padding must not count


def _build(name):
    config_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**COMMON, **extra})).eval()
    if name == "deepseek_v3":  # a non-zero correction bias, so that choice and logits disagree
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8))
    return model


def _hooked_choices(model, router_name):
    """Per MoE layer: the router's chosen indices and its logits for each row of IDS, by a plain hook."""
    seen = {}
    routers = {i: layer.mlp.get_submodule(router_name) for i, layer in enumerate(model.model.layers)
               if hasattr(layer.mlp, router_name) and hasattr(layer.mlp.get_submodule(router_name), "top_k")}
    handles = [r.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(i, []).append(out))
               for i, r in routers.items()]
    with torch.no_grad():
        for row in IDS:  # one prompt at a time: no padding in the reference
            model(torch.tensor([row]))
    for h in handles:
        h.remove()
    return routers, seen


class _Tokens:
    """The smallest tokenizer for id strings ("5 9 2")."""

    pad_token_id = 0

    def __call__(self, text):
        return {"input_ids": [int(w) for w in text.split()]}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_capture_is_the_routers_own_choice(name):
    hf = _build(name)
    router_name = "router" if name == "gpt_oss" else "gate"
    routers, seen = _hooked_choices(hf, router_name)
    model = mechkit.load(hf, tokenizer=_Tokens())
    assert list(model.info.moe_layers) == sorted(routers)
    trace = capture_routing(model, [" ".join(map(str, r)) for r in IDS], batch_size=3)
    weights = router_weights(model)
    for j, layer in enumerate(trace.layers):
        assert torch.equal(weights[j], routers[layer].weight.detach().float())
        for i, row in enumerate(IDS):
            logits, _, index = seen[layer][i]
            real = trace.mask[i].bool()
            chosen = torch.zeros(len(row), logits.shape[-1]).scatter_(-1, index, 1.0)
            assert torch.equal(trace.chosen[j][i][real], chosen)  # 100% of (token, expert) slots
            assert torch.allclose(trace.probs[j][i][real], logits.float().softmax(-1), atol=1e-5)
            assert (trace.probs[j][i][~real] == 0).all() and (trace.chosen[j][i][~real] == 0).all()


def test_deepseek_choices_differ_from_the_top_k_of_its_logits():
    """Why choices are read from the router's output: recomputing them from logits would be wrong."""
    model = mechkit.load(_build("deepseek_v3"), tokenizer=_Tokens())
    trace = capture_routing(model, [" ".join(map(str, r)) for r in IDS])
    real = trace.mask.bool()
    probs, chosen = trace.probs[0][real], trace.chosen[0][real]
    from_logits = torch.zeros_like(probs).scatter_(-1, probs.topk(2, -1).indices, 1.0)
    assert not torch.equal(from_logits, chosen)


def test_router_weights_refuse_dense_models():
    dense = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)).eval()
    with pytest.raises(MechkitError, match="no MoE layers"):
        router_weights(mechkit.load(dense))
    with pytest.raises(MechkitError, match="no MoE layers"):
        capture_routing(mechkit.load(dense, tokenizer=_Tokens()), ["1 2 3"])
