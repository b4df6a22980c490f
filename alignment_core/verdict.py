"""The one-line answer to "did training help?", read from an iteration's evaluation summary: what a run's log,
its summary artifact and the command line's closing table all lead with."""

# The rules of alignment_core/rewards.py score the project's toy task (a positive tone) and are the annotation
# defaults: a run that names no annotator is judged by one of them, which says nothing about the user's task.
DEMO_RULES = "alignment_core.rewards:"


def is_demo_rule(path: str | None) -> bool:
    return bool(path) and path.startswith(DEMO_RULES)


def judged_by(summary: dict, oracle: bool) -> str:
    """Who judged the verdict, in words, from the names the evaluation stage recorded (`judge`: the annotator as
    `evaluation.annotator_label` writes it, `oracle`: a module:function); a demo rule says it is one."""
    if oracle:
        return f"the oracle {summary['oracle']}" if summary.get("oracle") else "the oracle"
    judge = summary.get("judge") or "the annotator"
    if judge.startswith("rule ") and is_demo_rule(judge.removeprefix("rule ")):
        return f"{judge}, a demo rule, not your task's"
    return judge


def significance_line(summary: dict) -> str:
    """Whether the last policy beats the initial one beyond chance (its win-rate's 95% interval excludes 0.5), or
    a reward model's held-out accuracy beats chance (its interval excludes 0.5)."""
    for prefix, who in (("oracle_", judged_by(summary, oracle=True)), ("", judged_by(summary, oracle=False))):
        key = f"{prefix}win_rate_vs_initial"
        if isinstance(summary.get(key), float) and summary.get(f"{key}_low") is not None:
            n = int(summary.get(f"{prefix}judged_vs_initial", 0))
            return (f"win-rate vs initial, judged by {who}: {_interval(summary, key)} over {n} held-out prompts: "
                    f"{_against_half(summary, key, 'the initial policy')}")
    if isinstance(summary.get("heldout_accuracy"), float) and summary.get("heldout_accuracy_low") is not None:
        n = int(summary.get("heldout_pairs", 0))
        return (f"held-out accuracy of the reward model: {_interval(summary, 'heldout_accuracy')} over {n} held-out "
                f"pairs: {_against_half(summary, 'heldout_accuracy', 'chance')}")
    return "no evaluation: nothing says whether the policy improved"


def _interval(summary: dict, key: str) -> str:
    return f"{summary[key]:.2f} [{summary[f'{key}_low']:.2f}, {summary[f'{key}_high']:.2f}]"


def _against_half(summary: dict, key: str, baseline: str) -> str:
    if summary[f"{key}_low"] > 0.5:
        return f"significantly better than {baseline}"
    if summary[f"{key}_high"] < 0.5:
        return f"significantly worse than {baseline}"
    return f"not distinguishable from {baseline} at this size (the 95% interval holds 0.5)"
