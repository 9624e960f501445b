"""Mistakes a user can fix, as opposed to bugs: the one exception type, and the test the CLIs apply.

The CLIs catch what ``is_user_error`` accepts, print its one-line message (what is wrong, where, how
to fix) and exit with code 2; anything else is a bug and keeps its traceback. Running out of memory
counts as the user's to fix: it is the size of the run against the machine, and the README's advice
(smaller batches, checkpointing, ...) is what helps, not a traceback.
"""

import sys

OUR_PACKAGES = ("finetune", "llama", "lora", "quant")

# What running out of memory looks like: Python's MemoryError (also safetensors' failed mmap), torch's
# CPU allocator ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes") and
# torch.OutOfMemoryError (CUDA, "CUDA out of memory. Tried to allocate ...").
_OOM_TYPES = ("MemoryError", "OutOfMemoryError")
_OOM_WORDS = ("can't allocate memory", "defaultcpuallocator", "out of memory", "cannot allocate memory")
OUT_OF_MEMORY_ADVICE = (
    "lower what the run needs, in order: model.gradient_checkpointing: true, a smaller "
    "train.micro_batch_size (raise train.gradient_accumulation_steps to keep the effective batch), a "
    "shorter data.max_length, a smaller train.ce_chunk_size, train.optimizer: paged_adamw8bit, "
    "quant.enabled: true; for eval.py a smaller eval.batch_size or eval.max_new_tokens; or give the "
    "process more memory (ulimit -v, other jobs)")
_DETAIL_CHARS = 160


class UserError(Exception):
    """An expected, user-fixable error; `str(err)` is the single line shown to the user."""


def is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: MemoryError, torch.OutOfMemoryError, or an allocator RuntimeError."""
    if any(cls.__name__ in _OOM_TYPES for cls in type(err).__mro__):
        return True
    if isinstance(err, RuntimeError):
        head = str(err)[:2000].lower()
        return any(word in head for word in _OOM_WORDS)
    return False


def is_user_error(err: BaseException) -> bool:
    """``UserError``, a ``ValueError`` subclass raised by one of our packages (``llama.LoadError``,
    ``lora.LoRAError``, ``quant.QuantError``): the packages stand alone, so they cannot raise ours;
    or running out of memory (``is_out_of_memory``). A plain ``ValueError`` is a bug, not user input."""
    if isinstance(err, UserError) or is_out_of_memory(err):
        return True
    cls = type(err)
    ours = cls.__module__.split(".")[0] in OUR_PACKAGES
    return isinstance(err, ValueError) and cls is not ValueError and ours


def error_line(err: BaseException) -> str:
    """What a CLI prints for a user error: ``error: <message>`` on one line, whatever the message holds.

    Out of memory gets the README's advice, with the allocator's own words cut to a short detail."""
    if is_out_of_memory(err) and not isinstance(err, UserError):
        detail = " ".join(str(err)[:4 * _DETAIL_CHARS].split())
        detail = detail if len(detail) <= _DETAIL_CHARS else detail[:_DETAIL_CHARS - 3] + "..."
        return f"error: out of memory ({type(err).__name__}: {detail or 'no detail'}); {OUT_OF_MEMORY_ADVICE}"
    return "error: " + " ".join(str(err).split())


def report(err: Exception, *, show: bool = True) -> int:
    """What a CLI does with an exception it caught: a user error is printed as its one line (where
    `show`: only rank 0 of a distributed run speaks) and gives exit code 2; anything else is a bug and is
    raised again, traceback and all."""
    if not is_user_error(err):
        raise err
    if show:
        print(error_line(err), file=sys.stderr)
    return 2
