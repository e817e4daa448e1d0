"""Three small offline lm-evaluation-harness tasks over local JSON files, shared by the harness tests: multiple
choice (acc, acc_norm), rolling perplexity (word_perplexity, bits_per_byte) and greedy generation (exact_match)."""

from __future__ import annotations

import json
from pathlib import Path

CHOICE_DOCS = [
    {"question": "1 + 1 =", "choices": [" 2", " 3", " eleven"], "label": 0},
    {"question": "def f(x): return", "choices": [" x", " None", " [x, x]"], "label": 1},
    {"question": "import", "choices": [" os", " sys"], "label": 1},
    {"question": "The sky is", "choices": [" blue.", " made of cheese"], "label": 0},
]
TEXT_DOCS = [{"text": "for i in range(10):\n    print(i)\n" * 4}, {"text": "x = 1"}]
GEN_DOCS = [{"prompt": "def ", "answer": "f"}, {"prompt": "class A", "answer": ":"}]
TASKS = ["aoe_tiny_choice", "aoe_tiny_text", "aoe_tiny_gen"]


def offline_task_manager(root: Path, monkeypatch):
    """TASKS written under `root`, the datasets library kept offline with its cache there; the harness's
    TaskManager that finds them (only them: indexing the harness's own thousands of task files takes most of a
    minute)."""
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf_cache"))
    write_tasks(root)
    return TaskManager(include_path=str(root), include_defaults=False)


def write_tasks(root: Path) -> None:
    """The data files and task YAMLs of TASKS under `root` (for `TaskManager(include_path=root)`)."""
    for name, docs in (("choice", CHOICE_DOCS), ("text", TEXT_DOCS), ("gen", GEN_DOCS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: train\n"
    (root / "choice.yaml").write_text(
        f"task: aoe_tiny_choice\n{common}dataset_kwargs:\n  data_files: {root}/choice.jsonl\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (root / "text.yaml").write_text(
        f"task: aoe_tiny_text\n{common}dataset_kwargs:\n  data_files: {root}/text.jsonl\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (root / "gen.yaml").write_text(
        f"task: aoe_tiny_gen\n{common}dataset_kwargs:\n  data_files: {root}/gen.jsonl\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
