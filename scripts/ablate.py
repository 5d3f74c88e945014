"""An ablation: train.py for every variant x seed, then each variant's test gains with 95% confidence intervals.

    python scripts/ablate.py --seeds 0 1 2 3 4 --variant grpo="" --variant dapo="--loss-type dapo" \\
        --output-dir runs/ablate --jobs 2 -- --max-steps 200
    python scripts/ablate.py --preset paper --output-dir runs/paper --jobs 2     # docs/RESULTS.md, "Ablations"

A variant is a name and train.py options (``NAME="OPTIONS"``, quoted as in a shell); the options after ``--`` go
to every run, before the variant's own, so that a variant's option wins. Each run is

    train.py <common options> <variant options> --seed S --output-dir D/<variant>/seed-<S> --resume auto --overwrite

with the same Python, ``--jobs`` at a time, each with cores / jobs threads (OMP_NUM_THREADS): run several at once
for results, one at a time for timings. Runs go variant by variant, the first variant's first: with the tiny
demo model, each seed's warm start is then built once, by the first variant's run of that seed (seed by seed,
two runs would build the same model at once). A run whose summary.json is complete is not run again: started
again, an interrupted ablation continues where it stopped (an unfinished run resumes from its last checkpoint,
e.g. the one Ctrl-C makes train.py save, or starts over). A run that fails is reported (exit code, the end of its
train.log) and the others go on; the exit code is then 1. In D it writes:

* ablation.json: per variant and seed, test Acc@0.5 and mIoU before and after GRPO and the run's folder; per
  variant, n, mean and 95% confidence interval of the gains (after - before); per variant, the paired difference
  of its test numbers after GRPO to the first variant's, over the seeds both finished, with its 95% interval;
* ablation.md: the same as two Markdown tables (a summary a README can paste, then every run);
* ablation.png: training reward and val Acc@0.5 against the step, per variant the mean over seeds and a band
  from the lowest to the highest seed (evaluate.plot_variants).

The intervals are Student t intervals of a mean over seeds: mean +- t(0.975, n - 1) s / sqrt(n), s the standard
deviation over the n seeds (n - 1 in its denominator). Pairing by seed removes what two variants share on a
seed (its warm start, its data order); n = 1 gives no interval.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluate import plot_variants  # noqa: E402

METRICS = (("acc@0.5", "Acc@0.5"), ("miou", "mIoU"))  # summary.json key, column title
OWNED = ("--seed", "--output-dir", "--resume", "--overwrite")  # set by this script for each run
CONFIDENCE = 0.95

# The paper's ablation on the demo (docs/RESULTS.md, "Ablations"). Every row is one difference from the first,
# the demo as `python train.py` runs it (format + hard spatial + semantic rewards, Chain-of-Box, loss grpo), so
# each paired difference to it answers one question. The common options shorten the demo preset (800 updates) to
# its first 200, so that the 55 runs fit in about 2 hours of 2 cores (docs/RESULTS.md, "The ablation preset").
PRESETS = {
    "paper": {
        "seeds": [0, 1, 2, 3, 4],
        "common": "--max-steps 200 --eval-steps 50",
        "variants": [
            ("default", ""),                                    # format + spatial + semantic; GRPO's loss
            ("warm-start", "--max-steps 0"),                    # no GRPO: the starting model, evaluated
            ("no-semantic", "--semantic-model none"),           # format + spatial
            ("plain", "--template plain"),                      # the released code's prompt, no Chain-of-Box
            ("iou", "--spatial-reward iou"),                    # continuous spatial reward instead of IoU > 0.5
            ("dr_grpo", "--loss-type dr_grpo"),
            ("dapo", "--loss-type dapo"),
            ("gspo", "--importance-sampling-level sequence --epsilon 3e-4 --epsilon-high 4e-4"),  # GSPO's clip range
            ("cispo", "--loss-type cispo --epsilon-high 5.0"),  # the IS weight capped at 5 (TRL's recommendation)
            ("sapo", "--loss-type sapo"),
            ("clip-higher", "--epsilon-high 0.14"),             # DAPO's 0.2 / 0.28, scaled to the demo's 0.1
        ],
    },
}


# ====================================================================================== statistics
def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` (a whole number) degrees of freedom.

    A finite series for P(|T| < t) in theta = atan(t / sqrt(df)) (Abramowitz & Stegun 26.7.3, 26.7.4).

    >>> round(t_cdf(2.776445, 4), 6), t_cdf(0.0, 7)
    (0.975, 0.5)
    """
    theta = math.atan(abs(t) / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    term = total = 1.0
    if df % 2 == 0:  # sin(theta) (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        for k in range(2, df, 2):
            term *= (k - 1) / k * cos2
            total += term
        inside = sin * total
    else:  # 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3))), theta alone for df 1
        for k in range(3, df, 2):
            term *= (k - 1) / k * cos2
            total += term
        inside = 2 / math.pi * (theta + (sin * math.sqrt(cos2) * total if df > 1 else 0.0))
    return 0.5 + math.copysign(inside / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (0.5 <= p < 1), by bisection on ``t_cdf``.

    >>> [round(t_quantile(0.975, df), 3) for df in (1, 4, 30)]
    [12.706, 2.776, 2.042]
    """
    low, high = 0.0, 1e7
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def mean_interval(values: list[float]) -> dict:
    """n, mean and the 95% Student t interval of the mean (low, high: None for n < 2, where there is none).

    >>> mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # 3 +- 2.776 * 1.581 / sqrt(5)
    {'n': 5, 'mean': 3.0, 'low': 1.0368, 'high': 4.9632}
    """
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None}
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": 1, "mean": round(mean, 4), "low": None, "high": None}
    half = t_quantile(1 - (1 - CONFIDENCE) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"n": n, "mean": round(mean, 4), "low": round(mean - half, 4), "high": round(mean + half, 4)}


def summarize(variants: list[str], results: dict[tuple[str, int], dict]) -> dict[str, dict]:
    """Per variant: the gains (after - before) and the paired difference to the first variant after GRPO.

    results: (variant, seed) -> a finished run's summary.json ({"before": {...}, "after": {...}}).
    """
    first, table = variants[0], {}
    for v in variants:
        seeds = sorted(s for (name, s) in results if name == v)
        shared = [s for s in seeds if (first, s) in results]
        table[v] = {
            "gain": {key: mean_interval([results[v, s]["after"][key] - results[v, s]["before"][key] for s in seeds])
                     for key, _ in METRICS},
            "vs_first": None if v == first else {
                key: {**mean_interval([results[v, s]["after"][key] - results[first, s]["after"][key] for s in shared]),
                      "seeds": shared}
                for key, _ in METRICS},
        }
    return table


# ====================================================================================== the runs
@dataclass
class Run:
    variant: str
    seed: int
    folder: Path
    args: list[str]  # train.py's options
    exit_code: int | None = None
    log_tail: list[str] = field(default_factory=list)

    def summary(self) -> dict | None:
        """summary.json when the run finished (and it is complete), else None."""
        try:
            s = json.loads((self.folder / "summary.json").read_text())
            return s if all(isinstance(s[when][key], (int, float)) for when in ("before", "after")
                            for key, _ in METRICS) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None


def plan_runs(variants: list[tuple[str, list[str]]], seeds: list[int], common: list[str], out: Path) -> list[Run]:
    """Every variant x seed, variant by variant; refuses a folder that holds a run of other options."""
    runs = [Run(name, seed, out / name / f"seed-{seed}", [*common, *options, "--seed", str(seed),
                                                            "--output-dir", str(out / name / f"seed-{seed}")])
            for name, options in variants for seed in seeds]
    changed = [r for r in runs if (r.folder / "command.json").exists()
               and json.loads((r.folder / "command.json").read_text())["train_args"] != r.args]
    if changed:
        raise SystemExit(f"error: {', '.join(str(r.folder) for r in changed)} hold runs of other train.py options "
                         f"(their command.json): move them away, or write this ablation to another --output-dir")
    return runs


def execute(runs: list[Run], jobs: int) -> None:
    """Run what is not finished, ``jobs`` at a time, each ``train.py ... --resume auto --overwrite`` (it continues
    from its last checkpoint, or starts over); a failure is printed and recorded, the others go on."""
    todo = [r for r in runs if r.summary() is None]
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished; {len(todo)} to run, {jobs} at a time, "
          f"{threads} thread(s) each", flush=True)
    running = []
    try:
        while todo or running:
            while todo and len(running) < jobs:
                run = todo.pop(0)
                run.folder.mkdir(parents=True, exist_ok=True)
                (run.folder / "command.json").write_text(json.dumps({"train_args": run.args}, indent=1))
                cmd = [sys.executable, str(ROOT / "train.py"), *run.args, "--resume", "auto", "--overwrite"]
                log = open(run.folder / "train.log", "a")
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
                log.flush()
                print(f"start {run.variant} seed {run.seed}: {shlex.join(cmd)}", flush=True)
                running.append((run, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                                log))
            time.sleep(0.5)
            for job in [j for j in running if j[1].poll() is not None]:
                running.remove(job)
                run, proc, log = job
                log.close()
                run.exit_code = proc.returncode
                if run.summary() is not None:
                    print(f"done {run.variant} seed {run.seed}", flush=True)
                    continue
                run.log_tail = (run.folder / "train.log").read_text(errors="replace").splitlines()[-20:]
                state = "stopped (a checkpoint was saved: run again to resume)" if proc.returncode == 0 else \
                    f"FAILED (exit code {proc.returncode})"
                print(f"{state}: {run.variant} seed {run.seed}; the end of {run.folder / 'train.log'}:\n  " +
                      "\n  ".join(run.log_tail[-5:]), flush=True)
    except KeyboardInterrupt:  # the runs got the Ctrl-C too: each saves a checkpoint at the end of its step
        print(f"\ninterrupted: waiting for {len(running)} run(s) to save a checkpoint (Ctrl-C again: stop now); "
              "run the same command again to continue", flush=True)
        for _, proc, _ in running:
            proc.wait()
        raise


# ====================================================================================== the report
def fmt(v: float | None, sign: bool = True) -> str:
    return "-" if v is None else f"{v:+.2f}" if sign else f"{v:.2f}"


def cell(stat: dict, resolved_in_bold: bool = False) -> str:
    """'mean [low, high]'; 'mean (n = 1, no interval)'; bold when the interval excludes 0 and that is asked."""
    if not stat["n"]:
        return "-"
    if stat["low"] is None:
        return f"{fmt(stat['mean'])} (n = 1, no interval)"
    text = f"{fmt(stat['mean'])} [{fmt(stat['low'])}, {fmt(stat['high'])}]"
    return f"**{text}**" if resolved_in_bold and (stat["low"] > 0 or stat["high"] < 0) else text


def report(runs: list[Run], variants: list[tuple[str, list[str]]], seeds: list[int], common: list[str],
           out: Path) -> dict:
    """Write ablation.json, ablation.md and ablation.png in ``out``; return what ablation.json holds."""
    names = [name for name, _ in variants]
    results = {(r.variant, r.seed): r.summary() for r in runs if r.summary() is not None}
    stats = summarize(names, results)
    first = names[0]
    data = {"seeds": seeds, "common_options": common, "confidence": CONFIDENCE, "baseline": first, "variants": []}
    for name, options in variants:
        per_seed = []
        for r in (r for r in runs if r.variant == name):
            s = results.get((name, r.seed))
            entry = {"seed": r.seed, "path": str(r.folder)}
            if s is not None:
                entry.update({when: {key: s[when][key] for key, _ in METRICS} for when in ("before", "after")})
            else:
                entry.update({"failed": True, "exit_code": r.exit_code, "log_tail": r.log_tail})
            per_seed.append(entry)
        data["variants"].append({"name": name, "options": options, "runs": per_seed, **stats[name]})
    (out / "ablation.json").write_text(json.dumps(data, indent=1))

    lines = ["| variant | train.py options | n | " + " | ".join(f"test {t} gain" for _, t in METRICS) + " | " +
             " | ".join(f"{t} after, vs {first}" for _, t in METRICS) + " |",
             "|---|---|---|" + "---|" * (2 * len(METRICS))]
    for v in data["variants"]:
        diffs = ["(the baseline)"] * len(METRICS) if v["vs_first"] is None else \
            [cell(v["vs_first"][key], resolved_in_bold=True) for key, _ in METRICS]
        lines.append(f"| {v['name']} | `{shlex.join(v['options']) or '(none)'}` | {v['gain'][METRICS[0][0]]['n']} | " +
                     " | ".join(cell(v["gain"][key]) for key, _ in METRICS) + " | " + " | ".join(diffs) + " |")
    lines += ["", f"Seeds {' '.join(map(str, seeds))}; every run: `train.py {shlex.join(common)} <options> --seed S`. "
              "Gain: test number after GRPO minus before, mean over seeds [95% Student t interval]. "
              f"vs {first}: this variant's test number after GRPO minus {first}'s on the same seed, mean over the "
              f"seeds both finished [95% interval]; **bold**: the interval excludes 0 (the difference is resolved).",
              "", "| variant | seed | " + " | ".join(f"test {t} before -> after" for _, t in METRICS) + " | run |",
              "|---|---|" + "---|" * len(METRICS) + "---|"]
    for v in data["variants"]:
        for e in v["runs"]:
            numbers = ([f"{fmt(e['before'][k], False)} -> {fmt(e['after'][k], False)} "
                        f"({fmt(e['after'][k] - e['before'][k])})" for k, _ in METRICS] if "before" in e else
                       [f"not finished (exit code {e['exit_code']}): see train.log"] + [""] * (len(METRICS) - 1))
            lines.append(f"| {v['name']} | {e['seed']} | " + " | ".join(numbers) + f" | {e['path']} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    plot_variants({name: [r.folder for r in runs if r.variant == name and (name, r.seed) in results]
                   for name in names}, out / "ablation.png")
    return data


# ====================================================================================== command line
def parse_args(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, common = argv[:split], argv[split + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] [-- COMMON TRAIN.PY OPTIONS]")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="OPTIONS"',
                   help="a variant: a name (its folder) and its train.py options; repeat it; the first is the "
                        "baseline of the paired differences")
    p.add_argument("--seeds", nargs="+", type=int, help="train.py --seed of each run (default: 0 1 2 3 4, or the "
                   "preset's)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a defined ablation: its seeds, variants and common "
                   "options (those after -- are added, and win)")
    p.add_argument("--output-dir", required=True, help="where the runs (<variant>/seed-<S>) and the report go")
    p.add_argument("--jobs", type=int, default=1, help="runs at once; each gets cores / jobs threads (default: 1)")
    args = p.parse_args(own)
    preset = PRESETS.get(args.preset, {})
    variants = [(name, shlex.split(options)) for name, options in preset.get("variants", [])]
    for text in args.variant:
        name, eq, options = text.partition("=")
        if not eq or not re.fullmatch(r"[\w.+-]+", name):
            p.error(f"--variant {text!r}: expected NAME=\"TRAIN.PY OPTIONS\" (a NAME of letters, digits, _ . + -)")
        variants.append((name, shlex.split(options)))
    if not variants:
        p.error("no variant: give --variant NAME=\"OPTIONS\" (at least one) or --preset")
    duplicates = sorted({n for n, _ in variants if [m for m, _ in variants].count(n) > 1})
    if duplicates:
        p.error(f"variant {', '.join(duplicates)} given twice")
    common = shlex.split(preset.get("common", "")) + common
    for where, options in [("the common options", common)] + [(f"variant {n}", o) for n, o in variants]:
        owned = [o for o in options if o.split("=")[0] in OWNED]
        if owned:
            p.error(f"{where}: {', '.join(owned)} is set by this script for each run")
    seeds = args.seeds or preset.get("seeds") or [0, 1, 2, 3, 4]
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds {' '.join(map(str, seeds))}: a seed given twice")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: expected at least 1")
    return args, variants, seeds, common


def main(argv: list[str] | None = None) -> int:
    args, variants, seeds, common = parse_args(argv)
    out = Path(args.output_dir)
    runs = plan_runs(variants, seeds, common, out)
    try:
        execute(runs, args.jobs)
    except KeyboardInterrupt:
        return 130
    data = report(runs, variants, seeds, common, out)
    print((out / "ablation.md").read_text())
    failed = [f"{v['name']} seed {e['seed']}" for v in data["variants"] for e in v["runs"] if e.get("failed")]
    print(f"wrote {out / 'ablation.json'}, {out / 'ablation.md'}, {out / 'ablation.png'}" +
          (f"; NOT FINISHED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
