#!/usr/bin/env python3
"""`make docs-check` / `make docs-sync`: the README and the docs/ book against the code.

Checks, each failing with the file and line it is about:
  links     every relative link and #anchor in the Markdown files resolves (offline)
  snippets  a fenced block under `<!-- snippet: PATH -->` or `<!-- snippet: PATH#NAME -->` equals
            that file (or the lines between `ANCHOR: NAME` and `ANCHOR_END: NAME` in it);
            `--sync` rewrites such blocks from their sources instead of failing
  fences    every fenced block is checked by its language: json parses, and a plugin config
            (an object with `identity`) validates against envoy/tollgate.schema.json and loads in
            the filter's own parser (tollgate-limits); yaml comes from a file (snippet marker) and
            parses, a whole Envoy config passes `envoy --mode validate`; sh lines are `make`
            targets of the Makefile; text is free (pictures); any other language fails
  metrics   every metric src/metrics.rs defines is in the metrics table of the ledger page, and no
            page names a tollgate_* metric the code does not define
  ledger    every filter-state field the filter writes is printed by each shipped access log, and
            the access log's fields are exactly those the ledger page's tables document
  refusals  every refusal src/reply.rs builds (status, decision, OpenAI code, Anthropic type) has
            its row in the refusals page, and its decision (and every decision the pipeline writes
            as a literal) is in the ledger's `decision` row
  config    the configuration reference's rows are exactly the fields of envoy/tollgate.schema.json,
            and a default the schema states is the one the reference states
  readme    README.md is at most 250 lines, says `make demo` and `make test` on its first screen,
            and links every page of the book
"""
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = "README.md"
BOOK = "docs"
LEDGER_PAGE = "docs/ledger-and-metrics.md"
CONFIG_PAGE = "docs/configuration.md"
REFUSALS_PAGE = "docs/refusals.md"
SCHEMA = "envoy/tollgate.schema.json"
LIMITS_BIN = "target/debug/tollgate-limits"
ENVOY = ".venv/bin/envoy"
MARKER = re.compile(r"^<!--\s*snippet:\s*(\S+?)\s*-->\s*$")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)\s*$")

errors = []


def fail(where, msg):
    errors.append(f"{where}: {msg}")


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def markdown_files():
    """The files the checks read: the README, the changelog, the book; other Markdown for links."""
    own = [f for f in (README, "CHANGELOG.md") if os.path.exists(os.path.join(ROOT, f))]
    for dirpath, _, files in os.walk(os.path.join(ROOT, BOOK)):
        own += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in files if f.endswith(".md")]
    others = []
    for top in ("examples", "proto", "envoy"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            others += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in files if f.endswith(".md")]
    return sorted(set(own)), sorted(others)


# ---------------------------------------------------------------------------------------------
# Markdown structure: fenced blocks (with their snippet markers) and the prose outside them.


def blocks(text):
    """(prose lines with their numbers, fenced blocks) of a Markdown text."""
    lines = text.split("\n")
    prose, fences = [], []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = MARKER.match(lines[k]) if k >= 0 else None
        fences.append({"start": i, "end": j, "lang": lang, "body": "\n".join(lines[i + 1:j]),
                       "source": marker.group(1) if marker else None})
        i = j + 1
    return prose, fences


def strip_code_spans(line):
    return re.sub(r"`+[^`]*`+", "", line)


# ---------------------------------------------------------------------------------------------
# links


def slug(heading):
    """GitHub's anchor for a heading."""
    h = heading.strip().lower()
    h = re.sub(r"<[^>]+>", "", h)
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", h)
    h = re.sub(r"[^\w\- ]", "", h, flags=re.UNICODE)
    return h.replace(" ", "-")


def anchors(rel):
    prose, _ = blocks(read(rel))
    seen, out = {}, set()
    for _, line in prose:
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
        for a in re.findall(r'<a\s+(?:id|name)="([^"]+)"', line):
            out.add(a)
    return out


def check_links(files):
    cache = {}
    for rel in files:
        prose, _ = blocks(read(rel))
        for n, line in prose:
            for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", strip_code_spans(line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue  # https:, mailto:: not checked offline
                path, _, anchor = target.partition("#")
                dest = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
                if not os.path.exists(os.path.join(ROOT, dest)):
                    fail(f"{rel}:{n}", f"link to {target}: {dest} does not exist")
                    continue
                if anchor and dest.endswith(".md"):
                    if dest not in cache:
                        cache[dest] = anchors(dest)
                    if anchor not in cache[dest]:
                        fail(f"{rel}:{n}", f"link to {target}: no heading #{anchor} in {dest}")


# ---------------------------------------------------------------------------------------------
# snippets and fences


def snippet_text(source, where):
    path, _, name = source.partition("#")
    if not os.path.isfile(os.path.join(ROOT, path)):
        fail(where, f"snippet source {path} does not exist")
        return None
    text = read(path)
    if not name:
        return text.rstrip("\n")
    out, inside, found = [], False, False
    for line in text.split("\n"):
        if re.search(rf"\bANCHOR_END:\s*{re.escape(name)}\b", line):
            inside = False
            continue
        if re.search(rf"\bANCHOR:\s*{re.escape(name)}\b", line):
            inside, found = True, True
            continue
        if inside:
            out.append(line)
    if not found:
        fail(where, f"snippet source {path} has no ANCHOR: {name}")
        return None
    return "\n".join(out).rstrip("\n")


def make_targets():
    targets = set()
    for line in read("Makefile").split("\n"):
        m = re.match(r"^([A-Za-z0-9_.-]+(?:\s+[A-Za-z0-9_.-]+)*)\s*:(?!=)", line)
        if m and not line.startswith("\t"):
            targets.update(t for t in m.group(1).split() if "$" not in t and "/" not in t)
    return targets


def load_in_filter(text, where):
    """The filter's own configuration parser (Config::from_json, through tollgate-limits)."""
    binary = os.path.join(ROOT, LIMITS_BIN)
    if not os.path.exists(binary):
        fail(where, f"{LIMITS_BIN} is not built (make docs-check builds it)")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(text)
    try:
        proc = subprocess.run([binary, "limitador", f.name], capture_output=True, text=True, timeout=30)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        fail(where, f"the filter refuses this configuration: {proc.stderr.strip()[:300]}")


def check_json(body, where, validator):
    try:
        value = json.loads(body)
    except ValueError as e:
        fail(where, f"json block does not parse: {e}")
        return
    if isinstance(value, dict) and "identity" in value:
        for e in sorted(validator.iter_errors(value), key=lambda e: list(e.path)):
            path = ".".join(str(p) for p in e.path) or "(root)"
            fail(where, f"plugin config invalid against {SCHEMA} at {path}: {e.message}")
        load_in_filter(body, where)


def check_yaml(body, source, where):
    import yaml

    if not source:
        fail(where, "yaml block without a snippet marker: include it from a file the tests use")
    try:
        docs = [d for d in yaml.safe_load_all(body) if d is not None]
    except yaml.YAMLError as e:
        fail(where, f"yaml block does not parse: {e}")
        return
    whole = any(isinstance(d, dict) and "static_resources" in d for d in docs)
    if whole and "${" not in body:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(body)
        try:
            proc = subprocess.run([os.path.join(ROOT, ENVOY), "--mode", "validate", "-c", f.name,
                                   "--log-level", "error"], capture_output=True, text=True, timeout=120)
        finally:
            os.unlink(f.name)
        if proc.returncode != 0:
            fail(where, f"envoy --mode validate refuses it: {(proc.stderr or proc.stdout)[-300:]}")


def check_sh(body, where, targets):
    for line in body.split("\n"):
        cmd = line.split("#", 1)[0].strip()
        if not cmd:
            continue
        words = cmd.split()
        if words[0] != "make":
            fail(where, f"shell command `{cmd}` is not a make target (put it in the Makefile)")
            continue
        named = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
        if not named:
            fail(where, f"`{cmd}` names no target")
        for t in named:
            if t not in targets:
                fail(where, f"`{cmd}`: the Makefile has no target {t}")


def check_fences(files, sync):
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(read(SCHEMA)))
    targets = make_targets()
    for rel in files:
        text = read(rel)
        _, fences = blocks(text)
        lines = text.split("\n")
        rewritten = False
        for fb in reversed(fences):  # from the end, so the line numbers stay right while rewriting
            where = f"{rel}:{fb['start'] + 1}"
            body = fb["body"]
            if fb["source"]:
                want = snippet_text(fb["source"], where)
                if want is not None and want != body:
                    if sync:
                        lines[fb["start"] + 1:fb["end"]] = want.split("\n")
                        rewritten = True
                        body = want
                        print(f"docs-sync: {where} rewritten from {fb['source']}")
                    else:
                        fail(where, f"snippet differs from {fb['source']} (make docs-sync rewrites it)")
            lang = fb["lang"]
            if lang == "json":
                check_json(body, where, validator)
            elif lang in ("yaml", "yml"):
                check_yaml(body, fb["source"], where)
            elif lang in ("sh", "shell", "bash", "console"):
                check_sh(body, where, targets)
            elif lang != "text":
                fail(where, f"fenced block in `{lang or 'no language'}`: use json, yaml, sh or text")
        if rewritten:
            with open(os.path.join(ROOT, rel), "w", encoding="utf-8") as f:
                f.write("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# metrics


def code_before_tests(rel):
    return read(rel).split("#[cfg(test)]", 1)[0]


def rust_sources():
    for dirpath, _, files in os.walk(os.path.join(ROOT, "src")):
        if "/tests" in dirpath.replace(ROOT, ""):
            continue
        for f in files:
            if f.endswith(".rs"):
                yield os.path.relpath(os.path.join(dirpath, f), ROOT)


def code_metrics():
    """Prometheus families of every stat src/metrics.rs names (labels stripped as stats_tags do)."""
    src = code_before_tests("src/metrics.rs")
    names = {f"tollgate_{s}" for s in re.findall(r'(?:Counter|Histogram)::\w+\s*=>\s*"(\w+)"', src)}
    gauges = set()
    for rel in rust_sources():
        gauges.update(re.findall(r'Stat::GlobalLease\([^()]*?,\s*"(\w+)"\s*\)', code_before_tests(rel)))
    for lit in re.findall(r'"(tollgate\.[^"]*)"', src):
        name = re.sub(r"\.(tenant|model|reason|limit|threshold)\.\{[^}]*\}", "", lit)
        if name.endswith(".{}"):
            continue  # the counter and histogram families, read from their suffixes above
        if "{gauge}" in name:
            names.update(name.replace("{gauge}", g).replace(".", "_") for g in gauges)
            continue
        if "{" in name:
            fail("src/metrics.rs", f"metric name {lit} has a part the checker cannot read")
            continue
        names.add(name.replace(".", "_"))
    return names


def table_rows(text, header_first_cell):
    """First cells of the rows of every table whose header's first cell is `header_first_cell`."""
    rows, inside = [], False
    for n, line in enumerate(text.split("\n"), 1):
        if not line.startswith("|"):
            inside = False
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if cells and cells[0] == header_first_cell:
            inside = True
            continue
        if inside and not re.match(r"^-+$", cells[0]):
            rows.append((n, cells))
    return rows


def check_metrics(files):
    defined = code_metrics()
    if len(defined) < 10:
        fail("src/metrics.rs", f"only {len(defined)} metrics found: the checker's reading is stale")
    page = read(LEDGER_PAGE)
    in_table = set()
    for _, cells in table_rows(page, "family"):
        in_table.update(re.findall(r"`(tollgate_\w+)`", cells[0]))
    for name in sorted(defined - in_table):
        fail(LEDGER_PAGE, f"metric {name} (defined in src/metrics.rs) is not in the metrics table")
    for rel in files:
        for n, line in enumerate(read(rel).split("\n"), 1):
            for name in re.findall(r"(?<![\w.-])(tollgate_[a-z0-9_]+)", line):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                if name not in defined and base not in defined:
                    fail(f"{rel}:{n}", f"names metric {name}, which the filter does not define")


# ---------------------------------------------------------------------------------------------
# ledger


def written_fields():
    """Filter-state names the filter writes: ("tollgate.NAME", value) pairs in the pipeline."""
    out = {}
    for rel in rust_sources():
        if rel.startswith(("src/global/", "src/metrics.rs")):
            continue  # RLS descriptor entries and stat names share the prefix; they are not state
        for name in re.findall(r'\(\s*"tollgate\.([a-z_]+)"\s*,', code_before_tests(rel)):
            if name != "ledger":  # the record's own filter state (src/envoy/http.rs)
                out.setdefault(name, rel)
    return out


def access_logs():
    """Each shipped access log that prints the ledger (file logs, the OpenTelemetry body, Istio's
    patch): {log: [Envoy's keys after the spliced record]}."""
    logs = {}
    candidates = [os.path.join("envoy", f) for f in sorted(os.listdir(os.path.join(ROOT, "envoy")))]
    for top in sorted(os.listdir(os.path.join(ROOT, "examples"))):
        d = os.path.join("examples", top)
        if os.path.isdir(os.path.join(ROOT, d)):
            candidates += [os.path.join(d, f) for f in sorted(os.listdir(os.path.join(ROOT, d)))]
    for rel in candidates:
        if not rel.endswith(".yaml"):
            continue
        for n, line in enumerate(read(rel).split("\n"), 1):
            if "FILTER_STATE(wasm.tollgate.ledger:PLAIN)" not in line or line.lstrip().startswith("#"):
                continue
            text = line.strip().removeprefix("string_value:").strip().strip("'")
            if not text.startswith("{%FILTER_STATE(wasm.tollgate.ledger:PLAIN)%"):
                fail(f"{rel}:{n}", "the ledger line must start with the spliced record")
            logs[f"{rel}:{n}"] = re.findall(r'"(\w+)":', text)
        if "FILTER_STATE(wasm.tollgate." in read(rel).replace("wasm.tollgate.ledger", ""):
            fail(rel, "prints a per-field wasm.tollgate.* filter state: the record is one value, wasm.tollgate.ledger")
    return logs


def check_ledger():
    written = written_fields()
    logs = access_logs()
    if not any(rel.startswith("envoy/tollgate.yaml:") for rel in logs) or len(written) < 10:
        fail("tests/docs_check.py", "the ledger's sources were not found: the checker's reading is stale")
        return
    reference = next(keys for rel, keys in logs.items() if rel.startswith("envoy/tollgate.yaml:"))
    for rel, keys in logs.items():
        if keys != reference:
            fail(rel, f"prints Envoy's fields {keys}, envoy/tollgate.yaml {reference}")
    fields = set(written) | {"ledger_version"} | set(reference)
    page = read(LEDGER_PAGE)
    documented = {}
    for header in ("field", "Envoy's field"):
        for n, cells in table_rows(page, header):
            for name in re.findall(r"`(\w+)`", cells[0]):
                documented[name] = n
    for name in sorted(fields - set(documented)):
        fail(LEDGER_PAGE, f"ledger field {name} ({written.get(name, 'the access logs')}) is not in the ledger tables")
    for name, n in sorted(documented.items()):
        if name not in fields:
            fail(f"{LEDGER_PAGE}:{n}", f"documents ledger field {name}, which no ledger line has")
    schema = json.loads(read("envoy/ledger.schema.json"))["properties"]
    for name in sorted(fields - set(schema)):
        fail("envoy/ledger.schema.json", f"has no property for ledger field {name}")
    for name in sorted(set(schema) - fields):
        fail("envoy/ledger.schema.json", f"describes {name}, which no ledger line has")


# ---------------------------------------------------------------------------------------------
# refusals


def code_refusals():
    """(status, decision, OpenAI code or None, Anthropic type) of every reply src/reply.rs builds."""
    src = code_before_tests("src/reply.rs")
    found = re.findall(
        r'\(\s*(\d{3}),\s*"(\w+)",[^;]*?\(\s*(?:"\w+"|\*\w+),\s*(?:Some\("(\w+)"\)|None)\s*\),\s*"(\w+)",?\s*\)',
        src)
    return [(int(status), decision, code or None, anthropic) for status, decision, code, anthropic in found]


def check_refusals():
    refusals = code_refusals()
    if len(refusals) < 8:
        fail("src/reply.rs", f"only {len(refusals)} refusals found: the checker's reading is stale")
    rows = table_rows(read(REFUSALS_PAGE), "status")
    decision_row = next((cells for _, cells in table_rows(read(LEDGER_PAGE), "field")
                         if cells[0] == "`decision`"), None)
    for status, decision, code, anthropic in refusals:
        mine = [cells for _, cells in rows if cells[0] == str(status)]
        if not mine:
            fail(REFUSALS_PAGE, f"no row for status {status} ({decision}, src/reply.rs)")
        elif code and not any(f"`{code}`" in cells[2] for cells in mine):
            fail(REFUSALS_PAGE, f"no {status} row names the OpenAI code {code} ({decision})")
        elif not any(f"`{anthropic}`" in cells[3] or "OpenAI shape only" in cells[3] for cells in mine):
            fail(REFUSALS_PAGE, f"no {status} row names the Anthropic type {anthropic} ({decision})")
        if decision_row is None or f"`{decision}`" not in decision_row[1]:
            fail(LEDGER_PAGE, f"the ledger's decision row does not name {decision} (a {status}, src/reply.rs)")
    # Decisions written as literals (admitted, a client that left while its request waited).
    for rel in rust_sources():
        for decision in re.findall(r'"tollgate\.decision",\s*"(\w+)"', code_before_tests(rel)):
            if decision_row is None or f"`{decision}`" not in decision_row[1]:
                fail(LEDGER_PAGE, f"the ledger's decision row does not name {decision} ({rel})")


# ---------------------------------------------------------------------------------------------
# configuration reference


def schema_fields(schema):
    """{dotted path: default or None} for every field, `*` for map values, `[]` for list items.
    A $ref is walked at its first place only (tenants.* is "any field of tenant_defaults")."""
    defs = schema.get("$defs", {})
    out, walked = {}, set()

    def node_of(node):
        ref = node.get("$ref")
        if ref and ref.startswith("#/$defs/"):
            name = ref.split("/")[-1]
            merged = dict(defs[name])
            merged.update({k: v for k, v in node.items() if k != "$ref"})
            return name, merged
        return None, node

    def walk(node, path):
        ref, node = node_of(node)
        if ref in walked and ref not in ("tenantName",):
            return
        if ref and ref != "tenantName":
            walked.add(ref)
        for key, child in node.get("properties", {}).items():
            p = f"{path}.{key}" if path else key
            out[p] = child.get("default", node_of(child)[1].get("default"))
            walk(child, p)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out[f"{path}.*"] = None
            walk(extra, f"{path}.*")
        items = node.get("items")
        if isinstance(items, dict) and (node_of(items)[1].get("properties") or node_of(items)[1].get("additionalProperties")):
            walk(items, f"{path}[]")

    walk(schema, "")
    return out


def check_config():
    fields = schema_fields(json.loads(read(SCHEMA)))
    rows = {}
    for n, cells in table_rows(read(CONFIG_PAGE), "field"):
        m = re.match(r"^`([^`]+)`$", cells[0])
        if not m:
            fail(f"{CONFIG_PAGE}:{n}", f"reference row {cells[0]!r} is not one `field`")
            continue
        rows[m.group(1)] = (n, cells)
    for path in sorted(set(fields) - set(rows)):
        fail(CONFIG_PAGE, f"schema field {path} is not in the configuration reference")
    for path in sorted(set(rows) - set(fields)):
        fail(f"{CONFIG_PAGE}:{rows[path][0]}", f"reference row {path} is not a field of {SCHEMA}")
    for path, default in sorted(fields.items()):
        if default is None or path not in rows:
            continue
        n, cells = rows[path]
        shown = json.dumps(default) if not isinstance(default, str) else default
        if f"`{shown}`" not in cells[1] and f"`[]`" != cells[1]:
            fail(f"{CONFIG_PAGE}:{n}", f"{path}: the schema's default is {shown}, the reference says {cells[1]!r}")


# ---------------------------------------------------------------------------------------------
# README


def check_readme():
    text = read(README)
    lines = text.split("\n")
    if len(lines) - (1 if text.endswith("\n") else 0) > 250:
        fail(README, f"{len(lines) - 1} lines: at most 250 (move the detail into {BOOK}/)")
    screen = "\n".join(lines[:40])
    for cmd in ("make demo", "make test"):
        if cmd not in screen:
            fail(README, f"`{cmd}` is not on the first screen (the first 40 lines)")
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", text))
    index = f"{BOOK}/README.md"
    in_index = {f"{BOOK}/{p}" for p in re.findall(r"\]\(([^)#\s/]+\.md)", read(index))} if os.path.exists(os.path.join(ROOT, index)) else set()
    for page in sorted(os.listdir(os.path.join(ROOT, BOOK))):
        rel = f"{BOOK}/{page}"
        if page.endswith(".md") and page != "README.md" and rel not in linked:
            fail(README, f"{rel} is not linked from the README (one click to every page)")
        if page.endswith(".md") and page != "README.md" and rel not in in_index:
            fail(index, f"{rel} is not in the book's index")


def main():
    sync = "--sync" in sys.argv[1:]
    own, others = markdown_files()
    check_fences(own, sync)
    check_links(own + others)
    check_metrics(own)
    check_ledger()
    check_refusals()
    check_config()
    check_readme()
    for e in errors:
        print(f"docs-check: {e}")
    print(f"docs-check: {len(own)} pages, {len(own) + len(others)} files' links; "
          f"{'FAILED, ' + str(len(errors)) + ' problems' if errors else 'ok'}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
