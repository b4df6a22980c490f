"""A LoRA adapter checkpoint merged into full weights: a normal `save_pretrained` folder (base + adapter) that
loads without peft.

    alignment-core merge runs/lora/iter-002/checkpoint merged/
"""

import argparse
import logging
from pathlib import Path

from alignment_core.adapters import ADAPTER_CONFIG, adapter_base, adapter_config, is_adapter
from alignment_core.models import load_causal_lm, load_reward_model, load_tokenizer, resolve_model_path

logger = logging.getLogger(__name__)

def merge_adapter(checkpoint: str, out: str, store=None, dtype: str = "float32", kind: str | None = None) -> str:
    """Base + adapter merged into full weights at `out` (a normal save_pretrained folder + tokenizer).

    `kind` is "causal_lm" or "reward_model"; by default it follows the adapter's task type.
    """
    path = resolve_model_path(checkpoint, store=store)
    if not is_adapter(path):
        raise ValueError(f"{checkpoint} is not an adapter checkpoint (no {ADAPTER_CONFIG})")
    kind = kind or ("reward_model" if adapter_config(path).get("task_type") == "SEQ_CLS" else "causal_lm")
    tokenizer = load_tokenizer(path, store=store)
    if kind == "reward_model":
        model = load_reward_model(path, tokenizer=tokenizer, dtype=dtype, store=store)
    else:
        model = load_causal_lm(path, dtype=dtype, store=store)
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    logger.info("merged %s (base %s) into %s", checkpoint, adapter_base(path), out)
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`alignment-core merge CHECKPOINT OUT` (or `python -m alignment_core.merge CHECKPOINT OUT`)."""
    parser = argparse.ArgumentParser(prog=prog, description="Merge a LoRA adapter checkpoint into full weights.")
    parser.add_argument("checkpoint", help="adapter checkpoint: a folder or a store URI")
    parser.add_argument("out", help="folder to write the merged model to")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--kind", choices=["causal_lm", "reward_model"], help="default: the adapter's task")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(merge_adapter(args.checkpoint, args.out, dtype=args.dtype, kind=args.kind))


if __name__ == "__main__":
    main()
