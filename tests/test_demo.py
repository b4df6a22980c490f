"""`make demo` learns and says so; the learning plot shows the size of a change and who judged it; a run judged by a
demo rule nobody named says so at preflight and in its verdict."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from alignment_core import pipeline, tiny
from alignment_core.config import load_config, parse_config
from alignment_core.evaluation import mean_difference
from alignment_core.inspect import learning_curves, learning_figure, merge_coinciding, plot_run, training_curves
from alignment_core.preflight import preflight, preflight_warnings
from alignment_core.records import METRICS, from_rows
from alignment_core.store import ArtifactStore
from alignment_core.verdict import significance_line

REPO = Path(__file__).resolve().parents[1]
DEMO_RULE = "alignment_core.rewards:positive_words"
DOC_IMAGE = REPO / "docs" / "images" / "learning-plot.png"


# ---- the demo ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_demo_learns_and_its_last_line_says_so(tmp_path):
    """`make demo`'s command, as a user runs it: the oracle's win-rate against the initial policy has a 95%
    interval above 0.5, and the last lines say so in words. A change that stops the demo learning fails here.

    ALIGNMENT_CORE_UPDATE_DOC_IMAGES=1 copies the run's plot to docs/images/learning-plot.png (the README's)."""
    result = subprocess.run(
        [sys.executable, "-m", "flows.iterative_dpo", "--config", "configs/demo.yaml",
         "--store-root", str(tmp_path / "runs"), "--set", f"store.cache_dir={tmp_path / 'cache'}"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config(REPO / "configs" / "demo.yaml")
    store = ArtifactStore(str(tmp_path / "runs"))
    summary = pipeline.evaluation_summary(store, store.stage_uri("demo", cfg.iterations, "evaluation"))
    assert summary["oracle_judged_vs_initial"] == cfg.data.eval_prompts == 40
    assert summary["oracle_win_rate_vs_initial_low"] > 0.5, summary
    assert summary["oracle_reward_delta_vs_initial_low"] > 0, summary
    closing = [line for line in result.stdout.splitlines() if line.startswith("win-rate vs initial")]
    assert closing == [f"win-rate vs initial, judged by the oracle {DEMO_RULE}: "
                       f"{summary['oracle_win_rate_vs_initial']:.2f} [{summary['oracle_win_rate_vs_initial_low']:.2f}, "
                       f"{summary['oracle_win_rate_vs_initial_high']:.2f}] over 40 held-out prompts: "
                       "significantly better than the initial policy"]
    # The policy it started from is the cached SFT build, named by what built it.
    folder, record = tiny.sft_build()
    assert json.loads((tmp_path / "cache" / folder / tiny.BUILD_RECORD).read_text()) == record
    plot = tmp_path / "runs" / "demo" / "evaluation.png"
    assert plot.stat().st_size > 20_000
    if os.environ.get("ALIGNMENT_CORE_UPDATE_DOC_IMAGES") == "1":
        shutil.copyfile(plot, DOC_IMAGE)


def test_the_sft_build_is_named_by_what_built_it(monkeypatch, tmp_path):
    """Another recipe or other SFT data is another folder: a cache never hands out a stale demo policy."""
    folder, record = tiny.sft_build()
    assert folder.startswith("tiny-llama-sft-") and record["sft"]["learning_rate"] == tiny.SFT_RECIPE["learning_rate"]
    assert tiny.sft_build() == (folder, record)
    monkeypatch.setitem(tiny.SFT_RECIPE, "epochs", tiny.SFT_RECIPE["epochs"] + 1)
    assert tiny.sft_build()[0] != folder
    monkeypatch.undo()
    other_data = tmp_path / "sft.jsonl"
    other_data.write_text(tiny.SFT_DATA.read_text() + '{"prompt": "Hi.", "completion": "Hello."}\n')
    monkeypatch.setattr(tiny, "SFT_DATA", other_data)
    assert tiny.sft_build()[0] != folder


# ---- the figure --------------------------------------------------------------------------------------------
def _evaluation(iteration: int, reward: float, previous: float, delta: tuple[float, float, float],
                win: tuple[float, float, float], oracle: bool = True) -> dict:
    """An evaluation summary where the annotator and the oracle are the same rule (as in the demo)."""
    summary = {"iteration": iteration, "annotator_score_mean": reward, "annotator_score_mean_previous": previous}
    summary.update(zip(("annotator_score_delta_vs_initial", "annotator_score_delta_vs_initial_low",
                        "annotator_score_delta_vs_initial_high"), delta, strict=True))
    for baseline in ("previous", "initial"):
        shift = 0.1 if baseline == "previous" and iteration > 1 else 0.0  # iteration 1's previous is the initial
        summary.update(zip((f"win_rate_vs_{baseline}", f"win_rate_vs_{baseline}_low",
                            f"win_rate_vs_{baseline}_high"), [w - shift for w in win], strict=True))
        summary[f"judged_vs_{baseline}"] = 40.0
    if oracle:
        summary.update({k.replace("annotator_score", "oracle_reward").replace("win_rate", "oracle_win_rate")
                        .replace("judged", "oracle_judged"): v for k, v in summary.items() if k != "iteration"})
    return summary


def test_a_change_inside_its_noise_draws_flat_and_the_subtitle_is_the_verdict():
    """The bug this replaces: 0.6219 -> 0.6250 (+0.5%) filled an auto-scaled axis as a steep climb. The axis spans
    the change's interval, so the change is a sliver of it, and the figure's subtitle says "not distinguishable"."""
    evaluations = [_evaluation(1, 0.6250, 0.6219, (0.0031, -0.18, 0.19), (0.50, 0.28, 0.72), oracle=False)]
    fig = learning_figure(evaluations, "run", judge=f"rule {DEMO_RULE}", oracle=None)
    reward_ax, win_ax, train_ax = fig.axes[:3]
    bottom, top = reward_ax.get_ylim()
    assert bottom < 0.6219 - 0.18 and top > 0.6219 + 0.19  # the interval is on the axis
    assert (0.6250 - 0.6219) / (top - bottom) < 0.01
    assert fig._suptitle.get_text().replace("\n", " ") == (  # the title, then the verdict (wrapped)
        f"run win-rate vs initial, judged by rule {DEMO_RULE}, a demo rule, not your task's: 0.50 [0.28, 0.72] "
        "over 40 held-out prompts: not distinguishable from the initial policy at this size (the 95% interval "
        "holds 0.5)")


def test_coinciding_series_are_drawn_once_under_both_names():
    """The demo's annotator and oracle are the same rule: drawn apart, one line hid the other (and two of the four
    win-rate series hid the other two)."""
    evaluations = [_evaluation(1, 0.9, 0.4, (0.5, 0.2, 0.8), (0.7, 0.55, 0.82)),
                   _evaluation(2, 1.5, 0.9, (1.1, 0.8, 1.4), (0.9, 0.77, 0.96))]
    fig = learning_figure(evaluations, "run", judge=f"rule {DEMO_RULE}", oracle=DEMO_RULE)
    reward_ax, win_ax = fig.axes[:2]
    assert [t.get_text().replace("\n", " ") for t in reward_ax.get_legend().get_texts()] == [
        f"annotator score (rule {DEMO_RULE}) = oracle reward ({DEMO_RULE}); bars: 95% interval of the change from "
        "the initial policy"]
    win_labels = [t.get_text().replace("\n", " ") for t in win_ax.get_legend().get_texts()]
    assert win_labels[1:] == [f"vs previous (judged by rule {DEMO_RULE}) = vs previous (judged by oracle {DEMO_RULE})",
                              f"vs initial (judged by rule {DEMO_RULE}) = vs initial (judged by oracle {DEMO_RULE})"]
    # Distinct numbers stay distinct, each under its own name.
    curves = learning_curves([{**e, "oracle_reward_mean": 0.1} for e in evaluations], f"rule {DEMO_RULE}", "m:f")
    assert len(merge_coinciding(curves["rewards"])) == 2


def test_training_rounds_share_one_step_axis():
    def metrics(losses):
        return pd.DataFrame([{"step": step, "split": "train", "metric": "loss", "value": loss}
                             for step, loss in enumerate(losses, start=1)]
                            + [{"step": 1, "split": "train", "metric": "tokens_per_s", "value": 9.0}])

    curves = training_curves({2: metrics([0.5, 0.4]), 1: metrics([0.7, 0.6, 0.65])})
    assert curves["series"] == {"loss": {"steps": [1, 2, 3, 4, 5], "values": [0.7, 0.6, 0.65, 0.5, 0.4]}}
    assert curves["boundaries"] == [(0, 1), (3, 2)]


def test_the_change_from_the_initial_policy_has_a_paired_interval():
    change = mean_difference("d", [1.0, 2.0, 3.0, 4.0, None], [0.0, 0.0, 0.0, 0.0, 1.0])  # no score: left out
    half = 1.96 * pd.Series([1.0, 2.0, 3.0, 4.0]).std() / 2
    assert change["d"] == 2.5 and math.isclose(change["d_low"], 2.5 - half) and math.isclose(change["d_high"],
                                                                                             2.5 + half)
    assert math.isnan(mean_difference("d", [1.0], [0.0])["d"])  # one prompt: no interval to give


def test_the_run_plot_reads_the_metrics_stages(tmp_path):
    store = ArtifactStore(str(tmp_path))
    for k in (1, 2):
        summary = {key: v for key, v in _evaluation(k, 0.5 * k, 0.5 * (k - 1), (0.5 * k, 0.5 * k - 0.4, 0.5 * k + 0.4),
                                                    (0.7, 0.55, 0.82)).items() if key != "iteration"}
        rows = [{"step": k, "split": "eval", "metric": key, "value": v} for key, v in summary.items()]
        store.write_stage(store.stage_uri("r", k, "evaluation"), "metrics", {"k": k}, [from_rows(rows, METRICS)],
                          extra={"summary": summary, "judge": f"rule {DEMO_RULE}", "oracle": DEMO_RULE})
        losses = [{"step": step, "split": "train", "metric": "loss", "value": 0.7 - 0.1 * step} for step in (1, 2)]
        store.write_stage(store.stage_uri("r", k, "metrics"), "metrics", {"k": k}, [from_rows(losses, METRICS)])
    path = plot_run(store, "r", str(tmp_path / "plot.png"))
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What the verdict line reads: the evaluation's numbers and who judged them.
    summary = pipeline.evaluation_summary(store, store.stage_uri("r", 2, "evaluation"))
    assert summary["judge"] == f"rule {DEMO_RULE}" and summary["oracle"] == DEMO_RULE
    assert significance_line(summary).startswith(f"win-rate vs initial, judged by the oracle {DEMO_RULE}: 0.70")


# ---- no silent judge ---------------------------------------------------------------------------------------
def _offline(tmp_path, policy, **sections) -> "pipeline.PipelineConfig":
    return parse_config({"setup": "offline_pairwise", "data": {"source": "bundled:preferences"},
                         "model": {"policy": str(policy)}, "store": {"root": str(tmp_path), "run_name": "mine"},
                         **sections})


def test_an_unnamed_judge_is_announced_at_preflight_and_in_the_verdict(tmp_path, tiny_model_dir, caplog):
    """A run on the user's own data with no annotation section is judged by the demo rule: preflight says so
    loudly, and so does the verdict (it printed "judged by the annotator: 0.56", naming nothing)."""
    cfg = _offline(tmp_path, tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="alignment_core.preflight"):
        preflight(cfg)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"evaluation will be judged by rule {DEMO_RULE}, a demo rule of the toy task (alignment_core/rewards.py), "
        "not your task's: name your judge in annotation (annotator: reward_model, judge_pairwise, judge_pointwise, "
        "or programmatic with your own module:function) or set evaluation.oracle (README: Did it learn?)"]
    summary = {"win_rate_vs_initial": 0.5625, "win_rate_vs_initial_low": 0.33, "win_rate_vs_initial_high": 0.77,
               "judged_vs_initial": 16.0, "judge": f"rule {DEMO_RULE}"}
    assert significance_line(summary).startswith(
        f"win-rate vs initial, judged by rule {DEMO_RULE}, a demo rule, not your task's: 0.56 [0.33, 0.77]")
    # A judge the user named, or an oracle beside the rule: nothing to warn about.
    assert preflight_warnings(_offline(tmp_path, tiny_model_dir, evaluation={"oracle": DEMO_RULE})) == []
    own = {"annotator": "programmatic", "programmatic": "tests.test_demo:my_rule"}
    assert preflight_warnings(_offline(tmp_path, tiny_model_dir, annotation=own)) == []
    assert "demo rule" not in significance_line({**summary, "judge": "rule tests.test_demo:my_rule"})
    reward_model = parse_config({"setup": "reward_modelling", "data": {"source": "bundled:preferences"},
                                 "training": {"loss": "reward"}, "store": {"root": str(tmp_path)}})
    assert preflight_warnings(reward_model) == []  # judged by held-out pairs, not by an annotator


def my_rule(prompt: str, response: str) -> float:
    return float(len(response))
