"""Log-prob kernels: the summed log-probability of each sequence's response tokens under a causal LM, and the
inputs they are computed on. The Trainer (policy and reference log-probs) and reweighting (importance weights)
both call them; they live apart from the Trainer so that neither stage's code depends on the other's.
"""

import torch
import torch.nn.functional as F

from alignment_core.batches import response_mask

# Splitting a micro-batch pays only if each extra forward removes this many padded tokens (a forward has a fixed
# cost): rows of similar lengths stay in one forward, rows of varied lengths split. How 64 was chosen, measured:
# docs/benchmarks.md (DPO training throughput).
MIN_TOKENS_SAVED_PER_FORWARD = 64


def sequence_logps(
    model, token_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, rows_per_forward: int = 0,
    packed: bool = False, one_row: bool = False, prefix_sharing: bool = False, additive_mask: torch.dtype | None = None,
):
    """Per-sequence log-prob of the tokens under `loss_mask`, summed, and how many tokens that is. The rows
    are right-padded.

    `packed`: one forward over every row's real tokens laid end to end (`packed_sequence_logps`), no padding.
    `prefix_sharing`, where rows i and i + n are two responses to one prompt (`shared_prompts`): one sequence per
    pair, its prompt computed once (`prefix_shared_sequence_logps`; `additive_mask`: the dtype of the additive
    mask eager attention takes, None for sdpa's boolean one). Else padded rows. Either way `rows_per_forward` > 0
    runs the sequences in length-sorted chunks of that many, each cut to its own longest, where that removes
    enough padded tokens to pay for the extra forwards: the same log-probs and gradients with fewer padded tokens
    than one forward over all of them.
    """
    if packed:
        return packed_sequence_logps(model, token_ids, attention_mask, loss_mask, one_row)
    if prefix_sharing and shared_prompts(token_ids, loss_mask):
        return prefix_shared_sequence_logps(model, token_ids, attention_mask, loss_mask, rows_per_forward,
                                            additive_mask)
    lengths = attention_mask.sum(dim=1)
    pieces, order = [], []
    for rows in forward_chunks(lengths, rows_per_forward):
        width = int(lengths[rows].max())  # each chunk cut to its own longest row
        pieces.append(_sequence_logps(model, token_ids[rows, :width], attention_mask[rows, :width],
                                      loss_mask[rows, :width]))
        order.append(rows)
    restore = torch.argsort(torch.cat(order))
    return torch.cat([p[0] for p in pieces])[restore], torch.cat([p[1] for p in pieces])[restore]


def forward_chunks(widths: torch.Tensor, per_forward: int) -> list[torch.Tensor]:
    """The sequences of each forward: all in one, or (`per_forward` > 0) length-sorted chunks of that many where,
    each chunk cut to its own longest sequence, that removes `MIN_TOKENS_SAVED_PER_FORWARD` padded tokens per
    extra forward."""
    everything = [torch.arange(len(widths), device=widths.device)]
    if not per_forward or len(widths) <= per_forward:
        return everything
    chunks = torch.argsort(widths).split(per_forward)
    longest = [int(widths[rows].max()) for rows in chunks]
    saved = len(widths) * max(longest) - sum(len(rows) * width for rows, width in zip(chunks, longest, strict=True))
    return list(chunks) if saved >= MIN_TOKENS_SAVED_PER_FORWARD * (len(chunks) - 1) else everything


def _sequence_logps(model, token_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor):
    """One forward. Position t predicts token t + 1, so only positions from the earliest response start on
    need logits: `logits_to_keep` skips the LM head on the prompt part shared by every row."""
    length = token_ids.shape[1]
    first_response = int(loss_mask.float().argmax(dim=1).min())
    keep = length - max(first_response - 1, 0)
    logits = model(input_ids=token_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False).logits
    labels = token_ids[:, length - keep + 1 :]
    mask = loss_mask[:, length - keep + 1 :].to(logits.dtype)
    token_logps = -F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels.flatten(), reduction="none"
    ).view_as(labels)
    return (token_logps * mask).sum(dim=1), mask.sum(dim=1)


def packed_sequence_logps(model, token_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                          one_row: bool = False):
    """Padding-free: the sequences laid end to end, position ids restarting at 0 at each one.

    transformers reads the restarts as sequence boundaries (a block-diagonal causal mask for sdpa and eager,
    variable-length kernels for flash attention), so no token attends across sequences and the log-probs are
    those of separate forwards; `Trainer.setup` checks that once per round for the model at hand. With
    `one_row` everything is one row (flash attention: its cost is the sum of the sequences' own); otherwise
    the sequences are packed, longest first, into as few rows as the longest one's length allows (first-fit
    decreasing), so attention over each row costs what a padded row costs but there are fewer rows than
    sequences. The rest of a row is filler in a block of its own, never scored.
    """
    lengths = attention_mask.sum(dim=1).tolist()
    width = sum(lengths) if one_row else max(lengths)
    rows: list[list[int]] = []  # the sequences in each row
    room: list[int] = []
    for sequence in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[sequence]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(sequence)
        room[row] -= lengths[sequence]
    device = token_ids.device
    packed = torch.zeros((len(rows), width), dtype=token_ids.dtype, device=device)  # filler: token 0
    positions = torch.zeros_like(packed)
    where = []  # (sequence, row, offset)
    for r, sequences in enumerate(rows):
        offset = 0
        for sequence in sequences:
            n = lengths[sequence]
            packed[r, offset : offset + n] = token_ids[sequence, :n]
            positions[r, offset : offset + n] = torch.arange(n, device=device)
            where.append((sequence, r, offset))
            offset += n
        positions[r, offset:] = torch.arange(width - offset, device=device)  # filler: a block of its own
    # The log-prob of response token j of a sequence comes from the logits one position earlier.
    sequence_of, row_of, column_of, target_of = [], [], [], []
    for sequence, r, offset in where:
        response = loss_mask[sequence, : lengths[sequence]].nonzero().squeeze(1)  # never position 0
        sequence_of.append(torch.full_like(response, sequence))
        row_of.append(torch.full_like(response, r))
        column_of.append(offset + response - 1)
        target_of.append(token_ids[sequence, response])
    sequence_of, row_of, column_of, targets = (torch.cat(x) for x in (sequence_of, row_of, column_of, target_of))
    keep = column_of if len(rows) == 1 else 0  # one row: the LM head only where a response token is predicted
    logits = model(input_ids=packed, position_ids=positions, logits_to_keep=keep, use_cache=False).logits
    picked = logits[0] if len(rows) == 1 else logits[row_of, column_of]
    token_logps = -F.cross_entropy(picked.float(), targets, reduction="none")
    sums = torch.zeros(len(lengths), device=device).index_add(0, sequence_of, token_logps)
    counts = torch.zeros(len(lengths), device=device).index_add(0, sequence_of, torch.ones_like(token_logps))
    return sums, counts


def shared_prompts(token_ids: torch.Tensor, loss_mask: torch.Tensor) -> bool:
    """Whether row i and row i + n (n: half the rows, the two responses of one prompt) start with the same
    prompt: the same tokens up to the same first response token (a prompt truncated to fit one response
    differs), of at least one token."""
    n = token_ids.shape[0] // 2
    if n == 0 or token_ids.shape[0] != 2 * n:
        return False
    starts = loss_mask.float().argmax(dim=1)
    if not torch.equal(starts[:n], starts[n:]) or bool((starts < 1).any()):  # (a first token has no predictor)
        return False
    before = torch.arange(token_ids.shape[1], device=token_ids.device)[None, :] < starts[:n, None]
    return bool(((token_ids[:n] == token_ids[n:]) | ~before).all())


def prefix_shared_sequence_logps(model, token_ids: torch.Tensor, attention_mask: torch.Tensor,
                                 loss_mask: torch.Tensor, pairs_per_forward: int = 0,
                                 additive_mask: torch.dtype | None = None):
    """`sequence_logps` of rows that are pairs (row i and row i + n: two responses to one prompt,
    `shared_prompts`), each prompt computed once. A pair is one sequence, prompt + response 1 + response 2: response
    2 sees the prompt and itself but not response 1 (a block mask), and its positions continue from the prompt's,
    so that every token has the context and position it has in its own row, and the log-probs and gradients are
    the padded rows'. What it leaves out is the second copy of each prompt (measured: docs/benchmarks.md)."""
    n = token_ids.shape[0] // 2
    lengths = attention_mask.sum(dim=1).tolist()
    starts = loss_mask.float().argmax(dim=1).tolist()
    widths = torch.tensor([lengths[j] + lengths[j + n] - starts[j] for j in range(n)])
    sums = torch.zeros(2 * n, device=token_ids.device)
    counts = torch.zeros(2 * n, device=token_ids.device)
    for pairs in forward_chunks(widths, pairs_per_forward):
        token_logps, scored, sequence_of = _prefix_shared_forward(
            model, token_ids, loss_mask, pairs.tolist(), n, lengths, starts, additive_mask)
        sums = sums.index_add(0, sequence_of, token_logps * scored)
        counts = counts.index_add(0, sequence_of, scored)
    return sums, counts


PROMPT, FIRST, SECOND, FILLER = range(4)  # the parts of a shared-prompt sequence


def _prefix_shared_forward(model, token_ids, loss_mask, pairs: list[int], n: int, lengths: list[int],
                           starts: list[int], additive_mask: torch.dtype | None):
    """One forward over `pairs` as prompt + response 1 + response 2 rows; the log-prob of every response token,
    whether it is scored (`loss_mask`), and its sequence (row of `token_ids`)."""
    device = token_ids.device
    width = max(lengths[j] + lengths[j + n] - starts[j] for j in pairs)
    ids = torch.zeros((len(pairs), width), dtype=token_ids.dtype, device=device)
    positions = torch.zeros_like(ids)
    part = torch.full_like(ids, FILLER)
    sequence_of, row_of, column_of, targets, scored = [], [], [], [], []
    for row, j in enumerate(pairs):
        prompt, first, second = starts[j], lengths[j] - starts[j], lengths[j + n] - starts[j]
        ids[row, :prompt] = token_ids[j, :prompt]
        ids[row, prompt : prompt + first] = token_ids[j, prompt : lengths[j]]
        ids[row, prompt + first : prompt + first + second] = token_ids[j + n, prompt : lengths[j + n]]
        positions[row, : prompt + first] = torch.arange(prompt + first, device=device)
        positions[row, prompt + first : prompt + first + second] = torch.arange(prompt, prompt + second, device=device)
        part[row, :prompt], part[row, prompt : prompt + first] = PROMPT, FIRST
        part[row, prompt + first : prompt + first + second] = SECOND
        # Response token t of a sequence is predicted at the position before it: the prompt's last token for t = 0
        for sequence, offset, count in ((j, prompt, first), (j + n, prompt + first, second)):
            if count == 0:
                continue
            columns = torch.arange(offset, offset + count, device=device) - 1
            columns[0] = prompt - 1
            sequence_of.append(torch.full((count,), sequence, device=device))
            row_of.append(torch.full((count,), row, device=device))
            column_of.append(columns)
            targets.append(token_ids[sequence, prompt : prompt + count])
            scored.append(loss_mask[sequence, prompt : prompt + count])
    index = torch.arange(width, device=device)
    query, key = part[:, :, None], part[:, None, :]
    mask = (index[None, :] <= index[:, None]) & (key != FILLER) & ~((query == SECOND) & (key == FIRST))
    mask |= torch.eye(width, dtype=torch.bool, device=device) & (query == FILLER)  # filler: attends to itself only
    sequence_of, row_of, column_of, targets = (torch.cat(x) for x in (sequence_of, row_of, column_of, targets))
    scored = torch.cat(scored).to(torch.float32)
    keep = width - int(column_of.min())  # the LM head only from the first position that predicts a response token
    mask = mask[:, None]  # [rows, heads (all alike), query, key]: passed to the attention as it is
    if additive_mask is not None:  # eager attention adds its mask to the scores
        mask = torch.zeros(mask.shape, dtype=additive_mask, device=device).masked_fill(
            ~mask, torch.finfo(additive_mask).min)
    logits = model(input_ids=ids, position_ids=positions, attention_mask=mask, logits_to_keep=keep,
                   use_cache=False).logits
    picked = logits[row_of, column_of - (width - keep)]
    return -F.cross_entropy(picked.float(), targets, reduction="none"), scored, sequence_of


def _pad_to(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(tensor, (0, length - tensor.shape[1]), value=value)


def concatenated_inputs(batch: dict, names: tuple[str, ...], pad_token_id: int):
    """Token ids, attention mask and response mask of the named generations stacked along the batch."""
    length = max(batch[f"{name}_token_ids"].shape[1] for name in names)
    token_ids = torch.cat([_pad_to(batch[f"{name}_token_ids"], length, pad_token_id) for name in names])
    attention = torch.cat([_pad_to(batch[f"{name}_attention_mask"], length, 0) for name in names])
    responses = torch.cat([_pad_to(response_mask(batch, name).long(), length, 0) for name in names]).bool()
    return token_ids, attention, responses


def mismatched_inputs(token_ids, attention_mask, loss_mask, pad_token_id: int, max_length: int):
    """KTO's KL pairs: the prompt of row i + 1 followed by the response of row i (cyclically), right padded."""
    rows = token_ids.shape[0]
    sequences, response_lengths = [], []
    for row in range(rows):
        partner = (row + 1) % rows
        prompt = token_ids[partner][attention_mask[partner].bool() & ~loss_mask[partner]]
        response = token_ids[row][loss_mask[row]][: max(max_length - len(prompt), 1)]
        sequences.append(torch.cat([prompt, response]))
        response_lengths.append(len(response))
    length = max(len(s) for s in sequences)
    ids = torch.full((rows, length), pad_token_id, dtype=token_ids.dtype, device=token_ids.device)
    attention = torch.zeros_like(ids)
    responses = torch.zeros_like(ids, dtype=torch.bool)
    for row, (sequence, response_length) in enumerate(zip(sequences, response_lengths, strict=True)):
        ids[row, : len(sequence)] = sequence
        attention[row, : len(sequence)] = 1
        responses[row, len(sequence) - response_length : len(sequence)] = True
    return ids, attention, responses
