"""The benchmark table (Table II of Hu et al., *Data-free Dense Depth Distillation*):
rows, the recovery ratio, and the paper's AbsRel ordering tested on our numbers."""

from __future__ import annotations

import math
from typing import Any

from depthkd_core.evaluate.report import to_markdown

# Row key -> label of the paper's table.
LABELS: dict[str, str] = {
    "constant": "Constant (median train depth)",
    "teacher": "Teacher (supervised)",
    "student": "Student (supervised, upper bound)",
    "noise": "Noise",
    "dfad": "DFAD",
    "kd_ood": "KD-OOD",
    "datafree": "Ours (datafree)",
    "datafree_no_recon": "Ours w/o reconstruction",
    "datafree_no_g": "Ours w/o G",
    "datafree_no_mix": "Ours w/o mixing",
    "datafree_also_gx": "Ours + KD on G(x)",
}

# The paper's NYU-v2 AbsRel ranges (METHODS.md section 1); the claim is the ordering.
PAPER_ABS_REL: dict[str, tuple[float, float]] = {
    "noise": (0.43, 0.52), "dfad": (0.29, 0.35), "kd_ood": (0.16, 0.19),
    "datafree": (0.15, 0.17), "student": (0.13, 0.15),
}
# The paper's AbsRel ordering, worst first: each row's AbsRel exceeds the next one's.
CLAIM_ORDER = ("noise", "dfad", "kd_ood", "datafree", "student")
ABLATIONS = ("datafree_no_recon", "datafree_no_g", "datafree_no_mix", "datafree_also_gx")

COLUMNS = ("row", "method", "abs_rel", "rmse", "delta1", "recovery", "params_M", "GMACs",
           "latency_ms", "steps", "train_s")


def recovery_ratio(delta1: float, noise_delta1: float, supervised_delta1: float) -> float:
    """(delta1 - noise) / (supervised - noise): 0 at the noise baseline, 1 at the supervised
    student; NaN when the two references coincide."""
    span = supervised_delta1 - noise_delta1
    return (delta1 - noise_delta1) / span if span != 0 else math.nan


def build_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows in ``results`` order. ``recovery`` (student rows only, not the teacher's
    architecture) needs the noise and student rows, else it is NaN."""
    noise, student = results.get("noise"), results.get("student")
    rows = []
    for key, res in results.items():
        row: dict[str, Any] = {"row": key, "method": LABELS.get(key, key)}
        if key not in ("teacher", "constant"):
            row["recovery"] = (recovery_ratio(res["delta1"], noise["delta1"], student["delta1"])
                               if noise and student else math.nan)
        row.update({c: res[c] for c in COLUMNS if c in res})
        rows.append({c: row[c] for c in COLUMNS if c in row})
    return rows


def check_pairs(pairs: list[list[str]], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each [worse, better] pair whose rows were run: AbsRel of both, margin, and whether
    ``worse`` really has the higher AbsRel."""
    checked = []
    for worse, better in pairs:
        if worse in results and better in results:
            a, b = results[worse]["abs_rel"], results[better]["abs_rel"]
            checked.append({"worse": worse, "better": better, "abs_rel_worse": a,
                            "abs_rel_better": b, "margin": a - b, "held": bool(a > b)})
    return checked


def check_claim(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The paper's AbsRel ordering on our rows: consecutive pairs of ``CLAIM_ORDER`` among
    the rows present, each with its margin (AbsRel worse - better) and verdict."""
    present = [k for k in CLAIM_ORDER if k in results]
    pairs = check_pairs([list(p) for p in zip(present, present[1:])], results)
    ablations = {k: results[k]["abs_rel"] - results["datafree"]["abs_rel"]
                 for k in ABLATIONS if k in results and "datafree" in results}
    return {"pairs": pairs, "held": all(p["held"] for p in pairs) if pairs else None,
            "held_count": sum(p["held"] for p in pairs), "ablation_vs_datafree": ablations}


def _claim_lines(claim: dict[str, Any]) -> list[str]:
    paper = ", ".join(f"{LABELS[k]} {lo:.2f}-{hi:.2f}" for k, (lo, hi) in PAPER_ABS_REL.items())
    lines = ["Paper (NYU-v2, AbsRel): noise 0.43-0.52 >> DFAD 0.29-0.35 >> KD-OOD 0.16-0.19 "
             "> ours 0.15-0.17; supervised student 0.13-0.15.", f"({paper})", ""]
    if claim["held"] is None:
        return lines + ["Ordering: not testable (fewer than two of its rows were run)."]
    verdict = "HELD" if claim["held"] else "DID NOT HOLD"
    lines.append(f"Ordering here: {verdict} ({claim['held_count']} of {len(claim['pairs'])} pairs).")
    lines += [f"- {p['worse']} ({p['abs_rel_worse']:.4f}) > {p['better']} ({p['abs_rel_better']:.4f}): "
              f"{'yes' if p['held'] else 'NO'}, margin {p['margin']:+.4f}" for p in claim["pairs"]]
    lines += [f"- ablation {k}: AbsRel {d:+.4f} vs datafree"
              for k, d in claim["ablation_vs_datafree"].items()]
    return lines


SECTION_COLUMNS = ("row", "method", "alignment", "abs_rel", "rmse", "delta1", "params_M",
                   "GMACs", "latency_ms", "steps", "train_s")


def section_table(title: str, claim: str, rows: list[tuple[str, str]],
                  pairs: list[list[str]], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One section: (name, method label) rows present in ``results``, and its pairs checked."""
    table = [{"row": name, "method": label, **{c: results[name][c] for c in SECTION_COLUMNS
                                              if c in results[name]}}
             for name, label in rows if name in results]
    return {"title": title, "claim": claim, "rows": table, "pairs": check_pairs(pairs, results)}


def _section_lines(section: dict[str, Any]) -> list[str]:
    lines = ["", f"## {section['title']}", "", f"Paper: {section['claim']}", ""]
    if not section["rows"]:
        return lines + ["(not run)"]
    lines.append(to_markdown(section["rows"], list(SECTION_COLUMNS)))
    for p in section["pairs"]:
        lines.append(f"- {p['worse']} ({p['abs_rel_worse']:.4f}) > {p['better']} "
                     f"({p['abs_rel_better']:.4f}): {'held' if p['held'] else 'DID NOT HOLD'}, "
                     f"margin {p['margin']:+.4f}")
    return lines


def render_report(rows: list[dict[str, Any]], claim: dict[str, Any], header: list[str],
                  transform_text: str | None, sections: list[dict[str, Any]] = ()) -> str:
    """Docs-ready markdown: header lines, the table, the claim check, bench-transform,
    then one table per section with its claim."""
    parts = [*header, "", to_markdown(rows, list(COLUMNS)),
             "recovery = (delta1 - delta1_noise) / (delta1_student - delta1_noise).", "",
             "## The paper's claim", "", *_claim_lines(claim)]
    if transform_text:
        parts += ["", "## Transformation net G vs per-batch optimisation (bench-transform)", "",
                  transform_text]
    for section in sections:
        parts += _section_lines(section)
    return "\n".join(parts) + "\n"
