"""report.html: one self-contained page (figures as base64 PNG, inline CSS and SVG), readable offline."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

from analysis.attribution_summary import at_k
from data.format import write_atomic
from data.run_folder import SWEEP_COLUMNS

CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}.feature{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:1em 0}
.feature h3{margin:.2em 0;font-size:1.05em}.meta{color:#555;font-size:.9em}.view{margin:.5em 0 .8em}
.view b{font-size:.85em;color:#333}.ctx{font-family:ui-monospace,monospace;font-size:.82em;white-space:pre;
overflow-x:auto;margin:.15em 0}.ctx .val{color:#888;display:inline-block;min-width:5em}
.hl{background:#ffb347;border-radius:3px;font-weight:bold}.tok{border-right:1px dotted #e3e3e3}
.spark{vertical-align:middle;margin-left:1em}
"""


def figure_html(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def table_html(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "–" if v is None else html.escape(str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def sparkline(steps: list[int], values: list[float], width: int = 220, height: int = 36) -> str:
    """Inline SVG polyline of a decoder-norm curve over log10(1 + step)."""
    x = np.log10(1.0 + np.asarray(steps, dtype=float))
    y = np.asarray(values, dtype=float)
    x = (x - x.min()) / max(np.ptp(x), 1e-12) * (width - 4) + 2
    y = height - 2 - y / max(y.max(), 1e-12) * (height - 4)
    pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y))
    return (f'<svg class="spark" width="{width}" height="{height}" role="img" aria-label="decoder norm over steps">'
            f'<rect width="{width}" height="{height}" fill="#fafafa"/>'
            f'<polyline points="{pts}" fill="none" stroke="#4c72b0" stroke-width="1.5"/></svg>')


def context_html(ctx: dict) -> str:
    spans = []
    for j, tok in enumerate(ctx["tokens"]):
        shown = html.escape(tok.replace("\n", "↵").replace("\t", "→"))
        spans.append(f'<span class="{"hl" if j == ctx["highlight"] else "tok"}">{shown}</span>')
    return f'<div class="ctx"><span class="val">{ctx["value"]:.3g}</span>{"".join(spans)}</div>'


def browser_html(entries: list[dict], steps: list[int]) -> str:
    if not entries:
        return "<p>No browser: the run's dataset could not be read, or no feature is alive.</p>"
    cards = []
    for e in entries:
        views = "".join(
            f'<div class="view"><b>{html.escape(v["label"])}</b>'
            + ("".join(context_html(c) for c in v["contexts"]) or '<div class="meta">no firing tokens</div>')
            + "</div>" for v in e["views"])
        meta = (f'{e["category"]} · emerges at step {e["emergence_step"]} · peaks at step {e["peak_step"]} · '
                f'lifetime {e["lifetime"]} snapshots · fires on {e["freq"]:.2%} of tokens · chosen: {e["why"]}')
        cards.append(f'<div class="feature"><h3>Feature {e["feature"]}{sparkline(steps, e["norms"])}</h3>'
                     f'<div class="meta">{html.escape(meta)}</div>{views}</div>')
    return "".join(cards)


def _share(v: float | None) -> str | None:
    return None if v is None else f"{v:.0%}"


def _mean_sd(mean: float | None, sd: float | None) -> str | None:
    return None if mean is None else f"{mean:.0%} ± {sd:.0%}"


def attribution_html(result: dict, figure: Path | None) -> str:
    """One task's attribution (analysis/attribution_summary.py summarise): verdict, figure, per-snapshot table, top features.
    Shares of a gap below min_gap are shown as "–" (attribution.json has them as null)."""
    k = result["show_k"]
    check = result["causal_check"]
    m = result["model"]
    split = result.get("split") or {"selection": result["n_prompts"], "test": result["n_prompts"]}
    intro = (f'<p>Metric: {html.escape(result["metric"])}; {result["n_prompts"]} prompt pairs of '
             f'{result["prompt_tokens"]} tokens: {split["selection"]} select the features (attributions), '
             f'{split["test"]} others test them (causal check); hook {html.escape(m["hook"])} after block '
             f'{m["layer"]} of <code>{html.escape(m["repo"])}</code>; integrated gradients with {result["ig_steps"]} '
             f'steps; corrupted code: {html.escape(result.get("code", "joint"))} (docs/ANALYSIS.md). '
             f'Controls: {result["random_sets"]} sets of k random features matched to the top k in mean '
             f'|f_clean − f_corr| up to the answer position. Causal check at k = {k}: passed at {check["passed"]} of '
             f'the {check["learned_snapshots"]} snapshots where the task is learned ({html.escape(check["rule"])}). '
             f'Shares are not reported ("–") where their gap is below min_gap = {result["min_gap"]:g} nats.</p>')
    examples = table_html(["clean prompt", "corrupted prompt", "answer", "wrong"],
                          [[e["clean"], e["corrupted"], e["answer"], e["wrong"]] for e in result["examples"][:3]])
    rows = []
    for s in result["snapshots"]:
        sel = s.get("selection", {"gap": s["gap"], "learned": s["learned"]})
        top5 = ", ".join(f'#{f["feature"]}' + (f' ({f["share_of_gap"]:.0%})' if f["share_of_gap"] is not None else "")
                         for f in s["top_features"][:5])
        rows.append([s["name"], s["step"], sel["gap"], _share(s.get("feature_share")), _share(s.get("error_share")),
                     s["completeness_error"], s["gap"], "yes" if s["learned"] else "no",
                     _share(at_k(s, "break_top_closed", k)),
                     _mean_sd(at_k(s, "break_random_closed_mean", k), at_k(s, "break_random_closed_std", k)),
                     _share(at_k(s, "restore_top_recovered", k)), top5])
    per_snapshot = table_html(["snapshot", "step", "gap (selection)", "features' share", "error term's share",
                               "completeness error", "gap (test)", "learned (test)", f"gap closed by top {k} broken",
                               f"... by matched random {k} (mean ± sd)", f"recovered by top {k} restored",
                               "top 5 features (share of gap)"], rows)
    fig = figure_html(figure, f"7. {result['task']}: the effect over snapshots on the test prompts with the top / "
                              f"matched random {k} features broken and the top restored; the share carried by the "
                              "features and by the error term; each carrier's share of the gap; their decoder "
                              "norms. Grey: the effect is below min_gap, no share reported.") if figure else ""
    return intro + examples + fig + per_snapshot


def render(title: str, sections: list[tuple[str, str]], intro: str = "") -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{intro}{body}</body></html>")


def run_report(summary: dict, figures: list[tuple[Path, str]], browser: list[dict], out_path: Path,
               attributions: list[tuple[dict, Path | None]] = ()) -> Path:
    names = [s["name"] for s in summary["snapshots"]]
    steps = [s["step"] for s in summary["snapshots"]]
    ev, l0, dead = summary["explained_variance"], summary["l0"], summary["dead_fraction"]

    def at(block: dict, name: str):
        per = block.get("per_snapshot") or {}
        return per.get(name)

    per_snapshot = table_html(
        ["snapshot", "step", f"explained variance ({ev['source']})", f"L0 ({l0['source']})", "dead at snapshot"],
        [[n, s, at(ev, n), at(l0, n), at(dead, n)] for n, s in zip(names, steps)]
        + [["overall", "", ev.get("overall"), l0.get("overall"), dead.get("overall")]])
    tokens = summary.get("tokens")
    facts = table_html(["quantity", "value"], [
        ["features (d_sae)", summary["n_features"]], ["activation", summary["activation"]],
        *[[f"category: {c}", n] for c, n in summary["categories"].items()],
        ["median emergence step (born after the first snapshot)", summary["median_emergence_step"]],
        ["turning point (half of live features emerged), step", summary["turning_point_step"]],
        ["median persistence of born features", summary["persistence"]["median"]],
        ["share of born features persisting >= 60% of later snapshots", summary["persistence"]["share_at_least_0.6"]],
        ["emergence fraction (of a feature's max norm)", summary["emergence_fraction"]],
        ["activation threshold (x sqrt(D), per snapshot)", summary["active_threshold"]],
        ["tokens analysed / evaluated", f"{tokens['analysed']} / {tokens['eval']}" if tokens else None],
    ])
    intro = (f'<p class="meta">Run <code>{html.escape(summary["run"])}</code>. Columns and rules: '
             "docs/ANALYSIS.md; tables: features.csv, summary.json, browser.json beside this file.</p>")
    sections = [("Summary", facts), ("Per snapshot", per_snapshot),
                ("Figures", "".join(figure_html(p, c) for p, c in figures)),
                *[(f"Attribution: {r['task']}", attribution_html(r, fig)) for r, fig in attributions],
                ("Feature browser", browser_html(browser, steps))]
    write_atomic(out_path, render(f"Crosscoder analysis: {Path(summary['run']).name}", sections, intro))
    return out_path


def sweep_report(runs, figures: list[tuple[Path, str]], sweep_dir: str | Path, out_path: Path) -> Path:
    """The sweep's report.html: one row per run (a pandas frame from analysis.sweep.collect_runs) and the figures."""
    cols = ["job", "kind", "snapshots", *SWEEP_COLUMNS]
    rows = runs[cols].astype(object).where(runs[cols].notna(), None).values.tolist()
    sections = [("Runs", table_html(cols, rows)), ("Figures", "".join(figure_html(p, c) for p, c in figures))]
    write_atomic(out_path, render(f"Sweep analysis: {Path(sweep_dir).name}", sections,
                                  f'<p class="meta">{len(runs)} runs from {sweep_dir}</p>'))
    return out_path
