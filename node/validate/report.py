"""The validation report: one self-contained HTML file (matplotlib figures,
Agg backend, inline as base64 PNG) and a JSON file with every figure."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

REPORT_HTML = "validation-report.html"
REPORT_JSON = "validation-report.json"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(4.5, 4.0))


def roc_plot(scores: dict) -> str:
    fig, ax = _figure()
    roc = scores["roc"]
    if roc:
        ax.plot(roc["fpr"], roc["tpr"], label=f"AUROC {scores['auroc']['value']:.3f}")
    for name, op in scores["operating_points"].items():
        if op["sensitivity"] is not None and op["specificity"] is not None:
            ax.plot(1 - op["specificity"], op["sensitivity"], "o", label=f"{name} ({op['threshold']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC curve")
    ax.legend(loc="lower right")
    return _png(fig)


def reliability_plot(scores: dict) -> str:
    fig, ax = _figure()
    rows = [r for r in scores["calibration"] if r["n"]]
    ax.plot([r["mean_predicted"] for r in rows], [r["observed"] for r in rows], "o-", label="observed")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set(xlabel="mean predicted probability", ylabel="observed positive fraction", title="Reliability (10 bins)",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    return _png(fig)


def dice_box_plot(scores: dict) -> str:
    fig, ax = _figure()
    names = list(scores["per_region"])
    ax.boxplot([[c[r]["dice"] for c in scores["per_case"].values()] for r in names], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set(ylabel="Dice", ylim=(0, 1), title=f"Dice per region (n = {scores['n']})")
    return _png(fig)


def _v(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else html.escape(str(x))


def _ci(block: dict, key: str = "value") -> str:
    if block.get(key) is None:
        return "not defined"
    ci = f" ({_v(block['ci95_low'])}–{_v(block['ci95_high'])})" if block.get("ci95_low") is not None else " (no interval)"
    return _v(block[key]) + ci


def _table(head: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _ops(ops: dict) -> list[list]:
    return [[html.escape(n), _v(o["threshold"]), _v(o["sensitivity"]), _v(o["specificity"]), _v(o["accuracy"]),
             _v(o["precision"]), _v(o["f1"]), f"{o['tp']}/{o['fp']}/{o['tn']}/{o['fn']}"] for n, o in ops.items()]


OPS_HEAD = ["threshold", "value", "sensitivity", "specificity", "accuracy", "precision", "F1", "TP/FP/TN/FN"]


def _classification_html(s: dict) -> str:
    parts = [f"<h2>Classification</h2><p>AUROC {_ci(s['auroc'])}, n = {s['n']} ({s['n_positive']} positive, "
             f"{s['n_patients']} patients); {html.escape(s['auroc']['ci_method'])}.</p>",
             _table(OPS_HEAD, _ops(s["operating_points"])), roc_plot(s), reliability_plot(s),
             "<h3>Calibration</h3>",
             _table(["bin", "n", "positives", "mean predicted", "observed"],
                    [[f"{r['bin_low']:.1f}–{r['bin_high']:.1f}", r["n"], r["positives"], _v(r["mean_predicted"]),
                      _v(r["observed"])] for r in s["calibration"]])]
    for name, rows in s["subgroups"].items():
        parts.append(f"<h3>By {html.escape(name)}</h3>")
        parts.append(_table(["value", "n", "positives", "AUROC (95 % CI)",
                             *[f"sens/spec at {n}" for n in s["operating_points"]]],
                            [[html.escape(r["value"] or "unknown"), r["n"], r["n_positive"], _ci(r["auroc"]),
                              *[f"{_v(o['sensitivity'])} / {_v(o['specificity'])}" for o in r["operating_points"].values()]]
                             for r in rows]))
    return "".join(parts)


def _segmentation_html(s: dict) -> str:
    rows = [[html.escape(r), _ci(b["dice"], "mean"), _ci(b["hd95_mm"], "mean"), b["hd95_mm"]["n"], b["hd95_not_defined"]]
            for r, b in s["per_region"].items()]
    cases = [[html.escape(k), *[f"{_v(c[r]['dice'])} / {_v(c[r]['hd95_mm'], 2)}" for r in s["per_region"]]]
             for k, c in s["per_case"].items()]
    return (f"<h2>Segmentation</h2><p>n = {s['n']} studies; {html.escape(s['ci_method'])}. Empty masks: both empty "
            "gives Dice 1, one empty gives Dice 0; HD95 is then not defined and not averaged.</p>"
            + _table(["region", "Dice mean (95 % CI)", "HD95 mm mean (95 % CI)", "HD95 defined", "HD95 not defined"], rows)
            + dice_box_plot(s) + "<h3>Per study (Dice / HD95 mm)</h3>"
            + _table(["study", *s["per_region"]], cases))


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write :data:`REPORT_JSON` and :data:`REPORT_HTML` under ``out_dir``; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / REPORT_JSON, out_dir / REPORT_HTML
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    m, leak = report["model"], report["leakage"]
    lines = [
        f"Pipeline <b>{html.escape(report['pipeline'])}</b>, model card <b>{html.escape(m['card'])}</b> version "
        f"{html.escape(m['version'])} (card SHA-256 <code>{m['card_sha256']}</code>, weights SHA-256 "
        f"<code>{m['weights_sha256']}</code>); configuration {html.escape(report['config']['path'] or 'defaults')} "
        f"(SHA-256 <code>{report['config']['sha256'] or '—'}</code>).",
        f"Scored on <b>{report['n_scored']}</b> {report['unit']}; {report['n_results']} results, "
        f"{report['n_unlabelled']} without a label, {len(report['labels_without_result'])} labels without a result.",
        f"Leakage check ({html.escape(leak['identifiers'])}): {len(leak['cases'])} case(s) among the card's training or "
        f"validation members, " + ("<b>included</b> (--include-leaked): these figures are NOT held out."
                                   if leak["included"] else "excluded from the figures."),
    ]
    if report.get("demonstration_only"):
        lines.append("The model card says: demonstration weights, not for diagnosis.")
    leaked_rows = [[html.escape(c["key"]), html.escape(c["reason"])] for c in leak["cases"][:50]]
    body = "".join(f"<p>{line}</p>" for line in lines)
    if leaked_rows:
        body += _table(["case", "member of"], leaked_rows) + (f"<p>… {len(leak['cases']) - 50} more</p>"
                                                               if len(leak["cases"]) > 50 else "")
    if "classification" in report:
        body += _classification_html(report["classification"])
    if "segmentation" in report:
        body += _segmentation_html(report["segmentation"])
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}img{margin:.5em}")
    html_path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Validation: "
                         f"{html.escape(report['pipeline'])}</title><style>{style}</style></head><body>"
                         f"<h1>Local validation: {html.escape(report['pipeline'])}</h1>{body}</body></html>\n",
                         encoding="utf-8")
    return json_path, html_path
