"""The documentation beside the code: README.md and docs/*.md.

* every relative link points at a file that exists (and, with ``#anchor``, at a heading of that file,
  slugged as GitHub slugs headings);
* every configuration key of :class:`gateway.config.GatewayConfig` is in docs/configuration.md as a
  backticked key path (config -> docs only: a key may be documented before the code has it);
* every ``docs/*.md`` page the code names (the montage table header points admins at docs/montage.md)
  exists.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from gateway.config import GatewayConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``#`` comment in a shell example is no heading)."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def _without_inline_code(line: str) -> str:
    return re.sub(r"`+[^`]*`+", "", line)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation removed (letters,
    digits, ``_``, ``-`` and spaces kept), spaces turned into hyphens (runs are not collapsed)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _emphasis_ markers, not snake_case
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    for m in re.finditer(r"<a\s+(?:name|id)=\"([^\"]+)\"", path.read_text(encoding="utf-8")):
        out.add(m.group(1))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    text = path.read_text(encoding="utf-8")
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        prose = _without_inline_code(line)
        out += [(number, m.group(1)) for m in _LINK.finditer(prose)]
        out += [(number, m.group(1)) for m in _IMAGE.finditer(prose)]
    return out


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target))  # http:, https:, mailto:, file:


def test_pages_exist():
    names = {p.name for p in PAGES}
    for name in ("admin-guide.md", "integration-guide.md", "researcher-guide.md", "montage.md",
                 "configuration.md", "architecture.md", "index.md"):
        assert name in names, f"docs/{name} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    problems = []
    for line, target in links(page):
        if _is_external(target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = page if not path_part else (page.parent / path_part).resolve()
        if not dest.exists():
            problems.append(f"{page.name}:{line}: {target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{page.name}:{line}: {target}: no heading with anchor #{anchor} in {dest.name}")
    assert not problems, "\n".join(problems)


def test_slugs_follow_github():
    assert github_slug("Installing as a service (systemd)") == "installing-as-a-service-systemd"
    assert github_slug("Where psg-gateway differs from the SleepFM release, and why") == \
        "where-psg-gateway-differs-from-the-sleepfm-release-and-why"
    assert github_slug("`montage test FILE|DIR...`") == "montage-test-filedir"
    assert github_slug("Delivery guarantee: at least once") == "delivery-guarantee-at-least-once"
    assert github_slug("pipeline_retry and *emphasis*") == "pipeline_retry-and-emphasis"


def _models_in(annotation: object) -> list[tuple[type[BaseModel], bool]]:
    """The pydantic models an annotation holds, each with whether it is a list of them."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    if origin in (list, tuple, set, frozenset) and args:
        return [(m, True) for m, _ in _models_in(args[0])]
    if origin in (typing.Union, types.UnionType, typing.Annotated) and args:
        out = []
        for arg in args:
            out += _models_in(arg)
        return out
    return []


def config_keys(model: type[BaseModel] = GatewayConfig, prefix: str = "") -> list[str]:
    """Every key path of the configuration: ``dicom.tls.enabled``, ``drop_folders[].path`` ..."""
    out = []
    for name, field in model.model_fields.items():
        if field.exclude:  # not a key of the file (base_dir: the file's own folder)
            continue
        path = f"{prefix}{name}"
        nested = _models_in(field.annotation)
        if nested:
            for sub, is_list in nested:
                out += config_keys(sub, path + ("[]." if is_list else "."))
        else:
            out.append(path)
    return sorted(set(out))


def test_config_keys_walk_the_models():
    keys = config_keys()
    for key in ("site", "hl7.delivery_lease_seconds", "dicom.tls.require_client_cert", "drop_folders[].path",
                "dicom.allowed_callers[].host", "flags.outcomes[].percentile", "batch.workers"):
        assert key in keys
    assert "base_dir" not in keys


def test_every_config_key_is_documented():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z_][a-z0-9_]*(?:(?:\[\])?\.[a-z_][a-z0-9_]*)*)`", text))
    missing = [k for k in config_keys() if k not in documented]
    assert not missing, f"keys of gateway/config.py missing from docs/configuration.md: {missing}"


def test_docs_pages_named_in_the_code_exist():
    named: dict[str, list[str]] = {}
    for path in sorted((ROOT / "gateway").rglob("*")):
        if path.suffix not in (".py", ".yaml", ".yml", ".toml", ".txt", ".json") or not path.is_file():
            continue
        for m in re.finditer(r"\bdocs/[\w./-]+\.md\b", path.read_text(encoding="utf-8", errors="replace")):
            named.setdefault(m.group(0), []).append(str(path.relative_to(ROOT)))
    assert "docs/montage.md" in named, "the montage table header no longer names docs/montage.md"
    missing = {page: where for page, where in named.items() if not (ROOT / page).is_file()}
    assert not missing, f"pages the code points to that do not exist: {missing}"
