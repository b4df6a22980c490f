from alignment_core import pipeline
from tasks import parse, stage_task
from tasks.dispatch import gpu_slot
from tasks.generate import generate


def evaluate_policy(config_json: str, eval_prompts_uri: str, policy_uri: str, previous_policy_uri: str,
                    initial_policy_uri: str, iteration: int) -> str:
    """The held-out samples of the new, the previous and the initial policy (`eval_generations` stages, through
    the generate task like any sampling: GPU slot, scale-out, resume; iteration 0 holds the initial policy's),
    then the `evaluation` stage that judges them."""
    new = generate(config_json, eval_prompts_uri, policy_uri, iteration, stage="eval_generations")
    previous = generate(config_json, eval_prompts_uri, previous_policy_uri, iteration - 1, stage="eval_generations")
    # iteration 0's samples are the initial policy's: at iteration 1 the previous policy is the initial one
    initial = previous if iteration == 1 else generate(config_json, eval_prompts_uri, initial_policy_uri, 0,
                                                        stage="eval_generations")
    return evaluate(config_json, new, previous, initial, iteration)


@stage_task("evaluate")
def evaluate(config_json: str, new_uri: str, previous_uri: str, initial_uri: str, iteration: int) -> str:
    cfg = parse(config_json)
    with gpu_slot(cfg, "evaluation"):  # a reward model or a local judge compares the samples here
        return pipeline.evaluate_generations(cfg, new_uri, previous_uri, initial_uri, iteration)


@stage_task("evaluate-reward-model")
def evaluate_reward_model(config_json: str, examples_uri: str, checkpoint_uri: str, iteration: int) -> str:
    cfg = parse(config_json)
    heldout = pipeline.heldout_examples_uri(pipeline.open_store(cfg), examples_uri)
    with gpu_slot(cfg, "reward_model_evaluation"):
        return pipeline.evaluate_reward_model(cfg, heldout, checkpoint_uri, iteration)
