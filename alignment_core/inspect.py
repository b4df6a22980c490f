"""Look inside a run: iterations, stages, row counts, metrics, and a plot of reward and win-rate.

    python -m alignment_core.inspect ./runs/tiny                 # one run
    python -m alignment_core.inspect ./runs                      # every run under a store root
    python -m alignment_core.inspect s3://bucket/prefix/tiny --endpoint-url http://127.0.0.1:9000
    python -m alignment_core.inspect ./runs/tiny --verify        # + every shard's size, rows and sha256
"""

import argparse
import math
import sys

from alignment_core.store import ArtifactStore, DamagedStageError


def run_report(store: ArtifactStore, run: str) -> tuple[str, list[dict]]:
    """A printable report of one run and its per-iteration evaluation summaries."""
    lines, evaluations = [f"run {run}  ({store.run_uri(run)})"], []
    for iteration in store.list_iterations(run):
        lines.append(f"  iter-{iteration:03d}")
        for stage in store.list_stages(run, iteration):
            uri = store.stage_uri(run, iteration, stage)
            if stage == "checkpoint":
                state = "complete" if store.checkpoint_complete(uri) else "INCOMPLETE"
                lines.append(f"    {stage:<18} {state}")
                continue
            manifest = store.read_manifest(uri)
            if manifest is None:
                lines.append(f"    {stage:<18} in progress (no manifest)")
                continue
            lines.append(f"    {stage:<18} {manifest['rows']:>7} rows  {len(manifest['shards'])} shards")
            if stage == "evaluation":
                summary = manifest["extra"].get("summary", {})
                evaluations.append({"iteration": iteration, **summary})
                lines += [f"      {k:<28} {_fmt(v)}" for k, v in summary.items()]
            if stage == "metrics":
                try:
                    frame = store.read_pandas(uri)
                except DamagedStageError as error:
                    lines.append(f"      DAMAGED: {'; '.join(error.problems)}")
                    continue
                last = frame.sort_values("step").groupby("metric")["value"].last()
                lines += [f"      {k:<28} {_fmt(v)}" for k, v in last.items()]
    return "\n".join(lines), evaluations


def verify_run(store: ArtifactStore, run: str) -> tuple[int, list[str]]:
    """(stages checked, problems): every finished stage's shards against its manifest, sha256 included."""
    checked, problems = 0, []
    for iteration in store.list_iterations(run):
        for stage in store.list_stages(run, iteration):
            uri = store.stage_uri(run, iteration, stage)
            manifest = store.read_manifest(uri) if stage != "checkpoint" else None
            if manifest is None:
                continue
            checked += 1
            problems += [f"iter-{iteration:03d}/{stage}: {p}" for p in store.verify_stage(uri, manifest)]
    return checked, problems


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def learning_curves(evaluations: list[dict], judge: str, oracle: str | None = None) -> dict:
    """The data behind the plot: reward per iteration from iteration 0 (the initial policy), and each
    win-rate series with its 95% interval and the name of who judged it.

    Iteration 0's rewards are the "previous" baselines of iteration 1's evaluation; win-rates start at 1
    (a policy against itself is 0.5 by definition, so there is nothing to show at 0).
    """
    evaluations = sorted(evaluations, key=lambda e: e["iteration"])
    first = evaluations[0]
    rewards = {}
    for key, label in (("annotator_score_mean", f"annotator score ({judge})"),
                       ("oracle_reward_mean", f"oracle reward ({oracle})")):
        if key in first:
            start = first.get(f"{key}_previous", math.nan)
            if first["iteration"] != 1:  # no iteration-1 evaluation: the baseline is unknown
                start = math.nan
            rewards[label] = {"iterations": [0] + [e["iteration"] for e in evaluations],
                              "values": [start] + [e.get(key, math.nan) for e in evaluations]}
    win_rates = {}
    for prefix, who in (("", judge), ("oracle_", f"oracle {oracle}")):
        for baseline in ("previous", "initial"):
            key = f"{prefix}win_rate_vs_{baseline}"
            if key in first:
                win_rates[f"vs {baseline} (judged by {who})"] = {
                    "iterations": [e["iteration"] for e in evaluations],
                    "values": [e.get(key, math.nan) for e in evaluations],
                    "low": [e.get(f"{key}_low", math.nan) for e in evaluations],
                    "high": [e.get(f"{key}_high", math.nan) for e in evaluations],
                    "judged": [e.get(f"{prefix}judged_vs_{baseline}", math.nan) for e in evaluations],
                }
    return {"rewards": rewards, "win_rates": win_rates}


def plot_evaluations(evaluations: list[dict], path: str, title: str, judge: str, oracle: str | None = None) -> str:
    """`learning_curves` as a PNG: rewards from iteration 0, win-rates with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = learning_curves(evaluations, judge, oracle)
    fig, (reward_ax, win_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, series in curves["rewards"].items():
        reward_ax.plot(series["iterations"], series["values"], marker="o", label=label)
    reward_ax.set(xlabel="iteration (0: initial policy)", ylabel="mean on held-out prompts", title="reward",
                  xticks=next(iter(curves["rewards"].values()))["iterations"] if curves["rewards"] else [])
    reward_ax.legend(fontsize=8)
    for label, series in curves["win_rates"].items():
        values = series["values"]
        errors = [[v - lo for v, lo in zip(values, series["low"], strict=True)],
                  [hi - v for v, hi in zip(values, series["high"], strict=True)]]
        win_ax.errorbar(series["iterations"], values, yerr=errors, marker="o", capsize=3, label=label)
    win_ax.axhline(0.5, color="grey", linestyle=":")
    judged = max((max(s["judged"]) for s in curves["win_rates"].values()), default=0)
    iterations = sorted({k for s in curves["win_rates"].values() for k in s["iterations"]})
    win_ax.set(xlabel="iteration", ylabel="win-rate, 95% Wilson interval", ylim=(0, 1), xticks=iterations,
               title=f"win-rate of the new policy ({judged:.0f} held-out prompts)")
    win_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(store: ArtifactStore, run: str, path: str | None = None) -> str | None:
    """The run's learning plot, written into the run folder (`evaluation.png`) or to `path`; None without
    evaluations."""
    import tempfile

    stages = [(k, store.stage_uri(run, k, "evaluation")) for k in store.list_iterations(run)]
    manifests = [(k, store.read_manifest(uri)) for k, uri in stages if "evaluation" in store.list_stages(run, k)]
    manifests = [(k, m) for k, m in manifests if m is not None and "win_rate_vs_initial" in m["extra"]["summary"]]
    if not manifests:  # no policy evaluations (a reward model's run has held-out accuracy instead)
        return None
    evaluations = [{"iteration": k, **m["extra"]["summary"]} for k, m in manifests]
    last = manifests[-1][1]["extra"]
    judge, oracle = last.get("judge", "the annotator"), last.get("oracle")
    if path is not None:
        return plot_evaluations(evaluations, path, run, judge, oracle)
    with tempfile.TemporaryDirectory() as tmp:
        local = plot_evaluations(evaluations, f"{tmp}/evaluation.png", run, judge, oracle)
        uri = store.uri(run, "evaluation.png")
        with open(local, "rb") as f:
            store.write_bytes(uri, f.read())
    return uri


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri", help="a run folder ({root}/{run}) or a store root")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint")
    parser.add_argument("--plot", help="PNG path for the reward/win-rate plot (default: <run>/evaluation.png "
                                       "in the store)")
    parser.add_argument("--verify", action="store_true",
                        help="check every shard of every finished stage against its manifest (size, rows, sha256); "
                             "exit 1 if any differs")
    args = parser.parse_args(argv)

    root, _, run = args.uri.rstrip("/").rpartition("/")
    store = ArtifactStore(root or ".", endpoint_url=args.endpoint_url)
    if not store.list_iterations(run):  # not a run: treat the URI as a store root
        store = ArtifactStore(args.uri, endpoint_url=args.endpoint_url)
        runs = store.list_runs()
    else:
        runs = [run]
    if not runs:
        print(f"no runs under {args.uri}", file=sys.stderr)
        return 1
    damaged = False
    for name in runs:
        report, _ = run_report(store, name)
        print(report)
        plot = plot_run(store, name, args.plot if len(runs) == 1 else None)
        if plot:
            print(f"  plot: {plot}")
        if args.verify:
            checked, problems = verify_run(store, name)
            damaged = damaged or bool(problems)
            print(f"  verify: {checked} finished stages, "
                  + ("every shard matches its manifest (size, rows, sha256)" if not problems else
                     f"{len(problems)} problems (a rerun redoes these stages):"))
            for problem in problems:
                print(f"    DAMAGED {problem}")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
