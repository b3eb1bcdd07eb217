"""How ``make bench`` times its engines with hyperfine: in interleaved rounds (the default) or in blocks.

In blocks (hyperfine's own order), every run of one engine comes before the first run of the next. In rounds, each
round runs every engine once, the order rotated from one round to the next, and the rounds are merged into
hyperfine's JSON layout, with each round's times kept (``rounds``) so that every engine can also be compared with the
reference run of its own round.

Why rounds: on this project's VMs the same run drifts by a third within minutes (the host's load, and how fast it
hands the guest the memory a run touches first: upstream's wall time went from 54 s to 102 s in three consecutive
runs on 2026-12-06). In blocks, one engine can draw a fast quarter of an hour and the next a slow one, and their ratio
then says more about the host than about the engines; in rounds, the runs compared are minutes apart and every engine
meets the same drift.
"""

from __future__ import annotations

import json
import logging
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from synthseg_native.io.atomic import write_text
from synthseg_native.log import RUN

logger = logging.getLogger(f"synthseg_native.{__name__}")  # the [TAG] lines


class TimingError(Exception):
    """hyperfine failed; the message says how to see why."""


def hyperfine_argv(cmds: list[tuple[str, str, Path]], runs: int, warmup: int, json_out: Path,
                   markdown_out: Path | None = None) -> list[str]:
    """hyperfine over ``(name, command, output folder)``: before each run only that engine's folder is emptied, so
    every engine's last outputs are left for the gate's comparison."""
    argv = ["hyperfine", "--runs", str(runs), "--warmup", str(warmup), "--style", "basic",
            "--export-json", str(json_out)]
    if markdown_out is not None:
        argv += ["--export-markdown", str(markdown_out)]
    for _name, _cmd, folder in cmds:
        argv += ["--prepare", shlex.join(["rm", "-rf", str(folder)])]
    for name, cmd, _folder in cmds:
        argv += ["--command-name", name, cmd]
    return argv


def hyperfine(argv: list[str], json_out: Path) -> dict:
    proc = subprocess.run(argv, text=True, stdout=sys.stdout, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["hyperfine failed"])[-1]
        raise TimingError(f"hyperfine failed: {last} (run the command alone to see its error)")
    return json.loads(json_out.read_text())


def run_blocks(cmds: list[tuple[str, str, Path]], runs: int, warmup: int, res: Path) -> dict:
    """hyperfine's own order: the warm-ups and runs of each engine, one engine after the other."""
    logger.log(RUN, f"hyperfine: {len(cmds)} command(s) x ({warmup} warm-up + {runs} timed run(s)), in blocks")
    return hyperfine(hyperfine_argv(cmds, runs, warmup, res / "hyperfine.json", res / "hyperfine.md"),
                     res / "hyperfine.json")


def run_rounds(cmds: list[tuple[str, str, Path]], runs: int, warmup: int, res: Path) -> dict:
    """``warmup`` untimed rounds, then ``runs`` timed ones; each round runs every engine once (one hyperfine call
    of one run per command), starting one engine further along the list than the round before. Each round's
    hyperfine JSON is kept in ``rounds/``; the merged result goes to ``hyperfine.json`` and ``hyperfine.md``."""
    folder = res / "rounds"
    folder.mkdir(parents=True, exist_ok=True)
    rounds = []
    for r in range(warmup + runs):
        order = cmds[r % len(cmds):] + cmds[:r % len(cmds)]
        kind = "warm-up" if r < warmup else "timed"
        logger.log(RUN, f"hyperfine round {r + 1}/{warmup + runs} ({kind}): {', '.join(c[0] for c in order)}")
        out = folder / f"round-{r + 1:02d}.json"
        got = hyperfine(hyperfine_argv(order, 1, 0, out), out)
        if r >= warmup:
            rounds.append(got)
    merged = merge_rounds(rounds, [name for name, _cmd, _folder in cmds])
    write_text(res / "hyperfine.json", json.dumps(merged, indent=2) + "\n")
    write_text(res / "hyperfine.md", markdown(merged))
    return merged


def merge_rounds(rounds: list[dict], names: list[str]) -> dict:
    """hyperfine's JSON layout (``results``: per command mean, stddev, median, min, max, user, system, times) over
    rounds of one run each, in the order of ``names``; ``rounds`` keeps each round's order and times."""
    per_round = []
    for got in rounds:
        per_round.append({"order": [r["command"] for r in got["results"]],
                          "times": {r["command"]: r["times"][0] for r in got["results"]},
                          "user": {r["command"]: r["user"] for r in got["results"]},
                          "system": {r["command"]: r["system"] for r in got["results"]},
                          "exit_codes": {r["command"]: r["exit_codes"][0] for r in got["results"]}})
    results = []
    for name in names:
        times = [r["times"][name] for r in per_round]
        results.append({"command": name, "mean": statistics.fmean(times),
                        "stddev": statistics.stdev(times) if len(times) > 1 else None,
                        "median": statistics.median(times), "min": min(times), "max": max(times),
                        "user": statistics.fmean(r["user"][name] for r in per_round),
                        "system": statistics.fmean(r["system"][name] for r in per_round),
                        "times": times, "exit_codes": [r["exit_codes"][name] for r in per_round]})
    return {"results": results, "interleaved": True, "rounds": per_round}


def markdown(hf: dict) -> str:
    """The merged result as hyperfine's markdown export would show it (mean ± sd, min, max, relative)."""
    fastest = min(r["mean"] for r in hf["results"])
    lines = ["| Command | Mean [s] | Min [s] | Max [s] | Relative |", "|:---|---:|---:|---:|---:|"]
    for r in hf["results"]:
        sd = f" ± {r['stddev']:.3f}" if r["stddev"] is not None else ""
        lines.append(f"| `{r['command']}` | {r['mean']:.3f}{sd} | {r['min']:.3f} | {r['max']:.3f} | "
                     f"{r['mean'] / fastest:.2f} |")
    return "\n".join(lines) + "\n"
