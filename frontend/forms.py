"""v1 multipart forms -> the same pydantic models as v2 JSON, with Fooocus-API's parsing rules
(§2.10 of the contract) and 422s that name the field instead of its 500s.

  style_selections   each value split on ',' and stripped; an empty value means []
  loras              a JSON array string of Lora objects; '' means []
  advanced_params    a JSON object string; '' or missing means defaults
  outpaint_selections split on ','; the same field may also repeat
  booleans           true/false/True/1/0/yes/no/on/off (pydantic's lax parsing)
  files              optional ones may be absent, or sent as an empty text field
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

LIST_FIELDS_SPLIT = {"style_selections", "outpaint_selections"}
JSON_FIELDS = {"loras": list, "advanced_params": dict}


def _error(field: str, kind: str, msg: str, value: Any) -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ("body", field), "msg": msg, "input": value}])


def _split(values: list[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


async def read_form(request: Request, model: type[BaseModel], file_fields: dict[str, bool],
                    ignore: set[str] = frozenset()) -> tuple[BaseModel, dict[str, UploadFile | None]]:
    """Parse and validate a v1 form. file_fields maps each file field to whether it is required."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise RequestValidationError([{"type": "model_attributes_type", "loc": ("body",),
                                       "msg": "Input should be multipart/form-data", "input": None}])
    try:
        form = await request.form()
    except Exception as exc:  # malformed multipart
        raise RequestValidationError([{"type": "value_error", "loc": ("body",),
                                       "msg": f"Invalid form data: {exc}", "input": None}]) from None
    files: dict[str, UploadFile | None] = {}
    for name, required in file_fields.items():
        value = form.get(name)
        files[name] = value if isinstance(value, UploadFile) and (value.filename or value.size) else None
        if required and files[name] is None:
            raise _error(name, "missing", "Field required (an uploaded file)", None)

    data: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name in file_fields or name in ignore or name not in form:
            continue
        values = [v for v in form.getlist(name) if isinstance(v, str)]
        if not values:
            continue
        if name in LIST_FIELDS_SPLIT:
            data[name] = _split(values)
        elif name in JSON_FIELDS:
            raw = values[-1].strip()
            if raw == "":
                data[name] = JSON_FIELDS[name]()
                continue
            try:
                data[name] = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _error(name, "json_invalid", f"Invalid JSON: {exc.msg}", raw) from None
        elif len(values) > 1 and _is_list(field.annotation):
            data[name] = values
        else:
            value = values[-1]
            data[name] = None if value == "" and _is_optional(field.annotation) else value
    try:
        return model.model_validate(data), files
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from None


def _is_list(annotation) -> bool:
    return getattr(annotation, "__origin__", None) is list


def _is_optional(annotation) -> bool:
    return type(None) in getattr(annotation, "__args__", ())


def form_openapi(model: type[BaseModel], file_fields: dict[str, bool]) -> dict:
    """The multipart request body of a v1 route for the OpenAPI document."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    props = {}
    for name, prop in schema.get("properties", {}).items():
        if name in JSON_FIELDS:
            prop = {"type": "string", "title": prop.get("title", name),
                    "description": f"a JSON {'array' if JSON_FIELDS[name] is list else 'object'} string"}
        elif name in LIST_FIELDS_SPLIT:
            prop = {"type": "string", "title": prop.get("title", name), "description": "comma-separated"}
        props[name] = prop
    for name, required in file_fields.items():
        props[name] = {"type": "string", "format": "binary", "title": name}
    required = [n for n in schema.get("required", []) if n not in file_fields]
    required += [n for n, r in file_fields.items() if r]
    body = {"type": "object", "properties": props, "required": required}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}}
