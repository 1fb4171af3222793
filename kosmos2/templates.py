"""Prompt templates shared by training samples and inference: the chat layout of the instruction stream and the
grounded instruction templates of the paper's Table 9 (docs/data.md, "Instruction stream").

Templates are grounding markup, written as the text a user would type: `kosmos2.tokenizer.Kosmos2Tokenizer.
encode_prompt` turns them into ids at training time exactly as `Kosmos2.ground` does at inference time, so a model
tuned on them sees the same ids when asked the same question.

Chat layout (one user turn and its answer; a conversation is several of them after `<s>`):

    [images of the turn] Question: {user text} Answer: {assistant text}</s>

Grounded instructions (Table 9; `{object}` is `<object><patch_index_UL><patch_index_LR></object>`, several boxes
joined by `</delimiter_of_multi_objects/>`):

    REC  <grounding><phrase>{expression}</phrase>                       -> {object}
    REG  <grounding>What is <phrase>it</phrase>{object}? It is              ->  {expression}.
         <grounding>What is <phrase>this</phrase>{object}? This is          ->  {expression}.
         <grounding>Describe <phrase>this object</phrase>{object}. This object is -> {expression}.
         <grounding><phrase>It</phrase>{object} is                           ->  {expression}.
         <grounding><phrase>This</phrase>{object} is                         ->  {expression}.
         <grounding><phrase>The object</phrase>{object} is                   ->  {expression}.

The `<grounding>` prefix is the one of the paper's grounding evaluations (RefCOCO: `<grounding><phrase>{expression}
</phrase>`; REG: `<grounding><phrase>It</phrase>{object} is`, docs/evaluation.md), so those prompts are templates
"rec" and "reg_it_is" here.
"""
from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import BOI

IMAGE_PLACEHOLDER = BOI        # "<image>": where an image goes in a prompt, as in `Kosmos2.ground`

# ---- chat layout
USER_PREFIX = "Question: "     # the paper's VQA prompt is "Question: {q} Answer:"; a chat turn is the same shape
ANSWER_PREFIX = " Answer:"
LINE_BREAK = "</line>"         # newlines inside a turn become the text stream's line token


def chat_user_text(text: str) -> str:
    """The prompt part of one turn: `Question: {text} Answer:` (newlines as `</line>`)."""
    return f"{USER_PREFIX}{with_line_tokens(text)}{ANSWER_PREFIX}"


def with_line_tokens(text: str) -> str:
    """Non-empty lines of `text`, stripped, joined by `</line>` (how the text stream marks line ends)."""
    return LINE_BREAK.join(line.strip() for line in text.split("\n") if line.strip())


# ---- Table 9
@dataclass(frozen=True)
class GroundedTemplate:
    """`prompt` is given, `answer` is learned / generated. Fields `{expression}` and `{object}` are filled in."""
    name: str
    task: str      # "rec": expression -> boxes; "reg": boxes -> expression
    prompt: str
    answer: str

    def prompt_markup(self, expression: str = "", object_markup: str = "") -> str:
        return self.prompt.format(expression=expression, object=object_markup)

    def answer_markup(self, expression: str = "", object_markup: str = "") -> str:
        return self.answer.format(expression=expression, object=object_markup)


REC_TEMPLATE = GroundedTemplate("rec", "rec", "<grounding><phrase>{expression}</phrase>", "{object}")
REG_TEMPLATES = (
    GroundedTemplate("reg_what_is_it", "reg", "<grounding>What is <phrase>it</phrase>{object}? It is", " {expression}."),
    GroundedTemplate("reg_what_is_this", "reg", "<grounding>What is <phrase>this</phrase>{object}? This is",
                     " {expression}."),
    GroundedTemplate("reg_describe", "reg", "<grounding>Describe <phrase>this object</phrase>{object}. This object is",
                     " {expression}."),
    GroundedTemplate("reg_it_is", "reg", "<grounding><phrase>It</phrase>{object} is", " {expression}."),
    GroundedTemplate("reg_this_is", "reg", "<grounding><phrase>This</phrase>{object} is", " {expression}."),
    GroundedTemplate("reg_the_object_is", "reg", "<grounding><phrase>The object</phrase>{object} is", " {expression}."),
)
TABLE9 = (REC_TEMPLATE, *REG_TEMPLATES)
TEMPLATES = {t.name: t for t in TABLE9}
DEFAULT_REG_TEMPLATE = "reg_it_is"  # the paper's REG evaluation prompt


def get_template(name: str) -> GroundedTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def expression_answer_text(expression: str) -> str:
    """The expression as a REG answer writes it: outer space and a final period removed (the template adds one)."""
    return expression.strip().rstrip(".").strip()
