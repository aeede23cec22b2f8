"""Seeded mutations of study files: each is either a valid plan or a ``StudyError`` naming the file.

The shipped studies (studies/*.yaml) and a few small valid ones are mutated at the YAML level (keys
dropped, values retyped, huge or negative numbers, unknown editors, datasets and rows, lists where
mappings belong) and at the text level (characters cut, YAML syntax inserted, lines swapped or cut
short). Loading must never end in a traceback or another exception type.
"""

from __future__ import annotations

import copy
import random
import re
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from overtone.study import load_study
from overtone.study.spec import StudyError

STUDIES = Path(__file__).resolve().parent.parent / "studies"
SMALL = [
    {"name": "small", "fixed": {"model": "smollm2-135m", "dataset": "zsre", "limit": 3, "editor": "ft-m"},
     "axes": {"variant": ["ce", "overtone"], "seed": [0, 1]}},
    {"name": "grid", "fixed": {"model": "m", "dataset": "zsre", "limit": 2},
     "axes": {"editor": ["ft-m", "lora"], "variant": ["ce", {"sweep": {"lambda": [0.1, 0.3]}}], "sequence": [1, 2]},
     "editors": {"ft-m": {"settings": {"steps": 4, "lr": 0.05}}, "lora": {"settings": {"steps": 2}}}},
    {"name": "ablation", "fixed": {"model": "m", "dataset": "counterfact", "limit": 2, "editor": "ft-m",
                                    "evaluation": "both"},
     "axes": {"variant": ["ce", {"ablation": ["no-clip"]}]},
     "profiles": {"quick": {"fixed": {"limit": 1}}}},
]
VALUES = [None, True, 0, -1, 1, 10**30, -(10**30), 1e308, float("inf"), float("nan"), 0.5, "", "x", "zsre",
          "no-such-editor", "no-such-dataset", [], [None], [1, "a"], {}, {"a": 1}, {"settings": []}, "[/i]",
          "$\\nosuchcmd{ x$", "a" * 300]
SYNTAX = [":", ": ", "- ", "[", "]", "{", "}", "\t", "'", '"', "&a", "*a", "!!python/object:os.system", "%", "?",
          "\n  ", "\n-", "#", ",", "|", ">"]


def sources() -> list[tuple[str, Any]]:
    shipped = [(p.name, yaml.safe_load(p.read_text())) for p in sorted(STUDIES.glob("*.yaml"))]
    return shipped + [(f"{s['name']}.yaml", s) for s in SMALL]


def paths(spec: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested spec (into mappings and lists)."""
    out = []
    items = spec.items() if isinstance(spec, dict) else enumerate(spec) if isinstance(spec, list) else []
    for key, value in items:
        out.append((*prefix, key))
        out += paths(value, (*prefix, key))
    return out


def mutate_tree(spec: Any, rng: random.Random) -> tuple[str, Any]:
    spec = copy.deepcopy(spec)
    where = paths(spec)
    if not where:
        return "retyped", rng.choice(VALUES)
    target = rng.choice(where)
    parent = spec
    for key in target[:-1]:
        parent = parent[key]
    kind = rng.choice(["dropped", "retyped", "retyped", "renamed", "wrapped"])
    if kind == "dropped":
        del parent[target[-1]]
    elif kind == "retyped":
        parent[target[-1]] = copy.deepcopy(rng.choice(VALUES))
    elif kind == "renamed" and isinstance(parent, dict):
        parent[rng.choice(["no_such_key", "Editor", "axes ", "1", "seed"])] = parent.pop(target[-1])
    else:
        parent[target[-1]] = [parent[target[-1]]] if rng.random() < 0.5 else {"x": parent[target[-1]]}
    return kind, spec


def mutate_text(text: str, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["cut", "inserted", "swapped", "truncated", "indented"])
    lines = text.splitlines()
    if kind == "cut":
        i = rng.randrange(len(text))
        return kind, text[:i] + text[i + rng.randint(1, 20):]
    if kind == "inserted":
        i = rng.randrange(len(text))
        return kind, text[:i] + rng.choice(SYNTAX) + text[i:]
    if kind == "swapped" and len(lines) > 1:
        i, j = rng.sample(range(len(lines)), 2)
        lines[i], lines[j] = lines[j], lines[i]
        return kind, "\n".join(lines)
    if kind == "indented" and lines:
        i = rng.randrange(len(lines))
        lines[i] = rng.choice([" ", "   ", "\t"]) + lines[i]
        return kind, "\n".join(lines)
    return "truncated", text[: rng.randrange(len(text))]


def reason(message: str) -> str:
    """A short class of a refusal, for the counts."""
    for pattern, name in (("not valid YAML", "YAML syntax"), ("unknown key", "unknown key"),
                          ("unknown editor|editor .* is unknown", "unknown editor"), ("dataset", "dataset"),
                          ("neither fixed nor an axis|give editor|give dataset", "missing setting"),
                          ("must be|expected|is not one of|mapping|list", "wrong type or value")):
        if re.search(pattern, message):
            return name
    return "other"


def test_500_mutated_study_files_load_or_are_refused_naming_the_file(tmp_path):
    rng = random.Random(2024)
    counts: Counter[str] = Counter()
    failures = []
    base = sources()
    for i in range(600):
        name, spec = base[i % len(base)]
        text = yaml.safe_dump(spec, sort_keys=False)
        if rng.random() < 0.5:
            kind, mutated = mutate_tree(spec, rng)
            text = yaml.safe_dump(mutated, sort_keys=False)
        else:
            kind, text = mutate_text(text, rng)
        path = tmp_path / f"{i}-{name}"
        path.write_text(text)
        try:
            study = load_study(path)
        except StudyError as exc:
            message = str(exc)
            if str(path) not in message:
                failures.append(f"{path.name} ({kind}): the error does not name the file: {message}")
            counts[f"refused: {reason(message)}"] += 1
        except Exception as exc:  # the point: any other exception is the failure
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            failures.append(f"{path.name} ({kind}): {type(exc).__name__}: {exc} at {frame.filename}:{frame.lineno}\n"
                            f"{text}")
        else:
            assert study.cells, f"{path.name}: accepted without a cell"
            counts["accepted"] += 1
    print(dict(sorted(counts.items())))
    assert not failures, f"{len(failures)} of 600:\n" + "\n\n".join(f.splitlines()[0][:300] for f in failures)
    assert counts["accepted"] > 50 and sum(counts.values()) - counts["accepted"] > 300


@pytest.mark.parametrize("name", [p.name for p in sorted(STUDIES.glob("*.yaml"))])
def test_shipped_studies_load(name):
    assert load_study(STUDIES / name).cells
