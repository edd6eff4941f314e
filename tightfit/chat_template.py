"""Chat templates, rendered with bounds. A model's chat template is code from the model file; transformers runs it
in jinja's sandbox, which stops it from reaching Python's internals but not from running for hours
(`{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}`) or building a gigabyte string
(`{{ 'x' * 10**9 }}`, `{{ 'x'|center(10**9) }}`) that the tokenizer then chews on.

`render` renders the template in a bounded copy of transformers' sandbox (same globals, filters and variables, so
the same text as tokenizer.apply_chat_template): every string or list it builds with an operator, a filter or a
method stays under a size limit, the template's own code runs at most a number of steps (loop iterations,
statements), and its output stays under the limit. A template past a limit, or one that refuses the
conversation, raises ChatTemplateError.
"""

from __future__ import annotations

import functools
import re
import sys
import threading

from .errors import TightfitError

MAX_STEPS = 2_000_000  # lines of the compiled template executed: ~1 s of jinja; real templates take a few thousand
MIN_OUTPUT = 1_000_000  # characters of output allowed whatever the conversation's size
OUTPUT_PER_INPUT = 4  # ... plus this many per character of the messages and tools
TOTAL_PER_OUTPUT = 16  # all the strings and lists it builds, over the output limit


class ChatTemplateError(TightfitError, ValueError):
    """The model's chat template refused the conversation or ran past its bounds."""


class _Limit(Exception):
    pass


def _size(x) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else 0


def _input_chars(obj) -> int:
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_input_chars(k) + _input_chars(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_input_chars(v) for v in obj)
    return 8


_NUMBER = re.compile(r"\d+")


class _Bounds:
    """What one render may do: build values of at most `max_size` items each and `max_total` in all, run
    `max_steps` lines of the compiled template."""

    def __init__(self, max_size: int, max_steps: int):
        self.max_size, self.max_total, self.max_steps = max_size, TOTAL_PER_OUTPUT * max_size, max_steps
        self.steps = self.built = 0

    def refuse_over(self, n: int, what: str) -> None:
        if n > self.max_size:
            raise _Limit(f"{what} would build {n:,} items, over the limit of {self.max_size:,}")

    def check_args(self, what: str, args, kwargs, receiver=None) -> None:
        """Before a filter or method runs: no width or count past the limit, no format string asking for one,
        and no result that can be seen to be too large from its inputs (joins, replaces, indents)."""
        values = (*args, *kwargs.values())
        for a in values:
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.max_size:
                raise _Limit(f"{what} was given {a:,}, over the limit of {self.max_size:,}")
            if isinstance(a, (list, tuple)):
                self.refuse_over(sum(_size(x) for x in a), what)
        strings = [x for x in (receiver, *values) if isinstance(x, str)]
        for text in strings:
            if any(len(d) > 7 for d in _NUMBER.findall(text)) and ("%" in text or "{" in text):
                raise _Limit(f"{what} was given a format or text with a number over the limit")
        if what.endswith("replace()") or what.endswith("'replace'"):  # every match of `old` becomes `new`
            text, _, new = (strings + ["", "", ""])[:3]
            self.refuse_over(len(text) + (len(text) + 1) * len(new), what)
        if what.endswith("'indent'") and strings:
            width = next((a for a in values if isinstance(a, int) and not isinstance(a, bool)), 4)
            self.refuse_over(len(strings[0]) + strings[0].count("\n") * max(width, 0), what)

    def check_result(self, what: str, value):
        n = _size(value)
        self.built += n
        if n > self.max_size:
            raise _Limit(f"{what} built a value of {n:,} items, over the limit of {self.max_size:,}")
        if self.built > self.max_total:
            raise _Limit(f"it built {self.built:,} items in all, over the limit of {self.max_total:,}")
        return value

    def binop(self, op: str, left, right):
        if op == "**" and isinstance(right, (int, float)) and abs(right) > 64 and isinstance(left, (int, float)) \
                and abs(left) > 1:
            raise _Limit(f"{left} ** {right} is too large to compute")
        if op == "*":
            n = right if isinstance(right, int) else left if isinstance(left, int) else 1
            if isinstance(n, int) and not isinstance(n, bool):
                self.refuse_over((_size(left) or _size(right)) * max(n, 0), f"a repetition x {n:,}")
        if op == "+":
            self.refuse_over(_size(left) + _size(right), "a concatenation")
        if op == "%" and isinstance(left, str):
            self.check_args("the operator '%'", (right,) if not isinstance(right, tuple) else right, {}, left)

    def tracer(self, previous=None):
        """A sys.settrace function that counts the lines the compiled template runs (its frames are named
        '<template>'), chained to the tracer that was there (coverage, a debugger) so that one keeps working."""
        def trace(frame, event, arg):
            inner = previous(frame, event, arg) if previous is not None else None
            mine = frame.f_code.co_filename == "<template>"
            if not mine and inner is None:
                return None

            def local(frame, event, arg):
                nonlocal inner
                if mine and event == "line":
                    self.steps += 1
                    if self.steps > self.max_steps:
                        raise _Limit(f"it ran {self.max_steps:,} steps without finishing")
                if inner is not None:
                    inner = inner(frame, event, arg)
                return local
            return local
        return trace


def _transformers_environment():
    """A fresh copy of the environment transformers renders chat templates in (its globals such as
    raise_exception and namespace, its tojson filter, its generation tag, trim_blocks/lstrip_blocks), made by
    compiling an empty template: the model's own template is never compiled there, since jinja folds constant
    expressions at compile time and an unbounded environment would build `{{ 'x'|center(10**9) }}` there."""
    try:
        from transformers.utils.chat_template_utils import _cached_compile_jinja_template

        return _cached_compile_jinja_template("").environment
    except ImportError:
        import json

        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        return env


_current = threading.local()  # the bounds of the render running in this thread


@functools.lru_cache(maxsize=1)
def _bounded_environment():
    """transformers' chat-template environment with its operators, filters and calls bounded by the running
    render's bounds (constant folding at compile time included: a bounded filter that refuses is left for run
    time, where it refuses again)."""
    env = _transformers_environment()
    env.filters = {name: _bounded_callable(f, f"the filter {name!r}") for name, f in env.filters.items()}
    env.intercepted_binops = frozenset({"*", "**", "+", "%"})
    sandbox_binop, sandbox_call = env.call_binop, env.call

    def call_binop(context, operator, left, right):
        _current.bounds.binop(operator, left, right)
        return _current.bounds.check_result(f"the operator {operator!r}",
                                            sandbox_binop(context, operator, left, right))

    def call(__context, __obj, *args, **kwargs):
        what = f"{getattr(__obj, '__qualname__', type(__obj).__name__)}()"
        receiver = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # the sandbox wraps str.format
        _current.bounds.check_args(what, args, kwargs, receiver)
        return _current.bounds.check_result(what, sandbox_call(__context, __obj, *args, **kwargs))

    env.call_binop, env.call = call_binop, call
    env.concat = functools.partial(_bounded_join, what="a captured block")  # {% set %}...{% endset %}, {% call %}
    return env


def _bounded_join(pieces, what: str = "the operator '~'") -> str:
    """"".join of the pieces' text, refused before it joins past the size limit (jinja's `~` and captured blocks)."""
    pieces = [str(p) for p in pieces]
    _current.bounds.refuse_over(sum(map(len, pieces)), what)
    return _current.bounds.check_result(what, "".join(pieces))


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    """The model's template compiled in the bounded environment (the compiled module's ~ bounded too)."""
    template = _bounded_environment().from_string(source)
    template.root_render_func.__globals__["str_join"] = _bounded_join  # the compiled template's own namespace
    return template


def _bounded_callable(f, what: str):
    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def wrapped(*args, **kwargs):
        _current.bounds.check_args(what, [a for a in args if not hasattr(a, "environment")], kwargs)
        return _current.bounds.check_result(what, f(*args, **kwargs))
    return wrapped


def render_source(source: str, context: dict, *, max_steps: int = MAX_STEPS) -> str:
    """`source` rendered with `context` under the bounds, or ChatTemplateError."""
    limit = MIN_OUTPUT + OUTPUT_PER_INPUT * _input_chars(context)
    bounds = _current.bounds = _Bounds(limit, max_steps)
    _bounded_environment()  # built outside the guard below: an error in tightfit's own code is not the template's
    previous = sys.gettrace()
    sys.settrace(bounds.tracer(previous))
    try:
        out, n = [], 0
        for piece in _compiled(source).generate(**context):
            n += len(piece)
            if n > limit:
                raise _Limit(f"its output passed {limit:,} characters")
            out.append(piece)
        return "".join(out)
    except _Limit as e:
        raise ChatTemplateError(f"the model's chat template was stopped: {e}. A chat template should only lay out "
                                "the conversation; fix or replace the template (tokenizer_config.json's "
                                "chat_template, or the GGUF's tokenizer.chat_template).") from None
    except Exception as e:  # the template is code: whatever its compile or run raises is its refusal
        # (raise_exception, a SyntaxError jinja's compiler makes of `{% break %}` outside a loop, a TypeError)
        if _raised_here(e):
            raise
        raise ChatTemplateError(f"the model's chat template refused these messages: {e}") from None
    finally:
        sys.settrace(previous)


def _raised_here(e: Exception) -> bool:
    """A NameError in this module's own code is tightfit's bug, not the template's refusal (jinja resolves a
    template's unknown names to Undefined; it never raises NameError)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return isinstance(e, NameError) and tb is not None and tb.tb_frame.f_code.co_filename == __file__


def render(tokenizer, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
           **kwargs) -> str:
    """The conversation laid out by the tokenizer's chat template, as transformers' apply_chat_template(...,
    tokenize=False) lays it out (the same environment and variables: the special tokens, `messages`, `tools`,
    `add_generation_prompt`, extra keyword arguments such as enable_thinking), under bounds; ChatTemplateError
    if the template refuses the conversation or runs past them. `messages` are plain dicts."""
    try:
        source = tokenizer.get_chat_template(None, tools)
    except ValueError as e:
        raise ChatTemplateError(f"the model has no usable chat template: {e}") from None
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    context = {**getattr(tokenizer, "special_tokens_map", {}), **kwargs, "messages": messages, "tools": tools,
               "documents": None, "add_generation_prompt": add_generation_prompt}
    return render_source(source, context)
