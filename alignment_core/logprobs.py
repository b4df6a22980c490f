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
    packed: bool = False, one_row: bool = False,
):
    """Per-sequence log-prob of the tokens under `loss_mask`, summed, and how many tokens that is. The rows
    are right-padded.

    `packed`: one forward over every row's real tokens laid end to end (`packed_sequence_logps`), no padding.
    Else `rows_per_forward` > 0 runs the rows in length-sorted chunks of that many, each cut to its own longest
    row, where that removes enough padded tokens to pay for the extra forwards: the same log-probs and
    gradients with fewer padded tokens than one forward over all rows.
    """
    if packed:
        return packed_sequence_logps(model, token_ids, attention_mask, loss_mask, one_row)
    if not rows_per_forward or token_ids.shape[0] <= rows_per_forward:
        return _sequence_logps(model, token_ids, attention_mask, loss_mask)
    lengths = attention_mask.sum(dim=1)
    order = torch.argsort(lengths)
    chunks = order.split(rows_per_forward)
    widths = [int(lengths[rows].max()) for rows in chunks]  # each chunk cut to its own longest row
    saved = len(order) * max(widths) - sum(len(rows) * width for rows, width in zip(chunks, widths, strict=True))
    if saved < MIN_TOKENS_SAVED_PER_FORWARD * (len(chunks) - 1):
        return _sequence_logps(model, token_ids, attention_mask, loss_mask)
    pieces = []
    for rows, width in zip(chunks, widths, strict=True):
        pieces.append(_sequence_logps(model, token_ids[rows, :width], attention_mask[rows, :width],
                                      loss_mask[rows, :width]))
    restore = torch.argsort(order)
    return torch.cat([p[0] for p in pieces])[restore], torch.cat([p[1] for p in pieces])[restore]


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
