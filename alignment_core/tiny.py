"""A tiny Llama-style model and tokenizer, built locally in seconds, for tests and CPU demos.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on an English corpus generated here from a
fixed word list with a seeded RNG, and the model has random weights. The result is a normal
`save_pretrained` folder, so it loads through exactly the same `from_pretrained` path as a hub model.

`build_tiny_sft` is the demo's starting policy (`tiny://llama-sft`): the tiny model after a short SFT round on
bundled:sft. Random weights answer with byte soup that no reward can rank; after SFT the answers are sentences,
some with positive words and some without, which is what the demo's reward can move. It is built once into the
cache folder, in a folder named by a digest of what built it (recipe, data, base model), so a change to any of
them builds a new one instead of reusing a stale one.

    python -m alignment_core.tiny OUT_DIR [--kind reward_model] [--layers N]
    python -m alignment_core.tiny CACHE_DIR --sft       # prints the folder it built (or found) under CACHE_DIR
"""

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from alignment_core.rendering import render_prompt_ids, response_ids
from alignment_core.rewards import POSITIVE_WORDS  # the reward counts them; the corpus teaches them

log = logging.getLogger(__name__)

KINDS = ("causal_lm", "reward_model")
VOCAB_SIZE = 1024
MAX_LENGTH = 512

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"  # closes system and user turns; assistant turns close with EOS
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_MARKERS.values(), END_OF_TURN]

# Each turn is "<|role|>\n{content}" closed by <|end|> (EOS for the assistant), then a newline. A response
# sampled after the generation prompt therefore stops at EOS, the token the training batches append.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

NEGATIVE_WORDS = "bad sad angry terrible awful poor cold dark ugly wrong worst rude".split()
NOUNS = (
    "time year people way day man woman child world life hand part place case week company system "
    "program question work government number night point home water room mother area money story fact "
    "month lot right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city name team minute idea kid body information back parent "
    "face others level office door health person art war history party result change morning reason "
    "research girl guy moment air teacher force education food music garden river tree cat dog bird sun "
    "moon sky road school table window letter song picture movie weather answer problem model data plan"
).split()
VERBS = (
    "is was has had does said made went got knew took saw came thought looked wanted gave used found told "
    "asked worked seemed felt tried left called needed helped liked played moved lived believed brought "
    "wrote read learned kept began showed heard ran walked talked opened closed started finished built"
).split()
ADJECTIVES = (
    "new old little big long small large young important different early public bad same able last "
    "late hard major better economic strong possible whole free military true federal international "
    "full special easy clear recent certain personal open red difficult available likely short single "
    "simple quiet green blue white black quick slow"
).split()
FUNCTION_WORDS = (
    "the a an of to and in that it for on with as at by from this but or not we you they he she I my your "
    "our their very really so also just more most some many every each all what how why when where who"
).split()
QUESTIONS = [
    "What is a good way to start the day?",
    "How can I help my friend?",
    "Why is the sky blue?",
    "Can you tell me a story about a dog?",
    "What should I read next?",
    "How do I make a garden grow?",
    "Write a short poem about the sun.",
    "What is the best way to learn music?",
]


def _sentence(rng: random.Random) -> str:
    """One sentence of simple English; two in three carry a positive word, one in six a negative one."""
    words = [rng.choice(["The", "A", "My", "Our", "Every", "This"]), rng.choice(ADJECTIVES)]
    words += [rng.choice(NOUNS), rng.choice(VERBS), rng.choice(FUNCTION_WORDS), rng.choice(NOUNS)]
    roll = rng.random()
    if roll < 2 / 3:
        words += ["and", "it", "was", rng.choice(POSITIVE_WORDS)]
    elif roll < 5 / 6:
        words += ["but", "it", "was", rng.choice(NEGATIVE_WORDS)]
    return " ".join(words) + rng.choice([".", ".", "!", "?"])


def make_corpus(seed: int = 0, n_documents: int = 1500) -> list[str]:
    """The tokenizer's training text: short documents of sentences and questions, plus bare positive words."""
    rng = random.Random(seed)
    # Positive words also open documents, so that they are single tokens at the start of a response too.
    documents = [word for word in POSITIVE_WORDS for _ in range(100)]
    for _ in range(n_documents):
        sentences = [_sentence(rng) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.3:
            sentences.insert(0, rng.choice(QUESTIONS) + "\n")
        documents.append(" ".join(sentences))
    return documents


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (any text encodes; nothing is unknown) and wrap it for transformers."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(make_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[*ROLE_MARKERS.values(), END_OF_TURN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer, kind: str = "causal_lm", seed: int = 0, num_layers: int = 4):
    """A randomly initialised Llama; head_dim 64 because vLLM's CPU attention supports only some sizes."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(seed)
        if kind == "causal_lm":
            model = LlamaForCausalLM(config)
            model.generation_config.bos_token_id = tokenizer.bos_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        else:
            config.num_labels = 1
            model = LlamaForSequenceClassification(config)
    return model


def _build_record(kind: str, seed: int, num_layers: int) -> dict:
    return {"kind": kind, "seed": seed, "num_layers": num_layers, "vocab_size": VOCAB_SIZE}


BUILD_RECORD = "tiny_build.json"  # what was built, so a second build into the same folder can be checked


def build_tiny(out_dir: str | Path, kind: str = "causal_lm", seed: int = 0, num_layers: int = 4) -> Path:
    """Build the tiny model + tokenizer into `out_dir` and return it.

    The folder is written under a temporary sibling name and renamed into place, so concurrent builders
    never see half a model. A folder that already holds the same build is returned as is; one holding
    anything else is an error rather than silently reused.
    """
    def build():
        tokenizer = build_tokenizer(seed)
        return build_model(tokenizer, kind=kind, seed=seed, num_layers=num_layers), tokenizer

    return _publish(out_dir, _build_record(kind, seed, num_layers), build)


# The demo policy's SFT round: 4 epochs of bundled:sft (300 answers) at batch 16, 76 optimizer steps.
SFT_DATA = Path(__file__).parent / "bundled" / "sft.jsonl"
SFT_RECIPE = {"epochs": 4, "batch_size": 16, "learning_rate": 2e-3}


def build_tiny_sft(cache_dir: str | Path, seed: int = 0, num_layers: int = 4) -> Path:
    """The tiny causal LM after an SFT round on bundled:sft, built once into `cache_dir`/tiny-llama-sft-<key>.

    The key is a digest of the build record: the base build, the recipe, and the sha256 of the SFT data.
    """
    cache_dir = Path(cache_dir).expanduser()
    folder, record = sft_build(seed, num_layers)

    def build():
        log.info("building the demo policy once (tiny model + SFT on bundled:sft, %s) into %s", SFT_RECIPE,
                 cache_dir / folder)
        tokenizer = build_tokenizer(seed)
        model = build_model(tokenizer, seed=seed, num_layers=num_layers)
        rows = [json.loads(line) for line in SFT_DATA.read_text().splitlines() if line.strip()]
        _sft(model, tokenizer, rows, seed=seed, **SFT_RECIPE)
        return model, tokenizer

    return _publish(cache_dir / folder, record, build)


def sft_build(seed: int = 0, num_layers: int = 4) -> tuple[str, dict]:
    """(folder name, build record) of `build_tiny_sft`: the folder is tiny-llama-sft-<digest of the record>."""
    record = {**_build_record("causal_lm", seed, num_layers), "sft": {
        **SFT_RECIPE, "data": SFT_DATA.name, "data_sha256": hashlib.sha256(SFT_DATA.read_bytes()).hexdigest()}}
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    return f"tiny-llama-sft-{key}", record


def _sft(model, tokenizer, rows: list[dict], seed: int, epochs: int, batch_size: int, learning_rate: float) -> None:
    """Next-token loss on each completion (not its prompt), rendered as the pipeline renders a response: the
    chat template's prompt, then the completion and its end-of-turn token, the one sampling stops at."""
    examples = []
    for row in rows:
        prompt = render_prompt_ids(tokenizer, [{"role": "user", "content": row["prompt"]}])
        examples.append((prompt, response_ids(tokenizer, row["completion"])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(examples)).tolist()
            for start in range(0, len(order), batch_size):
                batch = [examples[i] for i in order[start:start + batch_size]]
                width = max(len(prompt) + len(response) for prompt, response in batch)
                input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
                labels = torch.full((len(batch), width), -100)  # -100: no loss (prompt and padding)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, (prompt, response) in enumerate(batch):
                    ids = prompt + response
                    input_ids[row, :len(ids)] = torch.tensor(ids)
                    labels[row, len(prompt):len(ids)] = torch.tensor(response)
                    mask[row, :len(ids)] = 1
                model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    model.eval()


def _publish(out_dir: str | Path, record: dict, build) -> Path:
    """`build()`'s (model, tokenizer) saved into `out_dir` with its record; a folder already there is checked
    against the record instead (see `build_tiny`)."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists():
        return _check_existing(out_dir, record)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build()
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / BUILD_RECORD).write_text(json.dumps(record, indent=2))
        staging.chmod(0o755)  # mkdtemp makes it private; the built model is meant to be shared
        os.rename(staging, out_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if out_dir.exists():  # another process won the race with the same deterministic build
            return _check_existing(out_dir, record)
        raise
    return out_dir


def _check_existing(out_dir: Path, record: dict) -> Path:
    record_path = out_dir / BUILD_RECORD
    existing = json.loads(record_path.read_text()) if record_path.exists() else None
    if existing != record:
        raise FileExistsError(
            f"{out_dir} already exists and is not a tiny build of {record} (found {existing}); "
            "choose another folder or remove it"
        )
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny Llama model and tokenizer into a folder.")
    parser.add_argument("out_dir", help="the model's folder; with --sft, the cache folder to build it under")
    parser.add_argument("--kind", choices=KINDS, default="causal_lm")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", action="store_true", help="the demo policy: the causal LM after SFT on bundled:sft")
    args = parser.parse_args(argv)
    if args.sft:
        print(build_tiny_sft(args.out_dir, seed=args.seed, num_layers=args.layers))
    else:
        print(build_tiny(args.out_dir, kind=args.kind, seed=args.seed, num_layers=args.layers))


if __name__ == "__main__":
    main()
