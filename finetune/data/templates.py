"""Prompt templates: every way a row becomes prompt ids and response ids, in one place.

Two kinds:
- **Text templates** (``alpaca``, ``llama2-chat``, or a custom string with ``{input}``): the prompt is
  ``encode(template up to {output}, bos=True)`` and the response ``encode(output) + [EOS]``. Why the two
  are encoded apart, and why spaces before ``{output}`` are dropped, is in ``finetune.data.examples``'s
  docstring.
- **``chat``**: the model's own chat template (``chat_template`` in tokenizer_config.json, or
  chat_template.jinja), rendered with jinja2 in a sandbox as ``transformers.apply_chat_template`` does.
  Messages: an optional system message (``data.system``; null = whatever the template does without
  one), the user's message (``data.instruction`` + newline + the row's input; the input alone when the
  instruction is empty) and the assistant's (the row's output). The prompt is the conversation up to
  the generation prompt (``<|im_start|>assistant\\n``); the response is what the full conversation adds
  after it, cut right after the end-of-turn token (``<|im_end|>``, ``<|eot_id|>``). That token is the
  final label, and a stop id of generation.

Chat ids equal ``apply_chat_template(..., tokenize=True)``: the rendered text is tokenised in one call
with control-token strings parsed, exactly as transformers does. One deliberate difference: a row
whose text *spells* a control token (``<|im_start|>`` typed into an email) keeps it as text. Such rows
are encoded piece by piece: the template's own control tokens become ids, everything between them
(template text and row text alike, with the row's copies of control strings restored) is plain text.
"""

from __future__ import annotations

import datetime
import difflib
import functools
import json
import re
import string
from typing import Any, Protocol

from finetune.errors import UserError

# The seeds' instruction template (Alpaca layout); {instruction} defaults to the seeds' fixed sentence.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n{output}"
)
# Llama-2 chat layout `<s>[INST] ... [/INST] answer </s>`: <s>/</s> are the BOS/EOS *ids*, added when
# tokenising, never literal text (SentencePiece would spell "<s>" as ordinary characters).
LLAMA2_CHAT_TEMPLATE = "[INST] {instruction} {input} [/INST] {output}"
TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "llama2-chat": LLAMA2_CHAT_TEMPLATE}
CHAT = "chat"
TEMPLATE_NAMES = (*TEMPLATES, CHAT)

# Row text is moved out of the way of the control-token splitter as characters of Unicode's
# Supplementary Private Use Area-A, one per control token (no text in the wild uses them).
_PLACEHOLDER_BASE = 0xF0000


class TemplateSettings(Protocol):
    """The data settings a template reads; ``finetune.config.DataConfig`` has them.

    A protocol rather than the config class, so this module needs nothing from ``finetune.config``,
    which imports ``check_template`` from here to validate ``data.template``: no import cycle.
    """

    template: str
    instruction: str
    system: str | None


class TemplateTokenizer(Protocol):
    """What templates need from `llama.Tokenizer`."""

    eos_id: int
    stop_ids: list[int]
    chat_template: str | None
    special_tokens: dict[str, int]
    bos_token: str | None
    eos_token: str
    source: str

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def encode_with_specials(self, text: str) -> list[int]: ...

    def decode(self, ids: Any, skip_special: bool = True) -> str: ...


# ---------------------------------------------------------------------------------------------------
# checking a configured template
def check_template(template: str, source: str = "<config>") -> None:
    """A named template, or a custom string with {input}, optional {instruction}, and {output} only last.

    The response is appended after the prompt by token ids, so ``{output}`` anywhere but at the very
    end would put response text inside the prompt; literal ``<s>``/``</s>`` would be tokenised as text,
    because BOS/EOS are token ids added by the tokenizer.
    """
    if template in TEMPLATE_NAMES:
        return
    if "{" not in template:
        close = difflib.get_close_matches(template, list(TEMPLATE_NAMES), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        shown = repr(template) if len(repr(template)) <= 80 else repr(template)[:77] + "..."
        raise UserError(f"{source}: data.template {shown} is not a known template "
                        f"({', '.join(TEMPLATE_NAMES)}) nor a custom string containing {{input}}{hint}")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UserError(f"{source}: data.template is not a valid format string ({e}); "
                        "write literal braces as {{ and }}") from None
    fields = [name for _, name, _, _ in parts if name is not None]
    allowed = ("input", "instruction", "output")
    for name in fields:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{source}: data.template has an unknown placeholder {{{name}}}; allowed: "
                            f"{{input}}, {{instruction}}, {{output}}{hint}")
    if "input" not in fields:
        raise UserError(f"{source}: data.template must contain {{input}} (where the row's input text goes)")
    if "<s>" in template or "</s>" in template:
        raise UserError(f"{source}: data.template must not contain literal <s> or </s>: BOS/EOS are added "
                        "as token ids by the tokenizer; remove them from the template")
    if "output" in fields and not template.rstrip().endswith("{output}"):
        raise UserError(f"{source}: data.template may use {{output}} only at its very end (the response "
                        "always follows the prompt)")


# ---------------------------------------------------------------------------------------------------
# text templates
def template_text(cfg: TemplateSettings) -> str:
    """The full template string for a text template (a name or a custom string)."""
    check_template(cfg.template, "data config")
    if cfg.template == CHAT:
        raise ValueError("template_text: the chat template is the model's own, not a format string")
    return TEMPLATES.get(cfg.template, cfg.template)


def format_prompt(cfg: TemplateSettings, input_text: str) -> str:
    """The prompt text for one input: the template up to ``{output}``, trailing spaces removed.

    Trailing spaces go because the response's SentencePiece dummy prefix stands for them.
    """
    head = []
    for literal, name, spec, conversion in string.Formatter().parse(template_text(cfg)):
        head.append(literal.replace("{", "{{").replace("}", "}}"))
        if name == "output":
            break
        if name is not None:
            head.append("{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
                        + "}")
    return "".join(head).format(input=input_text, instruction=cfg.instruction).rstrip(" ")


# ---------------------------------------------------------------------------------------------------
# what the data pipeline and the evaluator call
def prompt_ids(tok: TemplateTokenizer, cfg: TemplateSettings, input_text: str) -> list[int]:
    """The ids the model reads before its answer (BOS / the generation prompt included)."""
    if cfg.template == CHAT:
        return chat_template(tok, cfg.system, cfg.instruction).prompt_ids(input_text)
    return tok.encode(format_prompt(cfg, input_text), bos=True, eos=False)


def response_ids(tok: TemplateTokenizer, cfg: TemplateSettings, output: str) -> list[int]:
    """The ids the model must produce: the answer and its end (EOS, or the chat's end-of-turn token)."""
    if cfg.template == CHAT:
        return chat_template(tok, cfg.system, cfg.instruction).response_ids(output)
    return (tok.encode(output, bos=False, eos=False) if output else []) + [tok.eos_id]


def stop_ids(tok: TemplateTokenizer, cfg: TemplateSettings) -> list[int]:
    """Ids that end an answer in generation: the tokenizer's EOS ids, plus the chat's end-of-turn."""
    ids = set(tok.stop_ids)
    if cfg.template == CHAT:
        ids.add(chat_template(tok, cfg.system, cfg.instruction).end_of_turn)
    return sorted(ids)


# ---------------------------------------------------------------------------------------------------
# chat templates
class ChatTemplate:
    """A model's jinja chat template, compiled once, turning (system, instruction, input, output) into ids."""

    def __init__(self, tok: TemplateTokenizer, system: str | None, instruction: str) -> None:
        if not tok.chat_template:
            raise UserError(f"data.template is 'chat' but {tok.source} comes with no chat template "
                            "(no chat_template in tokenizer_config.json, no chat_template.jinja): use "
                            "'alpaca', 'llama2-chat' or a custom template string")
        self.tok, self.system, self.instruction = tok, system, instruction
        self.specials = dict(sorted(tok.special_tokens.items(), key=lambda kv: -len(kv[0])))
        self._split = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")")
        try:
            tok.encode_with_specials("")
        except ValueError as e:  # a SentencePiece tokenizer cannot read control tokens out of text
            raise UserError(f"data.template 'chat': {e}") from None
        self._template = _compile(tok.chat_template, tok.source)
        probe = "\ue000answer\ue001"  # where does the assistant's turn end? right after its content
        full = self._render(self._messages("x", probe), add_generation_prompt=False)
        after = full[full.index(probe) + len(probe):] if probe in full else ""
        match = self._split.search(after)
        if match is None:
            raise UserError(f"the chat template of {tok.source} puts no control token after the "
                            "assistant's message, so an answer would have no end: use a text template")
        self.end_of_turn = self.specials[match.group(0)]
        self._probe_prompt = self.prompt_ids("x")

    def _messages(self, input_text: str, output: str | None) -> list[dict[str, str]]:
        user = f"{self.instruction}\n{input_text}" if self.instruction else input_text
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages.append({"role": "user", "content": user})
        if output is not None:
            messages.append({"role": "assistant", "content": output})
        return messages

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        tok = self.tok
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=tok.bos_token or "", eos_token=tok.eos_token,
                                         tools=None, documents=None)
        except Exception as e:  # jinja2 errors, or the template's own raise_exception(...)
            raise UserError(f"the chat template of {tok.source} failed to render "
                            f"({type(e).__name__}: {e}); use a text template") from None

    def encode(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        """Ids of the rendered conversation; control-token strings in the messages stay text."""
        if not any(s in m["content"] for m in messages for s in self.specials):
            return self.tok.encode_with_specials(self._render(messages, add_generation_prompt))
        names = list(self.specials)
        hidden = {name: chr(_PLACEHOLDER_BASE + k) for k, name in enumerate(names)}
        shown = {v: k for k, v in hidden.items()}
        escaped = []
        for m in messages:
            text = m["content"]
            if any(_PLACEHOLDER_BASE <= ord(c) < _PLACEHOLDER_BASE + len(names) for c in text):
                raise UserError("a row holds characters of Unicode's private use area U+F0000.. next to "
                                "control-token text; remove them from the data")
            for name in names:
                text = text.replace(name, hidden[name])
            escaped.append({**m, "content": text})
        ids: list[int] = []
        for piece in self._split.split(self._render(escaped, add_generation_prompt)):
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece:
                ids += self.tok.encode("".join(shown.get(c, c) for c in piece), bos=False, eos=False)
        return ids

    def prompt_ids(self, input_text: str) -> list[int]:
        return self.encode(self._messages(input_text, None), add_generation_prompt=True)

    def response_ids(self, output: str) -> list[int]:
        # The placeholder input never changes how the template renders the assistant's turn.
        prompt = self._probe_prompt
        full = self.encode(self._messages("x", output), add_generation_prompt=False)
        if full[:len(prompt)] != prompt:
            raise UserError(f"the chat template of {self.tok.source} does not render the generation prompt "
                            "as the start of the conversation, so the answer cannot be masked exactly; "
                            "use a text template")
        answer = full[len(prompt):]
        try:
            return answer[:answer.index(self.end_of_turn) + 1]
        except ValueError:
            raise UserError(f"the chat template of {self.tok.source} did not close the assistant's turn "
                            f"for output {output[:40]!r}...; use a text template") from None


@functools.lru_cache(maxsize=8)
def chat_template(tok: TemplateTokenizer, system: str | None, instruction: str) -> ChatTemplate:
    """The compiled chat template for a tokenizer (cached: every row of a run uses the same one)."""
    return ChatTemplate(tok, system, instruction)


def _compile(source: str, where: str) -> Any:
    """The template in jinja2's immutable sandbox, with the settings transformers renders with."""
    try:  # lazy: only data.template 'chat' renders jinja2, and its absence is then a one-line UserError
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("data.template 'chat' needs jinja2: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)  # Llama-3.1's date line
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise UserError(f"the chat template of {where} is not valid jinja ({e}); fix it or use a text "
                        "template") from None
