"""Prompt formats: how a conversation becomes the text a model is trained on and prompted with.

    model   the tokenizer's own chat template when it has one; otherwise (a base model) a format that needs
            no new token: `plain` for prompt/completion rows, `alpaca` for the others (the reason is recorded)
    chatml  <|im_start|>role ... <|im_end|>; only for a tokenizer that has both tokens (never added here)
    alpaca  "### Instruction:" / "### Response:" sections, plain text
    plain   the prompt, then the completion, nothing added: prompt/completion rows train exactly as written

Every format but `model` is a Jinja chat template, so one mechanism renders it everywhere: the run sets it as
the tokenizer's chat template, saves that tokenizer with the adapter, and generation, evaluation and the GGUF
export (llama.cpp renders the same template) read it from there. Each response ends with the eos token."""
from __future__ import annotations

from dataclasses import dataclass

from forge_rt.core.errors import ForgeError

PROMPT_FORMATS = ("model", "chatml", "alpaca", "plain")

CHATML = ("{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.")
ALPACA = ("{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}"
          "{%- else -%}{{ '" + ALPACA_PREAMBLE + "\\n\\n' }}{%- endif -%}"
          "{%- for m in messages -%}"
          "{%- if m['role'] == 'user' -%}{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
          "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + eos_token + '\\n\\n' }}{%- endif -%}"
          "{%- endfor -%}")
# The turns before the response, separated by a blank line; the response follows the prompt as written.
PLAIN = ("{%- for m in messages -%}"
         "{%- if m['role'] == 'assistant' -%}{{ m['content'] + eos_token }}"
         "{%- else -%}{%- if not loop.first and messages[loop.index0 - 1]['role'] != 'assistant' -%}{{ '\\n\\n' }}"
         "{%- endif -%}{{ m['content'] }}{%- endif -%}"
         "{%- endfor -%}")
TEMPLATES = {"chatml": CHATML, "alpaca": ALPACA, "plain": PLAIN}
NEEDS_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>")}


class PromptFormatError(ForgeError, ValueError):
    """A prompt format this tokenizer cannot render without new tokens."""


@dataclass(frozen=True)
class PromptFormat:
    name: str                 # model (the tokenizer's template), chatml, alpaca or plain
    reason: str               # why this one, for the report
    template: str | None      # the Jinja chat template to set; None keeps the tokenizer's own

    def apply(self, tokenizer) -> None:
        """Makes this format the tokenizer's chat template (saved with it, read by generate/eval/export)."""
        if self.template is not None:
            tokenizer.chat_template = self.template

    def as_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason}


def _has_token(tokenizer, token: str) -> bool:
    ids = tokenizer.convert_tokens_to_ids([token])
    return ids[0] is not None and ids[0] != tokenizer.unk_token_id and len(tokenizer.tokenize(token)) == 1


def resolve(requested: str, tokenizer, row_format: str | None) -> PromptFormat:
    """The format a run uses: `requested` (a PROMPT_FORMATS name) for this tokenizer and these rows."""
    if requested not in PROMPT_FORMATS:
        raise PromptFormatError(f"--prompt-format {requested!r}: use one of {', '.join(PROMPT_FORMATS)}")
    if requested == "model":
        if getattr(tokenizer, "chat_template", None):
            return PromptFormat("model", "the tokenizer's chat template", None)
        fallback = "plain" if row_format == "prompt_completion" else "alpaca"
        return PromptFormat(fallback, f"the tokenizer has no chat template (a base model): {fallback}, which needs "
                            "no new token, for " + (row_format or "these") + " rows", TEMPLATES[fallback])
    missing = [t for t in NEEDS_TOKENS.get(requested, ()) if not _has_token(tokenizer, t)]
    if missing:
        raise PromptFormatError(f"--prompt-format {requested} needs the token(s) {', '.join(missing)}, which this "
                                "tokenizer does not have (forge_rt never adds tokens to a vocabulary); use "
                                "--prompt-format alpaca or plain, which need no new token")
    return PromptFormat(requested, "asked for with --prompt-format", TEMPLATES[requested])
