"""What the fault tests run in a process of its own, to SIGKILL it at a chosen moment.

    python -m tests.faults.worker save ROOT URI MODEL_DIR --step S --stall-after N --ready FILE
        save the model at URI (weights shifted by S, trainer_state {"step": S}); with --stall-after, the store's
        file system stalls after N files are written (object storage: uploaded; locally: copied into the swap
        folder), after creating FILE: the parent kills the process there, mid-save.
    python -m tests.faults.worker round ROOT MODEL_DIR [--stall-at-step K --ready FILE]
        one training round (tests.faults.test_mid_train.round_config, 16 pairs, a save every step); with
        --stall-at-step, it stalls after step K (K's save written), after creating FILE.
    python -m tests.faults.worker stages ROOT MODEL_DIR --through STAGE [--stall-before PATH --ready FILE]
        iteration 1's stages but training, through reweight or evaluate (tests.faults.test_kill_stages.run_stages);
        with --stall-before, it stalls when the store is about to write the file whose URI ends with PATH, after
        creating FILE.

The endpoint of an S3 root comes from AWS_ENDPOINT_URL, credentials from the AWS_* variables.
"""

import argparse
import json
import time
from pathlib import Path


def stall(ready: str) -> None:
    Path(ready).write_text("ready")
    time.sleep(600)
    raise SystemExit("not killed")


def save(args) -> None:
    import shutil

    import torch

    from alignment_core.models import load_causal_lm, load_tokenizer
    from alignment_core.store import ArtifactStore

    store = ArtifactStore(args.root, cache_dir=args.cache)
    model = load_causal_lm(args.model_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(args.step)
    if args.stall_after is not None:
        written = []
        if store.protocol in ("file", "local"):
            real_copytree = shutil.copytree

            def slowed(src, dst, *a, **k):
                if len(written) == args.stall_after:
                    stall(args.ready)
                written.append(dst)
                return shutil.copy2(src, dst, *a, **k)

            shutil.copytree = lambda src, dst, **k: real_copytree(src, dst, **{**k, "copy_function": slowed})
        else:
            real_put, fs = store.fs.put_file, store.fs

            def slowed(lpath, rpath, *a, **k):
                if len(written) == args.stall_after:
                    stall(args.ready)
                written.append(rpath)
                return real_put(lpath, rpath, *a, **k)

            fs.put_file = slowed
    store.save_checkpoint(model, load_tokenizer(args.model_dir), args.uri,
                          extra_files={"trainer_state.json": json.dumps({"step": args.step}).encode()})


def round_(args) -> None:
    from alignment_core.store import ArtifactStore
    from alignment_core.training import Trainer
    from tests.faults.test_mid_train import round_config, round_units
    from tests.test_training import make_units

    cfg = round_config()
    store = ArtifactStore(args.root, cache_dir=args.cache)
    trainer = Trainer(cfg, policy_path=args.model_dir, tokenizer_path=None, store=store)
    encoded = trainer.batch_factory.encode(make_units(round_units()))

    trained = []

    def progress(step, total, metrics):
        trained.append(step)
        if step == args.stall_at_step:
            stall(args.ready)

    result = trainer.train(encoded, store.checkpoint_uri("round", 1), store.stage_uri("round", 1, "metrics"),
                           progress_callback=progress)
    print(json.dumps({"steps": result.steps, "trained": trained}))


def stages(args) -> None:
    from alignment_core.store import ArtifactStore
    from tests.faults.test_kill_stages import run_stages

    if args.stall_before:
        real_write_bytes = ArtifactStore.write_bytes

        def stalling(store, uri, data):
            if uri.endswith(args.stall_before):
                stall(args.ready)
            return real_write_bytes(store, uri, data)

        ArtifactStore.write_bytes = stalling
    run_stages(args.root, args.model_dir, args.through)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("save")
    one.add_argument("root")
    one.add_argument("uri")
    one.add_argument("model_dir")
    one.add_argument("--step", type=int, default=1)
    one.add_argument("--stall-after", type=int)
    one.add_argument("--ready")
    one.add_argument("--cache", default="~/.cache/alignment_core")
    two = commands.add_parser("round")
    two.add_argument("root")
    two.add_argument("model_dir")
    two.add_argument("--stall-at-step", type=int)
    two.add_argument("--ready")
    two.add_argument("--cache", default="~/.cache/alignment_core")
    three = commands.add_parser("stages")
    three.add_argument("root")
    three.add_argument("model_dir")
    three.add_argument("--through", choices=["reweight", "evaluate"], required=True)
    three.add_argument("--stall-before")
    three.add_argument("--ready")
    args = parser.parse_args()
    {"save": save, "round": round_, "stages": stages}[args.command](args)


if __name__ == "__main__":
    main()
