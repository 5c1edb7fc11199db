#!/usr/bin/env python3
"""Check the relative links of the book (docs/src) and of README.md.

Every Markdown link or image whose target is not a URL must name a file
that exists, and a `#anchor` must name a heading of the target Markdown
file (or of the same file), with heading ids made as mdBook makes them
(GitHub's are the same for the headings used here). `{{#include ...}}`
lines are expanded as mdBook expands them, so an included file's headings
count for the chapter that includes it and its links are checked from
there. Links inside code blocks and code spans are not links. Links to
other sites (http:, https:, mailto:) are not fetched.

For the book, also: every chapter is listed in SUMMARY.md (mdBook renders
nothing else), and no link leaves docs/src (the rendered book has only
what is in it).

Usage: check-links.py [REPO_ROOT]; exit status 1 with one line per broken
link.
"""

import os
import re
import sys

ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
BOOK_SRC = os.path.join(ROOT, "docs", "src")

INCLUDE = re.compile(r"\{\{#include\s+([^}\s]+)\s*\}\}")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
# [text](target "title") and ![alt](target); the text may hold code spans
# and nested brackets one level deep.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_LINK = re.compile(r"<a\s[^>]*href=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def read_expanded(path, seen=()):
    """The file's lines with {{#include}} expanded (mdBook's rules: a path
    relative to the including file, then optional :START:END line numbers,
    1-based and inclusive, either one optional)."""
    if path in seen:
        raise ValueError(f"{rel(path)}: includes itself")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    for line in lines:
        match = INCLUDE.search(line)
        if not match:
            out.append(line)
            continue
        spec = match.group(1)
        parts = spec.split(":")
        target = os.path.normpath(os.path.join(os.path.dirname(path), parts[0]))
        if not os.path.isfile(target):
            out.append(line)  # reported by check_includes
            continue
        included = read_expanded(target, seen + (path,))
        if len(parts) > 1 and all(p == "" or p.isdigit() for p in parts[1:3]):
            start = int(parts[1]) - 1 if parts[1] else 0
            end = int(parts[2]) if len(parts) > 2 and parts[2] else len(included)
            included = included[start:end]
        out.append(line[: match.start()] + "\n".join(included) + line[match.end():])
    return "\n".join(out).split("\n")


def outside_code(lines):
    """(line number, text) of lines outside fenced code blocks, with code
    spans blanked out."""
    fence = None
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if fence:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
            continue
        if match:
            fence = match.group(1)
            continue
        yield number, re.sub(r"(`+)(?:(?!\1).)+?\1", lambda m: " " * len(m.group(0)), line)


def heading_text(raw):
    """A heading's text as it renders: markup gone, link text kept."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]*>", "", text)
    return text


def normalize_id(text):
    """mdBook's normalize_id: alphanumerics, '_' and '-' kept (ASCII
    lowercased), whitespace to '-', the rest dropped."""
    out = []
    for ch in text.strip():
        if ch.isalnum() or ch in "_-":
            out.append(ch.lower() if ch.isascii() else ch)
        elif ch.isspace():
            out.append("-")
    return "".join(out)


def heading_ids(lines):
    ids, counts = set(), {}
    fence = None
    for line in lines:
        match = FENCE.match(line)
        if fence:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
            continue
        if match:
            fence = match.group(1)
            continue
        match = HEADING.match(line)
        if not match:
            continue
        base = normalize_id(heading_text(match.group(2)))
        n = counts.get(base, 0)
        counts[base] = n + 1
        ids.add(base if n == 0 else f"{base}-{n}")
    return ids


_ids_cache = {}


def ids_of(path):
    if path not in _ids_cache:
        _ids_cache[path] = heading_ids(read_expanded(path))
    return _ids_cache[path]


def rel(path):
    return os.path.relpath(path, ROOT)


def links(lines):
    for number, line in outside_code(lines):
        for match in INLINE_LINK.finditer(line):
            yield number, match.group(1)
        match = REFERENCE_DEF.match(line)
        if match:
            yield number, match.group(1)
        for match in HTML_LINK.finditer(line):
            yield number, match.group(1)


def check_file(path, in_book, errors):
    lines = read_expanded(path)
    for number, target in links(lines):
        where = f"{rel(path)}:{number}"
        if not target:
            errors.append(f"{where}: empty link target")
            continue
        if SCHEME.match(target) or target.startswith("//"):
            continue  # another site: not fetched
        file_part, _, anchor = target.partition("#")
        if file_part:
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
        else:
            resolved = path
        if not os.path.exists(resolved):
            errors.append(f"{where}: {target}: no such file {rel(resolved)}")
            continue
        if in_book and not (resolved + os.sep).startswith(BOOK_SRC + os.sep):
            errors.append(
                f"{where}: {target}: leaves docs/src ({rel(resolved)}), which the rendered book does not have"
            )
            continue
        if anchor:
            if not resolved.endswith(".md") or not os.path.isfile(resolved):
                errors.append(f"{where}: {target}: an anchor into a file that is not Markdown")
            elif anchor not in ids_of(resolved):
                errors.append(f"{where}: {target}: no heading with id #{anchor} in {rel(resolved)}")


def check_includes(path, errors):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            for match in INCLUDE.finditer(line):
                target = os.path.join(os.path.dirname(path), match.group(1).split(":")[0])
                if not os.path.isfile(target):
                    errors.append(f"{rel(path)}:{number}: include of a missing file {match.group(1)}")


def main():
    errors = []
    chapters = []
    for directory, _, names in os.walk(BOOK_SRC):
        chapters += [os.path.join(directory, n) for n in names if n.endswith(".md")]
    summary = os.path.join(BOOK_SRC, "SUMMARY.md")
    listed = set()
    for _, target in links(read_expanded(summary)):
        listed.add(os.path.normpath(os.path.join(BOOK_SRC, target.partition("#")[0])))
    for chapter in sorted(chapters):
        if chapter != summary and chapter not in listed:
            errors.append(f"{rel(chapter)}: not in docs/src/SUMMARY.md, so not in the book")
        check_includes(chapter, errors)
        check_file(chapter, True, errors)
    check_file(os.path.join(ROOT, "README.md"), False, errors)
    for error in errors:
        print(error)
    sys.stdout.flush()
    checked = len(chapters) + 1
    if errors:
        print(f"check-links: {len(errors)} broken link(s) in {checked} files", file=sys.stderr)
        return 1
    print(f"check-links: every relative link and anchor resolves ({checked} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
