"""``report.html``: an evaluation run as one self-contained page that opens from disk, offline
(:func:`render_report`): the summary tables, precision-recall curves, sortable per-query APs, and each query's top
results under every ranking, framed positive / negative / junk.
"""
from __future__ import annotations

import base64
import html
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.errors import InvalidValueError
from helpers.evaluation.metrics import format_percent
from helpers.report.titles import PROTOCOL_TITLES, dataset_title, payload_titles, protocol_letter, shown_protocol
from helpers.visualize import format_scores

logger = logging.getLogger(__name__)

#: Thumbnail heights (px) of a ranked result, a query crop in its card and in a table row.
THUMB_HEIGHT, QUERY_HEIGHT, ROW_HEIGHT = 76, 128, 40
JPEG_QUALITY = 75
#: Result thumbnails a page holds at most (about 4 kB each): the queries shown with their rankings are the first
#: ones of each dataset that fit (every query is in the tables). The built-in run (12 queries, 4 methods) fits whole.
MAX_THUMBNAILS = 1200
#: Curve colour and dash per method: one hue per family, the global ranking dashed, its re-ranking solid.
CURVE_STYLE = {"cvnet_global": ("#e08214", "6 4"), "cvnet_rerank": ("#b35806", ""),
               "superglobal": ("#8073ac", "6 4"), "superglobal_rerank": ("#542788", ""),
               "timm_global": ("#1a9850", "6 4")}
#: Colours of the other curves (post-processed rows), in turn; dotted.
OTHER_COLOURS = ("#1b9e77", "#d95f02", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#1f78b4", "#b2182b",
                 "#4d4d4d", "#01665e")
LABEL_TEXT = {"positive": "positive", "negative": "negative", "junk": "junk"}
LABEL_MARK = {"positive": "\u2713", "negative": "\u2717", "junk": "\u2013"}


class ImageSource(Protocol):
    """The pictures of a run: uint8 BGR (H, W, 3) arrays, None when an image cannot be shown."""

    def query(self, label: str, i: int) -> np.ndarray | None: ...

    def item(self, label: str, j: int) -> np.ndarray | None: ...


def jpeg_data_uri(img: np.ndarray, *, height: int, quality: int = JPEG_QUALITY) -> str:
    """A ``data:image/jpeg;base64,...`` URI of ``img`` resized to ``height`` pixels high (aspect kept)."""
    import cv2

    h, w = img.shape[:2]
    scale = height / h
    size = (max(1, round(w * scale)), height)
    small = cv2.resize(img, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise InvalidValueError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


class _Thumbs:
    """Data URIs, each image encoded once per height; an image that cannot be read gives None (logged once)."""

    def __init__(self, images: ImageSource) -> None:
        self.images = images
        self.cache: dict[tuple, str | None] = {}

    def get(self, kind: str, label: str, index: int, height: int) -> str | None:
        key = (kind, label, index, height)
        if key not in self.cache:
            try:
                img = getattr(self.images, kind)(label, index)
                self.cache[key] = None if img is None else jpeg_data_uri(img, height=height)
            except (OSError, ValueError) as exc:
                logger.warning("report: no thumbnail for %s %d of %s: %s", kind, index, label, exc)
                self.cache[key] = None
        return self.cache[key]


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _anchor(label: str) -> str:
    """A dataset label in element ids and links: letters, digits, '_', '.', '+' and '-' (a class folder's label
    ``folder:PATH`` has its separators replaced by '-')."""
    return re.sub(r"[^\w.+-]", "-", label)


def _img(uri: str | None, *, alt: str, height: int, cls: str = "") -> str:
    if uri is None:
        return f'<span class="noimg {cls}" style="height:{height}px">no image</span>'
    return f'<img class="{cls}" src="{uri}" alt="{_e(alt)}" height="{height}">'


# --------------------------------------------------------------------------------------------------------------
# Summary tables: the printed Markdown, as HTML
# --------------------------------------------------------------------------------------------------------------


def markdown_tables_html(markdown: str) -> str:
    """The report's Markdown (``### `` headings, pipe tables, plain lines) as HTML."""
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head, *body = rows
            out.append('<table class="summary"><thead><tr>' + "".join(f"<th>{_e(c)}</th>" for c in head)
                       + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):
                rows.append(cells)
            continue
        flush()
        if line.startswith("### "):
            out.append(f"<h3>{_e(line[4:])}</h3>")
        elif line.strip():
            out.append(f"<p>{_e(line)}</p>")
    flush()
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# Precision-recall curves
# --------------------------------------------------------------------------------------------------------------


def pr_curves_svg(levels: Sequence[float], curves: Sequence[tuple[str, str, Mapping[str, Sequence[float | None]]]]
                  ) -> str:
    """One panel per protocol (Easy, Medium, Hard; a class folder's one) of mean interpolated precision against
    recall; ``curves``: (method, title, {protocol: precision per level}). Returns an inline ``<svg>`` with a legend
    below it."""
    pw, ph, ml, mr, mt, mb = 270, 230, 44, 12, 24, 38
    iw, ih = pw - ml - mr, ph - mt - mb
    protocols = list(curves[0][2]) if curves else []
    others = [m for m, _, _ in curves if m not in CURVE_STYLE]
    style = {m: CURVE_STYLE.get(m) or (OTHER_COLOURS[others.index(m) % len(OTHER_COLOURS)], "2 3")
             for m, _, _ in curves}
    width = len(protocols) * pw
    parts = [f'<svg class="pr" viewBox="0 0 {width} {ph}" width="{width}" height="{ph}" role="img" '
             f'aria-label="precision-recall curves">']
    for k, p in enumerate(protocols):
        x0, y0 = k * pw + ml, mt
        panel = PROTOCOL_TITLES.get(p, p) if len(protocols) > 1 else ""
        parts.append(f'<text class="ptitle" x="{x0 + iw / 2}" y="{mt - 8}">{panel}</text>')
        for t in range(6):
            v = t / 5
            gx, gy = x0 + v * iw, y0 + ih - v * ih
            parts.append(f'<line class="grid" x1="{gx:.1f}" y1="{y0}" x2="{gx:.1f}" y2="{y0 + ih}"/>'
                         f'<line class="grid" x1="{x0}" y1="{gy:.1f}" x2="{x0 + iw}" y2="{gy:.1f}"/>'
                         f'<text class="tick" x="{gx:.1f}" y="{y0 + ih + 14}">{v:.1f}</text>'
                         f'<text class="tick y" x="{x0 - 5}" y="{gy + 4:.1f}">{v:.1f}</text>')
        parts.append(f'<rect class="frame" x="{x0}" y="{y0}" width="{iw}" height="{ih}"/>'
                     f'<text class="axis" x="{x0 + iw / 2}" y="{ph - 6}">recall</text>'
                     f'<text class="axis" transform="translate({k * pw + 11},{y0 + ih / 2}) rotate(-90)">'
                     f'precision</text>')
        for method, title, precision in curves:
            color, dash = style[method]
            pts = [f"{x0 + r * iw:.1f},{y0 + ih - v * ih:.1f}"
                   for r, v in zip(levels, precision[p]) if v is not None]
            if pts:
                tip = f"{title} ({PROTOCOL_TITLES.get(p, p)})" if len(protocols) > 1 else title
                parts.append(f'<polyline points="{" ".join(pts)}" stroke="{color}" stroke-dasharray="{dash}">'
                             f'<title>{_e(tip)}</title></polyline>')
    parts.append("</svg>")
    legend = "".join(
        f'<span><svg width="34" height="10"><line x1="0" y1="5" x2="34" y2="5" '
        f'stroke="{style[m][0]}" '
        f'stroke-width="2.5" stroke-dasharray="{style[m][1]}"/></svg>{_e(t)}</span>'
        for m, t, _ in curves)
    return "".join(parts) + f'<div class="prlegend">{legend}</div>'


# --------------------------------------------------------------------------------------------------------------
# Per-query tables and cards
# --------------------------------------------------------------------------------------------------------------


def _num_cell(value: float | None, *, delta: bool = False) -> str:
    if value is None:
        return '<td class="num na" data-v="">n/a</td>'
    if not delta:
        return f'<td class="num" data-v="{value:.6f}">{value:.1f}</td>'
    style = ""
    if abs(value) >= 0.05:
        alpha = 0.12 + 0.5 * min(abs(value) / 50.0, 1.0)
        rgb = "26,156,58" if value > 0 else "214,39,40"
        style = f' style="background:rgba({rgb},{alpha:.2f})"'
    return f'<td class="num delta" data-v="{value:.6f}"{style}>{value:+.1f}</td>'


def _signed_span(value: float | None) -> str:
    if value is None:
        return "n/a"
    cls = "up" if value >= 0.05 else "down" if value <= -0.05 else ""
    return f'<span class="{cls}">{value:+.1f}</span>'


def _label_squares(labels: Sequence[str]) -> str:
    return "".join(f'<i class="sq {lab}" title="#{r} {lab}"></i>' for r, lab in enumerate(labels, start=1))


def _protocol_head(protocols: Sequence[str], p: str) -> str:
    """A protocol in a column head: " Easy" ...; nothing for a dataset's only protocol."""
    return f" {PROTOCOL_TITLES.get(p, p)}" if len(protocols) > 1 else ""


def per_query_table(label: str, method: str, m: Mapping[str, Any], queries: Sequence[str], *, thumbs: _Thumbs,
                    carded: int, classes: Sequence[str] | None = None) -> str:
    """The sortable table of one (dataset, method): #, query, (its class,) AP per protocol (E/M/H), dAP per
    protocol (re-ranking), top-k labels."""
    protocols = list(m["ap"])
    head = ['<th data-sort="asc">#</th>', "<th>query</th>"] + (["<th>class</th>"] if classes is not None else [])
    head += [f'<th data-sort="desc">AP{_protocol_head(protocols, p)}</th>' for p in protocols]
    if m["ap_change"] is not None:
        head += [f'<th data-sort="desc" title="AP after re-ranking minus AP before">\u0394AP'
                 f"{_protocol_head(protocols, p)}</th>" for p in protocols]
    shown = shown_protocol(protocols)
    head.append(f"<th>top {len(m['top_ids'][0]) if m['top_ids'] else 0}"
                + (f" ({PROTOCOL_TITLES[shown]})" if len(protocols) > 1 else "") + "</th>")
    rows = []
    for i, name in enumerate(queries):
        thumb = _img(thumbs.get("query", label, i, ROW_HEIGHT), alt=name, height=ROW_HEIGHT, cls="rowthumb")
        qcell = f'<span class="rowbox">{thumb}</span>{_e(name)}'
        if i < carded:
            qcell = f'<a href="#q-{_anchor(label)}-{i}">{qcell}</a>'
        cells = [f'<td class="num" data-v="{i}">{i}</td>', f'<td class="q">{qcell}</td>']
        if classes is not None:
            cells.append(f'<td class="cls">{_e(classes[i])}</td>')
        cells += [_num_cell(m["ap"][p][i]) for p in protocols]
        if m["ap_change"] is not None:
            cells += [_num_cell(m["ap_change"][p][i], delta=True) for p in protocols]
        cells.append(f'<td class="squares">{_label_squares(m["labels"][i])}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="pq sortable" id="t-{_anchor(label)}-{_e(method)}"><thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _strip(label: str, i: int, title: str, ranking: Mapping[str, Any], db_names: Mapping[str, str], *,
           thumbs: _Thumbs, change: Mapping[str, Any] | None, before_ids: Sequence[int] | None) -> str:
    """One ranking of one query: its title, APs (and AP change), then its top results as framed thumbnails."""
    aps = " \u00b7 ".join(f"{protocol_letter(p)} {format_percent(ranking['ap'][p][i])}".strip()
                           for p in ranking["ap"])
    side = [f"<b>{_e(title)}</b>", f'<span class="aps">AP {aps}</span>']
    if change is not None:
        deltas = " \u00b7 ".join(f"{protocol_letter(p)} {_signed_span(change[p][i])}".strip() for p in change)
        side.append(f'<span class="aps">\u0394AP {deltas}</span>')
    ids, labels = ranking["top_ids"][i], ranking["labels"][i]
    scores = format_scores(ranking["scores"][i])
    tiles = []
    for r, (j, lab, score) in enumerate(zip(ids, labels, scores), start=1):
        name = db_names.get(str(j), f"id {j}")
        move = ""
        if before_ids is not None:
            if j in before_ids:
                d = before_ids.index(j) + 1 - r
                move = (f'<span class="move up" title="up {d} from #{r + d}">\u25b2{d}</span>' if d > 0 else
                        f'<span class="move down" title="down {-d} from #{r + d}">\u25bc{-d}</span>' if d < 0
                        else "")
            else:
                move = f'<span class="move up" title="not in the top {len(before_ids)} before">new</span>'
        tip = f"#{r} \u00b7 {LABEL_TEXT[lab]} \u00b7 score {score or 'n/a'} \u00b7 {name}"
        tiles.append(
            f'<li class="tile {lab}" title="{_e(tip)}"><span class="frame">'
            f'{_img(thumbs.get("item", label, int(j), THUMB_HEIGHT), alt=name, height=THUMB_HEIGHT)}'
            f'<span class="mark">{LABEL_MARK[lab]}</span>{move}</span>'
            f'<span class="cap"><b>#{r}</b><span class="score">{_e(score)}</span></span>'
            f'<span class="fn">{_e(name)}</span></li>')
    return (f'<div class="strip"><div class="side">{"".join(side)}</div>'
            f'<ol class="tiles">{"".join(tiles)}</ol></div>')


def _strips_of(methods: Sequence[str], ds: Mapping[str, Any]) -> list[tuple[str, Mapping, bool, str | None]]:
    """(method, ranking payload, whether it is a 'before' ranking shown only as such, the re-ranking's base)
    in display order: each re-ranking directly under the global ranking it re-ordered."""
    out: list[tuple[str, Mapping, bool, str | None]] = []
    shown: set[str] = set()
    for method in methods:
        m = ds["methods"][method]
        if m["before"] is not None:
            base = m["before"]["method"]
            if base not in shown:
                out.append((base, ds["methods"].get(base, m["before"]), base not in methods, None))
                shown.add(base)
            out.append((method, m, False, base))
        elif method not in shown:
            out.append((method, m, False, None))
            shown.add(method)
    return out


def query_card(label: str, i: int, ds: Mapping[str, Any], methods: Sequence[str], *, thumbs: _Thumbs,
               titles: Mapping[str, str]) -> str:
    """A query's crop (and a class folder query's class) and the top results of each of its rankings, each
    re-ranking below the ranking it re-ordered (with the AP change and each result's move)."""
    name = ds["queries"][i]
    strips = []
    for method, ranking, only_before, base in _strips_of(methods, ds):
        title = titles[method]
        if only_before:
            title += " (before re-ranking)"
        before_ids = None
        change = None
        if base is not None:
            before_ids = list(ranking["before"]["top_ids"][i])
            change = ranking["ap_change"]
        strips.append(_strip(label, i, title, ranking, ds["db_names"], thumbs=thumbs, change=change,
                             before_ids=before_ids))
    crop = _img(thumbs.get("query", label, i, QUERY_HEIGHT), alt=name, height=QUERY_HEIGHT, cls="qimg")
    cls = f'<span class="qcls">class {_e(ds["query_classes"][i])}</span>' if "query_classes" in ds else ""
    return (f'<article class="card" id="q-{_anchor(label)}-{i}"><div class="qside"><h4>Query {i}</h4>'
            f'<span class="qframe">{crop}</span><span class="fn">{_e(name)}</span>{cls}</div>'
            f'<div class="strips">{"".join(strips)}</div></article>')


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------


def legend_html(class_folder: bool = False) -> str:
    positive = "positive (the query's class)" if class_folder else "positive (easy or hard)"
    junk = "junk (listed in junk.txt; ignored by the metrics)" if class_folder else "junk (ignored by the metrics)"
    items = [("query", "query crop"), ("positive", positive), ("negative", "negative"), ("junk", junk)]
    return '<p class="legend">' + "".join(f'<span><i class="sq {k}"></i>{t}</span>' for k, t in items) + "</p>"


def dataset_section(label: str, ds: Mapping[str, Any], payload: Mapping[str, Any], *, thumbs: _Thumbs,
                    max_cards: int) -> str:
    pq = payload["per_query"]
    methods = payload["methods"]
    titles = payload_titles(payload)
    title = dataset_title(label)
    nq = len(ds["queries"])
    carded = min(nq, max_cards)
    out = [f'<section id="ds-{_anchor(label)}"><h2>{_e(title)}{"" if title == label else f" ({_e(label)})"}</h2>',
           "<h3>Precision\u2013recall</h3>",
           '<p class="hint">Mean over queries of the interpolated precision (the best precision at that recall or '
           'beyond); dashed: a global ranking, solid: its re-ranking.</p>']
    curves = [(m, titles[m], ds["methods"][m]["pr"]) for m in methods]
    bases = {ds["methods"][m]["before"]["method"] for m in methods if ds["methods"][m]["before"]}
    curves += [(b, titles[b] + " (before re-ranking)",
                next(ds["methods"][m]["before"]["pr"] for m in methods
                     if ds["methods"][m]["before"] and ds["methods"][m]["before"]["method"] == b))
               for b in sorted(bases - set(methods))]
    out.append(pr_curves_svg(pq["pr_recall_levels"], curves))
    for method in methods:
        m = ds["methods"][method]
        out.append(f'<h3 id="h-{_anchor(label)}-{_e(method)}">{_e(titles[method])}: '
                   "per-query AP (%)</h3>")
        hint = "Scores: " + _e(m["score_source"]) + "."
        if m["before"] is not None:
            base = _e(titles[m["before"]["method"]])
            step = "post-processing" if method in (payload.get("post_rows") or {}) else "re-ranking"
            hint = f"\u0394AP = AP after {step} \u2212 AP of {base} (the ranking it re-ordered). " + hint
        out.append(f'<p class="hint">{hint} <span class="sorthint">Click a column header to sort; click again to '
                   "reverse.</span></p>")
        out.append(per_query_table(label, method, m, ds["queries"], thumbs=thumbs, carded=carded,
                                   classes=ds.get("query_classes")))
    protocols = list(ds["methods"][methods[0]]["ap"])
    which = f" ({PROTOCOL_TITLES[shown_protocol(protocols)]} protocol)" if len(protocols) > 1 else ""
    out.append(f'<h3 id="cards-{_anchor(label)}">Queries: top {pq["top"]} of each ranking{which}</h3>')
    if carded < nq:
        out.append(f'<p class="hint">The first {carded} of {nq} queries (the page holds at most '
                   f"{MAX_THUMBNAILS} result thumbnails); every query is in the tables above and in results.json.</p>")
    out.append(legend_html("query_classes" in ds))
    out += [query_card(label, i, ds, methods, thumbs=thumbs, titles=titles) for i in range(carded)]
    out.append("</section>")
    return "\n".join(out)


def cards_per_dataset(payload: Mapping[str, Any], max_thumbnails: int = MAX_THUMBNAILS) -> int:
    """How many queries of each dataset get a card so that the page holds at most ``max_thumbnails`` result
    thumbnails (at least one query per dataset)."""
    pq = payload["per_query"]
    strips = max(len(_strips_of(payload["methods"], ds)) for ds in pq["datasets"].values())
    return max(1, max_thumbnails // max(1, len(pq["datasets"]) * strips * pq["top"]))


def render_report(payload: Mapping[str, Any], *, images: ImageSource, max_cards: int | None = None) -> str:
    """The whole page for a ``results.json`` payload (with its ``per_query`` section) and the run's images;
    ``max_cards`` queries per dataset shown with their rankings (None: :func:`cards_per_dataset`).

        html = render_report(json.load(open("runs/eval/x/results.json")), images=source)

    The page shows the summary tables (the same as printed), per dataset the mean precision-recall curves, per
    method a table of each query's AP under Easy / Medium / Hard, or a class folder's one protocol with each
    query's class (and, for a re-ranking method, its change from the global ranking it re-ordered) that sorts by any
    column when its header is clicked, and per query its crop and the top results of every ranking, framed
    positive / negative / junk, with rank, score and file name.

    Everything is inline: images are small JPEG thumbnails as base64 data URIs, the curves are SVG, the sorting is
    a few lines of JavaScript (without it the tables read in query order). ``images`` gives the pictures
    (:class:`ImageSource`); the numbers all come from the payload, so a page can be rebuilt from a run directory
    and its dataset.
    """
    pq = payload["per_query"]
    if not pq:
        raise InvalidValueError("this results.json has no per-query results: re-run the evaluation to get them")
    if max_cards is None:
        max_cards = cards_per_dataset(payload)
    thumbs = _Thumbs(images)
    run = Path(payload["run_dir"]).name
    cfg = payload["config"]
    titles = payload_titles(payload)
    nav = ['<a href="#summary">Summary</a>']
    for label in pq["datasets"]:
        nav.append(f'<a href="#ds-{_anchor(label)}">{_e(dataset_title(label))}</a>')
        nav += [f'<a class="sub" href="#h-{_anchor(label)}-{_e(m)}">{_e(titles[m])}</a>' for m in payload["methods"]]
        nav.append(f'<a class="sub" href="#cards-{_anchor(label)}">queries</a>')
    warnings = "".join(f'<div class="warn">{_e(w)}</div>' for w in payload["warnings"])
    notes = "".join(f'<p class="note">Note: {_e(n)}</p>' for n in payload["notes"] if n not in payload["warnings"])
    timings = " \u00b7 ".join(f"{_e(k)} {v:.1f} s" for k, v in payload.get("timings_s", {}).items())
    body = [
        f"<header><h1>Evaluation report <span class=run>{_e(run)}</span></h1>",
        f'<p class="meta">Weights: {_e(payload["weights"])}<br>ResNet-{_e(cfg["model"]["depth"])} \u00b7 '
        f'device {_e(cfg["device"])} \u00b7 top {pq["top"]} shown per ranking \u00b7 written '
        f'{_e(time.strftime("%Y-%m-%d %H:%M"))}</p>', warnings, notes,
        f'<nav>{"".join(nav)}</nav></header>',
        '<main><section id="summary"><h2>Summary</h2>', markdown_tables_html(payload["table_markdown"]),
        "</section>",
        *(dataset_section(label, ds, payload, thumbs=thumbs, max_cards=max_cards)
          for label, ds in pq["datasets"].items()),
        f'</main><footer>Wall time per stage: {timings}<br>Written by eval.py; self-contained (no network).'
        "</footer>",
    ]
    return PAGE.format(title=_e(f"Evaluation report {run}"), css=CSS, script=SCRIPT, body="\n".join(body))


CSS = """
:root { --pos: #1a9c3a; --neg: #d62728; --junk: #a0a0a0; --query: #1f77d4; --ink: #222; --muted: #666; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; color: var(--ink); background: #fafafa; }
header, main, footer { max-width: 1500px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 16px; }
h1 { margin: 0 0 4px; font-size: 24px; } h1 .run { color: var(--muted); font-weight: normal; }
h2 { margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #ddd; font-size: 20px; }
h3 { margin: 22px 0 6px; font-size: 16px; }
.meta { color: var(--muted); margin: 0 0 8px; }
.warn { background: #fff4ce; border: 1px solid #e0c200; border-left: 6px solid #e0a800; padding: 6px 10px;
        margin: 6px 0; }
.note { color: var(--muted); margin: 4px 0; }
nav { position: sticky; top: 0; z-index: 2; background: #fafafa; padding: 8px 0; border-bottom: 1px solid #ddd;
      display: flex; flex-wrap: wrap; gap: 4px 14px; }
nav a { color: #0b5cad; text-decoration: none; font-weight: 600; } nav a.sub { font-weight: normal; }
.hint { color: var(--muted); margin: 2px 0 8px; font-size: 13px; }
.sorthint { display: none; } .js .sorthint { display: inline; }
table { border-collapse: collapse; background: #fff; margin: 4px 0 12px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f0f0f0; text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.na { color: #999; }
table.summary td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
.js th[data-sort] { cursor: pointer; user-select: none; }
.js th[data-sort]::after { content: " \\21C5"; color: #aaa; }
.js th[aria-sort=ascending]::after { content: " \\25B2"; color: var(--ink); }
.js th[aria-sort=descending]::after { content: " \\25BC"; color: var(--ink); }
td.q a { color: inherit; text-decoration: none; } td.q a:hover { text-decoration: underline; }
td.q { white-space: nowrap; }
.rowbox { display: inline-block; width: 64px; margin-right: 6px; text-align: center; }
.rowthumb { vertical-align: middle; max-width: 60px; height: auto; max-height: 40px;
            border: 2px solid var(--query); }
i.sq { display: inline-block; width: 11px; height: 11px; margin-right: 2px; border-radius: 2px;
       vertical-align: middle; }
i.sq.positive { background: var(--pos); } i.sq.negative { background: var(--neg); }
i.sq.junk { background: var(--junk); } i.sq.query { background: var(--query); }
.legend span { margin-right: 18px; }
svg.pr { max-width: 100%; height: auto; background: #fff; border: 1px solid #ddd; }
svg.pr .grid { stroke: #eee; } svg.pr .frame { fill: none; stroke: #999; }
svg.pr polyline { fill: none; stroke-width: 2.2; }
svg.pr text { font-size: 11px; fill: #555; text-anchor: middle; } svg.pr .tick.y { text-anchor: end; }
svg.pr .ptitle { font-size: 13px; font-weight: 600; fill: var(--ink); } svg.pr .axis { font-size: 12px; }
.prlegend { margin: 4px 0 8px; } .prlegend span { margin-right: 18px; white-space: nowrap; }
.prlegend svg { vertical-align: middle; margin-right: 5px; }
.card { display: flex; gap: 16px; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px;
        margin: 10px 0; scroll-margin-top: 48px; }
.card:target { outline: 3px solid var(--query); }
.qside { flex: 0 0 auto; width: 150px; } .qside h4 { margin: 0 0 6px; }
.qframe { display: inline-block; border: 4px solid var(--query); line-height: 0; }
.qimg { max-width: 142px; height: auto; max-height: 128px; }
.strips { flex: 1 1 auto; min-width: 0; }
.strip { padding: 6px 0 8px; border-top: 1px solid #eee; }
.strip:first-child { border-top: none; padding-top: 0; }
.side { display: flex; flex-wrap: wrap; gap: 2px 16px; align-items: baseline; margin-bottom: 4px;
        font-size: 13px; }
.side .aps { color: var(--muted); font-variant-numeric: tabular-nums; }
.up { color: var(--pos); } .down { color: var(--neg); }
ol.tiles { list-style: none; display: flex; flex-wrap: wrap; gap: 6px; margin: 0; padding: 0; }
.tile { width: 108px; font-size: 12px; }
.tile .frame { position: relative; display: flex; align-items: center; justify-content: center; width: 108px;
               height: 82px; border: 3px solid var(--neg); background: #eee; overflow: hidden; }
.tile.positive .frame { border-color: var(--pos); } .tile.junk .frame { border-color: var(--junk); }
.tile img { max-width: 102px; max-height: 76px; width: auto; height: auto; display: block; }
.tile .mark { position: absolute; top: 0; left: 0; padding: 0 4px; color: #fff; font-weight: 700; font-size: 12px;
              background: var(--neg); border-bottom-right-radius: 3px; }
.tile.positive .mark { background: var(--pos); } .tile.junk .mark { background: var(--junk); }
.cap { display: flex; gap: 4px; align-items: baseline; margin-top: 2px; white-space: nowrap; overflow: hidden; }
.cap .score { margin-left: auto; font-variant-numeric: tabular-nums; }
.move { position: absolute; top: 0; right: 0; padding: 0 4px; font-size: 11px; font-weight: 700;
        background: rgba(255, 255, 255, 0.9); border-bottom-left-radius: 3px; }
.move.up { color: var(--pos); } .move.down { color: var(--neg); }
.fn { display: block; color: var(--muted); font-size: 11px; overflow: hidden; text-overflow: ellipsis;
      white-space: nowrap; max-width: 142px; }
.tile .fn { max-width: 108px; }
.qcls { display: block; font-size: 12px; font-weight: 600; overflow-wrap: anywhere; }
.noimg { display: inline-flex; align-items: center; justify-content: center; width: 100px; background: #ddd;
         color: #777; font-size: 11px; }
footer { color: var(--muted); font-size: 12px; padding: 24px; }
"""

SCRIPT = """
document.documentElement.classList.add('js');
document.querySelectorAll('table.sortable').forEach(function (table) {
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  heads.forEach(function (th, col) {
    if (!th.dataset.sort) return;
    th.tabIndex = 0;
    function sort() {
      var now = th.getAttribute('aria-sort');
      var asc = now ? now === 'descending' : th.dataset.sort === 'asc';
      heads.forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(r) { var v = parseFloat(r.cells[col].dataset.v); return isNaN(v) ? null : v; }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null);  // n/a last either way
        return asc ? x - y : y - x;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    }
    th.addEventListener('click', sort);
    th.addEventListener('keydown', function (e) {
      if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sort(); }
    });
  });
});
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
{body}
<script>{script}</script>
</body>
</html>
"""
