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
from alignment_core.verdict import significance_line


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
    """The data behind the plot: reward per iteration from iteration 0 (the initial policy), each reward's change
    from the initial policy with its 95% interval, and each win-rate series with its 95% interval and the name of
    who judged it.

    Iteration 0's rewards are the "previous" baselines of iteration 1's evaluation; win-rates start at 1
    (a policy against itself is 0.5 by definition, so there is nothing to show at 0).
    """
    evaluations = sorted(evaluations, key=lambda e: e["iteration"])
    first = evaluations[0]
    rewards, reward_changes = {}, {}
    for key, delta, label in (
            ("annotator_score_mean", "annotator_score_delta_vs_initial", f"annotator score ({judge})"),
            ("oracle_reward_mean", "oracle_reward_delta_vs_initial", f"oracle reward ({oracle})")):
        if key in first:
            start = first.get(f"{key}_previous", math.nan)
            if first["iteration"] != 1:  # no iteration-1 evaluation: the baseline is unknown
                start = math.nan
            rewards[label] = {"iterations": [0] + [e["iteration"] for e in evaluations],
                              "values": [start] + [e.get(key, math.nan) for e in evaluations]}
            if delta in first:
                reward_changes[label] = {"iterations": [e["iteration"] for e in evaluations],
                                         **{name: [e.get(delta + suffix, math.nan) for e in evaluations]
                                            for name, suffix in (("delta", ""), ("low", "_low"), ("high", "_high"))}}
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
    return {"rewards": rewards, "reward_changes": reward_changes, "win_rates": win_rates}


def merge_coinciding(series: dict[str, dict]) -> dict[str, dict]:
    """Series with the same numbers as one, named by all their labels joined with " = ": drawn apart, the
    last one would hide the others (the demo's annotator and oracle are the same rule)."""
    merged: dict[str, dict] = {}
    for label, data in series.items():
        same = next((known for known, other in merged.items() if _same_numbers(data, other)), None)
        if same is None:
            merged[label] = data
        else:
            merged[f"{same} = {label}"] = merged.pop(same)
    return merged


def _same_numbers(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(len(a[k]) == len(b[k]) and all(_same(x, y) for x, y in zip(a[k], b[k], strict=True)) for k in a)


def _same(x: float, y: float) -> bool:
    # isclose: the annotator's and the oracle's means of the same scores are summed in different orders
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(x) and math.isnan(y))


# The training panel's series: metric name in the metrics stage -> (label, drawn on the right-hand axis).
TRAINING_SERIES = {"loss": ("loss", False), "reward_accuracy": ("reward accuracy", False),
                   "logratio_mean": ("log-ratio policy/reference (right axis)", True)}


def training_curves(metrics: dict) -> dict:
    """Each training round's loss, reward accuracy and log-ratio per optimizer step, on one step axis across
    iterations (a round's steps restart at 1). `metrics`: {iteration: its metrics stage as a DataFrame}; returns
    {"series": {metric: {"steps", "values"}}, "boundaries": [(the step before iteration k's first, k)]}."""
    series: dict[str, dict] = {}
    boundaries, offset = [], 0
    for iteration, frame in sorted(metrics.items()):
        frame = frame[frame["split"] == "train"]
        if frame.empty:
            continue
        boundaries.append((offset, iteration))
        for metric in TRAINING_SERIES:
            rows = frame[frame["metric"] == metric].sort_values("step")
            if len(rows):
                entry = series.setdefault(metric, {"steps": [], "values": []})
                entry["steps"] += [offset + int(step) for step in rows["step"]]
                entry["values"] += [float(value) for value in rows["value"]]
        offset += int(frame["step"].max())
    return {"series": series, "boundaries": boundaries}


def learning_plot_png(evaluations: list[dict], title: str, judge: str, oracle: str | None = None,
                      training: dict | None = None) -> bytes:
    """`learning_figure` as PNG bytes."""
    import io

    import matplotlib.pyplot as plt

    fig = learning_figure(evaluations, title, judge, oracle, training)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # "tight": the legends below the panels
    plt.close(fig)
    return buffer.getvalue()


def learning_figure(evaluations: list[dict], title: str, judge: str, oracle: str | None = None,
                    training: dict | None = None):
    """The learning plot, one figure for online and offline runs. Its subtitle is the verdict
    (alignment_core/verdict.py) of the last evaluation; then three panels:

    - reward: the mean on held-out prompts per iteration, the initial policy's as a band across the panel, each
      later point with the 95% interval of its change from the initial policy (annotated +delta [low, high]).
      The axis spans those intervals, so a change smaller than its noise draws as flat, not as a climb;
    - win-rate against the previous and the initial policy with 95% Wilson intervals, series with the same
      numbers merged under both names, the others side by side;
    - training (`training_curves`): loss, reward accuracy and log-ratio per optimizer step.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    evaluations = sorted(evaluations, key=lambda e: e["iteration"])
    curves = learning_curves(evaluations, judge, oracle)
    fig = plt.figure(figsize=(13, 10))
    grid = fig.add_gridspec(2, 2, height_ratios=(1.2, 1))
    reward_ax, win_ax, train_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    _reward_panel(reward_ax, curves)
    _win_rate_panel(win_ax, curves)
    _training_panel(train_ax, training or {"series": {}, "boundaries": []})
    verdict = significance_line({"judge": judge, "oracle": oracle, **evaluations[-1]}) if evaluations else ""
    fig.suptitle(f"{title}\n{textwrap.fill(verdict, 150)}", fontsize=11)
    fig.tight_layout()
    return fig


def _reward_panel(ax, curves: dict) -> None:
    # Each reward with its change (when recorded), so that series merge only when both coincide.
    rewards = merge_coinciding({label: {**series, **{f"change_{k}": v for k, v in
                                                     curves["reward_changes"].get(label, {}).items()}}
                                for label, series in curves["rewards"].items()})
    spans = []  # every value and interval end the axis must show
    for index, (label, series) in enumerate(rewards.items()):
        colour = f"C{index}"
        initial, iterations, values = series["values"][0], series["iterations"], series["values"]
        ax.axhline(initial, color=colour, linewidth=6, alpha=0.18)  # the initial policy, as a band
        ax.annotate(f"initial policy {initial:.3g}", (max(iterations), initial), xytext=(0, -12),
                    textcoords="offset points", fontsize=8, color=colour, ha="center")
        if "change_delta" not in series:  # an older evaluation without the change's interval: anchored at 0
            ax.plot(iterations, values, marker="o", color=colour,
                    label=f"{label}; no interval recorded (an older evaluation)")
            spans += values + [0.0]
            continue
        change = {k.removeprefix("change_"): v for k, v in series.items() if k.startswith("change_")}
        # The change's interval around each point (the change is that point minus the band, up to prompts that
        # one of the two policies got no score for, which the change leaves out).
        low = [initial] + [v - (delta - lo) for v, delta, lo in zip(values[1:], change["delta"], change["low"],
                                                                    strict=True)]
        high = [initial] + [v + (hi - delta) for v, delta, hi in zip(values[1:], change["delta"], change["high"],
                                                                     strict=True)]
        ax.errorbar(iterations, values, yerr=_error_bars(values, low, high), marker="o", capsize=4, color=colour,
                    label=f"{label}; bars: 95% interval of the change from the initial policy")
        for k, value, delta, lo, hi in zip(change["iterations"], values[1:], change["delta"], change["low"],
                                           change["high"], strict=True):
            ax.annotate(f"{delta:+.2f}\n[{lo:+.2f}, {hi:+.2f}]", (k, value), xytext=(8, -12),
                        textcoords="offset points", fontsize=7, color=colour)
        spans += low + high
    spans = [v for v in spans if not math.isnan(v)]
    if spans:
        bottom, top = min(spans), max(spans)
        pad = 0.15 * (top - bottom) or 0.5
        ax.set_ylim(bottom - pad, top + pad)
    iterations = next(iter(rewards.values()))["iterations"] if rewards else []
    ax.set(xlabel="iteration (0: initial policy)", ylabel="mean on held-out prompts", xticks=iterations,
           title="reward: change from the initial policy (band)")
    if iterations:
        ax.set_xlim(-0.3, max(iterations) + 0.8)  # room for the annotations
    _legend_below(ax)


def _legend_below(ax, handles=None, labels=None) -> None:
    """The legend under its panel, long labels wrapped: inside, the names of rules and models cover the data."""
    import textwrap

    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, [textwrap.fill(label, 75) for label in labels], fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.14), frameon=False)


def _error_bars(values: list[float], low: list[float], high: list[float]) -> list[list[float]]:
    """matplotlib's yerr: distances below and above each value."""
    return [[v - lo for v, lo in zip(values, low, strict=True)], [hi - v for v, hi in zip(values, high, strict=True)]]


def _win_rate_panel(ax, curves: dict) -> None:
    win_rates = merge_coinciding(curves["win_rates"])
    width = 0.08  # side by side: each series' bars visible
    for index, (label, series) in enumerate(win_rates.items()):
        shift = (index - (len(win_rates) - 1) / 2) * width
        values = series["values"]
        ax.errorbar([k + shift for k in series["iterations"]], values,
                    yerr=_error_bars(values, series["low"], series["high"]), marker="o", capsize=3, label=label)
    ax.axhline(0.5, color="grey", linestyle=":", label="0.5: no better than the baseline")
    judged = max((max(s["judged"]) for s in curves["win_rates"].values()), default=0)
    iterations = sorted({k for s in win_rates.values() for k in s["iterations"]})
    ax.set(xlabel="iteration", ylabel="win-rate, 95% Wilson interval", ylim=(0, 1), xticks=iterations,
           title=f"win-rate of the new policy ({judged:.0f} held-out prompts)")
    _legend_below(ax)


def _training_panel(ax, training: dict) -> None:
    series = training["series"]
    if not series:
        ax.text(0.5, 0.5, "no training metrics", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    right = ax.twinx() if any(TRAINING_SERIES[m][1] for m in series) else None
    for index, (metric, data) in enumerate(series.items()):
        label, on_right = TRAINING_SERIES[metric]
        (right if on_right else ax).plot(data["steps"], data["values"], marker=".", color=f"C{index}", label=label)
    for step, iteration in training["boundaries"]:
        ax.axvline(step + 0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.annotate(f"iteration {iteration}", (step + 0.5, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
    ax.set(xlabel="optimizer step (all iterations)", ylabel="loss, reward accuracy",
           title="training, per optimizer step (metrics stage)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = ax.get_legend_handles_labels()
    if right is not None:
        right.set_ylabel("log-ratio")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    _legend_below(ax, handles, labels)


def run_plot_png(store: ArtifactStore, run: str) -> bytes | None:
    """The run's learning plot as PNG bytes, from its evaluation and metrics stages; None without policy
    evaluations (a reward model's run has held-out accuracy instead)."""
    evaluations, training, judge, oracle = [], {}, "the annotator", None
    for k in store.list_iterations(run):
        stages = store.list_stages(run, k)
        manifest = store.read_manifest(store.stage_uri(run, k, "evaluation")) if "evaluation" in stages else None
        if manifest is not None and "win_rate_vs_initial" in manifest["extra"]["summary"]:
            evaluations.append({"iteration": k, **manifest["extra"]["summary"]})
            judge, oracle = manifest["extra"].get("judge", judge), manifest["extra"].get("oracle")
        metrics = store.stage_uri(run, k, "metrics")
        if "metrics" in stages and store.read_manifest(metrics) is not None:
            try:
                training[k] = store.read_pandas(metrics)
            except DamagedStageError:  # the listing shows it DAMAGED; the plot leaves its training curve out
                pass
    if not evaluations:
        return None
    return learning_plot_png(evaluations, run, judge, oracle, training_curves(training))


def plot_run(store: ArtifactStore, run: str, path: str | None = None) -> str | None:
    """The run's learning plot (`run_plot_png`), written into the run folder (`evaluation.png`) or to `path`;
    None without evaluations."""
    png = run_plot_png(store, run)
    if png is None:
        return None
    if path is not None:
        with open(path, "wb") as f:
            f.write(png)
        return path
    uri = store.uri(run, "evaluation.png")
    store.write_bytes(uri, png)
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
