#!/usr/bin/env python3
"""Builds the realistic embedding corpus in this folder from Debian packages (see README.md here).

Text from outside the project, with the length spread real traffic has:
- English technical prose and code from the Python 3.11 documentation sources (python3.11-doc);
- quotations and sayings in English, German, Spanish, Italian and Russian (fortunes, fortunes-de,
  fortunes-es, fortunes-it, fortunes-ru).

Every text is flattened to one line (whitespace collapsed) and kept when it has 3 to 120 words. The
mix is drawn with a fixed seed, shuffled, and split: `tune.txt` is what benchmarks and tuning use,
`heldout.txt` is kept out of every tuning loop and only checked last. Run from anywhere:

    python3 benches/corpus/make.py          # downloads the pinned .debs with apt-get, rewrites the files
"""
from __future__ import annotations

import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = [
    "python3.11-doc=3.11.2-6+deb12u7",
    "fortunes=1:1.99.1-7.3",
    "fortunes-de=0.35-1",
    "fortunes-es=1.36",
    "fortunes-it=1.99-4.1",
    "fortunes-ru=1.52-3.1",
]
FORTUNES = "usr/share/games/fortunes"
# Files picked for everyday subjects (no "off" collections).
FORTUNE_FILES = {
    "en": ["wisdom", "science", "computers", "literature", "people", "work", "education", "food", "linux"],
    "de": ["sprichworte", "zitate", "mathematiker", "computer", "letzteworte", "murphy", "wusstensie"],
    "es": ["sabiduria.fortunes", "proverbios.fortunes", "ciencia.fortunes", "filosofia.fortunes",
           "informatica.fortunes", "libertad.fortunes", "vida.fortunes"],
    "it": ["adams", "definizioni", "italia", "leggi", "computer", "citazioni"],
    "ru": None,  # every file: they are short sayings and quotations
}
# How many texts of each kind: about a fifth code and a fifth non-English, the rest English prose of
# every length (single sentences, and whole paragraphs up to 120 words).
MIX = {"doc-sentence": 300, "doc-paragraph": 110, "code": 140, "en": 80, "de": 45, "es": 45, "it": 40, "ru": 40}
HELDOUT = 200
SEED = 20261202


def words(s: str) -> int:
    return len(s.split())


def flat(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def keep(s: str) -> bool:
    n = words(s)
    letters = sum(c.isalpha() for c in s)
    return 3 <= n <= 120 and letters >= 0.4 * len(s.replace(" ", ""))


def fortunes(root: Path, lang: str) -> list[str]:
    base = root / FORTUNES / ("" if lang == "en" else lang)
    names = FORTUNE_FILES[lang]
    files = sorted(p for p in base.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8")) \
        if names is None else [base / n for n in names if (base / n).is_file()]
    out = []
    for f in files:
        for entry in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            # Dialogues and ASCII art: lines starting with punctuation runs are skipped.
            if re.search(r"[|_\\/]{3,}", entry):
                continue
            t = flat(entry)
            if keep(t):
                out.append(t)
    return out


RST_MARKUP = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`|``([^`]*)``|\*\*?([^*]+)\*\*?")


def rst_text(s: str) -> str:
    return flat(RST_MARKUP.sub(lambda m: next(g for g in m.groups() if g is not None), s))


def python_docs(root: Path) -> tuple[list[str], list[str], list[str]]:
    """(sentences, paragraphs, code lines) from the reStructuredText sources."""
    sentences, paragraphs, code = [], [], []
    src = root / "usr/share/doc/python3.11/html/_sources"
    for f in sorted(src.rglob("*.rst.txt")):
        text = f.read_text(encoding="utf-8", errors="replace")
        previous = ""
        for block in re.split(r"\n\s*\n", text):
            lines = block.splitlines()
            if not lines:
                continue
            indented = all(l.startswith(("   ", "\t")) or not l.strip() for l in lines)
            literal = previous.rstrip().endswith("::") or lines[0].strip().startswith(">>>")
            previous = block
            if indented and literal:
                # A literal block or a doctest: code.
                for l in lines:
                    l = l.strip()
                    if l.startswith((">>> ", "... ")):
                        l = l[4:]
                    if len(l) > 12 and re.search(r"[=()\[\]{}.:]", l) and not l.startswith(("..", ":")):
                        code.append(l)
                continue
            # Prose, at the top level or inside a directive's body.
            lines = [l.strip() for l in lines]
            if lines[0].startswith(("..", "=", "-", "*", "+", "#", "|", ">>>", ":")) or len(lines[0]) < 3:
                continue
            p = rst_text(" ".join(lines))
            if keep(p) and p[-1:] in ".:!?)" and "`" not in p:
                paragraphs.append(p)
                sentences.extend(s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", p) if keep(s))
    code = [c for c in code if 3 <= words(c) <= 40]
    return sentences, paragraphs, code


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True, capture_output=True)
        root = tmp / "root"
        for deb in sorted(tmp.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        sentences, paragraphs, code = python_docs(root)
        pools = {"doc-sentence": sentences, "doc-paragraph": [p for p in paragraphs if words(p) > 30],
                 "code": code}
        for lang in FORTUNE_FILES:
            pools[lang] = fortunes(root, lang)
    rng = random.Random(SEED)
    picked = []
    for kind, n in MIX.items():
        pool = sorted(set(pools[kind]))
        if len(pool) < n:
            sys.exit(f"only {len(pool)} texts of kind {kind}, want {n}")
        picked += rng.sample(pool, n)
    picked = list(dict.fromkeys(picked))
    rng.shuffle(picked)
    heldout, tune = picked[:HELDOUT], picked[HELDOUT:]
    (HERE / "tune.txt").write_text("\n".join(tune) + "\n", encoding="utf-8")
    (HERE / "heldout.txt").write_text("\n".join(heldout) + "\n", encoding="utf-8")
    for name, part in [("tune", tune), ("heldout", heldout)]:
        n = sorted(words(t) for t in part)
        print(f"{name}: {len(part)} texts, words min {n[0]} p50 {statistics.median(n)} "
              f"p90 {n[int(len(n) * 0.9)]} max {n[-1]}")


if __name__ == "__main__":
    main()
