"""Look inside a run: iterations, stages, row counts, metrics, and a plot of reward and win-rate.

    python -m alignment_core.inspect ./runs/tiny                 # one run
    python -m alignment_core.inspect ./runs                      # every run under a store root
    python -m alignment_core.inspect s3://bucket/prefix/tiny --endpoint-url http://127.0.0.1:9000
"""

import argparse
import math
import sys

from alignment_core.store import ArtifactStore


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
                frame = store.read_pandas(uri)
                last = frame.sort_values("step").groupby("metric")["value"].last()
                lines += [f"      {k:<28} {_fmt(v)}" for k, v in last.items()]
    return "\n".join(lines), evaluations


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_evaluations(evaluations: list[dict], path: str, title: str) -> str:
    """Reward (annotator and oracle) and win-rates with their 95% intervals across iterations, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = [e["iteration"] for e in evaluations]
    fig, (reward_ax, win_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("reward_mean", "annotator reward"), ("oracle_reward_mean", "oracle reward")):
        values = [e.get(key, math.nan) for e in evaluations]
        if not all(math.isnan(v) for v in values):
            reward_ax.plot(iterations, values, marker="o", label=label)
    reward_ax.set(xlabel="iteration", ylabel="mean reward (held-out prompts)", title="reward", xticks=iterations)
    reward_ax.legend()
    for baseline in ("previous", "initial"):
        key = f"win_rate_vs_{baseline}"
        values = [e.get(key, math.nan) for e in evaluations]
        low = [v - e.get(f"{key}_low", v) for v, e in zip(values, evaluations, strict=True)]
        high = [e.get(f"{key}_high", v) - v for v, e in zip(values, evaluations, strict=True)]
        win_ax.errorbar(iterations, values, yerr=[low, high], marker="o", capsize=3, label=f"vs {baseline}")
    win_ax.axhline(0.5, color="grey", linestyle=":")
    win_ax.set(xlabel="iteration", ylabel="win-rate (95% CI)", ylim=(0, 1), title="win-rate of the new policy",
               xticks=iterations)
    win_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri", help="a run folder ({root}/{run}) or a store root")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint")
    parser.add_argument("--plot", help="PNG path for the reward/win-rate plot (default: <run>-evaluation.png)")
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
    for name in runs:
        report, evaluations = run_report(store, name)
        print(report)
        if evaluations:
            path = args.plot if args.plot and len(runs) == 1 else f"{name}-evaluation.png"
            print(f"  plot: {plot_evaluations(evaluations, path, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
