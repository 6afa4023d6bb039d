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

Scoring is model-agnostic: a `ScoreFn` maps (context tokens, continuation tokens) pairs to
(sum of continuation log-probabilities, all continuation tokens greedy). `make_score_fn`
builds one for a flt_jax LoopedTransformer at a chosen loop count.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import random
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from etils import epath

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
_REQUIRED_FIELDS = {
  "multiple_choice": ("query", "choices", "gold"),
  "schema": ("context_options", "continuation", "gold"),
  "language_modeling": ("context", "continuation"),
}
# Few-shot examples are separated from each other and from the example by a blank line.
FEWSHOT_SEPARATOR = "\n\n"

Pair = tuple[Sequence[int], Sequence[int]]
ScoreFn = Callable[[Sequence[Pair]], list[tuple[float, bool]]]


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


# ----------------------------------------------------------------------------- scoring


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
  scores = score_fn(pairs)
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


def evaluate_core(
  bundle_dir,
  score_fn: ScoreFn,
  tokenizer,
  *,
  tasks: Sequence[str] | None = None,
  max_examples: int | None = None,
  seed: int = 1234,
  prefix_id: int | None = None,
  log: Callable[[str], None] | None = None,
) -> CoreResult:
  """Scores every task of the bundle (or `tasks`); CORE is the mean centred accuracy.
  `prefix_id` starts every prompt (default: the tokenizer's eos_id, the document separator
  the model saw in training)."""
  results = {}
  for task in load_bundle(bundle_dir, tasks):
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


def write_core_csv(result: CoreResult, path) -> epath.Path:
  """task, type, shots, examples, accuracy, random baseline, centred; a last CORE row."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(
    ["task", "task_type", "num_fewshot", "examples", "accuracy", "random_baseline", "centered"]
  )
  for r in result.tasks.values():
    writer.writerow(
      [
        r.label,
        r.task_type,
        r.num_fewshot,
        r.examples,
        repr(r.accuracy),
        repr(r.random_baseline),
        repr(r.centered),
      ]
    )
  writer.writerow(["CORE", "", "", "", "", "", repr(result.core)])
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(out.getvalue())
  return path


# ----------------------------------------------------------------------------- flt_jax


def bucket_length(n: int, max_len: int, min_bucket: int = 16) -> int:
  """Pad lengths to powers of two so a task compiles a handful of shapes, not one per row."""
  return min(max_len, max(min_bucket, 1 << max(0, (n - 1).bit_length())))


def make_score_fn(
  model,
  params,
  loops: int,
  max_len: int,
  *,
  batch_size: int = 8,
  pad_id: int = 0,
  min_bucket: int = 16,
) -> ScoreFn:
  """A ScoreFn for a flt_jax LoopedTransformer at `loops` loops.

  Each (context, continuation) pair becomes one row of at most `max_len` input tokens,
  the context left-truncated to fit; rows are right-padded to a bucketed length (causal
  attention: padding after a position cannot change it) and run `batch_size` at a time.
  Log-probabilities come from the float32 logits; a token is greedy when it is the argmax.
  """
  if max_len < 2:
    raise ValueError(f"max_len={max_len} must be at least 2 (one context + one target)")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be at least 1")
  rope_len = getattr(getattr(model, "cfg", None), "rope_table_len", None)
  if rope_len is not None and max_len > rope_len:
    raise ValueError(
      f"max_len={max_len} exceeds the model's rotary table ({rope_len} positions); "
      "lower max_len or raise config.model.rope_max_len"
    )

  @jax.jit
  def score_batch(params, inputs_BxT, targets_BxT, mask_BxT):
    logits_BxTxV = model.apply({"params": params}, inputs_BxT, loops).astype(jnp.float32)
    logprobs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    target_BxT = jnp.take_along_axis(logprobs_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
    sum_logprob_B = jnp.sum(jnp.where(mask_BxT, target_BxT, 0.0), axis=-1)
    all_greedy_B = jnp.all(greedy_BxT | ~mask_BxT, axis=-1)
    return sum_logprob_B, all_greedy_B

  def score_fn(pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
    rows = []
    for i, (context, continuation) in enumerate(pairs):
      if not context or not continuation:
        raise ValueError(
          f"pair {i} has an empty {'context' if not context else 'continuation'}; "
          "every continuation token needs a preceding token to be predicted from"
        )
      if len(continuation) > max_len:
        raise ValueError(
          f"pair {i}: continuation of {len(continuation)} tokens does not fit max_len={max_len}"
        )
      sequence = (list(context) + list(continuation))[-(max_len + 1) :]
      rows.append((sequence[:-1], sequence[1:], len(continuation)))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    by_bucket: dict[int, list[int]] = {}
    for i, (inputs, _, _) in enumerate(rows):
      by_bucket.setdefault(bucket_length(len(inputs), max_len, min_bucket), []).append(i)
    for length, members in sorted(by_bucket.items()):
      for start in range(0, len(members), batch_size):
        chunk = members[start : start + batch_size]
        inputs_BxT = np.full([batch_size, length], pad_id, np.int32)
        targets_BxT = np.zeros([batch_size, length], np.int32)
        mask_BxT = np.zeros([batch_size, length], bool)
        for b, i in enumerate(chunk):
          inputs, targets, n_cont = rows[i]
          inputs_BxT[b, : len(inputs)] = inputs
          targets_BxT[b, : len(targets)] = targets
          mask_BxT[b, len(targets) - n_cont : len(targets)] = True
        sums, greedy = jax.device_get(score_batch(params, inputs_BxT, targets_BxT, mask_BxT))
        for b, i in enumerate(chunk):
          results[i] = (float(sums[b]), bool(greedy[b]))
    return results  # type: ignore[return-value]

  return score_fn


def make_core_fn(model, params, tokenizer, max_len: int, **score_kwargs):
  """`core(bundle_dir, loops, **evaluate_core kwargs) -> CoreResult` for a trained model."""

  @functools.cache
  def scorer(loops: int) -> ScoreFn:
    return make_score_fn(model, params, loops, max_len, **score_kwargs)

  def core(bundle_dir, loops: int, **kwargs) -> CoreResult:
    return evaluate_core(bundle_dir, scorer(int(loops)), tokenizer, **kwargs)

  return core


def core_summary(result: CoreResult) -> Mapping[str, float]:
  """Flat scalars for metrics writers: core, and <task>/accuracy, <task>/centered."""
  out: dict[str, float] = {"core": result.core}
  for label, r in result.tasks.items():
    out[f"core/{label}/accuracy"] = r.accuracy
    out[f"core/{label}/centered"] = r.centered
  return out
