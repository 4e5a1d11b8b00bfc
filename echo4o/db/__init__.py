"""SQL records (SQLAlchemy 2 + Alembic): job rows, API keys and worker heartbeats.

``upgrade_to_head(url)`` creates or upgrades the schema; ``session_scope(url)`` opens a session;
:mod:`echo4o.db.crud` holds the operations.
"""

from echo4o.db.migrate import upgrade_to_head
from echo4o.db.models import ApiKey, Base, Job, Worker
from echo4o.db.session import dispose_engines, get_engine, get_sessionmaker, session_scope

__all__ = [
    "ApiKey",
    "Base",
    "Job",
    "Worker",
    "dispose_engines",
    "get_engine",
    "get_sessionmaker",
    "session_scope",
    "upgrade_to_head",
]
