"""Outputs under kill -9, on mount points and full disks: what the output names hold at every instant,
which staging entries a later run removes (only the tool's own), and that a failure leaves nothing.

The kill matrix runs the CLI in a forked child of one helper process (imports paid once) that SIGKILLs
itself before its Nth rename/replace/link/folder exchange; every N up to a complete run is tried. The
mount cases mount a private tmpfs inside the test's temp folder (root only, else skipped) and always
unmount it again."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_io_surface import _adapter, _assert_one_line_refusal, _base, _cli, _hashes, _run, _stages

from lora_export import Adapter, LoraConfig, LoraTarget, save_adapter_files
from lora_export.files.staging import MARKER_NAME, STAGE_PREFIX, _proof, clean_stale, remove_tree, staging_dir
from lora_export.graph.verbs.inject import inject_files
from lora_export.graph.verbs.merge import merge_file

_SERVER = textwrap.dedent(
    """
    import json, os, signal, sys
    from lora_export.cli import main
    from lora_export.files import publish
    from lora_export.graph.ops.layouts import registered_layouts

    registered_layouts()  # the plugins' entry points are looked up once here, not in every fork

    def hook(kill_at, log, exchange):
        count = [0]

        def event(what):
            count[0] += 1
            with open(log, "a") as f:
                f.write(what + "\\n")
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        def wrap(name):
            real = getattr(os, name)

            def step(*args, **kw):
                event(f"{name} {args[-1]}")
                return real(*args, **kw)

            setattr(os, name, step)

        for name in ("rename", "replace", "link"):
            wrap(name)
        real_exchange = publish._renameat2_exchange

        def exchange_step(a, b):
            if not exchange:
                return False
            event(f"exchange {b}")
            return real_exchange(a, b)

        publish._renameat2_exchange = exchange_step

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            out = os.open(req["log"] + ".out", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(out, 1)
            os.dup2(out, 2)
            hook(req["kill_at"], req["log"], req["exchange"])
            try:
                main(req["argv"])
            except SystemExit as e:
                os._exit(e.code if isinstance(e.code, int) else 1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
    """
)


class _Server:
    """Runs ``lora-export ARGV`` in a forked child that kills itself with SIGKILL before event ``kill_at``."""

    def __init__(self, folder: Path):
        script = folder / "server.py"
        script.write_text(_SERVER)
        self.log = folder / "events.log"
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, argv, kill_at: int = 0, exchange: bool = True) -> int:
        self.log.unlink(missing_ok=True)
        req = {"argv": [str(a) for a in argv], "kill_at": kill_at, "log": str(self.log), "exchange": exchange}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def events(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = _Server(tmp_path_factory.mktemp("server"))
    yield s
    s.close()


def _files(folder: Path) -> dict[str, str]:
    """Hashes of the output's files (staging entries left out: they are checked on their own)."""
    return {k: v for k, v in _hashes(folder).items() if not k.startswith(STAGE_PREFIX)} if folder.exists() else {}


def _kill_matrix(server: _Server, setup, argv, check, finish, exchange: bool = True) -> int:
    """Kill before every event of a complete run in turn: ``check`` the output after each kill, then a
    normal run must succeed and leave what ``finish`` checks. Returns the number of events."""
    n = 0
    while True:
        n += 1
        setup()
        rc = server.run(argv, kill_at=n, exchange=exchange)
        if rc == 0:
            assert n > 3, server.events()  # vacuous unless the run had steps to be killed between
            finish()
            return n - 1
        assert rc == -signal.SIGKILL, (rc, server.events())
        where = server.events()[-1]
        check(where)
        assert server.run(argv) == 0, (server.log.with_suffix(".log.out").read_text(), where)
        finish()


def _data_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.data"))


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing"])
def test_merge_killed_at_every_step_leaves_nothing_old_or_new(tmp_path, server, existing):
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    merge_file(base, adapter, tmp_path / "old" / "m.onnx", scale=1.0)
    merge_file(base, adapter, tmp_path / "new" / "m.onnx", scale=3.0)
    old, new = _files(tmp_path / "old"), _files(tmp_path / "new")
    y_old, y_new = _run(tmp_path / "old" / "m.onnx"), _run(tmp_path / "new" / "m.onnx")
    assert not np.allclose(y_old, y_new) and _data_names(tmp_path / "old") != _data_names(tmp_path / "new")
    out = tmp_path / "out"

    def setup():
        shutil.rmtree(out, ignore_errors=True)
        if existing:
            shutil.copytree(tmp_path / "old", out)

    def check(where):
        files, model = _files(out), out / "m.onnx"
        if not model.exists():
            assert not existing, f"the previous model is gone (killed before {where})"
            return
        want, y = (old, y_old) if files["m.onnx"] == old["m.onnx"] else (new, y_new)
        assert existing or want is new
        assert {k: files.get(k) for k in want} == want, where  # the model with all of its own data
        np.testing.assert_array_equal(_run(model), y)

    def finish():
        assert _files(out) == new and not _stages(out), sorted(os.listdir(out))

    argv = ["merge", base, adapter, "-o", out / "m.onnx", "--scale", "3"]
    assert _kill_matrix(server, setup, argv, check, finish) >= 4


@pytest.mark.parametrize(
    "existing, exchange",
    [(False, True), (True, True), (True, False)],
    ids=["fresh", "existing-renameat2", "existing-two-renames"],  # a fresh folder is renamed, never exchanged
)
def test_inject_killed_at_every_step_leaves_old_or_new_folder(tmp_path, server, existing, exchange):
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    inject_files(_base(tmp_path / "b0", seed=5), [adapter], tmp_path / "old")
    (tmp_path / "old" / "notes.txt").write_text("mine")
    inject_files(base, [adapter], tmp_path / "new")
    old, new = _files(tmp_path / "old"), _files(tmp_path / "new")
    # Both load with plain ONNX Runtime and differ: a folder equal to one of them is that output, complete.
    assert not np.array_equal(_run(tmp_path / "old" / "model.onnx"), _run(tmp_path / "new" / "model.onnx"))
    if existing:
        new["notes.txt"] = old["notes.txt"]
    out = tmp_path / "work" / "out"

    def setup():
        shutil.rmtree(tmp_path / "work", ignore_errors=True)
        (tmp_path / "work").mkdir()
        if existing:
            shutil.copytree(tmp_path / "old", out)

    def check(where):
        files = _files(out)
        if existing and not files and not exchange:
            # Between the two renames of a swap without renameat2 there is no folder for a moment; the
            # old one waits in the killed run's staging folder, and the next run puts it back first.
            clean_stale(out.parent)
            files = _files(out)
            assert files == old, where
        assert files in ([old, new] if existing else [{}, new]), where

    def finish():
        assert _files(out) == new and not _stages(tmp_path / "work") and not _stages(out)

    argv = ["inject", base, adapter, "-o", out]
    assert _kill_matrix(server, setup, argv, check, finish, exchange=exchange) >= 4


def test_a_replaced_model_takes_only_its_own_data_along(tmp_path):
    """The old output's data file goes with it (also the ``<model>.data`` of earlier versions); data files
    the old model did not read stay, whatever their name."""
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "b", out)
    (out / "model.onnx.0123456789abcdef.data").write_bytes(b"not read by the old model")
    (out / "other.data").write_bytes(b"mine")
    assert _cli("merge", base, adapter, "-o", out / "model.onnx").exit_code == 0
    merge_file(base, adapter, tmp_path / "ref" / "model.onnx")
    want = _files(tmp_path / "ref")
    mine = {n: _files(out)[n] for n in ("model.onnx.0123456789abcdef.data", "other.data")}
    assert _files(out) == {**want, **mine}  # model.onnx.data (the replaced model's) is gone
    np.testing.assert_array_equal(_run(out / "model.onnx"), _run(tmp_path / "ref" / "model.onnx"))


def test_only_proven_staging_entries_are_removed(tmp_path, server):
    """A killed run's leftovers go; a user's ``.lora-export-*`` entries, a link to a secret folder and a
    live run's folder stay, and cleaning never follows a link."""
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert server.run(["merge", base, adapter, "-o", out / "m.onnx"], kill_at=2) == -signal.SIGKILL
    killed = _stages(out)
    assert len(killed) == 2 and any((out / s / MARKER_NAME).is_file() for s in killed)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("s3cret")
    user = {
        ".lora-export-notes/a.txt": "mine",
        ".lora-export-0123456789ab/a.txt": "looks like a token, no proof",
        ".lora-export-0123456789ab.lock": "not a proof",
        ".lora-export-aaaaaaaaaaaa.locking": "not empty, not a proof",
    }
    for name, text in user.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    # A proven lock whose "folder" is a link to the secret, and a proven marker-only folder holding a link.
    token = f"{STAGE_PREFIX}bbbbbbbbbbbb"
    (out / token).symlink_to(secret)
    (out / f"{token}.lock").write_bytes(_proof(token))
    orphan = out / f"{STAGE_PREFIX}cccccccccccc"
    orphan.mkdir()
    (orphan / MARKER_NAME).write_bytes(_proof(orphan.name))
    (orphan / "link").symlink_to(secret)
    (out / f"{STAGE_PREFIX}dddddddddddd.locking").touch()  # killed before writing its proof: empty
    (out / f"{STAGE_PREFIX}eeeeeeeeeeee.locking").write_bytes(_proof(f"{STAGE_PREFIX}eeeeeeeeeeee"))
    with staging_dir(out) as live:
        assert _cli("merge", base, adapter, "-o", out / "m.onnx").exit_code == 0
        assert live.is_dir()
    left = sorted(set(_stages(out)))
    assert left == sorted(
        [".lora-export-notes", ".lora-export-0123456789ab", ".lora-export-0123456789ab.lock"]
        + [".lora-export-aaaaaaaaaaaa.locking", token, f"{token}.lock"]
    )
    assert all((out / name).read_text() == text for name, text in user.items())
    assert (secret / "key").read_text() == "s3cret"
    # Inside an inject OUTDIR, a user's folder named like a staging folder is carried over.
    inj = tmp_path / "inj"
    (inj / ".lora-export-notes").mkdir(parents=True)
    (inj / ".lora-export-notes" / "a.txt").write_text("mine")
    inject_files(base, [adapter], inj)
    inject_files(_base(tmp_path / "b2", seed=4), [adapter], inj)
    assert (inj / ".lora-export-notes" / "a.txt").read_text() == "mine"


# -- convert-init outputs follow the rule of every output ------------------------------------------


def _init_pair(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(4)
    paths = []
    for name in ("trained", "initial"):
        t = LoraTarget("q", "linear", A=rng.standard_normal((2, 8)).astype(np.float32),
                       B=rng.standard_normal((6, 2)).astype(np.float32), scale=0.5)  # fmt: skip
        path = save_adapter_files(Adapter({"q": t}, LoraConfig(r=2, lora_alpha=1.0), name=name), tmp_path / name)
        cfg = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa"}))
        paths.append(path)
    return paths[0], paths[1]


def test_convert_init_never_replaces_a_fifo_or_a_folder(tmp_path):
    trained, initial = _init_pair(tmp_path)
    out = tmp_path / "out"
    (out / "adapter_model.safetensors").mkdir(parents=True)
    (out / "adapter_model.safetensors" / "precious.bin").write_bytes(b"user data")
    _assert_one_line_refusal(_cli("convert-init", trained, "--initial", initial, "-o", out), "folder")
    assert (out / "adapter_model.safetensors" / "precious.bin").read_bytes() == b"user data"
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "adapter_config.json")
    _assert_one_line_refusal(_cli("convert-init", trained, "--initial", initial, "-o", fifo_dir), "FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo_dir / "adapter_config.json").st_mode)
    assert sorted(os.listdir(tmp_path)) == ["fifo", "initial", "out", "trained"]
    assert _cli("convert-init", trained, "--initial", initial, "-o", tmp_path / "ok").exit_code == 0


# -- mount points ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, size: str = "4m"):
    """A private tmpfs mounted at ``path`` (root only; otherwise the test is skipped), always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    mount_id = _mount_ids().get(str(path.resolve()))
    try:
        yield path
    finally:
        # Unmount it wherever it is now: code under test may have moved the folder holding it.
        where = next((p for p, i in _mount_ids().items() if i == mount_id), str(path))
        if subprocess.run(["umount", where], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", where], capture_output=True)


def _mount_ids() -> dict[str, str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return {line.split()[4]: line.split()[0] for line in f}


def test_removing_a_staging_folder_never_enters_a_mount(tmp_path):
    with staging_dir(tmp_path / "out") as stage:
        (stage / "mnt").mkdir()
        with _tmpfs(stage / "mnt") as mnt:
            (mnt / "theirs.bin").write_bytes(b"on the mount")
            assert not remove_tree(stage)
            assert (mnt / "theirs.bin").read_bytes() == b"on the mount"
            assert (stage / MARKER_NAME).is_file()  # still provably ours, for a later run


def test_inject_leaves_a_filesystem_mounted_inside_outdir_alone(tmp_path):
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    out = tmp_path / "out"
    inject_files(_base(tmp_path / "b0", seed=5), [adapter], out)
    with _tmpfs(out / "cache") as cache:
        (cache / "blob.bin").write_bytes(b"on the mount")
        before = os.stat(cache / "blob.bin")
        inject_files(base, [adapter], out)
        after = os.stat(cache / "blob.bin")
        assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
        assert (cache / "blob.bin").read_bytes() == b"on the mount" and os.path.ismount(cache)
        inject_files(base, [adapter], tmp_path / "ref")
        assert _files(out) == _files(tmp_path / "ref")
        assert not _stages(out) and not _stages(tmp_path)


@pytest.mark.parametrize("command", ["inject", "convert-init"])
def test_outdir_that_is_a_mount_point_is_written_file_by_file(tmp_path, command):
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    trained, initial = _init_pair(tmp_path)
    ref = tmp_path / "ref"
    with _tmpfs(tmp_path / "vol") as vol:
        (vol / "notes.txt").write_text("mine")
        if command == "inject":
            inject_files(_base(tmp_path / "b0", seed=5), [_adapter(tmp_path, "gone", seed=3)], vol)
            argv, ref_argv = ["inject", base, adapter, "-o", vol], ["inject", base, adapter, "-o", ref]
        else:
            argv = ["convert-init", trained, "--initial", initial, "-o", vol]
            ref_argv = [*argv[:-1], ref]
        for _ in range(2):  # a fresh and an existing output
            result = _cli(*argv)
            assert result.exit_code == 0, result.output
        assert _cli(*ref_argv).exit_code == 0
        want = {**_files(ref), "notes.txt": hashlib.sha256(b"mine").hexdigest()}
        assert _files(vol) == want and not _stages(vol) and os.path.ismount(vol)
        if command == "inject":
            np.testing.assert_array_equal(_run(vol / "model.onnx"), _run(ref / "model.onnx"))


# -- nothing left behind after a failure ----------------------------------------------------------


def _inputs_hashes(tmp_path: Path) -> dict[str, str]:
    return {str(p.relative_to(tmp_path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in
            sorted(tmp_path.rglob("*")) if p.is_file()}  # fmt: skip


def _failing_commands(tmp_path: Path, where: Path, long: bool = False) -> list[list]:
    base, adapter = tmp_path / "b" / "model.onnx", tmp_path / "ad"
    leaf = "x" * 256 if long else "leaf"
    return [
        ["merge", base, adapter, "-o", where / "m" / f"{leaf}.onnx"],
        ["inject", base, adapter, "-o", where / "i" / leaf],
        ["verify", base, "--save-outputs", where / "v" / leaf],
    ]


def test_a_name_too_long_leaves_no_folder(tmp_path):
    _base(tmp_path / "b"), _adapter(tmp_path)
    before = _inputs_hashes(tmp_path)
    for argv in _failing_commands(tmp_path, tmp_path / "o", long=True):
        _assert_one_line_refusal(_cli(*argv), "too long")
        assert not (tmp_path / "o").exists(), argv
    assert _inputs_hashes(tmp_path) == before


def test_a_full_disk_leaves_nothing(tmp_path):
    _base(tmp_path / "b"), _adapter(tmp_path)
    before = _inputs_hashes(tmp_path)
    with _tmpfs(tmp_path / "disk", size="64k") as disk:
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            while True:
                f.write(bytes(4096))
                f.flush()
        for argv in _failing_commands(tmp_path, disk / "o"):
            result = _cli(*argv)
            _assert_one_line_refusal(result)
            assert sorted(os.listdir(disk)) == ["filler"], (argv, result.output)
        os.unlink(disk / "filler")
        for argv in _failing_commands(tmp_path, disk / "o"):  # the same commands fit on the empty disk
            assert _cli(*argv).exit_code == 0
    assert _inputs_hashes(tmp_path) == before


_LIMITED = textwrap.dedent(
    """
    import json, sys
    from click.testing import CliRunner
    from lora_export.cli import cli
    results = [CliRunner().invoke(cli, argv) for argv in json.loads(sys.argv[1])]
    print(json.dumps([[r.exit_code, r.output] for r in results]))
    """
)


def test_a_file_size_limit_leaves_nothing(tmp_path):
    """``ulimit -f``: writes past the limit fail (EFBIG, SIGXFSZ ignored) in a child process."""
    import resource

    _base(tmp_path / "b"), _adapter(tmp_path)
    before = _inputs_hashes(tmp_path)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))

    argvs = [[str(a) for a in argv] for argv in _failing_commands(tmp_path, tmp_path / "o")]
    done = subprocess.run(
        [sys.executable, "-c", _LIMITED, json.dumps(argvs)], preexec_fn=limit, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for argv, (code, output) in zip(argvs, json.loads(done.stdout)):
        assert code == 2 and len(output.strip().splitlines()) == 1, (argv, output)
        assert os.strerror(errno.EFBIG) in output, output
    assert not (tmp_path / "o").exists()
    assert _inputs_hashes(tmp_path) == before
