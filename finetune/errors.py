"""Mistakes a user can fix, as opposed to bugs: the one exception type, and the test the CLIs apply.

The CLIs catch what ``is_user_error`` accepts, print its one-line message (what is wrong, where, how
to fix) and exit with code 2; anything else is a bug and keeps its traceback.
"""

OUR_PACKAGES = ("finetune", "llama", "lora", "quant")


class UserError(Exception):
    """An expected, user-fixable error; `str(err)` is the single line shown to the user."""


def is_user_error(err: BaseException) -> bool:
    """``UserError``, or a ``ValueError`` subclass raised by one of our packages (``llama.LoadError``,
    ``lora.LoRAError``, ``quant.QuantError``): the packages stand alone, so they cannot raise ours.
    A plain ``ValueError`` is a bug, not user input."""
    if isinstance(err, UserError):
        return True
    cls = type(err)
    ours = cls.__module__.split(".")[0] in OUR_PACKAGES
    return isinstance(err, ValueError) and cls is not ValueError and ours


def error_line(err: BaseException) -> str:
    """What a CLI prints for a user error: ``error: <message>`` on one line, whatever the message holds."""
    return "error: " + " ".join(str(err).split())
