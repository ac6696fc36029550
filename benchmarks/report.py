"""Markdown for BENCHMARKS.md: the tables, the verdicts on the targets, and the section rewriting."""

from __future__ import annotations

import math
import re
from pathlib import Path

from .solvers import WARM_LABELS, Row

SECTIONS = ("hvp", "solvers")

SKELETON = """# Benchmarks

<!-- hvp:start -->
(not run yet: `.venv/bin/python benchmarks/run.py hvp --out BENCHMARKS.md`)
<!-- hvp:end -->

<!-- solvers:start -->
(not run yet: `.venv/bin/python benchmarks/run.py solvers --out BENCHMARKS.md`)
<!-- solvers:end -->
"""


def rewrite(path: Path, section: str, body: str) -> None:
    """Replace what lies between ``<!-- section:start -->`` and ``<!-- section:end -->`` in ``path``
    (created from a skeleton when missing); the text outside the markers is kept as it is."""
    text = path.read_text() if path.exists() else SKELETON
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    if start not in text or end not in text:
        text = text.rstrip() + f"\n\n{start}\n{end}\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: f"{start}\n{body.strip()}\n{end}", text, count=1)
    path.write_text(text)


def _g(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}g}" if abs(x) >= 1e-2 or x == 0 else f"{x:.0e}"


def _e(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.0e}"


def run_info(info: dict) -> str:
    return (
        f"Run: `{info['command']}` on {info['date']}; torch {info['torch']}, {info['threads']} CPU "
        f"thread(s), machine `{info['machine']}`, {info['cpus']} CPUs; load average {info['load_before']} "
        f"before, {info['load_after']} after; {info['minutes']:.1f} min{info.get('extra', '')}."
    )


# -- hvp -----------------------------------------------------------------------------------------
def hvp_markdown(results: list[dict], info: dict) -> str:
    labels = [row["label"] for row in results[0]["rows"]]
    head = "| backend | " + " | ".join(
        f"{r['model']} ({r['n_params'] / 1e3:.0f}k params, batch {r['probe']})" for r in results
    )
    lines = [
        "## Cost of one Hessian-vector product",
        "",
        run_info(info),
        "",
        "Median time of one HVP as a multiple of one plain gradient (forward + backward of the same probe "
        f"loss), over {results[0]['repeats']} interleaved repeats (range in brackets). Double backward with "
        "a cached graph is timed in its steady state: one more backward through the gradient graph that the "
        "first product of a measurement builds; that first product is the last row.",
        "",
        head + " |",
        "|---" * (len(results) + 1) + "|",
        "| plain gradient (ms) | " + " | ".join(f"{r['grad_ms']:.1f} ms" for r in results) + " |",
    ]
    for i, label in enumerate(labels):
        cells = []
        for r in results:
            row = r["rows"][i]
            if row["error"] is not None:
                cells.append(f"fails: {row['error']}")
            else:
                lo, hi = row["spread"]
                cells.append(f"**{row['ratio']:.2f}×** [{lo:.2f}–{hi:.2f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| double_backward, cached graph: first product (builds the graph) | "
        + " | ".join(f"{r['first_call_ratio']:.2f}×" for r in results)
        + " |"
    )
    return "\n".join(lines) + "\n"


# -- solvers -------------------------------------------------------------------------------------
def _cell(row: Row | None) -> str:
    if row is None:
        return "not run"
    cell = f"**{row.n_hvp}** · {row.seconds:.2f} s · {_e(row.eig_err)} · {_e(row.max_res)}"
    return cell + (f" ({row.note})" if row.note else "")


def _table(rows: list[Row], ks: list[int]) -> list[str]:
    order: list[tuple[str, str]] = []
    for row in rows:
        if (row.method, row.settings) not in order:
            order.append((row.method, row.settings))
    lines = [
        "| method | settings | " + " | ".join(f"top-{k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for method, settings in order:
        by_k = {r.k: r for r in rows if r.method == method and r.settings == settings}
        lines.append(f"| {method} | {settings} | " + " | ".join(_cell(by_k.get(k)) for k in ks) + " |")
    return lines


def _find(rows: list[Row], k: int, prefix: str) -> list[Row]:
    return [r for r in rows if r.k == k and r.method.startswith(prefix)]


def verdicts(model_results: list[dict], ks: list[int], accuracy: float = 1e-3) -> tuple[list[str], dict]:
    """The three targets, per model and k, from the rows (nothing hand-entered)."""
    lines: list[str] = []
    flags: dict[str, list[bool]] = {
        "arpack": [],
        "arpack_tuned": [],
        "pyhessian": [],
        "pyhessian_res": [],
        "warm_auto": [],
        "warm_lobpcg": [],
    }
    for res in model_results:
        name, rows = res["model"], res["rows"]
        for k in ks:
            pf = _find(rows, k, "pf_lightning Lanczos")[0]
            ar = _find(rows, k, "SciPy eigsh (ARPACK)")
            ar_default = next(r for r in ar if "tuned" not in r.method)
            ar_tuned = next((r for r in ar if "tuned" in r.method), ar_default)
            flags["arpack"].append(pf.n_hvp < ar_default.n_hvp)
            flags["arpack_tuned"].append(pf.n_hvp < ar_tuned.n_hvp)
            ph_all = _find(rows, k, "PyHessian")
            most = max((r.n_hvp for r in ph_all), default=0)
            ph = [r for r in ph_all if r.eig_err <= accuracy]
            if ph:
                best = min(ph, key=lambda r: r.n_hvp)
                ratio = best.n_hvp / pf.n_hvp
                flags["pyhessian"].append(ratio >= 10)
                ph_text = (
                    f"PyHessian's cheapest setting with eigenvalue error ≤ {accuracy:g} ({best.settings}: error "
                    f"{_e(best.eig_err)}, residual {_e(best.max_res)}) used {best.n_hvp} HVPs = **{ratio:.1f}×** ours"
                )
            else:
                flags["pyhessian"].append(most / pf.n_hvp >= 10)
                ph_text = (
                    f"no PyHessian setting reached eigenvalue error {accuracy:g} (its largest run used {most} "
                    f"HVPs = {most / pf.n_hvp:.1f}× ours)"
                )
            ph_res = [r for r in ph_all if r.max_res <= accuracy]
            if ph_res:
                best = min(ph_res, key=lambda r: r.n_hvp)
                flags["pyhessian_res"].append(best.n_hvp >= 10 * pf.n_hvp)
                ph_text += (
                    f"; with residual ≤ {accuracy:g}: {best.n_hvp} HVPs = {best.n_hvp / pf.n_hvp:.1f}× ours"
                )
            else:
                flags["pyhessian_res"].append(most >= 10 * pf.n_hvp)
                ph_text += (
                    f"; residual ≤ {accuracy:g}: never reached (largest run {most / pf.n_hvp:.1f}× ours)"
                )
            warm_text = []
            for move in res["warm"]:
                by = {r.method: r for r in move["rows"] if r.k == k}
                cold, auto, lob = (by[label] for label in WARM_LABELS)
                flags["warm_auto"].append(3 * auto.n_hvp <= cold.n_hvp)
                flags["warm_lobpcg"].append(3 * lob.n_hvp <= cold.n_hvp)
                warm_text.append(
                    f"h = {move['factor']:g}/λ₁: warm {auto.n_hvp} (auto) / {lob.n_hvp} (lobpcg) vs cold "
                    f"{cold.n_hvp} = {auto.n_hvp / cold.n_hvp:.2f} / {lob.n_hvp / cold.n_hvp:.2f} of cold"
                )
            lines.append(
                f"- **{name}, top-{k}**: ours {pf.n_hvp} HVPs vs ARPACK {ar_default.n_hvp} (tuned ncv: "
                f"{ar_tuned.n_hvp}); {ph_text}; " + "; ".join(warm_text) + "."
            )
    return lines, flags


def _met(flags: list[bool]) -> str:
    n, total = sum(flags), len(flags)
    word = "met" if n == total else ("not met" if n == 0 else "partly met")
    return f"**{word}** ({n} of {total} cases)"


def solvers_markdown(model_results: list[dict], ks: list[int], info: dict) -> str:
    lines = [
        "## Top-k eigenvalues to relative residual 1e-3",
        "",
        run_info(info),
        "",
        "Each cell: **HVPs** · seconds · max relative eigenvalue error of the top-k · max relative residual "
        "‖Hv − λv‖/|λ| of the returned pairs (both measured outside the method: the residual by one extra "
        "float32 product per pair that is not counted). Seconds include building the gradient graph. "
        "Rows for smaller k of PyHessian and eigenthings' power iteration are prefixes of one top-"
        f"{max(ks)} run (their deflation finds the pairs one at a time, each from its own seeded start, so "
        "a top-k call returns exactly those pairs at that cost).",
        "",
    ]
    for res in model_results:
        ref = res["reference"]
        lines += [
            f"### {res['model']}: {res['n_params']:,} parameters, probe batch {res['probe']}",
            "",
            f"Reference: pf_lightning Lanczos in float64 (`dtype=torch.float64`), tol 1e-8, top-{max(ks)} "
            f"({ref['n_hvp']} float64 HVPs); SciPy ARPACK in float64 at tol 1e-10 agrees to "
            f"{_e(ref['arpack_agreement'])}. Top eigenvalues: "
            + ", ".join(f"{float(v):.4g}" for v in ref["values"][: min(5, len(ref["values"]))])
            + f", …, λ{len(ref['values'])} = {float(ref['values'][-1]):.4g}.",
            "",
            *_table(res["rows"], ks),
            "",
            f"Searches not counted in the rows: ARPACK's `ncv` grid spent {res['arpack_spent']} HVPs in all, "
            f"eigenthings' Lanczos search over `max_iter` {res['search_spent']}.",
            "",
        ]
    lines += [
        "### Warm starts",
        "",
        "After the cold measurement above, full-batch SGD steps at h = c/λ₁ (c = 0.1: a small move; c = 1: "
        "the largest step still monotone along the top direction) move the parameters; then the same top-k "
        "is measured cold and warm-started from the previous result (`warm_start=`: its eigenvectors). Error "
        "and residual are against a new float64 reference at the moved parameters.",
        "",
    ]
    for res in model_results:
        for move in res["warm"]:
            w = move["info"]
            drift = ", ".join(f"top-{k}: {100 * w['drift'][k]:.1f}%" for k in ks)
            lines += [
                f"**{res['model']}, h = {move['factor']:g}/λ₁** — {w['steps']} SGD steps at lr {w['lr']:g}; the "
                f"reference top-k moved by (max relative change) {drift}.",
                "",
                *_table(move["rows"], ks),
                "",
            ]
    verdict_lines, flags = verdicts(model_results, ks)
    lines += [
        "### Targets",
        "",
        f"- Fewer HVPs than ARPACK from cold: against its defaults {_met(flags['arpack'])}; against ARPACK "
        f"with the best `ncv` of a small grid {_met(flags['arpack_tuned'])}.",
        f"- At least 10× fewer HVPs than PyHessian at equal accuracy: with equal accuracy read as eigenvalue "
        f"error ≤ 1e-3 (generous to PyHessian: ours is far below), {_met(flags['pyhessian'])}; read as "
        f"relative residual ≤ 1e-3 (our stopping test), {_met(flags['pyhessian_res'])}.",
        f"- Warm start at most a third of cold: method='auto' {_met(flags['warm_auto'])}; "
        f"method='lobpcg' {_met(flags['warm_lobpcg'])}.",
        "",
        *verdict_lines,
    ]
    return "\n".join(lines) + "\n"
