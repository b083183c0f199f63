"""What a report calls things: dataset, protocol and row titles, the papers' figures for a row
(configs/paper_results.yaml), and the notes that say when a run is not comparable with the papers."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from helpers.evaluation.metrics import CLASS_PROTOCOLS

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from helpers.evaluation.models import WeightsPlan
REPO = Path(__file__).resolve().parents[2]
NOT_COMPARABLE = ("Built-in synthetic benchmark: these numbers are NOT comparable with the papers' tables "
                  "(revisited Oxford / Paris); they check that the pipeline runs and learns.")
DATASET_SHORT = {"roxford5k": "ROxf", "rparis6k": "RPar"}
#: A class folder's label (``folder:PATH``, helpers.evaluation.data) starts with this.
FOLDER_PREFIX = "folder:"
PROTOCOL_TITLES = {"easy": "Easy", "medium": "Medium", "hard": "Hard", "class": "class"}
METHOD_TITLES = {
    "cvnet_global": "CVNet-Global",
    "cvnet_rerank": "CVNet-Global + CVNet-Rerank",
    "superglobal": "SuperGlobal",
    "superglobal_rerank": "SuperGlobal + re-ranking",
    "timm_global": "timm global model",
}


def dataset_title(label: str) -> str:
    """``roxford5k+1m`` -> ``ROxf+1M``; a class folder ``folder:data/shoes/test`` -> ``shoes/test``; names without a
    short form stay as they are."""
    base, plus = (label[:-3], "+1M") if label.endswith("+1m") else (label, "")
    if base.startswith(FOLDER_PREFIX):
        from datasets.folder import class_folder_title  # only for a class folder's report (torch is loaded then)

        return class_folder_title(base[len(FOLDER_PREFIX):]) + plus
    return DATASET_SHORT.get(base, base) + plus


def protocol_letter(protocol: str) -> str:
    """A protocol in a table head: E, M, H; nothing for a class folder's one protocol (its column is just "AP")."""
    return "" if protocol in CLASS_PROTOCOLS else protocol[0].upper()


def ap_name(protocol: str) -> str:
    """A query's AP named by its protocol in a grid's title: AP(M), AP(H); just AP for a class folder's one protocol."""
    letter = protocol_letter(protocol)
    return f"AP({letter})" if letter else "AP"


def shown_protocol(per_protocol: Mapping[str, Any] | Sequence[str]) -> str:
    """The protocol whose ranking a report lists (the keys of ``per_protocol``): Medium, else the only one."""
    return "medium" if "medium" in per_protocol else next(iter(per_protocol))


def method_title(method: str, *, depth: int, mode: str | None = None, arch: str | None = None) -> str:
    if method == "timm_global":  # not a ResNet of the releases: named by its architecture
        return f"{arch or 'timm'} (global)"
    title = f"{METHOD_TITLES[method]} R{depth}"
    return f"{title} ({mode} mode)" if method == "cvnet_rerank" and mode else title


def row_titles(rows: Sequence[str], post: Mapping[str, Mapping[str, Any]], *, depth: int, mode: str | None,
               arch: str | None = None) -> dict[str, str]:
    """Each reported row's title: a method's (:func:`method_title`), or for a post-processed row its global
    ranking's followed by what was applied, e.g. ``SuperGlobal R50 + α-DBA k=2 α=3 + α-QE k=2 α=3``. The global
    rankings are titled too, reported or not: a re-ranked row names the ranking it started from."""
    titles = {kind: method_title(kind, depth=depth, arch=arch) for kind in ("cvnet_global", "superglobal",
                                                                            "timm_global")}
    titles.update({row: (f"{titles[post[row]['base']]} + {post[row]['applied']}" if row in post
                         else method_title(row, depth=depth, mode=mode, arch=arch)) for row in rows})
    return titles


def payload_titles(payload: Mapping[str, Any]) -> dict[str, str]:
    """The row titles of a ``results.json`` payload (computed for one written before they were recorded)."""
    if payload.get("titles"):
        return dict(payload["titles"])
    cfg = payload["config"]
    return row_titles(payload["methods"], payload.get("post_rows") or {}, depth=int(cfg["model"]["depth"]),
                      mode=cfg["rerank"]["cvnet"]["mode"], arch=(cfg["model"].get("timm") or {}).get("arch"))


def load_paper_results(path: str | os.PathLike | None) -> dict[str, Any]:
    """The rows of ``configs/paper_results.yaml`` (a relative path not found here is taken from the repository)."""
    if not path:
        return {}
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = REPO / path
    if not path.is_file():
        logger.warning("paper results file %s not found: no paper figures printed", path)
        return {}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return data.get("rows", {})


def paper_figure(rows: Mapping[str, Any], *, method: str, depth: int, label: str, protocol: str
                 ) -> dict[str, Any] | None:
    """The paper's figure {'value', 'confirmed', 'source', 'note'?} for a (method, depth, dataset, protocol)."""
    for row in rows.values():
        if row.get("method") == method and int(row.get("depth", -1)) == depth:
            fig = (row.get("mAP", {}).get(label) or {}).get(protocol)
            if fig is None:
                return None
            out = {"value": float(fig["value"]), "confirmed": bool(fig.get("confirmed", False)),
                   "source": row.get("source")}
            if fig.get("note"):
                out["note"] = fig["note"]
            return out
    return None


def format_paper(fig: Mapping[str, Any] | None) -> str:
    """``75.6`` for a confirmed figure, ``75.6*`` for one not yet checked against the paper, "" for none."""
    if fig is None:
        return ""
    return f"{fig['value']:.1f}" + ("" if fig["confirmed"] else "*")


def comparability_notes(cfg: Mapping[str, Any], plan: WeightsPlan, builtin: bool) -> tuple[bool, list[str]]:
    """Whether paper figures are printed beside ours, and the notes on what differs from the papers' setup."""
    notes: list[str] = []
    if cfg["extraction"].get("flip"):
        notes.append("Every descriptor of this run averages the image's and its mirror image's (extraction.flip); "
                     "the papers' rows use no flip.")
    if builtin:
        return False, [NOT_COMPARABLE, *notes]
    if plan.source != "official":
        return False, notes + ["Paper figures are printed only with the official weights (model.weights=...)."]
    if cfg["rerank"]["cvnet"]["mode"] != "paper" and "cvnet_rerank" in cfg["methods"]:
        notes.append("CVNet re-ranking ran in 'clean' mode (first 100 of the global ranking, no ground truth); "
                     "the paper's figures used the released protocol: rerank.cvnet.mode=paper.")
    sg = cfg["model"]["superglobal"]
    off = [k for k in ("gemp", "rgem", "sgem", "relup") if not sg.get(k, True)]
    if off and any(m.startswith("superglobal") for m in cfg["methods"]):
        notes.append(f"SuperGlobal ran with {', '.join(off)} switched off; the paper's rows use all four.")
    if sg.get("antialias", True) and any(m.startswith("superglobal") for m in cfg["methods"]):
        notes.append("SuperGlobal's Scale-GeM resize ran with antialias=True; the release's 2023 code ran under "
                     "torchvision <= 0.16, which did not antialias tensors, so the published rows were most likely "
                     "computed with antialias=False (model.superglobal.antialias=false, as the paper-row configs).")
    return True, notes
