"""The report as one self-contained HTML page: the table, every plot and the final stages'
P-R curves, images embedded as base64 (the page needs no other file)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..layout import PR_CURVES_FOLDER
from .artifacts import RunArtifacts, final_stages
from .tables import header_line, table_cells

# COCO has 80 classes, one P-R PNG each: embedding them all for every final stage would make a
# page of tens of MB. VOC's 20 classes all fit.
MAX_PR_CURVES_PER_STAGE = 20
PLOT_TITLES = {"ap_vs_gmacs": "AP and AP50 vs GMACs", "widths": "Channels per layer",
               "training_curves": "Training curves"}
STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}")


def escape(text: str) -> str:
    """``text`` escaped for HTML, a stray backtick included (as an entity)."""
    return html.escape(text).replace("`", "&#96;")


def markdown_code_to_html(text: str) -> str:
    """``text`` escaped for HTML, with markdown's `code` spans as <code> elements (the header
    line and skipped-stage notes are written for markdown first)."""
    pieces = text.split("`")
    if len(pieces) % 2 == 0:  # an unpaired backtick: plain text, escaped
        pieces[-2:] = ["`".join(pieces[-2:])]
    return "".join(f"<code>{escape(piece)}</code>" if index % 2 else escape(piece)
                   for index, piece in enumerate(pieces))


def embedded_image(path: Path, alt: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def html_table(report: dict) -> str:
    header, lines = table_cells(report)
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in cells) + "</tr>"
                   for cells in lines)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pr_curve_section(runs: list[RunArtifacts]) -> list[str]:
    parts = []
    for run in runs:
        for stage in final_stages(run):
            curves = sorted((stage.folder / PR_CURVES_FOLDER).glob("*.png"))
            if not curves:
                continue
            parts.append(f"<h3>{escape(run.name)} / {escape(stage.name)}</h3>")
            shown = curves[:MAX_PR_CURVES_PER_STAGE]
            parts += [embedded_image(curve, curve.stem) for curve in shown]
            if len(curves) > MAX_PR_CURVES_PER_STAGE:
                parts.append(f"<p>{len(curves) - MAX_PR_CURVES_PER_STAGE} more in "
                             f"<code>{escape(str(stage.folder / PR_CURVES_FOLDER))}</code></p>")
    return parts


def render_html(report: dict, runs: list[RunArtifacts], plots: dict[str, Path]) -> str:
    """The page (module docstring) of ``report``, with the PNGs in ``plots`` by key."""
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>ctprune report</title>',
             f"<style>{STYLE}</style></head><body>",
             "<h1>ctprune report</h1>", f"<p>{markdown_code_to_html(header_line(report))}</p>",
             html_table(report)]
    if report["incomplete"]:
        items = "".join(f"<li><code>{escape(entry['run'] + '/' + entry['stage'])}</code>: "
                        f"{markdown_code_to_html(entry['reason'])}</li>"
                        for entry in report["incomplete"])
        parts.append(f"<h2>Skipped stages</h2><ul>{items}</ul>")
    for key, path in plots.items():
        parts += [f"<h2>{PLOT_TITLES[key]}</h2>", embedded_image(path, PLOT_TITLES[key])]
    curves = pr_curve_section(runs)
    if curves:
        parts += ["<h2>P-R curves of the final stages</h2>", *curves]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
