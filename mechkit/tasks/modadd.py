"""Modular addition "a + b =" -> " (a+b) mod p", split into train and test for grokking runs.

The split is exact: ``round(train_frac * N)`` training items (N = ``n`` or all p² pairs), the
training items first. ``corrupt_frac`` replaces the label of exactly ``round(corrupt_frac *
n_train)`` training items with a wrong residue (memorisation pressure); test labels are always
true. ``meta`` carries the integers (``a``, ``b``, ``c`` = true sum, ``target`` = trained label) so
a model with one token per residue can skip text entirely. The word-level tokenizer knows the
numbers below ``tokenizer.MAX_NUMBER``.
"""

from __future__ import annotations

from .base import TaskItem, TaskSet, check_fraction, check_n, make_rng


def is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p**0.5) + 1))


def modadd(n: int | None = None, seed: int = 0, *, p: int = 113, train_frac: float = 0.3,
           corrupt_frac: float = 0.0) -> TaskSet:
    """Pairs (a, b) in [0, p)² (all of them when ``n`` is None), split and optionally label-corrupted.

    ``p`` must be prime: the Fourier mechanism that grokking models learn, and the uniform
    structure of the test set, rely on Z/p being a field.
    """
    if isinstance(p, bool) or not isinstance(p, int) or not is_prime(p):
        raise ValueError(f"p must be a prime number, got {p!r}")
    check_fraction("train_frac", train_frac)
    check_fraction("corrupt_frac", corrupt_frac, allow_zero=True)
    total = p * p
    if n is None:
        n = total
    elif check_n(n) > total:
        raise ValueError(f"n={n} exceeds the {total} distinct pairs for p={p}")
    n_train = round(train_frac * n)
    if not 0 < n_train < n:
        raise ValueError(f"train_frac={train_frac} leaves an empty train or test split for n={n}")
    n_corrupt = round(corrupt_frac * n_train)
    rng = make_rng("modadd", seed)
    pairs = [divmod(i, p) for i in rng.sample(range(total), n)]
    corrupted = set(rng.sample(range(n_train), n_corrupt))
    items = []
    for i, (a, b) in enumerate(pairs):
        c = (a + b) % p
        target = (c + rng.randrange(1, p)) % p if i in corrupted else c
        b_bad = (b + rng.randrange(1, p)) % p  # changes the sum, keeps the token count
        meta = {"a": a, "b": b, "c": c, "target": target, "p": p,
                "split": "train" if i < n_train else "test", "label_corrupted": i in corrupted}
        items.append(TaskItem(f"{a} + {b} =", f" {target}", f"{a} + {b_bad} =", f" {(a + b_bad) % p}",
                              None, meta))
    params = {"n": n, "seed": seed, "p": p, "train_frac": train_frac, "corrupt_frac": corrupt_frac,
              "n_train": n_train, "n_corrupt": n_corrupt}
    return TaskSet("modadd", tuple(items), params)
