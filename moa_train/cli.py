"""One-line errors for bad command-line overrides, checked before Hydra starts the run.

Hydra reports composition errors over several lines (with its search path), and a run folder it
cannot create with a traceback; a plain run composes the config once up front and turns such an
error into one `error: ...` line naming the key and what would be valid.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import re
import shutil
import textwrap
import unicodedata
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import RangeSweep, ValueType
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from moa_train.config import TASK_CONFIGS, VARIANTS, ConfigError, foreign_key, foreign_task_key
from moa_train.config_format import MOVED
from moa_train.data.corpus import DataError
from moa_train.errors import fail, printable
from moa_train.io import WriteError
from moa_train.paths import config_dir


def group_options(group: str) -> list:
    """Every config of a group, sub-folders included (experiment=moas_table1/mha), leaving out `_`
    files."""
    root = config_dir() / group
    names = (p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))
    return sorted(n for n in names if not any(part.startswith("_") for part in n.split("/")))


def missing_group(missing_cfg_file: str) -> tuple:
    """(group, name) of a config Hydra could not find: the group is the folder under configs/
    (experiments nest one level deeper, so `experiment/unknown/x` is the group `experiment`, not
    `experiment/unknown`)."""
    parts = missing_cfg_file.split("/")
    depth = 2 if parts[0] == "hydra" else 1
    return "/".join(parts[:depth]), "/".join(parts[depth:])


def describe(exc: Exception) -> str:
    """A one-line description of a composition error."""
    if isinstance(exc, (ConfigError, DataError)):  # ours: one line already (user input in it is
        return str(exc)  # escaped when printed)
    if isinstance(exc, yaml.YAMLError):
        return yaml_error(exc)
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, name = missing_group(exc.missing_cfg_file)
        if group.startswith("hydra/sweeper"):
            return f"{group}={name}: the Optuna sweeper is not installed; pip install -e '.[sweep]'"
        if group == "hydra/launcher":
            return (
                f"{group}={name}: no such launcher; installed: {', '.join(exc.options)} "
                f"(pip install -e '.[launchers]' adds joblib, submitit_local, submitit_slurm)"
            )
        options = group_options(group) if (config_dir() / group).is_dir() else []
        allowed = ", ".join(options) or "none (no such group)"
        return f"{group}={name}: no such config; allowed: {allowed}"
    # an experiment's key of another variant comes as the context
    inner = exc.__cause__ or exc.__context__
    if (
        isinstance(inner, (ConfigAttributeError, ConfigKeyError))
        and inner.object_type in VARIANTS.values()
    ):
        # a key of another attention variant: name its owners
        return foreign_key(inner.full_key, inner.object_type)
    if (
        isinstance(inner, (ConfigAttributeError, ConfigKeyError))
        and inner.object_type in TASK_CONFIGS.values()
    ):
        return foreign_task_key(inner.full_key, inner.object_type)
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    key = getattr(cause, "full_key", None)
    text = str(getattr(cause, "msg", None) or cause).strip()
    # OmegaConf's message ends in indented lines naming the key and types; the message itself may
    # hold a newline of the user's value, which stays (escaped when printed)
    first = CONTEXT.split(text)[0] if key else text.splitlines()[0]
    moved = {old: new for old, new in MOVED.items() if old == key or old.startswith(f"{key}.")}
    if key and moved:  # a key of an older layout (moa_train/config_format.py)
        where = ", ".join(f"{old} -> {new}" for old, new in moved.items())
        return f"{key}: moved to the task's keys ({where}); docs/tasks.md lists them"
    if key and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        near = near_key(key)
        first += f"; did you mean {near}?" if near else "; moa-train --help lists the main keys"
    return f"{key}: {first}" if key else first


def config_keys() -> list:
    """Every leaf key of the default config (`trainer.max_steps`, ...), the model's included."""
    from moa_train.config import compose_train

    def leaves(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    try:
        cfg = OmegaConf.to_container(compose_train([]), resolve=False)
    except Exception:  # a broken install or plugin: no suggestion rather than a second error
        return []
    return list(leaves(cfg, ""))


def near_key(key: str) -> str | None:
    """The key a misspelt or misplaced `key` most likely meant: the same name under another node
    (trainer.lr -> optim.lr, lr -> optim.lr), else the closest spelling (trainer.max_step ->
    trainer.max_steps)."""
    keys = config_keys()
    name = key.rpartition(".")[2]
    same = [k for k in keys if k.rpartition(".")[2] == name and k != key]
    if same:
        return min(same, key=lambda k: (k.count("."), k))
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
    return near[0] if near else None


CONTEXT = re.compile(r"\n\s+(?:full_key|reference_type|object_type)[:=]")


def yaml_error(exc: yaml.YAMLError) -> str:
    """A config file that YAML cannot read (a file on hydra.searchpath, say): its name, the line and
    the problem. A tag such as !!python/object is refused by the safe loader Hydra reads configs
    with: nothing of it ran."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}" if mark else "a config file"
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    tag = re.search(r"tag '(?:tag:yaml\.org,2002:)?([^']*)'", problem)
    if isinstance(exc, yaml.constructor.ConstructorError) and tag:
        return (
            f"{where}: the tag !!{tag.group(1)} is not plain YAML; configs are read with the safe "
            "loader, so nothing of it ran: remove the tag"
        )
    return f"{where}: not valid YAML ({problem})"


def unparsable(override: str) -> str:
    """Why Hydra's override lexer refused `override`: most often a non-ASCII character, which its
    grammar allows only inside quotes (and a number only with the digits 0-9), or a character that
    does not print (a newline, U+202E), named with its code."""
    key, _, value = override.partition("=")
    key = key.lstrip("+~")
    hidden = next((c for c in value if not c.isprintable()), None)
    if hidden is not None:
        name = f"U+{ord(hidden):04X} {unicodedata.name(hidden, '')}".strip()
        return (
            f"{key}: the value {value!r} holds {printable(hidden)} ({name}), a character that "
            "does not print; remove it"
        )
    if value.isascii():
        return f"{override}: not a valid override (see https://hydra.cc/docs/advanced/override_grammar/basic)"
    if value.lstrip("+-").replace(".", "", 1).isdecimal():
        return f"{key}: {value!r} holds non-ASCII digits; write the number with the digits 0-9"
    return (
        f"{key}: the value {value!r} holds non-ASCII characters, which must be quoted: "
        f"\"{key}='{value}'\" (the outer quotes for the shell)"
    )


def parse(overrides: list) -> list:
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        for one in overrides:  # name the override that does not parse
            try:
                OverridesParser.create().parse_overrides([one])
            except OverrideParseException:
                raise ConfigError(unparsable(one)) from None
        raise


ENUMERABLE = (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP, ValueType.RANGE_SWEEP)
# jobs one multirun may make: Hydra's launcher lists every job before it starts one (a range of
# 10^11 values would fill the memory), and the precheck composes each value of each sweep
MAX_JOBS = 10_000
# groups a run cannot do without (`${debug}_${model}` in train.yaml's defaults reads debug), and
# what to give instead of removing one
KEPT_GROUPS = {
    "model": "every run trains a model: choose one with model=NAME",
    "data": "every run trains on data: choose it with data=NAME",
    "debug": "it is empty unless given: leave debug=... out",
}


def sweep_size(override) -> int:
    """How many values a choice or range sweep has, counted without listing them."""
    sweep = override.value()
    if not isinstance(sweep, RangeSweep):
        return len(sweep.list)
    if sweep.step == 0:
        raise ConfigError(f"{override.key_or_group}: a range's step must not be 0")
    return max(0, math.ceil((sweep.stop - sweep.start) / sweep.step))


def check_sweeps(parsed: list) -> None:
    """ConfigError for a multirun of no job or more than MAX_JOBS, before any job is listed."""
    sizes = {o.input_line: sweep_size(o) for o in parsed if o.value_type in ENUMERABLE}
    jobs = math.prod(sizes.values())
    if sizes and not jobs:
        raise ConfigError(f"{min(sizes, key=sizes.get)}: the sweep has no value, so no job")
    if jobs > MAX_JOBS:
        given = max(sizes, key=sizes.get)
        raise ConfigError(
            f"{given}: the multirun makes {jobs:,} jobs ({sizes[given]:,} values here); at most "
            f"{MAX_JOBS:,} (Hydra lists every job before it starts one): split the sweep"
        )


def check_groups(parsed: list) -> None:
    """ConfigError for a config group removed (`~model`) or set to null (`model=null`, which Hydra
    refuses with a traceback), named with what to give instead."""
    for o in parsed:
        group = o.key_or_group
        is_group = (config_dir() / group).is_dir() or group.startswith("hydra/")
        emptied = o.is_delete() or (o.value() is None and not o.is_sweep_override())
        if not (is_group and emptied):
            continue
        given = o.input_line
        if group in KEPT_GROUPS:
            allowed = f"; allowed: {', '.join(group_options(group))}" if group != "debug" else ""
            raise ConfigError(
                f"{given}: the {group} group cannot be removed; {KEPT_GROUPS[group]}{allowed}"
            )
        if not o.is_delete():
            raise ConfigError(
                f"{given}: a config group takes the name of one of its configs; to use none, "
                f"write ~{group}"
            )


def expanded(parsed: list) -> list:
    """Override lists to check: the plain overrides with each value of each sweep (`a=1,2`,
    `choice(...)`, `range(...)`) once, the other sweeps at their first value; an interval (an Optuna
    search) or a glob is left to the sweeper. One list when nothing sweeps."""
    check_groups(parsed)
    check_sweeps(parsed)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = {}
    for o in parsed:
        if o.value_type in ENUMERABLE:
            prefix = "+" if o.is_add() else ("++" if o.is_force_add() else "")
            sweeps[o.key_or_group] = [
                f"{prefix}{o.key_or_group}={v}" for v in o.sweep_string_iterator()
            ]
    runs = [
        plain + [other[0] for k, other in sweeps.items() if k != key] + [value]
        for key, values in sweeps.items()
        for value in values
    ]
    return runs or [plain]


def precheck(overrides: list, multirun: bool = False):
    """Compose `train` with the user's overrides (each value of each sweep, in a multirun), validate
    it and check that the run (or sweep) folder can be written, before Hydra creates that folder;
    exit 2 with one line on failure. Returns the composed config (with `hydra`; in a multirun the
    last one checked)."""
    from moa_train.config import check_run_folder, check_writable, compose_train
    from moa_train.data import check_files
    from moa_train.train.tasks import validate

    folder_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        for user in expanded(parse(overrides)):
            cfg = compose_train(user, return_hydra_config=True)
            validate(cfg)
            if not cfg.trainer.eval_only:  # evaluated on the run's own data: eval_only_overrides
                check_files(cfg.data)
            # unresolvable here (${hydra:...} needs a running job): Hydra reports it itself
            folder = OmegaConf.select(cfg, folder_key, throw_on_resolution_failure=False)
            if folder is not None and not str(folder).strip():
                raise ConfigError(
                    f"{folder_key}: empty; give a folder (the default is under outputs/)"
                )
            if multirun or folder is None:
                check_writable(folder or ".", folder_key)
            else:
                check_run_folder(folder, cfg, f"{cfg.hydra.job.name}.log")
    except (HydraException, OmegaConfBaseException, ConfigError, DataError, yaml.YAMLError) as exc:
        fail(describe(exc))
    return cfg


def _job(cfg):
    """The config without `hydra` (whose keys resolve only in a running job)."""
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]
    return job


def free_space(written: WriteError, run_dir: Path, multirun: bool = False) -> str:
    """The line of a file of the run that could not be written (a full disk); earlier checkpoints
    and logs are kept."""
    resume = "" if multirun else f", then resume: the same command with hydra.run.dir={run_dir}"
    return f"{written}; free space there{resume}"


def hold_run_folder(cfg, overrides: list) -> tuple:
    """(lock, overrides, finished, new) of a plain training run, before Hydra writes anything into
    its folder (.hydra/, the log): the folder's lock, taken now and held until the process ends (the
    trainer takes it again, in this process), then what can refuse a resume there (check_resume).
    Exit 2 with one line if either refuses, the folder as it was. The overrides name the folder as
    resolved now: the default one's time stamp, resolved again by Hydra, could be a second later.
    `finished`: the line to print where the folder holds a finished run that this command would
    not change (loop.finished_summary), else None. `new`: the folder where this run made it (see
    discard_refused), else None."""
    from moa_train.train.checkpoint import CheckpointError
    from moa_train.train.loop import check_resume, finished_message, finished_summary
    from moa_train.train.runlock import RunLock

    folder = Path(os.path.expanduser(str(cfg.hydra.run.dir)))
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"hydra.run.dir: cannot create {folder} ({exc.strerror})")
    lock = None
    # the checkpoints a resume skips are named by the trainer, in the run's log
    quiet = logging.getLogger("moa_train.train.checkpoint")
    quiet.disabled = True
    try:
        lock = RunLock(folder).acquire()
        check_resume(_job(cfg), folder)
        summary = finished_summary(_job(cfg), folder)
        finished = None if summary is None else finished_message(folder, summary)
    except (ConfigError, CheckpointError, WriteError) as exc:
        if lock is not None:
            lock.release()
        if created:  # made for the lock; unless another trainer holds it now, empty again
            with contextlib.suppress(OSError):
                folder.rmdir()
        fail(free_space(exc, folder) if isinstance(exc, WriteError) else exc)
    finally:
        quiet.disabled = False
    kept = [o for o in overrides if o.lstrip("+~").partition("=")[0] != "hydra.run.dir"]
    return (
        lock,
        [*kept, f"hydra.run.dir={_quote(str(folder))}"],
        finished,
        folder if created else None,
    )


def discard_refused(folder: Path) -> None:
    """Remove `folder`, made by this run, after a refusal (exit 2) that came once Hydra had written
    into it (a data file found bad when the data is built, a full disk): with no checkpoint and no
    metrics line it holds nothing of training (.hydra/, the log, the lock, maybe the tokenizer),
    yet would read as a run. Called under the folder's lock: no other trainer is in it."""
    metrics = folder / "metrics.jsonl"
    logged = metrics.is_file() and metrics.stat().st_size > 0
    if not (logged or any(folder.glob("checkpoints/*"))):
        shutil.rmtree(folder, ignore_errors=True)


def _quote(value: str) -> str:
    """`value` as a Hydra override value: plain where the grammar allows, else a quoted string."""
    if re.fullmatch(r"[\w./:~+@-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def eval_only_overrides(overrides: list, cfg, stamp: str) -> tuple:
    """(overrides, evaluation folder) of a plain `trainer.eval_only=true` run, redirected so that
    Hydra writes into RUN/eval/<stamp>/ (eval.log, .hydra/) and nowhere else: RUN is
    trainer.resume's run folder, or with trainer.resume=auto/true the hydra.run.dir given (whose
    checkpoint is evaluated). A hydra.run.dir given beside a trainer.resume=PATH is kept as the
    output folder (the evaluation folder is then None: not ours to remove if the evaluation fails).
    Exit 2 with one line where there is no checkpoint, the command line asks for another model
    than the run's or a file of the run's data is missing or unreadable, before any folder
    exists."""
    from moa_train.data import check_files
    from moa_train.train.checkpoint import CheckpointError
    from moa_train.train.eval_run import prepare, run_folder

    resume = cfg.trainer.resume
    given_dir = any(o.startswith("hydra.run.dir=") for o in overrides)
    by_path = resume not in (True, "true", "auto", False, "false", None)
    target = Path(os.path.expanduser(str(resume))) if by_path else Path(str(cfg.hydra.run.dir))
    try:
        evaluated, _ = prepare(_job(cfg), target, overrides)
        check_files(evaluated.data)
    except (ConfigError, CheckpointError, DataError) as exc:
        fail(exc)
    kept = [
        o
        for o in overrides
        if not (o.startswith("trainer.resume=") or (o.startswith("hydra.run.dir=") and not by_path))
    ]
    folder = None if by_path and given_dir else run_folder(target) / "eval" / stamp
    out = [] if folder is None else [f"hydra.run.dir={_quote(str(folder))}"]
    return (
        kept + out + [f"trainer.resume={_quote(str(target.absolute()))}", "hydra.job.name=eval"],
        folder,
    )


# the keys `moa-train --help` shows, with what each does (its default is read from the config);
# tests/test_cli.py checks that each exists
MAIN_KEYS = {
    "model.n_layer / d_model / n_head": "the model's size",
    "data.root": "the data folder (default: $MOA_DATA_DIR, the folder recorded by `python3 -m "
    "moa_train.data --set-root DIR`, ../shared/data, or a download)",
    "trainer.max_steps": "optimizer steps",
    "trainer.batch_size": "sequences per step (global, whatever the number of GPUs)",
    "trainer.block_size": "tokens per sequence",
    "trainer.device": "auto | cpu | cuda",
    "trainer.precision": "fp32 | bf16",
    "trainer.seed": "the seed of weights and batches",
    "trainer.eval_interval": "steps between evaluations (and checkpoints)",
    "trainer.resume": "auto (continue a run folder that holds a checkpoint) | false | PATH",
    "trainer.max_time": "stop with a checkpoint after SECONDS or DD:HH:MM:SS",
    "trainer.early_stopping.patience": "stop after this many evaluations without a better val/loss",
    "trainer.eval_only": "evaluate trainer.resume=PATH's latest checkpoint, train nothing",
    "optim.lr": "the peak learning rate",
    "optim.weight_decay": "AdamW's weight decay",
    "schedule.warmup_steps": "linear warm-up steps",
    "experiment_name": "names the run folder outputs/runs/<experiment_name>/<date_time>/",
    "hydra.run.dir": "the run folder itself (trainer.resume=auto continues one)",
}
HIDDEN_GROUPS = {"debug_model", "hydra"}  # chosen for the user (debug=tiny picks debug_model)
EXAMPLES = (
    ("moa-train", "the default experiment: a small dynamic-MoAS char model, minutes on a CPU"),
    ("moa-train model=moa data=wikitext2_bpe", "another variant on BPE tokens"),
    ("moa-train model=gqa model.n_kv_heads=2 optim.lr=1e-3", "any key, from the command line"),
    ("moa-train experiment=moas_table1/moas_dynamic", "a paper's recipe"),
    ("moa-train debug=tiny", "a seconds-long smoke run (under outputs/debug/)"),
    ("moa-train -m model=mha,moa trainer.seed=0,1", "a sweep: 4 runs, one folder"),
    ("moa-train logger=[tensorboard,wandb]", "dashboards besides metrics.jsonl"),
    ("moa-train --cfg job model=moa", "print the composed config, run nothing"),
)


def help_page() -> str:
    """`moa-train --help`: the groups and their options (internal configs left out), the main keys
    with their defaults, examples. Hydra's own page: --hydra-help."""
    from moa_train.config import compose_train

    cfg = compose_train([], return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    groups = sorted(
        p.name for p in config_dir().iterdir() if p.is_dir() and p.name not in HIDDEN_GROUPS
    )
    lines = [
        "moa-train (= python3 -m moa_train): train a language model whose attention layers are",
        "mixtures, configured with Hydra.",
        "",
        "usage: moa-train [GROUP=OPTION ...] [KEY=VALUE ...]     one run",
        "       moa-train -m KEY=A,B [...]                      a sweep, one run per value",
        "       moa-train --cfg job [...]                       print the composed config",
        "       moa-train --hydra-help                          Hydra's own help",
        "",
        "groups (GROUP=OPTION; * = the default):",
    ]
    for group in groups:
        chosen, folders = choices.get(group), {}
        for o in group_options(group):  # experiment=moas_table1/mha: one entry per folder
            folder, _, name = o.rpartition("/")
            folders.setdefault(folder, []).append(f"{name}*" if o == chosen else name)
        options = [
            ", ".join(names) if not folder else f"{folder}/{{{', '.join(names)}}}"
            for folder, names in folders.items()
        ]
        text = textwrap.wrap("; ".join(options) or "-", 80)
        lines += [f"  {group if i == 0 else '':<15} {t}" for i, t in enumerate(text)]
    lines += ["", "main keys (KEY=VALUE; default in brackets):"]
    for key, what in MAIN_KEYS.items():
        first = key.split(" ")[0]
        node = first.rpartition(".")[0]
        shown = []
        for part in key.split(" / "):
            full = part if "." in part or not node else f"{node}.{part}"
            value = OmegaConf.select(cfg, full, throw_on_resolution_failure=False)
            shown.append("null" if value is None else str(value))
        if key == "hydra.run.dir":
            shown = ["outputs/runs/<experiment_name>/<date_time>"]
        text = f"{what} [{' / '.join(shown)}]"
        for i, part in enumerate(
            textwrap.wrap(text, 62, break_on_hyphens=False)
        ):  # 100 columns with the key
            lines.append(f"  {key if i == 0 else '':<34} {part}")
    lines += ["", "examples:"]
    lines += [f"  {cmd}\n      {what}" for cmd, what in EXAMPLES]
    lines += [
        "",
        "Every key and its default: moa-train --cfg job; each is documented in",
        "moa_train/config.py (a variant's own keys: its module in moa_train/models/attention/).",
        "A misspelt key is refused with the nearest one. Guides: README.md and docs/.",
    ]
    return "\n".join(lines)
