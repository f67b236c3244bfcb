"""llmcore.dpo: the loss and log-probs against the book's formulation (dpo-from-scratch), the
masking of prompt and padding, and a tiny DPO run that learns its pairs' preferences."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from llmcore.config import GPTConfig
from llmcore.dpo import (
    collate_pairs,
    dpo_batch_loss,
    dpo_loss,
    encode_pair,
    pair_logprobs,
    pair_summary,
    policy_logprobs,
    preference_metrics,
    sequence_logprobs,
    truncate_pair,
    with_reference,
)
from llmcore.model import GPTModel
from llmcore.prompts import format_input
from llmcore.tokenizer import ENDOFTEXT, ENDOFTEXT_ID
from llmcore.train import train
from tests.trainer_params import train_config

PAIRS = [
    {
        "instruction": "Name a primary color.",
        "input": "",
        "chosen": "Red is a primary color.",
        "rejected": "Red, obviously.",
    },
    {
        "instruction": "Edit the sentence.",
        "input": "He go home.",
        "chosen": "He goes home.",
        "rejected": "He goes home, duh.",
    },
    {"instruction": "Give a synonym of fast.", "input": "", "chosen": "Quick.", "rejected": "Speedy, come on."},
    {"instruction": "What is 2 + 2?", "input": "", "chosen": "2 + 2 is 4.", "rejected": "Obviously 4."},
]


def book_logprobs(logits: torch.Tensor, labels: torch.Tensor, selection_mask: torch.Tensor) -> torch.Tensor:
    """The book's compute_logprobs, written out from its definition: logits and labels shifted by
    one, log-softmax, the labels' log-probs gathered, the mean over the positions the mask keeps."""
    log_probs = F.log_softmax(logits[:, :-1, :], dim=-1)
    picked = torch.gather(log_probs, -1, labels[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = selection_mask[:, 1:].float()
    return (picked * mask).sum(-1) / mask.sum(-1)


def book_dpo_loss(pc, pr, rc, rr, beta):
    """The book's compute_dpo_loss: the mean loss and the mean (unscaled, detached) rewards."""
    losses = -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))
    return losses.mean(), (pc - rc).detach().mean(), (pr - rr).detach().mean()


def tiny_model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=128)).eval()


def test_sequence_logprobs_equal_the_books_mean_over_masked_tokens() -> None:
    torch.manual_seed(1)
    logits, labels = torch.randn(3, 7, 11, dtype=torch.float64), torch.randint(0, 11, (3, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    targets = labels[:, 1:].masked_fill(~mask[:, 1:], -100)  # the mask as -100 targets, already shifted
    ours = sequence_logprobs(logits[:, :-1], targets).double()
    torch.testing.assert_close(ours, book_logprobs(logits, labels, mask), atol=1e-6, rtol=0)
    # A mean, not a sum: row 2 scores one token, so its value is that token's log-prob.
    assert abs(ours[2] - F.log_softmax(logits[2, 3].float(), -1)[labels[2, 4]]) < 1e-6


def test_dpo_loss_and_rewards_equal_the_books_on_fixed_tensors() -> None:
    pc, pr = torch.tensor([-1.2, -0.7, -2.5, -0.1]), torch.tensor([-1.9, -0.4, -2.6, -3.0])
    rc, rr = torch.tensor([-1.5, -0.9, -2.4, -0.3]), torch.tensor([-1.7, -0.5, -2.0, -2.2])
    for beta in (0.1, 0.5):
        result = dpo_loss(pc, pr, rc, rr, beta)
        loss, chosen, rejected = book_dpo_loss(pc, pr, rc, rr, beta)
        assert abs(result.loss.item() - loss.item()) < 1e-6
        assert abs(result.chosen_rewards.mean().item() - chosen.item()) < 1e-6
        assert abs(result.rejected_rewards.mean().item() - rejected.item()) < 1e-6
    # Policy == reference: log(2), zero rewards (the book's first evaluation prints 0.6931).
    same = dpo_loss(pc, pr, pc, pr, 0.1)
    assert abs(same.loss.item() - 0.693147) < 1e-6 and same.chosen_rewards.abs().max() == 0


def test_policy_logprobs_head_at_scored_positions_equals_full_logits(tokenizer) -> None:
    model = tiny_model()
    inputs, targets, _ = collate_pairs([encode_pair(tokenizer, entry) for entry in PAIRS])
    inputs, targets = inputs.flatten(0, 1), targets.flatten(0, 1)
    with torch.no_grad():
        full = sequence_logprobs(model(inputs), targets)
        fast = policy_logprobs(model, inputs, targets)
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=0)


def test_masking_scores_only_the_answer_and_its_end_token(tokenizer) -> None:
    pairs = [encode_pair(tokenizer, entry) for entry in PAIRS[:2]]
    inputs, targets, reference = collate_pairs(pairs)
    assert (
        inputs.shape[:2] == targets.shape[:2] == (2, 2) and reference.shape == (2, 2) and torch.isnan(reference).all()
    )
    for p in range(2):
        for k, kind in enumerate(("chosen", "rejected")):
            row_in, row_t = inputs[p, k], targets[p, k]
            scored = row_t[row_t != -100].tolist()
            assert tokenizer.decode(scored) == PAIRS[p][kind] + ENDOFTEXT  # no prompt, marker or padding token
            first = (row_t != -100).nonzero()[0, 0].item()
            prompt = tokenizer.decode(row_in[: first + 1].tolist())
            assert prompt == format_input(PAIRS[p]) + "\n\n### Response:\n"  # everything before is prompt
            # The padding after the row's end token is never scored.
            n_tokens = len(getattr(pairs[p], kind).token_ids)
            assert (row_in[n_tokens:] == ENDOFTEXT_ID).all() and (row_t[n_tokens:] == -100).all()
    assert inputs.shape[-1] > min(len(p.chosen.token_ids) for p in pairs)  # some row is padded


def test_a_chat_prompt_scores_the_same_answer_tokens_as_its_alpaca_twin(tokenizer) -> None:
    chat = {
        "prompt": [{"role": "user", "content": "Name a primary color."}],
        "chosen": [{"role": "assistant", "content": "Red is a primary color."}],
        "rejected": "Red, obviously.",
    }
    alpaca, chatted = encode_pair(tokenizer, PAIRS[0]), encode_pair(tokenizer, chat)
    assert chatted == alpaca  # a one-turn chat renders as the book's prompt with an empty input


def test_a_long_pair_loses_the_same_prompt_start_never_its_answers(tokenizer) -> None:
    pair = encode_pair(tokenizer, PAIRS[1])
    longest = max(len(pair.chosen.token_ids), len(pair.rejected.token_ids))
    assert truncate_pair(pair, longest) is pair
    cut = truncate_pair(pair, longest - 5)
    for before, after in zip(pair, cut[:2]):
        assert after.token_ids == before.token_ids[5:] and after.prompt_length == before.prompt_length - 5
    tiny = truncate_pair(pair, 3)  # shorter than the answers: one prompt token stays before each
    assert tiny.chosen.prompt_length == 1 and tiny.rejected.prompt_length == 1
    _, targets, _ = collate_pairs([tiny], max_length=3)
    assert (targets != -100).sum(-1).min() >= 1  # every answer keeps a scored token


def test_a_tiny_dpo_run_raises_preference_accuracy_on_its_pairs(tokenizer) -> None:
    reference = tiny_model()
    pairs = [encode_pair(tokenizer, entry) for entry in PAIRS]
    pairs = with_reference(pairs, *pair_logprobs(reference, pairs))
    before = pair_summary(*pair_logprobs(reference, pairs))
    policy = tiny_model()
    config = train_config(
        epochs=30,
        batch_size=2,
        lr=3e-3,
        eval_every=0,
        eval_batches=None,
        progress=False,
        grad_clip=1.0,
        weight_decay=0.0,
    )
    state = train(
        policy,
        pairs,
        pairs,
        config,
        loss_fn=functools.partial(dpo_batch_loss, beta=0.5),
        eval_fn=preference_metrics,
        collate_fn=collate_pairs,
    )
    after = pair_summary(
        *pair_logprobs(policy, pairs), reference=torch.stack(pair_logprobs(reference, pairs)), beta=0.5
    )
    assert before["preference_accuracy"] < 1.0 and after["preference_accuracy"] == 1.0
    assert after["reward_margin"] > 0 and after["dpo_loss"] < 0.693
    first, last = state.history[0], state.history[-1]
    assert last["train_loss"] < first["train_loss"] and last["train_reward_margin"] > first["train_reward_margin"]
    assert abs(last["train_loss"] - after["dpo_loss"]) < 1e-5  # the loop's evaluation is the pairs' DPO loss
    assert last["val_preference_accuracy"] == 1.0
