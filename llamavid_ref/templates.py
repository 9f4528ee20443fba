"""Conversation templates (LLaVA SeparatorStyle.TWO family), as the release formats prompts.

    "<system> USER: <prompt> ASSISTANT: <answer></s>USER: <prompt> ASSISTANT:"
"""
from __future__ import annotations

from dataclasses import dataclass, field

_SYSTEM_USER = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_SYSTEM_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    roles: tuple = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"


TEMPLATES = {
    "vicuna_v1": Template("vicuna_v1", _SYSTEM_USER),
    "llava_v1": Template("llava_v1", _SYSTEM_HUMAN),
    # imgsp_v1 has vicuna_v1's text; the release's IMGSP separator style lays out text the same way.
    "imgsp_v1": Template("imgsp_v1", _SYSTEM_USER),
}


@dataclass
class Conversation:
    template: Template
    messages: list = field(default_factory=list)    # [(role, text or None)]

    @classmethod
    def new(cls, name: str = "vicuna_v1") -> "Conversation":
        if name not in TEMPLATES:
            raise KeyError(f"template: expected one of {sorted(TEMPLATES)}, found {name!r}")
        return cls(TEMPLATES[name])

    def add_user(self, text: str) -> "Conversation":
        self.messages.append((self.template.roles[0], text))
        return self

    def add_assistant(self, text: str | None) -> "Conversation":
        self.messages.append((self.template.roles[1], text))
        return self

    def prompt(self) -> str:
        """The text up to and including the open "ASSISTANT:" when the last message is None."""
        t = self.template
        out = t.system + t.sep
        for i, (role, text) in enumerate(self.messages):
            out += f"{role}: {text}" + (t.sep, t.sep2)[i % 2] if text else f"{role}:"
        return out


def question_prompt(question: str, template: str = "vicuna_v1", media: bool = True) -> str:
    """One-shot prompt: "<image>\\n" + question as the user turn, then the open assistant turn."""
    user = ("<image>\n" + question) if media else question
    return Conversation.new(template).add_user(user).add_assistant(None).prompt()
