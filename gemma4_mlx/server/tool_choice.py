"""Which of a request's tools the prompt declares (`tool_choice`), and the checks
that keep a malformed declaration a 400 rather than a crash in the template."""

from __future__ import annotations

from gemma4_mlx.server.errors import APIError


def _check_declaration(tool, where: str) -> None:
    """400 for a declaration of a shape the template and the call parser cannot read
    (each of these was a 500: a string for a tool, for its parameters, for a property)."""
    fn = (tool.get("function") or tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise APIError(400, f"{where}: expected a function with a name", param="tools")
    params = fn.get("parameters") or {}
    if not isinstance(params, dict):
        raise APIError(400, f"{where}.parameters: expected an object (a JSON schema)", param="tools")
    props, required = params.get("properties") or {}, params.get("required") or []
    if not isinstance(props, dict) or not all(isinstance(v, (dict, bool)) for v in props.values()):
        raise APIError(400, f"{where}.parameters.properties: expected an object of JSON schemas", param="tools")
    if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
        raise APIError(400, f"{where}.parameters.required: expected a list of property names", param="tools")


def select_tools(tools: list[dict] | None, choice) -> list[dict] | None:
    """The tools the prompt declares for a tool_choice (auto, none, required or a named
    function: only that one); `Prompter.constraint` enforces required / named."""
    if choice == "none":
        return None
    name = (choice.get("function") or {}).get("name") or choice.get("name") if isinstance(choice, dict) else None
    if not tools:
        if isinstance(choice, dict):  # forcing a tool no one declared would be ignored
            raise APIError(400, f"tool_choice names {name!r}, but the request declares no tools", param="tool_choice")
        return None
    seen: dict = {}
    for i, t in enumerate(tools):
        _check_declaration(t, f"tools[{i}]")
        own = (t.get("function") or t).get("name")
        if own in seen:  # a call of it could not say which one it is
            raise APIError(400, f"tools[{i}]: the name {own!r} is declared twice (also tools[{seen[own]}])", "tools")
        seen[own] = i
    if isinstance(choice, dict):
        picked = [t for t in tools if (t.get("function") or t).get("name") == name]
        if not picked:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return picked
    if choice not in (None, "auto", "required", "any"):
        raise APIError(400, f"tool_choice: unknown value {choice!r}", param="tool_choice")
    return tools
