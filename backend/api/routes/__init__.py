"""One APIRouter per resource; routes stay thin (deps in backend.api.deps, logic in backend.services)."""
