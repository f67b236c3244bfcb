"""Direct Preference Optimization (Rafailov et al. 2023), as the book's chapter 7 bonus notebook
``dpo-from-scratch`` does it: pure PyTorch.

A preference pair is a prompt with a ``chosen`` and a ``rejected`` completion. The policy (the model
being tuned) and a frozen reference (the instruction model it starts from) each give every
completion a log-probability; the loss pushes the policy's chosen-minus-rejected margin above the
reference's:

    loss = -logsigmoid(beta * ((policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)))

averaged over the pairs. A completion's log-probability is the **mean** log-probability of its
scored tokens, as the book's ``compute_logprobs`` averages over the masked response tokens (not the
sum of the DPO paper): the prompt (up to and including the answer marker, ``### Response:``) and the
padding are never scored; the completion's tokens and the ``<|endoftext|>`` after it are (the book
scores no end token; the instruction model here learned to stop with one, and DPO keeps that). A
pair longer than the context loses the start of its prompt (``truncate_pair``), not its answers.

The rewards are the book's: ``policy - reference`` log-probability of each completion, detached
(the paper's implicit reward is ``beta`` times this). Reward margin = chosen - rejected reward;
reward accuracy = share of pairs with a positive reward margin. Preference accuracy = share of pairs
whose chosen completion the model itself scores higher (its own log-prob margin > 0; a tie is not a
preference): it needs no reference, so the instruction model and the DPO model are measured alike.

The reference model is frozen and the pairs are fixed, so its log-probabilities are computed once
(``pair_logprobs``) and carried with each pair; that equals the book's no-grad forward of the
reference on every batch, without repeating it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.instruct import InstructionExample, collate_instructions, encode_example, response_prompt
from llmcore.model import IGNORE_INDEX, GPTModel
from llmcore.prompts import preference_parts
from llmcore.tokenizer import ENDOFTEXT_ID


class PreferencePair(NamedTuple):
    chosen: InstructionExample
    rejected: InstructionExample
    reference: tuple[float, float] | None = None  # the reference model's (chosen, rejected) log-probs


class DPOLoss(NamedTuple):
    loss: torch.Tensor  # mean over the pairs
    chosen_rewards: torch.Tensor  # per pair, detached: policy - reference log-prob of the chosen completion
    rejected_rewards: torch.Tensor


def encode_pair(tokenizer, entry: Mapping, style: str = "alpaca") -> PreferencePair:
    """A preference entry's two completions after its prompt in ``style`` (``response_prompt``: the
    prompt the instruction model answers), each encoded as one text with its prompt tokens counted."""
    prompt_entry, chosen, rejected = preference_parts(entry)
    prompt = response_prompt(prompt_entry, style)
    return PreferencePair(encode_example(tokenizer, prompt, chosen), encode_example(tokenizer, prompt, rejected))


def truncate_pair(pair: PreferencePair, max_length: int) -> PreferencePair:
    """The pair fitted to ``max_length`` tokens: when a completion with its prompt is longer, the
    same leading prompt tokens are cut from both (one prompt token always stays, so each answer keeps
    its first token scored); what is still too long loses its end in ``collate_pairs`` (as the
    book's ``allowed_max_length`` cuts)."""
    longest = max(len(pair.chosen.token_ids), len(pair.rejected.token_ids))
    cut = min(longest - max_length, pair.chosen.prompt_length - 1, pair.rejected.prompt_length - 1)
    if cut <= 0:
        return pair
    chosen, rejected = (InstructionExample(ex.token_ids[cut:], ex.prompt_length - cut) for ex in pair[:2])
    return pair._replace(chosen=chosen, rejected=rejected)


def collate_pairs(
    batch: Sequence[PreferencePair],
    max_length: int | None = None,
    device: str | torch.device = "cpu",
    pad_id: int = ENDOFTEXT_ID,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, reference) of a batch of B pairs: inputs and targets (B, 2, tokens), the
    chosen completion at [:, 0] and the rejected at [:, 1], all padded together as
    ``collate_instructions`` pads with the prompt masked (-100 targets on prompt and padding);
    ``reference`` (B, 2) holds the pairs' reference log-probs (NaN where a pair carries none)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    examples = [example for pair in batch for example in (pair.chosen, pair.rejected)]
    inputs, targets = collate_instructions(
        examples, max_length=max_length, mask_prompt=True, device=device, pad_id=pad_id
    )
    nan = (float("nan"), float("nan"))
    reference = torch.tensor([pair.reference or nan for pair in batch], dtype=torch.float32, device=device)
    return inputs.view(len(batch), 2, -1), targets.view(len(batch), 2, -1), reference


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean log-probability of each row's scored targets (those not ``ignore_index``), from
    ``logits`` (rows, tokens, vocab) aligned with ``targets`` (rows, tokens): the book's
    ``compute_logprobs`` with its labels already shifted and its mask applied as -100 targets."""
    mask = targets != ignore_index
    token = torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1) / mask.sum(-1)


def policy_logprobs(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sequence_logprobs`` of ``model`` on a batch; a GPTModel runs its vocabulary head only at the
    scored positions (the logits of prompt and padding are never needed)."""
    if not isinstance(model, GPTModel):
        return sequence_logprobs(model(inputs), targets)
    mask = targets != IGNORE_INDEX
    logits = model.logits(model.hidden_states(inputs)[mask]).float()
    token = -F.cross_entropy(logits, targets[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    total = torch.zeros(len(inputs), dtype=token.dtype, device=token.device).index_add(0, rows, token)
    return total / mask.sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> DPOLoss:
    """The book's ``compute_dpo_loss`` (Eq. 7 of the DPO paper), with per-pair rewards."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    return DPOLoss(
        -F.logsigmoid(beta * logits).mean(),
        (policy_chosen - reference_chosen).detach(),
        (policy_rejected - reference_rejected).detach(),
    )


def batch_logprobs(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, 2) log-probs of a ``collate_pairs`` batch's chosen and rejected completions: one forward
    pass over all 2B sequences."""
    return policy_logprobs(model, inputs.flatten(0, 1), targets.flatten(0, 1)).view(len(inputs), 2)


def dpo_batch_loss(model: nn.Module, batch: Sequence[torch.Tensor], beta: float) -> torch.Tensor:
    """The training loss of a ``collate_pairs`` batch (a ``llmcore.train`` loss_fn once beta is bound)."""
    policy, reference = batch_logprobs(model, batch[0], batch[1]), batch[2]
    return dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta).loss


def pair_summary(
    chosen: torch.Tensor, rejected: torch.Tensor, reference: torch.Tensor | None = None, beta: float | None = None
) -> dict[str, float]:
    """Means over the pairs: ``preference_accuracy`` (the model's own chosen margin > 0) and
    ``logprob_margin``; with the reference's (chosen, rejected) log-probs (2, pairs) also the rewards,
    their margin, the reward accuracy and (with ``beta``) the DPO loss."""
    margin = chosen - rejected
    out = {"preference_accuracy": (margin > 0).float().mean().item(), "logprob_margin": margin.mean().item()}
    if reference is not None:
        result = dpo_loss(chosen, rejected, reference[0], reference[1], beta if beta is not None else 0.0)
        reward_margin = result.chosen_rewards - result.rejected_rewards
        out.update(
            chosen_reward=result.chosen_rewards.mean().item(),
            rejected_reward=result.rejected_rewards.mean().item(),
            reward_margin=reward_margin.mean().item(),
            reward_accuracy=(reward_margin > 0).float().mean().item(),
        )
        if beta is not None:
            out["dpo_loss"] = result.loss.item()
    return out


@torch.no_grad()
def preference_metrics(model: nn.Module, loader, _max_batches: int | None = None) -> dict[str, float]:
    """An ``eval_fn`` of ``llmcore.train``: ``pair_summary`` over the batches of ``loader``
    (``collate_pairs`` batches whose pairs carry reference log-probs), weighted by pair."""
    policy, reference = [], []
    device = next(model.parameters()).device
    for batch in loader:
        inputs, targets, refs = (t.to(device) for t in batch[:3])
        policy.append(batch_logprobs(model, inputs, targets).float()), reference.append(refs)
    if not policy:
        return {}
    policy, reference = torch.cat(policy), torch.cat(reference)
    return pair_summary(policy[:, 0], policy[:, 1], reference.T)


@torch.no_grad()
def pair_logprobs(
    model: nn.Module,
    pairs: Sequence[PreferencePair],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    pad_id: int = ENDOFTEXT_ID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (chosen, rejected) log-probs of every pair, in eval mode, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    try:
        for start in range(0, len(pairs), batch_size):
            inputs, targets, _ = collate_pairs(pairs[start : start + batch_size], max_length, device, pad_id)
            scores.append(batch_logprobs(model, inputs, targets).float().cpu())
    finally:
        model.train(was_training)
    scores = torch.cat(scores)
    return scores[:, 0], scores[:, 1]


def with_reference(
    pairs: Sequence[PreferencePair], chosen: torch.Tensor, rejected: torch.Tensor
) -> list[PreferencePair]:
    """The pairs carrying the reference model's log-probs (from ``pair_logprobs``)."""
    return [pair._replace(reference=(float(c), float(r))) for pair, c, r in zip(pairs, chosen, rejected)]
