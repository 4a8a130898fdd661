"""The short summary of a run folder: ``summary.md`` and a self-contained ``summary.html``
(figures embedded), one section per step and seed with its headline table."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from mechkit.atomic import atomic_write_text

__all__ = ["write_summary"]

ROWS = 8


def write_summary(out: Path, exp: Any, manifest: dict[str, Any]) -> None:
    md = [f"# {exp.name}", "", exp.description or "", "",
          f"Model `{exp.model}` ({exp.backend}), seeds {list(exp.seeds)}, data `{exp.data}`.", ""]
    body = [f"<h1>{html.escape(exp.name)}</h1><p>{html.escape(exp.description or '')}</p>",
            f"<p>Model <code>{html.escape(exp.model)}</code> ({html.escape(exp.backend)}), seeds "
            f"{list(exp.seeds)}</p>"]
    for key, record in sorted(manifest["steps"].items()):
        folder = out / "steps" / key
        table = _table(folder)
        md += [f"## {key} — {record['method']} ({record['seconds']} s)", ""]
        body.append(f"<h2>{html.escape(key)} — {html.escape(record['method'])} ({record['seconds']} s)</h2>")
        if table is not None:
            md += [table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False), ""]
            body.append(table.to_html(index=False, float_format=lambda v: f"{v:.4g}"))
        if (folder / "figure.png").is_file():
            md += [f"![{key}](steps/{key}/figure.png)", ""]
            data = base64.b64encode((folder / "figure.png").read_bytes()).decode()
            body.append(f'<img alt="{html.escape(key)}" src="data:image/png;base64,{data}">')
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(exp.name) +
            "</title><style>body{font-family:sans-serif;max-width:960px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>"
            + "".join(body) + "</body></html>\n")
    atomic_write_text(out / "summary.html", page)


def _table(folder: Path) -> Any:
    """The step's headline rows: its top cells when the table has a score column, else its first rows."""
    import pandas as pd

    path = folder / "table.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    if "score" in frame.columns:
        frame = frame.dropna(subset=["score"])
        frame = frame.loc[frame["score"].abs().sort_values(ascending=False).index]
    return frame.head(ROWS)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
