"""The JSON-schema subset that tool parameters may use, and a validator for tool arguments."""

from typing import Any

# Keywords the validator enforces, plus annotations it may ignore. A schema using anything else
# is refused at registration, so no one believes a constraint is checked when it is not.
_CHECKED = {"type", "properties", "required", "enum", "items", "additionalProperties", "minimum", "maximum"}
_ANNOTATIONS = {"description", "title", "default", "examples"}
_TYPES = {"object", "string", "number", "integer", "boolean", "array", "null"}


def check_schema(schema: Any, path: str = "parameters") -> None:
    """Raise ValueError if `schema` uses anything outside the supported subset."""
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a schema must be a JSON object, got {type(schema).__name__}")
    unknown = set(schema) - _CHECKED - _ANNOTATIONS
    if unknown:
        raise ValueError(
            f"{path}: unsupported schema keywords {sorted(unknown)}; supported: {sorted(_CHECKED | _ANNOTATIONS)}"
        )
    kind = schema.get("type")
    if kind is not None and kind not in _TYPES:
        raise ValueError(f"{path}: unknown type {kind!r}; use one of {sorted(_TYPES)}")
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise ValueError(f"{path}: enum must be a list")
    for name, sub in schema.get("properties", {}).items():
        check_schema(sub, f"{path}.properties.{name}")
    if "items" in schema:
        check_schema(schema["items"], f"{path}.items")
    if not isinstance(schema.get("additionalProperties", True), bool):
        raise ValueError(f"{path}: additionalProperties must be true or false")
    missing = set(schema.get("required", [])) - set(schema.get("properties", {}))
    if missing:
        raise ValueError(f"{path}: required names {sorted(missing)} are not in properties")


def _type_error(value: Any, kind: str) -> bool:
    # bool is an int subclass in Python but not a number in JSON.
    match kind:
        case "object":
            return not isinstance(value, dict)
        case "array":
            return not isinstance(value, list)
        case "string":
            return not isinstance(value, str)
        case "boolean":
            return not isinstance(value, bool)
        case "integer":
            return isinstance(value, bool) or not isinstance(value, int)
        case "number":
            return isinstance(value, bool) or not isinstance(value, (int, float))
        case _:
            return value is not None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def validate(value: Any, schema: dict[str, Any], path: str = "arguments") -> str | None:
    """Return the first violation of `schema` by `value` as a readable message, or None."""
    kind = schema.get("type")
    if kind is not None and _type_error(value, kind):
        return f"{path}: expected {kind}, got {_json_type(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path}: {value!r} is not one of {schema['enum']}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{path}: {value} is less than the minimum {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{path}: {value} is greater than the maximum {schema['maximum']}"
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                return f"{path}: missing required property {name!r}"
        if schema.get("additionalProperties", True) is False:
            extra = sorted(set(value) - set(properties))
            if extra:
                return f"{path}: unexpected properties {extra}; allowed: {sorted(properties)}"
        for name, sub in properties.items():
            if name in value:
                error = validate(value[name], sub, f"{path}.{name}")
                if error:
                    return error
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            error = validate(item, schema["items"], f"{path}[{index}]")
            if error:
                return error
    return None
