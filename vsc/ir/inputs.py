"""Files a plan names besides its model: a pass option that names a file or folder.

Such a path is resolved against the spec file's folder, as the spec's model path is (the plan
carries the spec's path in `deployment["spec"]`; a plan without one resolves against the
working directory). The json-mode pass's schema file is read and checked here, with the same
rule the server applies to a request's schema (vsc.runtime.json_schema), so the pass itself
reads no file and uses no runtime module.
"""
from __future__ import annotations

from pathlib import Path

from vsc.errors import VscError


def spec_relative_path(option: str, spec_file: str | None) -> Path:
    """`option` as written (`~` expanded), relative to the spec's folder when it is relative."""
    path = Path(option).expanduser()
    if not path.is_absolute():
        path = (Path(spec_file).parent if spec_file else Path.cwd()) / path
    return path


def load_schema(option: str, spec_file: str | None) -> str:
    """The canonical schema text for the json-mode pass's `schema` option: `any`, or a file
    resolved against the spec's folder. Raises VscError with one line naming the file."""
    from vsc.runtime.json_schema import ANY_JSON_OBJECT, SchemaError, check_schema   # torch, via runtime.api: on use

    if option == "any":
        return ANY_JSON_OBJECT
    path = spec_relative_path(option, spec_file)
    if not path.is_file():
        raise VscError(f"json-mode schema file {path} not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VscError(f"cannot read the json-mode schema file {path}: {e}") from None
    try:
        return check_schema(raw)
    except SchemaError as e:
        raise VscError(f"json-mode schema {path}: {e}") from None
