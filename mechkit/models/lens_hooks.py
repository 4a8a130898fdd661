"""Which TransformerLens hook point serves each mechkit site kind, as data (used by ``lens.py``).

``HOOKS`` holds the default names (TL's compatibility aliases, or the Bridge's component hooks),
``OVERRIDES`` the names per flavour ("hooked_transformer") or HF model_type under a Bridge, and
``TRANSFORMS`` how a hook's tensor becomes the site. Each mapping is checked against the
reference backend in tests/equivalence/test_lens.py.
"""

from __future__ import annotations

HOOKS: dict[str, str] = {
    "embed": "hook_embed",
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "attn.in": "blocks.{L}.ln1.hook_in",  # the Bridge's attention-norm input
    "attn.q": "blocks.{L}.attn.hook_q",
    "attn.k": "blocks.{L}.attn.hook_k",
    "attn.v": "blocks.{L}.attn.hook_v",
    "attn.rot_q": "blocks.{L}.attn.hook_rot_q",  # rotary models only
    "attn.rot_k": "blocks.{L}.attn.hook_rot_k",
    "attn.z": "blocks.{L}.attn.hook_z",
    "attn.pattern": "blocks.{L}.attn.hook_pattern",
    "attn.out": "blocks.{L}.hook_attn_out",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "mlp.in": "blocks.{L}.ln2.hook_in",  # the Bridge's MLP-norm input
    "moe.router": "blocks.{L}.mlp.gate.hook_out",
    "mlp.pre": "blocks.{L}.mlp.hook_pre",
    "mlp.post": "blocks.{L}.mlp.hook_post",
    "mlp.out": "blocks.{L}.hook_mlp_out",
    "resid_post": "blocks.{L}.hook_resid_post",
    "ln_final": "ln_final.hook_out",
    "logits": "unembed.hook_out",
}
OVERRIDES: dict[str, dict[str, str]] = {
    "hooked_transformer": {
        "ln_final": "unembed.hook_in",
        "attn.in": "blocks.{L}.hook_attn_in",  # fires only with cfg.use_attn_in (HT_FLAGS)
        "mlp.in": "blocks.{L}.hook_mlp_in",  # fires only with cfg.use_hook_mlp_in
    },
    "bert": {
        "embed": "embed.hook_out",
        "resid_mid": "blocks.{L}.ln1.hook_out",
        "attn.out": "blocks.{L}.attn.o.hook_out",
        "mlp.in": "blocks.{L}.mlp.in.hook_in",  # the intermediate layer's input
    },
}
# site kind -> tap transform (identity otherwise). "copy": the hooked module's own autograd node.
TRANSFORMS: dict[str, str] = {"moe.router": "tokens", "attn.in": "copy", "mlp.in": "copy"}
# HookedTransformer's hook_attn_in holds one copy of resid_pre per head (ln1 runs per copy)
HT_TRANSFORMS: dict[str, str] = {"attn.in": "head_copies"}
# HookedTransformer hooks that exist only when a config flag is on: kind -> (flag, setter)
HT_FLAGS: dict[str, tuple[str, str]] = {
    "attn.in": ("use_attn_in", "set_use_attn_in"),
    "mlp.in": ("use_hook_mlp_in", "set_use_hook_mlp_in"),
}
UNSUPPORTED: dict[str, dict[str, str]] = {
    "bert": {
        "ln_final": "BERT has no final LayerNorm (TL's ln_final is the MLM head's transform LayerNorm)",
        "attn.in": (
            "the Bridge hooks the input of BertAttention, which also feeds the residual skip into the attention "
            "output's LayerNorm; no hook holds self-attention's own input. Use the torch_hooks or nnsight backend"
        ),
    },
}
HEAD_INPUT_REASON = (
    "TL's hook_q_input / hook_k_input / hook_v_input are per-head copies of the residual stream before ln1 "
    "(TL normalises each copy), while mechkit's attn.q_in / k_in / v_in are copies of the projection's "
    "normalised input; no TL hook holds those. Use the torch_hooks or nnsight backend"
)
TOPK_REASON = (
    "TransformerLens hooks the router logits (mlp.gate.hook_out) but not the experts the router chose "
    "or their weights; recomputing them from logits is wrong for routers with biases or group limits"
)
MOE_MLP_REASON = "on MoE layers TL's mlp.hook_pre/hook_post are the MoE block's input/output, not neurons"
MODULE_REASON = "TransformerLens addresses hook points, not arbitrary submodules; use the torch_hooks backend"
ROUTER_READONLY = "TL hooks the router logits after the router has chosen; editing them changes no routing"
PATTERN_READONLY = "a write to TL's hook_pattern does not reach the attention output for this architecture"


GQA_ATTN_IN_REASON = (
    "TL's hook_attn_in does not exist under grouped-query attention (TL refuses use_attn_in there); "
    "use the torch_hooks backend, or the Bridge (LensModel.from_hf)"
)


def flag_reason(kind: str) -> str:
    flag, setter = HT_FLAGS[kind]
    hook = OVERRIDES["hooked_transformer"][kind].replace("{L}", "L")
    return f"TL's {hook} fires only with cfg.{flag}: call model.{setter}(True) before mechkit.load"
