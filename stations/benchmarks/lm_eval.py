"""lm-evaluation-harness tasks on the model the eval station loaded.

The loaded model and tokenizer are wrapped in lm-eval's HFLM as they are, so
the load plan (GPU, 4-bit, offload) is the one the factory chose. A quantized
artifact the eval station opened with its own runtime (a GGUF in llama.cpp,
an MLX directory in mlx-lm: `loaded.runtime`) is wrapped in `RuntimeLM`
instead, so the task measures that file, tokenized as HFLM tokenizes the
source. Runs
offline: datasets come from the Hugging Face cache, or from the node's
`[benchmarks]` table (`factory.benchmarks.resolve_data`):

  * a file (JSONL, JSON or parquet, in the task's own columns) is the test
    split of the task the entry names (of each task of a group);
  * a directory holds `<task>.jsonl|.json|.parquet` per task of a group; the
    tasks with a file run, the others do not.

Either way lm-eval's own YAML for the task is kept (prompt, choices, metric,
filters) and only the data source is replaced: an override YAML that
`include`s the registered one, in <stage>/lm_eval_tasks/, is given to
lm-eval's TaskManager, where a task of the same name replaces the built-in.
With only a test split, few-shot examples come from the test split too
(lm-eval's fallback; it skips the document being asked).

`score` is the task's headline metric (the entry's `metric`, else the first
metric of the task's YAML, first filter), in 0..1; for a group, lm-eval's
group aggregate when it computes one, else the document-weighted mean of the
tasks. Raw metrics and document counts per task come with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from factory.benchmarks import DATA_SUFFIXES, LM_EVAL_INSTALL, lm_eval_task
from factory.errors import StageFailed
from stations.benchmarks import BenchJob

OVERRIDES_DIR = "lm_eval_tasks"


def _offline() -> None:
    """No download mid-part: the plan checked the data is on the node."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets.config

    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def _leaf_tasks(manager: Any, name: str) -> list[str]:
    """The tasks an lm-eval group runs, groups inside it expanded; a task is its own leaf."""
    entry = manager.task_index.get(name)
    if entry is None or entry.kind.name != "GROUP":
        return [name]
    members = (entry.cfg or {}).get("task") or []
    return [leaf for m in members for leaf in _leaf_tasks(manager, m if isinstance(m, str) else m.get("task"))]


def _data_files(path: Path, task: str, manager: Any) -> dict[str, Path]:
    """task -> its local test-split file. One file for a group is the test
    split of each of its tasks (each keeps its own document filter, e.g.
    mmlu_pro's per-subject `process_docs`)."""
    if path.is_file():
        return {leaf: path for leaf in _leaf_tasks(manager, task)}
    found = {}
    for f in sorted(path.iterdir()):
        suffix = next((s for s in DATA_SUFFIXES if f.name.endswith(s)), None)
        if suffix and f.is_file():
            found[f.name[:-len(suffix)]] = f
    if not found:
        raise StageFailed(f"{path} holds no <task>{'|'.join(DATA_SUFFIXES)} file for lm-eval group {task!r}; "
                          "add one per task to run")
    return found


def _override(manager: Any, task: str, data: Path, out_dir: Path) -> Path:
    """An override YAML for `task` reading `data` as its test split."""
    entry = manager.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise StageFailed(f"lm-eval has no YAML task {task!r} to point at {data}; name a task lm-eval lists "
                          "(python -m lm_eval ls tasks)")
    builder = "parquet" if data.name.endswith(".parquet") else "json"
    config = {"include": str(Path(entry.yaml_path).resolve()), "task": task, "dataset_path": builder,
              "dataset_name": None, "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
              "test_split": "test", "training_split": None, "validation_split": None, "fewshot_split": None}
    out = out_dir / OVERRIDES_DIR / f"{task}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")  # JSON is YAML
    return out


def _tasks(job: BenchJob, task: str) -> tuple[list[str], Any]:
    """The task names to evaluate and the TaskManager that knows them, made
    once per benchmark (indexing lm-eval's task YAML takes seconds) and kept
    for the second model."""
    from lm_eval.tasks import TaskManager

    if "tasks" not in job.shared:
        data = job.data()
        builtin = TaskManager()
        if data.path is None:
            job.shared.update(tasks=[task], manager=builtin)
        else:  # the overrides include the built-in YAML by path: nothing else needs indexing
            files = _data_files(data.path, task, builtin)
            for name, path in files.items():
                _override(builtin, name, path, job.out_dir)
            job.shared.update(tasks=list(files), manager=TaskManager(
                include_defaults=False, include_path=str(job.out_dir / OVERRIDES_DIR)))
    return job.shared["tasks"], job.shared["manager"]


def _metric_key(row: dict, wanted: str | None, config: dict | None) -> str:
    """The "<metric>,<filter>" key of a result row the score is read from."""
    keys = [k for k in row if "," in k and not k.split(",")[0].endswith("_stderr")]
    if wanted:
        match = [k for k in keys if k == wanted or k.split(",")[0] == wanted]
    else:
        first = ((config or {}).get("metric_list") or [{}])[0].get("metric")
        match = [k for k in keys if k.split(",")[0] == first] or keys
    if not match:
        raise StageFailed(f"lm-eval result has no metric {wanted!r}; it has {', '.join(keys) or 'none'}: "
                          "set the benchmark entry's \"metric\" to one of them")
    return match[0]


def _score(out: dict, names: list[str], task: str, wanted: str | None) -> tuple[float, str]:
    results, configs = out["results"], out.get("configs", {})
    if len(names) == 1 and names[0] in results:
        key = _metric_key(results[names[0]], wanted, configs.get(names[0]))
        value = results[names[0]][key]
    elif task in results and any("," in k for k in results[task]):  # lm-eval's group aggregate
        key = _metric_key(results[task], wanted, None)
        value = results[task][key]
    else:
        leaves = [n for n in names if n in results]
        key = _metric_key(results[leaves[0]], wanted, configs.get(leaves[0]))
        docs = {n: out["n-samples"][n]["effective"] for n in leaves}
        value = sum(results[n][key] * docs[n] for n in leaves) / sum(docs.values())
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise StageFailed(f"lm-eval metric {key} of {task!r} is {value!r}, not a 0..1 score; set the benchmark "
                          "entry's \"metric\" to an accuracy-like metric")
    return float(value), key


def run(job: BenchJob) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise StageFailed(f"benchmark {job.spec.name!r} runs on lm-evaluation-harness: {LM_EVAL_INSTALL}") from err
    _offline()
    task = lm_eval_task(job.spec)
    names, manager = _tasks(job, task)
    limit = job.option("limit")
    seed = int(job.option("seed", 0))
    runtime = job.loaded.runtime
    if runtime is None:
        lm = HFLM(pretrained=job.loaded.model, tokenizer=job.loaded.tokenizer,
                  batch_size=int(job.option("batch_size", 1)))
    else:
        from stations.benchmarks.runtime_lm import RuntimeLM

        lm = RuntimeLM(runtime, job.loaded.tokenizer, seed=seed)
    # The stage's maxNewTokens caps generation tasks too (gsm8k, mmlu_pro
    # ask for up to 2048 tokens of their own).
    cap = job.option("max_new_tokens")
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=job.spec.n_shot,
                                  gen_kwargs=None if cap is None else {"max_gen_toks": int(cap)},
                                  limit=None if limit is None else int(limit), task_manager=manager,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    if not out or not any(n in out.get("results", {}) for n in names + [task]):
        raise StageFailed(f"lm-eval returned no results for task {task!r}; check the task name")
    score, key = _score(out, names, task, job.spec.metric)
    results = out["results"]
    return {"score": score, "metric": key, "task": task, "data": job.data().origin,
            "runtime": "transformers" if runtime is None else runtime.name,
            "num_fewshot": job.spec.n_shot, "limit": limit,
            "docs": {n: out["n-samples"][n]["effective"] for n in names if n in out.get("n-samples", {})},
            "metrics": {n: {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                        for n, row in results.items()}}
