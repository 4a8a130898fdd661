"""GPT-NeoX / Pythia. With parallel residual (the default) there is no resid_mid.

``attn.in`` / ``mlp.in`` are the inputs of ``input_layernorm`` / ``post_attention_layernorm``;
with parallel residual both equal resid_pre in value (each block branch reads its own copy).
``attn.q_in`` / ``k_in`` / ``v_in`` are per-head copies of the fused ``query_key_value`` input
(after ``input_layernorm``).
"""

from mechkit.models.arch import ArchTable
from mechkit.models.taps import Tap

H = "gpt_neox.layers.{L}"
QKV = f"{H}.attention.query_key_value"
TABLES = [
    ArchTable(
        name="gpt_neox",
        model_types=("gpt_neox",),
        base_prefix="gpt_neox",
        taps={
            "embed": Tap("gpt_neox.embed_in"),
            "resid_pre": Tap(H, "input"),
            "attn.in": Tap(f"{H}.input_layernorm", "input", transform="copy"),
            "attn.q_in": Tap(QKV, "head_input", transform="neox_qkv", chunk=0),
            "attn.k_in": Tap(QKV, "head_input", transform="neox_qkv", chunk=1),
            "attn.v_in": Tap(QKV, "head_input", transform="neox_qkv", chunk=2),
            "attn.q": Tap(QKV, transform="neox_qkv", chunk=0),
            "attn.k": Tap(QKV, transform="neox_qkv", chunk=1),
            "attn.v": Tap(QKV, transform="neox_qkv", chunk=2),
            "attn.z": Tap(f"{H}.attention.dense", "input", transform="heads"),
            "attn.rot_q": Tap(f"{H}.attention", "rot_q"),  # partial rotary applied
            "attn.rot_k": Tap(f"{H}.attention", "rot_k"),
            "attn.pattern": Tap(f"{H}.attention", "pattern"),
            "attn.out": Tap(f"{H}.attention", item=0),
            "resid_mid": Tap(f"{H}.post_attention_layernorm", "input", skip="resid_post"),
            "mlp.in": Tap(f"{H}.post_attention_layernorm", "input", transform="copy"),
            "mlp.pre": Tap(f"{H}.mlp.dense_h_to_4h"),
            "mlp.post": Tap(f"{H}.mlp.dense_4h_to_h", "input"),
            "mlp.out": Tap(f"{H}.mlp"),
            "resid_post": Tap(H),
            "ln_final": Tap("gpt_neox.final_layer_norm"),
            "logits": Tap("lm_head"),
        },
        conditions={"resid_mid": ("use_parallel_residual", False)},
    )
]
