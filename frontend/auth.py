"""--apikey: the X-API-KEY header, compared in constant time; 403 {"detail": "Forbidden"}."""
from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


async def require_api_key(request: Request) -> None:
    expected = request.app.state.settings.apikey
    if not expected:
        return
    given = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status_code=403, detail="Forbidden")
