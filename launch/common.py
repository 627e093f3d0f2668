"""Shared start-up for the launch scripts: make `configs` importable, quiet logs."""

import logging
import os
import re
import sys
from pathlib import Path

# On GPUs, lower the threefry PRNG to a kernel rather than unrolled HLO: the same random
# numbers, but initialising a paper-size model compiles in seconds instead of minutes (an
# H200 took 3m41s to compile the initialiser without it).
os.environ.setdefault("JAX_THREEFRY_GPU_KERNEL_LOWERING", "1")

ROOT = Path(__file__).resolve().parents[1]
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")  # gs://..., s3://...
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

# transformers, imported for its tokenizers, advises at import that without PyTorch "Models
# won't be available": true of its models, which these commands do not use (its only
# advisory warning, in v5).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# JAX logs at INFO each accelerator plugin it does not find (e.g. no TPU on a GPU machine).
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

# absl logs INFO lines by default (every TFDS file read, every Orbax save); show warnings
# and errors unless --verbosity asks for more.
from absl import app as _app  # noqa: E402
from absl import logging as _absl_logging  # noqa: E402


def _quiet():
  if not any(a.startswith(("--verbosity", "-v", "--v=")) for a in sys.argv[1:]):
    _absl_logging.set_verbosity(_absl_logging.WARNING)


_app.call_after_init(_quiet)


class _OrbaxTracebacks(logging.Filter):
  """A checkpoint save that fails in Orbax's background threads (a full disk) is logged with
  the same traceback by each thread, then once per unfinished write task at exit (thousands of
  lines for a paper-size model); the command says what failed and what to do in one line of
  its own (checkpoint.CheckpointNotWritten). Orbax's errors keep their one-line message;
  MEDVQA_TRACEBACK=1 keeps everything. (A failed restore's abandoned reads are dropped where
  restores happen, for every caller: checkpoint._AbandonedReads.)"""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio":  # "Task exception was never retrieved", an Orbax write's.
      return not (record.exc_info and "orbax" in str(record.msg))
    if record.exc_info and "orbax" in Path(record.pathname).parts:
      record.exc_info, record.exc_text = None, None
    return True


if not os.environ.get("MEDVQA_TRACEBACK"):
  for _name in ("absl", "asyncio"):  # Orbax logs through absl.
    logging.getLogger(_name).addFilter(_OrbaxTracebacks())


def cluster_flags():
  """Defines --coordinator_address/--num_processes/--process_id; returns `join()`, which joins
  the processes of a multi-host run (medvqa_jax/train/distributed.py: a no-op for one
  process; clusters it detects need none of the flags)."""
  from absl import flags
  coord = flags.DEFINE_string("coordinator_address", None,
                              "Multi-host: host:port of process 0.")
  nproc = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
  pid = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")

  def join():
    from medvqa_jax.train import distributed
    distributed.initialize(coord.value, nproc.value, pid.value)
  return join


def _config_fields(tree, prefix="") -> dict:
  """The leaf fields of a config as {"a.b.c": value}."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    out.update(_config_fields(value, path + ".") if hasattr(value, "items") else {path: value})
  return out


def check_images(paths) -> None:
  """Reads each --image as a build would, before a command loads its model (minutes on a
  paper-size run): a missing file, a folder or a file that is not an image is refused first,
  with the build's message."""
  from medvqa_jax.data import builders
  for path in paths:
    try:
      builders.read_as_built(path, None)
    except ValueError as e:  # "PATH: what is wrong".
      raise ValueError(f"--image={e}") from None


def config_overrides(config, argv: list[str] | None = None) -> dict:
  """{field: value} of the --config.FIELD=VALUE flags of the command line, the values as
  `config` (the parsed --config) holds them."""
  values = _config_fields(config)
  return {f: values[f] for f in _override_fields(argv) if f in values}


def _override_fields(argv: list[str] | None = None) -> list[str]:
  """The FIELDs of the command line's --config.FIELD=VALUE flags, in order, once each."""
  argv = sys.argv[1:] if argv is None else argv
  return list(dict.fromkeys(a[len("--config."):].split("=", 1)[0] for a in argv
                            if a.startswith("--config.")))


def _default_config() -> str | None:
  """The script's default --config (None where it has none)."""
  from absl import flags
  if "config" in flags.FLAGS and flags.FLAGS["config"].default is not None:
    return flags.FLAGS["config"].default_as_str.strip("'\"")
  return None


def config_file_flag(default: str | None, help_text: str = "Config file."):
  """Defines --config (ml_collections), defaulting to `default`, a path in the repository.
  ml_collections loads the default, with the command line's --config.FIELD overrides, as
  the flag is defined: from another working folder the default is the repository's file, and
  a misspelt field is reported as `run` reports it (not a traceback of the import)."""
  from ml_collections import config_flags
  if default is not None and not Path(default).is_file():
    default = str(ROOT / default)
  try:
    return config_flags.DEFINE_config_file("config", default, help_text)
  except (AttributeError, KeyError) as e:
    problem = _bad_override(e, default)
    if problem is None:
      raise
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)


def _bad_override(error: Exception, default: str | None = None) -> str | None:
  """What is wrong with a --config.FIELD=VALUE of the command line, if that is what failed.
  default: the --config the script falls back on (else read from the defined flag)."""
  import difflib
  overrides = _override_fields()
  if not overrides:
    return None
  spec = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")),
              default or _default_config())
  fields = []
  if spec:
    path, _, arg = spec.partition(":")
    module = _config_module(path)
    if module is None:  # The file itself is broken: absl's own error says more.
      return None
    try:
      fields = list(_config_fields(module.get_config(arg or None)))
    except Exception:
      return None
  unknown = [o for o in overrides if fields and o not in fields]
  if not unknown:
    return None
  lines = []
  for o in unknown:
    near = difflib.get_close_matches(o, fields, n=3, cutoff=0.6)
    lines.append(f"--config.{o}: the config has no such field"
                 + (f" (did you mean {', '.join('--config.' + n for n in near)}?)" if near else ""))
  return "\n".join(lines)  # (ml_collections' own error, its text escaped, says no more.)


def _resolve_config_path(argv: list[str]) -> list[str]:
  """argv with its --config file found: a relative path that is not under the working folder
  is looked up in the repository, so that the commands run from any folder; a file found in
  neither is an error naming both places; the file found is checked (`_check_config_file`).
  (A script's default is found by config_file_flag.)"""
  given = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
  if len(given) > 1:  # absl took the last; only the first was looked up.
    raise ValueError(f"--config is given {len(given)} times: give one (and --config.FIELD=VALUE "
                     "for its fields)")
  at = given[0] if given else None
  if at is None:  # The script's default: config_file_flag found it.
    return argv
  if argv[at] == "--config":
    if at + 1 == len(argv):
      return argv  # No value: absl's parser says so.
    argv = argv[:at] + [f"--config={argv[at + 1]}"] + argv[at + 2:]
  spec = argv[at].split("=", 1)[1]
  if _URL.match(spec):
    raise ValueError(f"--config={spec}: paths are read as files, not URLs; copy the config "
                     "file here, or mount the bucket (e.g. with gcsfuse) and give its local path")
  path, sep, arg = spec.partition(":")
  if Path(path).is_file():
    _check_config_file(path, arg, spec)
    return argv
  found = ROOT / path
  if Path(path).is_absolute() or not found.is_file():
    folders = [ROOT] if Path.cwd().resolve() == ROOT.resolve() else [Path.cwd(), ROOT]
    where = "" if Path(path).is_absolute() else \
        f" (looked in {' and in '.join(map(str, folders))})"
    raise FileNotFoundError(f"--config: no config file {path!r}{where}")
  _check_config_file(found, arg, spec)
  return argv[:at] + [f"--config={found}{sep}{arg}"] + argv[at + 1:]


def _check_config_file(path, arg: str, spec: str) -> None:
  """Refuses a --config file that does not load as Python or defines no get_config (absl's
  parser showed a traceback of the import), a --config=FILE:ARG whose ARG its get_config
  refuses (an unknown tower preset, a misspelt key), with its message (absl reported it as a
  FATAL flag-parsing error with a traceback), and a file whose get_config gives no run config
  (a tower preset, configs/finetune.py's shared part: the commands failed on a missing field
  with a traceback). spec: the --config value as given."""
  try:
    module = _load_module(path)
  except Exception as e:
    raise ValueError(f"--config={path}: not a config file that loads ({type(e).__name__}: "
                     f"{e})") from None
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"--config={path}: defines no get_config(), which a config file must")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ValueError as e:
    raise ValueError(f"--config={spec}: {e}") from None
  except TypeError as e:  # A shared part's get_config, with arguments of its own.
    raise ValueError(f"--config={spec}: not a run config (its get_config() takes other "
                     f"arguments: {e}): a part that run configs share; give a run config, "
                     "e.g. configs/vqa_rad.py") from None
  if not all(hasattr(config, "get") and config.get(k) is not None
             for k in ("model", "data", "train")):
    raise ValueError(f"--config={spec}: not a run config (it has no model, data and train "
                     "fields): a tower preset (configs/towers/) is named in a run config's "
                     "argument, as --config=configs/base.py:image=NAME,text=NAME")


def _load_module(path):
  """The Python file at `path` (whatever its name ends with, as ml_collections reads a
  --config) as a module."""
  import importlib.machinery
  import importlib.util
  loader = importlib.machinery.SourceFileLoader("_config", str(path))
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_config", loader))
  loader.exec_module(module)
  return module


def _config_module(path: str):
  """The config file at `path` as a module (None when it does not load)."""
  try:
    return _load_module(path)
  except Exception:
    return None


def _urls() -> list[str]:
  """The flags and config fields given a URL (gs://..., s3://...). Every path the commands
  read or write is a file path: a bucket must be mounted (e.g. with gcsfuse)."""
  from absl import flags
  found = []
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if name.split(".")[0] in ("config", "coordinator_address") or not flag.present:
      continue
    if isinstance(flag.value, str) and _URL.match(flag.value):
      found.append(f"--{name}={flag.value}")
  config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
  if config is not None:
    for field, value in _config_fields(config).items():
      if isinstance(value, str) and _URL.match(value):
        found.append(f"--config.{field}={value}")
  return found


def _own_error(error: BaseException) -> str | None:
  """Where this project raised `error` on purpose, if it did: a ValueError, FileNotFoundError
  or PermissionError (bad config values, missing or bad input files and checkpoints, an
  output folder that cannot be written), or an ImportError of a message of its own (a
  PyTorch checkpoint without torch; a failed `import` names its module instead), whose
  innermost frame is in medvqa_jax/ or launch/. Those messages say what is wrong and what to
  do; a library's errors and everything else keep their traceback."""
  own_import = isinstance(error, ImportError) and error.name is None
  if not (own_import or isinstance(error, (ValueError, FileNotFoundError, PermissionError))):
    return None
  tb = error.__traceback__
  if tb is None:
    return None
  while tb.tb_next is not None:
    tb = tb.tb_next
  path = Path(tb.tb_frame.f_code.co_filename).resolve()
  if not any(path.is_relative_to(ROOT / part) for part in ("medvqa_jax", "launch")):
    return None
  return f"{path.relative_to(ROOT)}:{tb.tb_lineno}"


_HELP = {"--help", "-help", "-?", "--helpshort", "--helpfull", "--helpxml"}


def _own_flags_in_help():
  """--help lists the script's own flags only; those defined here (--config, the multi-host
  flags) count as the script's."""
  from absl import flags
  for name in ("config", "coordinator_address", "num_processes", "process_id"):
    if name in flags.FLAGS:
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def run(main):
  """absl's app.run, with a command-line override of a config field that does not exist
  reported as such (with the nearest field names) instead of a traceback from the flag
  parser, the --config file found from any working folder (`_resolve_config_path`), the
  project's own errors about its input (`_own_error`) printed as their message alone, exit
  status 1 (MEDVQA_TRACEBACK=1 shows the traceback), --help exiting with 0 and a flag that
  does not parse with 2."""
  started = []
  _own_flags_in_help()
  try:
    sys.argv = _resolve_config_path(sys.argv)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

  def wrapped(argv):
    started.append(True)
    urls = _urls()
    if urls:
      print(f"error: {', '.join(urls)}: paths are read as files, not URLs; mount the bucket "
            "(e.g. with gcsfuse) and give its local path", file=sys.stderr)
      sys.exit(2)
    return main(argv)

  try:
    _app.run(wrapped)
  except SystemExit as e:
    # Before main, absl exits with 1 both after the help that was asked for (a success) and
    # on a flag it cannot parse (a usage error, 2 like the others here).
    if e.code == 1 and not started:
      sys.exit(0 if _HELP.intersection(a.split("=")[0] for a in sys.argv[1:]) else 2)
    raise
  except (AttributeError, KeyError) as e:
    problem = None if started else _bad_override(e)
    if problem is None:
      raise
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)
  except Exception as e:
    where = _own_error(e)
    if where is None or os.environ.get("MEDVQA_TRACEBACK"):
      raise
    print(f"error: {e}\n(raised at {where}; MEDVQA_TRACEBACK=1 shows the traceback)",
          file=sys.stderr)
    sys.exit(1)
