"""Serving an inject output over HTTP on Ray Serve: replicas, adapter-affine routing, mixed-adapter batches.

An optional integration (``pip install 'lora-export[serve]'``): nothing here imports Ray until a server is
built, and the core never imports this package. ``build_app`` returns the Serve application for people who
compose their own deployments; ``lora-export serve DIR`` runs it.

Routing: the adapter name is Serve's multiplexed model id (the ``serve_multiplexed_model_id`` header, or
``handle.options(multiplexed_model_id=...)``), so requests go to replicas that already hold their adapter,
each replica keeping an LRU of at most K resident adapters. Batching is our own, inside a replica: Serve's
``@serve.batch`` splits a batch by multiplexed id, which would undo mixed-adapter batches; ours carries each
row's adapter and runs a per-row model (``inject --per-row``) in one call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import build_app  # noqa: F401


def __getattr__(name: str):
    if name == "build_app":
        from .app import build_app

        return build_app
    raise AttributeError(name)


__all__ = ["build_app"]
