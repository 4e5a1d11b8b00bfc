"""The ceiling for ``POST /generate``: a FastAPI app whose route takes the same JSON body and answers 202 at
once (no auth, no database, no broker), served by uvicorn the way ``echo4o serve`` serves the gateway.

    .venv/bin/python benchmarks/noop_app.py --port 8099

``benchmarks/serving_bench.py`` starts it and drives it with wrk next to the real gateway.
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import uvicorn
from fastapi import FastAPI

app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/generate", status_code=202)
async def generate(payload: dict[str, Any]) -> dict[str, str]:
    job_id = uuid.uuid4().hex
    return {"id": job_id, "status": "queued", "status_url": f"/jobs/{job_id}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8099)
    args = ap.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
