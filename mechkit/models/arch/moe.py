"""Mixture-of-experts decoders (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, GPT-OSS).

Routers (``mlp.gate``; GPT-OSS ``mlp.router``) return ``(logits, top-k weights, top-k indices)``;
experts are fused 3-D parameters with no per-expert submodule, so per-expert interventions edit the
routing output (``blocks.L.moe.topk``). Qwen MoE and DeepSeek-V3 models may mix in dense layers,
which keep the mlp.pre/post taps. DeepSeek-V3's latent attention (MLA) has no per-head q/k/v
projections, so its table has the residual, block-output and routing sites only.
"""

from mechkit.models.arch import ArchTable
from mechkit.models.arch.llama import ATTENTION, DENSE_MLP, H
from mechkit.models.taps import Tap


def _router(path: str) -> dict[str, Tap]:
    return {
        # Editing logits after the router has chosen changes nothing, so the site is read-only.
        "moe.router": Tap(f"{H}.mlp.{path}", item=0, transform="tokens", writable=False),
        "moe.topk": Tap(f"{H}.mlp.{path}", transform="topk_dense"),
    }


RESIDUAL = {kind: ATTENTION[kind] for kind in
            ("embed", "resid_pre", "attn.in", "attn.out", "resid_mid", "mlp.in", "resid_post", "ln_final", "logits")}
TABLES = [
    ArchTable(
        name="moe",
        model_types=("olmoe", "mixtral", "qwen2_moe", "qwen3_moe"),
        base_prefix="model",
        taps={**ATTENTION, **DENSE_MLP, **_router("gate")},
    ),
    ArchTable(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        base_prefix="model",
        taps={**RESIDUAL, **DENSE_MLP, **_router("gate")},
    ),
    ArchTable(
        name="gpt_oss",
        model_types=("gpt_oss",),
        base_prefix="model",
        taps={**ATTENTION, "mlp.out": Tap(f"{H}.mlp", item=0), **_router("router")},
    ),
]
