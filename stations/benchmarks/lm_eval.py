"""lm-evaluation-harness tasks, where the `lm_eval` package is installed.

Not exercised by the test suite (lm_eval and its datasets are not installed
on the CPU test node); on a node without it, the runner fails with what to
install. The loaded model is handed to lm-eval's HFLM wrapper as-is, so the
load plan (GPU, 4-bit, offload) is the one the factory chose.
"""

from __future__ import annotations

from factory.errors import StageFailed
from stations.benchmarks import LM_EVAL_INSTALL, BenchJob, lm_eval_task
from stations.benchmarks.humaneval import option


def run(job: BenchJob) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise StageFailed(f"benchmark {job.spec['name']!r} runs on lm-evaluation-harness: {LM_EVAL_INSTALL}") from err
    task = lm_eval_task(job.spec)
    lm = HFLM(pretrained=job.loaded.model, tokenizer=job.loaded.tokenizer,
              batch_size=int(option(job, "batchSize", default=1)))
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=job.spec.get("nShot"),
                                  limit=option(job, "limit"), random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0)
    results = (out or {}).get("results", {}).get(task)
    if results is None:
        raise StageFailed(f"lm-eval returned no results for task {task!r}; check the task name")
    return {k: v for k, v in results.items() if isinstance(v, (int, float, str))}
