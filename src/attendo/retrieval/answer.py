"""Retrieval-augmented answers: the passages found for a question, numbered in the prompt, and
the model asked to answer from them citing [1], [2], ...

The prompt is a prompt template (attendo.prompting.templates) that sees `passages` (each with
`source` and `text`) and `input` (the question); ANSWER_TEMPLATE is the default, and any template
file can replace it. For a chat model the rendered text is the user's message, for a completion
model the text itself.

    passages, prompt = retrieve_prompt(model, index, "What is RLHF?", top_k=4)
    answer = ask(model, index, "What is RLHF?", top_k=4, max_new_tokens=200)  # Answer(text, passages, prompt)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attendo.prompting.templates import (
    PromptTemplate,
    RenderedPrompt,
    complete,
    fitted_prompt,
    layout_prompt,
    new_token_budget,
)
from attendo.retrieval.search import Passage, search

ANSWER_TEMPLATE = """\
Answer the question using only the numbered passages below. Cite the passages you use by their \
numbers in square brackets, like [1] or [2]. If the passages do not contain the answer, say that \
you do not know.

{% for passage in passages %}
[{{ loop.index }}] (from {{ passage.source }})
{{ passage.text }}

{% endfor %}
Question: {{ input }}
Answer:"""


@dataclass(frozen=True)
class Answer:
    text: str
    passages: list[Passage]
    prompt: RenderedPrompt

    def as_dict(self) -> dict[str, Any]:
        return {"answer": self.text, "passages": [p.as_dict() for p in self.passages]}


def answer_template(template: PromptTemplate | None = None) -> PromptTemplate:
    return template or PromptTemplate(ANSWER_TEMPLATE, name="the answer template")


def augmented_question(question: str, passages: list[Passage], template: PromptTemplate | None = None) -> str:
    """The question with its passages, as one message (what retrieval-augmented chat sends)."""
    return answer_template(template).render({"passages": passages, "input": question})


def retrieve_prompt(
    model: Any,
    index: Any,
    question: str,
    top_k: int = 4,
    mode: str = "hybrid",
    template: PromptTemplate | None = None,
    max_new_tokens: int | None = None,
) -> tuple[list[Passage], RenderedPrompt]:
    """The passages for a question and the prompt that holds them (checked against the window)."""
    template = answer_template(template)
    passages = search(index, question, top_k, mode)
    chat = model.tokenizer.chat_template is not None
    prompt = fitted_prompt(
        lambda k: layout_prompt(model, template, {"passages": passages[:k]}, [], question, chat),
        len(passages), new_token_budget(model, max_new_tokens), "passages", "--top-k", least=1,
    )  # fmt: skip
    return passages, prompt


def ask(
    model: Any,
    index: Any,
    question: str,
    top_k: int = 4,
    mode: str = "hybrid",
    template: PromptTemplate | None = None,
    **generation: Any,
) -> Answer:
    passages, prompt = retrieve_prompt(model, index, question, top_k, mode, template, generation.get("max_new_tokens"))
    return Answer(complete(model, prompt, **generation).text, passages, prompt)
