"""Structured outputs and tool calls: JSON schemas and tool choices become grammars that constrain generation
through token masks (llguidance: the engine behind llama.cpp's and vLLM's structured outputs), and a model's
answer becomes OpenAI `tool_calls`.

A constrained tool call (`tool_choice` "required" or a named function) is a JSON array of
{"name": ..., "arguments": {...}} objects, each checked against its function's parameters schema (one object for a
named function). With `tool_choice` "auto" the model writes freely and its answer is parsed: Hermes/Qwen-style
`<tool_call>{...}</tool_call>` blocks, or an answer that is exactly such a JSON object or array of calls to
known tools, become `tool_calls`; anything else is content.
"""

from __future__ import annotations

import json
import re
import uuid

import torch

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: a small model cannot pad it with endless spaces


class GrammarError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Constraint:
    """One request's grammar state: masks the logits, then consumes the sampled token."""

    def __init__(self, matcher, vocab: int):
        self.m, self.vocab = matcher, vocab
        self.shifts = torch.arange(32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        words = torch.frombuffer(bytearray(self.m.compute_bitmask()), dtype=torch.int32)
        allowed = ((words[:, None] >> self.shifts) & 1).flatten()[: logits.numel()].bool()
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more."""
        return self.m.is_stopped()


class Grammars:
    """Builds Constraints for one tokenizer (the llguidance view of it is made once, on first use: ~1 s)."""

    def __init__(self, tokenizer, vocab: int, eos_ids: set[int]):
        self.hf, self.vocab, self.eos = tokenizer, vocab, sorted(eos_ids)
        self._ll = None

    @property
    def ll(self):
        if self._ll is None:
            import llguidance.hf

            self._ll = llguidance.hf.from_tokenizer(self.hf, n_vocab=self.vocab, eos_token=self.eos or None)
        return self._ll

    def from_schema(self, schema: dict, param: str) -> Constraint:
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"{param} is not a usable JSON schema: {e}", param) from None
        err = llguidance.LLMatcher.validate_grammar(grammar, self.ll)
        if err and not err.startswith("WARNING"):
            raise GrammarError(f"{param} is not a usable JSON schema: {err}", param)
        matcher = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{param} is not a usable JSON schema: {matcher.get_error()}", param)
        return Constraint(matcher, self.vocab)


def response_schema(fmt) -> tuple[dict, str] | None:
    """(JSON schema, the request field it came from) of a response_format, or None for plain text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}, "response_format"
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise GrammarError("response_format.json_schema.schema is required when response_format.type is "
                           "'json_schema'.", "response_format.json_schema.schema")
    return fmt.json_schema.schema_, "response_format.json_schema.schema"


def check_tools(tools) -> None:
    for i, t in enumerate(tools or []):
        if t.function.parameters is None:
            raise GrammarError(f"tools[{i}].function.parameters is missing: give the function's arguments as a "
                               'JSON schema ({"type": "object", "properties": {}} for none).',
                               f"tools[{i}].function.parameters")
        if not isinstance(t.function.parameters, dict) or t.function.parameters.get("type", "object") != "object":
            raise GrammarError(f"tools[{i}].function.parameters must be a JSON schema of type 'object'.",
                               f"tools[{i}].function.parameters")


def tool_schema(tools, choice, parallel: bool = True) -> tuple[dict, str] | None:
    """The schema a constrained tool call follows, or None where the model answers freely. A named choice, or
    `parallel_tool_calls: false`, allows exactly one call."""
    if not tools or choice in (None, "auto", "none"):
        return None
    fns = [t.function for t in tools]
    if not isinstance(choice, str):
        fns = [f for f in fns if f.name == choice.function.name]
        if not fns:
            raise GrammarError(f"tool_choice names the function '{choice.function.name}', which is not in tools "
                               f"({', '.join(t.function.name for t in tools)}).", "tool_choice")
    call = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
             "required": ["name", "arguments"], "additionalProperties": False} for f in fns]
    items = call[0] if len(call) == 1 else {"anyOf": call}
    schema = {"type": "array", "items": items, "minItems": 1}
    if not isinstance(choice, str) or not parallel:
        schema["maxItems"] = 1
    return schema, "tools"


def tool_instructions(tools) -> str:
    """A system message describing the tools, for chat templates that do not render tools themselves."""
    listing = "\n".join(json.dumps({"name": t.function.name, "description": t.function.description or "",
                                    "parameters": t.function.parameters}) for t in tools)
    return ("You can call these functions:\n" + listing + "\nTo call functions, answer with only a JSON array of "
            'calls: [{"name": "<function name>", "arguments": {<arguments>}}]. Otherwise answer normally.')


def template_renders_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def _json_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def render_chat(tokenizer, messages, tools) -> tuple[list[dict], dict]:
    """(messages, apply_chat_template keyword arguments) for a conversation with `tools` in play (or None).
    A template with a tools section gets the tools, earlier calls and tool results as it expects them; any other
    gets the tools as a system message, calls as the JSON it was asked to answer with, results as user turns."""
    native = template_renders_tools(tokenizer)
    names = {c.id: c.function.name for m in messages for c in (m.tool_calls or [])}
    out = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _json_or_text(c.function.arguments)} for c in m.tool_calls]
            if native:
                out.append({"role": "assistant", "content": m.text(), "tool_calls": [
                    {"id": c.id, "type": "function", "function": call} for c, call in zip(m.tool_calls, calls)]})
            else:
                out.append({"role": "assistant", "content": json.dumps(calls)})
        elif m.role == "tool" and native:
            out.append({"role": "tool", "content": m.text(), "tool_call_id": m.tool_call_id})
        elif m.role == "tool":
            out.append({"role": "user", "content": f"Result of {names.get(m.tool_call_id, m.name or 'the tool')}: "
                                                   f"{m.text()}"})
        else:
            out.append({"role": m.role, "content": m.text()})
    if tools and native:
        return out, {"tools": [t.model_dump(exclude_none=True) for t in tools]}
    if tools:
        out.insert(0, {"role": "system", "content": tool_instructions(tools)})
    return out, {}


def _calls_of(obj, names: set[str]) -> list[dict] | None:
    objs = obj if isinstance(obj, list) else [obj]
    calls = []
    for o in objs:
        if not isinstance(o, dict) or o.get("name") not in names:
            return None
        args = o.get("arguments", o.get("parameters", {}))
        calls.append({"name": o["name"], "arguments": args})
    return calls or None


def parse_tool_calls(text: str, tools) -> list[dict] | None:
    """The tool calls in a model's answer, or None when it is a plain answer."""
    names = {t.function.name for t in tools}
    blocks = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)
    candidates = blocks or [re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())]
    calls = []
    for c in candidates:
        try:
            found = _calls_of(json.loads(c), names)
        except json.JSONDecodeError:
            return None
        if found is None:
            return None
        calls += found
    return calls or None


def openai_tool_calls(calls: list[dict]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]


class ToolCallStream:
    """OpenAI `delta.tool_calls` entries from a constrained tool-call answer as it is generated: the answer is a
    JSON array of {"name": ..., "arguments": {...}} objects (tool_schema), so a call's id and name go out once its
    name string closes and its arguments text goes out as it arrives (raw JSON text; concatenated it parses).
    A character scanner tracks depth and strings; nothing is re-parsed."""

    def __init__(self):
        self.depth, self.in_str, self.esc = 0, False, False
        self.index = -1  # the current call
        self.key = self.value = None  # the current key of the call object, and its value text so far
        self.expect_key = False
        self.name = None
        self.args = ""  # arguments text not yet sent (before the name is known)
        self.args_depth = None  # depth at which the arguments object opened

    def feed(self, text: str) -> list[dict]:
        out: list[dict] = []
        for ch in text:
            self._char(ch, out)
        return out

    def _emit_args(self, s: str, out: list) -> None:
        if self.name is None:
            self.args += s
        elif s:
            out.append({"index": self.index, "function": {"arguments": s}})

    def _char(self, ch: str, out: list) -> None:
        if self.args_depth is not None:  # inside the arguments value: pass it through
            self._emit_args(ch, out)
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
                return
            if ch == '"':
                self.in_str, self.esc = True, False
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == self.args_depth - 1:
                    self.args_depth, self.key = None, None
            return
        if self.in_str:  # a key or the name's value
            if self.esc:
                self.esc = False
                self.value += ch
            elif ch == "\\":
                self.esc = True
                self.value += ch
            elif ch == '"':
                self.in_str = False
                self._string_done(out)
            else:
                self.value += ch
            return
        if ch == '"':
            self.in_str, self.value = True, ""
        elif ch == "{":
            self.depth += 1
            if self.depth == 2:  # a call object
                self.index += 1
                self.name, self.args, self.key, self.expect_key = None, "", None, True
            elif self.key == "arguments":
                self.args_depth = self.depth
                self._emit_args(ch, out)
        elif ch == "[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
        elif ch == "," and self.depth == 2:
            self.expect_key, self.key = True, None

    def _string_done(self, out: list) -> None:
        if self.depth != 2:
            return
        if self.expect_key:
            self.key, self.expect_key = json.loads(f'"{self.value}"'), False
            return
        if self.key == "name":
            self.name = json.loads(f'"{self.value}"')
            out.append({"index": self.index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                        "function": {"name": self.name, "arguments": ""}})
            if self.args:
                out.append({"index": self.index, "function": {"arguments": self.args}})
                self.args = ""
