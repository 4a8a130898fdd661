"""The offline natural-text source: standard-library docstrings as prose paragraphs, seeded."""

from __future__ import annotations

from mechkit.tasks.docstrings import python_docstrings


def test_paragraphs_are_prose_deduplicated_and_seeded():
    paragraphs = python_docstrings()
    assert len(paragraphs) > 500
    assert len(set(paragraphs)) == len(paragraphs)
    assert not any(p.startswith(">>>") or "\n" in p for p in paragraphs)
    assert all(len(p) <= 400 and p[0].isupper() for p in paragraphs)
    assert python_docstrings(50, seed=3) == python_docstrings(seed=3)[:50]
    assert python_docstrings(50, seed=3) != python_docstrings(50, seed=4)
