"""A run's directory from claim to final name: one owner, nothing half-written, nothing lost.

    claim(out, name)   creates the hidden `.<name>.partial` atomically (os.mkdir) under a name that
                       no finished or interrupted run holds (`<name>-2`, ... otherwise: a second run
                       of the same setting, or a concurrent one, gets its own) and holds an flock on
                       it while the process lives; a killed run's lock dies with it
    reopen(partial)    --resume: takes over an interrupted run's directory (refused while its
                       process still runs); load_checkpoint cuts the loggers' files back to it
    write_config/save_checkpoint/finish   every file is written to a temporary name, fsynced and
                       renamed, so a reader (or a resume) never sees half of one; finish writes
                       summary.json and renames the directory to its final name; the directory
                       holding each new name is fsynced too (fsync_dir), so a power cut just after
                       a rename cannot undo it
    identity           every checkpoint records the run's configuration (config.json's content) and
                       a digest of its own contents; a resume refuses a damaged checkpoint, an edited
                       config.json, and a rebuilt experiment that differs (load_checkpoint)
    guard()            on any failure keeps the directory once a task has finished (hidden,
                       resumable when it holds a checkpoint) and says where it is; a full disk or a
                       file-size limit becomes one line naming the file

The logs and the checkpoint agree: the engine hands the task's record to the loggers (they flush
at every task record) before it asks for the checkpoint, and the checkpoint records how many bytes
of each logger's files it covers; a resume truncates them there, dropping whatever the interrupted
run wrote later, a torn last line included (clsim/loggers/__init__.py).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import itertools
import json
import os
import resource
import shutil
import sys
import threading
from pathlib import Path

import torch

from clsim.errors import UserError

CHECKPOINT, CONFIG, LOG, SUMMARY = "checkpoint.pt", "config.json", "log.jsonl", "summary.json"
RESUME = "python run_scenario.py --resume"

_RAN_OUT = {errno.ENOSPC: "the disk is full (ENOSPC)", errno.EDQUOT: "the disk quota is used up (EDQUOT)",
            errno.EFBIG: "the file-size limit was reached (EFBIG)"}


class Interrupted(Exception):
    """The user stopped (Ctrl-C, SIGTERM) a run that has a checkpoint: it can be resumed."""

    def __init__(self, partial: Path):
        self.partial = partial


class OutOfSpace(UserError):
    """A write failed for want of space or of file size: the run can continue once there is room."""


def out_of_space(exc: OSError, path: Path) -> OutOfSpace | None:
    """The one-line error for an OSError that means 'no room' (naming the file), else None.
    `path`: the file being written, or the run directory when the error does not say (TensorBoard's
    writer thread): then the file that reached the size limit is looked up there."""
    if exc.errno not in _RAN_OUT:
        return None
    return OutOfSpace(f"{_RAN_OUT[exc.errno]} while writing {exc.filename or _at_limit(path) or path}")


def _at_limit(path: Path) -> Path | None:
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY or not path.is_dir():
        return None
    return next((p for p in sorted(path.rglob("*")) if p.is_file() and p.stat().st_size >= limit), None)


def quiet_thread_errors(args) -> None:
    """threading.excepthook: a writer thread (TensorBoard's) that ran out of room stays quiet; the
    main thread meets the same error at its next write and reports it in one line."""
    if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in _RAN_OUT):
        threading.__excepthook__(args)


#: bytes a run writes below --out: its directory's name, then the longest of its files' (TensorBoard's
#: tb/events.out.tfevents.<time>.<host>.<pid>.<n>, with a host name of up to 64)
RUN_ROOM, FILE_ROOM = 256, 128


def check_length(path: Path, what: str, room: int) -> None:
    """Refuse a path that the file system cannot hold (each name within its NAME_MAX, the whole
    with `room` bytes more below it within PATH_MAX), before the OSError 36 of the first write."""
    name_max, path_max = _limits(path)
    long = next((part for part in path.parts if len(os.fsencode(part)) > name_max), None)
    if long is not None:
        raise UserError(f"{what}: the name {long[:32]}... is {len(os.fsencode(long))} bytes long, more than the "
                        f"{name_max} this file system allows; give a shorter one")
    size = len(os.fsencode(path.absolute()))
    if size + room > path_max:
        raise UserError(f"{what}: the path is {size} bytes long, and what a run writes below it needs up to {room} "
                        f"more, past the {path_max} this file system allows; give a shorter one")


def _limits(path: Path) -> tuple[int, int]:
    """NAME_MAX and PATH_MAX of the file system holding `path` (its nearest existing ancestor)."""
    for p in (path.absolute(), *path.absolute().parents):
        try:
            return os.pathconf(p, "PC_NAME_MAX"), os.pathconf(p, "PC_PATH_MAX")
        except (OSError, ValueError):
            continue
    return 255, 4096


def check_out(out: str, create: bool = False) -> Path:
    """Refuse an --out that is not (or cannot become) a writable directory, or whose path is too
    long for a run to be written below it; create it if asked. Checked before any work, and
    without creating anything then."""
    root = Path(out)
    check_length(root, f"--out {out if len(out) < 80 else out[:60] + '...'}", RUN_ROOM)
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            pass   # not a directory: said below
        except OSError as exc:
            raise UserError(f"--out {out}: cannot create it ({exc.strerror}); pass a writable directory") from None
    existing = next(p for p in (root, *root.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise UserError(f"--out {out} is not a directory"
                        f"{'' if existing == root else f' ({existing} is a file)'}; pass a directory for the runs")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(existing) else "permission denied"
        raise UserError(f"--out {out} is not writable ({reason}); pass a writable directory")
    return root


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def _lock(path: Path, wait: bool = False) -> int | None:
    """An exclusive flock on the directory `path`; None when another process holds it (`wait`:
    block until it is ours, for a directory we just created that another run may be probing)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def fsync_dir(path: Path) -> None:
    """Make the names created or renamed in directory `path` survive a power cut: on POSIX an
    fsync of a file covers its data, not its entry in the directory, so the directory itself is
    fsynced. Where directories cannot be (not POSIX; /proc, some network file systems: EINVAL or
    ENOTSUP) there is nothing more to do."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise out_of_space(exc, path) or exc


class RunDirectory:
    def __init__(self, root: Path, final_name: str, fd: int, resumed: bool):
        self.root, self.final_name, self._fd, self.resumed = root, final_name, fd, resumed
        self.path = root / f".{final_name}.partial"
        self.tasks_done = 0
        self.config: str | None = None   # the run's identity as JSON text, recorded in every checkpoint

    @classmethod
    def claim(cls, out: str, name: str) -> RunDirectory:
        root = check_out(out, create=True)
        check_length(root / f".{name}-999.partial", f"the run directory of {name}", FILE_ROOM)   # room for -N
        for n in itertools.count(1):
            final = name if n == 1 else f"{name}-{n}"
            partial = root / f".{final}.partial"
            if (root / final).exists():
                continue
            try:
                os.mkdir(partial)
            except FileExistsError:
                _note_interrupted(partial)
                continue
            except OSError as exc:
                raise UserError(f"--out {out}: cannot create a run directory there ({exc.strerror})") from None
            fsync_dir(root)
            return cls(root, final, _lock(partial, wait=True), resumed=False)

    @classmethod
    def reopen(cls, partial: Path) -> RunDirectory:
        if not (partial.name.startswith(".") and partial.name.endswith(".partial")) or not partial.is_dir():
            raise UserError(f"{partial} is not an interrupted run: pass the hidden .<name>.partial directory "
                            f"that the interruption message named")
        fd = _lock(partial)
        if fd is None or not partial.is_dir():   # locked, or renamed by its finishing owner meanwhile
            raise UserError(f"{partial} is in use by another running clsim process; wait for it to end")
        return cls(partial.parent, partial.name[1:-len(".partial")], fd, resumed=True)

    # --- files ------------------------------------------------------------------------------
    def saved_argv(self) -> list[str]:
        """The flags the run started with, as its checkpoint records them (config.json is a copy
        for people; `load_checkpoint` refuses a run whose copy was edited)."""
        argv = _recorded_config(_load(self.path / CHECKPOINT), self.path / CHECKPOINT)["argv"]
        if not argv:
            raise UserError(f"{self.path} was started from Python with objects that have no flags; resume it "
                            f"there: Experiment(<the same arguments>).run(resume_dir=...)")
        return argv

    def write_config(self, config: dict) -> None:
        """config.json, and the run's identity every checkpoint records (`load_checkpoint` compares)."""
        self.config = json.dumps(config, indent=2)
        _write_atomic(self.path / CONFIG, self.config.encode())

    def task_finished(self, state: dict | None, logger_files: dict[str, int] | None = None) -> None:
        """The engine's checkpoint callback: after every task, with the state to continue from
        (None when --checkpoint false: the task still counts for keeping the directory) and the
        sizes of the loggers' files (Logger.file_sizes), which the checkpoint then covers."""
        self.tasks_done += 1
        if state is None:
            return
        files = dict(logger_files or {})
        for name in files:   # the task's records are flushed; make them durable before the checkpoint
            with open(self.path / name, "rb") as f:
                os.fsync(f.fileno())
        state = {**state, "logger_files": files, "config": self.config}
        buffer = io.BytesIO()
        torch.save({**state, "digest": digest(state)}, buffer)
        _write_atomic(self.path / CHECKPOINT, buffer.getbuffer())

    def load_checkpoint(self, config: dict) -> dict:
        """The checkpoint to resume from, when it is this run's: the configuration it records must
        equal config.json (an edit would otherwise be ignored, then copied into the finished run),
        and its identity (resolved options, seed, code and library versions, data; not the
        OBSERVERS) that of `config`, the experiment rebuilt now. The loggers' files are cut back to
        the records it covers (files it does not know, written after it, are removed)."""
        state = _load(self.path / CHECKPOINT)
        recorded = _recorded_config(state, self.path / CHECKPOINT)
        try:
            on_disk = json.loads((self.path / CONFIG).read_text())
        except (OSError, ValueError):
            raise UserError(f"{self.path} holds no readable {CONFIG} (it was removed or damaged); restore it "
                            f"or start the run again") from None
        edit = difference(recorded, on_disk)
        if edit:
            raise UserError(f"{self.path / CONFIG} was changed after the run started ({edit}); a run resumes "
                            f"only as it started: undo the change, or start a new run with the options you want")
        changed = difference(_identity(recorded), _identity(json.loads(json.dumps(config))))
        if changed:
            raise UserError(f"{self.path} cannot be resumed by this code with these options ({changed}); "
                            f"resume it with the clsim and libraries it started with, or start it again")
        self.config = state.pop("config")
        files = state.pop("logger_files", None)
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in files.items()):
            raise UserError(f"{self.path / CHECKPOINT} is not a clsim checkpoint (no logger file sizes); "
                            f"start the run again")
        for name, size in files.items():
            path = self.path / name
            if Path(name).is_absolute() or ".." in Path(name).parts:   # a hostile checkpoint stays inside
                raise UserError(f"{self.path / CHECKPOINT} names a file outside its run directory; "
                                f"start the run again")
            if not path.is_file() or path.stat().st_size < size:
                raise UserError(f"{path} is shorter than its checkpoint records (it was changed or lost); "
                                f"start the run again")
        try:
            for path in sorted(p for p in self.path.rglob("*") if p.is_file()):
                name = str(path.relative_to(self.path))
                if name in files:
                    os.truncate(path, files[name])
                elif name not in (CONFIG, CHECKPOINT):
                    path.unlink()
        except OSError as exc:
            raise UserError(f"cannot cut {exc.filename} back to the checkpoint ({exc.strerror})") from None
        return state

    def finish(self, summary: dict) -> Path:
        """Write summary.json and give the directory its final name (the next free one)."""
        _write_atomic(self.path / SUMMARY, json.dumps(summary, indent=2).encode())
        for n in itertools.count(1):
            final = self.root / (self.final_name if n == 1 else f"{self.final_name}-{n}")
            if final.exists():
                continue
            try:
                os.rename(self.path, final)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise
            fsync_dir(self.root)   # the new name, durable before the run is reported done
            self.close()
            return final

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # --- failure ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self):
        """Run the body; on failure keep what is worth keeping and say where it is."""
        try:
            yield self
        except BaseException as exc:
            kept = self.resumed or self.tasks_done > 0
            resumable = kept and (self.path / CHECKPOINT).is_file()
            self.close()
            if not kept:
                shutil.rmtree(self.path, ignore_errors=True)
            if isinstance(exc, OSError) and out_of_space(exc, self.path) is not None:
                exc = out_of_space(exc, self.path)
            if isinstance(exc, KeyboardInterrupt):
                if resumable:
                    raise Interrupted(self.path) from None
                raise
            if not kept:
                raise exc
            where = (f"the run so far is kept in {self.path}" if resumable else
                     f"its logs are kept in {self.path} (no checkpoint to resume from)")
            if isinstance(exc, OutOfSpace) and resumable:
                raise OutOfSpace(f"{exc}; {where}: make room, then continue with: {RESUME} {self.path}") from None
            if isinstance(exc, UserError):
                if self.resumed and self.tasks_done == 0:   # e.g. a refused checkpoint: nothing ran
                    raise exc
                raise type(exc)(f"{exc}; {where}") from None
            print(f"error: {where}", file=sys.stderr)
            raise


def digest(value) -> str:
    """sha256 of a checkpoint's contents (tensors by dtype, shape and bytes; plain data by repr),
    saved with it: torch.load checks no checksum, so a flipped bit in a weight would otherwise be
    resumed from, silently."""
    h = hashlib.sha256()

    def walk(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            h.update(b"{")
            for key, item in v.items():
                walk(key)
                walk(item)
            h.update(b"}")
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for item in v:
                walk(item)
            h.update(b"]")
        else:
            h.update(f"{type(v).__name__} {v!r};".encode())
    walk(value)
    return h.hexdigest()


def _load(path: Path) -> dict:
    """torch.load with weights_only=True: a checkpoint holds tensors and plain data only, so a
    hostile file cannot run code (the engine stores RNG states as tensors for this). Its contents
    must match the digest saved with them."""
    try:
        state = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}: the run stopped before its first task ended; "
                        f"start it again") from None
    except Exception as exc:   # pickle refused a type, or the file is not a checkpoint at all
        raise UserError(f"{path} is not a clsim checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'}); "
                        f"start the run again") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a clsim checkpoint (it holds a {type(state).__name__}, not a dict); "
                        f"start the run again")
    saved = state.pop("digest", None)
    if saved != digest(state):
        raise UserError(f"{path} is damaged: its contents do not match the digest saved with them"
                        f"{' (it has none: written by an older clsim?)' if saved is None else ''}; "
                        f"start the run again")
    return state


def _recorded_config(state: dict, path: Path) -> dict:
    try:
        config = json.loads(state["config"])
        if isinstance(config, dict) and isinstance(config.get("argv"), list):
            return config
    except (KeyError, TypeError, ValueError):
        pass
    raise UserError(f"{path} records no run configuration (it was written by an older clsim, or damaged); "
                    f"start the run again")


#: what config.json records that does not change the figures: how the run was asked for (its
#: resolved options are compared), where it writes, who watches it, and how many processes run
#: it where (data-parallel runs give the one-process figures: a run stopped on N workers may
#: continue on M, or on another Ray cluster)
OBSERVERS = {"argv": None, "run": ("loggers", "progress", "out", "workers", "address")}


def _identity(config: dict) -> dict:
    """A run's configuration less its OBSERVERS: what a resumed run must share with its checkpoint."""
    out = {k: v for k, v in config.items() if k not in OBSERVERS or OBSERVERS[k]}
    for key, dropped in OBSERVERS.items():
        if dropped and isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k not in dropped}
    return out


def difference(then, now, where: str = "") -> str | None:
    """The first place two JSON values differ, as 'key: <then> when it started, <now> now' (None
    when equal)."""
    if isinstance(then, dict) and isinstance(now, dict):
        for key in sorted(set(then) | set(now), key=str):
            if key not in now or key not in then:
                return f"{where}{key}: {'absent' if key not in then else repr(then[key])} when it started, " \
                       f"{'absent' if key not in now else repr(now[key])} now"
            found = difference(then[key], now[key], f"{where}{key}.")
            if found:
                return found
        return None
    if then != now or type(then) is not type(now):
        return f"{where.rstrip('.') or 'value'}: {then!r} when it started, {now!r} now"
    return None


def _note_interrupted(partial: Path) -> None:
    """A run re-started without --resume: say where the interrupted one is kept (if it is not running)."""
    try:
        fd = _lock(partial)
    except OSError:
        return
    if fd is not None:
        os.close(fd)
        if (partial / CHECKPOINT).is_file():
            print(f"warning: an interrupted run of this setting is kept in {partial}; "
                  f"continue it with: {RESUME} {partial}", file=sys.stderr)
