"""The peer of the serving benchmark: a minimal raw Starlette app on the same exported embeddings and
the same top-k code (``recsys_core.scoring.Ranker``), no BentoML, no canary, no feedback writes.

    RAW_MODEL_DIR=/path/to/version uvicorn benchmarks.raw_app:app --port 3100 --workers 1
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import recsys_assets  # noqa: F401
from recsys_core.scoring import Ranker, single_threaded_blas

single_threaded_blas()  # as the service does at start
RANKER = Ranker.load(Path(os.environ["RAW_MODEL_DIR"]), version=1)


async def recommend(request: Request) -> JSONResponse:
    body = await request.json()
    k = int(body.get("k", 10))
    rec = RANKER.recommend(str(body["user_id"]), k)
    items = [
        {"track_id": t, "artist_id": a, "score": s}
        for t, a, s in zip(rec.track_ids, rec.artist_ids, rec.scores, strict=True)
    ]
    return JSONResponse({"user_id": body["user_id"], "items": items, "model_version": 1, "variant": "champion",
                         "fallback": rec.fallback})  # fmt: skip


app = Starlette(routes=[Route("/recommend", recommend, methods=["POST"])])
