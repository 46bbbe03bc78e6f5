#!/usr/bin/env python3
"""Fails when the modules of a crate form a cycle.

    scripts/module-cycles.py sidecar/src        # check a crate's src/
    scripts/module-cycles.py --self-test        # prove the check catches a cycle

The unit is a top-level module: `src/x.rs` or the directory `src/x/` (its files are one
concern and may use each other). An edge a -> b is any `crate::b` path in a's code outside
`#[cfg(test)]` modules, including grouped imports (`use crate::{b::T, c}`) and `$crate::b` in
macros. A `crate::Name` that is not a module (a re-export from lib.rs) is refused too, so every
dependency is spelled where it lives. Exit status 1 lists each cycle with one example use per
edge.
"""

import os
import re
import sys
import tempfile

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def strip_comments_and_strings(src):
    """Blanks comments and string/char literal contents, keeping offsets and newlines."""
    out = list(src)
    i, n = 0, len(src)

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif c == "r" and re.match(r'r#*"', src[i:i + 10]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'r(#*)"', src[i:])
            end = '"' + m.group(1)
            j = src.find(end, i + len(m.group(0)))
            j = n if j < 0 else j + len(end)
            blank(i + 1, j)
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            blank(i + 1, j)
            i = j + 1
        elif c == "'":
            # A char literal ('x', '\n', '{') — not a lifetime ('a).
            m = re.match(r"'(\\.[^']*|[^'\\])'", src[i:])
            if m:
                blank(i + 1, i + len(m.group(0)) - 1)
                i += len(m.group(0))
            else:
                i += 1
        else:
            i += 1
    return "".join(out)


def matching_brace(src, open_at):
    depth = 0
    for k in range(open_at, len(src)):
        if src[k] == "{":
            depth += 1
        elif src[k] == "}":
            depth -= 1
            if depth == 0:
                return k
    return len(src) - 1


def strip_test_modules(src):
    """Blanks `#[cfg(test)] mod x { ... }` (and `#[cfg(test)] pub(crate) mod x { ... }`)."""
    pat = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+\w+\s*\{")
    while True:
        m = pat.search(src)
        if not m:
            return src
        end = matching_brace(src, m.end() - 1)
        src = src[: m.start()] + re.sub(r"[^\n]", " ", src[m.start(): end + 1]) + src[end + 1:]


def grouped(src, open_at):
    """First path segment of each item of the group `{...}` starting at `open_at`."""
    close = matching_brace(src, open_at)
    body, depth, items, cur = src[open_at + 1: close], 0, [], ""
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    names = []
    for it in items:
        m = IDENT.search(it)
        if m:
            names.append(m.group(0))
    return names


def uses(src):
    """(name, offset) of every `crate::name` in `src`."""
    found = []
    for m in re.finditer(r"(?<![A-Za-z0-9_])\$?crate\s*::\s*", src):
        rest = m.end()
        if rest < len(src) and src[rest] == "{":
            for name in grouped(src, rest):
                found.append((name, m.start()))
        else:
            n = IDENT.match(src, rest)
            if n:
                found.append((n.group(0), m.start()))
    return found


def modules(src_dir):
    """{module: [file, ...]} for the top-level modules of a crate's src/."""
    mods = {}
    for entry in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            mods.setdefault(entry[:-3], []).append(path)
        elif os.path.isdir(path):
            for root, _, files in os.walk(path):
                for f in sorted(files):
                    if f.endswith(".rs"):
                        mods.setdefault(entry, []).append(os.path.join(root, f))
    return mods


def graph(src_dir):
    """({module: {dep: example}}, [errors])."""
    mods = modules(src_dir)
    edges, errors = {m: {} for m in mods}, []
    for m, files in mods.items():
        for f in files:
            with open(f, encoding="utf-8") as fh:
                raw = fh.read()
            code = strip_test_modules(strip_comments_and_strings(raw))
            for name, at in uses(code):
                line = code.count("\n", 0, at) + 1
                where = f"{os.path.relpath(f, src_dir)}:{line}"
                if name == m or name == "self":
                    continue
                if name not in mods:
                    errors.append(f"{where}: crate::{name} is not a module; import it from the module that defines it")
                    continue
                edges[m].setdefault(name, where)
    return edges, errors


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def check(src_dir):
    edges, errors = graph(src_dir)
    for e in errors:
        print(e)
    found = cycles(edges)
    for comp in found:
        print(f"cycle among {len(comp)} modules: {' '.join(comp)}")
        members = set(comp)
        for a in comp:
            for b, where in sorted(edges[a].items()):
                if b in members:
                    print(f"  {a} -> {b}   ({where})")
    if not errors and not found:
        order = len(edges)
        print(f"{src_dir}: {order} modules, no cycle")
    return 1 if errors or found else 0


def self_test():
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "b"))
        files = {
            "lib.rs": "pub mod a; pub mod b; pub mod c;",
            "a.rs": "use crate::{b::{X, Y}, c};\n// crate::zzz in a comment is ignored\n",
            "b/mod.rs": "pub mod inner;\nfn f() -> &'static str { \"crate::zzz\" }\n",
            "b/inner.rs": "use crate::b::X; // within b\n#[cfg(test)]\nmod tests { use crate::a::T; }\n",
            "c.rs": "macro_rules! m { () => { $crate::b::X } }\n",
        }
        for name, text in files.items():
            with open(os.path.join(d, name), "w", encoding="utf-8") as fh:
                fh.write(text)
        edges, errors = graph(d)
        assert errors == [], errors
        assert edges == {"a": {"b": "a.rs:1", "c": "a.rs:1"}, "b": {}, "c": {"b": "c.rs:1"}}, edges
        assert cycles(edges) == [], "an acyclic tree reported a cycle"
        # b now uses a outside tests: a -> b -> a (and a -> c -> b -> a).
        with open(os.path.join(d, "b/inner.rs"), "a", encoding="utf-8") as fh:
            fh.write("fn g() { crate::a::f() }\n")
        edges, _ = graph(d)
        assert cycles(edges) == [["a", "b", "c"]], cycles(edges)
        with open(os.path.join(d, "c.rs"), "a", encoding="utf-8") as fh:
            fh.write("use crate::Reexported;\n")
        _, errors = graph(d)
        assert len(errors) == 1 and "crate::Reexported is not a module" in errors[0], errors
    print("module-cycles self-test: ok (finds a cycle, ignores tests, comments and strings)")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(check(sys.argv[1]))
