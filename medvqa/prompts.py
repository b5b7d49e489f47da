"""Chat messages for each task, shared by training and inference so both see the same prompt.

Layout follows the Idefics2 fine-tuning recipe the study started from: the instruction, then the image, then the
question, as one user turn; the assistant turn holds only the answer (or caption). The stage instructions are config
(``stage1.prompt``, ``stage2.prompt``); the expert one is the evaluation's ``expert`` condition.
"""

from __future__ import annotations

from collections.abc import Sequence

EXPERT_INSTRUCTION = (
    "You are an expert radiologist evaluating the case, answer the question succinctly based on the medical image."
)


def user_message(instruction: str, question: str = "") -> dict:
    """One user turn: instruction, image, question (the question is empty for captioning)."""
    content = [{"type": "text", "text": instruction}, {"type": "image"}]
    if question:
        content.append({"type": "text", "text": question})
    return {"role": "user", "content": content}


def assistant_message(answer: str) -> dict:
    """One assistant turn holding an answer (rendered "Assistant: <answer><end_of_utterance>", the text training
    puts after the prompt)."""
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def prompt_text(processor, instruction: str, question: str = "", examples: Sequence[tuple[str, str]] = ()) -> str:
    """The rendered prompt up to and including the assistant prefix ("...Assistant:"), ready for generation.
    ``examples``: (question, answer) pairs shown first as earlier turns of the same chat (few-shot), each a user turn
    exactly like the question's (instruction, its image, its question) and an assistant turn with its answer."""
    messages = [m for q, a in examples for m in (user_message(instruction, q), assistant_message(a))]
    return processor.apply_chat_template(messages + [user_message(instruction, question)], add_generation_prompt=True)
