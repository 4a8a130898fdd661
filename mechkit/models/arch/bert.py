"""BERT encoders (post-LayerNorm): resid_mid is the attention block's normalised output; no ln_final.

Post-LN blocks have no norm before a sublayer, so the receiver sites are the sublayers' own
inputs: ``attn.in`` is what self-attention reads (resid_pre in value; the skip into the attention
output's LayerNorm keeps the original), ``mlp.in`` what the intermediate layer reads (resid_mid in
value; the skip into the output LayerNorm keeps the original). ``attn.q_in`` / ``k_in`` /
``v_in`` are per-head copies of that same input (BERT normalises after, not before, attention).
"""

from mechkit.models.arch import ArchTable
from mechkit.models.taps import Tap

H = "bert.encoder.layer.{L}"
SELF = f"{H}.attention.self"
TABLES = [
    ArchTable(
        name="bert",
        model_types=("bert",),
        base_prefix="bert",
        taps={
            "embed": Tap("bert.embeddings.word_embeddings"),
            "resid_pre": Tap(H, "input"),
            "attn.in": Tap(SELF, "input", transform="copy"),
            "attn.q_in": Tap(f"{SELF}.query", "head_input", transform="heads"),
            "attn.k_in": Tap(f"{SELF}.key", "head_input", transform="heads"),
            "attn.v_in": Tap(f"{SELF}.value", "head_input", transform="heads"),
            "attn.q": Tap(f"{SELF}.query", transform="heads"),
            "attn.k": Tap(f"{SELF}.key", transform="heads"),
            "attn.v": Tap(f"{SELF}.value", transform="heads"),
            "attn.pattern": Tap(SELF, "pattern"),
            "attn.z": Tap(f"{H}.attention.output.dense", "input", transform="heads"),
            "attn.out": Tap(f"{H}.attention.output.dense"),
            "resid_mid": Tap(f"{H}.attention", item=0),
            "mlp.in": Tap(f"{H}.intermediate", "input", transform="copy"),
            "mlp.pre": Tap(f"{H}.intermediate.dense"),
            "mlp.post": Tap(f"{H}.output.dense", "input"),
            "mlp.out": Tap(f"{H}.output.dense"),
            "resid_post": Tap(H),
            "logits": Tap("cls.predictions"),
        },
        encoder=True,
        n_ctx_key="max_position_embeddings",
    )
]
