"""Chat templates: how a checkpoint turns a conversation into the kind of text it was trained on.

A language model trained on plays knows one conversation format: a speaker's name as a heading,
the speech, a blank line. The template a checkpoint stores in its config.json says how to write
each message that way and where a generated reply ends:

    {"format": "speaker-headings", "heading": "{name}:\\n", "end": "\\n\\n",
     "speakers": {"system": "", "user": "HORATIO", "assistant": "HAMLET"}}

renders [system "A cold night.", user "Who's there?"] followed by the reply's heading as

    A cold night.\\n\\nHORATIO:\\nWho's there?\\n\\nHAMLET:\\n

A message's `name` wins over its role's default speaker; a speaker "" writes the message as a
plain paragraph (no heading). The reply ends at `end` (the stop string). Each message renders on
its own, so the text up to any message boundary is the same whatever follows: the service
caches the model's state at those boundaries (service.prefix_cache).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SPEAKER_HEADINGS = "speaker-headings"
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class ChatTemplateError(ValueError):
    """A template or a conversation the template cannot render; the message says which part."""


@dataclass(frozen=True)
class Message:
    role: str  # system, developer, user or assistant
    content: str
    name: str | None = None


@dataclass(frozen=True)
class RenderedChat:
    messages: list[str]  # each message's text: the prompt is their concatenation, then `reply_prompt`
    reply_prompt: str  # what opens the reply (the assistant's heading)
    stop: tuple[str, ...]  # where the reply ends

    @property
    def text(self) -> str:
        return "".join(self.messages) + self.reply_prompt


@dataclass(frozen=True)
class ChatTemplate:
    speakers: Mapping[str, str] = field(default_factory=dict)  # role -> default speaker name
    heading: str = "{name}:\n"
    end: str = "\n\n"
    format: str = SPEAKER_HEADINGS

    def __post_init__(self) -> None:
        if self.format != SPEAKER_HEADINGS:
            raise ChatTemplateError(
                f"unknown chat template format {self.format!r} (this code reads {SPEAKER_HEADINGS!r})"
            )
        rest = self.heading.replace("{name}", "", 1)
        if "{name}" not in self.heading or "{" in rest or "}" in rest:
            raise ChatTemplateError("heading must hold '{name}' exactly once and no other braces")
        if not self.end:
            raise ChatTemplateError("end must not be empty: it is where a reply stops")
        missing = [r for r in ROLES if r not in self.speakers]
        unknown = [r for r in self.speakers if r not in ROLES]
        if missing or unknown:
            raise ChatTemplateError(
                f"speakers must name exactly the roles {ROLES} (missing {missing}, unknown {unknown})"
            )
        for role, name in self.speakers.items():
            check_name(name, allow_empty=True, what=f"speaker of role {role!r}")

    @property
    def stop(self) -> tuple[str, ...]:
        return (self.end,)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "heading": self.heading, "end": self.end, "speakers": dict(self.speakers)}

    @classmethod
    def from_dict(cls, doc: Any) -> ChatTemplate:
        if not isinstance(doc, dict):
            raise ChatTemplateError("chat_template must be an object")
        unknown = set(doc) - {"format", "heading", "end", "speakers"}
        if unknown:
            raise ChatTemplateError(f"chat_template has unknown fields {sorted(unknown)}")
        values = {k: doc[k] for k in ("format", "heading", "end") if k in doc}
        if any(not isinstance(v, str) for v in values.values()):
            raise ChatTemplateError("chat_template format, heading and end must be strings")
        speakers = doc.get("speakers")
        if not isinstance(speakers, dict) or any(not isinstance(v, str) for v in speakers.values()):
            raise ChatTemplateError("chat_template speakers must map roles to names")
        return cls(speakers=dict(speakers), **values)

    def render_message(self, message: Message) -> str:
        """One message as text, ending with `end`."""
        role = ROLE_ALIASES.get(message.role, message.role)
        if role not in ROLES:
            raise ChatTemplateError(f"role {message.role!r} cannot be rendered (known: {', '.join(ROLES)}, developer)")
        if message.name is not None:
            check_name(message.name, allow_empty=False, what="name")
        return self._heading(message.name or self.speakers[role]) + message.content + self.end

    def render(self, messages: Sequence[Message]) -> RenderedChat:
        """The conversation as text, message by message, and the heading that prompts the reply."""
        return RenderedChat(
            [self.render_message(m) for m in messages], self._heading(self.speakers["assistant"]), self.stop
        )

    def reply_as_message(self, reply: str) -> str:
        """How the reply renders when a client sends it back as the next request's assistant message."""
        return self.render_message(Message("assistant", reply))

    def _heading(self, name: str) -> str:
        return self.heading.replace("{name}", name) if name else ""


def check_name(name: str, *, allow_empty: bool, what: str) -> str:
    """A speaker name must fit on its heading line."""
    if not name and not allow_empty:
        raise ChatTemplateError(f"{what} must not be empty")
    if len(name) > 64 or any(c in name for c in "\n\r:"):
        raise ChatTemplateError(f"{what} {name[:70]!r} must be at most 64 characters, without newlines or ':'")
    return name


# Tiny Shakespeare's own format: "NAME:\n<speech>\n\n". The model continues as HAMLET, answering HORATIO;
# a system message is a paragraph without a speaker, like a stage direction.
PLAY_TEMPLATE = ChatTemplate(speakers={"system": "", "user": "HORATIO", "assistant": "HAMLET"})

TEMPLATES: dict[str, ChatTemplate | None] = {SPEAKER_HEADINGS: PLAY_TEMPLATE, "none": None}


def template_named(name: str) -> ChatTemplate | None:
    """A template by its `lstm-lm train --chat-template` name ("none": no chat template)."""
    if name not in TEMPLATES:
        raise ChatTemplateError(f"unknown chat template {name!r} (choose from {', '.join(TEMPLATES)})")
    return TEMPLATES[name]
