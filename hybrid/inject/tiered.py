"""Tiered start: answer at once on torch while the numba kernels compile, then swap them in.

numba compiles a model's kernels on their first call, minutes on a small machine, and
caches them on disk (`hybrid.operators.kernels`, one directory per kernel source). When the
cache does not hold them yet for this model, rules and CPU, `load_tiered` loads the model
under the `torch-cpu` rules (the same weights dequantized to float32: no compilation) and
starts a compiler: a background process (`python -m hybrid.inject.tiered`) that loads the
model under the kernel rules and runs its warm-up, which compiles exactly the kernel paths
the model uses and fills the on-disk cache. When it is done, `Tiers` loads the kernel model
(weights mapped, no compiling: the cache has it) and hands it to the engine
(`Engine.replace_model`), whose thread loads the kernels from the cache and swaps models
between two steps; the KV cache is shared, so generations in flight go on. After the swap
the speed is the kernels' own, as with a warm start.

A marker file beside the cache (`ready-<key>.json`, written by the compiler after its
warm-up) says that this model's kernels are there; with it, `load_tiered` loads the kernel
model directly. Without it (cache emptied, new model, other CPU, edited kernels) the start
is tiered. A compiler that outlives the command that started it (a short `hybrid run`)
finishes filling the cache for the next start; concurrent compilers take turns (a lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

from hybrid.inject.progress import Progress

log = logging.getLogger(__name__)

TORCH_RULES = "torch-cpu"


def _cache_dir() -> Path:
    import numba

    import hybrid.operators.kernels  # noqa: F401  (points numba at the kernel-source-keyed cache)

    return Path(numba.config.CACHE_DIR)


def variant_key(source, rules) -> str:
    """What the compiled kernels depend on besides their sources (the cache directory's
    name): the model file, the rules, the CPU numba compiles for."""
    import llvmlite.binding as llvm
    import numba

    from hybrid.files.checkpoint import find_source

    src = find_source(source)
    files = [Path(p) for p in (src.gguf_files or src.safetensors_files or [src.path])]
    stats = [(str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    cpu = (numba.config.CPU_NAME or llvm.get_host_cpu_name(), numba.config.CPU_FEATURES or "")
    text = json.dumps([stats, _rules_arg(rules), cpu])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rules_arg(rules) -> str:
    """A rule file as an absolute path (the compiler runs elsewhere), a name or YAML text as given."""
    try:
        if Path(str(rules)).is_file():
            return str(Path(str(rules)).resolve())
    except OSError:  # YAML text too long for a file name
        pass
    return str(rules)


def marker(source, rules) -> Path:
    return _cache_dir() / f"ready-{variant_key(source, rules)}.json"


def kernels_ready(source, rules) -> bool:
    """Whether the compiler has filled the kernel cache for this model, rules and CPU."""
    return marker(source, rules).exists()


def float32_fits(refs: dict) -> bool:
    """Whether the weights dequantized to float32 (the torch tier) take at most half the
    memory available now (/proc/meminfo; 2 GiB where it cannot be read)."""
    need = 4 * sum(math.prod(ref.shape) for ref in refs.values())
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = 4 << 30
    return need <= avail // 2


def uses_kernels(rules) -> bool:
    """Whether the rules put any module on the numba CPU kernels."""
    from hybrid.inject.placement import parse_rules

    ruleset = parse_rules(rules)
    return any(r.operator is not None and not getattr(r.operator, "keeps_children", False)
               and torch.device(str(r.device or ruleset.default_device)).type == "cpu" for r in ruleset.rules)


class Tiers:
    """The kernel tier of a tiered start: its compiler process, its progress (`progress`,
    `state`: compiling, loading, swapping, ready or failed) and the hand-over to an engine."""

    def __init__(self, source, rules, progress: Progress | None = None):
        self.source, self.rules = str(source), rules
        self.progress = progress or Progress()
        self.state, self.error = "compiling", None
        self.done = threading.Event()
        self.process: subprocess.Popen | None = None
        self._engine = None

    def start_compiler(self) -> "Tiers":
        """Start the compiler process (niced, one numba thread, stderr to a log in the cache)."""
        log_path = _cache_dir() / "compile.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, NUMBA_NUM_THREADS="1", NUMBA_CACHE_DIR=str(_cache_dir()))
        # The same hybrid as this process's: run from the directory it was imported from
        # (`-m` puts the working directory first on sys.path).
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        source = str(Path(self.source).resolve()) if Path(self.source).exists() else self.source
        cmd = [sys.executable, "-m", "hybrid.inject.tiered", source, "--rules", _rules_arg(self.rules)]
        with open(log_path, "ab") as err:
            # its own session: it keeps filling the cache if this process ends first
            self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=root,
                                            start_new_session=True)
        self.progress.stage("compiling kernels in the background", detail="starting the compiler")
        return self

    def attach(self, engine) -> None:
        """Follow the compiler; when it is done, load the kernel model and give it to `engine`."""
        self._engine = engine
        threading.Thread(target=self._follow, name="hybrid-kernels", daemon=True).start()

    def _follow(self) -> None:
        try:
            for line in self.process.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "stage" in msg:
                    self.progress.stage(msg["stage"], msg.get("total", 0), msg.get("unit", ""), msg.get("detail", ""))
                    self.progress.update(done=msg.get("done", 0))
            status = self.process.wait()
            if status != 0:
                raise RuntimeError(f"the kernel compiler exited with status {status} (see {_cache_dir() / 'compile.log'})")
            if self._engine is None:  # stopped: the cache is filled, nobody to hand the kernels to
                return
            self.state = "loading"
            from hybrid.inject.loader import load

            model = load(self.source, self.rules, progress=self.progress)
            self.state = "swapping"
            self.progress.stage("loading compiled kernels")

            def prepare():
                model.set_torch_threads()
                warm_up(model, self.progress)

            engine = self._engine
            if engine is not None:
                engine.replace_model(model, prepare=prepare, on_swapped=self._swapped)
        except Exception as e:
            log.warning("kernels unavailable, staying on torch: %s", e)
            self._fail(e)

    def _swapped(self, error) -> None:
        if error is not None:
            self._fail(error)
            return
        self.state = "ready"
        self.progress.stage("kernels ready")
        self.done.set()

    def _fail(self, error) -> None:
        self.state, self.error = "failed", f"{type(error).__name__}: {error}"
        self.progress.stage("kernels failed; answering on torch", detail=self.error)
        self.done.set()

    def snapshot(self) -> dict:
        """{"state", "progress", "error"?} for /health."""
        out = {"state": self.state, "progress": self.progress.snapshot()}
        if self.error:
            out["error"] = self.error
        return out

    def stop(self) -> None:
        """Stop following (the compiler goes on filling the cache on its own)."""
        self._engine = None


def load_tiered(source, rules=None, *, progress=None, tiered: bool | None = None):
    """(model, tiers) for an engine.

    - The kernels of this model, rules and CPU are in the cache, or the rules use none:
      the model under `rules`, tiers None.
    - Else, by default (`tiered` None) or with `tiered` True: the model under torch-cpu and
      a started `Tiers` to `attach` to the engine, unless the float32 copy would not fit
      in memory (`float32_fits`).
    - Else (`tiered` False, or too large for torch): the model under `rules`, its kernels
      compiled here before it is returned (with `progress`), tiers None.
    progress: a `Progress`, or True for a status line on stderr."""
    from hybrid.inject.loader import default_rules, describe, load
    from hybrid.inject.progress import StatusLine

    _, cfg, refs, _ = describe(source)
    rules = rules if rules is not None else default_rules(cfg["model_type"])
    cold = uses_kernels(rules) and not kernels_ready(source, rules)
    if tiered or (tiered is None and cold and float32_fits(refs)):
        tiers = Tiers(source, rules).start_compiler()
        return load(source, TORCH_RULES, progress=progress), tiers
    line = None
    if progress is True:
        progress, line = Progress(), StatusLine()
        progress.listen(line)
    try:
        model = load(source, rules, progress=progress)
        if cold:
            compile_here(model, source, rules, progress)
    finally:
        if line is not None:
            line.close()
    return model, None


def compile_here(model, source, rules, progress: Progress | None = None) -> None:
    """Compile (or load) the kernels `model` uses in this process, then write the marker."""
    warm_up(model, progress)
    path = marker(source, rules)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": str(source), "rules": str(rules), "formats": model.kernel_formats()}))


def warm_up(model, progress: Progress | None = None) -> None:
    """`model.warm_up()` reporting its steps ("loading compiled Q4_1 kernels: decode 2/3",
    "compiling ..." once numba starts compiling) and the kernel being compiled."""
    if progress is None:
        return model.warm_up()
    formats = ", ".join(model.kernel_formats()) or "float"
    steps, now = len(model.WARM_UP), {"step": 0, "what": "", "compiling": False}

    def show():
        verb = "compiling" if now["compiling"] else "loading compiled"
        progress.stage(f"{verb} {formats} kernels: {now['what']}", steps, "steps")
        progress.update(done=now["step"])

    def on_step(i, what):
        now.update(step=i, what=what)
        show()

    def on_compile(name):
        if not now["compiling"]:
            now["compiling"] = True
            show()
        progress.update(detail=name)

    listener = _compile_listener(on_compile)
    try:
        model.warm_up(on_step)
    finally:
        _unregister(listener)
    progress.stage(f"{formats} kernels ready")


# ------------------------------------------------------------------ the compiler process

def _emit(msg: dict) -> None:
    """A progress line to the parent; it may be gone (the cache is filled all the same)."""
    try:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass


def _compile_listener(report):
    """report(name) with the name of each kernel numba starts compiling (e.g.
    'layer.dense_stack_step'); returns the listener, for `_unregister`."""
    import numba.core.event as ev

    class Listener(ev.Listener):
        def on_start(self, event):
            py = getattr(event.data.get("dispatcher"), "py_func", None)
            if py is not None and py.__module__.startswith("hybrid.operators.kernels"):
                report(f"{py.__module__.rsplit('.', 1)[-1]}.{py.__name__}")

        def on_end(self, event):
            pass

    listener = Listener()
    ev.register("numba:compile", listener)
    return listener


def _unregister(listener) -> None:
    import numba.core.event as ev

    ev.unregister("numba:compile", listener)


def compile_kernels(source, rules) -> None:
    """Load the model under `rules` and warm it up: numba compiles the kernels it calls and
    writes them to its cache; then write the marker. Takes turns with other compilers."""
    from hybrid.inject.loader import load

    path = marker(source, rules)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "compile.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _emit({"stage": "compiling kernels in the background", "detail": "waiting for another compiler"})
            fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return
        _emit({"stage": "compiling kernels in the background", "detail": "reading the model"})
        model = load(source, rules)
        progress = Progress()
        progress.listen(lambda snap: _emit({k: snap[k] for k in ("stage", "done", "total", "unit", "detail")}))
        compile_here(model, source, rules, progress)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m hybrid.inject.tiered",
                                 description="compile a model's numba kernels into the on-disk cache")
    ap.add_argument("source")
    ap.add_argument("--rules", required=True)
    args = ap.parse_args(argv)
    try:
        os.nice(5)  # the process answering on torch meanwhile comes first
    except OSError:
        pass
    compile_kernels(args.source, args.rules)
    return 0


if __name__ == "__main__":
    sys.exit(main())
