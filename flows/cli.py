"""The `alignment-core` command: every entry point of the project under one name.

    alignment-core run --config configs/tiny.yaml           # the online flow (python -m flows.iterative_dpo)
    alignment-core offline sft --config configs/sft.yaml    # sft | reward-model | offline-preference
    alignment-core inspect ./runs/tiny                      # stages, row counts, metrics, the learning plot
    alignment-core merge CHECKPOINT OUT                     # an adapter checkpoint merged into full weights
    alignment-core serve --config my.yaml --name nightly    # serve a config as a deployment (PREFECT_API_URL)

`alignment-core COMMAND --help` describes each command's options.
"""

import sys

COMMANDS = {
    "run": "run the online iterative-dpo pipeline in ephemeral Prefect",
    "offline": "run an offline flow: sft, reward-model or offline-preference",
    "inspect": "look inside a run or a store: stages, row counts, metrics, the learning plot",
    "merge": "merge a LoRA adapter checkpoint into full weights (a folder from_pretrained loads)",
    "serve": "serve a config (or the bundled ones) as deployments from this process (needs a Prefect server)",
}


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {what}" for name, what in COMMANDS.items()]
        print(__doc__.strip() + "\n\ncommands:\n" + "\n".join(lines))
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    prog = f"alignment-core {command}"
    if command == "run":
        from flows.iterative_dpo import main as run

        run(rest, prog)
    elif command == "offline":
        from flows.offline import main as offline

        offline(rest, prog)
    elif command == "inspect":
        from alignment_core.inspect import main as inspect

        sys.exit(_until_the_reader_leaves(lambda: inspect(rest, prog)))
    elif command == "merge":
        from alignment_core.merge import main as merge

        merge(rest, prog)
    else:
        from flows.serve import main as serve

        serve(rest, prog)
        return
    if from_command_line:  # a finished run or offline command: skip the interpreter's seconds-long teardown
        from flows.fast_start import exit_now

        exit_now()


def _until_the_reader_leaves(command) -> int:
    """`command()`'s exit code; when the reader of its output leaves early (`| head`), exit quietly as other
    commands do: stdout is pointed at /dev/null so that the interpreter's final flush fails no more."""
    import os

    try:
        code = command()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    main()
