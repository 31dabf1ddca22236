"""Chat-template data: records {"messages": [{"role": "system" | "user" | "assistant", "content": …}, …]}.

The answer is the last message, which must be the assistant's; the prompt is every message
before it, rendered by the base tokenizer's chat template with the generation prompt added
(`apply_chat_template(…, add_generation_prompt=True)`), so the answer starts where the
template starts an assistant turn — in training (the answer-only loss) and in `eval` alike.

A messages record is loaded as {"input": Conversation, "output": answer}: `Conversation` is a
`str` (a readable "role: content" rendering, for anything that only shows a prompt) that
carries the messages; the encoder renders it with the template. Plain {"input", "output"}
records never come here and are encoded exactly as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kifmerge.errors import InvalidInputError

ROLES = ("system", "user", "assistant")


class Conversation(str):
    """A prompt given as chat messages (everything before the answer)."""

    messages: tuple[dict[str, str], ...]

    def __new__(cls, messages: list[dict[str, str]] | tuple[dict[str, str], ...]) -> "Conversation":
        text = super().__new__(cls, "\n".join(f"{m['role']}: {m['content']}" for m in messages))
        text.messages = tuple(dict(m) for m in messages)
        return text

    def __reduce__(self):  # copies and pickles keep the messages
        return Conversation, (self.messages,)


def chat_record(path: Path, line: int, obj: dict[str, Any]) -> dict[str, str]:
    """Validate a messages record; {"input": Conversation(prompt messages), "output": answer}."""
    messages = obj.get("messages")
    where = f"{path}:{line}"
    if set(obj) - {"messages"} or not isinstance(messages, list) or not messages:
        raise InvalidInputError(f"{where}: a chat record is {{\"messages\": [{{\"role\", \"content\"}}, …]}} and nothing else")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise InvalidInputError(f"{where}: message {number} must be {{\"role\": system|user|assistant, \"content\": string}}")
    answer = messages[-1]
    if answer["role"] != "assistant" or not answer["content"].strip():
        raise InvalidInputError(f"{where}: the last message must be the assistant's non-empty answer")
    if len(messages) < 2:
        raise InvalidInputError(f"{where}: a chat record needs at least one message before the assistant's answer")
    return {"input": Conversation([{"role": m["role"], "content": m["content"]} for m in messages[:-1]]),
            "output": answer["content"]}


def render_prompt(tokenizer: Any, prompt: Conversation) -> str:
    """The prompt messages through the tokenizer's chat template, ending with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError("the data holds chat messages but the base model's tokenizer has no chat template; "
                                "give the tokenizer one (tokenizer.chat_template = …; save_pretrained into the base "
                                "folder) or use {\"input\", \"output\"} records")
    try:
        text = tokenizer.apply_chat_template(list(prompt.messages), tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2 errors, or a template that raises on purpose (raise_exception)
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInputError(f"the tokenizer's chat template failed on the data: {reason}") from None
    if not isinstance(text, str):
        raise InvalidInputError("the tokenizer's chat template did not render text")
    return text
