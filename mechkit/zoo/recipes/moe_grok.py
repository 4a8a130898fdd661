"""Recipe for ``moe-grok``: a 2-layer OLMoE (4 experts, top-2) that groks a modular-arithmetic
mixture, (a+b) mod 59 and (a-b) mod 59.

Prompts are ``"a + b ="`` / ``"a - b ="`` (four word-level tokens); the answer is read at the last
position. Half of the 2·59² examples train, full batch, AdamW (lr 3e-3, weight decay 1.0, betas
0.9/0.98) plus OLMoE's router load-balancing loss (0.01). Train accuracy saturates early, test
accuracy jumps much later. About 20 fp16 checkpoints across training are shipped: the testbed for
routing-pathway metrics on a real HF MoE implementation (routers at ``model.layers.L.mlp.gate``).

    python -c "from mechkit.zoo.recipes import moe_grok; moe_grok.train('assets/zoo/moe-grok')"
"""

from __future__ import annotations

from pathlib import Path

from mechkit.tasks.modarith import ModArithTask
from mechkit.zoo.recipes import grok

NAME = "moe-grok"
SEED = 0


def spec(*, steps: int | None = None, smoke: bool = False) -> grok.RunSpec:
    """The run settings (``smoke``: a tiny model and a few steps, for CI)."""
    if smoke:
        task = ModArithTask(p=7, ops=("+", "-"), train_frac=0.5, seed=SEED)
        model = dict(hidden_size=16, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2)
        sched = dict(steps=steps or 20, eval_every=5, n_checkpoints=4, state_every=10)
    else:
        task = ModArithTask(p=59, ops=("+", "-"), train_frac=0.5, seed=SEED)
        model = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4)
        sched = dict(steps=steps or 3000, eval_every=50, n_checkpoints=20, state_every=100)
    model_config = dict(
        vocab_size=len(task.vocab),
        num_hidden_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.01,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        **model,
    )
    return grok.RunSpec(
        name=NAME,
        recipe=__name__,
        task=task,
        arch="olmoe",
        model_config=model_config,
        seed=SEED,
        lr=3e-3,
        weight_decay=1.0,
        betas=(0.9, 0.98),
        warmup=10,
        decay_frac=0.75,
        aux_loss_coef=0.01,
        checkpoint_dtype="float16",
        smoke=smoke,
        **sched,
    )


def train(
    out: Path,
    *,
    steps: int | None = None,
    smoke: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Train (or resume an interrupted run) into ``out``; returns the card (see :mod:`mechkit.zoo.recipes.grok`)."""
    return grok.train(spec(steps=steps, smoke=smoke), Path(out), progress=progress, stop_after=stop_after)


def evaluate(path: Path) -> dict:
    """Train/test accuracy and loss (overall and per operation) of a model or checkpoint folder."""
    return grok.evaluate(Path(path))
