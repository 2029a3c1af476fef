"""Reports: `report.json` (everything, for scripts) and `report.md` (for people), written atomically.

Every report says which model, which data, how many edits and which protocol (`moecli.engine.evaluation`), so
a number never travels without what it was measured on.
"""

from __future__ import annotations

import math
from pathlib import Path

from moecli.fsutil import atomic_write_json, atomic_write_text

METRIC_ROWS = [
    ("known", "Known"), ("rel", "Rel"), ("gen", "Gen"), ("loc", "Loc"), ("port", "Port"),
    ("avg", "Avg"), ("rel_free_exact", "Rel free exact"), ("rel_free_clause", "Rel free clause"),
    ("rel_free_first", "Rel free first"), ("gen_free_exact", "Gen free exact"),
    ("gen_free_clause", "Gen free clause"), ("gen_free_first", "Gen free first"), ("loc_free", "Loc free"),
    ("rel_strict", "Rel strict"), ("gen_strict", "Gen strict"),
    ("loc_strict", "Loc strict"), ("rel_em", "Rel gen-EM"), ("gen_em", "Gen gen-EM"),
    ("rel_ppl", "Rel PPL"),
]


def public_summary(summary: dict) -> dict:
    """The summary keys every command prints with `--json`: rel, gen, loc, avg, n_edits always;
    port, known, loc_by_group when present; plus the strict and generation forms."""
    out = {k: summary.get(k) for k in ("rel", "gen", "loc", "avg")}
    for k in ("port", "known", "loc_by_group", "loc_free_by_group", "routing"):
        if summary.get(k) is not None:
            out[k] = summary[k]
    for k, _ in METRIC_ROWS:
        if k not in out and summary.get(k) is not None:
            out[k] = summary[k]
    out["n_edits"] = summary.get("n_edits", 0)
    return out


def metric_rows(columns: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """Rows (label, one cell per column) of the metrics present in any column, then Loc per group."""
    def fmt(v) -> str:
        return "—" if v is None else f"{v:.3f}"

    rows = []
    for key, label in METRIC_ROWS:
        if any(col.get(key) is not None for col in columns.values()):
            rows.append((label, [fmt(col.get(key)) for col in columns.values()]))
    for key, label in (("loc_by_group", "Loc"), ("loc_free_by_group", "Loc free")):
        groups = sorted({g for col in columns.values() for g in (col.get(key) or {})})
        for g in groups:
            rows.append((f"{label}[{g}]", [fmt((col.get(key) or {}).get(g)) for col in columns.values()]))
    return rows


def write_report(out_dir: str | Path, report: dict) -> tuple[Path, Path]:
    """Write report.json and report.md into `out_dir`; `report["columns"]` maps a name to a summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    atomic_write_json(json_path, report)
    atomic_write_text(md_path, render_markdown(report))
    return json_path, md_path


def render_markdown(report: dict) -> str:
    """A human report: the context lines, then the metrics table."""
    lines = [f"# moecli {report.get('command', '')} report", ""]
    for key in ("model", "data", "method", "protocol", "n_edits", "adapter", "seed", "created"):
        if report.get(key) is not None:
            lines.append(f"- **{key}**: {report[key]}")
    if report.get("timings"):
        lines.append("- **timings (s)**: " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()))
    columns = report.get("columns", {})
    lines += ["", "| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, cells in metric_rows(columns):
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    routing = report.get("summary", {}).get("routing")
    if routing:
        lines += ["", "Routing (shares of inputs; `gen_when_reached`: Gen of the rephrasings that reached their edit):",
                  "", "| " + " | ".join(routing) + " |", "|---" * len(routing) + "|",
                  "| " + " | ".join("—" if v is None else f"{v:.3f}" for v in routing.values()) + " |"]
    for extra in report.get("notes", []):
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def plot_retention(retention: list[dict], path: str | Path, title: str = "retention") -> Path | None:
    """Draw Rel/Gen/Loc of the sampled earlier edits against the number of edits made so far."""
    if not retention:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moecli.fsutil import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [p["n_edited"] for p in retention]
    for key in ("rel", "gen", "loc"):
        ys = [p.get(key) for p in retention]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=key.capitalize())
    ax.set_xlabel("edits made")
    ax.set_ylabel("score on earlier edits")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ------------------------------------------------------------------ CI checks
GATED_METRICS = ("rel", "gen", "loc", "port", "avg", "rel_strict", "gen_strict", "loc_strict", "rel_em", "gen_em",
                 "rel_free_exact", "rel_free_clause", "rel_free_first", "gen_free_exact", "gen_free_clause",
                 "gen_free_first", "loc_free")


def parse_fail_under(spec: str | None, option: str = "--fail-under") -> dict[str, float]:
    """`rel=0.95,gen=0.7,loc=0.99` -> {"rel": 0.95, ...}; a malformed spec or an unknown metric is a
    one-line UserError."""
    from moecli.errors import UserError

    if not spec:
        return {}
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not name:
            raise UserError(f"{option} {spec}: expected METRIC=VALUE[,METRIC=VALUE...], e.g. rel=0.95,loc=0.99")
        if name not in GATED_METRICS:
            raise UserError(f"{option} {spec}: unknown metric {name!r} (choose from {', '.join(GATED_METRICS)})")
        try:
            out[name] = float(value)
        except ValueError:
            raise UserError(f"{option} {spec}: {name}={value!r} is not a number") from None
        if not math.isfinite(out[name]):  # `x < nan` is never true: such a check could not fail
            raise UserError(f"{option} {spec}: {name}={value} is not a finite number")
    return out


REPORT_NAMES = ("report.json", "report.md")


def check_report_free(out_dir: str | Path, option: str = "--out") -> None:
    """Refuse an --out that already holds a report (an earlier run's, or a user's own file of that name):
    a report is never replaced without a word. Checked before the run, so nothing is lost or half done."""
    from moecli.errors import UserError

    held = [name for name in REPORT_NAMES if (Path(out_dir) / name).exists()]
    if held:
        raise UserError(f"{option} {out_dir}: already holds {held[0]}; pick another --out (or move it away)")


def shortfalls(summary: dict, thresholds: dict[str, float]) -> list[str]:
    """One line per metric of `summary` under its threshold; a gated metric the run did not measure
    (no rephrases for gen, say) falls short too, since the check cannot pass on nothing."""
    lines = []
    for name, bound in thresholds.items():
        value = summary.get(name)
        if value is None:
            lines.append(f"{name} was not measured (fail-under {name}={bound:g})")
        elif value < bound:
            lines.append(f"{name} {value:.4f} < {bound:g}")
    return lines


def write_junit(path: str | Path, report: dict, thresholds: dict[str, float]) -> Path:
    """A JUnit XML file with one test case per edit, for CI systems to display.

    A case fails when one of the edit's own metrics is under its `--fail-under` threshold; without
    thresholds, when the edit's answer is not fully produced (`rel_strict` < 1).
    """
    import xml.etree.ElementTree as ET

    gates = thresholds or {"rel_strict": 1.0}
    per_edit = report.get("per_edit", [])
    suite = ET.Element("testsuite", name=f"moecli {report.get('command', '')}".strip(), tests=str(len(per_edit)))
    failures = 0
    for row in per_edit:
        case = ET.SubElement(suite, "testcase", classname=f"moecli.{report.get('method') or 'model'}",
                             name=f"{row.get('id')}: {row.get('prompt')} -> {row.get('target')}")
        props = ET.SubElement(case, "properties")
        for key in GATED_METRICS + ("known",):
            if row.get(key) is not None:
                ET.SubElement(props, "property", name=key, value=f"{row[key]:.4f}")
        short = [line for name, bound in gates.items() if name in row
                 for line in shortfalls({name: row[name]}, {name: bound})]
        if short:
            failures += 1
            ET.SubElement(case, "failure", message="; ".join(short)).text = "\n".join(short)
    suite.set("failures", str(failures))
    data = ET.tostring(suite, encoding="utf-8", xml_declaration=True)
    from moecli.fsutil import atomic_write_bytes

    atomic_write_bytes(path, data + b"\n")
    return Path(path)
