"""``make bench``'s report: the summary rows (speed-ups, peak RSS), summary.md and the chart.

Kept apart from tools/bench.py, which runs the engines: these functions only read what a run measured.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from synthseg_native.io.atomic import atomic_write


def summarise(hf: dict, rss: dict[str, list[int]]) -> list[dict]:
    rows = []
    means = {r["command"]: r["mean"] for r in hf["results"]}
    for r in hf["results"]:
        name = r["command"]
        row = {"engine": name, "mean_s": r["mean"], "stddev_s": r.get("stddev") or 0.0, "min_s": r["min"],
               "max_s": r["max"], "runs": len(r.get("times", [])),
               "peak_rss_kb": max(rss.get(name) or [0]) or None}
        for other in ("reference", "baseline"):
            if other in means and other != name:
                row[f"speedup_vs_{other}"] = means[other] / r["mean"]
        paired = [t["times"][name] / t["times"]["reference"] for t in hf.get("rounds", [])
                  if "reference" in t["times"] and name != "reference"]
        if paired:  # interleaved rounds: each run against the reference run of its own round
            row["paired_ratio_vs_reference"] = statistics.median(paired)
        rows.append(row)
    return rows


def rounds_markdown(hf: dict) -> list[str]:
    """The interleaved rounds: each one's order and times, and each engine's time over the reference's of the same
    round (what the host's drift cannot bias)."""
    if not hf.get("rounds"):
        return []
    names = [r["command"] for r in hf["results"]]
    ref = "reference" in names
    lines = ["## Rounds (interleaved: every engine once per round, the order rotated)", "",
             "| round | order | " + " | ".join(f"{n} (s)" for n in names) + " |"
             + "".join(f" {n} / reference |" for n in names if ref and n != "reference"),
             "|---|---|" + "---|" * len(names) + "---|" * (len(names) - 1 if ref else 0)]
    for i, t in enumerate(hf["rounds"], 1):
        cells = [f"{t['times'][n]:.2f}" for n in names]
        cells += [f"{t['times'][n] / t['times']['reference']:.3f}" for n in names if ref and n != "reference"]
        lines.append(f"| {i} | {', '.join(t['order'])} | " + " | ".join(cells) + " |")
    return lines + [""]


def summary_markdown(rows: list[dict], skipped: dict[str, str], facts: dict, profile: dict, roof: dict | None,
                     setup: dict, rounds: list[str] | None = None) -> str:
    """summary.md: the engines' table, the interleaved rounds (``rounds``: :func:`rounds_markdown`'s lines), the
    native stage breakdown, the roofline, the machine and the commands."""
    rounds = rounds or []

    def fmt_speed(row: dict, other: str) -> str:
        v = row.get(f"speedup_vs_{other}")
        return f"{v:.2f}×" if v else "—"

    lines = [f"# SynthSeg benchmark {setup['date']} on {facts.get('cpu', '?')}", ""]
    order = ("in rounds: each round runs every engine once, the order rotated from round to round"
             if setup.get("interleaved") else "each engine's runs in one block")
    lines += [f"Input `{setup['input']}`, flags `{' '.join(setup['flags']) or '(none)'}`, {setup['threads']} "
              f"thread(s), {setup['runs']} timed run(s) after {setup['warmup']} warm-up, {order}, each run into an "
              "emptied output folder.", ""]
    if setup.get("reference") == "freesurfer":
        lines += ["Reference: **FreeSurfer 8's own `mri_synthseg`** (weights from `$FREESURFER_HOME/models`); the "
                  "native engines run as this toolkit's `mri_synthseg` with the same flags and weights.", ""]
    if setup["test_weights"]:
        lines += ["**Weights: seeded random test weights** (`synthseg_native.testweights`). Run time does not "
                  "depend on the weight values; the segmentations are anatomically meaningless.", ""]
    lines += ["| engine | mean ± sd (s) | min (s) | max (s) | speed-up vs reference | speed-up vs baseline | "
              "peak RSS |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r['peak_rss_kb'] / 1024 ** 2:.2f} GiB" if r["peak_rss_kb"] else "n/a"
        lines.append(f"| {r['engine']} | {r['mean_s']:.2f} ± {r['stddev_s']:.2f} | {r['min_s']:.2f} | "
                     f"{r['max_s']:.2f} | {fmt_speed(r, 'reference')} | {fmt_speed(r, 'baseline')} | {rss} |")
    for name, why in skipped.items():
        lines.append(f"| {name} | skipped: {why} | | | | | |")
    lines += ["", "Peak RSS: the largest process of each run (`getrusage` of the run's children), maximum over all "
              "runs. For the Docker baseline this is the docker client, not the container.", ""]
    paired = [r for r in rows if "paired_ratio_vs_reference" in r]
    if paired:
        lines += ["Time over the reference's, run against run within each round (median over the rounds): "
                  + ", ".join(f"{r['engine']} {r['paired_ratio_vs_reference']:.3f}" for r in paired) + ".", ""]
    lines += rounds
    if profile.get("stages"):
        lines += ["## Native stage breakdown (one extra run with `--profile`)", "",
                  "| stage | seconds | peak RSS so far |", "|---|---|---|"]
        for stage, v in profile["stages"].items():
            lines.append(f"| {stage} | {v['seconds']:.2f} | {v['peak_rss_gb']:.2f} GB |")
        lines.append("")
    if "network_gflops" in profile:
        lines.append(f"Network: {profile['network_gflop']:.0f} GFLOP of convolutions at the padded input "
                     f"{profile.get('network_input', '?')} (all passes), {profile['network_gflops']:.1f} GFLOP/s.")
        if roof and roof.get("best_gflops", {}).get("float32"):
            best = roof["best_gflops"]["float32"]
            lines.append(f"The machine's best fp32 conv3d throughput with this TensorFlow build is {best:.1f} "
                         f"GFLOP/s (`make roofline`): the network reached {profile['network_gflops'] / best:.0%} "
                         "of it.")
        lines.append("")
    if roof:
        lines += ["## Conv3D roofline", "", "| precision | best GFLOP/s |", "|---|---|"]
        for dtype, v in roof["best_gflops"].items():
            lines.append(f"| {dtype} | {v:.1f} |")
        for dtype, why in roof.get("unsupported", {}).items():
            lines.append(f"| {dtype} | not measured: {why} |")
        lines.append("")
    lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in facts.items()] + [""]
    lines += ["## Commands", "", "```"] + [f"{n}: {c}" for n, c in setup["commands"]] + ["```", ""]
    return "\n".join(lines)


def other_profile_markdown(name: str, profile: dict) -> str:
    """The stage breakdown of a second native backend (``native-torch``), beside the first one's."""
    lines = ["", f"## {name} stage breakdown (one extra run with `--profile`)", "",
             "| stage | seconds | peak RSS (GB) |", "|---|---|---|"]
    lines += [f"| {stage} | {v['seconds']:.2f} | {v['peak_rss_gb']:.2f} |" for stage, v in profile["stages"].items()]
    if "network_gflops" in profile:
        lines += ["", f"Network: {profile['network_gflop']:.0f} GFLOP, {profile['network_gflops']:.1f} GFLOP/s."]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], profile: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if profile.get("stages") else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6))
    names = [r["engine"] for r in rows]
    axes[0].bar(names, [r["mean_s"] for r in rows], yerr=[r["stddev_s"] for r in rows], capsize=4,
                color="#4878a8")
    axes[0].set_ylabel("wall time (s)")
    axes[0].set_title("mean ± sd")
    axes[1].bar(names, [(r["peak_rss_kb"] or 0) / 1024 ** 2 for r in rows], color="#c06040")
    axes[1].set_ylabel("peak RSS (GiB)")
    axes[1].set_title("memory")
    if panels == 3:
        stages = profile["stages"]
        left = 0.0
        for stage, v in stages.items():
            axes[2].barh(["native"], [v["seconds"]], left=left, label=stage)
            left += v["seconds"]
        axes[2].set_xlabel("seconds")
        axes[2].set_title("native stages")
        axes[2].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
