"""In-context evaluation in the CORE format (DCLM, arXiv:2406.11794; the metric the FLT
paper reports as its downstream average).

An eval bundle is a directory laid out as DCLM's and nanochat's `eval_bundle`:

  BUNDLE/core.yaml            icl_tasks: a list of {label, dataset_uri, icl_task_type,
                              num_fewshot: [N] (or N), continuation_delimiter (default " ")}
  BUNDLE/eval_meta_data.csv   columns "Eval Task" and "Random baseline" (percent, 0-100)
  BUNDLE/eval_data/<dataset_uri>   one JSON object per line

Rows by task type:
  multiple_choice    {"query", "choices": [str], "gold": int}   same context, one
                     continuation per choice
  schema             {"context_options": [str], "continuation", "gold": int}   one context
                     per option, the same continuation
  language_modeling  {"context", "continuation"}   correct when every continuation token is
                     the model's greedy (argmax) prediction

Every prompt is `num_fewshot` solved examples (drawn from the task's other rows with a
per-example seed), each followed by a blank line, then the example itself. Prompts are
tokenised whole (after a document-start token) and split into context and continuation in
token space: for multiple choice at the prompts' common prefix, for schema at their common
suffix, for language modelling after the prompt without its continuation. Multiple choice
and schema predict the option with the lowest mean loss per continuation token; ties go to
the lowest option index. Accuracy is centred against the task's random baseline b:
(accuracy - b) / (1 - b); CORE is the mean centred accuracy over the tasks.

Scoring is model-agnostic: a `ScoreFn` (eval/scorer.py) maps (context tokens,
continuation tokens) pairs to (sum of continuation log-probabilities, all continuation
tokens greedy); `Evaluator.score_fn` gives one for a flt_jax model at any loop count.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
from collections.abc import Callable, Sequence

import numpy as np
import yaml
from etils import epath

from flt_jax.eval.scorer import Pair, ScoreFn

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
_REQUIRED_FIELDS = {
  "multiple_choice": ("query", "choices", "gold"),
  "schema": ("context_options", "continuation", "gold"),
  "language_modeling": ("context", "continuation"),
}
# Few-shot examples are separated from each other and from the example by a blank line.
FEWSHOT_SEPARATOR = "\n\n"


class BundleError(ValueError):
  """An eval bundle that cannot be read: missing files, unknown task types, bad rows."""


@dataclasses.dataclass(frozen=True)
class CoreTask:
  """One in-context task of a bundle, rows loaded."""

  label: str
  task_type: str
  dataset_uri: str
  num_fewshot: int
  continuation_delimiter: str
  random_baseline: float  # fraction in [0, 1)
  rows: tuple[dict, ...]


@dataclasses.dataclass(frozen=True)
class TaskResult:
  label: str
  task_type: str
  num_fewshot: int
  examples: int
  accuracy: float
  random_baseline: float
  centered: float


@dataclasses.dataclass(frozen=True)
class CoreResult:
  tasks: dict[str, TaskResult]
  core: float  # mean centred accuracy


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
  """(accuracy - b) / (1 - b): 0 at chance, 1 when every example is right."""
  if not 0.0 <= random_baseline < 1.0:
    raise ValueError(f"random baseline {random_baseline} must be a fraction in [0, 1)")
  return (accuracy - random_baseline) / (1.0 - random_baseline)


# ----------------------------------------------------------------------------- the bundle


def _read_baselines(path: epath.Path, bundle: epath.Path) -> dict[str, float]:
  if not path.exists():
    raise BundleError(
      f"eval bundle {bundle} has no eval_meta_data.csv (each task's random baseline); "
      "point at the directory that holds core.yaml, eval_meta_data.csv and eval_data/"
    )
  reader = csv.DictReader(io.StringIO(path.read_text()))
  missing = {"Eval Task", "Random baseline"} - set(reader.fieldnames or ())
  if missing:
    raise BundleError(f"{path} lacks the column(s) {sorted(missing)}")
  baselines = {}
  for line, row in enumerate(reader, start=2):
    try:
      percent = float(row["Random baseline"])
    except (TypeError, ValueError):
      raise BundleError(
        f"{path} line {line}: 'Random baseline' {row['Random baseline']!r} is not a number"
      ) from None
    if not 0.0 <= percent < 100.0:
      raise BundleError(
        f"{path} line {line}: random baseline {percent} of task {row['Eval Task']!r} must be "
        "a percentage in [0, 100)"
      )
    baselines[row["Eval Task"]] = percent / 100.0
  return baselines


def _read_rows(path: epath.Path, task_type: str, label: str) -> tuple[dict, ...]:
  rows = []
  for line_no, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{path} line {line_no} (task {label!r})"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise BundleError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(row, dict):
      raise BundleError(f"{where} is not a JSON object")
    missing = [k for k in _REQUIRED_FIELDS[task_type] if k not in row]
    if missing:
      raise BundleError(
        f"{where} lacks {missing}; {task_type} rows need {list(_REQUIRED_FIELDS[task_type])}"
      )
    options_key = {"multiple_choice": "choices", "schema": "context_options"}.get(task_type)
    if options_key:
      options = row[options_key]
      if not (isinstance(options, list) and len(options) >= 2):
        raise BundleError(f"{where}: {options_key!r} must be a list of at least two strings")
      if not all(isinstance(o, str) for o in options):
        raise BundleError(f"{where}: every entry of {options_key!r} must be a string")
      gold = row["gold"]
      if not (isinstance(gold, int) and 0 <= gold < len(options)):
        raise BundleError(
          f"{where}: gold={gold!r} must be an index into its {len(options)} {options_key}"
        )
    rows.append(row)
  if not rows:
    raise BundleError(f"{path} (task {label!r}) has no rows")
  return tuple(rows)


def _num_fewshot(value, label: str) -> int:
  if isinstance(value, list):
    if len(value) != 1:
      raise BundleError(
        f"task {label!r}: num_fewshot={value} lists several shot counts; give one per task "
        "entry (copy the entry for each count)"
      )
    value = value[0]
  if not (isinstance(value, int) and value >= 0):
    raise BundleError(f"task {label!r}: num_fewshot={value!r} must be a non-negative integer")
  return value


def load_bundle(bundle_dir, tasks: Sequence[str] | None = None) -> list[CoreTask]:
  """Reads core.yaml, eval_meta_data.csv and each listed task's rows (or only `tasks`)."""
  bundle = epath.Path(bundle_dir)
  if not bundle.is_dir():
    raise BundleError(
      f"eval bundle directory {bundle} does not exist; give the directory that holds "
      "core.yaml, eval_meta_data.csv and eval_data/ (e.g. DCLM's or nanochat's eval_bundle)"
    )
  config_path = bundle / "core.yaml"
  if not config_path.exists():
    raise BundleError(f"eval bundle {bundle} has no core.yaml (the task list)")
  config = yaml.safe_load(config_path.read_text()) or {}
  entries = config.get("icl_tasks") if isinstance(config, dict) else None
  if not isinstance(entries, list) or not entries:
    raise BundleError(f"{config_path} must hold a non-empty list 'icl_tasks'")
  baselines = _read_baselines(bundle / "eval_meta_data.csv", bundle)

  known = [e.get("label") for e in entries if isinstance(e, dict)]
  if tasks is not None:
    unknown = sorted(set(tasks) - set(known))
    if unknown:
      raise BundleError(f"task(s) {unknown} are not in {config_path}; it lists {known}")

  out = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict):
      raise BundleError(f"{config_path}: icl_tasks[{i}] is not a mapping")
    missing = [k for k in ("label", "dataset_uri", "icl_task_type") if k not in entry]
    if missing:
      raise BundleError(f"{config_path}: icl_tasks[{i}] lacks {missing}")
    label = entry["label"]
    if tasks is not None and label not in tasks:
      continue
    task_type = entry["icl_task_type"]
    if task_type not in TASK_TYPES:
      raise BundleError(
        f"task {label!r}: icl_task_type={task_type!r} is not supported; use one of {TASK_TYPES}"
      )
    if label not in baselines:
      raise BundleError(
        f"task {label!r} has no row in {bundle / 'eval_meta_data.csv'}; add its "
        "'Random baseline' (percent)"
      )
    data_path = bundle / "eval_data" / entry["dataset_uri"]
    if not data_path.exists():
      raise BundleError(
        f"task {label!r}: data file {entry['dataset_uri']!r} is missing from eval bundle "
        f"{bundle} (looked for {data_path}); restore the file or remove the task from core.yaml"
      )
    num_fewshot = _num_fewshot(entry.get("num_fewshot", 0), label)
    rows = _read_rows(data_path, task_type, label)
    if num_fewshot >= len(rows):
      raise BundleError(
        f"task {label!r}: num_fewshot={num_fewshot} needs at least {num_fewshot + 1} rows, "
        f"{data_path} has {len(rows)}"
      )
    out.append(
      CoreTask(
        label=label,
        task_type=task_type,
        dataset_uri=entry["dataset_uri"],
        num_fewshot=num_fewshot,
        continuation_delimiter=str(entry.get("continuation_delimiter", " ")),
        random_baseline=baselines[label],
        rows=rows,
      )
    )
  return out


# ----------------------------------------------------------------------------- prompts


def fewshot_indices(num_rows: int, index: int, num_fewshot: int, seed: int) -> list[int]:
  """The rows shown as solved examples before row `index`: never the row itself, and the
  same for the same (seed, index)."""
  if num_fewshot == 0:
    return []
  rng = random.Random(seed + index)
  return rng.sample([i for i in range(num_rows) if i != index], num_fewshot)


def _solved(task: CoreTask, row: dict) -> str:
  d = task.continuation_delimiter
  if task.task_type == "multiple_choice":
    return f"{row['query']}{d}{row['choices'][row['gold']]}"
  if task.task_type == "schema":
    return f"{row['context_options'][row['gold']]}{d}{row['continuation']}"
  return f"{row['context'].strip()}{d}{row['continuation']}"


def render_prompts(task: CoreTask, index: int, seed: int = 1234) -> list[str]:
  """The full prompts of row `index`: one per choice (multiple_choice), one per context
  option (schema), or [without continuation, with continuation] (language_modeling)."""
  row = task.rows[index]
  shots = fewshot_indices(len(task.rows), index, task.num_fewshot, seed)
  prefix = "".join(_solved(task, task.rows[i]) + FEWSHOT_SEPARATOR for i in shots)
  d = task.continuation_delimiter
  if task.task_type == "multiple_choice":
    return [f"{prefix}{row['query']}{d}{choice}" for choice in row["choices"]]
  if task.task_type == "schema":
    return [f"{prefix}{option}{d}{row['continuation']}" for option in row["context_options"]]
  # Trailing whitespace (of the context or the delimiter) goes with the continuation so
  # that the prompt without it is a clean token prefix of the prompt with it.
  with_continuation = f"{prefix}{row['context'].strip()}{d}{row['continuation']}"
  without = f"{prefix}{row['context'].strip()}{d}".rstrip()
  return [without, with_continuation]


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
  n = min(len(s) for s in seqs)
  for i in range(n):
    if any(s[i] != seqs[0][i] for s in seqs):
      return i
  return n


def split_prompts(
  task_type: str, prompts_tokens: Sequence[Sequence[int]]
) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) token pairs of one example's tokenised prompts."""
  if task_type == "multiple_choice":
    # Options share the context: it ends where the prompts first differ, keeping at least
    # one continuation token even when one choice is a prefix of another.
    start = min(_common_prefix(prompts_tokens), min(len(t) for t in prompts_tokens) - 1)
    return [(list(t[:start]), list(t[start:])) for t in prompts_tokens]
  if task_type == "schema":
    reversed_tokens = [list(reversed(t)) for t in prompts_tokens]
    suffix = min(_common_prefix(reversed_tokens), min(len(t) for t in prompts_tokens) - 1)
    return [(list(t[: len(t) - suffix]), list(t[len(t) - suffix :])) for t in prompts_tokens]
  without, with_continuation = prompts_tokens
  start = _common_prefix([without, with_continuation])
  if start >= len(with_continuation):
    raise ValueError("a language-modelling example has an empty continuation")
  return [(list(with_continuation[:start]), list(with_continuation[start:]))]


# ----------------------------------------------------------------------------- decision rules


def _prefix_ids(tokenizer, prefix_id: int | None) -> list[int]:
  if prefix_id is not None:
    return [prefix_id]
  eos = getattr(tokenizer, "eos_id", None)  # packed training puts it before every document
  return [] if eos is None else [eos]


def evaluate_task(
  task: CoreTask,
  score_fn: ScoreFn,
  tokenizer,
  *,
  max_examples: int | None = None,
  seed: int = 1234,
  prefix_id: int | None = None,
) -> TaskResult:
  """Accuracy of one task. Rows are visited in a seeded shuffled order, so `max_examples`
  takes a representative subset; few-shot examples still come from all rows."""
  prefix = _prefix_ids(tokenizer, prefix_id)
  order = list(range(len(task.rows)))
  random.Random(seed).shuffle(order)
  if max_examples is not None:
    order = order[:max_examples]
  pairs: list[Pair] = []
  spans = []  # (first pair, number of pairs) of each example
  for index in order:
    prompts = render_prompts(task, index, seed)
    tokens = [prefix + list(tokenizer.encode(p)) for p in prompts]
    example_pairs = split_prompts(task.task_type, tokens)
    spans.append((len(pairs), len(example_pairs)))
    pairs.extend(example_pairs)
  try:
    scores = score_fn(pairs)
  except ValueError as e:  # a pair the scorer cannot take: say which task it came from
    raise ValueError(f"task {task.label!r}: {e}") from None
  if len(scores) != len(pairs):
    raise ValueError(f"score_fn returned {len(scores)} scores for {len(pairs)} pairs")
  correct = 0
  for index, (first, count) in zip(order, spans):
    if task.task_type == "language_modeling":
      correct += bool(scores[first][1])
      continue
    mean_losses = [-scores[first + j][0] / len(pairs[first + j][1]) for j in range(count)]
    predicted = mean_losses.index(min(mean_losses))  # ties: the lowest option index
    correct += predicted == task.rows[index]["gold"]
  accuracy = correct / len(order)
  return TaskResult(
    label=task.label,
    task_type=task.task_type,
    num_fewshot=task.num_fewshot,
    examples=len(order),
    accuracy=accuracy,
    random_baseline=task.random_baseline,
    centered=centered_accuracy(accuracy, task.random_baseline),
  )


def score_core(
  core_tasks: Sequence[CoreTask],
  score_fn: ScoreFn,
  tokenizer,
  *,
  max_examples: int | None = None,
  seed: int = 1234,
  prefix_id: int | None = None,
  log: Callable[[str], None] | None = None,
) -> CoreResult:
  """Scores loaded tasks (load_bundle); CORE is the mean centred accuracy. `prefix_id`
  starts every prompt (default: the tokenizer's eos_id, the document separator the model
  saw in training)."""
  results = {}
  for task in core_tasks:
    result = evaluate_task(
      task, score_fn, tokenizer, max_examples=max_examples, seed=seed, prefix_id=prefix_id
    )
    results[task.label] = result
    if log:
      log(
        f"{task.label} ({task.num_fewshot}-shot {task.task_type}, {result.examples} examples): "
        f"accuracy {result.accuracy:.4f} centred {result.centered:.4f}"
      )
  core = float(np.mean([r.centered for r in results.values()]))
  return CoreResult(tasks=results, core=core)


def evaluate_core(
  bundle_dir, score_fn: ScoreFn, tokenizer, *, tasks: Sequence[str] | None = None, **kwargs
) -> CoreResult:
  """Scores every task of the bundle (or `tasks`): score_core(load_bundle(...), ...)."""
  return score_core(load_bundle(bundle_dir, tasks), score_fn, tokenizer, **kwargs)
