"""Reports of a run: ``summary.json``, ``report.md`` and ``report.html`` in the run directory.

Both reports hold the overall score, a per-group table (GenEval++ tag, Imagine-Bench category), a bar chart
(inline SVG in the HTML), every image with its verdict and the judge's reason, an optional second run side by side
(e.g. before and after a fine-tune, with the difference), and the published scores of other models as reference
rows, each with its source.

Published scores: the overall numbers shown in the Echo-4o repository README's benchmark figure
(``assets/radar.jpg`` at commit 28f36d7), from the Echo-4o paper (arXiv 2508.09987), two decimals as printed.
Per-tag and per-category numbers are not listed here because we could not check them against the paper. The
Imagine-Bench numbers were computed with the published script, so they compare with our ``overall``, not with
``overall_corrected``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_SOURCE = ("Echo-4o README benchmark figure (github.com/yejy53/Echo-4o, assets/radar.jpg @ 28f36d7), "
           "from arXiv 2508.09987")

PUBLISHED: dict[str, list[dict[str, Any]]] = {
    "geneval_pp": [
        {"model": "Echo-4o", "overall": 0.68, "source": _SOURCE},
        {"model": "BAGEL", "overall": 0.37, "source": _SOURCE},
        {"model": "OmniGen2", "overall": 0.33, "source": _SOURCE},
        {"model": "BLIP3-o", "overall": 0.31, "source": _SOURCE},
        {"model": "OmniGen2 + Echo-4o-Image", "overall": 0.47, "source": _SOURCE},
        {"model": "BLIP3-o + Echo-4o-Image", "overall": 0.44, "source": _SOURCE},
    ],
    "imagine": [
        {"model": "Echo-4o", "overall": 7.80, "source": _SOURCE},
        {"model": "BAGEL", "overall": 6.20, "source": _SOURCE},
        {"model": "OmniGen2", "overall": 6.22, "source": _SOURCE},
        {"model": "BLIP3-o", "overall": 6.51, "source": _SOURCE},
        {"model": "OmniGen2 + Echo-4o-Image", "overall": 7.01, "source": _SOURCE},
        {"model": "BLIP3-o + Echo-4o-Image", "overall": 7.37, "source": _SOURCE},
    ],
    "geneval": [
        {"model": "Echo-4o", "overall": 0.89, "source": _SOURCE},
        {"model": "BAGEL", "overall": 0.82, "source": _SOURCE},
        {"model": "OmniGen2", "overall": 0.80, "source": _SOURCE},
        {"model": "BLIP3-o", "overall": 0.84, "source": _SOURCE},
        {"model": "OmniGen2 + Echo-4o-Image", "overall": 0.83, "source": _SOURCE},
        {"model": "BLIP3-o + Echo-4o-Image", "overall": 0.85, "source": _SOURCE},
    ],
}

SUITE_TITLES = {"geneval_pp": "GenEval++", "imagine": "Imagine-Bench", "geneval": "GenEval", "custom": "Custom"}


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    """A run's summary, from its directory or its ``summary.json``."""
    p = Path(path)
    p = p / "summary.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no summary.json at {p}: give a finished run's directory")
    return json.loads(p.read_text())


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if metric == "imagine_score" else f"{value:.3f}"


def _scale(metric: str) -> float:
    return 10.0 if metric == "imagine_score" else 1.0


def _rows(summary: dict[str, Any], compare: dict[str, Any] | None) -> list[dict[str, Any]]:
    other = (compare or {}).get("groups", {})
    rows = []
    for g in summary["scores"].get("groups", []):
        row = {"name": g["name"], "score": g["score"], "images": g["images"], "judged": g["judged"],
               "failed": g["failed"], "before": other.get(g["name"]) if compare else None}
        rows.append(row)
    return rows


def _delta(after: float | None, before: float | None, metric: str) -> str:
    if after is None or before is None:
        return "n/a"
    d = after - before
    return ("+" if d >= 0 else "") + _fmt(d, metric)


def _verdict_text(row: dict[str, Any]) -> tuple[str, str]:
    if row["status"] == "failed":
        return "failed", row.get("error") or ""
    if row["status"] != "ok":
        return "unscored", ""
    v = row["verdict"]
    if "correct" in v:
        return ("correct" if v["correct"] else "wrong"), v.get("reason", "")
    from worker.evaluation.scoring import imagine_image_score

    score = imagine_image_score(v["ff"], v["ip"], v["aq"])
    return f"{score:.2f} (FF {v['ff']:g}, IP {v['ip']:g}, AQ {v['aq']:g})", v.get("reason", "")


# ------------------------------------------------------------------------------------------------ markdown
def render_markdown(summary: dict[str, Any], results: Sequence[dict[str, Any]],
                    compare: dict[str, Any] | None = None) -> str:
    metric = summary["metric"]
    title = SUITE_TITLES.get(summary["suite"], summary["suite"])
    lines = [f"# {title} benchmark", ""]
    lines.append(f"- overall: **{_fmt(summary['overall'], metric)}**"
                 + (f" (before: {_fmt(compare.get('overall'), metric)}, change "
                    f"{_delta(summary['overall'], compare.get('overall'), metric)})" if compare else ""))
    if "overall_corrected" in summary:
        lines.append(f"- overall_corrected (Multi-Object weighted 2): {_fmt(summary['overall_corrected'], metric)}")
    model = summary.get("model") or {}
    judge = summary.get("judge") or {}
    lines.append(f"- model: {model.get('name') or model.get('path') or 'unknown'}"
                 + (f" (version {model['version']})" if model.get("version") else ""))
    lines.append(f"- judge: {judge.get('model', 'none')}" + (f" at {judge['base_url']}" if judge else ""))
    c = summary["counts"]
    lines.append(f"- images: {c['images']}, judged {c['judged']}, failed {c['failed']}")
    lines += ["", "## Scores", ""]
    header = "| group | images | judged | failed | score |" + (" before | change |" if compare else "")
    lines += [header, "|" + "---|" * (5 + (2 if compare else 0))]
    for r in _rows(summary, compare):
        line = f"| {r['name']} | {r['images']} | {r['judged']} | {r['failed']} | {_fmt(r['score'], metric)} |"
        if compare:
            line += f" {_fmt(r['before'], metric)} | {_delta(r['score'], r['before'], metric)} |"
        lines.append(line)
    published = PUBLISHED.get(summary["suite"], [])
    if published:
        lines += ["", "## Published scores (reference)", "", "| model | overall | source |", "|---|---|---|"]
        lines.append(f"| this run | {_fmt(summary['overall'], metric)} | {summary['counts']['images']} images |")
        for p in published:
            lines.append(f"| {p['model']} | {_fmt(p['overall'], metric)} | {p['source']} |")
    if summary.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in summary["notes"]]
    lines += ["", "## Settings", "", "```json", json.dumps(summary["settings"], indent=2), "```", "",
              "## Images", "", "| image | prompt | verdict | reason |", "|---|---|---|---|"]
    for row in results:
        verdict, reason = _verdict_text(row)
        cells = [f"![{row['id']}_{row['k']}]({row['image']})", row["prompt"], verdict, reason]
        lines.append("| " + " | ".join(str(x).replace("|", "\\|").replace("\n", " ") for x in cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ html
def _bar_chart(rows: list[dict[str, Any]], metric: str, compare: bool) -> str:
    scale = _scale(metric)
    bar_h, gap, label_w, width = 18, 10, 200, 360
    series = [("score", "#3b7dd8")] + ([("before", "#b0b7c3")] if compare else [])
    height = len(rows) * (bar_h * len(series) + gap) + gap
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 80}" height="{height}" '
             'role="img" aria-label="scores per group">']
    y = gap
    for r in rows:
        parts.append(f'<text x="0" y="{y + bar_h - 4}" font-size="12">{html.escape(r["name"])}</text>')
        for key, colour in series:
            value = r[key]
            w = 0 if value is None else max(0.0, min(1.0, value / scale)) * width
            parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{colour}">'
                         f'<title>{key}: {_fmt(value, metric)}</title></rect>')
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 5}" font-size="11">'
                         f'{_fmt(value, metric)}</text>')
            y += bar_h
        y += gap
    parts.append("</svg>")
    return "".join(parts)


def render_html(summary: dict[str, Any], results: Sequence[dict[str, Any]],
                compare: dict[str, Any] | None = None) -> str:
    e = html.escape
    metric = summary["metric"]
    title = SUITE_TITLES.get(summary["suite"], summary["suite"])
    rows = _rows(summary, compare)
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(title)} benchmark</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid "
           "#ccc;padding:4px 8px}.grid{display:flex;flex-wrap:wrap;gap:12px}.cell{width:220px;font-size:12px}"
           ".cell img{width:220px}.wrong,.failed{color:#b00}.correct{color:#070}</style></head><body>",
           f"<h1>{e(title)} benchmark</h1>",
           f"<p>overall: <b>{_fmt(summary['overall'], metric)}</b>"]
    if compare:
        out.append(f" (before: {_fmt(compare.get('overall'), metric)}, change "
                   f"{_delta(summary['overall'], compare.get('overall'), metric)})")
    if "overall_corrected" in summary:
        out.append(f"; overall_corrected (Multi-Object weighted 2): {_fmt(summary['overall_corrected'], metric)}")
    model, judge = summary.get("model") or {}, summary.get("judge") or {}
    out.append(f"</p><p>model: {e(str(model.get('name') or model.get('path') or 'unknown'))}"
               f"{e(' (version ' + str(model['version']) + ')') if model.get('version') else ''}; "
               f"judge: {e(str(judge.get('model', 'none')))}; images: {summary['counts']['images']}, judged "
               f"{summary['counts']['judged']}, failed {summary['counts']['failed']}</p>")
    out.append("<h2>Scores</h2><table><tr><th>group</th><th>images</th><th>judged</th><th>failed</th><th>score</th>"
               + ("<th>before</th><th>change</th>" if compare else "") + "</tr>")
    for r in rows:
        out.append(f"<tr><td>{e(r['name'])}</td><td>{r['images']}</td><td>{r['judged']}</td><td>{r['failed']}</td>"
                   f"<td>{_fmt(r['score'], metric)}</td>"
                   + (f"<td>{_fmt(r['before'], metric)}</td><td>{_delta(r['score'], r['before'], metric)}</td>"
                      if compare else "") + "</tr>")
    out.append("</table>")
    if rows:
        out.append(_bar_chart(rows, metric, bool(compare)))
    published = PUBLISHED.get(summary["suite"], [])
    if published:
        out.append("<h2>Published scores (reference)</h2><table><tr><th>model</th><th>overall</th><th>source</th>"
                   f"</tr><tr><td>this run</td><td>{_fmt(summary['overall'], metric)}</td><td></td></tr>")
        for p in published:
            out.append(f"<tr><td>{e(p['model'])}</td><td>{_fmt(p['overall'], metric)}</td>"
                       f"<td>{e(p['source'])}</td></tr>")
        out.append("</table>")
    if summary.get("notes"):
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in summary["notes"]) + "</ul>")
    out.append(f"<h2>Settings</h2><pre>{e(json.dumps(summary['settings'], indent=2))}</pre>")
    out.append("<h2>Images</h2><div class='grid'>")
    for row in results:
        verdict, reason = _verdict_text(row)
        css = verdict.split(" ")[0] if verdict in ("correct", "wrong", "failed") else ""
        out.append(f"<div class='cell'><img src='{e(row['image'])}' alt='{e(row['id'])}_{row['k']}'>"
                   f"<div>{e(row['id'])}_{row['k']} [{e(row['tag'])}]</div><div>{e(row['prompt'])}</div>"
                   f"<div class='{css}'><b>{e(verdict)}</b></div><div>{e(reason)}</div></div>")
    out.append("</div></body></html>")
    return "".join(out)


def write_reports(out_dir: str | os.PathLike, summary: dict[str, Any], results: Sequence[dict[str, Any]],
                  compare: dict[str, Any] | None = None) -> None:
    """Write ``summary.json``, ``report.md`` and ``report.html`` into ``out_dir``."""
    out = Path(out_dir)
    if compare is not None:
        summary = {**summary, "compare": {"overall": compare.get("overall"), "groups": compare.get("groups"),
                                          "model": compare.get("model")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    (out / "report.md").write_text(render_markdown(summary, results, compare), encoding="utf-8")
    (out / "report.html").write_text(render_html(summary, results, compare), encoding="utf-8")
