"""An Ollama Modelfile beside a GGUF: FROM, the prompt layout the model was trained on, its stop tokens.

Ollama's TEMPLATE is a Go template, not jinja, so the chat template cannot be copied. It is *measured*
instead: the jinja template is rendered on conversations whose contents are sentinel characters, and
the text around each sentinel is each role's prefix and suffix (system, user, assistant, and the
generation prompt). Those pieces are laid out with Ollama's ``.System`` / ``.Prompt`` / ``.Response``,
which Ollama repeats per turn of a conversation. Text templates (alpaca, llama2-chat, a custom string)
are the template up to ``{output}`` with ``{{ .Prompt }}`` where the input goes. The configured
instruction (and system message) are part of the layout, as in training. BOS is not written: llama.cpp
adds it from the GGUF's add-BOS flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.data import templates

_S, _U, _A, _U2, _A2 = "\ue010", "\ue011", "\ue012", "\ue013", "\ue014"


def _between(text: str, start: str | None, end: str | None) -> str:
    i = 0 if start is None else text.index(start) + len(start)
    j = len(text) if end is None else text.index(end, i)
    return text[i:j]


def chat_layout(tok: Any, system: str | None, instruction: str) -> dict[str, str]:
    """Prefix/suffix strings of each role, measured from the jinja chat template."""
    ct = templates.chat_template(tok, system, instruction)

    def render(msgs: list[tuple[str, str]], gen: bool) -> str:
        text = ct._render([{"role": r, "content": c} for r, c in msgs], add_generation_prompt=gen)
        bos = tok.bos_token or ""
        return text[len(bos):] if bos and tok.add_bos and text.startswith(bos) else text

    two = render([("user", _U), ("assistant", _A), ("user", _U2), ("assistant", _A2)], False)
    asst_suffix = _between(two, _A2, None)
    user_prefix = _between(two, _A, _U2)
    if asst_suffix and user_prefix.startswith(asst_suffix):
        user_prefix = user_prefix[len(asst_suffix):]
    user_suffix = _between(render([("user", _U)], False), _U, None)
    after_user = _between(render([("user", _U)], True), _U, None)
    if after_user.startswith(user_suffix):
        asst_prefix = after_user[len(user_suffix):]
    else:
        user_suffix, asst_prefix = "", after_user
    with_sys = render([("system", _S), ("user", _U)], True)
    sys_prefix = _between(with_sys, None, _S)
    sys_suffix = _between(with_sys, _S, _U)
    if sys_suffix.endswith(user_prefix):
        sys_suffix = sys_suffix[:len(sys_suffix) - len(user_prefix)]
    default_sys = _between(two, None, _U)
    if default_sys.endswith(user_prefix):
        default_sys = default_sys[:len(default_sys) - len(user_prefix)]
    else:
        default_sys = ""
    return {"system_prefix": sys_prefix, "system_suffix": sys_suffix, "user_prefix": user_prefix,
            "user_suffix": user_suffix, "assistant_prefix": asst_prefix, "assistant_suffix": asst_suffix,
            "default_system": default_sys}


def modelfile_text(gguf_name: str, tok: Any, data_cfg: Any) -> str:
    """The Modelfile for ``./gguf_name``, following ``data_cfg``'s template (what training used)."""
    stops = [tok.eos_token]
    lines = [f"FROM ./{gguf_name}", ""]
    if data_cfg.template == templates.CHAT:
        lay = chat_layout(tok, data_cfg.system, data_cfg.instruction)
        ct = templates.chat_template(tok, data_cfg.system, data_cfg.instruction)
        stops.insert(0, tok.id_to_piece(ct.end_of_turn))
        user = (data_cfg.instruction + "\n" if data_cfg.instruction else "") + "{{ .Prompt }}"
        template = ("{{ if .System }}" + lay["system_prefix"] + "{{ .System }}" + lay["system_suffix"]
                    + "{{ end }}" + "{{ if .Prompt }}" + lay["user_prefix"] + user + lay["user_suffix"]
                    + "{{ end }}" + lay["assistant_prefix"] + "{{ .Response }}" + lay["assistant_suffix"])
        system = data_cfg.system if data_cfg.system is not None else None
        if system is None and lay["default_system"]:
            # the template adds its own system turn when there is none: keep that text as the default
            system = lay["default_system"][len(lay["system_prefix"]):]
            system = system[:len(system) - len(lay["system_suffix"])] if lay["system_suffix"] and \
                system.endswith(lay["system_suffix"]) else system
    else:
        template = templates.format_prompt(data_cfg, "{{ .Prompt }}") + "{{ .Response }}"
        system = None
    lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines.append("")
    for s in dict.fromkeys(stops):
        lines.append(f'PARAMETER stop "{s}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def create_hint(modelfile: Path, name: str) -> str:
    return f"ollama create {name} -f {modelfile} && ollama run {name}"
