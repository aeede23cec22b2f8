"""Fuzzed loaders: real records of every registered format, mutated at random, load or fail with a named error.

120 seeded mutations per registered format: one field anywhere in one record is dropped, set to
null, retyped, emptied, made huge, filled with odd unicode or nested wrongly (the record itself too).
Each file is read as ``--dataset FILE`` is (format detection on the first record, then its loader) and must
either load or raise ``DatasetError`` naming the file, the record and a field (or, for the first record, that
no format knows its fields); any other exception is a bare traceback for the user and fails the test.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

from overtone.benchmarks import BENCHMARKS, FORMATS, DatasetError, load_benchmark
from overtone.benchmarks.knowedit import read_json_records

TRIES_PER_FORMAT = 120
RECORDS_PER_FILE = 3
ODD_TEXT = ["", "   ", "\u202eevil", "💥" * 20, "\x00", "\ud800", "e\u0301", "{}", "{} {}", "\n\t", "null", "0"]


def samples(format_name: str) -> list[Any]:
    """The first records of every shipped benchmark in ``format_name``."""
    records = []
    for bench in BENCHMARKS.values():
        if bench.format == format_name:
            records += read_json_records(bench.file)[:RECORDS_PER_FILE]
    return records


def places(value: Any, path: tuple = ()) -> list[tuple]:
    """Every path into ``value`` (dict keys and list indices), the empty path (the value itself) first."""
    out = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            out += places(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += places(item, (*path, i))
    return out


def mutated(value: Any, rng: random.Random) -> tuple[str, Any]:
    """(name, new value) of one mutation of ``value``; the name "drop" removes it instead."""
    kind = rng.choice(["drop", "null", "retype", "empty", "huge", "unicode", "nested"])
    if kind == "null":
        return kind, None
    if kind == "retype":
        return kind, rng.choice([7, -1.5, True, "text", ["a", 1], {"x": 1}, [[None]]])
    if kind == "empty":
        return kind, rng.choice(["", [], {}])
    if kind == "huge":
        return kind, rng.choice(["word " * 20_000, [copy.deepcopy(value)] * 500, {str(i): i for i in range(2000)}])
    if kind == "unicode":
        return kind, rng.choice(ODD_TEXT)
    if kind == "nested":
        return kind, rng.choice([[value], {"value": value}, [[value]]])
    return kind, None


def mutate(records: list[Any], rng: random.Random) -> tuple[int, tuple, str]:
    index = rng.randrange(len(records))
    path = rng.choice(places(records[index]))
    kind, new = mutated(_get(records[index], path), rng)
    if not path:
        records[index] = {} if kind == "drop" else new
        return index, path, kind
    parent = _get(records[index], path[:-1])
    if kind == "drop":
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return index, path, kind


def _get(value: Any, path: tuple) -> Any:
    for step in path:
        value = value[step]
    return value


def test_every_format_has_shipped_records_to_fuzz():
    assert all(samples(name) for name in FORMATS), "a registered format needs a shipped benchmark for the fuzzer"


def test_mutated_records_load_or_name_the_record_and_field(tmp_path):
    rng = random.Random(13)
    tries, loaded, refused, bare = 0, 0, 0, []
    for name in sorted(FORMATS):
        originals = samples(name)
        for t in range(TRIES_PER_FORMAT):
            records = copy.deepcopy(originals)
            index, path, kind = mutate(records, rng)
            file = tmp_path / f"{name}-{t}.json"
            file.write_text(json.dumps(records))
            tries += 1
            try:
                load_benchmark(str(file))
                loaded += 1
            except DatasetError as exc:
                message = str(exc)
                named = str(file) in message and f"record {index + 1}" in message
                field = "field '" in message or (not path and "expected a JSON object" in message) or (
                    index == 0 and "unknown dataset format; record 1 has the fields" in message)
                if not (named and field):
                    bare.append((name, index, path, kind, f"unnamed: {message}"))
                refused += 1
            except Exception as exc:  # anything else reaches the user as a traceback
                bare.append((name, index, path, kind, f"{type(exc).__name__}: {exc}"[:300]))
            file.unlink()
    assert tries == TRIES_PER_FORMAT * len(FORMATS) and loaded and refused
    assert not bare, f"{len(bare)} of {tries} mutations gave no named DatasetError, e.g. {bare[:5]}"
