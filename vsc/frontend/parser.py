"""Parse a deployment spec (`.vs`) into the checked AST of `vsc.frontend.spec`.

Each concern has its module:

1. Syntax (`vsc.frontend.syntax`): `vsc/grammar/vs.lark`, parsed by lark, turned into plain
   item nodes with positions.
2. Syntax errors (`vsc.frontend.diagnostics`): lark's exceptions become SpecErrors with a
   readable message ("expected '}' but found end of file").
3. Meaning (`vsc.frontend.semantics`, against the tables of `vsc.frontend.schema`): which
   names may appear, in which shape, with which values and units. Every mistake is a
   SpecError at the line:column of the offending token; nothing else escapes.
4. The model (`vsc.frontend.model_folder`): the GGUF file or Hugging Face folder the spec
   names, and its config.

Paths in the spec (the model folder, the dataset) are relative to the spec file's
folder. Locations carry the file name as the user gave it.
"""
from __future__ import annotations

from pathlib import Path

from vsc.errors import SourceLocation, SpecError
from vsc.frontend.semantics import check
from vsc.frontend.spec import DeploymentSpec
from vsc.frontend.syntax import parse_items


def parse_spec_file(path: str | Path) -> DeploymentSpec:
    """Read and check the spec at `path`."""
    path = Path(path)
    where = SourceLocation(str(path), 1, 1)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("spec file not found", where) from None
    except UnicodeDecodeError as e:
        raise SpecError(f"spec file is not valid UTF-8 text ({e.reason} at byte {e.start})", where) from None
    except OSError as e:
        raise SpecError(f"cannot read spec file: {e.strerror or e}", where) from None
    return parse_spec_text(text, path)


def parse_spec_text(text: str, file: str | Path) -> DeploymentSpec:
    """Parse and check spec `text`; `file` names it in locations and anchors relative paths."""
    return check(text, Path(file), parse_items(text, str(file)))
