"""LLaMA-style decoders (LLaMA, Mistral, Qwen2/3 dense, SmolLM): q/k/v are the projections before rotary.

Receiver sites: ``attn.in`` / ``mlp.in`` are the inputs of ``input_layernorm`` /
``post_attention_layernorm`` (before the norm), each the sublayer's own copy. ``attn.q_in`` is
per query head, ``attn.k_in`` / ``v_in`` per KV head (a KV head's key is computed once for its
whole group); all are copies of the projections' input, i.e. after ``input_layernorm``.
"""

from mechkit.models.arch import ArchTable
from mechkit.models.taps import Tap

H = "model.layers.{L}"
ATTENTION = {
    "embed": Tap("model.embed_tokens"),
    "resid_pre": Tap(H, "input"),
    "attn.in": Tap(f"{H}.input_layernorm", "input", transform="copy"),
    "attn.q_in": Tap(f"{H}.self_attn.q_proj", "head_input", transform="heads"),
    "attn.k_in": Tap(f"{H}.self_attn.k_proj", "head_input", transform="kv_heads"),
    "attn.v_in": Tap(f"{H}.self_attn.v_proj", "head_input", transform="kv_heads"),
    "attn.q": Tap(f"{H}.self_attn.q_proj", transform="heads"),
    "attn.k": Tap(f"{H}.self_attn.k_proj", transform="kv_heads"),
    "attn.v": Tap(f"{H}.self_attn.v_proj", transform="kv_heads"),
    "attn.z": Tap(f"{H}.self_attn.o_proj", "input", transform="heads"),
    "attn.rot_q": Tap(f"{H}.self_attn", "rot_q"),  # after rotary (and any q/k norm)
    "attn.rot_k": Tap(f"{H}.self_attn", "rot_k"),
    "attn.pattern": Tap(f"{H}.self_attn", "pattern"),
    "attn.out": Tap(f"{H}.self_attn", item=0),
    "resid_mid": Tap(f"{H}.post_attention_layernorm", "input", skip="resid_post"),
    "mlp.in": Tap(f"{H}.post_attention_layernorm", "input", transform="copy"),
    "resid_post": Tap(H),
    "ln_final": Tap("model.norm"),
    "logits": Tap("lm_head"),
}
DENSE_MLP = {
    "mlp.pre": Tap(f"{H}.mlp.gate_proj"),  # gated MLP: the pre-activation of the gate
    "mlp.post": Tap(f"{H}.mlp.down_proj", "input"),  # act(gate) * up
    "mlp.out": Tap(f"{H}.mlp"),
}
TABLES = [
    ArchTable(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"),
        base_prefix="model",
        taps={**ATTENTION, **DENSE_MLP},
    )
]
