"""The evaluation cache on the real embedded model (SmolLM2-135M-Instruct): slow.

FT-M one case at a time and two side by side, scored teacher-forced and in the wild (``--eval both``): the records
are identical without the cache, with it cold and with it warm (but for timings and the count of hits). Warm, the
edited pass runs the whole model instead of replaying the unedited pass's activations above FT-M's layer.
"""

from __future__ import annotations

import pytest
from test_eval_cache import entries, untimed

from overtone.benchmarks import load_benchmark
from overtone.editors import make_editor
from overtone.evaluation import EvalCache, WildSettings, make_evaluator
from overtone.models import load_model
from overtone.objectives import make_objective
from overtone.runner import ResultStore, read_run, run_continual

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("parallel", [1, 2])
def test_real_model_records_are_identical_with_and_without_the_cache(tmp_path, eval_cache_dir, parallel):
    lm = load_model("smollm2-135m", device="cpu")  # its own copy: the cache hashes a model before its first edit
    cache = EvalCache(lm)
    cases = load_benchmark("zsre", limit=2)
    editor = make_editor("ft-m", lm, make_objective("overtone"))

    def run(directory: str, cached: bool) -> list[dict]:
        evaluator = make_evaluator("teacher-forced", lm, eval_mode="both", wild=WildSettings(max_new_tokens=20),
                                   cache=cache if cached else None)
        with ResultStore(tmp_path / directory, {"parallel": parallel}) as store:
            run_continual(editor, evaluator, cases, store, parallel=parallel)
        return read_run(tmp_path / directory)[1]

    plain, cold = run("plain", cached=False), run("cold", cached=True)
    assert entries(eval_cache_dir)
    warm = run("warm", cached=True)
    assert [r["eval_cache_hits"] for r in cold] == [0, 0] and all(r["eval_cache_hits"] > 0 for r in warm)
    assert untimed(plain) == untimed(cold) == untimed(warm)
    assert all(r["wild"]["generations"] for r in warm)
