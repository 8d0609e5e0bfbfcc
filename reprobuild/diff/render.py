"""Render a `DiffResult` as text (summary first, then the tree), JSON (schema.json) or one HTML page.

Pure functions from the result to a string; the CLI decides where it goes and whether to colour.
The JSON form is stable: ``"schema": "reprobuild-diff/1"``, documented in ``docs/diff.md`` and
validated against ``schema.json`` in the tests. Bump the version on any incompatible change.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from typing import Any

from reprobuild.diff.compare import DiffResult
from reprobuild.diff.difference import CONTENT, Difference, Field, Status, leaves, summarize

SCHEMA_ID = "reprobuild-diff/1"
Style = Callable[..., str]


def _plain(text: str, **_: Any) -> str:
    return text


def _path(path: tuple[str, ...]) -> str:
    return " / ".join(p for p in path if p) or "(input)"


def _mark(d: Difference) -> str:
    return {Status.ADDED: "+", Status.REMOVED: "-", Status.CHANGED: "~"}[d.status]


def _field_line(f: Field) -> str:
    tag = "" if f.classification is CONTENT else "  [metadata]"
    if f.old is None:
        return f"{f.name}: (none) → {f.new}{tag}"
    if f.new is None:
        return f"{f.name}: {f.old} → (none){tag}"
    return f"{f.name}: {f.old} → {f.new}{tag}"


def render_text(result: DiffResult, style: Style = _plain) -> str:
    """Summary first (counts, then one line per difference), then the detailed tree."""
    root = result.difference
    lines = [style(f"--- {result.source1}", bold=True), style(f"+++ {result.source2}", bold=True)]
    if root is None:
        lines.append(style("identical", fg="green"))
        return "\n".join(lines) + "\n"
    s = summarize(root)
    verdict = "content differs" if root.classification is CONTENT else "metadata-only (cosmetic) differences"
    lines.append(style(f"{s.differences} difference{'s' if s.differences != 1 else ''}: {s.content} content, "
                       f"{s.metadata} metadata-only — {verdict}",
                       fg="red" if root.classification is CONTENT else "yellow", bold=True))  # fmt: skip
    lines.append("")
    lines.append(style("Summary", bold=True))
    for path, node in leaves(root):
        cls = "content " if node.classification is CONTENT and _own_content(node) else "metadata"
        colour = "red" if cls.strip() == "content" else "yellow"
        what = _short(node)
        lines.append(f"  {style(cls, fg=colour)} {_mark(node)} {_path(path)}" + (f"  ({what})" if what else ""))
    lines.append("")
    lines.append(style("Details", bold=True))
    _tree(root, 0, lines, style)
    return "\n".join(lines) + "\n"


def _own_content(node: Difference) -> bool:
    return node.own is CONTENT or node.diff is not None or any(f.classification is CONTENT for f in node.fields)


def _short(node: Difference) -> str:
    if node.status is not Status.CHANGED:
        return node.status.value + (f": {node.comments[0]}" if node.comments else "")
    names = [f.name for f in node.fields]
    if node.diff is not None and "content" not in names:
        names.append("content")
    return ", ".join(dict.fromkeys(names)) or (node.comments[0] if node.comments else "")


def _tree(d: Difference, level: int, out: list[str], style: Style) -> None:
    pad = "  " * level
    if d.name or level:
        colour = {Status.ADDED: "green", Status.REMOVED: "red", Status.CHANGED: "cyan"}[d.status]
        tag = "" if d.classification is CONTENT else " [metadata]"
        out.append(pad + style(f"{_mark(d)} {d.name or '(input)'}", fg=colour, bold=True) + f"  ({d.kind}){tag}")
    inner = pad + ("    " if d.name or level else "  ")
    for f in d.fields:
        out.append(inner + style(_field_line(f), dim=f.classification is not CONTENT))
    for c in d.comments:
        out.append(inner + style(f"# {c}", dim=True))
    if d.diff:
        for ln in d.diff.splitlines():
            colour = "green" if ln.startswith("+") else "red" if ln.startswith("-") else "cyan" if ln.startswith("@@") else None
            out.append(inner + (style(ln, fg=colour) if colour else ln))
    for c in d.details:
        _tree(c, level + 1, out, style)


# -- JSON ----------------------------------------------------------------------------------------


def to_json_data(result: DiffResult) -> dict[str, Any]:
    s = summarize(result.difference)
    return {
        "schema": SCHEMA_ID,
        "source1": result.source1,
        "source2": result.source2,
        "identical": result.identical,
        "classification": None if result.difference is None else result.difference.classification.value,
        "summary": {"differences": s.differences, "content": s.content, "metadata": s.metadata},
        "difference": None if result.difference is None else _node(result.difference, ()),
    }


def _node(d: Difference, parent: tuple[str, ...]) -> dict[str, Any]:
    path = parent + ((d.name,) if d.name else ())
    return {
        "name": d.name,
        "path": list(path),
        "kind": d.kind,
        "status": d.status.value,
        "classification": d.classification.value,
        "fields": [{"name": f.name, "old": f.old, "new": f.new, "classification": f.classification.value}
                   for f in d.fields],
        "comments": list(d.comments),
        "unified_diff": d.diff,
        "details": [_node(c, path) for c in d.details],
    }


def render_json(result: DiffResult) -> str:
    return json.dumps(to_json_data(result), indent=2, ensure_ascii=False, sort_keys=False) + "\n"


# -- HTML ----------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.3em} code,pre{font:12px/1.35 ui-monospace,monospace}
details{margin-left:1.2em;border-left:2px solid #ddd;padding-left:.6em}
summary{cursor:pointer;padding:2px 0} .content{color:#b00020} .metadata{color:#9a6a00}
.added{color:#1b7f2a} .removed{color:#b00020} .kind{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.3em 0} td{padding:1px 8px;vertical-align:top}
td.old{background:#fde8e8} td.new{background:#e6f6e6} tr.metadata td{opacity:.65}
pre{background:#f6f8fa;padding:.5em;overflow:auto} .add{color:#1b7f2a} .del{color:#b00020} .hunk{color:#0550ae}
.comment{color:#666;font-style:italic}
"""


def render_html(result: DiffResult) -> str:
    """One self-contained page (inline CSS, no scripts): collapsible <details> per node."""
    e = html.escape
    s = summarize(result.difference)
    body = [f"<h1>reprobuild diff</h1><p><code>{e(result.source1)}</code> ↔ <code>{e(result.source2)}</code></p>"]
    if result.difference is None:
        body.append('<p class="added"><b>identical</b></p>')
    else:
        cls = result.difference.classification.value
        body.append(f'<p class="{cls}"><b>{s.differences} differences: {s.content} content, '
                    f'{s.metadata} metadata-only</b></p><ul>')  # fmt: skip
        for path, node in leaves(result.difference):
            c = "content" if _own_content(node) else "metadata"
            body.append(f'<li><span class="{c}">{c}</span> {e(_mark(node))} <code>{e(_path(path))}</code> '
                        f'<span class="kind">{e(_short(node))}</span></li>')  # fmt: skip
        body.append("</ul>")
        body.append(_html_node(result.difference, True))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>reprobuild diff</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")  # fmt: skip


def _html_node(d: Difference, top: bool = False) -> str:
    e = html.escape
    cls = d.classification.value
    head = (f'<summary><span class="{d.status.value if d.status is not Status.CHANGED else cls}">{e(_mark(d))} '
            f'{e(d.name or "(input)")}</span> <span class="kind">{e(d.kind)} · {cls}</span></summary>')  # fmt: skip
    parts = [head]
    if d.fields:
        rows = "".join(f'<tr class="{f.classification.value}"><td>{e(f.name)}</td><td class="old">{e(f.old or "")}</td>'
                       f'<td class="new">{e(f.new or "")}</td></tr>' for f in d.fields)  # fmt: skip
        parts.append(f"<table>{rows}</table>")
    for c in d.comments:
        parts.append(f'<div class="comment"># {e(c)}</div>')
    if d.diff:
        lines = []
        for ln in d.diff.splitlines():
            k = "add" if ln.startswith("+") else "del" if ln.startswith("-") else "hunk" if ln.startswith("@@") else ""
            lines.append(f'<span class="{k}">{e(ln)}</span>' if k else e(ln))
        parts.append("<pre>" + "\n".join(lines) + "</pre>")
    parts.extend(_html_node(c) for c in d.details)
    return f"<details{' open' if top or d.details else ''}>{''.join(parts)}</details>"
