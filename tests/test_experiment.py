"""The online-vs-offline experiment: its configs, its dataset file, its report, and (slow) that it aligns.

The slow test runs the experiment as a user does (`python -m experiments.online_vs_offline --quick`) with the
online-oracle arm only: SFT, then two iterations of online DPO labelled by the true reward.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from alignment_core.annotation.base import ScoreRules
from alignment_core.annotation.cascade import CascadeAnnotator
from alignment_core.annotation.scorers import ProgrammaticAnnotator
from alignment_core.data import DatasetLoader, prompt_id
from alignment_core.records import ANNOTATIONS, from_rows
from alignment_core.store import ArtifactStore
from experiments.online_vs_offline import (
    ALL_ARMS,
    CASCADE_BUDGETS,
    SETTINGS,
    arm_config,
    changed_fields,
    comparison_table,
    first_annotator_agreement,
    label_efficiency_plot,
    paired_comparison,
    pairs_jsonl,
    results_plot,
    results_table,
    setting_changes,
    sft_config,
    win_rate,
)
from tests.helpers import prefect_env
from tests.test_annotation import make_generations, write_generations

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_every_arm_of_every_setting_is_a_valid_config(setting, tmp_path):
    settings = SETTINGS[setting]
    members = ["rm", "rm-m1", "rm-m2"]
    bootstrap = ["rm-b0", "rm-b1", "rm-b2"]
    configs = {arm: arm_config(settings, str(tmp_path), 0, arm, "sft", "rho", members, bootstrap)
               for arm in ALL_ARMS}
    assert {arm: cfg.setup for arm, cfg in configs.items()} == {
        **{arm: "offline_pairwise" for arm in ALL_ARMS if arm.startswith("offline")},
        **{arm: "online_pairwise" for arm in ALL_ARMS if arm.startswith("online")},
    }
    assert configs["offline-importance"].reweight.behaviour_model == "rho"
    tempered = configs["offline-importance-tempered"].reweight
    assert (tempered.importance_pair, tempered.temperature, tempered.clip) == ("mean", 4.0, 2.0)
    assert {cfg.reweight.strategy for arm, cfg in configs.items() if not arm.startswith("offline-importance")} == {
        "uniform"}
    assert configs["online-rm"].annotation.reward_model == "rm"
    assert configs["online-rm-ensemble"].annotation.reward_model == members
    assert {configs[arm].annotation.cascade.budget for arm in CASCADE_BUDGETS} == {0.125, 0.25, 0.5}
    assert all(configs[arm].annotation.annotator == "cascade" for arm in CASCADE_BUDGETS)
    assert configs["online-oracle"].annotation.annotator == "programmatic"
    refreshing = configs["online-cascade-25-refresh"].annotation
    assert refreshing.reward_model == bootstrap and refreshing.cascade.budget == 0.25
    assert refreshing.cascade.refresh.enabled and refreshing.cascade.refresh.epochs == settings.reward_model_epochs
    assert [arm for arm, cfg in configs.items() if cfg.annotation.cascade.refresh.enabled] == [
        "online-cascade-25-refresh"]
    # the same learner and prompts in every arm: only the data source and labels differ
    assert len({(cfg.training.model_dump_json(), cfg.generation.model_dump_json(), cfg.model.reference)
                for cfg in configs.values()}) == 1
    assert sft_config(settings, str(tmp_path), "sft", "base").training.loss == "sft"


def test_offline_pairs_file_reads_back_as_the_same_pairs(tmp_path):
    messages = [[{"role": "user", "content": "Describe the moon."}], [{"role": "user", "content": "Talk about art."}]]
    units = pd.DataFrame({
        "prompt_messages": messages,
        "generation1_response": ["The moon is lovely and bright.", "I love the art."],
        "generation2_response": ["The moon is there.", "The art is dull."],
    })
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(pairs_jsonl(units))
    examples = DatasetLoader(str(path), format="pairs").load().to_pandas()
    assert examples["chosen"].tolist() == units["generation1_response"].tolist()
    assert examples["rejected"].tolist() == units["generation2_response"].tolist()
    assert examples["prompt_id"].tolist() == [prompt_id(m) for m in messages]


def test_win_rate_counts_ties_half_and_compares_the_same_answer_index():
    index = pd.MultiIndex.from_tuples([("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1)])
    new = pd.Series([2.0, 1.0, 0.0, 3.0], index=index)
    baseline = pd.Series([1.0, 1.0, 1.0, 5.0], index=index[::-1]).sort_index()  # order must not matter
    assert win_rate(new, baseline) == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    with pytest.raises(ValueError, match="no answer has a baseline"):
        win_rate(new, pd.Series([1.0], index=pd.MultiIndex.from_tuples([("other", 0)])))


def test_results_table_and_plot_report_mean_std_and_range_over_seeds():
    rows = []
    for seed, (start, end) in enumerate([(1.0, 1.0), (1.0, 3.0)]):
        for arm in ("offline", "online-oracle"):
            rows.append({"seed": seed, "arm": arm, "iteration": 0, "true_reward": start, "win_rate_vs_sft": 0.5,
                         "words": 10.0, "pairs_trained": 0, "true_labels": 0, "annotator_agreement": float("nan")})
            rows.append({"seed": seed, "arm": arm, "iteration": 1, "true_reward": end, "win_rate_vs_sft": 0.75,
                         "words": 12.0, "pairs_trained": 20 + seed, "true_labels": 32,
                         "annotator_agreement": float("nan")})
    table = results_table(pd.DataFrame(rows))
    assert "over 2 seed(s)" in table
    assert "| 0 | SFT policy pi_0 | 0 | 0 | 1.00 ± 0.00 [1.00, 1.00] | 0.50 | 10.0 | - |" in table
    assert "| 1 | online-oracle | 32 | 20 | 2.00 ± 1.00 [1.00, 3.00] | 0.75 ± 0.00 [0.75, 0.75] | 12.0 | - |" in table
    assert table.index("| 1 | offline |") < table.index("| 1 | online-oracle |")
    assert "escalated pairs" not in table  # no cascade arm, no escalation table
    cascade = [{**row, "arm": "online-cascade-25", "first_right_escalated": 0.25 + 0.5 * row["seed"],
                "first_right_kept": 0.75} for row in rows if row["arm"] == "offline"]
    assert "| 1 | online-cascade-25 | 0.50 | 0.75 |" in results_table(pd.DataFrame(rows + cascade))
    png = results_plot(pd.DataFrame(rows))
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.slow
def test_online_oracle_dpo_raises_the_held_out_true_reward(tmp_path):
    """Asserted on the gain over pi_0 paired by seed, over two seeds (one trajectory once collapsed at its second
    iteration after a small change to the SFT data): each seed gains, and the mean gain is wide."""
    root = tmp_path / "store"
    command = [sys.executable, "-m", "experiments.online_vs_offline", "--quick", "--seeds", "2", "--arms",
               "online-oracle", "--store-root", str(root)]
    result = subprocess.run(command, cwd=REPO, env=prefect_env(tmp_path), capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    measurements = pd.read_csv(root / "report" / "measurements.csv")
    assert sorted(set(measurements["iteration"])) == [0, 1, 2] and sorted(set(measurements["seed"])) == [0, 1]
    assert (measurements["arm"] == "online-oracle").all()
    by_seed = measurements.pivot_table(index="seed", columns="iteration", values="true_reward")
    gain = by_seed[2] - by_seed[0]
    # SFT policy ~0.8; two iterations of online DPO reached ~3 in the runs we made: wide margins
    assert (gain > 0).all() and gain.mean() > 0.5, measurements
    assert measurements.loc[measurements["iteration"] == 2, "win_rate_vs_sft"].mean() > 0.65, measurements
    assert measurements.loc[measurements["iteration"] == 2, "pairs_trained"].min() > 32  # non-tied pairs, both

    report = (root / "report" / "results.md").read_text()
    assert "| 2 | online-oracle | 64 |" in report
    assert (root / "report" / "results.png").read_bytes().startswith(b"\x89PNG")
    heldout = pd.read_parquet(root / "seed1-online-oracle" / "iter-002" / "heldout_samples")
    assert len(heldout) == 40 * 4 and set(heldout["sample_index"]) == {0, 1, 2, 3}

    # A rerun of the finished experiment does no model work: every stage and checkpoint is found complete.
    def written() -> dict:
        return {str(path.parent.relative_to(root)): json.loads(path.read_text()).get("created_at")
                or json.loads(path.read_text()).get("saved_at")
                for path in list(root.rglob("_manifest.json")) + list(root.rglob("_complete.json"))}

    before = written()
    assert len(before) > 20
    rerun = subprocess.run(command, cwd=REPO, env=prefect_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]
    assert written() == before


def test_paired_comparison_bootstraps_the_seed_differences_and_the_share_of_the_oracles_gain():
    rows = []
    # pi_0 at 1.0; the oracle ends at 5, offline at 2, a cascade at 4 (ahead in 4 of 5 seeds), a weak arm below
    finals = {"offline": [2, 2, 2, 2, 2], "online-oracle": [5, 5, 5, 5, 5], "online-cascade-25": [4, 4, 4, 4, 1.5],
              "online-rm": [1, 1, 1, 1, 1]}
    for arm, values in finals.items():
        for seed, value in enumerate(values):
            rows.append({"seed": seed, "arm": arm, "iteration": 0, "true_reward": 1.0, "true_labels": 0})
            rows.append({"seed": seed, "arm": arm, "iteration": 2, "true_reward": value,
                         "true_labels": {"offline": 64, "online-oracle": 64, "online-cascade-25": 16}.get(arm, 0)})
    comparison = paired_comparison(pd.DataFrame(rows)).set_index("arm")
    cascade = comparison.loc["online-cascade-25"]
    assert cascade["difference"] == pytest.approx(1.5) and cascade["seeds_ahead"] == 4 and cascade["seeds"] == 5
    assert -0.5 <= cascade["low"] < 1.5 < cascade["high"] <= 2.0  # the bootstrap of the 5 paired differences
    assert cascade["share_of_oracle_gain"] == pytest.approx(2.5 / 4)  # mean gain 2.5 of the oracle's 4
    assert (cascade["true_labels"], cascade["baseline_true_labels"]) == (16, 64)
    rm = comparison.loc["online-rm"]
    assert rm["difference"] == pytest.approx(-1) and rm["high"] == pytest.approx(-1) and rm["seeds_ahead"] == 0
    assert "offline" not in comparison.index
    table = comparison_table(paired_comparison(pd.DataFrame(rows)))
    assert "| online-cascade-25 | 16 (64) | +1.50 [" in table and "| 4 of 5 | 62% |" in table
    png = label_efficiency_plot(pd.DataFrame(rows))
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_the_dev_setting_measures_on_unused_training_prompts_and_never_reads_the_held_out_topics(tmp_path):
    """DEV, where recipes are chosen: it trains on the first 128 prompts, measures on the next 32 (training topics),
    and never reads the 40 held-out-topic prompts FULL measures on (FULL trains on 128 of the first 160)."""
    from alignment_core import pipeline

    bundled = [json.loads(line)["prompt"] for line in
               (REPO / "alignment_core" / "bundled" / "prompts.jsonl").read_text().splitlines()]

    def prompts(setting) -> tuple[set[str], list[str]]:
        cfg = arm_config(setting, str(tmp_path / setting.name), 0, "online-oracle", "sft", "rho", [])
        store = pipeline.open_store(cfg)
        read = lambda uri: [m[-1]["content"] for m in store.read_pandas(uri)["prompt_messages"]]  # noqa: E731
        trained = {p for k in range(1, setting.iterations + 1) for p in read(pipeline.load_prompts(cfg, k))}
        return trained, read(pipeline.load_eval_prompts(cfg))

    dev_trained, dev_measured = prompts(SETTINGS["dev"])
    full_trained, full_measured = prompts(SETTINGS["full"])
    assert dev_trained == set(bundled[:128]) and len(full_trained) == 128 and full_trained < set(bundled[:160])
    assert dev_measured == bundled[128:160] and full_measured == bundled[160:]
    assert SETTINGS["dev"].first_seed == 100 and SETTINGS["full"].first_seed == 0


def test_setting_changes_name_the_runs_they_change(tmp_path):
    """`--set` changes a setting's field; the runs it changes carry it in their names, so that two recipes share a
    store (and its SFT models and offline data) without one's stages replacing the other's."""
    changed = dataclasses.replace(SETTINGS["dev"], **setting_changes(["cheap_samples=4", "dpo_learning_rate=2e-4"]))
    assert changed.cheap_samples == 4 and isinstance(changed.cheap_samples, int)
    names = {arm: arm_config(changed, str(tmp_path), 100, arm, "sft", "rho", ["rm"] * 3).store.run_name
             for arm in ("offline", "online-cascade-25", "online-oracle")}
    assert names == {"offline": "seed100-offline-dpo_learning_rate0.0002",
                     "online-cascade-25": "seed100-online-cascade-25-dpo_learning_rate0.0002-cheap_samples4",
                     "online-oracle": "seed100-online-oracle-dpo_learning_rate0.0002"}
    assert changed_fields(changed) == ["dpo_learning_rate", "cheap_samples"] and changed_fields(SETTINGS["dev"]) == []
    cascade = arm_config(changed, str(tmp_path), 100, "online-cascade-25", "sft", "rho", ["rm"] * 3)
    assert cascade.generation.n_samples == 4 and cascade.training.learning_rate == 2e-4
    oracle = arm_config(changed, str(tmp_path), 100, "online-oracle", "sft", "rho", [])
    assert oracle.generation.n_samples == 2 and oracle.training.loss == "dpo"
    smoothed = dataclasses.replace(changed, cheap_label_smoothing=0.2)
    cascade = arm_config(smoothed, str(tmp_path), 100, "online-cascade-25", "sft", "rho", ["rm"] * 3)
    assert (cascade.training.loss, cascade.training.label_smoothing) == ("cdpo", 0.2)
    assert arm_config(smoothed, str(tmp_path), 100, "offline", "sft", "rho", []).training.loss == "dpo"
    with pytest.raises(SystemExit, match="expected FIELD=NUMBER"):
        setting_changes(["name=other"])
    with pytest.raises(SystemExit, match="cheap_samples is an int"):
        setting_changes(["cheap_samples=2.5"])


def test_first_annotator_agreement_splits_escalated_and_kept_pairs(tmp_path):
    """Response length as a cascade's first annotator, the true reward above it: the two smallest length gaps
    go up (p2: wrong, p1: right); the kept ones (p0, p3) are both wrong."""
    store = ArtifactStore(str(tmp_path))
    frame = make_generations({"p0": ["good happy kind", "the cold long rainy night was so"],
                              "p1": ["a great bright day", "bad"],
                              "p2": ["happy", "sad cold"],
                              "p3": ["wonderful friend", "it is a grey day today here"]})
    write_generations(store, frame)
    rules = ScoreRules()
    cascade = CascadeAnnotator(ProgrammaticAnnotator("alignment_core.rewards:response_length", rules),
                               ProgrammaticAnnotator("alignment_core.rewards:positive_words", rules),
                               budget=0.5, prompts_per_iteration=4)
    rows = cascade.annotate(frame)
    store.write_stage(store.stage_uri("run", 0, "annotations"), "annotations", {"test": 1},
                      [from_rows(rows, ANNOTATIONS)])
    assert sorted(r["prompt_id"] for r in rows if json.loads(r["raw"])["cascade"]["escalated"]) == ["p1", "p2"]
    assert first_annotator_agreement(store, "run", 0) == (0.5, 0.0)
