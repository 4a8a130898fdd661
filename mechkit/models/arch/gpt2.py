"""GPT-2 (transformers ≥ 5: blocks return tensors, attention returns (out, weights)).

Receiver sites: ``attn.in`` / ``mlp.in`` are the inputs of ``ln_1`` / ``ln_2`` (before the norm),
each the attention's or MLP's own copy (the residual skip keeps the original). ``attn.q_in`` /
``k_in`` / ``v_in`` are per-head copies of the fused ``c_attn``'s input, i.e. after ``ln_1``.
``resid_mid`` is read at ``ln_2``'s input; a write also reaches the MLP add's skip.
"""

from mechkit.models.arch import ArchTable
from mechkit.models.taps import Tap

H = "transformer.h.{L}"
TABLES = [
    ArchTable(
        name="gpt2",
        model_types=("gpt2",),
        base_prefix="transformer",
        taps={
            "embed": Tap("transformer.wte"),
            "resid_pre": Tap(H, "input"),
            "attn.in": Tap(f"{H}.ln_1", "input", transform="copy"),
            "attn.q_in": Tap(f"{H}.attn.c_attn", "head_input", transform="split_heads", chunk=0),
            "attn.k_in": Tap(f"{H}.attn.c_attn", "head_input", transform="split_heads", chunk=1),
            "attn.v_in": Tap(f"{H}.attn.c_attn", "head_input", transform="split_heads", chunk=2),
            "attn.q": Tap(f"{H}.attn.c_attn", transform="split_heads", chunk=0),
            "attn.k": Tap(f"{H}.attn.c_attn", transform="split_heads", chunk=1),
            "attn.v": Tap(f"{H}.attn.c_attn", transform="split_heads", chunk=2),
            "attn.z": Tap(f"{H}.attn.c_proj", "input", transform="heads"),
            "attn.pattern": Tap(f"{H}.attn", "pattern"),
            "attn.out": Tap(f"{H}.attn", item=0),
            "resid_mid": Tap(f"{H}.ln_2", "input", skip="resid_post"),
            "mlp.in": Tap(f"{H}.ln_2", "input", transform="copy"),
            "mlp.pre": Tap(f"{H}.mlp.c_fc"),
            "mlp.post": Tap(f"{H}.mlp.c_proj", "input"),
            "mlp.out": Tap(f"{H}.mlp"),
            "resid_post": Tap(H),
            "ln_final": Tap("transformer.ln_f"),
            "logits": Tap("lm_head"),
        },
        n_ctx_key="n_positions",
    )
]
