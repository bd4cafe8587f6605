"""`/health`, `/metrics` (Prometheus) and `/v1/models`."""

from __future__ import annotations

import asyncio
import dataclasses

from fastapi import APIRouter
from fastapi.responses import Response

from pensieve.server.common import State

router = APIRouter()


@router.get("/health")
async def health(s: State):
    """Up, and what the generator behind it can do (`Capabilities`): a disk tier, streamed completions, instances."""
    return {"status": "ok", **dataclasses.asdict(s.gen.capabilities)}


@router.get("/metrics")
async def prometheus(s: State):
    stats = await asyncio.to_thread(s.gen.stats)
    return Response(s.metrics.render(stats), media_type=s.metrics.content_type)


@router.get("/v1/models")
async def models(s: State):
    return {"object": "list", "data": [_model_card(s.config.model_name)]}


@router.get("/v1/models/{model}")
async def model_card(model: str, s: State):
    s.check_model(model)
    return _model_card(s.config.model_name)


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "pensieve"}
