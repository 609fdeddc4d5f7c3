"""``lora-export serve DIR``: the Serve application on a local Ray cluster, or on one given by ``--address``.

Found by the CLI through the ``lora_export.commands`` entry point; Ray is imported only when the command runs.
SIGTERM or Ctrl-C drain in-flight requests (Serve's graceful shutdown), stop the application and, for a
cluster this command started, Ray itself.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import click

from lora_export.errors import LoraExportError

APP_NAME = "lora-export"
SERVE_EXTRA = "Ray Serve is not installed: pip install 'lora-export[serve]'"


def summary(e: BaseException) -> str:
    """The last meaningful line of a (Ray) error: the exception that stopped the replica."""
    from lora_export.errors import one_line

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    return one_line(Exception((errors or lines or [type(e).__name__])[-1]))


def _local_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))


def _check_dir(folder: Path) -> None:
    model = folder / "model.onnx"
    if not folder.is_dir():
        raise LoraExportError(f"{folder}: not a folder (give an inject output: lora-export inject ... -o DIR)")
    if not model.is_file():
        raise LoraExportError(f"{folder} holds no model.onnx (give an inject output: lora-export inject ... -o DIR)")


@click.command("serve")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP host (0.0.0.0 to listen on all).")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), help="Serve replicas.")
@click.option("--max-adapters-per-replica", default=8, show_default=True, type=click.IntRange(1),
              help="Adapters each replica keeps resident (an LRU).")  # fmt: skip
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1),
              help="Rows batched into one run (1: no batching).")  # fmt: skip
@click.option("--batch-wait-ms", default=2.0, show_default=True, type=click.FloatRange(0, 1000),
              help="How long a batch waits for more requests.")  # fmt: skip
@click.option("--adapters", "adapters_dir", type=click.Path(path_type=Path, file_okay=False),
              help="A second folder of adapters, loaded on demand.")  # fmt: skip
@click.option("--address", default=None, help="An existing Ray cluster (default: start a local one).")
def serve_command(
    directory: Path,
    port: int,
    host: str,
    replicas: int,
    max_adapters_per_replica: int,
    max_batch_size: int,
    batch_wait_ms: float,
    adapters_dir: Path | None,
    address: str | None,
) -> None:
    """Serve an inject output over HTTP on Ray Serve (GET /healthz, GET /v1/adapters, POST /v1/run)."""
    _check_dir(directory)
    if adapters_dir is not None and not adapters_dir.is_dir():
        raise LoraExportError(f"--adapters {adapters_dir}: not a folder")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise LoraExportError(SERVE_EXTRA) from None
    from .app import build_app

    stop = threading.Event()

    def on_signal() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())

    on_signal()
    click.echo(f"starting {'Ray' if address is None else 'on ' + address} and Serve", err=True)
    try:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        except SystemExit as e:
            # Ray's own SIGTERM handler (installed by ray.init) exits with the signal's number: a stop request
            if e.code != signal.SIGTERM:
                raise
            stop.set()
        on_signal()  # Ray's core worker replaces our handlers; a stop must drain, not exit on the spot
        if stop.is_set():
            return
        serve.start(http_options={"host": host, "port": port})
        app = build_app(
            directory,
            adapters_dir=adapters_dir,
            replicas=replicas,
            max_adapters_per_replica=max_adapters_per_replica,
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
            # Locally, the replicas share the machine's cores: Serve's default of one CPU per replica would leave
            # replicas beyond the cores unscheduled, and fewer replicas than cores would leave cores idle (a
            # replica runs ONNX Runtime on as many threads as the CPUs it reserves).
            ray_actor_options=None if address else {"num_cpus": _local_cpus() / replicas},
        )
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as e:  # noqa: BLE001 - Ray reports a replica that failed to start with its traceback
            raise LoraExportError(f"the server did not start: {summary(e)}") from None
        if not stop.is_set():
            click.echo(f"serving {directory} at http://{host}:{port} (Ctrl-C or SIGTERM stops)", err=True)
            stop.wait()
        click.echo("draining and stopping", err=True)
    finally:
        if ray.is_initialized():
            try:
                # On a cluster we were given, other applications may run: remove ours only.
                serve.delete(APP_NAME) if address else serve.shutdown()
            finally:
                ray.shutdown()
