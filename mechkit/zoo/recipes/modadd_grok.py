"""Recipe for ``modadd-grok``: a 1-layer GPT-2 that groks (a+b) mod 59.

Prompts are ``"a b ="`` (three word-level tokens); the answer is read at the last position. 30% of
the 59² pairs train, full batch, AdamW (lr 3e-3, weight decay 1.0, betas 0.9/0.98): train accuracy
saturates within ~50 steps, test accuracy jumps only after ~2,000 — delayed generalisation. About
20 fp16 checkpoints across training are shipped, denser where the accuracies move.

    python -c "from mechkit.zoo.recipes import modadd_grok; modadd_grok.train('assets/zoo/modadd-grok')"
"""

from __future__ import annotations

from pathlib import Path

from mechkit.tasks.modarith import ModArithTask
from mechkit.zoo.recipes import grok

NAME = "modadd-grok"
SEED = 0


def spec(*, steps: int | None = None, smoke: bool = False) -> grok.RunSpec:
    """The run settings (``smoke``: a tiny model and a few steps, for CI)."""
    if smoke:
        task = ModArithTask(p=11, ops=("+",), train_frac=0.3, seed=SEED)
        model = dict(n_embd=16, n_head=2, n_inner=32)
        sched = dict(steps=steps or 30, eval_every=5, n_checkpoints=4, state_every=10)
    else:
        task = ModArithTask(p=59, ops=("+",), train_frac=0.3, seed=SEED)
        model = dict(n_embd=128, n_head=4, n_inner=512)
        sched = dict(steps=steps or 3000, eval_every=50, n_checkpoints=20, state_every=250)
    model_config = dict(
        vocab_size=len(task.vocab),
        n_positions=16,
        n_layer=1,
        activation_function="relu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        **model,
    )
    return grok.RunSpec(
        name=NAME,
        recipe=__name__,
        task=task,
        arch="gpt2",
        model_config=model_config,
        seed=SEED,
        lr=3e-3,
        weight_decay=1.0,
        betas=(0.9, 0.98),
        warmup=10,
        decay_frac=0.75,
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
    """Train/test accuracy and loss of the model (or checkpoint) folder ``path``."""
    return grok.evaluate(Path(path))
