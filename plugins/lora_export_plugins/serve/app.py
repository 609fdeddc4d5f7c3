"""The Ray Serve application: an HTTP deployment over ``ReplicaModel``, routed by adapter.

Endpoints: ``GET /healthz``; ``GET /v1/adapters``; ``POST /v1/run`` (see ``protocol``). Errors are JSON
``{"error": one line}`` with 400 (bad request), 404 (unknown adapter or path), 405 or 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from .batcher import Batcher
from .catalog import Catalog
from .encode import outputs_body
from .protocol import BadRequest, UnknownAdapter, parse_run, to_feeds
from .replica import ReplicaModel

log = logging.getLogger("lora_export.serve")


class _Held:
    """What Serve's multiplexed LRU holds for an adapter; its ``__del__`` is how Serve says it evicted it."""

    def __init__(self, model: ReplicaModel, name: str) -> None:
        self.model, self.name, self._released = model, name, False

    def __del__(self) -> None:
        # Serve calls it on eviction, and Python once more at collection: release once.
        if not self._released:
            self._released = True
            self.model.release(self.name)


def _response(status: int, doc: dict | bytes):
    from starlette.responses import Response

    body = doc if isinstance(doc, bytes) else json.dumps(doc, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json")


def build_app(
    model_dir: str | Path,
    *,
    adapters_dir: str | Path | None = None,
    replicas: int = 1,
    max_adapters_per_replica: int = 8,
    max_batch_size: int = 8,
    batch_wait_ms: float = 2.0,
    providers: list[str] | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
):
    """The Serve application for an inject output ``model_dir`` (per-row or not).

    ``adapters_dir``: a second folder of adapters (``.onnx_adapter``, ``.safetensors``, PEFT folders) loaded
    on demand; files dropped there become servable without a restart. ``max_batch_size=1`` turns batching
    off. ``max_ongoing_requests`` (default: twice the batch, at least Serve's 5) bounds the requests a replica
    holds: enough for the next batch to fill while one runs. Each replica runs ONNX Runtime on as many
    threads as the CPUs it reserves (``ray_actor_options["num_cpus"]``, default 1), not on every core of its
    node, which replicas sharing a node would fight over. Returns ``Deployment.bind(...)``: pass it to
    ``serve.run``.
    """
    from ray import serve

    model_dir = Path(model_dir).resolve()
    folders = [model_dir] + ([Path(adapters_dir).resolve()] if adapters_dir is not None else [])
    options = {"num_cpus": 1, **(ray_actor_options or {})}
    threads = max(1, int(options["num_cpus"] or 1))
    ongoing = max_ongoing_requests or max(5, 2 * max_batch_size)

    # Serve's access log writes a line per request at INFO; ours is at DEBUG (see __call__).
    @serve.deployment(
        name="lora-export",
        num_replicas=replicas,
        ray_actor_options=options,
        max_ongoing_requests=ongoing,
        logging_config={"enable_access_log": False},
    )
    class LoraServer:
        def __init__(self) -> None:
            self.catalog = Catalog(folders)
            self.model = ReplicaModel(model_dir, self.catalog, providers, threads)
            rows = max_batch_size if self.model.batchable else 1
            self.batcher = Batcher(
                self.model.run_group, max_rows=rows, wait_s=batch_wait_ms / 1000, mixed=self.model.per_row
            )

        @serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)
        async def hold(self, name: str) -> _Held:
            await asyncio.get_running_loop().run_in_executor(None, self.model.hold, name)
            return _Held(self.model, name)

        async def __call__(self, request):
            start = time.perf_counter()
            path, method = request.url.path, request.method
            root = request.scope.get("root_path", "")  # the application's route prefix
            if root and path.startswith(root):
                path = path[len(root) :]
            path = path.rstrip("/") or "/"
            adapter = None
            try:
                if path == "/healthz":
                    status, doc = 200, {"status": "ok"}
                elif path == "/v1/adapters":
                    status, doc = 200, {"adapters": self.catalog.names(), "per_row": self.model.per_row}
                elif path == "/v1/run":
                    if method != "POST":
                        status, doc = 405, {"error": "use POST for /v1/run"}
                    else:
                        adapter, doc = await self._run(await request.body())
                        status = 200
                else:
                    status, doc = 404, {"error": f"no endpoint {path} (try /healthz, /v1/adapters, /v1/run)"}
            except (BadRequest, UnknownAdapter) as e:
                status, doc = e.status, {"error": str(e)}
            except Exception as e:  # noqa: BLE001 - one line to the client, the detail to the log
                from lora_export.errors import LoraExportError, one_line

                status = 400 if isinstance(e, LoraExportError) else 500
                doc = {"error": one_line(e) if status == 400 else f"internal error: {type(e).__name__}"}
                if status == 500:
                    log.warning("%s %s failed", method, path, exc_info=True)
            ms = (time.perf_counter() - start) * 1000
            level = logging.WARNING if status >= 500 else logging.DEBUG
            log.log(level, "%s %s adapter=%s %d %.1f ms", method, path, adapter, status, ms)
            return _response(status, doc)

        def batch_rows(self) -> dict:
            """This replica's id and the rows of each group it ran (not an HTTP endpoint: for load tests)."""
            from ray import serve as _serve

            return {"replica": _serve.get_replica_context().replica_id.unique_id, "rows": list(self.batcher.group_rows)}

        async def _run(self, body: bytes) -> tuple[str | None, bytes]:
            adapter, named, inputs = parse_run(body)
            routed = serve.get_multiplexed_model_id() or None
            if not named:
                adapter = routed  # the routing header alone names it
            elif routed is not None and adapter != routed:
                raise BadRequest(f"the body names adapter {adapter!r}, the routing header {routed!r}")
            feeds = to_feeds(inputs, self.model.inputs)
            if adapter is not None:
                if self.catalog.source(adapter) is None:
                    raise UnknownAdapter(f"no adapter named {adapter!r} (GET /v1/adapters lists them)")
                await self.hold(adapter)
            values = await self.batcher.submit(adapter, feeds)
            return adapter, outputs_body(self.model.outputs, values)

    return LoraServer.bind()
