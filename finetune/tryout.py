"""What ``generate.py`` does: the fine-tuned model answering prompts laid out as in training.

The prompt is the config's own template (``finetune.data.templates``: alpaca, llama2-chat, the model's
chat template, a custom string), so the model sees exactly the layout it was trained on. Tokens are
printed as they are made (``llama.generate_ids`` asks its ``stop_fn`` after every token when
``check_every=1``; we use that hook to print, never to stop). Greedy unless a temperature is given.

A prompt that does not fit the context (``max_position_embeddings`` minus the tokens asked for) is cut
from the left with one warning line; in a chat the oldest turns go first, then the oldest tokens.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import llama
from finetune import files, preflight
from finetune.config import RunConfig
from finetune.data import templates
from finetune.data.examples import padding_id
from finetune.errors import UserError
from finetune.evaluate.dense import maybe_densify
from finetune.evaluate.evaluator import autocast_for, check_adapter, load_for_eval, resolve_weights
from finetune.evaluate.metrics import parse_entities

Warn = Callable[[str], None]


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (got {self.temperature}); 0 is greedy")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be >= 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (got {self.top_p})")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(cfg: RunConfig, adapter: str | None) -> tuple[Any, Any]:
    """(model, tokenizer): base as trained + adapter, then the dense merged copy when it fits (as eval)."""

    model_path, adapter_dir = resolve_weights(cfg, adapter)
    if adapter_dir is not None:
        check_adapter(cfg, adapter_dir)
    preflight.check_model_weights(model_path)
    tok = llama.Tokenizer.from_pretrained(model_path)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the answers (and --file's JSONL)
        model = load_for_eval(cfg, model_path, adapter_dir)
        maybe_densify(model, cfg.eval.dense)
    return model, tok


@dataclass
class Session:
    """One model, one template, and (chat templates) the conversation so far."""

    cfg: RunConfig
    model: Any
    tok: Any
    sampling: Sampling
    warn: Warn = _stderr
    history: list[tuple[str, str]] = field(default_factory=list)

    @property
    def is_chat(self) -> bool:
        return self.cfg.data.template == templates.CHAT

    @property
    def context(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def reset(self) -> None:
        self.history.clear()

    def _budget(self) -> int:
        budget = self.context - self.sampling.max_new_tokens
        if budget < 2:
            raise UserError(f"--max-new-tokens {self.sampling.max_new_tokens} leaves no room for a prompt in "
                            f"the model's context of {self.context} tokens; ask for fewer")
        return budget

    def _chat_ids(self, text: str, history: Sequence[tuple[str, str]]) -> list[int]:
        d = self.cfg.data
        ct = templates.chat_template(self.tok, d.system, d.instruction)

        def user(s: str) -> dict[str, str]:
            return {"role": "user", "content": f"{d.instruction}\n{s}" if d.instruction else s}

        messages = [{"role": "system", "content": d.system}] if d.system is not None else []
        for u, a in history:
            messages += [user(u), {"role": "assistant", "content": a}]
        return ct.encode(messages + [user(text)], add_generation_prompt=True)

    def prompt_ids(self, text: str) -> tuple[list[int], bool]:
        """Ids of the prompt (with the kept history), cut to fit; (ids, cut). Drops history turns."""
        budget = self._budget()
        if not self.is_chat:
            ids = templates.prompt_ids(self.tok, self.cfg.data, text)
        else:
            dropped = 0
            ids = self._chat_ids(text, self.history)
            while len(ids) > budget and self.history:
                self.history.pop(0)
                dropped += 1
                ids = self._chat_ids(text, self.history)
            if dropped:
                self.warn(f"warning: the conversation does not fit the context ({self.context} tokens, "
                          f"{self.sampling.max_new_tokens} kept for the answer): dropped the {dropped} "
                          f"oldest turn(s)")
        if len(ids) <= budget:
            return ids, False
        lead = [ids[0]] if self.tok.add_bos and ids and ids[0] == self.tok.bos_id else []
        kept = lead + ids[len(ids) - (budget - len(lead)):]
        self.warn(f"warning: the prompt is {len(ids)} tokens, more than the context allows ({self.context} - "
                  f"{self.sampling.max_new_tokens} for the answer): cut from the left to its last "
                  f"{len(kept)} tokens")
        return kept, True

    def _stops(self) -> list[int]:
        ids = {*templates.stop_ids(self.tok, self.cfg.data), *self.model.config.eos_token_ids}
        return sorted(ids - {None})

    def _amp(self) -> contextlib.AbstractContextManager:

        return autocast_for(self.cfg, next(self.model.parameters()).device)

    def answer(self, text: str, out: TextIO | None = None) -> str:
        """Generate the answer to ``text``, streaming it to ``out``; chat turns join the history."""

        ids, _ = self.prompt_ids(text)
        s = self.sampling
        printed = ""

        def stream(new: list[int]) -> bool:
            nonlocal printed
            if out is not None:
                now = self.tok.decode(new)
                if not now.endswith("\ufffd") and now.startswith(printed):  # no half UTF-8 character
                    out.write(now[len(printed):])
                    out.flush()
                    printed = now
            return False

        with self._amp():
            new = llama.generate_ids(self.model, [ids], max_new_tokens=s.max_new_tokens,
                                     temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                                     eos_id=self._stops(), pad_id=padding_id(self.tok),
                                     stop_fn=stream if out is not None else None, check_every=1)[0]
        answer = self.tok.decode(new)
        if out is not None:
            out.write(answer[len(printed):] if answer.startswith(printed) else "\n" + answer)
            out.write("\n")
            out.flush()
        if self.is_chat:
            self.history.append((text, answer))
        return answer

    def answer_many(self, texts: Sequence[str]) -> list[tuple[str, bool]]:
        """Answers to independent prompts (no history), batched; (answer, prompt was cut) each."""

        prompts = []
        for text in texts:
            saved, self.history = self.history, []
            prompts.append(self.prompt_ids(text))
            self.history = saved
        s = self.sampling
        with self._amp():
            new = llama.generate_ids(self.model, [p for p, _ in prompts], max_new_tokens=s.max_new_tokens,
                                     temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                                     eos_id=self._stops(), pad_id=padding_id(self.tok),
                                     batch_size=self.cfg.eval.batch_size)
        return [(self.tok.decode(n), cut) for n, (_, cut) in zip(new, prompts)]


def entities_lines(answer: str) -> list[str]:
    """The entities read from an answer (the evaluator's parser), one ``span: TYPE`` line each."""

    parsed = parse_entities(answer)
    return [f"  {span}: {kind}" for span, kind in parsed.entities]


# ---------------------------------------------------------------------------------------------------
# --file
def read_prompts(path: str | Path, input_column: str) -> Iterator[tuple[int, str]]:
    """(line number, prompt) from a text file (one prompt per line) or a JSONL file of rows."""

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read --file {path}: {files.describe_os_error(e)}") from None
    lines = data.split(b"\n")
    texts = []
    for number, raw in enumerate(lines, 1):
        try:
            texts.append((number, raw.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            raise UserError(f"--file {path}: line {number} is not UTF-8 text ({e.reason} at byte "
                            f"{e.start} of the line); convert the file to UTF-8 (e.g. iconv -f latin1 -t "
                            "utf-8)") from None
    nonblank = [(n, t) for n, t in texts if t.strip()]
    jsonl = path.suffix in (".jsonl", ".json") or (nonblank and all(t.lstrip().startswith("{")
                                                                     for _, t in nonblank))
    for number, text in nonblank:
        if not jsonl:
            yield number, text
            continue
        try:
            row = json.loads(text)
        except ValueError as e:
            raise UserError(f"--file {path}: line {number} is not a JSON object ({e}); write one row per "
                            f"line") from None
        keys = (input_column, "input", "prompt", "text")
        value = next((row[k] for k in keys if isinstance(row, dict) and isinstance(row.get(k), str)), None)
        if value is None:
            raise UserError(f"--file {path}: line {number} has no text under any of {', '.join(keys)}")
        yield number, value


def run_file(session: Session, path: str, out: TextIO) -> int:
    rows = list(read_prompts(path, session.cfg.data.input_column))
    if not rows:
        raise UserError(f"--file {path} holds no prompts")

    for (number, text), (answer, cut) in zip(rows, session.answer_many([t for _, t in rows])):
        record = {"line": number, "input": text, "output": answer,
                  "entities": [list(e) for e in parse_entities(answer).entities], "truncated": cut}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()
    return len(rows)


# ---------------------------------------------------------------------------------------------------
# interactive
HELP = "type a prompt; /reset forgets the conversation, /quit (or Ctrl-D) leaves, Ctrl-C stops an answer"


def interactive(session: Session, out: TextIO = sys.stdout, read: Callable[[str], str] = input) -> None:
    _stderr(HELP + (" (the chat history is kept)" if session.is_chat else ""))
    while True:
        try:
            line = read("> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            _stderr("\n(/quit or Ctrl-D to leave)")
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            session.reset()
            _stderr("(conversation forgotten)")
            continue
        try:
            answer = session.answer(line, out)
        except KeyboardInterrupt:
            out.write("\n")
            _stderr("(answer stopped)")
            continue
        show_entities(answer, out)


def show_entities(answer: str, out: TextIO) -> None:
    lines = entities_lines(answer)
    if lines:
        out.write(f"entities ({len(lines)}):\n" + "\n".join(lines) + "\n")
        out.flush()
