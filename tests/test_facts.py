"""Hand-written facts: JSON, JSON Lines and CSV files read into cases, clear errors for bad records, and
locality prompts without answers scored on the unedited model's own continuation."""

from __future__ import annotations

import json

import pytest

from overtone.benchmarks import DatasetError, EditCase, Probe, detect_format, load_benchmark
from overtone.evaluation import Evaluator
from overtone.generation import greedy_complete

FACTS = [
    {"prompt": "The Eiffel Tower is located in the city of", "target": "Rome", "subject": "Eiffel Tower",
     "paraphrases": ["Where is the Eiffel Tower? It is in the city of"],
     "locality": ["The capital of Japan is", {"prompt": "The mother tongue of Thomas Mann is", "answer": "German"}]},
    {"id": "darrieux", "prompt": "The mother tongue of Danielle Darrieux is", "target": "English"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_json_lines_json_and_csv_give_the_same_cases(tmp_path):
    jsonl = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    array = tmp_path / "facts.json"
    array.write_text(json.dumps(FACTS))
    csv = tmp_path / "facts.csv"
    csv.write_text(
        "prompt,target,subject,paraphrases,locality,id\n"
        '"The Eiffel Tower is located in the city of",Rome,Eiffel Tower,'
        '"Where is the Eiffel Tower? It is in the city of","The capital of Japan is | The mother tongue of Thomas '
        'Mann is",\n'
        "The mother tongue of Danielle Darrieux is,English,,,,darrieux\n")
    assert detect_format(jsonl).name == "facts" and detect_format(csv).name == "facts"
    from_jsonl, from_json, from_csv = (load_benchmark(str(p)) for p in (jsonl, array, csv))
    first = from_jsonl[0]
    assert first.case_id == "facts/0" and first.subject == "Eiffel Tower" and first.target == "Rome"
    assert first.rephrases == ("Where is the Eiffel Tower? It is in the city of",)
    assert first.locality == {"unrelated": (Probe("The capital of Japan is", ""),
                                            Probe("The mother tongue of Thomas Mann is", "German"))}
    assert from_jsonl[1].case_id == "darrieux" and from_jsonl[1].subject is None and not from_jsonl[1].locality
    assert from_json == from_jsonl
    # CSV has no answer objects: its locality prompts are all scored on the model's own continuation
    assert from_csv[0].locality["unrelated"][1] == Probe("The mother tongue of Thomas Mann is", "")
    assert from_csv[0].rephrases == first.rephrases and from_csv[1] == from_jsonl[1]


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "Q?", "target": ""}, r"record 2: field 'target': is empty"),
    ({"prompt": "Q?", "target": "A", "paraphrase": ["x"]}, r"record 2: field 'paraphrase': unknown field; a fact has"),
    ({"prompt": "Q?", "target": "A", "paraphrases": 3}, r"field 'paraphrases': expected a list or a string, got int"),
    ({"prompt": "Q?", "target": "A", "locality": [{"answer": "x"}]}, r"field 'locality\[0\].prompt': expected a str"),
    ({"prompt": "Q?", "target": "A", "id": "darrieux"}, r"field 'id': duplicate id 'darrieux'"),
])
def test_a_bad_record_is_named_with_its_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "facts.jsonl", [FACTS[1], record])
    with pytest.raises(DatasetError, match=message):
        load_benchmark(str(path))


def test_unreadable_lines_and_rows_are_named(tmp_path):
    bad = tmp_path / "facts.jsonl"
    bad.write_text(json.dumps(FACTS[1]) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"facts.jsonl: line 2: not valid JSON"):
        load_benchmark(str(bad))
    wide = tmp_path / "facts.csv"
    wide.write_text("prompt,target\nQ?,A,extra\n")
    with pytest.raises(DatasetError, match=r"facts.csv: line 2: more cells than the header has columns"):
        load_benchmark(str(wide))


def test_a_locality_prompt_alone_is_scored_on_the_unedited_models_continuation(tiny_llama):
    prompt = "The capital of Japan is"
    case = EditCase("c", "Which family does Epaspidoceras belong to?", "Noctuidae",
                    locality={"unrelated": (Probe(prompt, ""),)})
    evaluator = Evaluator(tiny_llama)
    probes = evaluator.probes(case)
    assert probes.groups == [("rel", "rewrite"), ("loc", "unrelated")]
    own = greedy_complete(tiny_llama, [prompt], 8)[0].strip()
    assert own and tiny_llama.tokenizer.decode(probes.batch.input_ids[1]).startswith(f"{prompt} {own}")
    pre = evaluator.before(case, record_from=None)
    assert evaluator.after(pre, replay=False)["post"]["loc"] == 1.0  # nothing edited: full agreement
