"""A self-contained HTML summary (``DIR/report.html``): figures embedded as base64, numbers, commands,
and links (relative to the report) to the maps, movies and subset STAR files.  Opens without a server."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".svg": "image/svg+xml"}

_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f0f0f0; text-align: left; } code, pre { background: #f6f6f6; padding: 2px 4px; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; } figcaption { font-size: 0.9em; color: #555; }
"""


@dataclass
class Section:
    title: str
    text: str = ""
    figures: list[tuple[Path, str]] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    files: list[tuple[Path, str]] = field(default_factory=list)


def _embed(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def render_html(title: str, commands: list[str], sections: list[Section], report_dir: Path,
                refresh_seconds: int | None = None) -> str:
    """HTML text of the report; file links are relative to ``report_dir``.  ``refresh_seconds``: a browser reloads
    the page that often (the live report of a running job)."""
    refresh = f"<meta http-equiv='refresh' content='{int(refresh_seconds)}'>" if refresh_seconds else ""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'>{refresh}<title>{html.escape(title)}</title>",
           f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if commands:
        out.append("<h2>Commands</h2>")
        out.extend(f"<pre>{html.escape(c)}</pre>" for c in commands)
    for s in sections:
        out.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            out.append(f"<p>{html.escape(s.text)}</p>")
        for caption, header, rows in s.tables:
            out.append(f"<table><caption>{html.escape(caption)}</caption><tr>")
            out.extend(f"<th>{html.escape(h)}</th>" for h in header)
            out.append("</tr>")
            for row in rows:
                out.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
            out.append("</table>")
        for path, caption in s.figures:
            if Path(path).is_file():
                out.append(f"<figure><img src='{_embed(Path(path))}' alt='{html.escape(caption)}'>"
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        if s.files:
            out.append("<ul>")
            for path, caption in s.files:
                rel = os.path.relpath(Path(path), report_dir)
                out.append(f"<li><a href='{html.escape(rel)}'>{html.escape(rel)}</a> {html.escape(caption)}</li>")
            out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(path: Path, title: str, commands: list[str], sections: list[Section],
                 refresh_seconds: int | None = None) -> Path:
    """Write the report atomically to ``path`` (normally ``DIR/report.html``)."""
    from relion_dynamight.relion.jobdir import atomic_write_text

    atomic_write_text(Path(path), render_html(title, commands, sections, Path(path).parent, refresh_seconds))
    return Path(path)
