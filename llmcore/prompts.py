"""Prompt formats for instruction fine-tuning, and reading a response back.

Data preparation, fine-tuning and evaluation must agree on this text to the character, so it
lives in one place. An entry is Alpaca-style (``instruction``, ``input``, ``output``) or a chat
(``messages``: an optional ``system`` turn, then ``user`` and ``assistant`` turns, ending with the
answer). A prompt style renders either:

- ``alpaca`` (the book): the preamble (or the system message), ``### Instruction:`` for user turns
  (plus ``### Input:`` for an Alpaca entry's input), ``### Response:`` before each answer;
- ``phi3``: Phi-3's turn markers ``<|system|>``, ``<|user|>``, ``<|assistant|>`` (book exercise 7.1).

A model is prompted in one of those, or ``plain`` (a pretrained model: the text, continued) or
``template`` (a Hugging Face base: its tokenizer's own chat template). Which one is the
checkpoint's ``prompt_style``, read by ``checkpoint_prompt_style``: the one lookup ``llm chat``,
serving, scoring and the MLflow pyfunc share.

A single-turn chat in ``alpaca`` style is exactly the book's prompt with an empty input. Every
answer but the last ends with ``<|endoftext|>``, so a model learns to stop after each of its turns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llmcore.tokenizer import ENDOFTEXT

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
RESPONSE_MARKER = "### Response:"
PROMPT_STYLES = ("alpaca", "phi3")  # what instruction data is rendered in for fine-tuning
CHAT_STYLES = (*PROMPT_STYLES, "plain", "template")  # every style a model is prompted in
# Checkpoints written before every stage recorded its ``prompt_style`` (issue 24): the style by the
# ``stage`` their config.json names; one naming another stage, or none, was an instruction model.
LEGACY_STAGE_STYLES = {"pretrain": "plain", "load_gpt2": "plain", "adapt_pretrain": "plain", "load_base": "template"}
# What precedes a turn's content, per style and role.
_HEADERS = {
    "alpaca": {"system": "", "user": "\n\n### Instruction:\n", "assistant": f"\n\n{RESPONSE_MARKER}\n"},
    "phi3": {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"},
}
_ANSWER_MARKERS = {"alpaca": RESPONSE_MARKER, "phi3": "<|assistant|>"}


def format_input(entry: Mapping[str, str]) -> str:
    """The prompt: preamble, instruction, and the input section only when the input is non-empty."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_response(entry: Mapping[str, str]) -> str:
    """The target the model learns to continue the prompt with."""
    return f"\n\n{RESPONSE_MARKER}\n{entry['output']}"


def turns(entry: Mapping) -> list[tuple[str, str]]:
    """(role, content) of each turn; an Alpaca entry is one user turn (instruction, then its input)
    and the answer (empty when the entry has no ``output`` yet)."""
    if "messages" in entry:
        return [(m["role"], m["content"]) for m in entry["messages"]]
    user = entry["instruction"] + (f"\n{entry['input']}" if entry.get("input") else "")
    return [("user", user), ("assistant", entry.get("output", ""))]


def check_style(style: str) -> str:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    return style


def segments(entry: Mapping, style: str = "alpaca") -> list[tuple[str, bool]]:
    """The entry's whole training text as (text, is_answer) pieces, in order; the last is the last
    answer's content. An answer's marker (``### Response:``) counts as answer, as in the book's
    training text (``format_input`` is the prompt, ``format_response`` the target)."""
    headers = _HEADERS[check_style(style)]
    if style == "alpaca" and "messages" not in entry:
        return [(format_input(entry), False), (headers["assistant"], True), (entry.get("output", ""), True)]
    conversation = turns(entry)
    parts: list[tuple[str, bool]] = []
    if style == "alpaca" and conversation[0][0] != "system":
        parts.append((PREAMBLE, False))
    for i, (role, content) in enumerate(conversation):
        header = headers[role] if style == "alpaca" or i == 0 else "\n" + headers[role]
        if role != "assistant":
            parts.append((header + content, False))
            continue
        parts.append((header, True))
        parts.append((content + ("" if i == len(conversation) - 1 else ENDOFTEXT), True))
    return parts


def response_prompt(entry: Mapping, style: str = "alpaca") -> str:
    """The prompt up to and including the last answer's marker, so the model answers right away.

    Same text as the training example minus the last answer, so generation and the response-only
    loss see exactly the tokens the model was trained on.
    """
    return "".join(text for text, _ in segments(entry, style)[:-1])


def checkpoint_prompt_style(meta: Mapping) -> str:
    """The style a checkpoint is prompted in, from its metadata (``llmcore.checkpoint.read_checkpoint_meta``):
    its ``prompt_style``, which every stage writing a checkpoint records; for an older checkpoint
    without one, ``LEGACY_STAGE_STYLES`` by its ``stage``, else ``alpaca``."""
    style = meta.get("prompt_style") or LEGACY_STAGE_STYLES.get(meta.get("stage"), "alpaca")
    if style not in CHAT_STYLES:
        raise ValueError(f"the checkpoint's prompt_style must be one of {CHAT_STYLES}, got {style!r}")
    return style


def chat_prompt(messages: Sequence[tuple[str, str]], style: str = "alpaca") -> str:
    """The prompt for (role, content) chat messages in ``style`` (``template`` is the tokenizer's own:
    ``HFTokenizer.apply_chat_template``); ValueError for messages the style cannot render.

    ``alpaca``: the last message, a user's, is the instruction; earlier ones, the system's included,
    become the input section as ``role: content`` lines, so a single question gives exactly the
    fine-tuning prompt. ``phi3``: the turns with their markers (an optional system turn, then user
    and assistant turns in alternation, ending with the user's). ``plain``: the contents joined by
    newlines, continued as text.
    """
    if not messages:
        raise ValueError("messages must not be empty")
    if style == "plain":
        return "\n".join(content for _, content in messages)
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {CHAT_STYLES[:-1]} here, got {style!r}")
    role, instruction = messages[-1]
    if role != "user":
        raise ValueError(f"the last message must be the user's, got role {role!r}")
    if style == "alpaca":
        context = "\n".join(f"{r}: {c}" for r, c in messages[:-1])
        return response_prompt({"instruction": instruction, "input": context}, style)
    chat = [{"role": r, "content": c} for r, c in messages] + [{"role": "assistant", "content": ""}]
    problem = chat_roles_error([m["role"] for m in chat])
    if problem:
        raise ValueError(problem)
    return response_prompt({"messages": chat}, style)


def reference(entry: Mapping) -> str:
    """The answer the entry expects: the last assistant turn (an Alpaca entry's ``output``)."""
    return turns(entry)[-1][1]


def prompt_text(entry: Mapping) -> str:
    """The question as a person reads it (for a judge or a log): the book's prompt for an Alpaca
    entry, ``role: content`` lines of the turns before the answer for a chat."""
    if "messages" not in entry:
        return format_input(entry)
    return "\n".join(f"{role}: {content}" for role, content in turns(entry)[:-1])


def extract_response(generated_text: str, prompt: str, style: str = "alpaca") -> str:
    """The model's answer: what follows the prompt and the style's answer marker, stripped."""
    answer = generated_text[len(prompt) :] if generated_text.startswith(prompt) else generated_text
    _, marker, after = answer.partition(_ANSWER_MARKERS[check_style(style)])
    return (after if marker else answer).strip()


def as_instruction(entry: Mapping) -> dict[str, str]:
    """An Alpaca-style ``instruction``/``input`` pair for an entry (a chat: its last user turn)."""
    if "messages" not in entry:
        return {"instruction": entry["instruction"], "input": entry.get("input", "")}
    last_user = [content for role, content in turns(entry) if role == "user"][-1]
    return {"instruction": last_user, "input": ""}


def chat_roles_error(roles: Sequence[str]) -> str | None:
    """Why a chat's roles are out of order (None when they are fine): an optional system turn,
    then user and assistant turns in alternation, ending with an assistant turn."""
    expected = "user"
    for i, role in enumerate(roles):
        if i == 0 and role == "system":
            continue
        if role != expected:
            return f"message {i} has role {role!r} where {expected!r} was expected"
        expected = "assistant" if role == "user" else "user"
    if not roles or roles[-1] != "assistant":
        return "the last message must be the assistant's answer"
    return None


def completion_text(completion) -> str:
    """A preference completion's text: a string, or a chat's one assistant message
    (``[{"role": "assistant", "content": ...}]``)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def preference_parts(entry: Mapping) -> tuple[dict, str, str]:
    """(the prompt as an instruction entry, chosen, rejected) of a preference entry: Alpaca-style
    (``instruction``, ``input``, ``chosen``, ``rejected``) or a chat (``prompt`` messages ending with
    the user's turn, ``chosen``/``rejected`` completions). The prompt entry renders like any
    instruction entry (``segments``: a chat's answer slot holds the chosen text)."""
    chosen, rejected = completion_text(entry["chosen"]), completion_text(entry["rejected"])
    if "prompt" in entry:
        messages = [{"role": m["role"], "content": m["content"]} for m in entry["prompt"]]
        return {"messages": [*messages, {"role": "assistant", "content": chosen}]}, chosen, rejected
    return {"instruction": entry["instruction"], "input": entry.get("input", "")}, chosen, rejected
