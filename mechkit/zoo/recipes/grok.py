"""The full-batch training run shared by the grokking recipes (``modadd-grok``, ``moe-grok``,
``moe-grok-deep``).

Layout of a trained folder ``out/``::

    config.json  model.safetensors (final, fp32)  tokenizer files  split.safetensors  card.json
    checkpoints/index.json
    checkpoints/step-000123/  config.json  model.safetensors (compact dtype)  tokenizer files

Training resumes through :class:`mechkit.zoo.recipes.loop.Trainer`: an interrupted run ends with the
same weights as an uninterrupted one (given the same torch build and thread count).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mechkit import atomic
from mechkit.tasks import modarith
from mechkit.tasks.modarith import ModArithTask
from mechkit.zoo.recipes import folders, loop, metrics

ARCHS = {  # name -> (config class, model class) in transformers
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPLIT_FILE = "split.safetensors"
OUTPUTS = ("checkpoints", "card.json", "model.safetensors", SPLIT_FILE)


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a training run (and so its resumability)."""

    name: str
    """Zoo name of the model."""
    recipe: str
    """Module path of the recipe (recorded in card.json; ``evaluate`` dispatches on it)."""
    task: ModArithTask
    arch: str
    """Key of :data:`ARCHS`."""
    model_config: dict
    """Keyword arguments of the transformers config class."""
    seed: int = 0
    """Seed of the model initialisation."""
    steps: int = 3000
    """Full-batch AdamW steps."""
    lr: float = 3e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: int = 10
    """Linear learning-rate warm-up steps."""
    decay_frac: float = 0.75
    """Cosine decay of the learning rate (to 5%) over the steps after this fraction of training."""
    grad_clip: float = 0.0
    """Gradient-norm clipping (0 = off)."""
    aux_loss_coef: float = 0.0
    """Weight of the router load-balancing loss (MoE models)."""
    aux_loss_per_layer: bool = False
    """Balance each MoE layer on its own (mean over layers of the Switch loss of that layer) instead
    of the transformers loss, which pools the routing of all layers: a layer can collapse there
    while the pooled load stays even."""
    router_z_loss_coef: float = 0.0
    """Weight of the router z-loss, the mean over MoE layers of the mean squared log-sum-exp of the
    router logits (OLMoE trains with 0.001). Unlike load balancing it sees the logit shared by every
    expert, so it also moves the router's mean expert row."""
    router_weight_decay: float | None = None
    """Weight decay of the MoE router matrices (None: ``weight_decay`` like every other parameter)."""
    center_router: bool = False
    """Subtract each router's mean expert row after every step (and at initialisation). The softmax
    over experts cannot see that row, so the model's function is unchanged; it fixes the gauge of
    W_ℓ, whose mean row otherwise drifts under Adam's per-coordinate steps."""
    eval_every: int = 50
    """Candidate checkpoints are evaluated and written every this many steps (plus early ones)."""
    n_checkpoints: int = 20
    """How many candidate checkpoints are shipped."""
    early_every: int = 0
    """If > 0, candidates are also evaluated every this many steps up to step 200, so that the step
    where train accuracy reaches 99% is located more finely (0: the fixed early steps only)."""
    state_every: int = 250
    """Training state is saved every this many steps."""
    checkpoint_dtype: str = "float16"
    smoke: bool = False
    extra: dict = field(default_factory=dict)
    """Free-form notes recorded in the card."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        if self.checkpoint_dtype not in DTYPES:
            raise ValueError(f"checkpoint_dtype must be one of {sorted(DTYPES)}")
        if self.steps < 1 or self.eval_every < 1 or self.state_every < 1 or self.n_checkpoints < 2:
            raise ValueError("steps, eval_every, state_every must be >= 1 and n_checkpoints >= 2")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["task"] = self.task.to_dict()
        d["betas"] = list(self.betas)
        for key in ("early_every", "aux_loss_per_layer", "center_router", "router_z_loss_coef"):
            if not d[key]:  # cards of runs without them stay as they were
                del d[key]
        if d["router_weight_decay"] is None:
            del d["router_weight_decay"]
        return d


def build_model(spec: RunSpec):
    import transformers

    config_cls, model_cls = (getattr(transformers, c) for c in ARCHS[spec.arch])
    return model_cls(config_cls(**spec.model_config, **spec.task.special_ids()))


def router_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The router matrices ``[num_experts, hidden]`` of every MoE layer (``...gate.weight``)."""
    n_experts = getattr(model.config, "num_experts", None) or getattr(model.config, "num_local_experts", None)
    return [p for name, p in model.named_parameters()
            if name.endswith("gate.weight") and p.dim() == 2 and p.shape[0] == n_experts]


def make_optimizer(spec: RunSpec, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over all parameters; routers in their own group when ``router_weight_decay`` is set."""
    if spec.router_weight_decay is None:
        params = model.parameters()
    else:
        routers = {id(p) for p in router_weights(model)}
        params = [{"params": [p for p in model.parameters() if id(p) not in routers]},
                  {"params": router_weights(model), "weight_decay": spec.router_weight_decay}]
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas)


def center_routers(model: torch.nn.Module) -> None:
    """Remove each router's mean expert row (invisible to the softmax over experts)."""
    with torch.no_grad():
        for w in router_weights(model):
            w.sub_(w.mean(0, keepdim=True))


def lr_at(spec: RunSpec, step: int) -> float:
    f = min(1.0, step / spec.warmup) if spec.warmup else 1.0
    start = int(spec.decay_frac * spec.steps)
    if step > start and spec.steps > start:
        f *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - start) / (spec.steps - start)))
    return spec.lr * f


def candidate_steps(spec: RunSpec) -> list[int]:
    early = {s for s in (10, 20, 30, 40, 50, 75, 100, 150, 200) if s < spec.steps}
    if spec.early_every:
        early |= set(range(spec.early_every, min(200, spec.steps), spec.early_every))
    regular = set(range(spec.eval_every, spec.steps, spec.eval_every))
    return sorted({0, spec.steps} | early | regular)


def train(spec: RunSpec, out: Path, *, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) ``spec`` into ``out``; returns the card. ``stop_after=k`` stops after step k
    as an interrupt would (without saving beyond the regular schedule) and returns
    ``{"interrupted": True, "step": k}``."""
    from tqdm.auto import tqdm

    out = Path(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = build_model(spec)
        model.train()
        if spec.center_router:
            center_routers(model)
        opt = make_optimizer(spec, model)
        trainer = loop.Trainer(out, spec, model, opt, outputs=OUTPUTS)
        start = trainer.resume_or_start()
        with tqdm(total=spec.steps, initial=start, desc=spec.name, disable=not progress) as bar:
            stopped = _run(spec, trainer, start, bar, stop_after)
        if stopped is not None:
            return {"interrupted": True, "step": stopped}
        return _finish(spec, trainer)


def _run(spec: RunSpec, trainer: loop.Trainer, start: int, bar, stop_after: int | None) -> int | None:
    """Steps ``start + 1 ..``; returns the step after which ``stop_after`` stopped the run, else None."""
    model, opt, out = trainer.model, trainer.opt, trainer.out
    data = modarith.make_data(spec.task)
    x_train, y_train = data.tokens[data.train], data.labels[data.train]
    tok_dir = trainer.state_dir / "tokenizer"
    modarith.save_tokenizer(spec.task, tok_dir)
    ckpt_dtype = DTYPES[spec.checkpoint_dtype]
    evaluator = copy.deepcopy(model).eval()
    candidates = set(candidate_steps(spec))
    fwd_kwargs = {"output_router_logits": True} if spec.aux_loss_coef or spec.router_z_loss_coef else {}

    def checkpoint(step: int) -> None:
        # the shipped checkpoint is rounded to its dtype; its metrics are measured on what is shipped
        state = {k: v.detach().to(ckpt_dtype).to(v.dtype) for k, v in model.state_dict().items()}
        folders.write_hf_folder(out / "checkpoints" / f"step-{step:06d}", state, model.config, tok_dir,
                                ckpt_dtype)
        evaluator.load_state_dict(state)
        rec = {"step": step, **metrics.evaluate_model(evaluator, spec.task, data), "lr": lr_at(spec, step)}
        trainer.records.append(rec)
        bar.set_postfix(train=f"{rec['train_acc']:.3f}", test=f"{rec['test_acc']:.3f}")

    if start == 0:
        checkpoint(0)
        trainer.save_checkpoint(0)
    for step in range(start + 1, spec.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(spec, step)
        res = model(x_train, logits_to_keep=1, **fwd_kwargs)
        loss = torch.nn.functional.cross_entropy(res.logits[:, -1].float(), y_train)
        if spec.aux_loss_coef:
            aux = per_layer_balance_loss(res.router_logits, spec) if spec.aux_loss_per_layer else res.aux_loss
            loss = loss + spec.aux_loss_coef * aux
        if spec.router_z_loss_coef:
            loss = loss + spec.router_z_loss_coef * router_z_loss(res.router_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        if spec.center_router:
            center_routers(model)
        bar.update()
        if step in candidates:
            checkpoint(step)
        if step % spec.state_every == 0 or step == spec.steps:
            trainer.save_checkpoint(step)
        if stop_after is not None and stop_after <= step < spec.steps:
            return step
    return None


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], spec: RunSpec) -> torch.Tensor:
    """Mean over MoE layers of the Switch load-balancing loss of each layer, E · Σ_e f_e · P_e (f_e:
    fraction of the tokens that route to expert e in one of their top-k slots, P_e: mean router
    probability): transformers' loss of each layer alone (top_k at uniform routing)."""
    n_experts, k = spec.model_config["num_experts"], spec.model_config["num_experts_per_tok"]
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        chosen = torch.nn.functional.one_hot(probs.topk(k, -1).indices, n_experts).float()  # [T, k, E]
        losses.append(n_experts * (chosen.mean(0) * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over MoE layers of mean_t logsumexp(z_t)² (ST-MoE's router z-loss, as OLMoE uses it)."""
    return torch.stack([logits.float().logsumexp(-1).square().mean() for logits in router_logits]).mean()


def _finish(spec: RunSpec, trainer: loop.Trainer) -> dict:
    out, model = trainer.out, trainer.model
    data = modarith.make_data(spec.task)
    records = sorted(trainer.records, key=lambda r: r["step"])
    final = metrics.evaluate_model(model, spec.task, data)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    folders.write_hf_files(out, state, model.config, trainer.state_dir / "tokenizer")
    atomic.atomic_save_safetensors({"train": data.train.to(torch.uint8)}, out / SPLIT_FILE,
                                   metadata={"what": "train mask over make_data(task) examples"})
    chosen = set(metrics.select_checkpoints(records, spec.n_checkpoints, spec.steps))
    for d in (out / "checkpoints").glob("step-*"):
        if int(d.name[5:]) not in chosen:
            shutil.rmtree(d)
    mem = metrics.first_step(records, "train_acc", 0.99)
    gen = metrics.first_step(records, "test_acc", 0.95)
    index = {
        "name": spec.name,
        "total_steps": spec.steps,
        "checkpoint_dtype": spec.checkpoint_dtype,
        "step_train_99": mem,
        "step_test_95": gen,
        "checkpoints": [{"path": f"step-{r['step']:06d}", **r} for r in records if r["step"] in chosen],
        "curve": records,
    }
    atomic.atomic_write_json(out / "checkpoints" / "index.json", index, indent=2)
    card = _card(spec, trainer, {**final, "step_train_99": mem, "step_test_95": gen}, len(chosen))
    atomic.atomic_write_json(out / "card.json", card, indent=2)
    for f in (out / SPLIT_FILE, out / "card.json", out / "checkpoints" / "index.json"):
        folders.publish(f)
    trainer.finish()
    return card


def _card(spec: RunSpec, trainer: loop.Trainer, final: dict, n_checkpoints: int) -> dict:
    import transformers

    import mechkit

    skip = ("name", "recipe", "task", "model_config", "seed", "extra", "smoke")
    return {
        "name": spec.name,
        "recipe": spec.recipe,
        "seed": spec.seed,
        "task": spec.task.to_dict(),
        "architecture": ARCHS[spec.arch][1],
        "model_config": spec.model_config,
        "n_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "hyperparameters": {k: v for k, v in spec.to_dict().items() if k not in skip},
        "training_steps": spec.steps,
        "full_batch": True,
        "metrics": final,
        "checkpoints": n_checkpoints,
        "wall_time_s": round(trainer.elapsed_s, 1),
        "sessions": trainer.sessions,
        "torch_threads": torch.get_num_threads(),
        "smoke": spec.smoke,
        "notes": spec.extra,
        "mechkit_version": mechkit.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def evaluate(path: Path) -> dict:
    """Re-measure train/test accuracy and loss of a trained folder or one of its checkpoints."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    root = next((d for d in (path, *list(path.resolve().parents)[:2]) if (d / "card.json").is_file()), None)
    if root is None:
        raise FileNotFoundError(f"no card.json in {path} or its two parent folders")
    card = json.loads((root / "card.json").read_text())
    task = ModArithTask.from_dict(card["task"])
    split = root / SPLIT_FILE
    mask = load_file(split)["train"].bool() if split.is_file() else None
    data = modarith.make_data(task, mask)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return metrics.evaluate_model(model, task, data)
