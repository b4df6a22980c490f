"""A hand mutation round: one-line bugs, one at a time, each run against the fast tests of its module.

    python scripts/mutation_round.py [--shard K/N] [--timeout 300] [--report docs/mutation-round.md]

Each mutant replaces one exact, unique snippet of a library file in a throwaway git worktree of HEAD
(/tmp/mutation-worktree-K for shard K, so N shards run side by side; the working tree this script lives in
is never touched), runs `pytest -x -q -m "not slow"` on the test files that cover that module with
PYTHONPATH pointing at the worktree, and records killed (a test failed), survived (every selected test
passed) or timeout (undecided: left out of the survival rate). A snippet that is not found exactly once is
reported as invalid rather than silently skipped.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path("/tmp/mutation-results.jsonl")  # one line per mutant, appended by every shard

# The fast tests that cover each module: a mutant there must make one of them fail.
TESTS = {
    "losses": ["tests/test_losses.py"],
    "training": ["tests/test_field_effects.py", "tests/test_training.py", "tests/test_losses.py"],
    "reweight": ["tests/test_reweight.py", "tests/test_reweight_logprobs.py"],
    "judge": ["tests/test_annotation.py", "tests/test_judge_hardening.py"],
    "lease": ["tests/test_lease_edges.py", "tests/test_lease.py"],
    "store": ["tests/test_lease_edges.py", "tests/test_store.py", "tests/test_verified_shards.py"],
    "redact": ["tests/test_secret_leaks.py"],
    "fingerprints": ["tests/test_fingerprints.py", "tests/test_digests.py"],
    "data": ["tests/test_data.py", "tests/test_data_columns.py"],
    "config": ["tests/test_config.py", "tests/test_bounds.py"],
    "feedback": ["tests/test_cascade.py", "tests/test_annotation.py", "tests/test_human_annotator.py"],
    "refresh": ["tests/test_refresh.py"],
}


@dataclass(frozen=True)
class Mutant:
    file: str  # relative to the repository root
    old: str  # an exact snippet that occurs once in the file
    new: str
    tests: str  # a key of TESTS
    what: str  # the bug, in words


L, T, R, J, F = "alignment_core/losses.py", "alignment_core/training/trainer.py", "alignment_core/reweight.py", \
    "alignment_core/annotation/judge.py", "alignment_core/data/formats.py"
C = "alignment_core/annotation/cascade.py"
MUTANTS = [
    # losses
    Mutant(L, "(weights * values).sum() / torch.where(total > 0, total, torch.ones_like(total))",
           "(weights * values).sum() / values.shape[0]", "losses", "weighted mean divides by the batch size"),
    Mutant(L, "(weights < 0).any()", "(weights < -1).any()", "losses", "negative weights accepted"),
    Mutant(L, "losses = -policy_logps / token_counts.clamp_min(1)", "losses = -policy_logps",
           "losses", "sft loss not per token"),
    Mutant(L, "losses = -F.logsigmoid(chosen_scores - rejected_scores - margin)",
           "losses = -F.logsigmoid(chosen_scores - rejected_scores)", "losses", "reward-model margin dropped"),
    Mutant(L, "losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)",
           "losses = -F.logsigmoid(logits)", "losses", "label smoothing ignored"),
    Mutant(L, "logits = beta * (chosen_logratios - rejected_logratios)",
           "logits = (chosen_logratios - rejected_logratios)", "losses", "dpo beta ignored"),
    Mutant(L, "losses = (h - 1 / (2 * beta)) ** 2", "losses = (h - 1 / beta) ** 2", "losses", "ipo target 1/beta"),
    Mutant(L, "losses = hinge + nll_weight * nll", "losses = hinge + nll", "losses", "slic nll weight ignored"),
    Mutant(L, "losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)",
           "losses = -F.logsigmoid(chosen_rewards - rejected_rewards)", "losses", "simpo gamma ignored"),
    Mutant(L, "    return mean.clamp_min(0)", "    return mean", "losses", "kto reference point not clamped"),
    Mutant(L, "desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl_estimate)))",
           "desirable_losses = (1 - torch.sigmoid(beta * (logratios - kl_estimate)))", "losses",
           "kto desirable weight ignored"),
    Mutant(L, "undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl_estimate - logratios)))",
           "undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (logratios - kl_estimate)))",
           "losses", "kto undesirable sign flipped"),
    Mutant(L, "losses = -advantages * policy_logps", "losses = advantages * policy_logps", "losses",
           "policy gradient sign flipped"),
    Mutant(L, "chosen_rewards = beta * policy_chosen_logps / chosen_token_counts.clamp_min(1)",
           "chosen_rewards = beta * policy_chosen_logps", "losses", "simpo chosen reward not length-normalised"),
    # training
    Mutant(T, "micro_batches = accelerator.num_processes * tc.gradient_accumulation_steps",
           "micro_batches = tc.gradient_accumulation_steps", "training", "plan ignores the process count"),
    Mutant(T, "weight_decay=tc.weight_decay,", "weight_decay=0.0,", "training", "weight decay not passed"),
    Mutant(T, "num_warmup_steps=self._warmup_steps(), num_training_steps=len(self.plan),",
           "num_warmup_steps=0, num_training_steps=len(self.plan),", "training", "no warm-up"),
    Mutant("alignment_core/training/plan.py", "order = np.random.default_rng([seed, epoch]).permutation(len(units))",
           "order = np.random.default_rng([seed, 0]).permutation(len(units))", "training",
           "every epoch in the same order"),
    Mutant(T, "steps, warmup = len(self.plan), math.ceil(self.cfg.training.warmup_ratio * len(self.plan))",
           "steps, warmup = len(self.plan), math.floor(self.cfg.training.warmup_ratio * len(self.plan))",
           "training", "warm-up rounded down"),
    Mutant(T, "scale = accelerator.num_processes / torch.where(weight_total > 0, weight_total, "
              "torch.ones_like(weight_total))",
           "scale = 1 / torch.where(weight_total > 0, weight_total, torch.ones_like(weight_total))",
           "training", "loss scale ignores the process count"),
    Mutant(T, "grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.training.max_grad_norm)",
           "grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), 1e9)", "training",
           "max_grad_norm ignored"),
    Mutant(T, "loss = totals[0] / (weight_sum if weight_sum > 0 else 1.0)", "loss = totals[0]", "training",
           "logged loss not averaged"),
    Mutant("alignment_core/logprobs.py", "return (token_logps * mask).sum(dim=1), mask.sum(dim=1)",
           "return (token_logps).sum(dim=1), mask.sum(dim=1)", "training", "padding counted in log-probs"),
    Mutant(T, "mine = self.plan[self.step][accelerator.process_index :: accelerator.num_processes]",
           "mine = self.plan[self.step][0 :: accelerator.num_processes]", "training",
           "every process trains on the first micro-batch"),
    # reweight
    Mutant(R, "weights = raw / raw.mean()", "weights = raw", "reweight", "weights not normalised to mean 1"),
    Mutant(R, "fallback = effective < self.cfg.min_effective_sample_fraction",
           "fallback = effective > self.cfg.min_effective_sample_fraction", "reweight", "fallback inverted"),
    Mutant(R, "raw.append(_sigmoid(margin / self.cfg.temperature))", "raw.append(_sigmoid(margin))",
           "reweight", "margin temperature ignored"),
    Mutant(R, "log_ratio += float(policy) - float(behaviour)", "log_ratio += float(behaviour) - float(policy)",
           "reweight", "importance roles swapped"),
    Mutant(R, "clipped = np.clip(normalised, -log_clip, log_clip)", "clipped = np.clip(normalised, -log_clip, None)",
           "reweight", "upper clip removed"),
    Mutant(R, "tempered = np.asarray(log_ratios) / self.cfg.temperature", "tempered = np.asarray(log_ratios)",
           "reweight", "importance temperature ignored"),
    Mutant(R, "normalised = tempered - (np.logaddexp.reduce(tempered) - math.log(len(tempered)))",
           "normalised = tempered", "reweight", "importance weights not self-normalised"),
    Mutant(R, "fill = sum(known) / len(known)", "fill = 1.0", "reweight", "unknown confidence filled with 1"),
    # judge / annotation parsing
    Mutant(J, "if reply.logprobs[best] > reply.logprobs[second]:", "if reply.logprobs[best] >= reply.logprobs[second]:",
           "judge", "equal log-probs read as a verdict"),
    Mutant(J, "first_wins = [verdicts[0].answer == \"A\"] + ([verdicts[1].answer == \"B\"] if len(verdicts) > 1 "
              "else [])",
           "first_wins = [verdicts[0].answer == \"A\"] + ([verdicts[1].answer == \"A\"] if len(verdicts) > 1 "
           "else [])", "judge", "swapped order's verdict not swapped back"),
    Mutant(J, "a_minus_b = verdict.logprobs[\"A\"] - verdict.logprobs[\"B\"]",
           "a_minus_b = verdict.logprobs[\"B\"] - verdict.logprobs[\"A\"]", "judge", "confidence sign flipped"),
    Mutant(J, "return Score(_sigmoid(verdict.logprobs[\"yes\"] - verdict.logprobs[\"no\"]), \"ok\", raw)",
           "return Score(_sigmoid(verdict.logprobs[\"no\"] - verdict.logprobs[\"yes\"]), \"ok\", raw)", "judge",
           "yes/no score inverted"),
    Mutant(J, "if not re.fullmatch(r\"\\d+\", number) or not low <= int(number) <= high:",
           "if not re.fullmatch(r\"\\d+\", number):", "judge", "score out of the scale accepted"),
    Mutant(J, "if len(numbers) > TEMPLATE_MAX_RANGE:", "if len(numbers) > 10 * TEMPLATE_MAX_RANGE:", "judge",
           "template range cap loosened"),
    # lease
    Mutant("alignment_core/lease.py", "if lease.get(\"expires_at\", 0) <= time.time():",
           "if lease.get(\"expires_at\", 0) <= time.time() - 3600:", "lease", "an expired lease keeps its writer"),
    Mutant("alignment_core/lease.py",
           "return lease.get(\"expires_at\", 0) > (time.time() if now is None else now) and not holder_is_gone(lease)",
           "return lease.get(\"expires_at\", 0) > (time.time() if now is None else now)", "lease",
           "a dead holder's lease counts as live"),
    Mutant("alignment_core/lease.py",
           "self.heartbeat_s = float(heartbeat_s if heartbeat_s is not None else timeout_s / 4)",
           "self.heartbeat_s = float(heartbeat_s if heartbeat_s is not None else timeout_s * 2)", "lease",
           "heartbeat slower than the timeout"),
    Mutant("alignment_core/lease.py", "\"renewed_at\": now, \"expires_at\": now + self.timeout_s,",
           "\"renewed_at\": now, \"expires_at\": now + 2 * self.timeout_s,", "lease", "lease lasts twice the timeout"),
    Mutant("alignment_core/lease.py", "if lease is None or lease.get(\"token\") != token:", "if lease is None:",
           "lease", "another holder's lease accepted"),
    # store
    Mutant("alignment_core/store/documents.py", "return current is not None and current[1] == version",
           "return current is not None", "store", "conditional write ignores the version"),
    Mutant("alignment_core/store/documents.py", "self.fs.pipe_file(path, data, IfMatch=version)",
           "self.fs.pipe_file(path, data)", "store", "S3 conditional write made unconditional"),
    Mutant("alignment_core/store/documents.py", "                os.unlink(path)\n                return True",
           "                return True", "store", "local delete_if deletes nothing"),
    # redaction
    Mutant("alignment_core/redact.py", "(re.compile(r\"(?i)\\b(bearer\\s+)[A-Za-z0-9._~+/=-]{8,}\"), rf\"\\1{MASK}\"),",
           "", "redact", "bearer tokens not masked"),
    Mutant("alignment_core/redact.py", "(re.compile(r\"\\b(hf_)[A-Za-z0-9]{16,}\"), rf\"\\1{MASK}\"),", "", "redact",
           "hugging face tokens not masked"),
    Mutant("alignment_core/redact.py",
           "(re.compile(r\"(?i)\\b([a-z][a-z0-9+.-]*://[^/\\s:@\\\"'\\\\]*:)[^/\\s@\\\"'\\\\]+@\"), rf\"\\1{MASK}@\"),",
           "", "redact", "URL passwords not masked"),
    Mutant("alignment_core/redact.py",
           "(re.compile(r\"\\b((?:AKIA|ASIA)[A-Z0-9]{4})[A-Z0-9]{12}\\b\"), rf\"\\1{MASK}\"),",
           "", "redact", "AWS key ids not masked"),
    # fingerprints and digests
    Mutant("alignment_core/pipeline.py", "\"reference\": reference.digest(store, reference_path),",
           "\"reference\": policy.digest(store, policy_path),", "fingerprints",
           "round fingerprint without the reference"),
    Mutant("alignment_core/digests.py", "sha.update(f\"{relative}\\0{file_digest(str(path))}\\n\".encode())",
           "sha.update(f\"{relative}\\n\".encode())", "fingerprints", "code digest ignores file contents"),
    Mutant("alignment_core/digests.py", "json.dumps(stage_code(stage, root))",
           "json.dumps(list(stage_code(stage, root).items())[:1])", "fingerprints",
           "digest keeps only the first entry"),
    Mutant("alignment_core/digests.py", "            covered[label] = sha256", "            covered[label] = label",
           "fingerprints", "stage code digest ignores module contents"),
    Mutant("alignment_core/digests.py", "                follows += imported(child)", "                pass",
           "fingerprints", "function-local imports not followed"),
    # data loading
    Mutant(F, "if gap <= 0 or gap < loader.min_pair_margin:", "if gap < 0:", "data",
           "min_pair_margin ignored"),
    Mutant(F, "if len(responses) < 2:", "if len(responses) < 1:", "data",
           "a single response makes a pair"),
    Mutant(F, "if not any(turn[\"role\"] == \"user\" for turn in turns):", "if False:", "data",
           "conversations without a user turn accepted"),
    Mutant(F, "if {\"chosen\", \"rejected\"} <= columns:", "if {\"chosen\"} <= columns:", "data",
           "preference format detected from chosen alone"),
    # config
    Mutant("alignment_core/config/optimization.py", "label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)",
           "label_smoothing: float = Field(default=0.0, ge=0, le=1)", "config", "label_smoothing bound loosened"),
    Mutant("alignment_core/config/feedback.py", "max_failure_fraction: float = Field(default=0.2, ge=0, le=1)",
           "max_failure_fraction: float = Field(default=0.2, ge=0)", "config", "max_failure_fraction unbounded"),
    Mutant("alignment_core/config/sources.py", "top_p: float = Field(default=1.0, gt=0, le=1)",
           "top_p: float = Field(default=1.0, gt=0)", "config", "top_p unbounded"),
    Mutant("alignment_core/config/sources.py", "dropout: float = Field(default=0.05, ge=0, lt=1)",
           "dropout: float = Field(default=0.05, ge=0)", "config", "adapter dropout unbounded"),
    Mutant("alignment_core/config/common.py", "    if not 0 < max_prompt_length < max_length:",
           "    if not 0 < max_prompt_length <= max_length:", "config", "prompt may fill the whole sequence"),
    Mutant("alignment_core/config/common.py", "    if clip < 1:", "    if clip < 0:", "config",
           "reweight clip below 1 accepted"),
    # feedback: pairs, the cascade, a person's answers, the reward-model refresh
    Mutant(C, "return min(prompts, share(prompts_before + prompts) - share(prompts_before))",
           "return min(prompts, share(prompts_before + prompts))", "feedback",
           "cascade budget: a shard spends the whole iteration's share so far"),
    Mutant("alignment_core/annotation/stage.py", "prompts_before=index * cfg.generation.shard_size",
           "prompts_before=0", "feedback", "cascade budget: a resumed shard forgets the shards before it"),
    Mutant(C, "return sorted(pairs, key=lambda i: -uncertainty(rows[i]))",
           "return sorted(pairs, key=lambda i: uncertainty(rows[i]))", "feedback",
           "cascade escalates the surest first"),
    Mutant(C, "return 1.0 - 1.0 / (1.0 + math.exp(-margin / math.sqrt(1.0 + math.pi * spread**2 / 8)))",
           "return spread", "feedback", "cascade ranks by the members' spread alone"),
    Mutant("alignment_core/annotation/base.py", 'LABEL_STATUSES = ("ok", "tie")',
           'LABEL_STATUSES = ("ok", "tie", "unanswered")', "feedback", "unanswered pairs trained on"),
    Mutant("alignment_core/annotation/base.py", "return [(best, min(others, key=lambda i: scores[i]))]",
           "return [(best, others[0])]", "feedback", "best_vs_worst pairs the best with the first other"),
    Mutant("alignment_core/refresh.py", "if store.checkpoint_complete(checkpoint) and store.exists(lineage_uri)",
           "if False and store.checkpoint_complete(checkpoint)", "refresh", "a finished refresh member is redone"),
]


def apply(worktree: Path, mutant: Mutant) -> str | None:
    """Apply the mutant to the worktree; the original text to restore, or None when the snippet is not unique."""
    path = worktree / mutant.file
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return None
    path.write_text(original.replace(mutant.old, mutant.new))
    return original


def run_tests(worktree: Path, mutant: Mutant, timeout_s: int) -> tuple[str, float, str]:
    tests = [t for t in TESTS[mutant.tests] if (worktree / t).exists()]
    env = {**os.environ, "PYTHONPATH": str(worktree)}
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                               *tests], cwd=worktree, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, ""  # undecided: neither killed nor survived
    tail = (done.stdout.strip().splitlines() or [""])[-1]
    return ("survived" if done.returncode == 0 else "killed"), time.monotonic() - start, tail


def report(path: Path) -> None:
    """docs/mutation-round.md from every result recorded so far (all shards)."""
    results = sorted((json.loads(line) for line in RESULTS.read_text().splitlines()), key=lambda r: r["index"])
    decided = [r for r in results if r["result"] in ("killed", "survived")]
    survivors = [r for r in decided if r["result"] == "survived"]
    undecided = [r for r in results if r["result"] not in ("killed", "survived", "invalid")]
    rate = len(survivors) / len(decided) if decided else 0.0
    lines = ["# Mutation round", "",
             f"`python scripts/mutation_round.py` on {results[0]['head']}: {len(results)} of {len(MUTANTS)} "
             f"one-line mutants run; of the {len(decided)} decided, {len(survivors)} survived the fast tests of "
             f"their module ({rate:.0%}); {len(undecided)} undecided (the tests ran past the per-mutant timeout, "
             f"counted neither way); {len(results) - len(decided) - len(undecided)} invalid (snippet not found "
             "once).", "",
             "| # | file | mutant | result | seconds | last pytest line |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['index']} | {r['file']} | {r['what']} | {r['result']} | {r['seconds']:.0f} | {r['tail']} |"
              for r in results]
    lines += ["", "## Survivors", ""] + [f"- #{r['index']} {r['file']}: {r['what']}" for r in survivors] + [""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", default="0/1", help="K/N: run mutants K, K+N, K+2N, ...")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per mutant's tests")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "mutation-round.md")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the recorded results")
    args = parser.parse_args()
    if args.report_only:
        report(args.report)
        return
    shard, shards = (int(n) for n in args.shard.split("/"))
    worktree = Path(f"/tmp/mutation-worktree-{shard}")
    if not worktree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), "HEAD"], cwd=REPO, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=worktree, capture_output=True,
                          text=True).stdout.strip()
    for index in range(shard, len(MUTANTS), shards):
        mutant = MUTANTS[index]
        original = apply(worktree, mutant)
        result, seconds, tail = "invalid", 0.0, ""
        if original is not None:
            try:
                result, seconds, tail = run_tests(worktree, mutant, args.timeout)
            finally:
                (worktree / mutant.file).write_text(original)
        record = {"index": index, "file": mutant.file, "what": mutant.what, "result": result,
                  "seconds": seconds, "tail": tail, "head": head}
        with RESULTS.open("a") as results:
            results.write(json.dumps(record) + "\n")
        print(f"#{index} {result} ({seconds:.0f} s): {mutant.what}  [{tail}]", flush=True)
    report(args.report)


if __name__ == "__main__":
    main()
