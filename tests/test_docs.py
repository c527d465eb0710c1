"""The README and docs/ (issue 35): every relative link and #anchor resolves, the README stays short,
every docs page is reachable from it, the commands they show are accepted by their scripts, and the
README's "First ten minutes" block runs as written (at a smaller scale, below), and every figure the
pages quote from compare.py is what it prints from the committed results/ (issue 32)."""
import contextlib
import functools
import glob
import importlib.util
import io
import os
import re
import shlex
import sys
from unittest import mock

import pytest
import torch

from conftest import ROOT, run_script

README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 210

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`+[^`]*`+")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def prose_lines(text):
    """(line number, line) of the lines outside fenced code blocks."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, line


def slug(heading):
    """GitHub's anchor of a heading: its text without Markdown (code marks, emphasis, link targets),
    lowercased, every character but letters, digits, '-', '_' and spaces dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every heading's anchor in the Markdown file, duplicates numbered as GitHub does (-1, -2, ...)."""
    seen, out = {}, set()
    for _, line in prose_lines(read(path)):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path):
    """(line number, target) of every Markdown link and image outside code."""
    for number, line in prose_lines(read(path)):
        for m in LINK.finditer(CODE_SPAN.sub("code", line)):
            yield number, m.group(1)


def broken_links(path):
    """What is wrong with the file's relative links: a missing file or folder, or an anchor that is
    no heading of its target."""
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...: not ours to check
            continue
        where, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), where)) if where else path
        name = f"{os.path.relpath(path, ROOT)}:{number}: {target}"
        if not os.path.exists(resolved):
            problems.append(f"{name}: no {os.path.relpath(resolved, ROOT)}")
        elif anchor and not resolved.endswith(".md"):
            problems.append(f"{name}: an anchor into a file that is not Markdown")
        elif anchor and anchor not in anchors(resolved):
            problems.append(f"{name}: no heading #{anchor} in {os.path.relpath(resolved, ROOT)}")
    return problems


# ----------------------------------------------------------------------------------------------
# (1) Links and anchors


def test_slugs_are_githubs():
    assert slug("First ten minutes") == "first-ten-minutes"
    assert slug("At the seed's scale: sample_resnet, 224 px (three CBAM blocks)") == \
        "at-the-seeds-scale-sample_resnet-224-px-three-cbam-blocks"
    assert slug("Runs longer than a session: `benchmarks/reproduce.py`") == \
        "runs-longer-than-a-session-benchmarksreproducepy"
    assert slug("compare.py: runs side by side, and which differences are real") == \
        "comparepy-runs-side-by-side-and-which-differences-are-real"


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Two words\n\n[ok](#two-words) [ok](b.md#b) [ok](b.md)\n"
                                   "```\n[not a link](nowhere.md)\n```\n`[code](nowhere.md)`\n"
                                   "[bad](missing.md) [bad](#one-word) [bad](b.md#nope) [web](https://x.org/y)\n")
    (tmp_path / "b.md").write_text("# B\n")
    problems = broken_links(str(tmp_path / "a.md"))
    assert len(problems) == 3, problems
    assert "missing.md" in problems[0] and "#one-word" in problems[1] and "#nope" in problems[2]


@pytest.mark.parametrize("path", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_every_relative_link_and_anchor_resolves(path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for _, t in links(README)}
    assert not [os.path.relpath(p, ROOT) for p in PAGES[1:] if p not in linked]


# ----------------------------------------------------------------------------------------------
# (2) A README a newcomer reads in five minutes


def test_the_readme_is_short():
    n = len(read(README).splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines: move the depth to a docs/ page"


# ----------------------------------------------------------------------------------------------
# The commands shown are accepted by their scripts


def shown_commands(path):
    """(line number, argv) of each command in the file's bash code blocks, continuation lines joined,
    comments and leading VAR=value assignments dropped."""
    out, inside, lang, pending, start = [], False, "", "", 0
    for number, line in enumerate(read(path).splitlines(), 1):
        if FENCE.match(line):
            inside, lang = not inside, line.strip().strip("`~").strip()
            continue
        if not inside or lang not in ("bash", "sh"):
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        argv = shlex.split(pending + line, comments=True)
        pending = ""
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
            argv = argv[1:]
        if argv:
            out.append((start, argv))
    return out


def script_call(argv):
    """(script path relative to the repo, its arguments) when argv runs one of the repo's Python
    scripts (python X.py, python3 X.py, torchrun ... X.py), else None."""
    for i, token in enumerate(argv):
        if token.endswith(".py") and os.path.isfile(os.path.join(ROOT, token)):
            runner = os.path.basename(argv[0])
            if runner.startswith("python") or runner == "torchrun":
                return token, argv[i + 1:]
    return None


def load_script(script):
    name = "docs_cmd_" + re.sub(r"\W", "_", script)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, os.path.dirname(os.path.join(ROOT, script)))
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def command_problems(page, line, script, args):
    """What is wrong with one shown command: an option its script does not have; where the script has
    parse_args (and the command does not --resume, which reads its checkpoint), a refusal to parse."""
    source = read(os.path.join(ROOT, script))
    name = f"{os.path.relpath(page, ROOT)}:{line}: {script}"
    unknown = [a.split("=")[0] for a in args if a.startswith("--") and a != "--help"
               and f'"{a.split("=")[0]}"' not in source]
    if unknown:
        return [f"{name} has no {', '.join(unknown)}"]
    if "--resume" in args or "--help" in args:
        return []
    if "cuda" in args and not torch.cuda.is_available():  # a GPU command, refused here for want of one
        return []
    module = load_script(script)
    if hasattr(module, "parse_args"):
        try:
            module.parse_args(args)
        except SystemExit as e:
            return [f"{name} {' '.join(args)}: exit {e.code}"]
    return []


@pytest.mark.parametrize("page", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_every_shown_command_is_accepted_by_its_script(page):
    problems = [p for line, argv in shown_commands(page) if (call := script_call(argv))
                for p in command_problems(page, line, *call)]
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------------
# (3) The README's first ten minutes, run as written

# The block's own scale takes a few minutes on two CPU cores; the test runs the same commands with
# these flags' numbers made smaller (and nothing else changed but --no-download, never a download
# here). Every flag of the block is still given to its script.
SMALLER = {"--epochs": "1", "--train-subset": "500", "--test": "2"}
NO_DOWNLOAD = ("train.py", "evaluate.py", "explain.py")


def first_ten_minutes():
    """The lines of the first code block under the README's "First ten minutes" heading."""
    lines = read(README).splitlines()
    start = next(i for i, ln in enumerate(lines) if HEADING.match(ln) and slug(HEADING.match(ln).group(2)) ==
                 "first-ten-minutes")
    block, inside = [], False
    for line in lines[start + 1:]:
        if not inside and line.startswith("## "):
            break
        if FENCE.match(line):
            if inside:
                return block
            inside = True
        elif inside and line.strip():
            block.append(line)
    pytest.fail("no code block under the README's 'First ten minutes'")


def smaller(argv):
    out = list(argv)
    for i, token in enumerate(out[:-1]):
        if token in SMALLER:
            assert int(SMALLER[token]) <= int(out[i + 1]), f"{token} {out[i + 1]}: SMALLER is not smaller"
            out[i + 1] = SMALLER[token]
    return out


def test_the_first_ten_minutes_run_as_written(tmp_path, cifar_root):
    block = [shlex.split(line, comments=True) for line in first_ten_minutes()]
    flags = {t for argv in block for t in argv}
    assert set(SMALLER) <= flags, f"the block no longer has {set(SMALLER) - flags}: update SMALLER"
    assert [argv[0] for argv in block[:-1]] == ["python"] * (len(block) - 1) and block[-1][0] == "tensorboard"
    for argv in block[:-1]:
        script, args = argv[1], smaller(argv[2:])
        if script in NO_DOWNLOAD:
            args.append("--no-download")
        res = run_script(script, *args, cwd=str(tmp_path), env={"CIFAR10_ROOT": cifar_root}, timeout=300)
        assert res.returncode == 0, f"{' '.join(argv)}\n{res.stdout[-1500:]}\n{res.stderr[-1500:]}"
        if script == "evaluate.py":
            assert re.search(r"^Calibration: ECE [0-9.]+ \(15 bins\)", res.stdout, re.M), res.stdout
        if "--out" in args:
            assert (tmp_path / args[args.index("--out") + 1]).is_file()
    # tensorboard serves until stopped: check only that it is installed and that --logdir has the run
    tensorboard = block[-1]
    assert importlib.util.find_spec("tensorboard"), "tensorboard is not installed (requirements.txt)"
    logdir = tmp_path / tensorboard[tensorboard.index("--logdir") + 1]
    assert list(logdir.glob("*/events.out.tfevents.*")), f"no TensorBoard events under {logdir}"


# ----------------------------------------------------------------------------------------------
# (4) What the pages quote from compare.py is what it prints from the committed results (issue 32:
# "the README's figures equal what compare.py prints from them"). compare.py runs as on a fresh
# clone: no checkpoint is looked for (the logs name folders on the machine that trained).

COMPARE_INLINE = re.compile(r"`python compare\.py (results/[^`]*)`")
FIGURE = re.compile(r"(?<![\d.])\d+\.\d{2,}(?![\d.])")  # 0.9132, 1.32, 0.0002; not "3.3 h" or "224"
TABLE_RULE = re.compile(r"^\|[\s:|-]+$")
VERDICT = re.compile(r"^- \S+(?: \(n=\d+\))? vs \S+")  # compare.py's "In words" lines


@functools.lru_cache(maxsize=None)
def compare_prints(args):
    """compare.py's standard output for the argument string as a page shows it (globs expanded from
    the repo root, as a shell there would; --out dropped: the pages' figures are not rewritten)."""
    argv, tokens = [], shlex.split(args)
    while tokens:
        token = tokens.pop(0)
        if token == "--out":
            tokens.pop(0)
        elif token.startswith("results/"):
            found = sorted(glob.glob(os.path.join(ROOT, token)))
            assert found, f"python compare.py {args}: {token} matches no file"
            argv += found
        else:
            argv.append(token)
    compare = load_script("compare.py")
    out = io.StringIO()
    with mock.patch.object(compare, "find_checkpoint", lambda *a: None), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert compare.main(argv) == 0, f"python compare.py {args} failed"
    return out.getvalue()


def table_cells(line):
    """The stripped cells of one Markdown table row."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def paragraphs(path):
    """(first line number, text) of each blank-line-separated block of prose."""
    block, start = [], 0
    for number, line in list(prose_lines(read(path))) + [(0, "")]:
        if line.strip():
            block, start = block + [line], start or number
        elif block:
            yield start, " ".join(block)
            block, start = [], 0


def quoted_outputs(path):
    """(line number, compare.py arguments, [lines]) for each bash block that runs compare.py on the
    committed results: the table rows and verdicts between the block and the next heading or block."""
    lines, out = read(path).splitlines(), []
    for line_no, argv in shown_commands(path):
        if argv[:2] != ["python", "compare.py"] or not any(a.startswith("results/") for a in argv):
            continue
        end = next(i for i in range(line_no, len(lines)) if FENCE.match(lines[i]))
        quoted = []
        for line in lines[end + 1:]:
            if HEADING.match(line) or FENCE.match(line):
                break
            if (line.startswith("|") and not TABLE_RULE.match(line)) or VERDICT.match(line):
                quoted.append(line.strip())
        out.append((line_no, shlex.join(argv[2:]), quoted))
    return out


def misquoted(path):
    """Every figure or line of the page that compare.py, run as the page says, does not print."""
    name, problems = os.path.relpath(path, ROOT), []
    for line_no, args, quoted in quoted_outputs(path):
        printed = {ln.strip() for ln in compare_prints(args).splitlines()}
        problems += [f"{name}:{line_no}: compare.py {args[:60]} does not print {q[:100]}"
                     for q in quoted if q not in printed]
    for line_no, text in paragraphs(path):
        for m in COMPARE_INLINE.finditer(text):
            printed = set(FIGURE.findall(compare_prints(m.group(1))))
            problems += [f"{name}:{line_no}: compare.py {m.group(1)} prints no {f}"
                         for f in FIGURE.findall(text) if f not in printed]
    return problems


def readme_results_rows():
    """(model, figure, n, [linked result files]) of each row of the README's results table."""
    rows = []
    for _, line in prose_lines(read(README)):
        cells = table_cells(line)
        if len(cells) == 7 and cells[0].startswith("`") and (bold := re.search(r"\*\*(.+?)\*\*", cells[2])):
            rows.append((cells[0].strip("`"), bold.group(1), int(cells[5]), LINK.findall(cells[6])))
    return rows


def results_row_problem(model, figure, n, files):
    """What is wrong with one README results row against compare.py on its linked folders' runs:
    n = 1, a run of the model with that test accuracy; n > 1, the model's seeds line (n, mean ± std)."""
    folders = sorted({t if os.path.isdir(os.path.join(ROOT, t)) else os.path.dirname(t) for t in files})
    printed = compare_prints(" ".join(f"{f.rstrip('/')}/*.csv" for f in folders))
    cells = [table_cells(ln) for ln in printed.splitlines() if ln.startswith("|")]
    if n == 1 and any(c[1] == model and c[4] == figure for c in cells if len(c) > 4):
        return None
    if n > 1 and any(c[0].split(" ")[0] == model and c[1:3] == [str(n), figure] for c in cells if len(c) > 2):
        return None
    return f"README: {model} {figure} (n = {n}) is not what compare.py prints from {', '.join(folders)}"


@pytest.mark.parametrize("page", [README, os.path.join(ROOT, "docs", "results.md"),
                                  os.path.join(ROOT, "docs", "explain.md")], ids=os.path.basename)
def test_what_a_page_quotes_from_compare_is_what_it_prints(page):
    assert not misquoted(page), "\n".join(misquoted(page))


def test_the_readme_results_table_is_what_compare_prints():
    rows = readme_results_rows()
    assert {r[0] for r in rows} == {"sample_resnet", "resnet", "resnet_att", "resnet_scratch", "resnet_att_scratch"}
    problems = [p for row in rows if (p := results_row_problem(*row))]
    assert not problems, "\n".join(problems)


def test_a_misquoted_figure_is_found(tmp_path):
    """The checks above on a page that quotes one figure wrong in each of its three ways."""
    good = """# R

| `resnet` | 0.8443 | **0.9132 ± 0.0006** | 224 px | Xeon | 5 | [f](results/seed-cpu-seeds-20261207/seed-cpu-resnet.md) |

By 1.32 points (p < 0.0001); `python compare.py results/seed-cpu-seeds-20261207/*.csv` prints it.

```bash
python compare.py results/seed-cpu-seeds-20261207/*.csv
```

| resnet | 5 | 0.9132 ± 0.0006 | 0.9125–0.9140 | 0, 1, 2, 3, 4 |
"""
    page = tmp_path / "page.md"
    page.write_text(good)
    assert misquoted(str(page)) == []
    for right, wrong in [("By 1.32", "By 1.23"), ("| 0.9125–0.9140", "| 0.9125–0.9141")]:
        page.write_text(good.replace(right, wrong))
        assert len(misquoted(str(page))) == 1, wrong
    for wrong in ["0.9133 ± 0.0006** | 224 px | Xeon | 5", "0.9132 ± 0.0006** | 224 px | Xeon | 4"]:
        row = good.splitlines()[2].replace("0.9132 ± 0.0006** | 224 px | Xeon | 5", wrong)
        cells = table_cells(row)
        assert results_row_problem(cells[0].strip("`"), re.search(r"\*\*(.+?)\*\*", cells[2]).group(1),
                                   int(cells[5]), LINK.findall(cells[6])), wrong
