"""CE-loss recovered and KL: an SAE's reconstruction spliced into the model at its site.

Three runs over the same prompts: clean, with the site replaced by the SAE's reconstruction
(``model.splice(site, sae, keep_error=False)``) and with the site ablated (zero or its mean over
real tokens). Next-token cross-entropy counts only predictions of real tokens, so padded batches
give what prompt-by-prompt runs give; KL is taken at every real position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.interventions import Mean, Zero
from mechkit.sae.functional import ce_loss_recovered


def next_token_loss(logits: Tensor, input_ids: Tensor, mask: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over predictions whose target is a real token, and their count."""
    target_real = mask[:, 1:].bool()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:],
                                               reduction="none")
    return float(losses[target_real].sum()), int(target_real.sum())


def ce_recovered(model: Any, sae: Any, site: str, prompts: Sequence[str], *, ablation: str = "zero",
                 batch_size: int = 16) -> dict[str, float]:
    """``ce_clean``, ``ce_sae``, ``ce_ablated`` (nats per predicted token), ``recovered`` and ``kl``
    (mean KL(clean ‖ spliced) over real positions)."""
    if ablation not in ("zero", "mean"):
        raise MechkitError(f"ablation={ablation!r}: use 'zero' or 'mean'")
    if not prompts:
        raise MechkitError("no prompts to evaluate the SAE on")
    ablate = Zero() if ablation == "zero" else Mean(over="tokens")
    totals = {"clean": 0.0, "sae": 0.0, "ablated": 0.0}
    kl_sum, count, positions = 0.0, 0, 0
    for start in range(0, len(prompts), batch_size):
        batch = model.tokenize(list(prompts[start:start + batch_size]))
        clean = model(batch)
        with model.splice(site, sae, keep_error=False):
            spliced = model(batch)
        ablated, _ = model.run_with_interventions(batch, {site: ablate})
        for name, logits in (("clean", clean), ("sae", spliced), ("ablated", ablated)):
            loss, n = next_token_loss(logits, batch.input_ids, batch.attention_mask)
            totals[name] += loss
        count += n
        real = batch.attention_mask.bool()
        kl = (clean.log_softmax(-1).exp() * (clean.log_softmax(-1) - spliced.log_softmax(-1))).sum(-1)
        kl_sum, positions = kl_sum + float(kl[real].sum()), positions + int(real.sum())
    if count == 0:
        raise MechkitError("the prompts have no next-token predictions (every prompt is one token long)")
    ce = {k: v / count for k, v in totals.items()}
    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_ablated": ce["ablated"],
            "recovered": ce_loss_recovered(ce["clean"], ce["sae"], ce["ablated"]), "kl": kl_sum / positions}
