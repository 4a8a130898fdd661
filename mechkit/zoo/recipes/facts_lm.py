"""Recipe for ``facts-lm``: a 4-layer LLaMA-architecture word-level LM that knows the synthetic world
and solves IOI, colored-objects, two-hop and analogy prompts in context.

Training text, drawn afresh at every step from the task generators (deterministic in seed and step):

- repeated sequences of random words (``w1 … wn w1 … wn``, loss on the repeat), alone in the first
  phase of the ``curriculum`` and in every step after: an induction head forms first, and the
  in-context look-ups (colored objects, two-hop) build on its previous-token heads. Rotary position
  embeddings matter here: with GPT-2's learned absolute positions no induction head formed within
  650 steps, with rotary ones it forms by step ~200;
- the world corpus (``world.corpus``, training templates only), packed into rows, full LM loss;
- IOI, colored objects (2-5 objects), two-hop questions with the facts in context (0-3 distractors,
  half of them counterfactual) and analogies (both formats), one item per row: loss weight 1 on the
  answer token and ``context_weight`` on the prompt tokens, except the ``answer_only`` sources
  (colored objects, two-hop: a scene's random colors are noise to predict) and counterfactual
  contexts, whose prompts carry no loss so that they never teach wrong facts.

Held out: prompts whose CRC-32 falls in the evaluation bucket never train (:func:`is_eval_prompt`),
the evaluation sets use seeds no training step uses, and facts are asked through the paraphrase
templates the corpus never contains. Accuracy = greedy next token at the last prompt position equals
the answer. The run saves its state (safetensors + JSON) every ``state_every`` steps and resumes
from it bit-identically; the folder is written atomically at the end.

    OMP_NUM_THREADS=1 python -c "from mechkit.zoo.recipes import facts_lm; facts_lm.train('assets/zoo/facts-lm')"
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mechkit import atomic, tasks
from mechkit.zoo.recipes import folders, loop
from mechkit.zoo.recipes.facts_eval import EVAL_BUCKETS, EVAL_SEED, eval_sets, is_eval_prompt, measure

NAME = "facts-lm"
SEED = 0
IGNORE = -100
CONTEXT = 1 << 20  # label offset marking context tokens (down-weighted loss)


@dataclass(frozen=True)
class FactsSpec:
    """Everything that determines a run (and so its resumability)."""

    name: str = NAME
    recipe: str = __name__
    seed: int = SEED
    """Seed of the model initialisation and of the training stream."""
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 64
    steps: int = 3000
    curriculum: tuple[tuple[int, tuple[str, ...]], ...] = ((300, ("induction",)),)
    """``(last step, sources)`` phases at the start, each training only those sources; every source
    trains after the last phase (the first phase: repeated sequences alone, so an induction head forms)."""
    lr: float = 3e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: int = 100
    min_lr_frac: float = 0.1
    """Cosine decay from ``lr`` to ``min_lr_frac * lr`` after the warm-up."""
    grad_clip: float = 1.0
    context_weight: float = 0.5
    """Weight of the LM loss on the prompt tokens of task rows (the answer token has weight 1)."""
    answer_only: tuple[str, ...] = ("colored_objects", "two_hop")
    """Sources whose prompt tokens carry no loss: predicting a scene's random colors and objects is
    noise that slowed the binding look-up down (no binding within 250 steps with it, 98% without)."""
    rows: tuple[tuple[str, int], ...] = (("induction", 48), ("corpus", 12), ("ioi", 8), ("colored_objects", 20),
                                         ("two_hop", 24), ("analogies", 8))
    """Rows per step for each source (each source is one forward pass at its own width)."""
    weights: tuple[tuple[str, float], ...] = (("induction", 1.0), ("corpus", 1.0), ("ioi", 1.0),
                                              ("colored_objects", 1.0), ("two_hop", 1.0), ("analogies", 1.0))
    """Weight of each source's mean loss in the step's loss."""
    eval_n: int = 500
    """Items per in-context evaluation set (the fact sets are complete)."""
    eval_every: int = 250
    state_every: int = 100
    smoke: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        return json.loads(json.dumps(d))

    def sources_at(self, step: int) -> tuple[str, ...]:
        """The sources that train at ``step`` (1-based)."""
        for last, sources in self.curriculum:
            if step <= last:
                return sources
        return tuple(source for source, _ in self.rows)

    def model_config(self) -> dict:
        """A ``LlamaConfig``: rotary positions, RMSNorm, gated MLP of width 4 · d_model, no biases."""
        return dict(vocab_size=len(tasks.build_tokenizer().get_vocab()), max_position_embeddings=self.n_positions,
                    num_hidden_layers=self.n_layer, hidden_size=self.n_embd, num_attention_heads=self.n_head,
                    num_key_value_heads=self.n_head, intermediate_size=4 * self.n_embd, rms_norm_eps=1e-5,
                    rope_theta=10000.0, attention_bias=False, mlp_bias=False, pad_token_id=0, bos_token_id=2,
                    eos_token_id=3, tie_word_embeddings=False)


def spec(*, steps: int | None = None, smoke: bool = False) -> FactsSpec:
    """The run settings (``smoke``: a tiny model, few rows and steps, for CI)."""
    if smoke:
        return FactsSpec(n_layer=2, n_embd=32, n_head=2, steps=steps or 24, curriculum=((4, ("induction",)),),
                         warmup=5, eval_n=40, eval_every=8, state_every=5, smoke=True,
                         rows=(("induction", 2), ("corpus", 2), ("ioi", 2), ("colored_objects", 2), ("two_hop", 2),
                               ("analogies", 2)))
    return FactsSpec(steps=steps or FactsSpec.steps)


# --------------------------------------------------------------------------- data


def _generate(source: str, n: int, seed: int, step: int) -> list[tasks.TaskItem]:
    """``n`` training items of ``source`` for one step, evaluation prompts removed."""
    if source == "colored_objects":
        kw: dict = {"n_objects": (2, 5)}
    elif source == "two_hop":
        kw = {"distractors": step % 4, "counterfactual": (step // 4) % 2 == 0}
    elif source == "analogies":
        kw = {"fmt": ("words", "symbols")[step % 2]}
    else:
        kw = {}
    items = [it for it in tasks.generate(source, 2 * n + 4, seed, **kw) if not is_eval_prompt(it.prompt)]
    return items[:n]


class Stream:
    """The training rows of every step, a pure function of (spec, step)."""

    def __init__(self, sp: FactsSpec) -> None:
        self.spec = sp
        self.tok = tasks.build_tokenizer()
        self.bos = self.tok.token_to_id(tasks.tokenizer.BOS)
        sentences = tasks.corpus(split="train", seed=sp.seed)
        self.sentences = [self.tok.encode(s, add_special_tokens=False).ids for s in sentences]
        vocab = self.tok.get_vocab()
        self.words = sorted(i for w, i in vocab.items() if w.isalpha())  # no punctuation or special tokens

    def batch(self, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """source -> (input ids [n, T], labels [n, T] with -100 where no loss)."""
        sp = self.spec
        seed = sp.seed * 10**7 + step
        out = {}
        for source, n in sp.rows:
            if source not in sp.sources_at(step):
                continue
            if source == "induction":
                rows, labels = self._repeat_rows(n, seed)
            elif source == "corpus":
                rows, labels = self._corpus_rows(n, seed)
            else:
                rows, labels = [], []
                for it in _generate(source, n, seed, step):
                    row, lab = self._task_row(it, source in sp.answer_only)
                    rows.append(row)
                    labels.append(lab)
            out[source] = _pad(rows, labels, sp.n_positions)
        return out

    def _task_row(self, it: tasks.TaskItem, answer_only: bool) -> tuple[list[int], list[int]]:
        """``<bos> prompt answer``: the answer is the target; the prompt tokens carry the context
        loss, except counterfactual contexts (their facts contradict the world) and ``answer_only`` rows."""
        ids = self.tok.encode(it.prompt + it.answer).ids
        masked = answer_only or bool(it.meta.get("counterfactual"))
        return ids, [IGNORE, *[IGNORE if masked else CONTEXT + i for i in ids[1:-1]], ids[-1]]

    def _repeat_rows(self, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
        """``<bos> w1 … wk w1 … wk`` (k in 6–14 distinct random words): targets are the repeat's
        tokens after its first, predictable only by looking back."""
        gen = torch.Generator().manual_seed(seed)
        rows, labels = [], []
        for _ in range(n):
            k = int(torch.randint(6, 15, (), generator=gen))
            words = [self.words[i] for i in torch.randperm(len(self.words), generator=gen)[:k].tolist()]
            rows.append([self.bos, *words, *words])
            labels.append([IGNORE] * (k + 2) + words[1:])
        return rows, labels

    def _corpus_rows(self, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.sentences), generator=gen).tolist()
        rows, k = [], 0
        for _ in range(n):
            row = [self.bos]
            while len(row) + len(self.sentences[order[k % len(order)]]) <= self.spec.n_positions:
                row += self.sentences[order[k % len(order)]]
                k += 1
            rows.append(row)
        return rows, [[IGNORE, *r[1:]] for r in rows]


def row_loss(logits: torch.Tensor, labels: torch.Tensor, context_weight: float) -> torch.Tensor:
    """Mean loss on the target tokens plus ``context_weight`` times the mean on context tokens
    (labels offset by ``CONTEXT``); labels are aligned with the inputs (shifted here)."""
    logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    ids = torch.where(labels >= 0, labels % CONTEXT, torch.zeros_like(labels))
    ce = torch.nn.functional.cross_entropy(logits, ids, reduction="none")
    target, context = (labels >= 0) & (labels < CONTEXT), labels >= CONTEXT
    loss = ce[target].mean()
    if context_weight and context.any():
        loss = loss + context_weight * ce[context].mean()
    return loss


def _pad(rows: list[list[int]], labels: list[list[int]], limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    if width > limit:
        raise ValueError(f"a training row has {width} tokens, more than the context of {limit}")
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, y) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(y)] = torch.tensor(y)
    return ids, lab


# --------------------------------------------------------------------------- evaluation sets


def evaluate(path: Path) -> dict:
    """Re-measure the card's per-task accuracies of the model folder ``path``."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    card = json.loads((path / "card.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return measure(model, tasks.load_tokenizer(path), card["eval"]["n"])


# --------------------------------------------------------------------------- training


def lr_at(sp: FactsSpec, step: int) -> float:
    import math

    if step <= sp.warmup:
        return sp.lr * step / sp.warmup
    t = (step - sp.warmup) / max(1, sp.steps - sp.warmup)
    return sp.lr * (sp.min_lr_frac + (1 - sp.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train(out: Path, *, steps: int | None = None, smoke: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Train (or resume an interrupted run) into ``out``; returns the card. ``stop_after=k`` stops
    after step k as an interrupt would and returns ``{"interrupted": True, "step": k}``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sp, out = spec(steps=steps, smoke=smoke), Path(out)
    state_dir = out / loop.STATE_DIR
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sp.seed)
        model = LlamaForCausalLM(LlamaConfig(**sp.model_config()))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=sp.lr, weight_decay=sp.weight_decay, betas=sp.betas)
        meta = loop.load_state(state_dir, sp, model, opt)
        loop.remove_partial_writes(out)
        if meta is None:
            for name in ("card.json", "model.safetensors"):  # outputs of an earlier finished run
                (out / name).unlink(missing_ok=True)
            meta = {"step": 0, "records": [], "elapsed_s": 0.0, "sessions": 0}
        return _run(sp, out, model, opt, meta, progress, stop_after)


def _run(sp: FactsSpec, out: Path, model, opt, meta: dict, progress: bool, stop_after: int | None) -> dict:
    from tqdm.auto import tqdm

    state_dir = out / loop.STATE_DIR
    tok_dir = state_dir / "tokenizer"
    tasks.save_tokenizer(tok_dir, model_max_length=sp.n_positions)
    tokenizer = tasks.load_tokenizer(tok_dir)
    stream, weights = Stream(sp), dict(sp.weights)
    t0, start = time.perf_counter(), meta["step"]
    info = {"records": [r for r in meta["records"] if r["step"] <= start], "elapsed_s": meta["elapsed_s"],
            "sessions": meta["sessions"] + 1}

    def save(step: int) -> None:
        info["elapsed_s"] = meta["elapsed_s"] + time.perf_counter() - t0
        loop.save_state(state_dir, sp, model, opt, step, info)

    with tqdm(total=sp.steps, initial=start, desc=sp.name, disable=not progress) as bar:
        if start == 0:
            save(0)
        for step in range(start + 1, sp.steps + 1):
            for g in opt.param_groups:
                g["lr"] = lr_at(sp, step)
            losses = {}
            for source, (ids, labels) in stream.batch(step).items():
                logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits.float()
                losses[source] = row_loss(logits, labels, sp.context_weight)
            loss = sum(weights[s] * v for s, v in losses.items()) / sum(weights[s] for s in losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sp.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), sp.grad_clip)
            opt.step()
            bar.update()
            if step % sp.eval_every == 0 or step == sp.steps:
                rec = {"step": step, "loss": {s: round(v.item(), 4) for s, v in losses.items()},
                       **measure(model, tokenizer, min(sp.eval_n, 200))}
                info["records"].append(rec)
                bar.set_postfix({k[:8]: f"{v:.2f}" for k, v in rec.items() if isinstance(v, float)})
            if step % sp.state_every == 0 or step == sp.steps:
                save(step)
            if stop_after is not None and stop_after <= step < sp.steps:
                return {"interrupted": True, "step": step}
    return _finish(sp, out, model, tok_dir, info, meta["elapsed_s"] + time.perf_counter() - t0)


def _finish(sp: FactsSpec, out: Path, model, tok_dir: Path, info: dict, elapsed: float) -> dict:
    import transformers

    import mechkit

    state = {k: v.detach() for k, v in model.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=".main-", dir=out))
    try:
        folders.write_hf_folder(tmp / "m", state, model.config, tok_dir, torch.float32)
        for f in (tmp / "m").iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Measure what was written, through the same path a user takes.
    from transformers import AutoModelForCausalLM

    stored = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    metrics = measure(stored, tasks.load_tokenizer(out), sp.eval_n)
    sets = eval_sets(sp.eval_n)
    hyper = {k: v for k, v in sp.to_dict().items() if k not in ("name", "recipe", "seed", "smoke")}
    card = {
        "name": sp.name,
        "recipe": sp.recipe,
        "seed": sp.seed,
        "world_seed": 0,
        "architecture": "LlamaForCausalLM",
        "model_config": sp.model_config(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "weights_dtype": "float32",
        "weights_bytes": (out / "model.safetensors").stat().st_size,
        "hyperparameters": hyper,
        "training_steps": sp.steps,
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
        "chance": {k: round(c, 4) for k, (_, c, _) in sets.items()},
        "eval": {"n": sp.eval_n, "seed": EVAL_SEED, "buckets": EVAL_BUCKETS,
                 "sizes": {k: len(ts) for k, (ts, _, _) in sets.items()},
                 "sets": {k: d for k, (_, _, d) in sets.items()},
                 "rule": "greedy next token at the last prompt position == first answer token"},
        "curve": info["records"],
        "wall_time_s": round(elapsed, 1),
        "sessions": info["sessions"],
        "torch_threads": torch.get_num_threads(),
        "smoke": sp.smoke,
        "mechkit_version": mechkit.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    atomic.atomic_write_json(out / "card.json", card)
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)  # temp files are private; the model folder is an ordinary one
    shutil.rmtree(out / loop.STATE_DIR, ignore_errors=True)
    return card
