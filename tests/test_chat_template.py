"""Chat templates: rendering, validation, and their place in checkpoints (saved, loaded, trained)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model import LanguageModel, load, save_checkpoint
from model.chat import PLAY_TEMPLATE, ChatTemplate, ChatTemplateError, Message, template_named
from model.checkpoint import CheckpointError

from conftest import SHIPPED


def test_play_template_renders_speaker_headings() -> None:
    rendered = PLAY_TEMPLATE.render(
        [
            Message("system", "A platform before the castle."),
            Message("user", "Who's there?"),
            Message("assistant", "Nay, answer me."),
            Message("user", "Long live the king!", name="BERNARDO"),
        ]
    )
    assert rendered.messages == [
        "A platform before the castle.\n\n",  # the system speaker is "": a paragraph without a heading
        "HORATIO:\nWho's there?\n\n",
        "HAMLET:\nNay, answer me.\n\n",
        "BERNARDO:\nLong live the king!\n\n",  # `name` wins over the role's speaker
    ]
    assert rendered.reply_prompt == "HAMLET:\n"
    assert rendered.stop == ("\n\n",)
    assert rendered.text == "".join(rendered.messages) + "HAMLET:\n"
    # a reply sent back as the next request's message renders as the reply was generated
    assert PLAY_TEMPLATE.reply_as_message("Nay.") == rendered.reply_prompt + "Nay." + "\n\n"
    assert PLAY_TEMPLATE.render_message(Message("developer", "Be brief.")) == "Be brief.\n\n"


@pytest.mark.parametrize("name", ["", "A\nB", "KING: LEAR", "x" * 65])
def test_names_that_would_break_the_heading_are_refused(name: str) -> None:
    with pytest.raises(ChatTemplateError):
        PLAY_TEMPLATE.render([Message("user", "hi", name=name)])


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ChatTemplateError, match="role 'tool'"):
        PLAY_TEMPLATE.render([Message("tool", "{}")])


@pytest.mark.parametrize(
    "doc",
    [
        {"speakers": {"user": "A", "assistant": "B"}},  # a role missing
        {"speakers": {"system": "", "user": "A", "assistant": "B", "tool": "C"}},
        {"speakers": {"system": "", "user": "A", "assistant": "B"}, "heading": "no name"},
        {"speakers": {"system": "", "user": "A", "assistant": "B"}, "heading": "{name} {x}"},
        {"speakers": {"system": "", "user": "A", "assistant": "B"}, "end": ""},
        {"speakers": {"system": "", "user": "A", "assistant": "B"}, "format": "jinja"},
        {"speakers": {"system": "", "user": "A", "assistant": "B"}, "extra": 1},
        {"speakers": ["A"]},
        "speaker-headings",
    ],
)
def test_bad_templates_are_refused(doc: object) -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate.from_dict(doc)


def test_round_trip_and_names() -> None:
    assert ChatTemplate.from_dict(PLAY_TEMPLATE.to_dict()) == PLAY_TEMPLATE
    assert template_named("speaker-headings") == PLAY_TEMPLATE
    assert template_named("none") is None
    with pytest.raises(ChatTemplateError):
        template_named("chatml")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoints_have_the_play_template(name: str) -> None:
    assert load(SHIPPED[name], verify=False).chat_template == PLAY_TEMPLATE


def test_trained_checkpoints_get_the_play_template_by_default(char_lm: LanguageModel) -> None:
    # char_lm is written by model.train with the default --chat-template
    assert char_lm.chat_template == PLAY_TEMPLATE


def test_checkpoint_stores_its_template(char_lm: LanguageModel, tmp_path: Path) -> None:
    custom = ChatTemplate(speakers={"system": "CHORUS", "user": "ROMEO", "assistant": "JULIET"})
    fingerprint = save_checkpoint(tmp_path / "a", char_lm.model, char_lm.tokenizer, chat_template=custom)
    assert load(tmp_path / "a").chat_template == custom
    # metadata only: the fingerprint (weights + tokenizer) does not change with the template
    assert save_checkpoint(tmp_path / "b", char_lm.model, char_lm.tokenizer) == fingerprint
    assert load(tmp_path / "b").chat_template is None
    config = tmp_path / "a" / "config.json"
    doc = json.loads(config.read_text())
    doc["chat_template"]["speakers"].pop("user")
    config.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="bad chat_template"):
        load(tmp_path / "a")
